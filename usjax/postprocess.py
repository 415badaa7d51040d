"""Post-processing of predicted lesion probabilities, each step kept only if validation says so (as nnU-Net does).

A segmentation network trained on BUSI draws small false lesions: specks on normal scans (where any pixel scores
Dice 0) and stray islands beside a real lesion. Three steps remove them, each a pure function of one probability
map: drop connected components smaller than `min_area` (a fraction of the image), empty the mask when its peak
probability is below `min_peak`, keep only the largest component. `choose` tries them in turn on the chosen
model's validation probabilities and keeps a step only where it raises validation Dice over all images; the rule
is recorded with the model (best/selection.json) and applied wherever that model predicts.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from scipy import ndimage

NONE = {"min_area": 0.0, "min_peak": 0.0, "largest": False}
# The candidates `choose` tries for each step, in this order; the first value of each is "off".
MIN_AREAS = (0.0, 0.001, 0.002, 0.005, 0.01)  # fraction of the image: 0.002 is 33 pixels at 128 px
MIN_PEAKS = (0.0, 0.6, 0.7, 0.8, 0.9)


def apply(prob: np.ndarray, rule: Mapping | None = None, threshold: float = 0.5) -> np.ndarray:
  """Binary mask [H, W] from a probability map [H, W] (or [H, W, 1]) under `rule` (keys of NONE)."""
  rule = {**NONE, **(rule or {})}
  prob = np.asarray(prob, np.float32).reshape(np.shape(prob)[:2])
  mask = prob > threshold
  if not mask.any():
    return mask
  if rule["min_peak"] and prob.max() < rule["min_peak"]:
    return np.zeros_like(mask)
  if rule["min_area"] or rule["largest"]:
    labels, n = ndimage.label(mask)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    keep = sizes >= rule["min_area"] * mask.size
    if rule["largest"] and keep.any():
      keep = np.arange(n) == int(np.argmax(np.where(keep, sizes, -1)))
    mask = np.isin(labels, np.flatnonzero(keep) + 1)
  return mask


def dice(pred: np.ndarray, true: np.ndarray) -> float:
  """Dice of two binary masks; 1 when both are empty (evaluate.dice_iou's convention)."""
  pred, true = np.asarray(pred, bool), np.asarray(true, bool).reshape(pred.shape)
  total = pred.sum() + true.sum()
  return 1.0 if total == 0 else float(2 * (pred & true).sum() / total)


def mean_dice(probs: Sequence[np.ndarray], masks: Sequence[np.ndarray], rule: Mapping | None) -> float:
  return float(np.mean([dice(apply(p, rule), m) for p, m in zip(probs, masks)]))


def choose(probs: Sequence[np.ndarray], masks: Sequence[np.ndarray], min_gain: float = 0.0) -> tuple[dict, dict]:
  """The rule to keep, chosen on validation, and the validation Dice of each step tried.

  Greedy: minimum peak probability, then minimum component area, then keep-largest, each step adopted (with its
  best value) only when it raises the mean validation Dice over all images by more than `min_gain` over the rule
  so far. Returns (rule, {'none': Dice, 'min_peak=0.8': Dice, ...}).
  """
  rule = dict(NONE)
  best = mean_dice(probs, masks, rule)
  tried = {"none": best}
  for key, values in (("min_peak", MIN_PEAKS[1:]), ("min_area", MIN_AREAS[1:]), ("largest", (True,))):
    scores = {v: mean_dice(probs, masks, {**rule, key: v}) for v in values}
    tried.update({f"{key}={v:g}" if not isinstance(v, bool) else key: s for v, s in scores.items()})
    value = max(scores, key=scores.get)
    if scores[value] > best + min_gain:
      rule[key], best = value, scores[value]
  return rule, tried
