"""Probe data: the labelled sets and the frozen encoder features the probes (`probes`) score.

The features are the deepest encoder feature map, global-average-pooled, in eval mode (BatchNorm running
averages): the part of the network that fine-tuning transfers, read the way the U-Net reads it at test time.
Both `UNet` and `PretrainNet` name that part `encoder`, so the same probe reads either kind of checkpoint
(`load_encoder` reads only that part of one). Images are preprocessed exactly as for fine-tuning and held in
memory (`ProbeData`), so probing every N pre-training steps costs one forward pass over a few hundred images
and two small fits.
"""
from __future__ import annotations

import os
import time
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from usjax import UsjaxError, checkpoint, models, probes
from usjax.data import pipeline, sources

# A class must have this many training examples (and at least one evaluation example) to be probed.
MIN_TRAIN_PER_CLASS = 10


class ProbeError(UsjaxError):
  """Nothing to probe, or a checkpoint the probe cannot read: the message names the path or setting."""


# ---------------------------------------------------------------------------------------------------- features
def build_encoder(model_cfg: Mapping[str, Any]) -> nn.Module:
  """The standalone encoder of a model config (`cfg.model`, or a checkpoint's `meta['model']`)."""
  return models.encoder_from_config(model_cfg)


def encoder_variables(variables: Mapping[str, Any]) -> dict:
  """{'params', 'batch_stats'} of the `encoder` sub-module of a UNet or PretrainNet variable tree; a tree that
  is already an encoder's (no 'encoder' key) is returned as it is. GroupNorm models have no batch_stats."""
  params = variables["params"]
  if "encoder" not in params:
    return dict(variables)
  out = {"params": params["encoder"]}
  if "encoder" in (variables.get("batch_stats") or {}):
    out["batch_stats"] = variables["batch_stats"]["encoder"]
  return out


def feature_fn(encoder: nn.Module) -> Callable:
  """jitted (encoder variables, uint8 images [B, S, S, C]) -> pooled features [B, F] float32, eval mode.

  Build it once and reuse it: a new function compiles anew. Images are scaled to [0, 1] as the train step
  scales them (`train.to_float`)."""
  @jax.jit
  def forward(variables, images):
    feats = encoder.apply(variables, images.astype(jnp.float32) / 255.0, train=False)
    return jnp.mean(feats[-1].astype(jnp.float32), axis=(1, 2))

  return forward


def encoder_features(forward: Callable, variables, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
  """[N, F] features of uint8 images [N, S, S, C] with `forward` (from `feature_fn`), in batches of exactly
  `batch_size` (the last one zero-padded), so the forward pass compiles once whatever N is."""
  if not len(images):
    raise ProbeError("encoder_features: no images")
  out = []
  for i in range(0, len(images), batch_size):  # dispatched asynchronously; read back once all are queued
    chunk = images[i:i + batch_size]
    padded = np.zeros((batch_size, *images.shape[1:]), np.uint8)
    padded[:len(chunk)] = chunk
    out.append(forward(variables, padded))
  return np.concatenate(jax.device_get(out))[:len(images)]


# ---------------------------------------------------------------------------------------------------- data
class ProbeSet(NamedTuple):
  """One source's probe data: preprocessed uint8 images [N, S, S, C] and labels 0..K-1 of the kept classes."""
  train_images: np.ndarray
  train_labels: np.ndarray
  eval_images: np.ndarray
  eval_labels: np.ndarray
  class_names: tuple[str, ...]


def _read_split(name: str, split: str, data_cfg) -> tuple[np.ndarray, np.ndarray]:
  src = sources.open_split(name, split, data_cfg)
  prep = pipeline.Preprocess(data_cfg.image_size, data_cfg.channels, data_cfg.aspect, with_mask=False)
  s, c = data_cfg.image_size, data_cfg.channels
  images, labels = np.zeros((len(src), s, s, c), np.uint8), np.zeros((len(src),), np.int64)
  for i in range(len(src)):
    ex = src[i]
    images[i], labels[i] = prep.map(ex)["image"], int(ex["label"])
  return images, labels


def probe_sets(data_cfg, names: Sequence[str] = ("busi", "pocus"), eval_split: str = "val",
               min_train: int = MIN_TRAIN_PER_CLASS) -> dict[str, ProbeSet]:
  """{source: ProbeSet} from each source's prepared 'train' and `eval_split` splits, preprocessed exactly as
  for fine-tuning (`pipeline.Preprocess` at data.image_size / channels / aspect).

  The splits are the prepared data sets' fixed ones: BUSI's are stratified by class; POCUS's keep every frame
  of a patient (of a video, where the metadata names no patient) in one split, so no video is seen on both
  sides. A source whose folder setting (data.busi_dir, data.pocus_dir) is empty is skipped. Only classes with
  at least `min_train` training examples and one evaluation example are kept (labels renumbered): the shared
  POCUS copy has a single pneumonia frame, so it is probed on covid vs regular. A source left with fewer than
  two classes is skipped with a warning. Probe on 'val', never on the fine-tuning 'test' split.

  The evaluation sets are small: BUSI's val split holds 63 images (one image = 1.6 points of accuracy), and
  POCUS's 94 frames come from 5 videos, so its scores move in steps of whole videos. Read trends, not digits.
  """
  out = {}
  for name in names:
    key = sources.SOURCE_DIR_KEY.get(name)
    if key is not None and not getattr(data_cfg, key):
      logging.info("probe: data.%s is empty, source %r skipped", key, name)
      continue
    builder = sources.builder_for(name, data_cfg)
    if "label" not in builder.info.features:
      raise ProbeError(f"probe source {name!r} has no class labels")
    all_names = builder.info.features["label"].names
    train_x, train_y = _read_split(name, "train", data_cfg)
    eval_x, eval_y = _read_split(name, eval_split, data_cfg)
    train_n, eval_n = (np.bincount(y, minlength=len(all_names)) for y in (train_y, eval_y))
    keep = [c for c in range(len(all_names)) if train_n[c] >= min_train and eval_n[c] >= 1]
    dropped = [
        f"{all_names[c]} ({train_n[c]}+{eval_n[c]})" for c in range(len(all_names))
        if c not in keep and train_n[c] + eval_n[c]
    ]
    if dropped:
      logging.info("probe %s: classes with too few examples (train+%s) left out: %s", name, eval_split,
                   ", ".join(dropped))
    if len(keep) < 2:
      logging.warning("probe %s: fewer than two classes with %d+ training examples; skipped", name, min_train)
      continue
    remap = np.full(len(all_names), -1, np.int64)
    remap[keep] = np.arange(len(keep))
    tm, em = remap[train_y] >= 0, remap[eval_y] >= 0
    out[name] = ProbeSet(train_x[tm], remap[train_y[tm]], eval_x[em], remap[eval_y[em]],
                         tuple(all_names[c] for c in keep))
  return out


class ProbeData:
  """Probe sets preprocessed once and held in memory, and the compiled encoder that reads them.

      probe = ProbeData(cfg.data, cfg.model)              # decodes and resizes the images once
      metrics = probe.run({"params": params, "batch_stats": batch_stats})   # UNet or PretrainNet trees

  `run` copies the encoder's variables to the host and runs on the default device, so it needs no other
  process and may be called on process 0 only. Its metrics, per source NAME:
    probe/NAME_knn_acc, probe/NAME_knn_bacc         k-NN (k, temperature) accuracy / balanced accuracy
    probe/NAME_linear_acc, probe/NAME_linear_bacc   linear probe accuracy / balanced accuracy
    probe/NAME_z_std, probe/NAME_uniformity         spread of the normalised pooled features (eval split):
                                                    trends only, see `embedding_stats`
  and probe/seconds.
  """
  def __init__(self, data_cfg, model_cfg: Mapping[str, Any], names: Sequence[str] = ("busi", "pocus"),
               eval_split: str = "val", batch_size: int = 64, k: int = 20, temperature: float = 0.07, l2: float = 1e-4,
               steps: int = 500, balanced: bool = False, min_train: int = MIN_TRAIN_PER_CLASS):
    t0 = time.perf_counter()
    self.sets = probe_sets(data_cfg, names, eval_split, min_train)
    if not self.sets:
      raise ProbeError(f"no probe data: none of {', '.join(names)} is available (set data.busi_dir / "
                       "data.pocus_dir to the downloaded folders)")
    self.encoder = build_encoder(model_cfg)
    self.forward = feature_fn(self.encoder)
    self.batch_size, self.k, self.temperature = batch_size, k, temperature
    self.l2, self.steps, self.balanced = l2, steps, balanced
    self.build_seconds = time.perf_counter() - t0
    for name, s in self.sets.items():
      logging.info("probe %s: %d train / %d %s images, classes %s (%.1f s to prepare all)", name, len(s.train_labels),
                   len(s.eval_labels), eval_split, ", ".join(s.class_names), self.build_seconds)

  def init_variables(self, seed: int = 0) -> dict:
    """A randomly initialised encoder's variables: the floor a pre-trained encoder must beat."""
    s = next(iter(self.sets.values())).train_images
    return jax.jit(lambda: self.encoder.init(jax.random.key(seed), jnp.zeros((1, *s.shape[1:])), train=False))()

  def describe(self) -> dict[str, dict]:
    """Per source: sizes, class names and counts, and the majority-class accuracy (the trivial baseline)."""
    out = {}
    for name, s in self.sets.items():
      majority = np.argmax(np.bincount(s.train_labels, minlength=len(s.class_names)))
      out[name] = {
          "train": len(s.train_labels), "eval": len(s.eval_labels), "classes": list(s.class_names),
          "train_counts": np.bincount(s.train_labels, minlength=len(s.class_names)).tolist(),
          "eval_counts": np.bincount(s.eval_labels, minlength=len(s.class_names)).tolist(),
          "majority_acc": probes.accuracy(np.full(len(s.eval_labels), majority), s.eval_labels)
      }
    return out

  def features(self, variables) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{source: (train features, eval features)} of the encoder in `variables`."""
    v = jax.device_get(encoder_variables(variables))
    return {
        name: (encoder_features(self.forward, v, s.train_images,
                                self.batch_size), encoder_features(self.forward, v, s.eval_images, self.batch_size))
        for name, s in self.sets.items()
    }

  def run(self, variables) -> dict[str, float]:
    """Probe metrics (see the class docstring) of the encoder in `variables`."""
    t0 = time.perf_counter()
    out = {}
    for name, (train_f, eval_f) in self.features(variables).items():
      s = self.sets[name]
      c = len(s.class_names)
      knn = probes.knn_accuracy(train_f, s.train_labels, eval_f, s.eval_labels, c, self.k, self.temperature)
      lin = probes.linear_accuracy(train_f, s.train_labels, eval_f, s.eval_labels, c, self.l2, self.steps,
                                   self.balanced)
      out.update({
          f"probe/{name}_knn_acc": knn["acc"], f"probe/{name}_knn_bacc": knn["bacc"],
          f"probe/{name}_linear_acc": lin["acc"], f"probe/{name}_linear_bacc": lin["bacc"],
          f"probe/{name}_z_std": float(probes.embedding_stats(eval_f)["z_std"]),
          f"probe/{name}_uniformity": float(probes.uniformity(eval_f))
      })
    out["probe/seconds"] = time.perf_counter() - t0
    return out


# ---------------------------------------------------------------------------------------------------- checkpoints
def _checkpoint(workdir: str, step: int | None) -> str:
  """`<checkpoint dir>/<step>` of a pre-training or fine-tuning workdir (or its checkpoints/ folder); the latest
  step when `step` is None."""
  try:
    ckdir, step = checkpoint.locate(workdir, step)
  except checkpoint.CheckpointError as e:
    raise ProbeError(str(e)) from None
  return os.path.join(ckdir, str(step))


def _meta(ck: str) -> dict:
  try:
    meta = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(os.path.join(ck, "meta"))
  except (FileNotFoundError, ValueError, OSError) as e:
    raise ProbeError(f"{ck}: no readable meta ({type(e).__name__}); not a usjax checkpoint") from None
  if not isinstance(meta, dict) or "encoder" not in (meta.get("model") or {}):
    raise ProbeError(f"{ck}/meta: no model config; not a usjax checkpoint")
  return meta


def read_meta(workdir: str, step: int | None = None) -> dict:
  """The JSON meta of a checkpoint (task, model config, preprocessing in 'data'); the latest by default."""
  return _meta(_checkpoint(workdir, step))


def load_encoder(workdir: str, image_size: int, channels: int, step: int | None = None) -> tuple[dict, dict, str]:
  """(encoder variables, meta, checkpoint path) of a checkpoint (the latest by default) of a pre-training or
  fine-tuning workdir. Only the online `encoder` sub-trees of params and batch_stats are read (an EMA target, optimiser
  state and decoder stay on disk); the encoder is rebuilt from meta['model'] for `channels`-channel input."""
  ck = _checkpoint(workdir, step)
  meta = _meta(ck)
  try:
    stored = ocp.PyTreeCheckpointHandler().metadata(epath.Path(ck) / "state").tree
  except (FileNotFoundError, ValueError, OSError, AttributeError) as e:
    raise ProbeError(f"{ck}/state: not a readable usjax train state ({type(e).__name__})") from None
  encoder = build_encoder(meta["model"])
  shapes = jax.eval_shape(lambda: encoder.init(jax.random.key(0), jnp.zeros(
      (1, image_size, image_size, channels)), train=False))
  target = {k: {"encoder": shapes[k]} for k in ("params", "batch_stats") if k in shapes}
  flat = lambda tree: {
      "/".join(str(getattr(k, "key", k)) for k in p): tuple(getattr(v, "shape", ())) for p, v in jax.tree_util.
      tree_leaves_with_path(tree)
  }
  have = flat(stored)
  for name, shape in flat(target).items():
    if have.get(name) != shape:
      raise ProbeError(f"{ck}: {name} is {have.get(name, 'missing')}, the encoder of its meta expects {shape} "
                       f"(channels={channels}: a wrong channels override?)")
  got = checkpoint.restore_on_one_device(ck, target)
  return encoder_variables(got), meta, ck
