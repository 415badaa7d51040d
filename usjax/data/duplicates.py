"""Near-duplicate images: the same scan saved twice, re-cropped, rescaled, re-exposed or with marks drawn on it.

BUSI holds many (Pawlowska et al., Data in Brief 2023): split at random, such pairs land on both sides of
train / test and the test split scores images the model trained on. Every image is reduced to a fingerprint, a
32x32 grey thumbnail standardised to zero mean and unit norm, so a brightness or contrast change (an affine change
of intensity) leaves it unchanged and a rescale nearly so; thin drawn marks (calipers, text) move it little. A
re-crop is caught by also fingerprinting sub-windows of each image (90% and 80% of each side, at 9 positions) and
comparing them with the other image whole. The similarity of two images is the largest of these correlations.

Pairs at or above THRESHOLD are the same scan; groups are their connected components (union-find), and
`folders.ManualBuilder` keeps each group inside one split or fold. The threshold was read off the contact sheet
of borderline pairs that `launch/duplicates.py` draws on BUSI: above 0.95 the pairs were the same scan (with or
without calipers and text) or consecutive frames of one lesion; just below it (0.949, 0.943, 0.941) scans of
different lesions and patients with a similar layout appear (a bright band over a dark lower half correlates
strongly at 32x32). README: Data, near-duplicates, has the counts and the sheet.
"""
from __future__ import annotations

import collections
import dataclasses
from collections.abc import Sequence

import numpy as np
from PIL import Image

THRESHOLD = 0.95
SIZE = 32
WINDOW_SCALES = (0.9, 0.8)
_POSITIONS = (0.0, 0.5, 1.0)


def _fingerprint(img: Image.Image) -> np.ndarray:
  a = np.asarray(img.resize((SIZE, SIZE), Image.BILINEAR), np.float32).ravel()
  a = a - a.mean()
  return a / max(float(np.linalg.norm(a)), 1e-6)


def fingerprints(img: Image.Image) -> np.ndarray:
  """[1 + windows, SIZE*SIZE]: the whole image's fingerprint first, then its sub-windows'."""
  img = img.convert('L')
  w, h = img.size
  out = [_fingerprint(img)]
  for s in WINDOW_SCALES:
    cw, ch = max(1, round(w * s)), max(1, round(h * s))
    for fy in _POSITIONS:
      for fx in _POSITIONS:
        x0, y0 = round((w - cw) * fx), round((h - ch) * fy)
        out.append(_fingerprint(img.crop((x0, y0, x0 + cw, y0 + ch))))
  return np.stack(out)


def read_fingerprints(path: str) -> np.ndarray:
  with Image.open(path) as img:
    img.draft('L', (4 * SIZE, 4 * SIZE))  # JPEG: decode at a reduced size, enough for a 32-px thumbnail
    return fingerprints(img)


def similar_pairs(prints: np.ndarray, floor: float, block: int = 256) -> list[tuple[int, int, float]]:
  """(i, j, similarity) for every pair i < j at or above `floor`; `prints` is [n, 1 + windows, d].

  Similarity: the largest correlation of one image whole with the other whole or with any of its windows, in
  either direction. The windows are compared in row blocks, so memory stays at one n x n matrix.
  """
  n = len(prints)
  whole = prints[:, 0]
  best = np.empty((n, n), np.float32)  # best[i, j]: i whole or any window of i, against j whole
  for start in range(0, n, block):
    best[start:start + block] = np.einsum('bkd,md->bmk', prints[start:start + block], whole).max(-1)
  sim = np.maximum(best, best.T)
  i, j = np.nonzero(np.triu(sim >= floor, 1))
  return [(int(a), int(b), float(sim[a, b])) for a, b in zip(i, j)]


def union_find(n: int, pairs) -> list[int]:
  """Group of each of `n` items, the group named by its smallest member; `pairs` are (i, j, ...) links."""
  parent = list(range(n))

  def root(i):
    while parent[i] != i:
      parent[i] = parent[parent[i]]
      i = parent[i]
    return i

  for i, j, *_ in pairs:
    a, b = root(i), root(j)
    if a != b:
      parent[max(a, b)] = min(a, b)
  return [root(i) for i in range(n)]


@dataclasses.dataclass
class Duplicates:
  """What `find` learned about a list of images (all indices into that list)."""
  pairs: list[tuple[int, int, float]]  # at or above the threshold
  near: list[tuple[int, int, float]]  # every pair scored, down to the contact sheet's floor
  group: list[int]  # group of each image (its smallest member's index)
  conflicts: set[int]  # groups whose members carry different labels
  threshold: float

  def summary(self, labels: Sequence[int], class_names: Sequence[str]) -> dict:
    """Counts per class: pairs, groups of 2 or more, images in them; conflicting groups and their images."""
    members = collections.defaultdict(list)
    for i, g in enumerate(self.group):
      members[g].append(i)
    multi = {g: m for g, m in members.items() if len(m) > 1}
    per_class = {}
    for c, name in enumerate(class_names):
      per_class[name] = {
          'images': sum(1 for lb in labels if lb == c),
          'pairs': sum(1 for i, j, _ in self.pairs if labels[i] == c and labels[j] == c),
          'groups': sum(1 for m in multi.values() if all(labels[i] == c for i in m)),
          'images_in_groups': sum(len(m) for m in multi.values() if all(labels[i] == c for i in m)),
      }
    return {
        'threshold': self.threshold, 'images': len(self.group), 'pairs': len(self.pairs), 'groups': len(multi),
        'images_in_groups': sum(len(m) for m in multi.values()),
        'images_after_dedup': len(members), 'per_class': per_class,
        'conflicts': [sorted(members[g]) for g in sorted(self.conflicts)],
        'conflict_images': sum(len(members[g]) for g in self.conflicts),
    }


def find(prints: np.ndarray, labels: Sequence[int], threshold: float = THRESHOLD,
         sheet_floor: float | None = None) -> Duplicates:
  """Pairs, groups and label conflicts of the fingerprinted images (`read_fingerprints`, stacked)."""
  if not 0 < threshold <= 1:
    raise ValueError(f'duplicate threshold must be in (0, 1], got {threshold}')
  floor = min(threshold, threshold if sheet_floor is None else sheet_floor)
  near = similar_pairs(np.asarray(prints, np.float32), floor) if len(prints) > 1 else []
  pairs = [p for p in near if p[2] >= threshold]
  group = union_find(len(prints), pairs)
  by_group = collections.defaultdict(set)
  for g, lb in zip(group, labels):
    by_group[g].add(lb)
  return Duplicates(pairs=pairs, near=near, group=group, conflicts={g for g, s in by_group.items() if len(s) > 1},
                    threshold=threshold)
