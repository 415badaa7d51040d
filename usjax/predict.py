"""Prediction stage: a fine-tuned checkpoint applied to new images of any size, scored at their own resolution.

Each image gets the preprocessing its checkpoint was trained with (channels, `aspect` to a square, resize to
`image_size`, all recorded in the checkpoint's `meta["data"]`); the logits then go through the exact inverse of
that geometry (bilinear on the logits, then the 0 threshold), so masks and scores are at the image's original
size, which is what a reader measures, not what the network saw. Batches are padded to a fixed size, so the
forward pass compiles once whatever the number and sizes of the images.
What the run chose on validation (best/selection.json) is applied: flip averaging, post-processing and, with the
lesion-presence head, the gate on its presence probability, which the JSON outputs record per image.
"""
from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from PIL import Image

from usjax import (UsjaxError, checkpoint, evaluate, metrics, models, orbax_errors, postprocess, prediction_files,
                   report)
from usjax.data import DataError, folders, imageio, pipeline

# configs/default.py's values, for checkpoints written before `meta["data"]` recorded them.
FALLBACK_DATA = {"image_size": 64, "channels": 1, "aspect": "pad"}
ASPECTS = ("pad", "stretch", "crop")


class PredictError(UsjaxError):
  """A workdir that holds no usable fine-tuning checkpoint: the message names the path."""


# ---------------------------------------------------------------------------------------------------- geometry
def _resize(arr: np.ndarray, h: int, w: int, resample) -> np.ndarray:
  if arr.shape == (h, w):
    return arr
  mode = "F" if arr.dtype != np.uint8 else "L"
  return np.asarray(Image.fromarray(arr.astype(np.float32) if mode == "F" else arr, mode).resize((w, h), resample))


def from_square(arr: np.ndarray, shape: tuple[int, int], aspect: str, resample=Image.BILINEAR,
                fill: float = 0) -> np.ndarray:
  """[S, S] map at model resolution -> [H, W]: the inverse of `pipeline.to_square`'s geometry.

  'pad' resizes back to the padded square and cuts the image out of it; 'stretch' resizes to (H, W); 'crop'
  resizes back to the centred square and sets the margins the network never saw to `fill`.
  """
  if aspect not in ASPECTS:
    raise DataError(f"aspect must be 'pad', 'stretch' or 'crop', got {aspect!r}")
  h, w = shape
  if aspect == "stretch" or h == w:
    return _resize(arr, h, w, resample)
  s = max(h, w) if aspect == "pad" else min(h, w)
  sq = _resize(arr, s, s, resample)
  if aspect == "pad":
    return sq[(s - h) // 2:(s - h) // 2 + h, (s - w) // 2:(s - w) // 2 + w]
  out = np.full((h, w), fill, sq.dtype)
  out[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s] = sq
  return out


def to_model_input(image: np.ndarray, size: int, channels: int, aspect: str) -> np.ndarray:
  """[H, W, C] uint8 -> [size, size, channels] uint8, as the training pipeline prepares an image."""
  return pipeline.to_square(pipeline.to_channels(image, channels), size, aspect, Image.BILINEAR)


# ---------------------------------------------------------------------------------------------------- checkpoint
def settings(meta: dict, image_size=None, channels=None, aspect=None) -> dict:
  """Preprocessing of a checkpoint: explicit values, else `meta["data"]`, else FALLBACK_DATA (older runs)."""
  data = meta.get("data") or {}
  given = {"image_size": image_size, "channels": channels, "aspect": aspect}
  out = {}
  for key, default in FALLBACK_DATA.items():
    out[key] = given[key] if given[key] is not None else data.get(key)
    if out[key] is None:
      logging.warning("checkpoint meta has no data.%s (an older run): assuming %r", key, default)
      out[key] = default
  if out["aspect"] not in ASPECTS:
    raise DataError(f"aspect must be 'pad', 'stretch' or 'crop', got {out['aspect']!r}")
  if out["channels"] not in (1, 3) or int(out["image_size"]) < 1:
    raise DataError(f"channels must be 1 or 3 and image_size positive, got {out['channels']}, {out['image_size']}")
  out["image_size"], out["channels"] = int(out["image_size"]), int(out["channels"])
  return out


def build_unet(model_meta: dict) -> models.UNet:
  return models.unet_from_config(model_meta)


def _flat_shapes(tree) -> dict[str, tuple]:
  return {
      "/".join(str(getattr(k, "key", k)) for k in path): tuple(v.shape) for path, v in
      jax.tree_util.tree_leaves_with_path(tree)
  }


@dataclasses.dataclass
class Predictor:
  """A fine-tuned U-Net with its preprocessing; `predict` maps images to masks at their own size."""
  model: models.UNet
  variables: dict
  image_size: int
  channels: int
  aspect: str
  batch_size: int = 8
  checkpoint: str = ""

  tta: bool = False  # left-right flip averaging, where the run's model selection kept it
  rule: dict | None = None  # post-processing (usjax.postprocess), where it kept one
  presence_threshold: float | None = None  # the presence gate (a model with the head), where it kept one
  gate_on: str | None = "head"  # what the gate thresholds: the head's probability or the mask's peak ('peak')

  def __post_init__(self):
    def forward(v, x):  # logits (with tta, of the flip-averaged probability), peak and presence probabilities
      x = x.astype(jnp.float32) / 255.0
      if self.tta:
        prob, presence = evaluate.forward_probs(self.model, v, x, True)
        logits = jnp.log(prob[..., 0]) - jnp.log1p(-prob[..., 0])
      else:
        logits, presence = evaluate.split_outputs(self.model.apply(v, x, train=False))
        logits, presence = logits[..., 0], None if presence is None else jax.nn.sigmoid(presence)
      return logits, jax.nn.sigmoid(jnp.max(logits, axis=(1, 2))), presence

    self._forward = jax.jit(forward)

  def outputs(self, squares: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """[N, S, S, C] uint8 -> (logits [N, S, S], peak probability [N], presence probability [N] or None without the
    head), in batches padded to `batch_size` (one compile)."""
    out = []
    for i in range(0, len(squares), self.batch_size):
      chunk = squares[i:i + self.batch_size]
      padded = np.zeros((self.batch_size, *squares.shape[1:]), np.uint8)
      padded[:len(chunk)] = chunk
      out.append([None if a is None else np.asarray(a)[:len(chunk)] for a in self._forward(self.variables, padded)])
    if not out:
      return np.zeros((0, self.image_size, self.image_size), np.float32), np.zeros(0, np.float32), None
    return tuple(None if parts[0] is None else np.concatenate(parts) for parts in zip(*out))

  def segment(self, images: list[np.ndarray]) -> list[dict]:
    """[H, W, C] uint8 images (any sizes, 1 or 3 channels) -> per image {'mask': [H, W] bool at its size,
    'max_prob': its peak foreground probability, 'presence': the head's lesion-presence probability (None
    without the head)}, through the run's post-processing and presence gate."""
    squares = np.stack([to_model_input(im, self.image_size, self.channels, self.aspect) for im in images]) \
        if images else np.zeros((0, self.image_size, self.image_size, self.channels), np.uint8)
    logits, peak, presence = self.outputs(squares)
    out = []
    for i, (lg, im) in enumerate(zip(logits, images)):
      lg = from_square(lg, im.shape[:2], self.aspect, fill=-np.inf)
      p = None if presence is None else float(presence[i])
      if self.rule and self.rule != postprocess.NONE:
        from scipy.special import expit
        mask = postprocess.apply(expit(lg), self.rule, area=self._square_area(im.shape[:2]))
      else:  # the logits' sign: the same 0.5 threshold as ever, without rounding at the boundary
        mask = lg > 0
      value = postprocess.gate_value(self.gate_on, p, float(peak[i]))
      gated = self.presence_threshold is not None and value is not None and value < self.presence_threshold
      out.append({"mask": np.zeros_like(mask) if gated else mask, "max_prob": float(peak[i]), "presence": p})
    return out

  def predict(self, images: list[np.ndarray]) -> list[np.ndarray]:
    """[H, W, C] uint8 images (any sizes, 1 or 3 channels) -> [H, W] bool masks at the same sizes."""
    return [r["mask"] for r in self.segment(images)]

  def _square_area(self, shape: tuple[int, int]) -> float:
    """The network's square in the image's own pixels (what the rule's minimum area is a fraction of)."""
    h, w = shape
    return float(h * w if self.aspect == "stretch" else max(h, w)**2 if self.aspect == "pad" else min(h, w)**2)


def load(workdir: str, *, image_size: int | None = None, channels: int | None = None, aspect: str | None = None,
         batch_size: int = 8) -> Predictor:
  """The model a fine-tuning run chose on validation (`<workdir>/best/<step>`), else its latest checkpoint (runs
  from before model selection), ready to predict; keyword values override its meta. A workdir or a checkpoint
  folder is accepted."""
  try:
    ckdir, step = checkpoint.locate(workdir, prefer=("best", "checkpoints"), kind="a fine-tuning workdir")
  except checkpoint.CheckpointError as e:
    raise PredictError(str(e)) from None
  path = os.path.join(ckdir, str(step))
  try:
    meta = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(os.path.join(path, "meta"))
  except Exception as e:  # noqa: BLE001 (missing, or damaged: orbax's error types vary)
    raise PredictError(f"{path}: no readable meta ({type(e).__name__}); not a usjax checkpoint") from None
  if meta.get("task") != "finetune":
    raise PredictError(f"{path}: a {meta.get('task', 'unknown')} checkpoint; prediction needs a fine-tuning workdir")
  cfg = settings(meta, image_size, channels, aspect)
  model = build_unet(meta["model"])
  s = cfg["image_size"]
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, s, s, cfg["channels"])), train=False))
  shapes = {k: shapes[k] for k in ("params", "batch_stats") if k in shapes}
  try:
    stored = _flat_shapes(ocp.PyTreeCheckpointHandler().metadata(epath.Path(path) / "state").tree)
  except Exception as e:  # noqa: BLE001
    raise PredictError(f"{path}/state: not a readable usjax train state ({type(e).__name__})") from None
  for name, shape in _flat_shapes(shapes).items():
    if stored.get(name) != shape:
      raise PredictError(f"{path}: {name} is {stored.get(name, 'missing')}, the model of its meta expects {shape} "
                         f"(channels={cfg['channels']}: a wrong channels override?)")
  try:
    with orbax_errors.quiet_failures():
      variables = checkpoint.restore_on_one_device(path, shapes)
  except Exception as e:  # noqa: BLE001 (orbax and TensorStore raise plain Exception on damaged files)
    last = os.path.join(os.path.dirname(ckdir), "checkpoints")
    hint = f"; --workdir={last} predicts with the run's last save instead" if ckdir != last and os.path.isdir(last) \
        else ""
    raise PredictError(f"{path}: checkpoint cannot be read, damaged? ({orbax_errors.first_line(e, 120)}){hint}") \
        from None
  logging.info("loaded %s: U-Net/%s, %d px, %d channel(s), aspect %s", path, meta["model"]["encoder"], s,
               cfg["channels"], cfg["aspect"])
  selection = os.path.join(os.path.dirname(path), "selection.json")
  chosen = {}
  if os.path.isfile(selection):  # runs from before model selection have none: plain thresholding
    with open(selection) as f:
      chosen = json.load(f)
  rule, threshold = chosen.get("postprocess"), chosen.get("presence_threshold")
  if threshold is not None and not model.presence_head:
    raise PredictError(f"{selection}: a presence gate for a model without the presence head")
  gate_on = chosen.get("presence_gate_on") or "head"  # records from before the choice name none: the head
  logging.info("applying what validation chose: flip averaging %s, post-processing %s, presence gate %s",
               "on" if chosen.get("tta") else "off", rule or "none",
               "off" if threshold is None else f"{threshold:.3f} on the {gate_on}")
  return Predictor(model, variables, s, cfg["channels"], cfg["aspect"], batch_size, path, bool(chosen.get("tta")),
                   rule, threshold, gate_on)


# ---------------------------------------------------------------------------------------------------- scoring
def score(pred: np.ndarray, true: np.ndarray) -> dict:
  """The registered per-image metrics (`usjax.metrics`: Dice, IoU, HD95) of one pair of [H, W] bool masks at any
  size, with the evaluation stage's empty-mask conventions."""
  return {**metrics.score_one(pred, true), "empty_true": not true.any(), "empty_pred": not pred.any()}


def _predictor(workdir) -> Predictor:
  return workdir if isinstance(workdir, Predictor) else load(workdir)


def _chunks(seq, n: int):
  for i in range(0, len(seq), n):
    yield seq[i:i + n]


# ---------------------------------------------------------------------------------------------------- folders
def evaluate_folder(workdir, folder: str, out_dir: str, *, save_predictions: bool = False) -> dict:
  """Scores a checkpoint on a folder in the BUSI layout, at each image's original resolution.

  `workdir` is a fine-tuning workdir or a loaded `Predictor`. Writes `per_image.json` (id, class, Dice, IoU,
  HD95, presence and peak probabilities) and `summary.json` (means, per class, false-positive rate on normal
  images, lesion-presence AUC) to `out_dir`, and with `save_predictions` the masks and overlays (prediction red,
  ground truth green) under the class sub-folders.
  """
  from usjax.data import busi
  root = busi.find_root(folder)
  items = busi.scan(root)  # header-checks every file: most bad input fails here, before any output
  prediction_files.check_out_dir(out_dir, root)
  p = _predictor(workdir)
  rows = []
  with prediction_files.taken_back_on_failure(out_dir, root):  # a file failing its full decode later takes them back
    for chunk in _chunks(items, p.batch_size):
      images = [imageio.read_image(it.paths[0], 3) for it in chunk]
      for it, image, out in zip(chunk, images, p.segment(images)):
        pred, true = out["mask"], np.logical_or.reduce([imageio.read_mask(m) for m in it.paths[1:]])
        rows.append({"id": it.id, "label": busi.CLASSES[it.label], **score(pred, true), **_probabilities(out)})
        if save_predictions:
          prediction_files.write_mask_and_overlay(out_dir, os.path.splitext(it.id)[0], image, pred, true)
    scores = {k: np.asarray([r[k] for r in rows]) for k in rows[0]}
    summary = {
        **evaluate.summarize(scores), "folder": os.path.abspath(folder), "checkpoint": p.checkpoint,
        "image_size": p.image_size, "aspect": p.aspect
    }
    report.write_json(os.path.join(out_dir, "per_image.json"), evaluate.per_image_rows(scores))
    report.write_json(os.path.join(out_dir, "summary.json"), summary)
  return summary


def _probabilities(out: dict) -> dict:
  """The JSON fields of `Predictor.segment`'s probabilities: 'presence' (with the head) and 'max_prob'."""
  return {k: out[k] for k in ("presence", "max_prob") if out[k] is not None}


def predict_folder(workdir, folder: str, out_dir: str) -> list[dict]:
  """Every PNG/JPEG under `folder` (recursive) -> `<name>_mask.png` (0/255) and `<name>_overlay.png`.

  Outputs keep the original size and relative sub-path. Files named like ground-truth masks (`*_mask.png`,
  `*_mask_1.png`) or earlier overlays are skipped, and so is `out_dir` when it lies inside `folder`. Also writes
  `predictions.json`: per image its outputs, size, predicted lesion area in pixels, peak foreground probability
  (`max_prob`) and, for a model with the head, its lesion-presence probability (`presence`).
  """
  folders.require_dir(folder)
  out_abs = os.path.realpath(out_dir)
  inside_out = lambda p: os.path.realpath(p).startswith(out_abs + os.sep)
  paths = [
      p for p in folders.list_images(folder, recursive=True)
      if not prediction_files.SKIP.search(os.path.splitext(os.path.basename(p))[0]) and not inside_out(p)
  ]
  if not paths:
    raise DataError(f"{folder}: no PNG/JPEG images to predict on")
  for path in paths:  # a header read each: a bad file fails here, before any output is written
    imageio.check_image(path)
  prediction_files.check_out_dir(out_dir, folder)
  p = _predictor(workdir)
  rows = []
  with prediction_files.taken_back_on_failure(out_dir, folder):  # a file failing its full decode later takes them back
    for chunk in _chunks(list(zip(paths, prediction_files.output_stems(paths, folder))), p.batch_size):
      images = [imageio.read_image(path, 3) for path, _ in chunk]
      for (path, stem), image, out in zip(chunk, images, p.segment(images)):
        pred = out["mask"]
        written = prediction_files.write_mask_and_overlay(out_dir, stem, image, pred)
        rows.append({
            "image": os.path.relpath(path, folder), **written,
            "height": pred.shape[0], "width": pred.shape[1], "lesion_pixels": int(pred.sum()), **_probabilities(out)
        })
    report.write_json(os.path.join(out_dir, "predictions.json"), rows)
  return rows
