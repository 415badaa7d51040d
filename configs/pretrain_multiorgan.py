"""SimCLR pre-training of a ResNet-18 U-Net encoder on multi-organ ultrasound (breast + lung + heart).

    python launch/main.py --config=configs/pretrain_multiorgan.py --workdir=runs/pretrain

With no data folders given it uses the embedded synthetic ultrasound (600 images per organ, 64 px): on 2 CPU
cores it finishes in about 3 minutes (data generation and compilation included), the NT-Xent loss falling from
about 4.1 (log(2*32-1): chance) to about 3.3, ~30 images/second. Real data: set
`--config.data.pretrain_sources=busi,pocus,camus --config.data.busi_dir=... --config.data.pocus_dir=...`.
"""
from configs import default


def get_config():
  c = default.get_config()
  c.task = "pretrain"
  c.method = "simclr"
  c.data.pretrain_sources = "synthetic_breast,synthetic_lung,synthetic_heart"
  c.num_steps = 150
  c.batch_size = 32
  return c
