"""A few-step pre-train -> save -> fine-tune-from-it -> evaluate run on tiny synthetic shapes, and bad input."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import finetune_busi, pretrain_multiorgan
from usjax import UsjaxError, checkpoint, task, train
from usjax.checkpoint import CheckpointError

pytestmark = pytest.mark.slow  # pre-trains and fine-tunes small networks end to end

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny(cfg, data_dir):
  cfg.data.data_dir = str(data_dir)
  cfg.data.image_size = cfg.data.synthetic_size = 32
  cfg.data.synthetic_num_images = 40
  cfg.batch_size, cfg.num_steps, cfg.log_every, cfg.checkpoint_every = 8, 4, 2, 2
  cfg.model.proj_dims = (64, 32)
  return cfg


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  root = tmp_path_factory.mktemp("e2e")
  cfg = tiny(pretrain_multiorgan.get_config(), root / "data")
  summary = task.run(cfg, str(root / "pre"))
  return root, summary


def test_pretrain_writes_checkpoint_summary_and_events(pretrained):
  root, summary = pretrained
  with open(root / "pre" / "summary.json") as f:
    saved = json.load(f)
  assert saved.keys() == summary.keys()
  scalars = {k for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
  assert {k: saved[k] for k in scalars} == pytest.approx({k: summary[k] for k in scalars})
  assert saved["probe_history"] == [] and saved["collapsed"] is False  # no probe set on synthetic data
  assert summary["steps"] == 4 and np.isfinite(summary["final_loss"])
  assert summary["images_per_sec"] > 0
  assert sorted(n for n in os.listdir(root / "pre" / "checkpoints") if n.isdigit()) == ["2", "4"]
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(root / "pre" / "tb"))


def test_finetune_from_pretrained_restores_encoder_and_scores(pretrained):
  root, _ = pretrained
  cfg = tiny(finetune_busi.get_config(), root / "data")
  cfg.init_from = str(root / "pre")
  summary = task.run(cfg, str(root / "fine"))
  assert summary["transfer"]["loaded"] == ["encoder"]
  assert summary["transfer"]["init"] == ["decoder", "seg_head"]
  assert summary["eval_split"] == "val" and summary["num_images"] == 4  # 10% of 40 synthetic breast images
  # The scores, recomputed from the masks the run wrote (examples.npz keeps every image of so small a split) by
  # the textbook formulas: Dice 2|P&T| / (|P| + |T|), IoU |P&T| / |P|T|, both 1 where both masks are empty.
  with np.load(root / "fine" / "examples.npz") as ex:
    pred, true = ex["pred"].astype(bool), ex["mask"].astype(bool)
  assert len(pred) == 4
  inter = (pred & true).sum((1, 2, 3))
  size, union = pred.sum((1, 2, 3)) + true.sum((1, 2, 3)), (pred | true).sum((1, 2, 3))
  dice = np.where(union == 0, 1.0, 2 * inter / np.maximum(size, 1))
  iou = np.where(union == 0, 1.0, inter / np.maximum(union, 1))
  assert summary["dice"] == pytest.approx(dice.mean(), abs=1e-6)
  assert summary["iou"] == pytest.approx(iou.mean(), abs=1e-6)
  rows = json.loads((root / "fine" / "per_image.json").read_text())
  assert [r["dice"] for r in rows] == pytest.approx(list(dice), abs=1e-6)

  # The encoder loaded into a fresh U-Net equals the one saved by pre-training.
  saved = ocp.CheckpointManager(str(root / "pre" / "checkpoints"),
                                item_handlers={"state": ocp.PyTreeCheckpointHandler()})
  state = saved.restore(4, args=ocp.args.Composite(state=ocp.args.PyTreeRestore()))["state"]
  model = train.build_model(cfg)
  v = jax.jit(lambda: model.init(jax.random.key(3), np.zeros((1, 32, 32, 1), np.float32), train=False))()
  params, stats, _ = checkpoint.load_pretrained(str(root / "pre"), v["params"], v["batch_stats"], ("encoder",))
  for a, b in [(params["encoder"], state["params"]["encoder"]), (stats["encoder"], state["batch_stats"]["encoder"])]:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  assert not np.array_equal(params["decoder"]["up0"]["Conv_0"]["kernel"], 0)


def test_missing_init_checkpoint_is_one_line_and_leaves_no_workdir(pretrained, tmp_path):
  root, _ = pretrained
  cfg = tiny(finetune_busi.get_config(), root / "data")
  cfg.init_from = str(tmp_path / "nowhere")
  with pytest.raises(CheckpointError, match="nowhere"):
    task.run(cfg, str(tmp_path / "fine"))
  assert not (tmp_path / "fine").exists()


def test_init_checkpoint_of_wrong_structure_is_rejected(pretrained, tmp_path):
  root, _ = pretrained
  other = ocp.CheckpointManager(str(tmp_path / "other" / "checkpoints"))
  other.save(1, args=ocp.args.Composite(state=ocp.args.StandardSave({"params": {"x": np.zeros(3)}})))
  other.wait_until_finished()
  cfg = tiny(finetune_busi.get_config(), root / "data")
  cfg.init_from = str(tmp_path / "other")
  with pytest.raises(CheckpointError, match="other.*has no parameter"):
    task.run(cfg, str(tmp_path / "fine"))
  assert not (tmp_path / "fine").exists()


def test_unwritable_workdir_is_rejected(tmp_path):
  (tmp_path / "file").write_text("")
  cfg = pretrain_multiorgan.get_config()
  with pytest.raises(UsjaxError, match="workdir"):
    task.run(cfg, str(tmp_path / "file" / "run"))


def test_unknown_config_key_fails_in_one_line(tmp_path):
  out = subprocess.run([
      sys.executable, "launch/main.py", "--config=configs/pretrain_multiorgan.py", f"--workdir={tmp_path / 'w'}",
      "--config.num_stepz=3"
  ], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert out.returncode != 0
  assert "num_stepz" in out.stderr
  assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("method", ["moco", "simsiam", "byol"])
def test_each_method_pretrains_and_transfers_encoder_and_decoder(pretrained, tmp_path, method):
  root, _ = pretrained
  cfg = tiny(pretrain_multiorgan.get_config(), root / "data")
  cfg.method, cfg.model.with_decoder = method, True
  cfg.moco.queue_size = 32
  cfg.simsiam.pred_dims = cfg.byol.pred_dims = (64, 32)
  summary = task.run(cfg, str(tmp_path / "pre"))
  assert summary["method"] == method and np.isfinite(summary["final_loss"])
  ft = tiny(finetune_busi.get_config(), root / "data")
  ft.num_steps, ft.init_from, ft.transfer = 2, str(tmp_path / "pre"), "encoder+decoder"
  out = task.run(ft, str(tmp_path / "fine"))
  assert out["transfer"]["loaded"] == ["decoder", "encoder"] and out["transfer"]["init"] == ["seg_head"]


def test_decoder_transfer_from_encoder_only_pretraining_is_rejected(pretrained, tmp_path):
  root, _ = pretrained
  ft = tiny(finetune_busi.get_config(), root / "data")
  ft.init_from, ft.transfer = str(root / "pre"), "encoder+decoder"
  with pytest.raises(CheckpointError, match="with_decoder=True"):
    task.run(ft, str(tmp_path / "fine"))
