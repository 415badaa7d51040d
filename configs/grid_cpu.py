"""CPU-scale study on real data: the paper's three claims, 3 seeds, on 2 cores in about 5 hours.

    python launch/main.py --config=configs/grid_cpu.py:../shared/data --workdir=runs/grid_cpu

The argument after ':' is the folder holding `busi/` and `pocus/` as downloaded. Runs: SimCLR pre-training on
breast only (BUSI training split; 600 steps, and a second breast arm of 1200) and on multi-organ ultrasound (BUSI +
POCUS lung; 600 steps; no open heart set is at hand, add `camus` where you have it), then U-Net fine-tuning on BUSI
with the recipe of configs/finetune_busi_real.py (model chosen on validation, test scored once at the end) from
each and from scratch, with 100% and 50% of the labels, 3 seeds. Writes runs/grid_cpu/report/{results.csv,
report.md,*.png} (README: The study).

Sizing, and why: C1-C3 need the scratch, breast and multi-organ arms at 100% and 50% (C2 compares pre-trained at
50% with scratch at 100%), and an answer needs seeds: 3 arms x 2 fractions x 3 seeds = 18 fine-tunes. On 2 cores a
128-px fine-tuning step takes about 1 s, so the recipe's 2000 steps are 35-40 minutes a run; at 64 px 1000 steps
(37 passes over the training split) were sized at 5 minutes a run and measured at 10-12 minutes (2026-11-30, a
2-core AMD EPYC VM with test jobs beside it: about 0.6 s a step, validation included), and each 600-step
pre-training at 8.7 minutes: about 3.5 hours for those 18. The 600-step breast pre-training had not flattened (its
BUSI linear probe rose 0.71 -> 0.75 over its last third; usjax/pretrain_analysis.py), which leaves C3 comparing a
flattened multi-organ arm with an under-trained breast one; the `breast_1200` arm (6 more fine-tunes and a
16-minute pre-training; the whole grid measured 4.9 hours) asks whether C3's answer changes when the breast arm
trains longer (it did not: README).
Cells train seed by seed, so a grid cut short still compares every arm on the same seeds, and finished runs are
recorded in results/grid_cpu/, from which a grid started elsewhere goes on. 64 px also measures the claims at the
low resolution where the paper says the gains are largest. The GPU grid (configs/grid_gpu.py) covers 128 px and
all four label fractions.
"""
import ml_collections

from configs import default, finetune_busi_real


def get_config(data_root: str = "../shared/data"):
  g = ml_collections.ConfigDict()
  g.task = "grid"
  g.name = "cpu"
  g.report_only = False
  g.imagenet = ""  # a torchvision/timm ResNet-18 .safetensors file adds an ImageNet arm (README)
  g.sources = ml_collections.ConfigDict({"breast": "busi", "multiorgan": "busi,pocus", "breast_1200": "busi"})
  # Breast-only pre-training had not flattened at 600 steps (results/grid_cpu: its BUSI probe still rising), so a
  # second breast arm trains twice as long; C3 compares multi-organ with both.
  g.pretrain_steps = ml_collections.ConfigDict({"breast_1200": 1200})
  g.methods = ("simclr",)
  g.transfers = ("encoder",)
  g.label_fractions = (100, 50)
  g.image_sizes = (64,)
  g.seeds = (0, 1, 2)
  g.results_dir = "results/grid_cpu"  # each finished run's small outputs, committed; a new workdir goes on from them
  g.stack_runs = 1  # one fine-tune at a time: on CPU stacking runs gains nothing

  g.pretrain = default.get_config()
  g.pretrain.task = "pretrain"
  g.pretrain.data.busi_dir = f"{data_root}/busi"
  g.pretrain.data.pocus_dir = f"{data_root}/pocus"
  g.pretrain.data.natural_dir = f"{data_root}/cifar10_test"
  g.pretrain.num_steps = 600
  g.pretrain.batch_size = 32
  g.pretrain.checkpoint_every = 200
  g.pretrain.log_every = 25
  g.pretrain.probe.every = 200  # frozen-feature probes: the pre-training's own curve of what it learned

  g.finetune = finetune_busi_real.get_config(data_root)
  g.finetune.data.pocus_dir = f"{data_root}/pocus"
  g.finetune.data.natural_dir = f"{data_root}/cifar10_test"
  g.finetune.num_steps = 1000
  g.finetune.val_every = 100
  g.finetune.checkpoint_every = 500
  g.finetune.eval_split = "test"  # a study: scored once on test, at the end, by the validation-chosen model
  # The split its committed results were measured on, before near-duplicates were grouped (README: Near-duplicates
  # in BUSI): kept so that the grid goes on from results/grid_cpu like with like. configs/study_cpu.py groups them.
  for part in (g.pretrain, g.finetune):
    part.data.duplicate_threshold = 0.0
  return g
