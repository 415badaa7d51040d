"""Divergence that stays finite, and preemption: SIGTERM saves at a step boundary and the resumed run ends where
an unbroken one does, bitwise."""
import json
import os
import signal
import subprocess
import sys
import time

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from usjax import task, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cfg(tmp_path, num_steps=30):
  c = ml_collections.ConfigDict({
      "num_steps": num_steps, "log_every": 1, "checkpoint_every": 5, "keep_checkpoints": 2, "batch_size": 1,
      "guard": {"loss_spike_factor": 10.0, "window": 5}
  })
  return c


def test_finite_divergence_stops_before_saving_and_keeps_the_last_good_checkpoint(tmp_path):
  # Loss 1.0 for 12 steps, then 1e3 from step 13 on: finite, so only the spike guard can catch it.
  def step_fn(state, batch):
    s = state["step"] + 1
    loss = jnp.where(s >= 13, 1e3, 1.0).astype(jnp.float32)
    return {"w": state["w"] + 1.0, "step": s}, {"loss": loss, "finite": jnp.bool_(True), "grad_norm": loss}

  state = {"w": jnp.zeros(3), "step": jnp.zeros((), jnp.int32)}
  it = iter(grain.MapDataset.range(1000).to_iter_dataset())
  mesh = train.make_mesh()
  with pytest.raises(train.DivergedError, match=r"loss spike.*by step 13.*checkpoint \(step 10\)"):
    train.fit(_cfg(tmp_path), str(tmp_path), "pretrain", state, step_fn, it, lambda b: b, mesh, {})
  assert sorted(int(n) for n in os.listdir(tmp_path / "checkpoints") if n.isdigit()) == [5, 10]
  with open(tmp_path / "summary.json") as f:
    summary = json.load(f)
  assert summary["status"] == "diverged" and summary["last_good_checkpoint"] == 10


def _main(workdir, data_dir, steps):
  return [
      sys.executable, "launch/main.py", "--config=configs/pretrain_multiorgan.py", f"--workdir={workdir}",
      f"--config.data.data_dir={data_dir}", "--config.data.image_size=32", "--config.data.synthetic_size=32",
      "--config.data.synthetic_num_images=40", "--config.batch_size=8", "--config.model.proj_dims=(64,32)",
      f"--config.num_steps={steps}", "--config.log_every=1", "--config.checkpoint_every=1000"
  ]


def _final_state(workdir, step):
  mngr = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"),
                               item_handlers={"state": ocp.PyTreeCheckpointHandler()})
  out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore()))["state"]
  mngr.close()
  return out


@pytest.mark.slow
def test_sigterm_saves_at_a_step_boundary_and_the_resumed_run_equals_an_unbroken_one(tmp_path):
  data, steps = tmp_path / "data", 40
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  whole = subprocess.run(_main(tmp_path / "whole", data, steps), cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
  assert whole.returncode == 0, whole.stderr[-2000:]

  log = open(tmp_path / "broken.log", "w+")
  child = subprocess.Popen(_main(tmp_path / "broken", data, steps), cwd=ROOT, env=env, stdout=log,
                           stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 600
  while "step 5/" not in open(tmp_path / "broken.log").read():
    assert child.poll() is None and time.time() < deadline, open(tmp_path / "broken.log").read()[-2000:]
    time.sleep(0.2)
  child.send_signal(signal.SIGTERM)
  assert child.wait(timeout=300) == 143
  text = open(tmp_path / "broken.log").read()
  assert "stopped: stopped by SIGTERM at step" in text and "Traceback" not in text
  saved = [int(n) for n in os.listdir(tmp_path / "broken" / "checkpoints") if n.isdigit()]
  assert len(saved) == 1 and 5 <= saved[0] < steps

  resumed = subprocess.run(_main(tmp_path / "broken", data, steps), cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=600)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert "resuming from" in resumed.stderr
  a, b = _final_state(tmp_path / "whole", steps), _final_state(tmp_path / "broken", steps)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  with open(tmp_path / "broken" / "history.json") as f:
    history = json.load(f)
  assert [r["step"] for r in history] == list(range(1, steps + 1))  # spans the run across the resume


@pytest.mark.parametrize("key,value,match", [
    ("data.label_fraction", 30, "config.data.label_fraction must be one of 100, 50, 25, 10, got 30"),
    ("data.finetune_source", "bussi", "unknown source 'bussi'"),
    ("data.finetune_source", "busi", "config.data.busi_dir must name the folder"),
    ("tta", "vflip", "config.tta must be one of"),
    ("presence.gate", "best", "config.presence.gate must be one of 'lesion_budget', 'best_dice', got 'best'"),
    ("presence.gate_on", "max", "config.presence.gate_on must be one of 'auto', 'head', 'peak', got 'max'"),
    ("presence.lesion_budget", -0.1, r"config.presence.lesion_budget must be in \[0, 1\], got -0.1"),
])
def test_bad_config_values_fail_before_any_data_is_prepared(tmp_path, key, value, match):
  from configs import finetune_busi
  from usjax import UsjaxError
  cfg = finetune_busi.get_config()
  cfg.data.data_dir = str(tmp_path / "data")
  section, _, name = key.rpartition(".")
  setattr(cfg[section] if section else cfg, name, value)
  with pytest.raises(UsjaxError, match=match):
    task.run(cfg, str(tmp_path / "run"))
  assert not (tmp_path / "data").exists() and not (tmp_path / "run").exists()
