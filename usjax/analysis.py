"""Analysis stage: finished fine-tuning runs -> the study's evidence (results table, bootstrap CIs, claims, plots).

Grouping and claims are pure functions of rows and per-image scores, with the bootstrap in `usjax.bootstrap`;
`collect`, the writers and `write_report` do the file I/O; `usjax.plots` draws the figures. Everything tolerates a
half-finished grid: unfinished cells are skipped and a claim whose arms are missing says "not run", so the report
can be rebuilt at any moment.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
from collections.abc import Mapping

import numpy as np

from usjax import bootstrap
from usjax import metrics
from usjax import plots
from usjax import pretrain_analysis
from usjax import storage
from usjax.claims import REPLICATES, arm_name, claims as claims_of_arms, fmt, groups, hashable, markdown
from usjax.claims import claims_markdown  # noqa: F401 (the report's claims table, also named here)
from usjax.data import sources

RUN_FIELDS = ("num_images", "train_images", "steps", "images_per_sec")  # what a run measured besides its scores


# ---------------------------------------------------------------------------------------------------- reading
def _read_json(path: str):
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def load_per_image(workdir: str) -> list[dict] | None:
  rows = _read_json(os.path.join(workdir, "per_image.json"))
  return rows if isinstance(rows, list) and rows else None


def metric_columns(classes=None) -> list[str]:
  """The metric columns of results.csv, in order: each registered per-image metric (`usjax.metrics`) with its
  mean over lesion images and its count of images without a value, the per-class means (of `classes`, default:
  those of every registered data source), the split-level metrics, then what the run measured."""
  classes = sources.class_names() if classes is None else classes
  per_image = [
      k for name, m in metrics.PER_IMAGE.items()
      for k in (name, m.lesion and f"{name}_lesion", m.undefined and f"{name}_undefined") if k
  ]
  per_class = [f"{name}_{c}" for name, m in metrics.PER_IMAGE.items() if m.per_class for c in classes]
  return per_image + per_class + [k for m in metrics.PER_SPLIT.values() for k in m.keys] + list(RUN_FIELDS)


def collect(cells: list[tuple[dict, str]]) -> list[dict]:
  """One row per finished run: the cell's fields, then its summary metrics, then its workdir.

  A cell without summary.json has not finished and is skipped. Fields the grid did not vary (so the cell omits
  them) are taken from the summary where it has them, so pairing by pre-training and label fraction still works.
  Per-class means are those of the classes its data source names (`usjax.data.sources`; a summary that names no
  source: those of every registered source). Metrics that may have no value on an image (HD95) get a count of
  those images from per_image.json, and their mean from it where the summary lacks one.
  """
  rows = []
  for fields, workdir in cells:
    summary = _read_json(os.path.join(workdir, "summary.json"))
    if not isinstance(summary, dict) or summary.get("task", "finetune") != "finetune":
      continue
    row = dict(fields)
    row.setdefault("pretrain", str(summary["init_from"]) if summary.get("init_from") else "none")
    if "label_fraction" in summary:
      row.setdefault("label_fraction", summary["label_fraction"])
    wanted = metric_columns(sources.class_names(summary.get("source")))
    row.update({k: summary[k] for k in wanted if k in summary and k not in fields})
    per_image = load_per_image(workdir) or []
    for name, m in metrics.PER_IMAGE.items():
      if m.undefined and any(name in r for r in per_image):
        values = np.array([np.nan if r.get(name) is None else r[name] for r in per_image], float)
        if name not in row:
          mean = metrics.mean(values, undefined=True)
          row[name] = math.nan if mean is None else mean
        row[f"{name}_undefined"] = int(np.isnan(values).sum())
    row["workdir"] = workdir
    rows.append(row)
  return rows


def cell_fields(rows: list[dict]) -> list[str]:
  known = set(metric_columns())
  return list(dict.fromkeys(k for r in rows for k in r if k not in known and k != "workdir"))


def columns(rows: list[dict]) -> list[str]:
  """Stable CSV order: cell fields as the grid gave them, the metrics in a fixed order, the workdir last."""
  present = {k for r in rows for k in r}
  metric = [k for k in metric_columns() if k in present]
  return cell_fields(rows) + metric + (["workdir"] if "workdir" in present else [])


# ---------------------------------------------------------------------------------------------------- groups
def default_by(rows: list[dict]) -> tuple[str, ...]:
  """(pretrain, label_fraction) plus any other cell field the grid varies except the replicates (seed, fold), so
  arms never mix and folds and seeds pool."""
  fields = cell_fields(rows)
  varying = [k for k in fields if k not in REPLICATES and len({hashable(r.get(k)) for r in rows}) > 1]
  return tuple(dict.fromkeys([k for k in ("pretrain", "label_fraction") if k in fields] + varying))


def _scores(runs: list[dict], per_image: Mapping | None, key: str = "dice",
            lesion_only: bool = False) -> list[np.ndarray] | None:
  """Per-image scores of each run (one array per seed), or None when any run lacks them. `lesion_only` keeps the
  images whose ground truth shows a lesion (runs that did not record it give None)."""
  if not per_image or any(not per_image.get(r.get("workdir")) for r in runs):
    return None
  if lesion_only and any("lesion" not in p for r in runs for p in per_image[r["workdir"]]):
    return None
  return [
      np.array([
          np.nan if p.get(key) is None else p[key]
          for p in per_image[r["workdir"]]
          if p.get("lesion", True) or not lesion_only
      ], float)
      for r in runs
  ]


def _nanmean(values) -> float:
  v = np.array([np.nan if x is None else x for x in values], float)
  return float(np.nanmean(v)) if np.any(~np.isnan(v)) else math.nan


def group_stats(rows: list[dict], per_image: Mapping | None = None, by: tuple[str, ...] | None = None,
                n_boot: int = 2000, seed: int = 0) -> list[dict]:
  """Per group: Dice mean with a 95% CI over images and seeds (over runs when per-image scores are missing)."""
  by = tuple(by) if by is not None else default_by(rows)
  out = []
  columns = table_columns(rows)
  for desc, runs in groups(rows, by):
    scores = _scores(runs, per_image)
    values = scores or [np.array([r.get("dice", np.nan) for r in runs], float)]
    mean, lo, hi = bootstrap.bootstrap_ci(values, n_boot, seed)
    stat = {
        **desc, "n_runs": len(runs), "dice": mean, "dice_lo": lo, "dice_hi": hi,
        "ci_over": "images+seeds" if scores else "runs"
    }
    lesion = _scores(runs, per_image,
                     lesion_only=True) or [np.array([r.get("dice_lesion", np.nan) for r in runs], float)]
    stat["dice_lesion"], stat["dice_lesion_lo"], stat["dice_lesion_hi"] = bootstrap.bootstrap_ci(lesion, n_boot, seed)
    stat.update({c.key: _nanmean(r.get(c.key) for r in runs) for c in columns})
    for c in columns:  # what a number was computed from (the presence AUC: the head, or the peak probability)
      if c.source_key:
        found = {r.get(c.source_key) for r in runs if r.get(c.source_key)}
        stat[c.source_key] = found.pop() if len(found) == 1 else "mixed" if found else None
    out.append(stat)
  return out


@dataclasses.dataclass(frozen=True)
class Column:
  """A report.md column after the Dice ones: a group mean of `key`, with `digits` decimals; with `source_key`,
  what it was computed from, in brackets, named through `source_names`."""
  key: str
  header: str
  digits: int = 3
  source_key: str = ""
  source_names: Mapping | None = None

  def cell(self, stat: dict) -> str:
    if not self.source_key:
      return fmt(stat[self.key], self.digits)
    source = stat[self.source_key]
    names = {**(self.source_names or {}), "mixed": "mixed"}
    return f"{fmt(stat[self.key], self.digits)} ({names.get(source, source)})" if source else "–"


def table_columns(rows: list[dict]) -> list[Column]:
  """The registered metrics with a report header (`usjax.metrics`), in order: per-image ones, per class for the
  classes of the rows' sources whose images show a lesion (`usjax.data.sources`), split-level ones."""
  out = [Column(k, m.header, m.digits) for k, m in metrics.PER_IMAGE.items() if m.header]
  lesion_classes = [c for c in sources.class_names() if c not in sources.lesion_free_classes()]
  out += [
      Column(f"{k}_{c}", m.class_header.format(c), m.digits)
      for k, m in metrics.PER_IMAGE.items() if m.class_header
      for c in lesion_classes if any(f"{k}_{c}" in r for r in rows)
  ]
  return out + [
      Column(m.keys[0], m.header, m.digits, m.keys[1] if len(m.keys) > 1 else "", m.sources)
      for m in metrics.PER_SPLIT.values() if m.header
  ]


def _label_curves(stats: list[dict], by: tuple[str, ...]) -> dict[str, list[dict]]:
  """group_stats rows as Dice-vs-label-fraction lines: one per pre-training source (and any other varied field)."""
  lines: dict[str, list[dict]] = {}
  for s in stats if "label_fraction" in by else []:
    lines.setdefault(arm_name({k: s[k] for k in by if k != "label_fraction"}), []).append(s)
  return lines


def group_table(rows: list[dict], per_image: Mapping | None = None, by: tuple[str, ...] | None = None,
                n_boot: int = 2000, seed: int = 0) -> str:
  """Markdown table of the group means: Dice with its CIs, then the registered metrics' columns (`table_columns`):
  HD95 in pixels, FPR = share of normal images with any predicted pixel, presence AUC = how well the image-level
  lesion-presence score separates lesion from normal images, scored by the presence head's probability ('head')
  or, without one, by the image's peak foreground probability ('max p')."""
  by = tuple(by) if by is not None else default_by(rows)
  stats = group_stats(rows, per_image, by, n_boot, seed)
  columns = table_columns(rows)
  header = [*by, "n runs", "Dice mean [95% CI]", "Dice lesion images [95% CI]", *(c.header for c in columns)]
  lines = [[
      *(s[k] for k in by), s["n_runs"], f"{fmt(s['dice'])} [{fmt(s['dice_lo'])}, {fmt(s['dice_hi'])}]",
      f"{fmt(s['dice_lesion'])} [{fmt(s['dice_lesion_lo'])}, {fmt(s['dice_lesion_hi'])}]",
      *(c.cell(s) for c in columns)
  ] for s in stats]
  return markdown(header, lines)


def claims(rows: list[dict], per_image: Mapping | None = None, **options) -> list[dict]:
  """The claim rows (`usjax.claims.claims`, `options` as there) over the arms of `rows` as `default_by` groups
  them."""
  return claims_of_arms(groups(rows, default_by(rows) if rows else ("pretrain", "label_fraction")), per_image,
                        **options)


# ---------------------------------------------------------------------------------------------------- report
def _clean(x):
  """Strict JSON: NaN/inf -> null, numpy scalars -> Python."""
  if isinstance(x, (Mapping, list, tuple)):
    return {str(k): _clean(v) for k, v in x.items()} if isinstance(x, Mapping) else [_clean(v) for v in x]
  x = x.item() if isinstance(x, np.generic) else x
  return None if isinstance(x, float) and not math.isfinite(x) else x


def _write_text(path: str, text: str) -> None:
  """Atomic, so a reader polling a running grid never sees half a file; mode per the umask."""
  storage.atomic_write(path, text)


def write_csv(rows: list[dict], path: str) -> str:
  import io
  buf = io.StringIO()
  writer = csv.DictWriter(buf, fieldnames=columns(rows), restval="", extrasaction="ignore")
  writer.writeheader()
  writer.writerows({k: hashable(v) for k, v in r.items()} for r in rows)
  _write_text(path, buf.getvalue())
  return path


def pretrain_table(pretrain_runs: Mapping[str, str], stats: list[dict], floor: Mapping | None = None,
                   rows: list[dict] | None = None, pretrain_cells: Mapping[str, Mapping] | None = None) -> str:
  """What each pre-training learned beside what it gave fine-tuning: its last frozen-feature probe (balanced
  k-NN / linear accuracy per probe set), the collapse flag, whether it had flattened (the last quarter's loss
  fall and probe rise), and its Dice gain over scratch at each label fraction. `floor` is the probe of a randomly
  initialised encoder.

  The gain: the group means of the report table (`stats`) for a pre-training named by its arm; for one of
  several that make an arm (one a fold), the fine-tunes it started (`rows` matching `pretrain_cells[name]`, e.g.
  pretrain and fold) minus scratch on the same fold, paired by seed."""
  summaries = {name: _read_json(os.path.join(wd, "summary.json")) or {} for name, wd in pretrain_runs.items()}
  histories = {name: _read_json(os.path.join(wd, "history.json")) or [] for name, wd in pretrain_runs.items()}
  probes = sorted({k for s in summaries.values() for k in (s.get("probe") or {}) if k.endswith("_bacc")})
  probes += sorted(k for k in (floor or {}) if k.endswith("_bacc") and k not in probes)
  fractions = sorted({s["label_fraction"] for s in stats if "label_fraction" in s}, reverse=True)
  dice = {(s.get("pretrain"), s.get("label_fraction")): s["dice"] for s in stats}
  header = [
      "pre-training", "final loss", *probes, "collapsed", "loss fall, last 25%", "probe rise, last 25%", "flattened",
      *(f"Δ Dice @ {f}%" for f in fractions)
  ]
  lines = []
  if floor:
    lines.append([
        "random init (floor)", "–", *(fmt(floor.get(k)) for k in probes), "–", "–", "–", "–", *("0" for _ in fractions)
    ])
  for name, s in summaries.items():
    flat = pretrain_analysis.flattening(histories[name], s.get("probe_history") or [], s.get("steps") or 0)
    if pretrain_cells and name in pretrain_cells:
      gains = [_paired_gain(rows or [], pretrain_cells[name], f) for f in fractions]
    else:
      gains = [dice.get((name, f), math.nan) - dice.get(("none", f), math.nan) for f in fractions]
    lines.append([
        name,
        fmt(s.get("final_loss")), *(fmt((s.get("probe") or {}).get(k)) for k in probes),
        "yes" if s.get("collapsed") else "no",
        "–" if math.isnan(flat["loss_drop"]) else f"{100 * flat['loss_drop']:.1f}%",
        "–" if math.isnan(flat["probe_gain"]) else f"{flat['probe_gain']:+.3f}", {True: "yes", False: "no",
                                                                                  None: "–"}[flat["flattened"]],
        *(f"{g:+.3f}" if not math.isnan(g) else "–" for g in gains)
    ])
  return markdown(header, lines)


def _paired_gain(rows: list[dict], cell: Mapping, fraction) -> float:
  """Mean Dice of the fine-tunes matching `cell` at `fraction` minus scratch's with the same other fields (fold,
  image size), over the seeds both have finished (NaN where none)."""
  def by_seed(want):
    return {
        r.get("seed"): r["dice"] for r in rows
        if r.get("label_fraction") == fraction and all(r.get(k) == v for k, v in want.items())
    }
  mine = by_seed(cell)
  scratch = by_seed({**{k: v for k, v in cell.items() if k not in ("method", "transfer")}, "pretrain": "none"})
  seeds = sorted(set(mine) & set(scratch), key=str)
  return float(np.mean([mine[s] - scratch[s] for s in seeds])) if seeds else math.nan


def write_report(cells: list[tuple[dict, str]], out_dir: str, pretrain_runs: dict[str, str] | None = None,
                 overlays: dict | None = None, n_boot: int = 2000, seed: int = 0, probe_floor: Mapping | None = None,
                 breast: str | tuple[str, ...] = "breast",
                 pretrain_cells: Mapping[str, Mapping] | None = None) -> dict[str, str]:
  """results.csv, results.json, report.md and the plots for whatever part of the grid has finished.

  `overlays`, when given, holds plots.plot_overlays' arrays {images, masks, preds, titles}; `breast` names C3's
  single-organ arm(s) (see `claims`); `pretrain_cells` the fields of the fine-tunes each pre-training started,
  where several make one arm (see `pretrain_table`). Returns the written paths.
  """
  os.makedirs(out_dir, exist_ok=True)
  path = lambda name: os.path.join(out_dir, name)
  rows = collect(cells)
  per_image = {r["workdir"]: p for r in rows if (p := load_per_image(r["workdir"]))}
  by = default_by(rows) if rows else ("pretrain", "label_fraction")
  stats = group_stats(rows, per_image, by, n_boot, seed)
  found = claims(rows, per_image, breast=breast, n_boot=n_boot, seed=seed)
  paths = {"csv": write_csv(rows, path("results.csv")), "json": path("results.json"), "md": path("report.md")}
  _write_text(
      paths["json"],
      json.dumps(_clean({"cells": len(cells), "finished": len(rows), "rows": rows, "groups": stats, "claims": found}),
                 indent=2) + "\n")
  paths["label_curves"] = plots.plot_label_curves(_label_curves(stats, by), path("label_curves.png"))
  finished = {r["workdir"] for r in rows}
  ft = {
      " ".join(f"{k}={hashable(v)}" for k, v in f.items()): _read_json(os.path.join(wd, "history.json")) for f, wd in cells if
      wd in finished
  }
  paths["finetune_loss"] = plots.plot_loss_curves(ft, path("finetune_loss.png"), "fine-tuning loss")
  if pretrain_runs:
    pt = {name: _read_json(os.path.join(wd, "history.json")) for name, wd in pretrain_runs.items()}
    paths["pretrain_loss"] = plots.plot_loss_curves(pt, path("pretrain_loss.png"), "contrastive pre-training loss")
    probed = {
        name: (_read_json(os.path.join(wd, "summary.json")) or {}).get("probe_history") or []
        for name, wd in pretrain_runs.items()
    }
    if metric := pretrain_analysis.probe_metric([r for h in probed.values() for r in h]):
      paths["pretrain_probe"] = plots.plot_loss_curves(probed, path("pretrain_probe.png"), "frozen-feature probe",
                                                       key=metric, ylabel=metric)
  if overlays:
    paths["overlays"] = plots.plot_overlays(overlays["images"], overlays["masks"], overlays["preds"],
                                            overlays["titles"], path("overlays.png"))
  figures = "".join(f"![{k}]({os.path.basename(v)})\n\n" for k, v in paths.items() if v.endswith(".png"))
  md = (f"# Results\n\n{len(rows)} of {len(cells)} fine-tuning runs finished; unfinished cells are left out.\n\n"
        f"## Test-set metrics\n\nDice CI: 95% bootstrap over test images and seeds (over runs where a run has no "
        f"per_image.json). HD95 in pixels, images with exactly one empty mask left out.\n\n"
        f"{group_table(rows, per_image, by, n_boot, seed)}\n"
        f"## Claims\n\nΔ Dice = claimed-better arm minus reference, paired by seed and test image.\n\n"
        f"{claims_markdown(found)}\n" +
        (f"## What pre-training learned\n\nLast frozen-feature probe of each pre-training (balanced accuracy; "
         f"k-NN and linear on pooled encoder features, train -> validation) beside its fine-tuning gain over "
         f"scratch. Flattened: the last quarter of the run lowered the loss by under 2% and raised the "
         f"BUSI linear probe by under 0.02 (usjax/pretrain_analysis.py).\n\n"
         f"{pretrain_table(pretrain_runs, stats, probe_floor, rows, pretrain_cells)}\n" if pretrain_runs else "") +
        f"## Figures\n\n{figures}")
  _write_text(paths["md"], md)
  return paths
