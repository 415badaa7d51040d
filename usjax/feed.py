"""Training batches for a stacked group (usjax.stacked) from one decoded copy of the training split.

Each run of a group would otherwise iterate its own grain pipeline (`pipeline.finetune_dataset`: its label-fraction
subset, shuffled with its seed, every PNG decoded and resized again for every run). Augmentation runs on the
device, so the host's work is only which images and in what order: `SharedSplit` decodes the images the group
uses once, and each run's `Feed` gives, step by step, the rows its own pipeline would have given.

That order is grain's: `MapDataset.shuffle(seed).repeat()` permutes epoch `e` of an `n`-image subset with
`index_shuffle(i, n - 1, seed + e, rounds=4)`, a 4-round Simon cipher on a block of at least 16 bits walked until
the value falls below `n` (grain/_src/python/experimental/index_shuffle/index_shuffle.cc). Called per image, as
grain does, that walk costs about 1.7 ms an image for the 44-image 10% subset of BUSI (a 65,536-value block holds
few values below 44); `epoch_order` computes a whole epoch at once with numpy (the cipher over the block, then
pointer jumping), the same permutation in a few milliseconds. tests/test_stacked.py checks it against grain.
"""
from __future__ import annotations

import functools
import math

import jax
import numpy as np

from usjax.data import DataError, pipeline, sources

_M32 = 0xFFFFFFFF


def seed_seq(seed: int, n: int) -> list[int]:
  """`std::seed_seq{seed}.generate` of `n` 32-bit words, as the C++ standard defines it (grain's round keys)."""
  v, b = [seed & _M32], [0x8B8B8B8B] * n
  t = 11 if n >= 623 else 7 if n >= 68 else 5 if n >= 39 else 3 if n >= 7 else (n - 1) // 2
  p, s = (n - t) // 2, len(v)
  q = p + t
  mix = lambda x: x ^ (x >> 27)
  for k in range(max(s + 1, n)):
    r1 = 1664525 * mix(b[k % n] ^ b[(k + p) % n] ^ b[(k - 1) % n]) & _M32
    r2 = (r1 + (s if k == 0 else k % n + v[k - 1] if k <= s else k % n)) & _M32
    b[(k + p) % n] = (b[(k + p) % n] + r1) & _M32
    b[(k + q) % n] = (b[(k + q) % n] + r2) & _M32
    b[k % n] = r2
  for k in range(max(s + 1, n), max(s + 1, n) + n):
    r3 = 1566083941 * mix((b[k % n] + b[(k + p) % n] + b[(k - 1) % n]) & _M32) & _M32
    r4 = (r3 - k % n) & _M32
    b[(k + p) % n] ^= r3
    b[(k + q) % n] ^= r4
    b[k % n] = r4
  return b


def simon(x: np.ndarray, keys: list[int], w: int) -> np.ndarray:
  """grain's Simon rounds on blocks of 2*w bits (uint64 values), two round keys a pass."""
  mask = np.uint64((1 << w) - 1)
  rotl = lambda a, r: ((a << np.uint64(r)) | (a >> np.uint64(w - r))) & mask
  f = lambda a: (rotl(a, 1) & rotl(a, 8)) ^ rotl(a, 2)
  left, right = (x >> np.uint64(w)) & mask, x & mask
  for i in range(0, len(keys), 2):
    left = left ^ f(right) ^ np.uint64(keys[i] & int(mask))
    right = right ^ f(left) ^ np.uint64(keys[i + 1] & int(mask))
  return (left << np.uint64(w)) | right


@functools.lru_cache(maxsize=256)  # runs of one fraction share epochs: seed s at epoch e+1 is seed s+1 at epoch e
def epoch_order(n: int, seed: int) -> np.ndarray:
  """[index_shuffle(i, n - 1, seed, 4) for i in range(n)]: one epoch of grain's shuffle of `n` items."""
  if n == 1:
    return np.zeros(1, np.int64)
  bits = math.ceil(math.log2(n - 1)) if n > 2 else 0
  bits = max(bits + bits % 2, 16)
  keys = seed_seq(seed % 2**32, 4)
  if bits <= 20:  # the cipher over the whole block, then each value's walk to one below n by pointer jumping
    nxt = simon(np.arange(1 << bits, dtype=np.uint64), keys, bits // 2).astype(np.int64)
    while (nxt[:n] >= n).any():
      nxt = np.where(nxt >= n, nxt[nxt], nxt)
    return nxt[:n]
  out, todo, x = np.empty(n, np.int64), np.arange(n), np.arange(n, dtype=np.uint64)
  while len(todo):  # large n: few values walk more than once
    x = simon(x, keys, bits // 2)
    done = x < n
    out[todo[done]] = x[done]
    todo, x = todo[~done], x[~done]
  return out


def subset_indices(data_cfg) -> np.ndarray:
  """Positions in the training split of the `label_fraction`% subset `pipeline.finetune_dataset` trains on."""
  src = pipeline.label_fraction_subset(data_cfg.finetune_source, data_cfg)
  if len(src) == 0:
    raise DataError(f"source {data_cfg.finetune_source!r}: the {data_cfg.label_fraction}% training subset is empty")
  return np.asarray(src.indices) if isinstance(src, pipeline.Subset) else np.arange(len(src))


class SharedSplit:
  """The training-split images a group's runs use, decoded and preprocessed once (`pipeline.Preprocess`, as the
  grain pipeline does) into host arrays: image [N, S, S, C] and mask [N, S, S, 1], uint8."""
  def __init__(self, data_cfg, indices):
    self.rows = {i: k for k, i in enumerate(sorted({int(i) for i in indices}))}  # split position -> row
    src = sources.open_split(data_cfg.finetune_source, "train", data_cfg)
    prep = pipeline.Preprocess(data_cfg.image_size, data_cfg.channels, data_cfg.aspect, with_mask=True)
    s, c = data_cfg.image_size, data_cfg.channels
    self.image = np.zeros((len(self.rows), s, s, c), np.uint8)
    self.mask = np.zeros((len(self.rows), s, s, 1), np.uint8)
    for i, k in self.rows.items():
      ex = prep.map(src[i])
      self.image[k], self.mask[k] = ex["image"], ex["mask"]


class Feed:
  """One run's batches as rows of a SharedSplit, in the order of `pipeline.train_dataset` for one source:
  `shuffle(seed).repeat()`, then this process's share (`[process_index::process_count]`), then whole batches."""
  def __init__(self, shared: SharedSplit, indices, seed: int, global_batch: int):
    self.rows = np.array([shared.rows[int(i)] for i in indices])
    self.seed, self.local, self.batches = seed, pipeline.local_batch_size(global_batch), 0

  def next_rows(self) -> np.ndarray:
    pi, pc, n = jax.process_index(), jax.process_count(), len(self.rows)
    flat = pi + pc * (self.batches * self.local + np.arange(self.local))  # positions in the repeated, shuffled set
    self.batches += 1
    epochs, at = np.divmod(flat, n)
    return self.rows[[epoch_order(n, self.seed + int(e))[i] for e, i in zip(epochs, at)]]


def group_batch(shared: SharedSplit, feeds) -> tuple[np.ndarray, np.ndarray]:
  """The next batch of every run, stacked: (image [runs, batch, S, S, C], mask [runs, batch, S, S, 1])."""
  rows = np.stack([f.next_rows() for f in feeds])
  return shared.image[rows], shared.mask[rows]
