"""CPU-scale study on real data: what the paper's three claims need, on 2 cores in about an hour.

    python launch/main.py --config=configs/grid_cpu.py:../shared/data --workdir=runs/grid_cpu

The argument after ':' is the folder holding `busi/` and `pocus/` as downloaded. Runs: SimCLR pre-training on
breast only (BUSI train split) and on multi-organ ultrasound (BUSI + POCUS lung; no open heart set is at hand,
add `camus` where you have it), then U-Net fine-tuning on BUSI from each and from scratch, with 100% and 50% of
the labels; ResNet-18 U-Net at 64 px. Writes runs/grid_cpu/report/{results.csv,report.md,*.png}: a table of
Dice/IoU/HD95 with 95% bootstrap CIs and the claim rows C1-C3 (see README: Results).
"""
import ml_collections

from configs import default


def get_config(data_root: str = "../shared/data"):
  g = ml_collections.ConfigDict()
  g.task = "grid"
  g.name = "cpu"
  g.report_only = False
  g.sources = ml_collections.ConfigDict({"breast": "busi", "multiorgan": "busi,pocus"})
  g.methods = ("simclr",)
  g.transfers = ("encoder",)
  g.label_fractions = (100, 50)
  g.image_sizes = (64,)
  g.seeds = (0, 1)

  for key in ("pretrain", "finetune"):
    c = default.get_config()
    c.data.busi_dir = f"{data_root}/busi"
    c.data.pocus_dir = f"{data_root}/pocus"
    c.data.camus_dir = ""
    c.data.natural_dir = f"{data_root}/cifar10_test"
    c.task = key
    setattr(g, key, c)
  g.pretrain.num_steps = 300
  g.pretrain.batch_size = 32
  g.pretrain.checkpoint_every = 100
  g.pretrain.log_every = 25
  g.finetune.data.finetune_source = "busi"
  g.finetune.num_steps = 250
  g.finetune.batch_size = 16
  g.finetune.checkpoint_every = 250
  g.finetune.log_every = 25
  g.finetune.augment.update(default.finetune_augment())
  g.finetune.eval_split = "test"    # a study: scored once on test, at the end, by the validation-chosen model
  return g
