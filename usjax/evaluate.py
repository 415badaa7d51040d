"""Evaluation stage: the loops that score a model on a split with the metrics of `usjax.metrics`, and their means.

Convention for empty masks (BUSI's normal images): an empty prediction on an empty ground truth is a perfect
score (1.0), any predicted pixel on an empty ground truth scores 0.0; never NaN. The literature reports Dice both
ways, so both are kept: over all images (`dice`, normal images included) and over the images that show a lesion
(`dice_lesion`, non-empty ground truth only).

A run's final scores come from its probability maps (`probabilities`), through the post-processing and
presence gate chosen on validation (`usjax.postprocess`), on the host (`score_probabilities`). Image-level lesion
detection is scored by the AUC of the presence probability (`presence_auc`): the head's where the model has one,
else the peak foreground probability of the image (`max_prob`); `presence_auc_from` says which.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from usjax import metrics, postprocess
# Named here too: callers score with evaluate.dice_iou / hd95 / auc.
from usjax.metrics import auc, dice_iou, hd95  # noqa: F401


def summarize(per_image: dict[str, np.ndarray]) -> dict[str, float]:
  """Means over the test images of every registered per-image metric (`usjax.metrics`), over the images that
  show a lesion and per class where the images carry one (BUSI: benign/malignant/normal), then the split-level
  metrics.

  On images whose ground truth is empty (normal), Dice is 1 or 0, so its mean is 1 - false-positive rate.
  """
  scored = [(name, m, per_image[name]) for name, m in metrics.PER_IMAGE.items() if name in per_image]
  out = {}
  for name, m, values in scored:
    if (value := metrics.mean(values, m.undefined)) is not None:
      out[name] = value
  out["num_images"] = int(len(scored[0][2]))
  if "empty_true" in per_image:
    lesion = ~np.asarray(per_image["empty_true"], bool)
    if lesion.any():
      for name, m, values in scored:
        if m.lesion and (value := metrics.mean(np.asarray(values)[lesion], m.undefined)) is not None:
          out[f"{name}_lesion"] = value
      out["num_lesion_images"] = int(lesion.sum())
  if "label" in per_image:
    labels = np.asarray(per_image["label"])
    for label in sorted(set(labels.tolist())):
      for name, m, values in scored:
        if m.per_class and (value := metrics.mean(np.asarray(values)[labels == label], m.undefined)) is not None:
          out[f"{name}_{label}"] = value
  for m in metrics.PER_SPLIT.values():
    out.update(m.fn(per_image))
  return out


def evaluate(score_fn, batches, to_global, keep_examples: int = 8) -> tuple[dict[str, np.ndarray], dict]:
  """Scores every real (non-padding) image of `batches`, in split order.

  `score_fn(images, masks) -> (dice, iou, pred)` is the jitted per-image scorer, `to_global` turns a host batch
  into global arrays; padding images carry index -1 and are dropped after the cross-host gather. Dice and IoU
  come from the device, the other registered metrics (HD95: a distance transform) from the host. Also returns the first
  `keep_examples` images with their masks and predictions, for overlay figures.
  """
  from jax.experimental import multihost_utils
  gather = lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True))
  out = {"index": [], "dice": [], "iou": [], "empty_true": [], "empty_pred": []}
  examples = {"image": [], "mask": [], "pred": []}
  for batch in batches:
    dice, iou, pred = score_fn(to_global(batch["image"]), to_global(batch["mask"]))
    index = gather(to_global(batch["index"]))
    keep = index >= 0
    pred, true = gather(pred)[keep], gather(to_global(batch["mask"]))[keep] > 0
    out["index"].append(index[keep])
    out["dice"].append(gather(dice)[keep])
    out["iou"].append(gather(iou)[keep])
    out["empty_true"].append(~true.reshape(len(true), -1).any(1))
    out["empty_pred"].append(~pred.reshape(len(pred), -1).any(1))
    for name, values in metrics.score_masks(pred[..., 0], true[..., 0], skip=("dice", "iou")).items():
      out.setdefault(name, []).append(values)
    if sum(len(x) for x in examples["image"]) < keep_examples:
      examples["image"].append(gather(to_global(batch["image"]))[keep])
      examples["mask"].append(true)
      examples["pred"].append(pred)
  examples = {k: np.concatenate(v)[:keep_examples] for k, v in examples.items() if v}
  return {k: np.concatenate(v) for k, v in out.items()}, examples


def split_outputs(out) -> tuple[jax.Array, jax.Array | None]:
  """A U-Net's output -> (segmentation logits, presence logits or None): the pair with the presence head, the
  logits alone without it."""
  return out if isinstance(out, tuple) else (out, None)


def forward_probs(model, variables, x, tta: bool = False) -> tuple[jax.Array, jax.Array | None]:
  """(foreground probability [B, H, W, 1], presence probability [B] or None) of float images in eval mode.

  With `tta`, each is the mean of the image's and its left-right mirror's (the map flipped back): a lesion has
  no handedness, and ultrasound rows (depth) are never flipped.
  """
  logits, presence = split_outputs(model.apply(variables, x, train=False))
  prob, presence = jax.nn.sigmoid(logits), None if presence is None else jax.nn.sigmoid(presence)
  if tta:
    logits_f, presence_f = split_outputs(model.apply(variables, jnp.flip(x, 2), train=False))
    prob = 0.5 * (prob + jnp.flip(jax.nn.sigmoid(logits_f), 2))
    presence = None if presence is None else 0.5 * (presence + jax.nn.sigmoid(presence_f))
  return prob, presence


def make_scorer(model, out_sharding=None, tta: bool = False):
  """Jitted `(variables, uint8 images, masks) -> (dice, iou, pred)` of a segmentation model in eval mode, with
  flip averaging where `tta` (`forward_probs`); no post-processing (model selection while training)."""
  def score(variables, images, masks):
    prob, _ = forward_probs(model, variables, images.astype(jnp.float32) / 255.0, tta)
    pred = prob > 0.5
    return (*dice_iou(pred, masks > 0), pred)

  return jax.jit(score, out_shardings=out_sharding)


def make_prober(model, out_sharding=None, tta: bool = False):
  """Jitted `(variables, uint8 images) -> {'prob' [B, H, W], 'max_prob' [B], 'presence' [B] with the head}`."""
  def probe(variables, images):
    prob, presence = forward_probs(model, variables, images.astype(jnp.float32) / 255.0, tta)
    out = {"prob": prob[..., 0], "max_prob": jnp.max(prob, axis=(1, 2, 3))}
    return out if presence is None else {**out, "presence": presence}

  return jax.jit(probe, out_shardings=out_sharding)


def probabilities(prob_fn, variables, batches, to_global, ids, labels, keep_examples: int = 8) -> dict:
  """Per image of a split, in split order: the probability map [N, H, W], the ground truth [N, H, W] (bool),
  'max_prob', 'presence' (with the head), 'index', 'id' and 'label', and the first `keep_examples` images.
  `prob_fn` is `make_prober`'s; padding images (index -1) are dropped after the cross-host gather."""
  from jax.experimental import multihost_utils
  gather = lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True))
  out: dict[str, list] = {"index": [], "prob": [], "mask": [], "max_prob": [], "presence": [], "image": []}
  for batch in batches:
    got = prob_fn(variables, to_global(batch["image"]))
    index = gather(to_global(batch["index"]))
    keep = index >= 0
    out["index"].append(index[keep])
    out["mask"].append(gather(to_global(batch["mask"]))[keep][..., 0] > 0)
    for k in ("prob", "max_prob", "presence"):
      if k in got:
        out[k].append(gather(got[k])[keep])
    if sum(len(x) for x in out["image"]) < keep_examples:
      out["image"].append(gather(to_global(batch["image"]))[keep])
  res = {k: np.concatenate(v) for k, v in out.items() if v}
  res["image"] = res["image"][:keep_examples]
  res["id"], res["label"] = np.asarray(ids)[res["index"]], np.asarray(labels)[res["index"]]
  return res


def score_probabilities(split: dict, rule=None, threshold: float | None = None,
                        gate_on: str | None = "head") -> tuple[dict[str, np.ndarray], dict]:
  """`probabilities`' output scored through the post-processing `rule` and the presence gate at `threshold` on
  `gate_on` (`postprocess.final_mask`; None, None: plain thresholding at 0.5) -> (per-image scores as
  `score_split` gives them, plus 'max_prob' and 'presence', and the overlay examples)."""
  presence = split.get("presence")
  gate = [
      postprocess.gate_value(gate_on, None if presence is None else float(presence[i]), float(peak))
      for i, peak in enumerate(split["max_prob"])
  ]
  pred = np.stack([postprocess.final_mask(p, rule, g, threshold) for p, g in zip(split["prob"], gate)])
  true = split["mask"]
  scores = {k: split[k] for k in ("index", "id", "label", "max_prob", "presence") if k in split}
  # Dice and IoU by the training-time scorer's exact arithmetic (metrics.dice_iou)
  scores.update(metrics.score_masks(pred, true), empty_true=~true.reshape(len(true), -1).any(1),
                empty_pred=~pred.reshape(len(pred), -1).any(1))
  n = len(split["image"])
  examples = {"image": split["image"], "mask": true[:n, ..., None], "pred": pred[:n, ..., None]} if n else {}
  return scores, examples


def score_split(score_fn, variables, batches, to_global, ids, labels) -> tuple[dict[str, np.ndarray], dict]:
  """Per-image scores of `variables` on a split's `batches`, with the split's ids and class names attached."""
  scores, examples = evaluate(lambda x, m: score_fn(variables, x, m), batches, to_global)
  scores["id"] = np.asarray(ids)[scores["index"]]
  scores["label"] = np.asarray(labels)[scores["index"]]
  return scores, examples


def per_image_rows(scores: dict[str, np.ndarray]) -> list[dict]:
  """JSON rows (id, class, the registered per-image metrics, the presence probabilities where scored, whether the
  image shows a lesion) of `score_split`'s or `score_probabilities`' output."""
  keys = [k for k in ("id", "label", *metrics.PER_IMAGE, "presence", "max_prob") if k in scores]
  rows = [{k: scores[k][i].item() for k in keys} for i in range(len(scores["dice"]))]
  if "empty_true" in scores:
    for r, empty in zip(rows, scores["empty_true"]):
      r["lesion"] = not bool(empty)
  undefined = [k for k, m in metrics.PER_IMAGE.items() if m.undefined and k in scores]
  for r in rows:  # JSON has no NaN: HD95 is undefined when exactly one of the masks is empty
    for k in undefined:
      if not np.isfinite(r[k]):
        r[k] = None
  return rows


class Selector:
  """Model selection on the validation split: every `every` steps it scores each candidate set of weights
  (`candidates(state) -> {'raw': variables, 'ema': variables}`) and keeps a copy of the best by validation Dice
  over all images. Only the validation split is read; `history` and `best` go to the summary and checkpoints.
  """
  def __init__(self, every: int, score_fn, batches, to_global, ids, labels, candidates):
    self.every, self.score_fn, self.batches, self.to_global = every, score_fn, batches, to_global
    self.ids, self.labels, self.candidates = ids, labels, candidates
    self.history: list[dict] = []
    self.best: dict | None = None  # {'step', 'weights', 'dice', 'dice_lesion'}
    self.best_variables = None

  def due(self, step: int, last_step: int) -> bool:
    return step == last_step or (self.every > 0 and step % self.every == 0)

  def score(self, variables, score_fn=None) -> dict:
    scores, _ = score_split(score_fn or self.score_fn, variables, self.batches, self.to_global, self.ids, self.labels)
    return summarize(scores)

  def __call__(self, step: int, state) -> tuple[dict, bool]:
    """Scores the candidates at `step`; returns (the history row, whether a new best was found)."""
    row, improved = {"step": step}, False
    for name, variables in self.candidates(state).items():
      m = self.score(variables)
      row.update({f"{name}_dice": m["dice"], f"{name}_dice_lesion": m.get("dice_lesion", m["dice"])})
      if self.best is None or m["dice"] > self.best["dice"]:
        self.best = {"step": step, "weights": name, "dice": m["dice"], "dice_lesion": m.get("dice_lesion")}
        # The train step donates its state: the kept weights must be a copy, not a view of donated buffers.
        self.best_variables = jax.tree.map(jnp.copy, variables)
        improved = True
    self.history.append(row)
    return row, improved

  def state_dict(self) -> dict:
    return {"val_history": self.history, "best": self.best}

  def load(self, meta: dict, best_variables) -> None:
    self.history = list(meta.get("val_history") or [])
    self.best = meta.get("best")
    self.best_variables = best_variables
