"""launch/compare.py: two results folders of the same cells, paired by run name and test image."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from usjax import UsjaxError, compare

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_run(folder, name, fraction, dice):
  """A finished run: images a, b (lesions) and n1, n2 (normal scans) with the given Dice."""
  os.makedirs(folder / name)
  (folder / name / "summary.json").write_text(json.dumps({"task": "finetune", "label_fraction": fraction}))
  rows = [{"id": i, "dice": d, "lesion": i[0] != "n"} for i, d in zip(("a", "b", "n1", "n2"), dice)]
  (folder / name / "per_image.json").write_text(json.dumps(rows))


def test_the_differences_are_paired_by_run_and_image_by_hand(tmp_path):
  a, b = tmp_path / "a", tmp_path / "b"
  write_run(a, "seed-0", 100, [0.6, 0.8, 0.0, 1.0])
  write_run(b, "seed-0", 100, [0.7, 0.8, 1.0, 1.0])
  write_run(a, "seed-1", 100, [0.5, 0.7, 0.0, 0.0])
  write_run(b, "seed-1", 100, [0.5, 0.5, 0.0, 1.0])
  write_run(a, "half", 50, [0.4, 0.4, 1.0, 1.0])  # b lacks it: not paired
  os.makedirs(b / "unfinished")
  rows = {r["measure"]: r for r in compare.compare(str(a), str(b), n_boot=200)}
  assert set(rows) == {"dice", "dice_lesion", "false_lesion_on_normal"}
  assert all(r["runs"] == 2 and r["label_fraction"] == 100 for r in rows.values())
  # Dice: run means a 0.6, 0.3; b 0.875, 0.5 -> diff ((0.875 - 0.6) + (0.5 - 0.3)) / 2 = 0.2375
  assert rows["dice"]["diff"] == pytest.approx(0.2375) and rows["dice"]["images"] == 8
  assert rows["dice"]["a"] == pytest.approx(0.45) and rows["dice"]["a_spread"] == pytest.approx(0.3)
  # Lesion images: a 0.7, 0.6; b 0.75, 0.5 -> ((0.05) + (-0.1)) / 2 = -0.025
  assert rows["dice_lesion"]["diff"] == pytest.approx(-0.025) and rows["dice_lesion"]["images"] == 4
  # Normal scans with a false lesion: a 1/2, 2/2; b 0/2, 1/2 -> -0.5 in each run
  fl = rows["false_lesion_on_normal"]
  assert (fl["a"], fl["b"], fl["diff"]) == pytest.approx((0.75, 0.25, -0.5))
  assert fl["lo"] <= fl["diff"] <= fl["hi"]
  md = compare.to_markdown(list(rows.values()), "a", "b")
  assert "| 100% | dice | 2 | 8 | 0.450 | 0.688 | +0.238 [" in md and "| 0.300 |" in md


def test_missing_or_disjoint_folders_fail_in_one_line(tmp_path):
  write_run(tmp_path / "a", "seed-0", 100, [1, 1, 1, 1])
  with pytest.raises(UsjaxError, match="no such results folder"):
    compare.compare(str(tmp_path / "a"), str(tmp_path / "nope"))
  write_run(tmp_path / "b", "other", 100, [1, 1, 1, 1])
  with pytest.raises(UsjaxError, match="no finished run with per_image.json"):
    compare.compare(str(tmp_path / "a"), str(tmp_path / "b"))
  write_run(tmp_path / "c", "seed-0", 100, [1, 1, 1, 1])
  (tmp_path / "c" / "seed-0" / "summary.json").write_text("{")
  with pytest.raises(UsjaxError, match=r"seed-0/summary.json: unreadable \(JSONDecodeError\)"):
    compare.compare(str(tmp_path / "a"), str(tmp_path / "c"))
  p = subprocess.run([sys.executable, "launch/compare.py", str(tmp_path / "a"), str(tmp_path / "b")], cwd=ROOT,
                     capture_output=True, text=True, timeout=120)
  assert p.returncode == 1 and p.stderr.strip().splitlines()[-1].startswith("compare: ")
  assert "Traceback" not in p.stderr


def test_the_command_prints_the_table_and_writes_json(tmp_path):
  write_run(tmp_path / "a", "seed-0", 100, [0.6, 0.8, 0.0, 1.0])
  write_run(tmp_path / "b", "seed-0", 100, [0.7, 0.8, 1.0, 1.0])
  out = tmp_path / "rows.json"
  p = subprocess.run([sys.executable, "launch/compare.py", str(tmp_path / "a"), str(tmp_path / "b"), f"--out={out}",
                      "--n_boot=100"], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert p.returncode == 0, p.stderr[-2000:]
  assert p.stdout.splitlines()[0].startswith("| labels | measure |") and "| 100% | dice | 1 | 4 |" in p.stdout
  rows = json.loads(out.read_text())["rows"]
  assert np.isclose(rows[0]["diff"], (0.875 - 0.6))
