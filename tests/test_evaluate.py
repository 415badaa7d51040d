"""Dice and IoU on hand-computed cases, empty masks included."""
import numpy as np

from usjax import evaluate


def masks(*cells, shape=(4, 4)):
  m = np.zeros(shape, bool)
  for r, c in cells:
    m[r, c] = True
  return m


def test_dice_iou_hand_cases():
  true = np.stack([masks((0, 0), (0, 1), (1, 0), (1, 1)),     # 4 pixels
                   masks((0, 0), (0, 1)),                      # 2 pixels
                   masks(),                                    # empty truth
                   masks(),                                    # empty truth
                   masks((3, 3))])
  pred = np.stack([masks((0, 0), (0, 1)),                      # 2 of 4: dice 2*2/6, iou 2/4
                   masks((2, 2), (2, 3)),                      # disjoint: 0, 0
                   masks(),                                    # empty on empty: perfect
                   masks((1, 1)),                              # false positive on empty: 0
                   masks()])                                   # missed lesion: 0
  dice, iou = evaluate.dice_iou(pred, true)
  np.testing.assert_allclose(dice, [4 / 6, 0, 1, 0, 0], rtol=1e-6)
  np.testing.assert_allclose(iou, [0.5, 0, 1, 0, 0], rtol=1e-6)
  assert not np.any(np.isnan(dice)) and not np.any(np.isnan(iou))


def test_summary_means():
  s = evaluate.summarize({"dice": np.array([1.0, 0.5]), "iou": np.array([1.0, 0.0])})
  assert s == {"dice": 0.75, "iou": 0.5, "num_images": 2}
