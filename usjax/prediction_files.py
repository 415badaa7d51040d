"""What prediction writes (`usjax.predict`): masks and overlays as PNG files, into an output folder that a failed
prediction takes back."""
from __future__ import annotations

import contextlib
import os
import re
import shutil

import numpy as np
from PIL import Image

from usjax.data import DataError

SKIP = re.compile(r"_(mask(_\d+)?|overlay)$")  # ground-truth masks beside their images, and our own outputs


# ---------------------------------------------------------------------------------------------------- images
def _edge(mask: np.ndarray, width: int) -> np.ndarray:
  from scipy import ndimage
  return mask & ~ndimage.binary_erosion(mask, iterations=width) if mask.any() else mask


def overlay(image: np.ndarray, pred: np.ndarray, true: np.ndarray | None = None, alpha: float = 0.35) -> np.ndarray:
  """[H, W, 3] uint8: the image, the prediction tinted and outlined in red, the ground truth outlined in green."""
  rgb = np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image[..., :3]
  out = rgb.astype(np.float32)
  out[pred] = (1 - alpha) * out[pred] + alpha * np.array([255, 0, 0], np.float32)
  width = max(1, round(min(pred.shape) / 200))  # a contour still visible on a 500-pixel scan
  if true is not None:
    out[_edge(true, width)] = (0, 255, 0)
  out[_edge(pred, width)] = (255, 0, 0)
  return out.round().astype(np.uint8)


def write_png(path: str, arr: np.ndarray) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(np.ascontiguousarray(arr)).save(path)


def write_mask_and_overlay(out_dir: str, rel_stem: str, image, pred, true=None) -> dict:
  """`<rel_stem>_mask.png` (0/255) and `<rel_stem>_overlay.png` under `out_dir` -> their relative paths."""
  mask_rel, overlay_rel = f"{rel_stem}_mask.png", f"{rel_stem}_overlay.png"
  write_png(os.path.join(out_dir, mask_rel), pred.astype(np.uint8) * 255)
  write_png(os.path.join(out_dir, overlay_rel), overlay(image, pred, true))
  return {"mask": mask_rel, "overlay": overlay_rel}


def output_stems(paths: list[str], folder: str) -> list[str]:
  """Relative path without extension per image; 'a.png' beside 'a.jpg' become 'a_png' and 'a_jpg'."""
  stems = [os.path.splitext(os.path.relpath(p, folder))[0] for p in paths]
  clash = {s for s in stems if stems.count(s) > 1}
  return [s if s not in clash else os.path.relpath(p, folder).replace(".", "_") for s, p in zip(stems, paths)]


# ---------------------------------------------------------------------------------------------------- folders
def check_out_dir(out_dir: str, folder: str) -> str:
  if os.path.realpath(out_dir) == os.path.realpath(folder):
    raise DataError(f"{out_dir}: the output folder must differ from the input folder (masks would overwrite it)")
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise DataError(f"{out_dir}: exists and is not a folder")
  return out_dir


def _listing(root: str) -> set[str]:
  return {os.path.join(d, n) for d, dirs, files in os.walk(root) for n in dirs + files}


@contextlib.contextmanager
def taken_back_on_failure(out_dir: str, folder: str):
  """Creates `out_dir` for one prediction and, if the prediction fails, takes back what it added.

  A folder this call created goes entirely (with any parents it created), so bad input never leaves an empty or
  half-filled output folder; in a folder that was there before, the files and sub-folders added are removed and
  what was there stays (files it overwrote keep their new contents).
  """
  check_out_dir(out_dir, folder)
  created, top = None, os.path.abspath(out_dir)
  while not os.path.exists(top):
    created, top = top, os.path.dirname(top)
  before = _listing(out_dir) if created is None else set()
  os.makedirs(out_dir, exist_ok=True)
  try:
    yield out_dir
  except BaseException:
    if created is not None:
      shutil.rmtree(created, ignore_errors=True)
    else:
      for d, dirs, files in os.walk(out_dir, topdown=False):
        for name in files + dirs:
          path = os.path.join(d, name)
          if path in before:
            continue
          try:
            os.rmdir(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)
          except OSError:  # a sub-folder that still holds older files
            pass
    raise
