"""Evaluation stage: per-image Dice and IoU of binary masks, and the loop that scores a model on a split.

Convention for empty masks (BUSI's normal images): an empty prediction on an empty ground truth is a perfect
score (1.0), any predicted pixel on an empty ground truth scores 0.0; never NaN.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


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


def summarize(per_image: dict[str, np.ndarray]) -> dict[str, float]:
  """Means over the test images (and, where a label is present, per class)."""
  out = {k: float(np.mean(v)) for k, v in per_image.items() if k in ("dice", "iou")}
  out["num_images"] = int(len(per_image["dice"]))
  return out


def evaluate(predict_fn, batches, mesh_put) -> dict[str, np.ndarray]:
  """Scores every real (non-padding) image of `batches`.

  `predict_fn(images, masks) -> (dice, iou)` is the jitted per-image scorer; `mesh_put` turns a host batch into
  global arrays; each batch carries a `valid` flag for the padding that keeps the batch shape fixed.
  """
  from jax.experimental import multihost_utils
  dice, iou = [], []
  for batch in batches:
    d, i = predict_fn(mesh_put(batch["image"]), mesh_put(batch["mask"]))
    valid = multihost_utils.process_allgather(mesh_put(batch["valid"]), tiled=True).astype(bool)
    d = multihost_utils.process_allgather(d, tiled=True)
    i = multihost_utils.process_allgather(i, tiled=True)
    dice.append(np.asarray(d)[valid])
    iou.append(np.asarray(i)[valid])
  return {"dice": np.concatenate(dice), "iou": np.concatenate(iou)}
