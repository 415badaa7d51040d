"""Grid planning: the cells each study config asks for, and the ImageNet arm."""
import os

from configs import grid_cpu, grid_gpu
from usjax import grid


def test_grids_plan_the_arms_fractions_and_seeds_their_docstrings_state():
  pre, fine = grid.plan(grid_cpu.get_config())
  assert [f["pretrain"] for f, _, _ in pre] == ["breast", "multiorgan"]
  assert len(fine) == 3 * 2 * 3   # scratch/breast/multi-organ x 100/50% x 3 seeds
  assert all(c.eval_split == "test" and c.data.image_size == 64 for _, _, c in fine)
  assert {c.init_from for f, _, c in fine if f["pretrain"] == "breast"} == {r for f, r, _ in pre
                                                                            if f["pretrain"] == "breast"}
  pre, fine = grid.plan(grid_gpu.get_config())
  assert len(pre) == 3 and len(fine) == 4 * 4 * 3
  assert {f["label_fraction"] for f, _, _ in fine} == {100, 50, 25, 10}


def test_an_imagenet_file_adds_an_encoder_transfer_arm(tmp_path):
  g = grid_cpu.get_config()
  g.imagenet = str(tmp_path / "resnet18.safetensors")
  _, fine = grid.plan(g)
  arm = [(f, c) for f, _, c in fine if f["pretrain"] == "imagenet"]
  assert len(arm) == 2 * 3
  assert all(c.init_from == os.path.abspath(g.imagenet) and c.transfer == "encoder" for _, c in arm)
