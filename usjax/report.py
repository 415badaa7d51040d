"""Report stage: progress lines while a run works, TensorBoard events, and `summary.json` when it ends.

Only process 0 writes, so a many-host run produces one set of files.
"""
from __future__ import annotations

import json
import os
import time

import jax
import numpy as np
from absl import logging

from usjax import storage


def quiet_libraries() -> None:
  """Keeps the console to this run's progress: INFO lines from orbax, TFDS and grain internals are dropped, and
  orbax's ERROR lines too: its failures reach the caller as exceptions, which `checkpoint` and `predict` report
  in one line, while orbax logs each from several threads with a traceback apiece (a full disk: hundreds), and
  asyncio logs those of its write tasks that nobody awaited."""
  import logging as pylog
  noisy = ("/orbax/", "/tensorflow_datasets/", "/grain/", "/array_record/", "/jax/_src/")
  harmless = ("Using custom data configuration", "OpenCV is not installed", "read only=", "read_only=True")

  class Filter(pylog.Filter):
    def filter(self, record):
      if "/orbax/" in record.pathname and record.levelno >= pylog.ERROR:
        return False
      # The same failure from orbax's other write tasks, logged by asyncio when each is collected, at any moment
      # up to the exit: after the one-line error, on a full disk.
      if "/asyncio/" in record.pathname and record.levelno >= pylog.ERROR and "/orbax/" in record.getMessage():
        return False
      if any(n in record.pathname for n in noisy):
        return record.levelno >= pylog.WARNING and not str(record.msg).startswith(harmless) and not any(
            h in str(record.msg) for h in harmless)
      return True

  for h in pylog.getLogger().handlers + [logging.get_absl_handler()]:
    h.addFilter(Filter())


def write_json(path: str, obj) -> None:
  """Atomic write: a reader never sees half a file, an interrupted run never leaves one; the mode follows the
  umask, and a full disk fails in one line (`storage.atomic_write`)."""
  storage.atomic_write(path, json.dumps(obj, indent=2, sort_keys=True, default=_jsonable))


def _jsonable(x):
  if isinstance(x, (np.generic, np.ndarray)):
    return x.tolist()
  return str(x)


def _duration(seconds: float) -> str:
  """H:MM:SS (or MM:SS under an hour)."""
  m, s = divmod(int(seconds), 60)
  h, m = divmod(m, 60)
  return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Reporter:
  """Progress to the log and TensorBoard scalars, every `every` steps."""
  def __init__(self, workdir: str, total_steps: int, images_per_step: int, first_step: int = 0):
    self.main = jax.process_index() == 0
    self.total, self.images_per_step = total_steps, images_per_step
    self.t_start = self.t_last = time.perf_counter()
    self.step_last = first_step
    self.history: list[dict] = []
    self.writer = None
    if self.main:
      from tensorboardX import SummaryWriter
      self.writer = SummaryWriter(os.path.join(workdir, "tb"))

  def mark(self, step: int) -> None:
    """Restart the clock (after compilation) so images/second measures steady-state steps."""
    self.t_last, self.step_last = time.perf_counter(), step

  def log(self, step: int, metrics: dict) -> dict:
    now = time.perf_counter()
    rate = (step - self.step_last) * self.images_per_step / max(now - self.t_last, 1e-9)
    self.t_last, self.step_last = now, step
    row = {"step": step, **{k: float(v) for k, v in metrics.items()}, "images_per_sec": rate}
    self.history.append(row)
    if self.main:
      # The first row after a restart has no elapsed steps to time: its ETA is unknown, not infinite.
      eta = _duration((self.total - step) * self.images_per_step / rate) if rate > 0 else "?"
      shown = " ".join(f"{k}={v:.4g}" for k, v in row.items() if k != "step")
      logging.info("step %d/%d (%3.0f%%) %s eta=%s", step, self.total, 100 * step / self.total, shown, eta)
      for k, v in row.items():
        if k != "step":
          self.writer.add_scalar(f"train/{k}", v, step)
      self.writer.flush()
    return row

  def scalars(self, step: int, values: dict, prefix: str) -> None:
    if self.main:
      for k, v in values.items():
        self.writer.add_scalar(f"{prefix}/{k}", float(v), step)
      self.writer.flush()

  def mean_rate(self) -> float:
    rates = [r["images_per_sec"] for r in self.history[1:]] or [r["images_per_sec"] for r in self.history]
    return float(np.mean(rates)) if rates else 0.0

  def close(self, workdir: str, summary: dict) -> None:
    if self.main:
      write_json(os.path.join(workdir, "summary.json"), summary)
      write_json(os.path.join(workdir, "history.json"), self.history)
      self.writer.close()
