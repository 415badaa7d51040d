"""The study's bootstrap: CIs of a mean over test images and seeds, and of a paired difference.

Pure functions of per-image scores, one array (or per_image.json rows) per seed; `usjax.analysis` turns runs into
these inputs and their results into tables and claims.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np


def _boot_means(values_by_seed: list[np.ndarray], n_boot: int, rng: np.random.Generator) -> np.ndarray:
  """Hierarchical bootstrap of the mean: resample seeds, then images within each chosen seed."""
  vals = [v[~np.isnan(v)] for v in (np.asarray(v, float).ravel() for v in values_by_seed)]
  vals = [v for v in vals if v.size]
  picks = rng.integers(0, len(vals), (n_boot, len(vals)))
  total = np.zeros(n_boot)
  for k, v in enumerate(vals):
    count = (picks == k).sum(1)
    means = v[rng.integers(0, v.size, (int(count.sum()), v.size))].mean(1)
    total += np.bincount(np.repeat(np.arange(n_boot), count), weights=means, minlength=n_boot)
  return total / len(vals)


def _ci(values_by_seed, n_boot: int, seed: int, alpha: float):
  means = [np.nanmean(v) for v in (np.asarray(v, float) for v in values_by_seed) if np.any(~np.isnan(v))]
  mean = float(np.mean(means)) if means else math.nan
  if math.isnan(mean):
    return mean, math.nan, math.nan, np.full(n_boot, math.nan)
  boot = _boot_means(values_by_seed, n_boot, np.random.default_rng(seed))
  lo, hi = np.quantile(boot, [alpha / 2, 1 - alpha / 2])
  return mean, float(lo), float(hi), boot


def bootstrap_ci(values_by_seed: list[np.ndarray], n_boot: int = 2000, seed: int = 0,
                 alpha: float = 0.05) -> tuple[float, float, float]:
  """Mean (of the per-seed means) with a percentile CI that carries both image and seed variability.

  Seeds weigh equally; with one seed only images are resampled. NaNs (undefined HD95) are left out.
  """
  return _ci(values_by_seed, n_boot, seed, alpha)[:3]


def _paired(a, b, key: str) -> np.ndarray:
  """b - a per image: matched by id when both come with ids, else by position."""
  as_map = lambda x: (dict(x) if isinstance(x, Mapping) else {r["id"]: r.get(key) for r in x}
                      if isinstance(x, (list, tuple)) and x and isinstance(x[0], Mapping) else None)
  ma, mb = as_map(a), as_map(b)
  if ma is not None and mb is not None:
    ids = sorted(set(ma) & set(mb))
    if not ids:
      raise ValueError("the two arms share no test image ids")
    va, vb = ([np.nan if m[i] is None else m[i] for i in ids] for m in (ma, mb))
  else:
    va, vb = np.asarray(a, float).ravel(), np.asarray(b, float).ravel()
    if va.shape != vb.shape:
      raise ValueError(f"unpaired arms: {va.size} vs {vb.size} images and no ids to match them")
  return np.asarray(vb, float) - np.asarray(va, float)


# z_{1 - alpha/2} + z_{power} for alpha = 0.05 and 80% power: the smallest true effect a two-sided test at 5%
# finds 80% of the time is about 2.8 standard errors (normal approximation).
_Z_MDE = 1.959964 + 0.841621


def paired_difference(a_by_run: list, b_by_run: list, n_boot: int = 2000, seed: int = 0, alpha: float = 0.05,
                      key: str = "dice") -> dict:
  """Mean of (b - a) on the same test images with its bootstrap CI, two-sided p-value, standard error and the
  minimum detectable effect at 80% power (`mde`, 2.8 standard errors).

  Each arm is a list over runs (paired by position: a seed, or a (fold, seed) of a cross-validated study) of
  per-image scores: arrays in a common order, {id: value} maps, or per_image.json rows (matched by "id", scored
  by `key`). The bootstrap resamples runs, then images within each run, so both training randomness and the
  choice of test images widen the CI. Pairing removes the between-image variance that dominates an unpaired
  comparison.
  """
  if len(a_by_run) != len(b_by_run) or not a_by_run:
    raise ValueError(f"need the same number of runs in both arms, got {len(a_by_run)} and {len(b_by_run)}")
  diffs = [_paired(a, b, key) for a, b in zip(a_by_run, b_by_run)]
  mean, lo, hi, boot = _ci(diffs, n_boot, seed, alpha)
  if math.isnan(mean):
    return dict(diff=mean, lo=lo, hi=hi, p=math.nan, se=math.nan, mde=math.nan)
  tail = min(np.sum(boot <= 0), np.sum(boot >= 0))
  se = float(np.std(boot, ddof=1))
  return dict(diff=mean, lo=lo, hi=hi, p=float(min(1.0, 2 * (tail + 1) / (n_boot + 1))), se=se, mde=_Z_MDE * se)


def paired_difference_ci(a_by_seed: list, b_by_seed: list, n_boot: int = 2000, seed: int = 0, alpha: float = 0.05,
                         key: str = "dice") -> tuple[float, float, float, float]:
  """(mean, lo, hi, p) of `paired_difference`."""
  r = paired_difference(a_by_seed, b_by_seed, n_boot, seed, alpha, key)
  return r["diff"], r["lo"], r["hi"], r["p"]
