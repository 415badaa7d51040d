"""Dice and IoU on hand-computed cases, empty masks included."""
import numpy as np
import pytest

from usjax import evaluate


def masks(*cells, shape=(4, 4)):
  m = np.zeros(shape, bool)
  for r, c in cells:
    m[r, c] = True
  return m


def test_dice_iou_hand_cases():
  true = np.stack([
      masks((0, 0), (0, 1), (1, 0), (1, 1)),  # 4 pixels
      masks((0, 0), (0, 1)),  # 2 pixels
      masks(),  # empty truth
      masks(),  # empty truth
      masks((3, 3))
  ])
  pred = np.stack([
      masks((0, 0), (0, 1)),  # 2 of 4: dice 2*2/6, iou 2/4
      masks((2, 2), (2, 3)),  # disjoint: 0, 0
      masks(),  # empty on empty: perfect
      masks((1, 1)),  # false positive on empty: 0
      masks()
  ])  # missed lesion: 0
  dice, iou = evaluate.dice_iou(pred, true)
  np.testing.assert_allclose(dice, [4 / 6, 0, 1, 0, 0], rtol=1e-6)
  np.testing.assert_allclose(iou, [0.5, 0, 1, 0, 0], rtol=1e-6)
  assert not np.any(np.isnan(dice)) and not np.any(np.isnan(iou))


def test_summary_means():
  s = evaluate.summarize({"dice": np.array([1.0, 0.5]), "iou": np.array([1.0, 0.0])})
  assert s == {"dice": 0.75, "iou": 0.5, "num_images": 2}


def test_lesion_only_dice_leaves_out_empty_ground_truth():
  # Hand-made: two lesion images (Dice 4/6 and 0) and two normal ones (empty truth: 1 when nothing is predicted,
  # 0 for a false positive). Over all images: (4/6 + 0 + 1 + 0) / 4; over lesion images: (4/6 + 0) / 2.
  true = np.stack([masks((0, 0), (0, 1), (1, 0), (1, 1)), masks((0, 0)), masks(), masks()])
  pred = np.stack([masks((0, 0), (0, 1)), masks((3, 3)), masks(), masks((2, 2))])
  dice, iou = evaluate.dice_iou(pred, true)
  per_image = {
      "dice": np.asarray(dice), "iou": np.asarray(iou), "empty_true": ~true.reshape(4, -1).any(1),
      "empty_pred": ~pred.reshape(4, -1).any(1)
  }
  s = evaluate.summarize(per_image)
  assert s["dice"] == pytest.approx((4 / 6 + 0 + 1 + 0) / 4)
  assert s["dice_lesion"] == pytest.approx((4 / 6 + 0) / 2)
  assert s["iou_lesion"] == pytest.approx((0.5 + 0) / 2)
  assert s["num_lesion_images"] == 2
  assert s["false_positive_rate"] == pytest.approx(0.5)
  rows = evaluate.per_image_rows({**per_image, "id": np.array(list("abcd")), "label": np.array(["x"] * 4)})
  assert [r["lesion"] for r in rows] == [True, True, False, False]
