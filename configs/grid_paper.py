"""Paper-scale study (GPUs): every pre-training source, four methods, both transfer modes, four label fractions,
two resolutions, three seeds.

    python launch/main.py --config=configs/grid_paper.py:/data --workdir=runs/grid_paper

`/data` holds `busi/`, `pocus/`, `camus/` and `imagenette/` (or any natural-image folder) as downloaded.
Same runner and report as configs/grid_cpu.py; about 6 GPU-days on one H100 at these step counts.
"""
from configs import grid_cpu


def get_config(data_root: str = "/data"):
  g = grid_cpu.get_config(data_root)
  g.name = "paper"
  del g.sources["breast_1200"], g.pretrain_steps["breast_1200"]  # the CPU grid's extra arm
  g.sources.update({
      "lung": "pocus", "heart": "camus", "natural": "natural", "multiorgan": "busi,pocus,camus",
      "multiorgan_natural": "busi,pocus,camus,natural"
  })
  g.pretrain.data.camus_dir = g.finetune.data.camus_dir = f"{data_root}/camus"
  g.pretrain.data.natural_dir = g.finetune.data.natural_dir = f"{data_root}/imagenette"
  g.methods = ("simclr", "moco", "simsiam", "byol")
  g.transfers = ("encoder", "encoder+decoder")
  g.label_fractions = (100, 50, 25, 10)
  g.image_sizes = (128, 256)
  g.seeds = (0, 1, 2)
  g.pretrain.num_steps = 20000
  g.pretrain.batch_size = 512
  g.pretrain.optim.name = "lars"
  g.pretrain.optim.learning_rate = 0.3 * 512 / 256
  g.pretrain.optim.warmup_steps = 1000
  g.pretrain.checkpoint_every = 1000
  g.finetune.num_steps = 4000
  g.finetune.batch_size = 32
  g.finetune.checkpoint_every = 1000
  return g
