"""Scale and robustness: the same step on 1 device, 8 devices and 2 processes; exact resume; the NaN guard."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import pretrain_multiorgan
from usjax import checkpoint, task, train

pytestmark = pytest.mark.slow  # starts multi-device and multi-process subprocesses

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
STEP = os.path.join(HERE, "step_check.py")


def run_step(out, env=None, n_proc=1):
  procs = []
  for i in range(n_proc):
    e = {**os.environ, "PYTHONPATH": ROOT, **(env or {})}  # `configs` and `usjax`, as the other subprocesses get them
    if n_proc > 1:
      e.update(JAX_COORDINATOR_ADDRESS="localhost:12357", JAX_NUM_PROCESSES=str(n_proc), JAX_PROCESS_ID=str(i))
    procs.append(
        subprocess.Popen([sys.executable, STEP, str(out)], env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True))
  for p in procs:
    log = p.communicate(timeout=900)[0]
    assert p.returncode == 0, log[-3000:]
  return dict(np.load(out))


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
  return run_step(tmp_path_factory.mktemp("one") / "one.npz")


def assert_same_step(a, b):
  for task in ("pretrain", "finetune"):
    np.testing.assert_allclose(a[f"{task}/loss"], b[f"{task}/loss"], rtol=1e-5)
  keys = [k for k in a if k != "devices"]
  assert sorted(keys) == sorted(k for k in b if k != "devices")
  for k in keys:
    np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-5, err_msg=k)


def test_eight_devices_match_one(one_device, tmp_path):
  eight = run_step(tmp_path / "eight.npz", {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
  assert int(one_device["devices"]) == 1 and int(eight["devices"]) == 8
  assert_same_step(one_device, eight)


def test_two_processes_match_one(one_device, tmp_path):
  two = run_step(tmp_path / "two.npz", n_proc=2)
  assert int(two["devices"]) == 2
  assert_same_step(one_device, two)


def tiny(tmp, steps):
  cfg = pretrain_multiorgan.get_config()
  cfg.data.data_dir = str(tmp / "data")
  cfg.data.image_size = cfg.data.synthetic_size = 32
  cfg.data.synthetic_num_images = 30
  cfg.batch_size, cfg.num_steps, cfg.log_every, cfg.checkpoint_every = 4, steps, 1, 2
  cfg.model.proj_dims = (32, 16)
  return cfg


class Preempted(Exception):
  pass


def final_params(workdir):
  mngr = checkpoint.manager(os.path.join(workdir, "checkpoints"))
  import orbax.checkpoint as ocp
  step = mngr.latest_step()
  out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
  return step, out["params"]


def test_interrupted_run_resumes_bitwise(tmp_path, monkeypatch):
  task.run(tiny(tmp_path, 6), str(tmp_path / "unbroken"))

  save = checkpoint.save

  def save_then_preempt(mngr, step, *a, **k):
    save(mngr, step, *a, **k)
    if step == 2:
      mngr.wait_until_finished()
      raise Preempted()

  monkeypatch.setattr(checkpoint, "save", save_then_preempt)
  with pytest.raises(Preempted):
    task.run(tiny(tmp_path, 6), str(tmp_path / "broken"))
  monkeypatch.setattr(checkpoint, "save", save)
  # a save killed half-way leaves only orbax's temporary directory: it must be ignored
  os.makedirs(tmp_path / "broken" / "checkpoints" / "4.orbax-checkpoint-tmp-1" / "state")
  summary = task.run(tiny(tmp_path, 6), str(tmp_path / "broken"))
  assert summary["steps"] == 6
  (s1, p1), (s2, p2) = final_params(tmp_path / "unbroken"), final_params(tmp_path / "broken")
  assert s1 == s2 == 6
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
    np.testing.assert_array_equal(a, b)


def test_non_finite_step_keeps_state_and_run_stops_before_saving(tmp_path):
  def nan_loss(params, batch_stats, extra, batch, key, step):
    loss = jnp.sum(params["w"] * batch) * jnp.nan
    return loss, (batch_stats, extra, {})

  import optax
  tx = optax.sgd(0.1)
  state = {
      "params": {"w": jnp.ones(3)}, "batch_stats": {}, "opt_state": tx.init({"w": jnp.ones(3)}), "step": jnp.zeros(
          (), jnp.int32), "rng": jax.random.key_data(jax.random.key(0))
  }
  new, metrics = train.train_step(state, jnp.ones(3), loss_fn=nan_loss, tx=tx)
  assert not bool(metrics["finite"])
  np.testing.assert_array_equal(new["params"]["w"], state["params"]["w"])

  cfg = tiny(tmp_path, 6)
  cfg.optim.learning_rate = 1e30  # diverges within a few steps
  cfg.checkpoint_every = 1
  with pytest.raises(train.DivergedError, match="non-finite"):
    task.run(cfg, str(tmp_path / "div"))
  step, params = final_params(tmp_path / "div")
  assert all(np.all(np.isfinite(p)) for p in jax.tree.leaves(params))
  assert step < 6
