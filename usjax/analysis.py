"""Analysis stage: finished fine-tuning runs -> the study's evidence (results table, bootstrap CIs, claims, plots).

Grouping and claims are pure functions of rows and per-image scores, with the bootstrap in `usjax.bootstrap`;
`collect`, the writers and `write_report` do the file I/O; `usjax.plots` draws the figures. Everything tolerates a
half-finished grid: unfinished cells are skipped and a claim whose arms are missing says "not run", so the report
can be rebuilt at any moment.
"""
from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Mapping

import numpy as np

from usjax import bootstrap
from usjax import plots
from usjax import pretrain_analysis
from usjax import storage

METRICS = ("dice", "dice_lesion", "iou", "iou_lesion", "hd95", "hd95_undefined", "dice_benign", "dice_malignant",
           "dice_normal", "iou_benign", "iou_malignant", "iou_normal", "false_positive_rate", "presence_auc",
           "presence_auc_from", "num_images", "train_images", "steps", "images_per_sec")
PRETRAIN_ONLY = ("method", "transfer", "init_from")  # describe a pre-training: a scratch arm matches any value
REPLICATES = ("seed", "fold")  # fields that name a replicate of an arm, not the arm: pooled, and paired on
STATEMENTS = {
    "C1": "pre-training beats training from scratch at the same label fraction",
    "C2": "pre-trained with 50% of the labels is comparable to scratch with 100%",
    "C3": "multi-organ pre-training beats breast-only pre-training at the same label fraction",
}
_NUM = (int, float, np.integer, np.floating)


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


def collect(cells: list[tuple[dict, str]]) -> list[dict]:
  """One row per finished run: the cell's fields, then its summary metrics, then its workdir.

  A cell without summary.json has not finished and is skipped. Fields the grid did not vary (so the cell omits
  them) are taken from the summary where it has them, so pairing by pre-training and label fraction still works.
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
    row.update({k: summary[k] for k in METRICS if k in summary and k not in fields})
    per_image = load_per_image(workdir)
    if per_image and any("hd95" in r for r in per_image):
      hd = np.array([np.nan if r.get("hd95") is None else r["hd95"] for r in per_image], float)
      row["hd95"] = float(np.nanmean(hd)) if np.any(~np.isnan(hd)) else math.nan
      row["hd95_undefined"] = int(np.isnan(hd).sum())
    row["workdir"] = workdir
    rows.append(row)
  return rows


def cell_fields(rows: list[dict]) -> list[str]:
  return list(dict.fromkeys(k for r in rows for k in r if k not in METRICS and k != "workdir"))


def columns(rows: list[dict]) -> list[str]:
  """Stable CSV order: cell fields as the grid gave them, the metrics in a fixed order, the workdir last."""
  present = {k for r in rows for k in r}
  return cell_fields(rows) + [k for k in METRICS if k in present] + (["workdir"] if "workdir" in present else [])


# ---------------------------------------------------------------------------------------------------- groups
def _h(v):
  return v if isinstance(v, (str, bool, type(None)) + _NUM) else repr(v)


def _sort_key(key: tuple) -> tuple:
  """Numbers descending (100% labels first), strings ascending, missing last."""
  def one(v):
    if isinstance(v, _NUM) and not isinstance(v, bool):
      return (0, -float(v), "")
    return (2, 0.0, "") if v is None else (1, 0.0, str(v))

  return tuple(one(v) for v in key)


def default_by(rows: list[dict]) -> tuple[str, ...]:
  """(pretrain, label_fraction) plus any other cell field the grid varies except the replicates (seed, fold), so
  arms never mix and folds and seeds pool."""
  fields = cell_fields(rows)
  varying = [k for k in fields if k not in REPLICATES and len({_h(r.get(k)) for r in rows}) > 1]
  return tuple(dict.fromkeys([k for k in ("pretrain", "label_fraction") if k in fields] + varying))


def _groups(rows: list[dict], by: tuple[str, ...]) -> list[tuple[dict, list[dict]]]:
  out: dict[tuple, list[dict]] = {}
  for r in rows:
    out.setdefault(tuple(_h(r.get(k)) for k in by), []).append(r)
  return [(dict(zip(by, k)), out[k]) for k in sorted(out, key=_sort_key)]


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
  for desc, runs in _groups(rows, by):
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
    stat.update({
        k: _nanmean(r.get(k)
                    for r in runs)
        for k in ("iou", "hd95", "dice_benign", "dice_malignant", "false_positive_rate", "presence_auc")
    })
    # What the AUC ranks images by: the presence head's probability, or the peak foreground probability.
    sources = {r.get("presence_auc_from") for r in runs if r.get("presence_auc_from")}
    stat["presence_auc_from"] = sources.pop() if len(sources) == 1 else "mixed" if sources else None
    out.append(stat)
  return out


def _label_curves(stats: list[dict], by: tuple[str, ...]) -> dict[str, list[dict]]:
  """group_stats rows as Dice-vs-label-fraction lines: one per pre-training source (and any other varied field)."""
  lines: dict[str, list[dict]] = {}
  for s in stats if "label_fraction" in by else []:
    lines.setdefault(_arm_name({k: s[k] for k in by if k != "label_fraction"}), []).append(s)
  return lines


def _fmt(x, digits: int = 3) -> str:
  return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _md(header: list[str], lines: list[list[str]]) -> str:
  rows = [header, ["---"] * len(header)] + lines
  return "\n".join("| " + " | ".join(str(c) for c in r) + " |" for r in rows) + "\n"


def group_table(rows: list[dict], per_image: Mapping | None = None, by: tuple[str, ...] | None = None,
                n_boot: int = 2000, seed: int = 0) -> str:
  """Markdown table of the group means; HD95 in pixels, FPR = share of normal images with any predicted pixel,
  presence AUC = how well the image-level lesion-presence score separates lesion from normal images, scored by
  the presence head's probability ('head') or, without one, by the image's peak foreground probability ('max p')."""
  by = tuple(by) if by is not None else default_by(rows)
  stats = group_stats(rows, per_image, by, n_boot, seed)
  header = [
      *by, "n runs", "Dice mean [95% CI]", "Dice lesion images [95% CI]", "IoU", "HD95 (px)", "Dice benign",
      "Dice malignant", "FPR on normal", "Presence AUC (from)"
  ]
  source = {"head": "head", "max_prob": "max p", "mixed": "mixed", None: ""}
  lines = [[
      *(s[k] for k in by), s["n_runs"], f"{_fmt(s['dice'])} [{_fmt(s['dice_lo'])}, {_fmt(s['dice_hi'])}]",
      f"{_fmt(s['dice_lesion'])} [{_fmt(s['dice_lesion_lo'])}, {_fmt(s['dice_lesion_hi'])}]",
      _fmt(s["iou"]),
      _fmt(s["hd95"], 1),
      _fmt(s["dice_benign"]),
      _fmt(s["dice_malignant"]),
      _fmt(s["false_positive_rate"]),
      f"{_fmt(s['presence_auc'])} ({source[s['presence_auc_from']]})" if s["presence_auc_from"] else "–"
  ] for s in stats]
  return _md(header, lines)


# ---------------------------------------------------------------------------------------------------- claims
def _arm_name(desc: dict) -> str:
  parts = [str(v) for k, v in desc.items() if k != "label_fraction"]
  return "/".join(parts) + (f" @ {desc['label_fraction']}%" if "label_fraction" in desc else "")


def _find(arms, like: dict, ignore: tuple, **want):
  for desc, runs in arms:
    if all(desc.get(k) == v for k, v in want.items()) and all(
        desc.get(k) == like.get(k) for k in desc if k not in ignore and k not in want):
      return desc, runs
  return None


def _pair_runs(a: list[dict], b: list[dict]) -> list[tuple[dict, dict]]:
  """Runs paired by replicate (fold and seed) where both arms carry them, else by position."""
  rep = lambda r: tuple(_h(r.get(k)) for k in REPLICATES)
  sa, sb = ({rep(r): r for r in x} for x in (a, b))
  common = sorted((s for s in sa if s in sb), key=_sort_key)
  if common and any(v is not None for s in common for v in s):
    return [(sa[s], sb[s]) for s in common]
  return list(zip(a, b))


def _verdict(claim: str, lo: float, hi: float, margin: float) -> tuple[str, str]:
  """C1/C3 claim a gain: supported when the CI lies above 0, ruled out when it lies within ±margin (no gain worth
  having) or below 0. C2 claims comparability: supported when the CI lies above -margin (within the margin or
  better), ruled out when it lies below -margin. Otherwise inconclusive."""
  if claim == "C2":
    if lo >= -margin:
      return "supported", f"comparable or better: CI above -{margin}"
    return ("ruled out", f"worse: CI below -{margin}") if hi < -margin else ("inconclusive", f"CI reaches below "
                                                                                             f"-{margin}")
  if lo > 0:
    return "supported", "CI above 0"
  if -margin <= lo and hi <= margin:
    return "ruled out", f"no gain: CI within ±{margin}"
  return ("ruled out", "worse: CI below 0") if hi < 0 else ("inconclusive", "CI includes 0")


def _not_run(claim: str, comparison: str, note: str) -> dict:
  return {"claim": claim, "statement": STATEMENTS[claim], "comparison": comparison, "verdict": "not run", "note": note}


def _compare(claim, ref, treat, per_image, margin, n_boot, seed) -> dict:
  """Claim row for treat - ref, paired by seed and by test image id."""
  (dr, rr), (dt, rt) = ref, treat
  row = _not_run(claim, f"{_arm_name(dt)} vs {_arm_name(dr)}", "")
  pairs = _pair_runs(rr, rt)
  if not per_image or not all(per_image.get(r.get("workdir")) for p in pairs for r in p):
    return {**row, "verdict": "inconclusive", "note": "per-image scores missing"}
  a = [per_image[p[0]["workdir"]] for p in pairs]
  b = [per_image[p[1]["workdir"]] for p in pairs]
  d = bootstrap.paired_difference(a, b, n_boot, seed)
  verdict, note = _verdict(claim, d["lo"], d["hi"], margin)
  if len(pairs) == 1:
    note += "; one run: the CI leaves out run-to-run spread"
  n_images = sum(len(set(r["id"] for r in x) & set(r["id"] for r in y)) for x, y in zip(a, b))
  folds = {_h(p[0].get("fold")) for p in pairs} - {None}
  return {
      **row, "n_seeds": len(pairs), "n_folds": len(folds), "n_images": n_images, "diff": d["diff"], "lo": d["lo"],
      "hi": d["hi"], "half_width": (d["hi"] - d["lo"]) / 2, "mde": d["mde"], "p": d["p"], "verdict": verdict,
      "note": note
  }


def claims(rows: list[dict], per_image: Mapping | None = None, *, scratch: str = "none", multi: str = "multiorgan",
           breast: str | tuple[str, ...] = "breast", full=100, half=50, margin: float = 0.02, n_boot: int = 2000,
           seed: int = 0) -> list[dict]:
  """The paper's claims as rows: paired Dice difference (claimed-better arm minus reference) with CI and verdict.

  C1/C3 are supported when the CI lies above 0, not supported when it lies below 0 or within ±margin (no gain
  worth having), else inconclusive. C2 is supported when the CI lies within ±margin or above 0. `breast` may name
  several single-organ arms (e.g. one pre-trained longer): C3 compares the multi-organ arm with each.
  """
  singles = (breast,) if isinstance(breast, str) else tuple(breast)
  arms = _groups(rows, default_by(rows) if rows else ("pretrain", "label_fraction"))
  lf = lambda arm: arm[0].get("label_fraction")
  cmp = lambda c, ref, arm, what: (_compare(c, ref, arm, per_image, margin, n_boot, seed)
                                   if ref else _not_run(c, f"{_arm_name(arm[0])} vs {what}", f"no {what} run"))
  scratch_at = lambda arm, f: _find(arms, arm[0], ("pretrain", *PRETRAIN_ONLY), pretrain=scratch, label_fraction=f)
  other = lambda arm, name: _find(arms, arm[0], ("pretrain",), pretrain=name)
  pre = [a for a in arms if a[0].get("pretrain") != scratch]
  out = [cmp("C1", scratch_at(a, lf(a)), a, f"{scratch} @ {lf(a)}%") for a in pre]
  out += [cmp("C2", scratch_at(a, full), a, f"{scratch} @ {full}%") for a in pre if lf(a) == half]
  out += [
      cmp("C3", other(a, single), a, f"{single} @ {lf(a)}%")
      for single in singles
      for a in arms
      if a[0].get("pretrain") == multi and (single == singles[0] or other(a, single))
  ]
  out += [
      _not_run("C3", f"{multi} vs {_arm_name(a[0])}", f"no {multi} @ {lf(a)}% run")
      for a in arms
      if a[0].get("pretrain") in singles and not other(a, multi)
  ]
  for claim, comparison, note in (("C1", f"pre-trained vs {scratch}", "no pre-trained runs"),
                                  ("C2", f"pre-trained @ {half}% vs {scratch} @ {full}%",
                                   f"no pre-trained @ {half}% run"), ("C3", f"{multi} vs {singles[0]}",
                                                                      f"no {multi} or {singles[0]} runs")):
    if not any(r["claim"] == claim for r in out):
      out.append(_not_run(claim, comparison, note))
  return sorted(out, key=lambda r: r["claim"])


def _replicates(r: dict) -> str:
  """'15 (5 folds) / 1830': paired runs, the folds among them, paired per-image scores in all."""
  if "n_seeds" not in r:
    return "–"
  folds = f" ({r['n_folds']} folds)" if r.get("n_folds") else ""
  return f"{r['n_seeds']}{folds} / {r['n_images']}"


def claims_markdown(rows: list[dict]) -> str:
  statements = "".join(f"- **{c}**: {s}\n" for c, s in STATEMENTS.items())
  header = ["Claim", "Comparison", "Δ Dice [95% CI]", "CI ±", "MDE (80% power)", "p", "runs / image scores",
            "Verdict", "Note"]
  lines = [[
      r["claim"], r["comparison"], f"{r['diff']:+.3f} [{r['lo']:+.3f}, {r['hi']:+.3f}]" if "diff" in r else "–",
      _fmt(r.get("half_width")), _fmt(r.get("mde")), _fmt(r.get("p")),
      _replicates(r), r["verdict"], r.get("note", "")
  ] for r in rows]
  return statements + "\n" + _md(header, lines)


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
  writer.writerows({k: _h(v) for k, v in r.items()} for r in rows)
  _write_text(path, buf.getvalue())
  return path


def pretrain_table(pretrain_runs: Mapping[str, str], stats: list[dict], floor: Mapping | None = None) -> str:
  """What each pre-training learned beside what it gave fine-tuning: its last frozen-feature probe (balanced
  k-NN / linear accuracy per probe set), the collapse flag, whether it had flattened (the last quarter's loss
  fall and probe rise), and its Dice gain over scratch at each label fraction (group means of the report table).
  `floor` is the probe of a randomly initialised encoder."""
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
        "random init (floor)", "–", *(_fmt(floor.get(k)) for k in probes), "–", "–", "–", "–", *("0" for _ in fractions)
    ])
  for name, s in summaries.items():
    flat = pretrain_analysis.flattening(histories[name], s.get("probe_history") or [], s.get("steps") or 0)
    gains = [dice.get((name, f), math.nan) - dice.get(("none", f), math.nan) for f in fractions]
    lines.append([
        name,
        _fmt(s.get("final_loss")), *(_fmt((s.get("probe") or {}).get(k)) for k in probes),
        "yes" if s.get("collapsed") else "no",
        "–" if math.isnan(flat["loss_drop"]) else f"{100 * flat['loss_drop']:.1f}%",
        "–" if math.isnan(flat["probe_gain"]) else f"{flat['probe_gain']:+.3f}", {True: "yes", False: "no",
                                                                                  None: "–"}[flat["flattened"]],
        *(f"{g:+.3f}" if not math.isnan(g) else "–" for g in gains)
    ])
  return _md(header, lines)


def write_report(cells: list[tuple[dict, str]], out_dir: str, pretrain_runs: dict[str, str] | None = None,
                 overlays: dict | None = None, n_boot: int = 2000, seed: int = 0, probe_floor: Mapping | None = None,
                 breast: str | tuple[str, ...] = "breast") -> dict[str, str]:
  """results.csv, results.json, report.md and the plots for whatever part of the grid has finished.

  `overlays`, when given, holds plots.plot_overlays' arrays {images, masks, preds, titles}; `breast` names C3's
  single-organ arm(s) (see `claims`). Returns the written paths.
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
      " ".join(f"{k}={_h(v)}" for k, v in f.items()): _read_json(os.path.join(wd, "history.json")) for f, wd in cells if
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
         f"{pretrain_table(pretrain_runs, stats, probe_floor)}\n" if pretrain_runs else "") +
        f"## Figures\n\n{figures}")
  _write_text(paths["md"], md)
  return paths
