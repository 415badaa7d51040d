"""Post-processing of predicted lesion probabilities, each step kept only if validation says so (as nnU-Net does).

A segmentation network trained on BUSI draws small false lesions: specks on normal scans (where any pixel scores
Dice 0) and stray islands beside a real lesion. Three steps remove them, each a pure function of one probability
map: drop connected components smaller than `min_area` (a fraction of the image), empty the mask when its peak
probability is below `min_peak`, keep only the largest component. `choose` tries them in turn on the chosen
model's validation probabilities and keeps a step only where it raises validation Dice over all images; the rule
is recorded with the model (best/selection.json) and applied wherever that model predicts.

A model with the lesion-presence head (`models.UNet(presence_head=True)`) also gets a gate: below a threshold on
its presence probability the mask is emptied. `choose_threshold` picks it on validation (by default the one that
clears the most normal scans within a budget of lesion-image Dice), `select`
chooses both for a run (the gate first, then the rule on what the gate keeps) and `final_mask` applies them;
`gate_frontier` lists what any threshold would do on a set of scored images (launch/gate_frontier.py).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from scipy import ndimage

NONE = {"min_area": 0.0, "min_peak": 0.0, "largest": False}
# The candidates `choose` tries for each step, in this order; the first value of each is "off".
MIN_AREAS = (0.0, 0.001, 0.002, 0.005, 0.01)  # fraction of the image: 0.002 is 33 pixels at 128 px
MIN_PEAKS = (0.0, 0.6, 0.7, 0.8, 0.9)


def apply(prob: np.ndarray, rule: Mapping | None = None, threshold: float = 0.5,
          area: float | None = None) -> np.ndarray:
  """Binary mask [H, W] from a probability map [H, W] (or [H, W, 1]) under `rule` (keys of NONE).

  `min_area` is a fraction of `area` pixels, by default the map's own: a map mapped back to an image's original
  size passes the area of the network's square there, so a rule chosen at model resolution means the same.
  """
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
    keep = sizes >= rule["min_area"] * (mask.size if area is None else area)
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


# ---------------------------------------------------------------------------------------------------- the gate
def gated_dice(dices: Sequence[float], empty_true: Sequence[bool], presence: Sequence[float],
               threshold: float | None) -> np.ndarray:
  """Per-image Dice once the masks of images whose presence probability is below `threshold` are emptied: an
  emptied mask scores 1 on a normal image and 0 on a lesion image (None: no gate)."""
  dices = np.asarray(dices, np.float64)
  if threshold is None:
    return dices
  gated = np.asarray(presence, np.float64) < threshold
  return np.where(gated, np.asarray(empty_true, bool).astype(np.float64), dices)


def cleared(dices: Sequence[float], empty_true: Sequence[bool], presence: Sequence[float], threshold: float) -> int:
  """How many normal scans carrying a false lesion (Dice below 1) the gate at `threshold` empties."""
  dices = np.asarray(dices, np.float64)
  return int(np.sum(gated_dice(dices, empty_true, presence, threshold) > dices))


GATES = ("lesion_budget", "best_dice")  # how `choose_threshold` picks the gate (config.presence.gate)


def choose_threshold(presence: Sequence[float], dices: Sequence[float], empty_true: Sequence[bool],
                     min_gain: float = 0.0, lesion_budget: float | None = None) -> tuple[float | None, float, float]:
  """The presence threshold chosen on validation, or None for no gate. -> (threshold, Dice over all images
  without the gate, with it).

  `lesion_budget=None` ('best_dice'): the threshold that maximises Dice over all images, off unless it raises it
  by more than `min_gain`. A number ('lesion_budget'): the threshold that empties the most false-lesion masks of
  normal scans while the mean Dice on lesion images drops by at most that much; off where none empties one.
  Normal scans are a sixth of BUSI and about ten images of its validation split, so Dice over all images barely
  moves when the gate clears them: the budget states the trade that matters to a reader of the masks instead.

  Candidates are the midpoints between consecutive distinct validation presence probabilities (a threshold on
  an observed value would sit on the edge of that image's decision); among equal scores the lowest, which empties
  the fewest masks, wins.
  """
  dices, empty = np.asarray(dices, np.float64), np.asarray(empty_true, bool)
  off = float(np.mean(dices)) if len(dices) else 1.0
  lesion_off = float(np.mean(dices[~empty])) if (~empty).any() else 1.0
  best_t, best, best_dice = None, -np.inf, off
  for t in candidates(presence):
    gated = gated_dice(dices, empty, presence, t)
    if lesion_budget is None:
      score = float(np.mean(gated))
    elif (~empty).any() and np.mean(gated[~empty]) < lesion_off - lesion_budget - 1e-12:
      continue
    else:
      score = float(cleared(dices, empty, presence, t))
    if score > best:
      best_t, best, best_dice = float(t), score, float(np.mean(gated))
  if best_t is None or (best <= off + min_gain if lesion_budget is None else best <= 0):
    return None, off, off
  return best_t, off, best_dice


def candidates(scores: Sequence[float]) -> np.ndarray:
  """The thresholds worth trying on `scores`: the midpoints between consecutive distinct values."""
  values = np.unique(np.asarray(scores, np.float64))
  return (values[:-1] + values[1:]) / 2


def gate_value(gate_on: str | None, presence: float | None, peak: float) -> float | None:
  """What a gate recorded as `presence_gate_on` thresholds for one image ('head', the default of records that
  name none: the head's presence probability; 'peak': the map's peak probability)."""
  return peak if gate_on == "peak" else presence


def final_mask(prob: np.ndarray, rule: Mapping | None = None, presence: float | None = None,
               threshold: float | None = None, area: float | None = None) -> np.ndarray:
  """The mask a run reports: `apply(prob, rule)`, emptied where the presence gate is set and `presence` (the
  value it thresholds: the head's probability or the map's peak, `gate_value`) is below it."""
  mask = apply(prob, rule, area=area)
  if threshold is not None and presence is not None and presence < threshold:
    return np.zeros_like(mask)
  return mask


def gate_frontier(scores: Sequence[float], dices: Sequence[float], empty_true: Sequence[bool]) -> list[dict]:
  """Every operating point a gate on `scores` can reach on one set of images, lowest fpr first: for each threshold
  worth trying (off, then the midpoints `choose_threshold` tries), the share of normal scans still carrying a
  false lesion ('fpr'), the mean Dice on lesion images, what that costs against no gate ('lesion_cost'), and how
  many lesion masks it empties. Only the points no other point beats on both fpr and cost are kept.

  Read on a test split this is a diagnostic, not a choice: it says whether any gate on that score could meet a
  target (say fpr <= 0.05 at a cost <= 0.01) for this model: no threshold chosen on validation can do better.
  """
  dices, empty = np.asarray(dices, np.float64), np.asarray(empty_true, bool)
  scores = np.asarray(scores, np.float64)
  lesion_off = float(np.mean(dices[~empty])) if (~empty).any() else 1.0
  points = []
  for t in [None, *candidates(scores)]:
    gated = gated_dice(dices, empty, scores, t)
    lesion = float(np.mean(gated[~empty])) if (~empty).any() else 1.0
    points.append({
        "threshold": None if t is None else float(t),
        "fpr": float(np.mean(gated[empty] < 1.0)) if empty.any() else 0.0,
        "lesion_dice": lesion, "lesion_cost": lesion_off - lesion,
        "lesions_emptied": 0 if t is None else int(np.sum(scores[~empty] < t)),
    })
  points.sort(key=lambda p: (p["fpr"], p["lesion_cost"]))
  front, best_cost = [], np.inf
  for p in points:  # by fpr rising: keep a point only if it costs less than every point with a lower fpr
    if p["lesion_cost"] < best_cost - 1e-12:
      front.append(p)
      best_cost = p["lesion_cost"]
  return front


def cheapest(front: Sequence[dict], max_fpr: float) -> dict | None:
  """The frontier point that reaches `max_fpr` at the least lesion-Dice cost (None: none reaches it)."""
  ok = [p for p in front if p["fpr"] <= max_fpr + 1e-12]
  return min(ok, key=lambda p: p["lesion_cost"]) if ok else None


GATE_SOURCES = ("auto", "head", "peak")  # what the gate thresholds (config.presence.gate_on)


def select(probs: Sequence[np.ndarray], masks: Sequence[np.ndarray], presence: Sequence[float] | None = None,
           search_rule: bool = True, lesion_budget: float | None = None, gate_on: str = "head") -> dict:
  """Post-processing for a run, chosen on its validation probabilities: the presence gate (with a head's
  `presence`, by `choose_threshold` with `lesion_budget`), then the rule (`search_rule`, else none) on the masks
  the gate keeps.

  The gate thresholds the head's presence probability ('head'), the map's peak probability ('peak'), or
  whichever of the two does better on validation ('auto': more false lesions cleared within the budget, else the
  higher Dice over all images; the head on a tie). -> what selection.json records: 'presence_threshold' (None:
  no gate), 'presence_gate_on', 'presence_gate' (how it was chosen), 'postprocess' (the rule),
  'postprocess_tried' and the validation Dice over all images before and after ('val_dice_raw',
  'val_dice_postprocessed')."""
  masks = [np.asarray(m, bool).reshape(np.shape(p)[:2]) for p, m in zip(probs, masks)]
  raw = [dice(apply(p), m) for p, m in zip(probs, masks)]
  empty = [not m.any() for m in masks]
  threshold, source, scores = None, None, None
  if presence is not None:
    options = {"head": presence, "peak": [float(np.max(p)) if np.size(p) else 0.0 for p in probs]}
    if gate_on != "auto":
      options = {gate_on: options[gate_on]}
    ranked = []
    for name, values in options.items():
      t, _, gated = choose_threshold(values, raw, empty, lesion_budget=lesion_budget)
      n = cleared(raw, empty, values, t) if t is not None and lesion_budget is not None else 0
      ranked.append((n, gated, name == "head", name, t))
    *_, source, threshold = max(ranked)
    scores = options[source]
  if threshold is not None:  # a gated image's map is all background: no rule can draw on it
    probs = [np.zeros_like(p) if q < threshold else p for p, q in zip(probs, scores)]
  else:
    source = None
  rule, tried = choose(probs, masks) if search_rule else (dict(NONE), {"none": mean_dice(probs, masks, NONE)})
  return {
      "presence_threshold": threshold, "presence_gate_on": source,
      "presence_gate": None if presence is None else
                       "best_dice" if lesion_budget is None else f"lesion_budget={lesion_budget:g}",
      "postprocess": rule, "postprocess_tried": tried,
      "val_dice_raw": float(np.mean(raw)) if raw else None, "val_dice_postprocessed": mean_dice(probs, masks, rule)
  }
