"""Plots of the study report: Dice vs label fraction, loss curves, segmentation overlays.

Pure rendering of numbers `usjax.analysis` has already computed (it calls these from `write_report`), so this module
does no statistics and imports nothing from usjax. matplotlib is used here only, imported when the first figure is
drawn.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np


def _figure(ncols: int = 1, nrows: int = 1, size=(6, 4)):
  from matplotlib.figure import Figure  # no pyplot: no global backend or state, nothing to close
  fig = Figure(figsize=(size[0] * ncols, size[1] * nrows))
  return fig, fig.subplots(nrows, ncols, squeeze=False)


def _save(fig, path: str, ax=None, empty: str = "") -> str:
  if empty:
    ax.text(0.5, 0.5, empty, ha="center", va="center", transform=ax.transAxes)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  return path


def plot_label_curves(curves: Mapping[str, list[dict]], path: str) -> str:
  """Dice vs label fraction with 95% CI bars: one line per name in `curves`, each a list of points with
  label_fraction, dice, dice_lo and dice_hi (analysis.group_stats rows)."""
  fig, axes = _figure()
  ax = axes[0, 0]
  for name, pts in curves.items():
    pts = sorted(pts, key=lambda s: s["label_fraction"])
    x, y = [s["label_fraction"] for s in pts], np.array([s["dice"] for s in pts])
    err = np.abs(np.array([[s["dice_lo"] for s in pts], [s["dice_hi"] for s in pts]]) - y)
    ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=name)
  if curves:
    ax.set_xticks(sorted({s["label_fraction"] for pts in curves.values() for s in pts}))
    ax.legend(fontsize=8)
  ax.set(xlabel="labelled training images (%)", ylabel="test Dice", title="Dice vs label fraction (95% CI)")
  ax.grid(alpha=0.3)
  return _save(fig, path, ax, "" if curves else "no finished runs")


def plot_loss_curves(histories: dict[str, list[dict]], path: str, title: str = "training loss", key: str = "loss",
                     ylabel: str = "loss") -> str:
  """One line per run (`key` of each history row against its step); a legend only while it stays readable."""
  fig, axes = _figure()
  ax = axes[0, 0]
  curves = {
      n: [(h["step"], h[key])
          for h in hist or []
          if "step" in h and h.get(key) is not None]
      for n, hist in histories.items()
  }
  for name, pts in ((n, p) for n, p in curves.items() if p):
    ax.plot(*zip(*pts), label=name, lw=1)
  drawn = sum(bool(p) for p in curves.values())
  if 0 < drawn <= 12:
    ax.legend(fontsize=7)
  ax.set(xlabel="step", ylabel=ylabel, title=title)
  ax.grid(alpha=0.3)
  return _save(fig, path, ax, "" if drawn else f"no {key} history")


def plot_overlays(images, masks, preds, titles, path: str, ncols: int = 4) -> str:
  """Test images with the ground-truth contour (green) and the predicted contour (red)."""
  ncols = max(1, min(ncols, len(images)))
  fig, axes = _figure(ncols, max(1, math.ceil(len(images) / ncols)), size=(3, 3))
  for ax in axes.ravel():
    ax.axis("off")
  for ax, img, m, p, t in zip(axes.ravel(), images, masks, preds, titles):
    img = np.asarray(img, float)
    img = img[..., 0] if img.ndim == 3 and img.shape[-1] == 1 else img
    ax.imshow((img - img.min()) / max(np.ptp(img), 1e-9), cmap="gray")
    for mask, color in ((m, "lime"), (p, "red")):
      mask = np.asarray(mask).reshape(img.shape[:2]).astype(float)
      if 0 < mask.sum() < mask.size:
        ax.contour(mask, levels=[0.5], colors=color, linewidths=1)
    ax.set_title(str(t), fontsize=8)
  return _save(fig, path)


def plot_pairs(pairs: list[tuple[np.ndarray, np.ndarray, str]], path: str, ncols: int = 4) -> str:
  """A contact sheet: each pair of grey images side by side under its title (e.g. the near-duplicate borderline
  pairs of `launch/duplicates.py`, titled with their similarity)."""
  nrows = max(1, math.ceil(len(pairs) / ncols))
  fig, axes = _figure(2 * ncols, nrows, size=(1.6, 1.9))
  for ax in axes.ravel():
    ax.axis("off")
  for k, (a, b, title) in enumerate(pairs):
    row, col = divmod(k, ncols)
    for side, img in enumerate((a, b)):
      axes[row, 2 * col + side].imshow(img, cmap="gray", vmin=0, vmax=255)
    axes[row, 2 * col].set_title(title, fontsize=7, loc="left")
  return _save(fig, path, axes[0, 0], "" if pairs else "no pairs")
