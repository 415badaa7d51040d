"""Leftovers of killed preparations are removed; a failed prediction leaves no output folder behind."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from usjax import predict
from usjax.data import DataError, phantoms, staging, synthetic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def staging_dirs(data_dir) -> list[str]:
  return sorted(n for n in os.listdir(data_dir) if n.startswith(staging.STAGING_PREFIX))


def leftovers(data_dir) -> list[str]:
  """Half-prepared data: our staging folders and TFDS's own `incomplete.*` ones."""
  return staging_dirs(data_dir) + sorted(str(p) for p in data_dir.rglob("incomplete.*"))


def test_a_killed_preparation_is_cleaned_up_by_the_next(tmp_path):
  data_dir = tmp_path / "data"
  script = ("import sys; from usjax.data import synthetic; "
            "synthetic.prepare('lung', sys.argv[1], image_size=32, num_images=50000)")
  proc = subprocess.Popen([sys.executable, "-c", script, str(data_dir)], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": ROOT}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + 60
    while time.time() < deadline and not (data_dir.is_dir() and leftovers(data_dir)):
      time.sleep(0.1)
    time.sleep(1.0)  # well into writing examples
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  assert leftovers(data_dir)  # what a killed preparation leaves, for good until now
  builder = synthetic.prepare("lung", str(data_dir), image_size=32, num_images=10)
  assert leftovers(data_dir) == []
  assert sum(len(s) for s in builder.as_data_source().values()) == 10


def make_staging(data_dir, name: str, owner: dict | str | None = None, age_s: float = 0.0) -> str:
  path = os.path.join(data_dir, name if name.startswith("incomplete.") else staging.STAGING_PREFIX + name)
  os.makedirs(os.path.join(path, "synthetic_ultrasound"))
  if owner is not None:
    with open(os.path.join(path, "owner.json"), "w") as f:
      f.write(owner if isinstance(owner, str) else json.dumps(owner))
  if age_s:
    os.utime(path, (time.time() - age_s, time.time() - age_s))
  return path


def test_only_staging_of_dead_owners_is_removed(tmp_path):
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  host = socket.gethostname()
  live = {"pid": os.getpid(), "host": host, "start": None}
  make_staging(tmp_path, "dead", {"pid": dead.pid, "host": host, "start": None})
  make_staging(tmp_path, "live", live)
  make_staging(tmp_path, "other", {"pid": dead.pid, "host": "elsewhere.example", "start": None})
  make_staging(tmp_path, "old", None, age_s=2 * 3600)  # an earlier version's, long abandoned
  make_staging(tmp_path, "young", None)  # an owner record not written yet
  make_staging(tmp_path, "half", '{"pid": 12')  # ... or half written
  make_staging(tmp_path, "half-old", '{"pid": 12', age_s=2 * 3600)
  (tmp_path / "data_set").mkdir()
  removed = staging.remove_stale_staging(str(tmp_path))
  assert sorted(os.path.basename(p) for p in removed) == [".staging-dead", ".staging-half-old", ".staging-old"]
  assert staging_dirs(tmp_path) == [".staging-half", ".staging-live", ".staging-other", ".staging-young"]
  assert (tmp_path / "data_set").is_dir()


def test_incomplete_folders_of_the_builder_being_prepared_are_removed_once_old(tmp_path):
  # Left by the earlier in-place preparation (TFDS's own `incomplete.*`, no owner record), killed.
  config_dir = tmp_path / "synthetic_ultrasound" / "lung-s32-n10-seed0"
  config_dir.mkdir(parents=True)
  old = make_staging(config_dir, "incomplete.ABC123_1.0.0", age_s=2 * 3600)
  young = make_staging(config_dir, "incomplete.XYZ789_1.0.0")
  synthetic.prepare("lung", str(tmp_path), image_size=32, num_images=10)
  assert not os.path.exists(old) and os.path.exists(young)
  assert (config_dir / "1.0.0").is_dir()


def test_a_live_preparation_records_its_owner(tmp_path, monkeypatch):
  seen = {}
  real = phantoms.generate

  def spy(*args, **kwargs):
    if not seen:
      [name] = staging_dirs(tmp_path)
      seen.update(json.loads((tmp_path / name / "owner.json").read_text()))
    return real(*args, **kwargs)

  monkeypatch.setattr(phantoms, "generate", spy)
  synthetic.prepare("lung", str(tmp_path), image_size=32, num_images=10)
  assert seen["pid"] == os.getpid() and seen["host"] == socket.gethostname()
  assert staging_dirs(tmp_path) == []


# ---------------------------------------------------------------------------------------------------- predict
def fake_predictor(batch_size: int = 2) -> predict.Predictor:
  """A Predictor whose network is a stand-in: the output folder handling is what is under test."""
  p = predict.Predictor(model=None, variables={}, image_size=32, channels=1, aspect="pad", batch_size=batch_size)
  p.segment = lambda images: [{"mask": np.zeros(im.shape[:2], bool), "max_prob": 0.0, "presence": None}
                               for im in images]
  return p


def image_folder(root, n_good: int, bad: str | None) -> str:
  root.mkdir()
  rng = np.random.default_rng(0)
  for i in range(n_good):
    Image.fromarray(rng.integers(0, 255, (20, 30), np.uint8)).save(root / f"a{i}.png")
  if bad == "truncated":  # a valid header, then cut: found only by the full decode, after outputs were written
    Image.fromarray(rng.integers(0, 255, (20, 30), np.uint8)).save(root / "z.png")
    data = (root / "z.png").read_bytes()
    (root / "z.png").write_bytes(data[:len(data) // 2])
  elif bad == "junk":
    (root / "z.png").write_bytes(b"not an image")
  return str(root)


@pytest.mark.parametrize("bad", ["truncated", "junk"])
def test_failed_prediction_leaves_no_output_folder(tmp_path, bad):
  folder = image_folder(tmp_path / "in", 3, bad)
  out = tmp_path / "runs" / "pred"
  with pytest.raises(DataError, match="z.png"):
    predict.predict_folder(fake_predictor(), folder, str(out))
  assert not (tmp_path / "runs").exists()


def test_failed_prediction_into_an_existing_folder_takes_back_only_its_outputs(tmp_path):
  folder = image_folder(tmp_path / "in", 3, "truncated")
  out = tmp_path / "out"
  (out / "old").mkdir(parents=True)
  (out / "old" / "keep.txt").write_text("earlier results")
  with pytest.raises(DataError, match="z.png"):
    predict.predict_folder(fake_predictor(), folder, str(out))
  assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == ["old", os.path.join("old", "keep.txt")]


def test_successful_prediction_writes_its_outputs(tmp_path):
  folder = image_folder(tmp_path / "in", 3, None)
  rows = predict.predict_folder(fake_predictor(), folder, str(tmp_path / "out"))
  assert len(rows) == 3 and (tmp_path / "out" / "predictions.json").is_file()
  assert (tmp_path / "out" / "a2_mask.png").is_file()
