"""Fine-tune a ResNet-18 U-Net to segment breast lesions, from a pre-training checkpoint or from scratch.

    python launch/main.py --config=configs/finetune_busi.py --workdir=runs/finetune \
        --config.init_from=runs/pretrain            # omit for the supervised baseline

Defaults use the synthetic breast set (64 px); about 2 minutes on 2 CPU cores, test Dice about 0.7.
Real BUSI: `--config.data.finetune_source=busi --config.data.busi_dir=/path/to/Dataset_BUSI_with_GT
--config.data.image_size=128`. Fewer labels: `--config.data.label_fraction=50` (nested subsets 50/25/10).
"""
from configs import default


def get_config():
  c = default.get_config()
  c.task = "finetune"
  c.data.finetune_source = "synthetic_breast"
  c.num_steps = 150
  c.batch_size = 16
  c.optim.learning_rate = 1e-3
  c.augment.update(default.finetune_augment())
  c.init_from = ""
  c.transfer = "encoder"
  return c
