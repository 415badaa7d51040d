"""The fine-tuning recipe on real BUSI: ResNet-18 U-Net, 128 px, the model chosen on validation.

    python launch/main.py --config=configs/finetune_busi_real.py:../shared/data --workdir=runs/busi_scratch \
        --config.eval_split=test          # the study's one read of the test split, at the end

The argument after ':' is the folder holding `busi/` as downloaded (Dataset_BUSI_with_GT inside). Add
`--config.init_from=runs/pretrain` to start from a pre-training, `--config.data.label_fraction=50` for half the
labels, `--config.data.image_size=256` for 256 px. Result (README: Fine-tuning on real BUSI): the measured
validation and test Dice, both over all images and over lesion images only, with commit, machine and wall time.

Choices, and why:
- Length in steps, not epochs: every label fraction gets the same 2000 optimiser steps of 16 images and the same
  schedule, so the arms differ only in their labels (10% of the labels is then about 730 passes over its 44
  images). Over-fitting a small subset is contained by choosing the model on validation, not by training less.
  2000 steps are 73 passes over BUSI's 436 training images, about 40 minutes on 2 CPU cores at 128 px.
- AdamW 1e-3 (weight decay 1e-4 on kernels), 100 warm-up steps, cosine decay to 0; Dice + BCE.
- Segmentation augmentation at real sizes (configs/default.py `finetune_augment`): crop of 50-100% of the area
  (scale and translation), left-right flip, rotation up to 15 degrees, brightness, contrast, gamma, speckle,
  depth gain, light blur; no vertical flips (rows are depth).
- Selection: the validation split (63 images) is scored every 100 steps with the raw weights and their EMA
  (decay 0.995); the best by validation Dice is kept, and left-right flip averaging is used only if it raises
  that model's validation Dice. The test split is read once, after training.
"""
from configs import default


def get_config(data_root: str = "../shared/data"):
  c = default.get_config()
  c.task = "finetune"
  c.data.finetune_source = "busi"
  c.data.busi_dir = f"{data_root}/busi"
  c.data.image_size = 128
  c.data.num_workers = 0
  c.batch_size = 16
  c.num_steps = 2000
  c.log_every = 50
  c.checkpoint_every = 500
  c.val_every = 100
  c.ema_decay = 0.995
  c.tta = "auto"
  c.optim.name = "adamw"
  c.optim.learning_rate = 1e-3
  c.optim.weight_decay = 1e-4
  c.optim.warmup_steps = 100
  c.augment.update(default.finetune_augment())
  return c
