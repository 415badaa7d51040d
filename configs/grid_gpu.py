"""The claim grid on one GPU: C1-C3 and the label-fraction curve, 3 seeds, 4 label fractions, 128 px.

    python launch/main.py --config=configs/grid_gpu.py:data_cache/compact --workdir=runs/grid_gpu

Pre-training arms: none (scratch), breast (BUSI training split), multi-organ (BUSI + POCUS lung) and multi-organ
+ natural (the CIFAR-10 folder), SimCLR; fine-tuning with the recipe of configs/finetune_busi_real.py (model
chosen on validation, test scored once at the end) at 100, 50, 25 and 10% of the labels, 3 seeds: 4 x 4 x 3 = 48
fine-tunes. bf16 compute with fp32 weights. One fine-tune at a time does not fit 8 minutes: a 128-px U-Net step at
batch 16 leaves an H200 mostly idle, so each arm's 12 cells (4 fractions x 3 seeds share every shape) train
together in one program (`stack_runs = 12`: `usjax.stacked`, jax.vmap over their train states; each cell gets the
result it would get alone, tests/test_stacked.py). A stacked group keeps no mid-run checkpoints: cut short, it
trains again from step 0. `launch/gpu_study.sh` is the prepared device call (wheels, import check, this grid under
one deadline, then the GPU tests, results packed for `results/grid_gpu/`).

BUSI's near-duplicate groups stay inside one split (`data.duplicate_threshold`, README: Data); one split, not
the cross-validated folds of configs/study_cpu.py, which would need five device calls.

Status: sized from the measured H200 SimCLR rate (README: Benchmarks), not yet run; the stacked step's speed on a
GPU is not measured either. The README says so until the run's results are committed. Finished cells recorded in
`results/grid_gpu/` are not trained again (usjax/grid.py).
"""
from configs import grid_cpu


def get_config(data_root: str = "data_cache/compact"):
  g = grid_cpu.get_config(data_root)
  g.name = "gpu"
  del g.sources["breast_1200"], g.pretrain_steps["breast_1200"]  # the CPU grid's extra arm
  g.sources.update({"multiorgan_natural": "busi,pocus,natural"})
  g.label_fractions = (100, 50, 25, 10)
  g.image_sizes = (128,)
  g.seeds = (0, 1, 2)
  g.results_dir = "results/grid_gpu"
  g.stack_runs = 12

  g.pretrain.data.image_size = 128
  g.pretrain.batch_size = 256
  g.pretrain.num_steps = 1000
  g.pretrain.simclr.temperature = 0.2  # SimCLR's value for larger batches (0.5 at 32)
  g.pretrain.optim.warmup_steps = 100
  g.pretrain.checkpoint_every = 500
  g.pretrain.log_every = 50
  g.pretrain.probe.every = 100
  g.pretrain.model.dtype = "bfloat16"
  g.pretrain.data.num_workers = 8

  g.finetune.data.image_size = 128
  g.finetune.num_steps = 2000
  g.finetune.model.dtype = "bfloat16"
  g.finetune.data.num_workers = 0
  # BUSI's near-duplicates kept inside one split (grid_cpu keeps the ungrouped split its results came from). One
  # grouped split, not the 5 folds of configs/study_cpu.py: 5x the cells do not fit one device call.
  for part in (g.pretrain, g.finetune):
    part.data.duplicate_threshold = 0.95
  return g
