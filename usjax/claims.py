"""The paper's claims (C1-C3) as rows: arms paired by replicate and test image, a bootstrap CI of the Dice
difference, and a verdict. Pure functions of grouped rows and per-image scores (`usjax.analysis` groups them and
writes the tables); the small helpers that name, sort and print arms live here too, for the analysis to share.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from usjax import bootstrap

PRETRAIN_ONLY = ("method", "transfer", "init_from")  # describe a pre-training: a scratch arm matches any value
REPLICATES = ("seed", "fold")  # fields that name a replicate of an arm, not the arm: pooled, and paired on
STATEMENTS = {
    "C1": "pre-training beats training from scratch at the same label fraction",
    "C2": "pre-trained with 50% of the labels is comparable to scratch with 100%",
    "C3": "multi-organ pre-training beats breast-only pre-training at the same label fraction",
}
_NUM = (int, float, np.integer, np.floating)


# ---------------------------------------------------------------------------------------------------- arms
def hashable(v):
  return v if isinstance(v, (str, bool, type(None)) + _NUM) else repr(v)


def sort_key(key: tuple) -> tuple:
  """Numbers descending (100% labels first), strings ascending, missing last."""
  def one(v):
    if isinstance(v, _NUM) and not isinstance(v, bool):
      return (0, -float(v), "")
    return (2, 0.0, "") if v is None else (1, 0.0, str(v))

  return tuple(one(v) for v in key)


def groups(rows: list[dict], by: tuple[str, ...]) -> list[tuple[dict, list[dict]]]:
  out: dict[tuple, list[dict]] = {}
  for r in rows:
    out.setdefault(tuple(hashable(r.get(k)) for k in by), []).append(r)
  return [(dict(zip(by, k)), out[k]) for k in sorted(out, key=sort_key)]


def fmt(x, digits: int = 3) -> str:
  return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def markdown(header: list[str], lines: list[list[str]]) -> str:
  rows = [header, ["---"] * len(header)] + lines
  return "\n".join("| " + " | ".join(str(c) for c in r) + " |" for r in rows) + "\n"


# ---------------------------------------------------------------------------------------------------- claims
def arm_name(desc: dict) -> str:
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
  rep = lambda r: tuple(hashable(r.get(k)) for k in REPLICATES)
  sa, sb = ({rep(r): r for r in x} for x in (a, b))
  common = sorted((s for s in sa if s in sb), key=sort_key)
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
  row = _not_run(claim, f"{arm_name(dt)} vs {arm_name(dr)}", "")
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
  folds = {hashable(p[0].get("fold")) for p in pairs} - {None}
  half_width = (d["hi"] - d["lo"]) / 2
  return {
      **row, "n_seeds": len(pairs), "n_folds": len(folds), "n_images": n_images, "diff": d["diff"], "lo": d["lo"],
      "hi": d["hi"], "half_width": half_width, "mde": d["mde"], "p": d["p"], "verdict": verdict, "note": note,
      "runs_for_margin": runs_for(half_width, len(pairs), margin), "margin": margin
  }


def runs_for(half_width: float, runs: int, margin: float) -> int:
  """Paired runs the CI would need to narrow to ±margin, from the half-width reached with `runs`: the spread is run
  to run, so the half-width falls as 1/sqrt(runs) (a projection, not a promise: new runs bring their own spread)."""
  if not half_width > margin:
    return runs
  return math.ceil(runs * (half_width / margin) ** 2 - 1e-9)


def claims(arms: list[tuple[dict, list[dict]]], per_image: Mapping | None = None, *, scratch: str = "none",
           multi: str = "multiorgan", breast: str | tuple[str, ...] = "breast", full=100, half=50,
           margin: float = 0.02, n_boot: int = 2000, seed: int = 0) -> list[dict]:
  """The paper's claims as rows: paired Dice difference (claimed-better arm minus reference) with CI and verdict,
  over `arms` ((description, runs) as `groups` makes them).

  C1/C3 are supported when the CI lies above 0, not supported when it lies below 0 or within ±margin (no gain
  worth having), else inconclusive. C2 is supported when the CI lies within ±margin or above 0. `breast` may name
  several single-organ arms (e.g. one pre-trained longer): C3 compares the multi-organ arm with each.
  """
  singles = (breast,) if isinstance(breast, str) else tuple(breast)
  lf = lambda arm: arm[0].get("label_fraction")
  cmp = lambda c, ref, arm, what: (_compare(c, ref, arm, per_image, margin, n_boot, seed)
                                   if ref else _not_run(c, f"{arm_name(arm[0])} vs {what}", f"no {what} run"))
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
      _not_run("C3", f"{multi} vs {arm_name(a[0])}", f"no {multi} @ {lf(a)}% run")
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
  margin = next((r["margin"] for r in rows if "margin" in r), 0.02)
  header = ["Claim", "Comparison", "Δ Dice [95% CI]", "CI ±", "MDE (80% power)", "p", "runs / image scores",
            f"runs for CI ±{margin:g}", "Verdict", "Note"]
  lines = [[
      r["claim"], r["comparison"], f"{r['diff']:+.3f} [{r['lo']:+.3f}, {r['hi']:+.3f}]" if "diff" in r else "–",
      fmt(r.get("half_width")), fmt(r.get("mde")), fmt(r.get("p")),
      _replicates(r), str(r.get("runs_for_margin", "–")), r["verdict"], r.get("note", "")
  ] for r in rows]
  return statements + "\n" + markdown(header, lines)
