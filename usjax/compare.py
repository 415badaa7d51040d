"""Two results folders of the same cells, compared per image: what one change (bf16 compute, the presence gate,
another recipe) did to the same fine-tunes.

    python launch/compare.py results/study_cpu results/study_cpu_bf16

Runs are paired by workdir name (a grid names a cell by its fields: the same pre-training, fraction, fold and
seed), then by test image id. For each label fraction, three paired differences b - a with their bootstrap CI
over runs and images (`usjax.bootstrap.paired_difference`): Dice over all images, Dice over lesion images, and the
share of normal scans given a false lesion. Beside them, the run-to-run spread of a's Dice (the largest minus the
smallest run mean), the yardstick a difference that should be "within the seed spread" is read against.
"""
from __future__ import annotations

import json
import math
import os

import numpy as np

from usjax import UsjaxError, bootstrap
from usjax.analysis import load_per_image
from usjax.claims import fmt, markdown

# (name, per-image value from a per_image.json row or None where the image does not count)
MEASURES = (
    ("dice", lambda r: r["dice"]),
    ("dice_lesion", lambda r: r["dice"] if r.get("lesion", True) else None),
    ("false_lesion_on_normal", lambda r: None if r.get("lesion", True) else float(r["dice"] < 1.0)),
)


def paired_runs(a_dir: str, b_dir: str) -> list[tuple[str, dict, list[dict], list[dict]]]:
  """(run name, b's summary, a's per-image rows, b's) for each run finished with per-image scores in both."""
  out = []
  for name in sorted(os.listdir(b_dir)) if os.path.isdir(b_dir) else ():
    a_rows, b_rows = load_per_image(os.path.join(a_dir, name)), load_per_image(os.path.join(b_dir, name))
    if not (a_rows and b_rows):
      continue
    path = os.path.join(b_dir, name, "summary.json")
    try:
      with open(path) as f:
        summary = json.load(f)
    except (OSError, ValueError) as e:
      raise UsjaxError(f"{path}: unreadable ({type(e).__name__}), beside a per_image.json") from None
    if isinstance(summary, dict):
      out.append((name, summary, a_rows, b_rows))
  return out


def compare(a_dir: str, b_dir: str, n_boot: int = 2000, seed: int = 0) -> list[dict]:
  """One row per (label fraction, measure): runs and images paired, a's and b's means, the difference b - a with
  its 95% CI, and a's run-to-run spread of that measure."""
  for d in (a_dir, b_dir):
    if not os.path.isdir(d):
      raise UsjaxError(f"{d}: no such results folder")
  pairs = paired_runs(a_dir, b_dir)
  if not pairs:
    raise UsjaxError(f"{b_dir}: no finished run with per_image.json that {a_dir} also has")
  rows = []
  for fraction in sorted({p[1].get("label_fraction") for p in pairs}, key=lambda f: -(f or 0)):
    group = [p for p in pairs if p[1].get("label_fraction") == fraction]
    for measure, value in MEASURES:
      a_maps, b_maps = [], []
      for _, _, a_rows, b_rows in group:
        a_map = {r["id"]: v for r in a_rows if (v := value(r)) is not None}
        b_map = {r["id"]: v for r in b_rows if (v := value(r)) is not None}
        ids = sorted(set(a_map) & set(b_map))
        a_maps.append({i: a_map[i] for i in ids})
        b_maps.append({i: b_map[i] for i in ids})
      n_images = sum(len(m) for m in a_maps)
      if not n_images:
        continue
      d = bootstrap.paired_difference(a_maps, b_maps, n_boot, seed)
      run_means = [np.mean(list(m.values())) for m in a_maps if m]
      rows.append({
          "label_fraction": fraction, "measure": measure, "runs": len(group), "images": n_images,
          "a": float(np.mean(run_means)), "b": float(np.mean([np.mean(list(m.values())) for m in b_maps if m])),
          "diff": d["diff"], "lo": d["lo"], "hi": d["hi"],
          "a_spread": float(max(run_means) - min(run_means)) if len(run_means) > 1 else math.nan
      })
  return rows


def to_markdown(rows: list[dict], a_name: str, b_name: str) -> str:
  header = ["labels", "measure", "runs", "images", a_name, b_name, "Δ (b - a) [95% CI]", f"run spread of {a_name}"]
  lines = [[
      f"{r['label_fraction']}%", r["measure"], str(r["runs"]), str(r["images"]), fmt(r["a"]), fmt(r["b"]),
      f"{r['diff']:+.3f} [{r['lo']:+.3f}, {r['hi']:+.3f}]", fmt(r["a_spread"])
  ] for r in rows]
  return markdown(header, lines)
