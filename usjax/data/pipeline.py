"""grain pipelines: prepared sources -> shuffled, mixed, per-process, exactly-sized uint8 batches.

The host side only decodes, resizes to `image_size` and batches; random augmentation runs on the accelerator
(`usjax.augment`, inside the jitted step), so workers stay cheap and the two contrastive views come from one
image in device memory. Each process reads its own shard (`jax.process_index()`), and every batch holds exactly
`global_batch // process_count` images, so the global batch is exact. Iterators are grain `DatasetIterator`s:
`get_state()` / `set_state()` make the input position part of a checkpoint.

Aspect handling (`config.data.aspect`): 'pad' (default) pads the shorter side with black to a square, keeping the
whole field of view and the true lesion shape; 'stretch' resizes non-uniformly; 'crop' takes the centred square.
"""
from __future__ import annotations

import math
import signal

import grain
import jax
import numpy as np
from PIL import Image

from usjax.data import DataError, sources


def to_square(img: np.ndarray, size: int, aspect: str, resample) -> np.ndarray:
  """[H, W, C] uint8 -> [size, size, C] uint8 with the documented aspect handling."""
  h, w, c = img.shape
  if aspect == "pad" and h != w:
    s = max(h, w)
    out = np.zeros((s, s, c), img.dtype)
    out[(s - h) // 2:(s - h) // 2 + h, (s - w) // 2:(s - w) // 2 + w] = img
    img = out
  elif aspect == "crop" and h != w:
    s = min(h, w)
    img = img[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
  elif aspect not in ("pad", "crop", "stretch"):
    raise DataError(f"config.data.aspect must be 'pad', 'stretch' or 'crop', got {aspect!r}")
  if img.shape[:2] == (size, size):
    return img
  chans = [np.asarray(Image.fromarray(img[..., k]).resize((size, size), resample)) for k in range(c)]
  return np.stack(chans, axis=-1)


def to_channels(img: np.ndarray, channels: int) -> np.ndarray:
  """Grayscale ultrasound models see natural images as luminance; RGB models see grayscale repeated."""
  c = img.shape[-1]
  if c == channels:
    return img
  if c == 3 and channels == 1:
    return (img.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32))[..., None].round().astype(np.uint8)
  if c == 1 and channels == 3:
    return np.repeat(img, 3, axis=-1)
  raise DataError(f"cannot turn {c}-channel images into config.data.channels={channels}")


class Preprocess(grain.transforms.Map):
  """Decoded example -> {'image': [S,S,C] uint8, ('mask': [S,S,1] uint8 in {0,1})}."""
  def __init__(self, size: int, channels: int, aspect: str, with_mask: bool):
    self.size, self.channels, self.aspect, self.with_mask = size, channels, aspect, with_mask

  def map(self, ex):
    out = {
        "image": to_square(to_channels(np.asarray(ex["image"]), self.channels), self.size, self.aspect, Image.BILINEAR)
    }
    if self.with_mask:
      m = (np.asarray(ex["mask"]) > 127).astype(np.uint8)
      out["mask"] = to_square(m, self.size, self.aspect, Image.NEAREST)
    return out


class Subset:
  """Random access to chosen indices of a source (a label-fraction subset of a training split)."""
  def __init__(self, source, indices):
    self.source, self.indices = source, np.asarray(indices)

  def __len__(self):
    return len(self.indices)

  def __getitem__(self, i):
    return self.source[int(self.indices[i])]


def label_fraction_subset(name: str, data_cfg):
  """The nested, stratified `label_fraction`% training subset recorded in the prepared data."""
  source = sources.open_split(name, "train", data_cfg)
  fraction = data_cfg.label_fraction
  if fraction == 100:
    return source
  if fraction not in (10, 25, 50):
    raise DataError(f"config.data.label_fraction must be 100, 50, 25 or 10, got {fraction}")
  import tensorflow_datasets as tfds
  skip = {k: tfds.decode.SkipDecoding() for k in ("image", "mask")}  # read the labels, not the pixels
  light = sources.open_split(name, "train", data_cfg, decoders=skip)
  return Subset(source, [i for i in range(len(light)) if int(light[i]["label_fraction"]) <= fraction])


def local_batch_size(global_batch: int) -> int:
  pc = jax.process_count()
  if global_batch % pc or global_batch % jax.device_count():
    raise DataError(f"config.batch_size={global_batch} must be a multiple of the device count "
                    f"({jax.device_count()}) and of the process count ({pc})")
  return global_batch // pc


def _quiet_worker(index: int, count: int) -> None:
  """Worker processes ignore Ctrl-C, which the terminal sends to the whole process group: the main process
  saves at the next step boundary and then shuts them down (`train.fit` closes the iterator), instead of each
  worker dying with a traceback and leaving its shared-memory buffers behind."""
  del index, count
  signal.signal(signal.SIGINT, signal.SIG_IGN)


def _to_iter(ds: grain.MapDataset, num_workers: int):
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4))
  if num_workers > 0:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers), worker_init_fn=_quiet_worker)
  return it


def train_dataset(srcs, weights, data_cfg, global_batch: int, seed: int, with_mask: bool) -> grain.IterDataset:
  """Infinite shuffled mixture of `srcs` -> exact per-process batches. Iterate with `iter()`."""
  parts = [grain.MapDataset.source(s).shuffle(seed=seed + k).repeat() for k, s in enumerate(srcs)]
  ds = parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, weights)
  ds = ds[jax.process_index()::jax.process_count()]
  ds = ds.map(Preprocess(data_cfg.image_size, data_cfg.channels, data_cfg.aspect, with_mask))
  ds = ds.batch(local_batch_size(global_batch), drop_remainder=True)
  return _to_iter(ds, data_cfg.num_workers)


def pretrain_dataset(data_cfg, global_batch: int, seed: int) -> grain.IterDataset:
  names, weights = sources.parse_sources(data_cfg.pretrain_sources, data_cfg.pretrain_weights)
  srcs = [sources.open_split(n, data_cfg.pretrain_split, data_cfg) for n in names]
  return train_dataset(srcs, weights, data_cfg, global_batch, seed, with_mask=False)


def finetune_dataset(data_cfg, global_batch: int, seed: int) -> tuple[grain.IterDataset, int]:
  """Training batches of image+mask from the label-fraction subset; also returns the subset's size."""
  src = label_fraction_subset(data_cfg.finetune_source, data_cfg)
  if len(src) == 0:
    raise DataError(f"source {data_cfg.finetune_source!r}: the {data_cfg.label_fraction}% training subset is empty")
  return train_dataset([src], [1.0], data_cfg, global_batch, seed, with_mask=True), len(src)


def eval_batches(data_cfg, split: str, global_batch: int):
  """One pass over `split` in order, in fixed-size batches padded with `index=-1` images (no recompiles).

  Every process yields the same number of batches, as multi-host jit requires; `index` (the position in the
  split) survives the cross-host gather, so per-image results can be matched to ids and classes on any host.
  """
  src = sources.open_split(data_cfg.finetune_source, split, data_cfg)
  prep = Preprocess(data_cfg.image_size, data_cfg.channels, data_cfg.aspect, with_mask=True)
  local = local_batch_size(global_batch)
  pi, pc = jax.process_index(), jax.process_count()
  mine = list(range(pi, len(src), pc))
  n_batches = math.ceil(math.ceil(len(src) / pc) / local)
  s, c = data_cfg.image_size, data_cfg.channels
  for b in range(n_batches):
    idx = mine[b * local:(b + 1) * local]
    batch = {
        "image": np.zeros((local, s, s, c), np.uint8), "mask": np.zeros((local, s, s, 1), np.uint8), "index": np.full(
            (local,), -1, np.int32)
    }
    for k, i in enumerate(idx):
      ex = prep.map(src[i])
      batch["image"][k], batch["mask"][k], batch["index"][k] = ex["image"], ex["mask"], i
    yield batch


def split_labels(data_cfg, split: str) -> tuple[list[str], list[str]]:
  """(ids, class names) of every example of `split`, read without decoding pixels."""
  import tensorflow_datasets as tfds
  builder = sources.builder_for(data_cfg.finetune_source, data_cfg)
  skip = {k: tfds.decode.SkipDecoding() for k in ("image", "mask")}
  src = sources.open_split(data_cfg.finetune_source, split, data_cfg, decoders=skip)
  names = builder.info.features["label"].names
  ids, labels = [], []
  for i in range(len(src)):
    ex = src[i]
    ids.append(ex["id"].decode() if isinstance(ex["id"], bytes) else str(ex["id"]))
    labels.append(names[int(ex["label"])])
  return ids, labels
