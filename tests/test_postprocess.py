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
