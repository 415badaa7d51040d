"""Faults a cluster user meets, each handled in one line with nothing half-written left: divergence in the first
steps, a full disk, a resume with another config, an unwritable data folder, result file modes, a damaged
checkpoint given to predict, Ctrl-C with data workers."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from usjax import UsjaxError, checkpoint, guard, models, predict, report, task, train
from usjax.checkpoint import CheckpointError
from usjax.data import DataError, synthetic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}


def checkpoint_steps(ckdir) -> list[int]:
  return sorted(int(n) for n in os.listdir(ckdir) if n.isdigit())


def temporary_folders(root) -> list[str]:
  return [os.path.join(d, n) for d, dirs, _ in os.walk(root) for n in dirs if ".orbax-checkpoint-tmp" in n]


def pin_of(ckdir) -> dict:
  with open(os.path.join(ckdir, guard.GOOD_STEP_FILE)) as f:
    return json.load(f)


# ---------------------------------------------------------------------------------------------------- fit, faked
def fake_cfg(num_steps=10, **over):
  return ml_collections.ConfigDict({
      "num_steps": num_steps, "log_every": 1, "checkpoint_every": 1, "keep_checkpoints": 1, "batch_size": 1,
      "resume_anyway": False, "guard": {"loss_spike_factor": 10.0, "window": 50, "max_update_ratio": 10.0}, **over
  })


def fake_fit(cfg, workdir, losses=None, ratios=None, meta=None):
  """`train.fit` over a step that reports the given losses and update ratios (1-based steps; default 2.7, 0.01)."""
  losses, ratios = losses or {}, ratios or {}

  def step_fn(state, batch):
    s = int(state["step"]) + 1
    metrics = {
        "loss": jnp.float32(losses.get(s, 2.7)), "grad_norm": jnp.float32(1.0),
        "update_ratio": jnp.float32(ratios.get(s, 0.01)), "finite": jnp.bool_(True)
    }
    return {"w": state["w"] + 1.0, "step": jnp.int32(s)}, metrics

  state = {"w": jnp.zeros(3), "step": jnp.zeros((), jnp.int32)}
  it = iter(grain.MapDataset.range(1000).to_iter_dataset())
  return train.fit(cfg, str(workdir), "pretrain", state, step_fn, it, lambda b: b, train.make_mesh(), meta or {})


# ---------------------------------------------------------------------------------------------------- 1. divergence
def test_a_blow_up_in_the_first_steps_is_caught_by_the_loss():
  # Fine-tuning at learning rate 1e6: 1.5 -> 7.6e10 at step 3, long before `spike` has a window of losses.
  tracker = guard.GoodStepTracker(_FakeManager(), start_step=0)
  assert tracker.observe(1, 1.5) is None and tracker.observe(2, 1.4) is None
  why = tracker.observe(3, 7.6e10)
  assert why and "first losses" in why and tracker.first_bad == 3
  # Normal starts stay quiet: a warm-up rise, and a loss that starts near zero (SimSiam's -cosine).
  assert not guard.above_start(3.0, [2.6, 2.7, 2.9])
  assert not guard.above_start(0.5, [-0.02, -0.01, 0.0])


def test_a_parameter_blow_up_stops_the_run_and_keeps_the_checkpoint_before_it(tmp_path):
  # Pre-training at learning rate 1e6: the update of step 4 throws the weights away, and the loss then sits at
  # chance (2.7), where it started, so only the update ratio shows it.
  with pytest.raises(train.DivergedError, match=r"parameter blow-up.*by step 4.*checkpoint \(step 3\)"):
    fake_fit(fake_cfg(), tmp_path, ratios={4: 2e6})
  ckdir = tmp_path / "checkpoints"
  assert checkpoint_steps(ckdir) == [3]
  assert pin_of(ckdir) == {"step": 3, "bad_step": 4}
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary["status"] == "diverged" and summary["last_good_checkpoint"] == 3


@pytest.mark.slow
def test_pretraining_at_learning_rate_1e6_stops_as_diverged(tmp_path, shared_data):
  out = run_main(tmp_path / "run", shared_data, "--config.optim.learning_rate=1e6", "--config.checkpoint_every=1",
                 "--config.keep_checkpoints=2")
  assert out.returncode == 1
  assert_one_error_line(out.stderr, "parameter blow-up", "by step 2", "(step 1)")
  ckdir = tmp_path / "run" / "checkpoints"
  assert checkpoint_steps(ckdir) == [1] and pin_of(ckdir) == {"step": 1, "bad_step": 2}
  summary = json.loads((tmp_path / "run" / "summary.json").read_text())
  assert summary["status"] == "diverged" and summary["last_good_checkpoint"] == 1


class _FakeManager:
  """What GoodStepTracker asks of a checkpoint manager, for trackers that only observe losses."""
  directory = "nowhere"

  def __init__(self):
    guard.attach(self, guard.Pinned())

  def all_steps(self):
    return []


# ---------------------------------------------------------------------------------------------------- 2. full disk
def tiny_state():
  return {"w": jnp.asarray(np.random.default_rng(0).normal(size=(64, 64)).astype(np.float32))}


def test_a_save_to_a_disk_without_room_fails_in_one_line_before_writing(tmp_path, monkeypatch):
  from usjax import storage
  ckdir = str(tmp_path / "checkpoints")
  mngr = checkpoint.manager(ckdir)
  monkeypatch.setattr(storage, "free_bytes", lambda path: 1000)
  with pytest.raises(CheckpointError) as e:
    checkpoint.save(mngr, 1, tiny_state(), {"task": "test"})
  msg = str(e.value)
  assert "\n" not in msg and "no space left" in msg and ckdir in msg
  assert "needs about 16.4 kB, 1.0 kB free" in msg  # the state's 64 x 64 float32
  assert checkpoint_steps(ckdir) == [] and temporary_folders(ckdir) == []
  mngr.close()


def test_a_save_that_fills_the_disk_leaves_no_temporary_folder_and_no_pin_on_it(tmp_path, monkeypatch):
  # The write of step 2 runs out of space in orbax's background thread (ENOSPC as TensorStore words it), after
  # the loop has pinned the step; the failure surfaces when the save is waited for.
  import orbax.checkpoint as ocp
  ckdir = str(tmp_path / "checkpoints")
  mngr = checkpoint.manager(ckdir)
  checkpoint.save(mngr, 1, tiny_state(), {"task": "test"})
  guard.mark_good(mngr, 1)
  checkpoint.finish(mngr)
  writing = []

  def start_save(self, step, args=None, force=False):
    os.makedirs(os.path.join(ckdir, f"{step}.orbax-checkpoint-tmp", "state"))
    writing.append(step)

  def wait(self):
    if writing:
      raise ValueError(f'RESOURCE_EXHAUSTED: Error writing "w/0" in OCDBT database at local file "{ckdir}/'
                       f'{writing.pop()}.orbax-checkpoint-tmp/state/": Failed to write 16384 bytes to file 11: No '
                       f"space left on device [os_error_code='28']")

  monkeypatch.setattr(ocp.CheckpointManager, "save", start_save)
  monkeypatch.setattr(ocp.CheckpointManager, "wait_until_finished", wait)
  checkpoint.save(mngr, 2, tiny_state(), {"task": "test"})
  guard.mark_good(mngr, 2)  # as the loop does, while the write is in flight
  with pytest.raises(CheckpointError) as e:
    checkpoint.finish(mngr)
  msg = str(e.value)
  assert "\n" not in msg and "no space left on device for checkpoint step 2" in msg and ckdir in msg
  assert "needs about 16.4 kB" in msg
  assert temporary_folders(ckdir) == [] and checkpoint_steps(ckdir) == [1]
  assert pin_of(ckdir)["step"] == 1  # no record names the missing step


def _can_mount_tmpfs() -> bool:
  if shutil.which("unshare") is None:
    return False
  return subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"],
                        capture_output=True).returncode == 0


@pytest.mark.slow
@pytest.mark.parametrize("check", ["before", "during"])
def test_training_on_a_full_disk_stops_in_one_line(tmp_path, shared_data, check):
  # The workdir on an 80 MB file system: the first checkpoint (about 57 MB) fits, the second does not. "before":
  # the free-space check refuses it; "during": the check is made to pass, so the write itself hits ENOSPC.
  if not _can_mount_tmpfs():
    pytest.skip("cannot mount a small tmpfs here (unshare -rm)")
  mnt = tmp_path / "mnt"
  mnt.mkdir()
  driver = tmp_path / "driver.py"
  driver.write_text("import runpy, sys\n"
                    "from usjax import storage\n"
                    "if sys.argv.pop(1) == 'during':\n"
                    "  storage.free_bytes = lambda path: None  # unknown: the check passes\n"
                    f"sys.argv[0] = {os.path.join(ROOT, 'launch', 'main.py')!r}\n"
                    "runpy.run_path(sys.argv[0], run_name='__main__')\n")
  workdir = mnt / "run"
  ckdir = workdir / "checkpoints"
  args = main_args(workdir, shared_data, "--config.checkpoint_every=5", "--config.keep_checkpoints=1",
                   "--config.num_steps=12")
  after = tmp_path / "after"  # what the run left, copied off the mount before it goes
  script = (f"mount -t tmpfs -o size=80m tmpfs {mnt} && cd {ROOT} && {sys.executable} {driver} {check} "
            f"{' '.join(repr(a) for a in args[2:])}; rc=$?; mkdir {after}; ls -a {ckdir} > {after}/listing; "
            f"find {workdir} -name '*orbax-checkpoint-tmp*' > {after}/temporary; "
            f"cp {ckdir / guard.GOOD_STEP_FILE} {after}/; exit $rc")
  out = subprocess.run(["unshare", "-rm", "sh", "-c", script], env=ENV, capture_output=True, text=True, timeout=600)
  assert out.returncode == 1, out.stderr[-3000:]
  assert_one_error_line(out.stderr, f"no space left on device for checkpoint step 10 in {ckdir}", "needs about")
  assert (after / "temporary").read_text() == ""
  assert sorted((after / "listing").read_text().split()) == [".", "..", "5", guard.GOOD_STEP_FILE]
  assert pin_of(after)["step"] == 5


# ---------------------------------------------------------------------------------------------------- 3. resume
def test_resume_conflicts_name_both_values():
  saved = {
      "batch_size": 8, "data": {"image_size": 32, "channels": 1},
      "model": {"encoder": "resnet18", "proj_dims": [64, 32]}
  }
  now = {
      "batch_size": 16, "data": {"image_size": 32, "channels": 1},
      "model": {"encoder": "resnet18", "proj_dims": (64, 32)}
  }
  assert checkpoint.resume_conflicts(saved, now) == [("batch_size", 8, 16)]
  now["data"]["image_size"], now["model"]["dtype"] = 48, "bfloat16"  # dtype changes no shape
  assert checkpoint.resume_conflicts(saved, now) == [("batch_size", 8, 16), ("data.image_size", 32, 48)]
  assert checkpoint.resume_conflicts({"task": "pretrain"}, now) == []  # older checkpoints record less


def test_resume_with_another_batch_or_image_size_stops_in_one_line(tmp_path):
  fake_fit(fake_cfg(num_steps=3), tmp_path, meta={"data": {"image_size": 32}})
  with pytest.raises(CheckpointError) as e:
    fake_fit(fake_cfg(num_steps=6, batch_size=2), tmp_path, meta={"data": {"image_size": 48}})
  msg = str(e.value)
  assert "\n" not in msg and "batch_size=1 (this config: 2)" in msg and "data.image_size=32 (this config: 48)" in msg
  assert "resume_anyway" in msg and checkpoint_steps(tmp_path / "checkpoints") == [3]
  _, _, summary = fake_fit(fake_cfg(num_steps=6, batch_size=2, resume_anyway=True), tmp_path,
                           meta={"data": {"image_size": 48}})
  assert summary["resumed_at"] == 3 and summary["steps"] == 6


# ---------------------------------------------------------------------------------------------------- 4. data_dir
def test_a_missing_or_read_only_home_fails_in_one_line_and_leaves_no_workdir(tmp_path, monkeypatch):
  from configs import pretrain_multiorgan
  (tmp_path / "home").write_text("a file where HOME should be a folder")
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  cfg = pretrain_multiorgan.get_config()  # data.data_dir is ~/tensorflow_datasets
  with pytest.raises(UsjaxError) as e:
    task.run(cfg, str(tmp_path / "run"))
  msg = str(e.value)
  assert "\n" not in msg and "config.data.data_dir" in msg and str(tmp_path / "home") in msg
  assert not (tmp_path / "run").exists()


def test_a_data_dir_that_cannot_be_written_fails_in_one_line(tmp_path):
  (tmp_path / "data").write_text("not a folder")
  with pytest.raises(DataError) as e:
    synthetic.prepare("lung", str(tmp_path / "data"), image_size=32, num_images=10)
  assert "\n" not in str(e.value) and "config.data.data_dir" in str(e.value) and str(tmp_path / "data") in str(e.value)


# ---------------------------------------------------------------------------------------------------- 5. modes
@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o027, 0o640)])
def test_result_files_follow_the_umask(tmp_path, umask, mode):
  old = os.umask(umask)
  try:
    report.write_json(str(tmp_path / "summary.json"), {"dice": 0.5})
  finally:
    os.umask(old)
  assert stat.S_IMODE(os.stat(tmp_path / "summary.json").st_mode) == mode
  assert json.loads((tmp_path / "summary.json").read_text()) == {"dice": 0.5}
  assert os.listdir(tmp_path) == ["summary.json"]  # no temporary file left


# ---------------------------------------------------------------------------------------------------- 6. predict
def damaged_finetune(workdir) -> str:
  """A fine-tuning workdir whose best/ checkpoint (a plain-encoder U-Net, 32 px) has its array data cut in half."""
  from configs import default
  cfg = default.get_config()
  cfg.model.encoder = "plain"
  shapes = jax.eval_shape(lambda: models.unet_from_config(cfg.model).init(jax.random.key(0), jnp.zeros(
      (1, 32, 32, 1)), train=False))
  rng = np.random.default_rng(0)
  v = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), shapes)
  mngr = checkpoint.manager(os.path.join(workdir, "best"), keep=1)
  meta = {"task": "finetune", "model": cfg.model.to_dict(), "data": {"image_size": 32, "channels": 1, "aspect": "pad"}}
  checkpoint.save(mngr, 10, {"params": v["params"], "batch_stats": v["batch_stats"]}, meta)
  mngr.wait_until_finished()
  mngr.close()
  step_dir = os.path.join(workdir, "best", "10")
  files = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(step_dir, "state")) for f in fs]
  path = max(files, key=os.path.getsize)
  with open(path, "rb") as f:
    data = f.read()
  with open(path, "wb") as f:
    f.write(data[:len(data) // 2])
  return step_dir


def test_loading_a_damaged_checkpoint_for_prediction_fails_in_one_line(tmp_path):
  step_dir = damaged_finetune(str(tmp_path / "fine"))
  with pytest.raises(predict.PredictError) as e:
    predict.load(str(tmp_path / "fine"))
  assert "\n" not in str(e.value) and step_dir in str(e.value) and len(str(e.value)) < 400


@pytest.mark.slow
def test_predict_cli_on_a_damaged_checkpoint_prints_one_line(tmp_path):
  step_dir = damaged_finetune(str(tmp_path / "fine"))
  (tmp_path / "in").mkdir()
  from PIL import Image
  Image.fromarray(np.zeros((20, 30), np.uint8)).save(tmp_path / "in" / "a.png")
  out = subprocess.run([
      sys.executable, "launch/predict.py", f"--workdir={tmp_path / 'fine'}", f"--input={tmp_path / 'in'}",
      f"--output={tmp_path / 'out'}"
  ], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
  assert out.returncode == 1
  assert_one_error_line(out.stderr, step_dir, "cannot be read")
  assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------- 7. Ctrl-C
@pytest.mark.slow
def test_ctrl_c_with_data_workers_is_quiet_and_resumes(tmp_path, shared_data):
  args = main_args(tmp_path / "run", shared_data, "--config.data.num_workers=2", "--config.num_steps=20",
                   "--config.checkpoint_every=1000")
  log = tmp_path / "run.log"
  with open(log, "w") as f:  # its own process group, signalled as a whole, as a terminal's Ctrl-C is
    child = subprocess.Popen(args, cwd=ROOT, env=ENV, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
  deadline = time.time() + 600
  while "step 3/" not in log.read_text():
    assert child.poll() is None and time.time() < deadline, log.read_text()[-3000:]
    time.sleep(0.1)
  os.killpg(child.pid, signal.SIGINT)
  assert child.wait(timeout=300) == 143
  time.sleep(1)  # the workers' last words, if any
  text = log.read_text()
  assert "stopped by SIGINT" in text
  for noise in ("Traceback", "KeyboardInterrupt", "leaked shared_memory"):
    assert noise not in text, text[-3000:]
  resumed = subprocess.run(args, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
  assert resumed.returncode == 0 and "resuming from" in resumed.stderr, resumed.stderr[-3000:]
  history = json.loads((tmp_path / "run" / "history.json").read_text())
  assert [r["step"] for r in history] == list(range(1, 21))


# ---------------------------------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def shared_data(tmp_path_factory):
  return tmp_path_factory.mktemp("data")


def main_args(workdir, data_dir, *extra) -> list[str]:
  """A tiny pre-training through launch/main.py: plain encoder, 32 px, batch 8."""
  return [
      sys.executable, "launch/main.py", "--config=configs/pretrain_multiorgan.py", f"--workdir={workdir}",
      f"--config.data.data_dir={data_dir}", "--config.data.image_size=32", "--config.data.synthetic_size=32",
      "--config.data.synthetic_num_images=40", "--config.batch_size=8", "--config.model.proj_dims=(64,32)",
      "--config.model.encoder=plain", "--config.num_steps=30", "--config.log_every=1", *extra
  ]


def run_main(workdir, data_dir, *extra):
  return subprocess.run(main_args(workdir, data_dir, *extra), cwd=ROOT, env=ENV, capture_output=True, text=True,
                        timeout=600)


def assert_one_error_line(stderr: str, *parts: str) -> None:
  """stderr ends in one 'error:' line holding `parts`, and holds no traceback and no other error."""
  lines = stderr.rstrip("\n").split("\n")
  assert lines[-1].startswith("error: ") and all(p in lines[-1] for p in parts), stderr[-3000:]
  assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr[-3000:]
  logged = [ln for ln in lines if re.match(r"E\d{4} ", ln)]
  assert len(logged) == 1 and re.search(r"(main|predict).py:\d+\]", logged[0]), logged[:10]  # its own log line
