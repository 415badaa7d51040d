"""Checkpoint reliability on tiny states: damaged checkpoints, the transfer's structure check, the divergence guard."""
from __future__ import annotations

import logging
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from usjax import checkpoint, guard, models
from usjax.checkpoint import CheckpointError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_state(value: int) -> dict:
  """A small state whose arrays do not compress (random), so the array data is the largest file of a step."""
  rng = np.random.default_rng(value)
  return {
      "params": {"w": jnp.asarray(rng.normal(size=(64, 64)).astype(np.float32))}, "step": jnp.asarray(value, jnp.int32)
  }


def abstract(state: dict):
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), state)


def save_steps(directory: str, steps, keep: int = 3):
  mngr = checkpoint.manager(directory, keep=keep)
  for s in steps:
    checkpoint.save(mngr, s, tiny_state(s), {"task": "test"})
  mngr.wait_until_finished()
  return mngr


def truncate_largest(step_dir: str) -> str:
  """Cuts the largest file under a step's `state` directory (its array data) to half its length."""
  files = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(step_dir, "state")) for f in fs]
  path = max(files, key=os.path.getsize)
  with open(path, "rb") as f:
    data = f.read()
  with open(path, "wb") as f:
    f.write(data[:len(data) // 2])
  return path


# ---------------------------------------------------------------------------------------------------- resume
def test_resume_falls_back_past_a_truncated_checkpoint(tmp_path, caplog):
  ckdir = str(tmp_path / "checkpoints")
  save_steps(ckdir, [1, 2]).close()
  truncate_largest(os.path.join(ckdir, "2"))
  mngr = checkpoint.manager(ckdir)
  with caplog.at_level(logging.WARNING):
    state, meta = checkpoint.restore_latest(mngr, abstract(tiny_state(0)))
  assert int(state["step"]) == 1 and meta == {"task": "test"}
  np.testing.assert_array_equal(state["params"]["w"], tiny_state(1)["params"]["w"])
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert any("step 2" in w and os.path.join(ckdir, "2") in w and "\n" not in w for w in warnings), warnings
  assert any("resuming from step 1" in w for w in warnings), warnings
  # The damaged step is moved aside, so the resumed run can save step 2 again.
  assert sorted(os.listdir(ckdir)) == ["1", "unreadable-2"] and mngr.all_steps() == [1]
  checkpoint.save(mngr, 2, tiny_state(2), {"task": "test"})
  mngr.wait_until_finished()
  assert mngr.all_steps() == [1, 2]
  mngr.close()


def test_resume_past_a_damaged_checkpoint_prints_no_orbax_tracebacks(tmp_path):
  # orbax abandons the other reads of a failed restore; their errors would reach stderr 60 lines apiece.
  ckdir = str(tmp_path / "checkpoints")
  save_steps(ckdir, [1, 2]).close()
  truncate_largest(os.path.join(ckdir, "2"))
  script = ("import gc, sys, time, jax, numpy as np; from usjax import checkpoint; "
            "d = jax.sharding.SingleDeviceSharding(jax.devices()[0]); "
            "a = {'params': {'w': jax.ShapeDtypeStruct((64, 64), np.float32, sharding=d)}, "
            "'step': jax.ShapeDtypeStruct((), np.int32, sharding=d)}; "
            "state, _ = checkpoint.restore_latest(checkpoint.manager(sys.argv[1]), a); "
            "time.sleep(1); gc.collect(); print(int(state['step']))")
  out = subprocess.run([sys.executable, "-c", script, ckdir], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": ROOT})
  assert out.returncode == 0 and out.stdout.split() == ["1"], out.stderr[-2000:]
  assert "Exception ignored" not in out.stderr and "TensorStore" not in out.stderr, out.stderr[-2000:]


def test_resume_with_no_readable_checkpoint_fails_in_one_line(tmp_path):
  ckdir = str(tmp_path / "checkpoints")
  save_steps(ckdir, [1, 2]).close()
  for s in ("1", "2"):
    truncate_largest(os.path.join(ckdir, s))
  mngr = checkpoint.manager(ckdir)
  with pytest.raises(CheckpointError) as e:
    checkpoint.restore_latest(mngr, abstract(tiny_state(0)))
  assert "\n" not in str(e.value) and ckdir in str(e.value) and "steps 2, 1" in str(e.value)
  assert sorted(os.listdir(ckdir)) == ["1", "2"]  # nothing moved when nothing is readable
  mngr.close()


def test_resume_of_an_empty_directory_is_none(tmp_path):
  mngr = checkpoint.manager(str(tmp_path / "checkpoints"))
  assert checkpoint.restore_latest(mngr, abstract(tiny_state(0))) is None
  mngr.close()


# ---------------------------------------------------------------------------------------------------- transfer
def unet_variables(encoder: str, seed: int) -> dict:
  """Random numpy variables of a U-Net (shapes from eval_shape: nothing is compiled)."""
  shapes = jax.eval_shape(lambda: models.UNet(encoder=encoder).init(jax.random.key(0), jnp.zeros(
      (1, 32, 32, 1)), train=False))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), shapes)


def save_pretraining(tmp_path, encoder: str, meta: bool = True) -> str:
  v = unet_variables(encoder, 0)
  mngr = checkpoint.manager(str(tmp_path / "pre" / "checkpoints"))
  checkpoint.save(mngr, 3, {"params": v["params"], "batch_stats": v["batch_stats"]},
                  {"task": "pretrain", "model": {"encoder": encoder}} if meta else {"task": "pretrain"})
  mngr.wait_until_finished()
  mngr.close()
  return str(tmp_path / "pre")


def test_transfer_between_encoders_of_different_depth_is_refused(tmp_path):
  pre = save_pretraining(tmp_path, "resnet34")
  fresh = unet_variables("resnet18", 1)
  with pytest.raises(CheckpointError) as e:
    checkpoint.load_pretrained(pre, fresh["params"], fresh["batch_stats"], ("encoder",), encoder="resnet18")
  msg = str(e.value)
  assert "\n" not in msg and "resnet34" in msg and "resnet18" in msg and "pre" in msg


def test_transfer_counts_loaded_init_and_ignored_tensors(tmp_path, caplog):
  # Without the encoder (older callers) a ResNet-34 still loads into a ResNet-18, but the count of ignored
  # tensors and a warning show it.
  pre = save_pretraining(tmp_path, "resnet34")
  fresh = unet_variables("resnet18", 1)
  with caplog.at_level(logging.INFO):
    _, _, report = checkpoint.load_pretrained(pre, fresh["params"], fresh["batch_stats"], ("encoder",))
  n18 = len(jax.tree.leaves(fresh["params"]["encoder"])) + len(jax.tree.leaves(fresh["batch_stats"]["encoder"]))
  v34 = unet_variables("resnet34", 0)
  n34 = len(jax.tree.leaves(v34["params"]["encoder"])) + len(jax.tree.leaves(v34["batch_stats"]["encoder"]))
  rest = len(jax.tree.leaves(fresh)) - n18
  assert report["encoder"] == "resnet34" and report["loaded"] == ["encoder"]
  assert (report["loaded_tensors"], report["init_tensors"], report["ignored_tensors"]) == (n18, rest, n34 - n18)
  assert any(r.levelno == logging.WARNING and f"{n34 - n18} tensors" in r.getMessage() for r in caplog.records)

  same = save_pretraining(tmp_path / "same", "resnet18")
  _, _, report = checkpoint.load_pretrained(same, fresh["params"], fresh["batch_stats"], ("encoder",),
                                            encoder="resnet18")
  assert (report["loaded_tensors"], report["init_tensors"], report["ignored_tensors"]) == (n18, rest, 0)


def test_transfer_from_a_checkpoint_without_meta_still_loads(tmp_path):
  pre = save_pretraining(tmp_path, "resnet18", meta=False)
  fresh = unet_variables("resnet18", 1)
  _, _, report = checkpoint.load_pretrained(pre, fresh["params"], fresh["batch_stats"], ("encoder",),
                                            encoder="resnet18")
  assert report["encoder"] is None and report["ignored_tensors"] == 0


def test_transfer_from_a_damaged_checkpoint_fails_in_one_line(tmp_path):
  pre = save_pretraining(tmp_path, "resnet18")
  step_dir = os.path.join(pre, "checkpoints", "3")
  truncate_largest(step_dir)
  fresh = unet_variables("resnet18", 1)
  with pytest.raises(CheckpointError) as e:
    checkpoint.load_pretrained(pre, fresh["params"], fresh["batch_stats"], ("encoder",), encoder="resnet18")
  msg = str(e.value)
  assert "\n" not in msg and "step 3" in msg and os.path.join(pre, "checkpoints") in msg and len(msg) < 400


# ---------------------------------------------------------------------------------------------------- guard
def noisy_decreasing(n: int, seed: int, start: float = 4.0, end: float = 0.3, noise: float = 0.25) -> list[float]:
  """A training curve: exponential decay with multiplicative batch noise and occasional hard batches."""
  rng = np.random.default_rng(seed)
  t = np.arange(n)
  base = end + (start - end) * np.exp(-t / (n / 5))
  loss = base * np.exp(rng.normal(0, noise, n))
  hard = rng.random(n) < 0.02
  loss[hard] *= 3.0  # a hard batch: 3x the loss of its neighbours
  return loss.tolist()


def run_spike(losses, factor=guard.SPIKE_FACTOR, window=guard.SPIKE_WINDOW) -> list[int]:
  fired, history = [], []
  for i, loss in enumerate(losses):
    if guard.spike(loss, history, factor, window):
      fired.append(i)
    else:
      history.append(loss)
  return fired


@pytest.mark.parametrize("seed", range(5))
def test_spike_never_fires_on_normal_training_curves(seed):
  assert run_spike(noisy_decreasing(2000, seed)) == []
  # A loss that approaches zero (BYOL's 2 - 2cos), and one that is negative (SimSiam's -cosine).
  assert run_spike(noisy_decreasing(2000, seed, start=1.0, end=0.02, noise=0.4)) == []
  rng = np.random.default_rng(seed)
  assert run_spike((-0.9 + 0.05 * rng.normal(size=2000)).clip(-1, 1).tolist()) == []
  # Warm-up: the loss first rises a little before it falls.
  rise = [2.0 + 0.5 * min(i, 20) / 20 + 0.1 * rng.normal() for i in range(200)]
  assert run_spike(rise) == []


def test_spike_fires_on_a_jump_and_on_non_finite():
  losses = noisy_decreasing(300, 0)
  history = losses[:200]
  assert guard.spike(losses[200] * 1e6, history)
  assert guard.spike(float("nan"), history) and guard.spike(math.inf, history)
  assert not guard.spike(losses[200], history)
  assert not guard.spike(1e6, history[:5])  # too little history for a verdict
  assert run_spike(losses[:200] + [1e6] + losses[200:]) == [200]


def test_rotation_keeps_the_last_checkpoint_before_the_first_bad_step(tmp_path):
  ckdir = str(tmp_path / "checkpoints")
  mngr = checkpoint.manager(ckdir, keep=2)
  tracker = guard.GoodStepTracker(mngr, start_step=0, window=10)
  losses = noisy_decreasing(60, 1)
  losses[35] = 1e6  # the spike; training goes on after it
  for step, loss in enumerate(losses, start=1):
    tracker.observe(step, loss)
    if step % 10 == 0:
      checkpoint.save(mngr, step, tiny_state(step), {"task": "test"})
      tracker.saved(step)
  mngr.wait_until_finished()
  assert tracker.first_bad == 36 and tracker.good_step == 30
  assert mngr.all_steps() == [30, 50, 60]  # the two newest, and the pinned one
  mngr.close()

  # A resumed run (from step 60, after the spike) keeps honouring the pin: 30 survives further rotation.
  mngr = checkpoint.manager(ckdir, keep=2)
  tracker = guard.GoodStepTracker(mngr, start_step=60, window=10)
  for step in (70, 80):
    checkpoint.save(mngr, step, tiny_state(step), {"task": "test"})
    tracker.saved(step)
  mngr.wait_until_finished()
  assert mngr.all_steps() == [30, 70, 80]
  mngr.close()

  # A run resumed from before the spike (here: step 30) starts afresh: its saves are pinned again.
  mngr = checkpoint.manager(ckdir, keep=2)
  tracker = guard.GoodStepTracker(mngr, start_step=30, window=10)
  assert tracker.first_bad is None
  checkpoint.save(mngr, 90, tiny_state(90), {"task": "test"})
  tracker.saved(90)
  checkpoint.save(mngr, 100, tiny_state(100), {"task": "test"})
  mngr.wait_until_finished()
  assert guard.good_step(mngr) == 90 and mngr.all_steps() == [90, 100]
  mngr.close()


def test_rotation_keeps_the_newest_checkpoint_before_a_bad_step_even_unmarked(tmp_path):
  # No save was marked good (the marked save never completed, or the caller only observes losses).
  mngr = checkpoint.manager(str(tmp_path / "checkpoints"), keep=1)
  tracker = guard.GoodStepTracker(mngr, start_step=0, window=10)
  for step, loss in enumerate(noisy_decreasing(40, 2) + [1e6] + noisy_decreasing(39, 3), start=1):
    tracker.observe(step, loss)
    if step % 10 == 0:
      checkpoint.save(mngr, step, tiny_state(step), {"task": "test"})
  mngr.wait_until_finished()
  assert tracker.first_bad == 41 and mngr.all_steps() == [40, 80]
  mngr.close()
