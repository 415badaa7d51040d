"""HD95 hand cases, bootstrap CIs, claim verdicts and the report, on fake run directories."""
import csv
import json
import math
import os

import numpy as np
import pytest

from usjax import analysis, bootstrap, claims

N_BOOT = 400


def hd95(pred, true):
  from usjax.evaluate import hd95
  return hd95(pred, true)


def mask(*cells, shape=(12, 12)):
  m = np.zeros(shape, bool)
  for r, c in cells:
    m[r, c] = True
  return m


# ---------------------------------------------------------------------------------------------------- hd95
def test_hd95_hand_cases():
  assert hd95(mask((1, 1)), mask((4, 5))) == pytest.approx(5.0)  # 3-4-5 triangle
  square = np.zeros((12, 12), bool)
  square[3:6, 3:6] = True
  assert hd95(square, square) == 0.0
  assert hd95(mask(), mask()) == 0.0
  assert math.isnan(hd95(square, mask())) and math.isnan(hd95(mask(), square))
  assert hd95(square, np.roll(square, 2, axis=1)) == pytest.approx(2.0)


# ---------------------------------------------------------------------------------------------------- bootstrap
def test_bootstrap_ci_properties():
  rng = np.random.default_rng(1)
  values = [rng.uniform(0.3, 0.9, 40) for _ in range(3)]
  mean, lo, hi = bootstrap.bootstrap_ci(values, N_BOOT, seed=0)
  assert mean == pytest.approx(np.mean(np.concatenate(values)))
  assert lo < mean < hi
  assert bootstrap.bootstrap_ci(values, N_BOOT, seed=0) == (mean, lo, hi)
  one = [rng.uniform(0.3, 0.9, 20)]
  big = [rng.uniform(0.3, 0.9, 500)]
  width = lambda v: np.subtract(*bootstrap.bootstrap_ci(v, N_BOOT)[2:0:-1])
  assert width(big) < width(one) / 2
  mean, lo, hi = bootstrap.bootstrap_ci([np.full(30, 0.7)], N_BOOT)
  assert mean == pytest.approx(0.7) and lo == pytest.approx(0.7) and hi == pytest.approx(0.7)


def test_paired_difference_exact_and_by_id():
  rng = np.random.default_rng(2)
  a = [rng.uniform(0.2, 0.8, 30) for _ in range(2)]
  diff, lo, hi, p = bootstrap.paired_difference_ci(a, [x + 0.1 for x in a], N_BOOT)
  assert diff == pytest.approx(0.1) and lo == pytest.approx(0.1) and hi == pytest.approx(0.1) and p < 0.01
  rows_a = [{"id": f"img{i}", "dice": float(v)} for i, v in enumerate(a[0])]
  rows_b = [{"id": r["id"], "dice": r["dice"] + 0.1} for r in rows_a][::-1]  # other order
  diff, lo, hi, _ = bootstrap.paired_difference_ci([rows_a], [rows_b], N_BOOT)
  assert diff == pytest.approx(0.1) and hi - lo < 1e-9
  # By position, the reversed list would not be a constant shift.
  _, lo, hi, _ = bootstrap.paired_difference_ci([a[0]], [np.array([r["dice"] for r in rows_b])], N_BOOT)
  assert hi - lo > 0.05


# ---------------------------------------------------------------------------------------------------- fake runs
IDS = [f"case{i:03d}" for i in range(40)]
BASE = np.random.default_rng(3).uniform(0.4, 0.8, len(IDS))


def fake_run(root, fields, dice, finished=True, hd=True):
  """A fine-tuning workdir as train.finetune writes it; `dice` per image in IDS order."""
  wd = os.path.join(root, "_".join(f"{k}{v}" for k, v in fields.items()))
  os.makedirs(wd)
  labels = ["benign", "malignant", "normal", "benign"] * (len(IDS) // 4)
  rows = [{"id": i, "label": l, "dice": float(d), "iou": float(d) / (2 - float(d))}
          for i, l, d in zip(IDS, labels, dice)]
  if hd:
    for k, r in enumerate(rows):
      r["hd95"] = math.nan if k == 0 else 10 * (1 - r["dice"])
  with open(os.path.join(wd, "history.json"), "w") as f:
    json.dump([{"step": s, "loss": 1 / (s + 1)} for s in range(0, 50, 10)], f)
  if finished:
    with open(os.path.join(wd, "per_image.json"), "w") as f:
      json.dump(rows[::-1], f)  # order must not matter
    summary = {
        "task": "finetune", "dice": float(np.mean(dice)), "iou": float(np.mean([r["iou"] for r in rows])),
        "num_images": len(rows), "false_positive_rate": 0.1, "label_fraction": fields["label_fraction"],
        "source": "busi", "init_from": None, "transfer": None, "steps": 50, "images_per_sec": 100.0
    }
    for name in ("benign", "malignant", "normal"):
      summary[f"dice_{name}"] = float(np.mean([r["dice"] for r in rows if r["label"] == name]))
    with open(os.path.join(wd, "summary.json"), "w") as f:
      json.dump(summary, f)
  return fields, wd


def grid(root, effect, fractions=(100, 50), sources=("none", "breast", "multiorgan"), seeds=(0, 1)):
  """`effect(source, fraction)` -> Dice shift added to a shared per-image base; small per-seed noise."""
  cells = []
  for s in sources:
    for f in fractions:
      for seed in seeds:
        noise = np.random.default_rng([sources.index(s), f, seed]).normal(0, 0.005, len(IDS))
        fields = {"pretrain": s, "method": "simclr", "label_fraction": f, "seed": seed}
        cells.append(fake_run(root, fields, np.clip(BASE + effect(s, f) + noise, 0, 1)))
  return cells


def by_claim(rows, claim):
  return [r for r in rows if r["claim"] == claim]


def test_claims_verdicts(tmp_path):
  def effect(source, fraction):
    if source == "none":
      return 0.0 if fraction == 100 else -0.1
    return 0.0 if fraction == 50 else 0.1  # pre-trained: +0.1 over scratch at 50%; 50% ≈ scratch@100%

  cells = grid(tmp_path, effect)
  rows = analysis.collect(cells)
  per_image = {r["workdir"]: analysis.load_per_image(r["workdir"]) for r in rows}
  found = analysis.claims(rows, per_image, n_boot=N_BOOT)
  c1 = by_claim(found, "C1")
  assert len(c1) == 4 and all(r["verdict"] == "supported" for r in c1)
  assert {r["n_seeds"] for r in c1} == {2} and {r["n_images"] for r in c1} == {2 * len(IDS)}  # paired scores
  c2 = by_claim(found, "C2")
  assert len(c2) == 2 and all(r["verdict"] == "supported" and "comparable" in r["note"] for r in c2)
  c3 = by_claim(found, "C3")
  assert len(c3) == 2 and all(r["verdict"] in ("ruled out", "inconclusive") for r in c3)
  assert all(abs(r["diff"]) < 0.01 for r in c3)


@pytest.mark.parametrize("claim, lo, hi, verdict", [
    ("C1", 0.001, 0.05, "supported"), ("C1", -0.015, 0.019, "ruled out"), ("C1", -0.05, -0.01, "ruled out"),
    ("C1", -0.01, 0.03, "inconclusive"), ("C3", -0.03, 0.01, "inconclusive"), ("C2", -0.019, 0.05, "supported"),
    ("C2", -0.05, -0.021, "ruled out"), ("C2", -0.03, 0.0, "inconclusive")
])
def test_verdicts_in_words(claim, lo, hi, verdict):
  assert claims._verdict(claim, lo, hi, 0.02)[0] == verdict


def test_folds_and_seeds_pool_into_one_arm_paired_by_replicate(tmp_path):
  """Cells of 3 folds x 2 seeds, each fold with its own test images: one arm per (pretrain, fraction), runs paired
  by (fold, seed), and the CI half-width and MDE against the spread of the per-run differences."""
  cells, shift = [], {}
  for fold in range(3):
    ids = [f"f{fold}_{i}" for i in range(40)]
    base = np.random.default_rng(fold).uniform(0.3, 0.9, len(ids))
    for seed in (0, 1):
      shift[fold, seed] = 0.03 + 0.02 * np.random.default_rng([fold, seed]).normal()  # run-to-run spread
      for arm in ("none", "multiorgan"):
        dice = base + (shift[fold, seed] if arm == "multiorgan" else 0.0)
        fields = {"pretrain": arm, "label_fraction": 100, "seed": seed, "fold": fold}
        wd = tmp_path / f"{arm}_{fold}_{seed}"
        os.makedirs(wd)
        (wd / "summary.json").write_text(json.dumps({"dice": float(dice.mean())}))
        (wd / "per_image.json").write_text(json.dumps([{"id": i, "dice": float(d)} for i, d in zip(ids, dice)]))
        cells.append((fields, str(wd)))
  rows = analysis.collect(cells)
  assert analysis.default_by(rows) == ("pretrain", "label_fraction")
  per_image = {r["workdir"]: analysis.load_per_image(r["workdir"]) for r in rows}
  c1, = by_claim(analysis.claims(rows, per_image, n_boot=4000), "C1")
  assert (c1["n_seeds"], c1["n_folds"], c1["n_images"]) == (6, 3, 6 * 40)
  runs = np.array(list(shift.values()))
  assert c1["diff"] == pytest.approx(runs.mean(), abs=1e-9)
  se = runs.std(ddof=1) / np.sqrt(len(runs))  # every image of a run moves by the same shift: runs are the units
  assert c1["half_width"] == pytest.approx(1.96 * se, rel=0.3)
  assert c1["mde"] == pytest.approx(2.80 * se, rel=0.3)
  assert "6 (3 folds) / 240" in analysis.claims_markdown([c1])
  # Runs the CI would need for ±0.02, projected as 1/sqrt(runs) from the 6 paired here.
  assert c1["runs_for_margin"] == max(6, int(np.ceil(6 * (c1["half_width"] / 0.02) ** 2 - 1e-9)))
  assert f"| {c1['runs_for_margin']} |" in analysis.claims_markdown([c1])


def test_runs_for_a_margin_by_hand():
  assert claims.runs_for(0.04, 3, 0.02) == 12  # half the width needs four times the runs
  assert claims.runs_for(0.027, 7, 0.02) == 13  # 7 * 1.8225 = 12.76
  assert claims.runs_for(0.015, 7, 0.02) == 7  # already there


def test_c3_compares_multiorgan_with_each_breast_only_arm(tmp_path):
  effect = {"none": 0.0, "breast": 0.0, "breast_long": 0.04, "multiorgan": 0.08}
  cells = grid(tmp_path, lambda s, f: effect[s], fractions=(100,), sources=tuple(effect))
  rows = analysis.collect(cells)
  per_image = {r["workdir"]: analysis.load_per_image(r["workdir"]) for r in rows}
  c3 = by_claim(analysis.claims(rows, per_image, breast=("breast", "breast_long"), n_boot=N_BOOT), "C3")
  assert [r["comparison"].split(" vs ")[1].split(" ")[0].split("/")[0] for r in c3] == ["breast", "breast_long"]
  assert [round(r["diff"], 2) for r in c3] == [0.08, 0.04]
  assert all(r["verdict"] == "supported" for r in c3)
  assert len(by_claim(analysis.claims(rows, per_image, n_boot=N_BOOT), "C3")) == 1  # default: "breast" alone


def test_claims_missing_arm_not_run(tmp_path):
  cells = grid(tmp_path, lambda s, f: 0.05 * (s != "none"), fractions=(50,), sources=("none", "multiorgan"), seeds=(0,))
  rows = analysis.collect(cells)
  found = analysis.claims(rows, {r["workdir"]: analysis.load_per_image(r["workdir"]) for r in rows}, n_boot=N_BOOT)
  assert [r["verdict"] for r in by_claim(found, "C3")] == ["not run"]
  assert [r["verdict"] for r in by_claim(found, "C2")] == ["not run"]  # no scratch @ 100%
  assert [r["verdict"] for r in by_claim(found, "C1")] == ["supported"]
  assert "not run" in analysis.claims_markdown(found)


def test_write_report(tmp_path):
  cells = grid(tmp_path / "runs", lambda s, f: 0.05 * (s != "none") - 0.001 * (100 - f), seeds=(0,))
  cells.append(
      fake_run(tmp_path / "runs", {"pretrain": "natural", "method": "simclr", "label_fraction": 25, "seed": 0}, BASE,
               finished=False))
  pre = os.path.join(tmp_path, "pre")
  os.makedirs(pre)
  with open(os.path.join(pre, "history.json"), "w") as f:
    json.dump([{"step": s, "loss": 5 - s / 10} for s in range(10)], f)
  with open(os.path.join(pre, "summary.json"), "w") as f:
    json.dump(
        {
            "steps": 10, "final_loss": 4.1,
            "probe_history": [{"step": s, "busi_linear_bacc": 0.5 + s / 100} for s in (5, 10)]
        }, f)
  images = np.random.default_rng(0).uniform(size=(3, 16, 16, 1))
  masks = np.zeros((3, 16, 16), bool)
  masks[:, 4:10, 4:10] = True
  overlays = {"images": images, "masks": masks, "preds": np.roll(masks, 2, axis=2), "titles": ["a", "b", "c"]}
  paths = analysis.write_report(cells, str(tmp_path / "out"), {"multiorgan": pre}, overlays, n_boot=N_BOOT)
  with open(paths["csv"]) as f:
    table = list(csv.DictReader(f))
  assert len(table) == len(cells) - 1
  header = list(table[0])
  assert header[:4] == ["pretrain", "method", "label_fraction", "seed"] and header[-1] == "workdir"
  assert float(table[0]["hd95"]) > 0 and table[0]["hd95_undefined"] == "1"
  report = open(paths["md"]).read()
  for claim in ("C1", "C2", "C3"):
    assert f"| {claim} |" in report
  assert "Dice mean [95% CI]" in report and "label_curves.png" in report
  results = json.loads(open(paths["json"]).read(), parse_constant=lambda c: pytest.fail(f"{c} in results.json"))
  assert results["finished"] == len(cells) - 1 and results["claims"]
  assert "| multiorgan | 4.100 |" in report and "pretrain_probe.png" in report
  for key in ("label_curves", "finetune_loss", "pretrain_loss", "pretrain_probe", "overlays"):
    assert os.path.getsize(paths[key]) > 1000


def test_write_report_empty_grid(tmp_path):
  cells = [fake_run(tmp_path, {"pretrain": "none", "label_fraction": 100}, BASE, finished=False)]
  paths = analysis.write_report(cells, str(tmp_path / "out"), n_boot=N_BOOT)
  report = open(paths["md"]).read()
  assert "0 of 1" in report and report.count("not run") == 3
  assert os.path.getsize(paths["label_curves"]) > 0
