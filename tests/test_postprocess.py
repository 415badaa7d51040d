"""Post-processing chosen on validation: hand-made probability maps with a speck, a lesion and a false lesion."""
import numpy as np
import pytest

from usjax import postprocess


def blob(shape, top, left, size, value):
  p = np.zeros(shape, np.float32)
  p[top:top + size, left:left + size] = value
  return p


def test_apply_removes_a_speck_and_keeps_the_lesion():
  prob = np.maximum(blob((64, 64), 10, 10, 12, 0.95), blob((64, 64), 50, 50, 2, 0.9))  # lesion + 4-px speck
  assert postprocess.apply(prob).sum() == 144 + 4
  assert postprocess.apply(prob, {"min_area": 0.002}).sum() == 144  # 0.002 * 4096 = 8.2 px > 4
  assert postprocess.apply(prob, {"largest": True}).sum() == 144
  assert postprocess.apply(prob, {"min_peak": 0.99}).sum() == 0  # no pixel that sure: the mask is emptied
  two = np.maximum(blob((64, 64), 0, 0, 10, 0.9), blob((64, 64), 30, 30, 6, 0.9))
  assert postprocess.apply(two, {"largest": True}).sum() == 100
  assert postprocess.apply(two, {"min_area": 0.05, "largest": True}).sum() == 0  # 100 px < 205: nothing is left


def test_dice_convention_matches_evaluate():
  empty = np.zeros((4, 4), bool)
  assert postprocess.dice(empty, empty) == 1.0 and postprocess.dice(empty | (np.eye(4) > 0), empty) == 0.0


def test_choose_keeps_only_the_steps_that_raise_validation_dice():
  """Normal scans with faint false lesions (peak 0.65) and lesion scans with sure lesions (0.95): a minimum peak
  empties the former and spares the latter; the area and largest-component steps change nothing and stay off."""
  shape, probs, masks = (32, 32), [], []
  for k in range(6):
    probs.append(blob(shape, 4 + k, 4, 8, 0.95))
    masks.append(blob(shape, 4 + k, 4, 8, 1) > 0)
  for k in range(4):
    probs.append(blob(shape, 20, 2 + k, 6, 0.65))
    masks.append(np.zeros(shape, bool))
  rule, tried = postprocess.choose(probs, masks)
  assert rule["min_peak"] in (0.7, 0.8, 0.9) and rule["min_area"] == 0.0 and rule["largest"] is False
  assert tried["none"] == pytest.approx(6 / 10) and max(tried.values()) == pytest.approx(1.0)
  # Nothing to gain: the rule stays "none".
  assert postprocess.choose(probs[:6], masks[:6])[0] == postprocess.NONE


# ------------------------------------------------------------------------------------------- the gate frontier
# Three normal scans (two with a false lesion: Dice 0) and two lesion images, with the score a gate thresholds.
FRONT_DICES, FRONT_EMPTY = [0.0, 1.0, 0.0, 0.8, 0.4], [True, True, True, False, False]
FRONT_SCORES = [0.3, 0.1, 0.7, 0.8, 0.5]


def test_gate_frontier_keeps_the_points_no_threshold_beats_by_hand():
  # Worked by hand: midpoints 0.2, 0.4, 0.6, 0.75. At 0.4 the false lesion scored 0.3 goes for free (fpr 2/3 ->
  # 1/3); the one scored 0.7 goes only with the lesion scored 0.5 (its Dice 0.4 -> 0: lesion mean 0.6 -> 0.4).
  # Off and 0.2 (fpr 2/3, cost 0) and 0.6 (fpr 1/3, cost 0.2) are beaten.
  front = postprocess.gate_frontier(FRONT_SCORES, FRONT_DICES, FRONT_EMPTY)
  assert [p["threshold"] for p in front] == pytest.approx([0.75, 0.4])
  assert [p["fpr"] for p in front] == pytest.approx([0.0, 1 / 3])
  assert [p["lesion_dice"] for p in front] == pytest.approx([0.4, 0.6])
  assert [p["lesion_cost"] for p in front] == pytest.approx([0.2, 0.0])
  assert [p["lesions_emptied"] for p in front] == [1, 0]
  assert postprocess.cheapest(front, 0.05)["threshold"] == pytest.approx(0.75)
  assert postprocess.cheapest(front, 0.5)["threshold"] == pytest.approx(0.4)


def test_gate_frontier_of_a_score_that_cannot_clear_a_false_lesion():
  # The false lesion scores highest: no threshold empties it, so 5% is unreachable and the frontier is "off".
  front = postprocess.gate_frontier([0.9, 0.2, 0.5], [0.0, 0.7, 0.6], [True, False, False])
  assert [(p["threshold"], p["fpr"], p["lesion_cost"]) for p in front] == [(None, 1.0, 0.0)]
  assert postprocess.cheapest(front, 0.05) is None


def test_gate_frontier_command_prints_the_verdict_and_stops_in_one_line_on_bad_input(tmp_path):
  import json
  import os
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  rows = [{"id": str(i), "dice": d, "lesion": not e, "presence": s, "max_prob": s}
          for i, (d, e, s) in enumerate(zip(FRONT_DICES, FRONT_EMPTY, FRONT_SCORES))]
  (tmp_path / "per_image.json").write_text(json.dumps(rows))
  p = subprocess.run([sys.executable, "launch/gate_frontier.py", str(tmp_path), "--max_fpr=0.05", "--budget=0.25",
                      f"--out={tmp_path / 'front.json'}"], cwd=root, capture_output=True, text=True, timeout=120)
  assert p.returncode == 0, p.stderr
  assert "| 0.7500 | 0.0% | 0.400 | 0.200 | 1 |" in p.stdout
  assert p.stdout.count("target met by any gate") == 2
  written = json.loads((tmp_path / "front.json").read_text())["gates"]
  assert written["head"]["target_met"] and written["peak"]["cheapest_at_max_fpr"]["threshold"] == pytest.approx(0.75)
  (tmp_path / "per_image.json").write_text("[{\"dice\": 1.0}]")
  p = subprocess.run([sys.executable, "launch/gate_frontier.py", str(tmp_path)], cwd=root, capture_output=True,
                     text=True, timeout=120)
  assert p.returncode != 0 and len(p.stderr.strip().splitlines()) == 1 and "per_image.json" in p.stderr
