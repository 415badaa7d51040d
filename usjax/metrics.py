"""Metrics of a segmentation, each registered once with what the summaries and the study report need to know.

Two registries, filled by the decorators below:
  PER_IMAGE  a score of one predicted mask against its ground truth (Dice, IoU, HD95). Scored wherever masks are
             scored (`usjax.evaluate` while training and at the end, `usjax.predict` at each image's own size),
             listed per image in per_image.json, averaged into summary.json (over all images, over the images
             that show a lesion, per class) and a column of the study's results.csv and, given a `header`, of
             its report.md (`usjax.analysis`).
  PER_SPLIT  a number over a split's images that is not a mean of per-image scores (the false-positive rate on
             normal images, the lesion-presence AUC): summary.json, results.csv and, given a `header`, report.md.

A new metric is one function here and its decorator line; nothing else names it. Example (README: Extending usjax):

    @register("precision", header="Precision", undefined=True)
    def precision(pred, true):
      return float((pred & true).sum() / pred.sum()) if pred.any() else float("nan")

Empty masks (BUSI's normal images): an empty prediction on an empty ground truth is a perfect score, any
predicted pixel on an empty ground truth scores 0 (Dice, IoU); a score with no value there (HD95 with exactly
one mask empty) is NaN, registered `undefined=True`: left out of its means and counted apart in the report.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class PerImage:
  """A per-image metric. `fn(pred, true)` takes one image's [H, W] bool masks and returns a float; a `batched` one
  takes [N, ...] masks and returns [N] scores in jax.numpy (it also runs inside the jitted scorers), and must
  depend on pixel counts alone: prediction scores it on masks flattened and padded with background, so that
  images of every size share a handful of compiled shapes."""
  fn: Callable
  batched: bool = False
  header: str = ""  # its report.md column ('' = results.csv only)
  digits: int = 3  # decimals in report.md
  lesion: bool = False  # also averaged over the images whose ground truth shows a lesion: `<name>_lesion`
  per_class: bool = False  # also averaged per class: `<name>_<class>`
  class_header: str = ""  # report.md columns per class showing a lesion, e.g. 'Dice {}' ('' = none)
  undefined: bool = False  # may be NaN on an image: means over the others, `<name>_undefined` counts them


@dataclasses.dataclass(frozen=True)
class PerSplit:
  """A split-level metric: `fn(scores) -> {key: value}` over a split's per-image scores (the dict
  `usjax.evaluate.score_probabilities` returns); {} where it does not apply. `keys` are what it may return, the
  number first; a second key names what the number was computed from, shown in brackets in report.md through
  `sources` (value -> shown name)."""
  fn: Callable
  keys: tuple[str, ...]
  header: str = ""
  digits: int = 3
  sources: dict | None = None


PER_IMAGE: dict[str, PerImage] = {}
PER_SPLIT: dict[str, PerSplit] = {}


def register(name: str, **options) -> Callable:
  """Decorator: registers a per-image metric under `name` (options: the fields of `PerImage`)."""
  def add(fn):
    PER_IMAGE[name] = PerImage(fn, **options)
    return fn

  return add


def register_split(name: str, keys: tuple[str, ...] = (), **options) -> Callable:
  """Decorator: registers a split-level metric under `name` (options: the fields of `PerSplit`)."""
  def add(fn):
    PER_SPLIT[name] = PerSplit(fn, keys or (name,), **options)
    return fn

  return add


# ---------------------------------------------------------------------------------------------------- per image
def dice_iou(pred: jax.Array, true: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-image Dice and IoU of boolean masks [B, H, W, ...] -> two [B] float32 arrays."""
  axes = tuple(range(1, pred.ndim))
  pred, true = pred.astype(bool), true.astype(bool)
  inter = jnp.sum(pred & true, axis=axes).astype(jnp.float32)
  p, t = jnp.sum(pred, axis=axes).astype(jnp.float32), jnp.sum(true, axis=axes).astype(jnp.float32)
  union = p + t - inter
  empty = union == 0
  dice = jnp.where(empty, 1.0, 2 * inter / jnp.where(empty, 1.0, p + t))
  iou = jnp.where(empty, 1.0, inter / jnp.where(empty, 1.0, union))
  return dice, iou


# Dice and IoU share one computation; each is taken from it whole, so either gives the same float32 numbers
# as the pair did.
@register("dice", batched=True, lesion=True, per_class=True, class_header="Dice {}")
def dice(pred, true):
  return dice_iou(pred, true)[0]


@register("iou", batched=True, header="IoU", lesion=True, per_class=True)
def iou(pred, true):
  return dice_iou(pred, true)[1]


@register("hd95", header="HD95 (px)", digits=1, undefined=True)
def hd95(pred: np.ndarray, true: np.ndarray) -> float:
  """95th-percentile symmetric Hausdorff distance, in pixels, between the boundaries of boolean masks [H, W].

  The 95th percentile instead of the maximum keeps one stray pixel from deciding the score. Both masks empty is a
  perfect 0.0; exactly one empty has no distance at all and is NaN, so callers count it apart and leave it out of
  means (Dice already scores it 0).
  """
  from scipy import ndimage
  pred, true = np.asarray(pred, bool), np.asarray(true, bool)
  if not pred.any() and not true.any():
    return 0.0
  if not pred.any() or not true.any():
    return float("nan")
  edge = lambda m: m & ~ndimage.binary_erosion(m)  # border_value=0: pixels on the image edge are boundary too
  ep, et = edge(pred), edge(true)
  dist = np.concatenate([ndimage.distance_transform_edt(~et)[ep], ndimage.distance_transform_edt(~ep)[et]])
  return float(np.percentile(dist, 95))


def score_masks(pred: np.ndarray, true: np.ndarray, skip: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
  """{metric: [N] scores} of masks [N, H, W] bool for every registered per-image metric except `skip`."""
  out = {}
  for name, m in PER_IMAGE.items():
    if name in skip:
      continue
    if m.batched:
      out[name] = np.asarray(m.fn(pred, true))
    else:
      out[name] = np.array([m.fn(p, t) for p, t in zip(pred, true)], np.float32)
  return out


def score_one(pred: np.ndarray, true: np.ndarray) -> dict[str, float]:
  """{metric: score} of one pair of [H, W] bool masks of any size. Batched metrics run on the masks flattened
  and padded with background to a power-of-two length: padding changes no count, and images of every size then
  share a handful of compiled shapes."""
  n = pred.size
  length = 1 << max(n - 1, 0).bit_length()
  flat = lambda m: np.pad(np.asarray(m, bool).ravel(), (0, length - n))[None]
  return {
      name: float(m.fn(flat(pred), flat(true))[0]) if m.batched else m.fn(pred, true)
      for name, m in PER_IMAGE.items()
  }


def mean(values, undefined: bool = False) -> float | None:
  """The mean of per-image scores; with `undefined`, in float64 over the finite ones (None when there are none).
  Two paths on purpose: they are the arithmetic every recorded summary was computed with."""
  if not undefined:
    return float(np.mean(np.asarray(values)))
  v = np.asarray(values, np.float64)
  return float(np.nanmean(v)) if np.any(np.isfinite(v)) else None


# ---------------------------------------------------------------------------------------------------- per split
@register_split("false_positive_rate", header="FPR on normal")
def false_positive_rate(scores: dict) -> dict:
  """The share of images with an empty ground truth (BUSI's normal images) given any lesion pixel."""
  if "empty_true" not in scores or not np.any(scores["empty_true"]):
    return {}
  empty = np.asarray(scores["empty_true"], bool)
  return {"false_positive_rate": float(np.mean(~np.asarray(scores["empty_pred"], bool)[empty]))}


@register_split("presence_auc", keys=("presence_auc", "presence_auc_from"), header="Presence AUC (from)",
                sources={"head": "head", "max_prob": "max p"})
def presence_auc(scores: dict) -> dict:
  """How well an image-level score separates images that show a lesion from those that do not: the presence
  head's probability where the model has one, else the image's peak foreground probability."""
  source = next((k for k in ("presence", "max_prob") if k in scores), None)
  if not source or "empty_true" not in scores:
    return {}
  value = auc(scores[source], ~np.asarray(scores["empty_true"], bool))
  if not np.isfinite(value):  # needs both normal and lesion images
    return {}
  return {"presence_auc": value, "presence_auc_from": "head" if source == "presence" else "max_prob"}


def auc(scores, positive) -> float:
  """Area under the ROC curve of `scores` for the `positive` images, by the rank formula: (sum of the positives'
  ranks - n_pos (n_pos + 1) / 2) / (n_pos n_neg), tied scores sharing their mean rank (counted half). NaN when
  either class is missing."""
  scores, positive = np.asarray(scores, np.float64), np.asarray(positive, bool)
  n_pos, n_neg = int(positive.sum()), int((~positive).sum())
  if n_pos == 0 or n_neg == 0:
    return float("nan")
  _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
  ranks = (np.cumsum(counts) - (counts - 1) / 2)[np.ravel(inverse)]  # mean 1-based rank of each distinct value
  return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
