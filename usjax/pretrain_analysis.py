"""What each pre-training learned, and whether it had finished learning when it stopped.

A pre-training run is read as *flattened* when its last quarter changed little: the training loss fell by under
2% (mean over the last quarter of the steps against the quarter before) and the target probe (BUSI linear,
balanced accuracy) rose by under 0.02 on the best value seen before the last quarter. A run that has not
flattened was stopped while still learning, so the arm it feeds is under-trained and a claim resting on it is
read with that caveat. Pure functions of the run's history.json / summary.json contents; the report's table of
them is `usjax.analysis.pretrain_table`.

The probe half of the rule is only as steady as the probe: on BUSI's 63 validation images an accuracy near 0.7
has a sampling error of about 0.06, and successive evaluations of one run move by as much as 0.05 as a few
borderline images flip, so only a larger rise says much at that size; the loss half, a mean over many logged
steps, is the steadier signal.
"""
from __future__ import annotations

import math

import numpy as np

TAIL = 0.25  # the last quarter of the run
LOSS_TOL = 0.02  # relative fall of the loss over the tail
PROBE_TOL = 0.02  # rise of the probe's balanced accuracy over the tail
PROBE_METRICS = ("busi_linear_bacc", "busi_knn_bacc")  # the target task's probe, linear first


def probe_metric(probe_history: list[dict]) -> str | None:
  """The probe the flattening rule follows: BUSI's linear probe when it was run, else the first linear one."""
  keys = {k for row in probe_history for k in row}
  return next((k for k in PROBE_METRICS if k in keys),
              next((k for k in sorted(keys) if k.endswith("_linear_bacc")), None))


def flattening(history: list[dict], probe_history: list[dict], steps: int, metric: str | None = None,
               tail: float = TAIL, loss_tol: float = LOSS_TOL, probe_tol: float = PROBE_TOL) -> dict:
  """{loss_drop, probe_gain, metric, flattened} for a run of `steps` steps (see the module docstring).

  loss_drop is relative (0.03 = the tail's mean loss is 3% below the previous quarter's); probe_gain is absolute.
  Either is NaN when the history has no point in a window; `flattened` is then None (cannot tell), never True.
  """
  cut, start = (1 - tail) * steps, (1 - 2 * tail) * steps
  late = [r["loss"] for r in history if r.get("loss") is not None and r["step"] > cut]
  early = [r["loss"] for r in history if r.get("loss") is not None and start < r["step"] <= cut]
  loss_drop = (np.mean(early) - np.mean(late)) / abs(np.mean(early)) if late and early else math.nan
  metric = metric or probe_metric(probe_history)
  probed = [(r["step"], r[metric]) for r in probe_history if metric and r.get(metric) is not None]
  before = [v for s, v in probed if s <= cut]
  probe_gain = probed[-1][1] - max(before) if probed and before and probed[-1][0] > cut else math.nan
  known = not (math.isnan(loss_drop) or math.isnan(probe_gain))
  return {
      "loss_drop": float(loss_drop), "probe_gain": float(probe_gain), "metric": metric,
      "flattened": bool(loss_drop < loss_tol and probe_gain < probe_tol) if known else None
  }
