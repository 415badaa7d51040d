"""A grid's own clock, `timing.json` beside its runs: the seconds of each trained run or stacked group, read by the
grid's report (`grid.time_table`). Written by the grid after each group, and by a stacked group stopped by a
signal (`stacked.finetune_stacked`), which records how far it got."""
from __future__ import annotations

import json
import os
import shutil
import time

import jax

from usjax import report

TIMING = "timing.json"


def read_timing(path: str) -> list[dict]:
  if not os.path.isfile(path):
    return []
  with open(path) as f:
    return json.load(f)


def log_time(root: str, results: str, names: list[str], task: str, seconds: float, **measured) -> None:
  """Appends a group's seconds to `timing.json` (and its copy in `results`); `measured` adds what a group stopped
  by a signal measured (`stacked.cut_timing`: `cut`, steps done, compile seconds, step rate)."""
  path = os.path.join(root, TIMING)
  timing = read_timing(path) + [{
      "runs": names, "task": task, "seconds": round(seconds, 1), "device": jax.devices()[0].device_kind,
      "date": time.strftime("%Y-%m-%d"), **measured
  }]
  report.write_json(path, timing)
  if results:
    os.makedirs(results, exist_ok=True)
    shutil.copyfile(path, os.path.join(results, TIMING))
