"""Prediction on new images: original sizes back, exact inverse geometry, BUSI-layout scoring, bad input."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from configs import finetune_busi
from usjax import predict, task
from usjax.data import DataError, phantoms, pipeline

pytestmark = pytest.mark.slow  # fine-tunes a model to predict with

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
  root = tmp_path_factory.mktemp("predict")
  cfg = finetune_busi.get_config()
  cfg.data.data_dir = str(root / "data")
  cfg.data.image_size = cfg.data.synthetic_size = 32
  cfg.data.synthetic_num_images = 40
  cfg.batch_size, cfg.num_steps, cfg.log_every, cfg.checkpoint_every = 8, 2, 2, 2
  task.run(cfg, str(root / "fine"))
  return str(root / "fine"), predict.load(str(root / "fine"), batch_size=4)


def rectangle(h, w, rows, cols):
  m = np.zeros((h, w), np.uint8)
  m[rows[0]:rows[1], cols[0]:cols[1]] = 1
  return m


@pytest.mark.parametrize(
    "aspect,size,rows,cols",
    [
        ("pad", 80, (5, 25), (10, 50)),  # same scale: cut back out of the padded square
        ("pad", 40, (5, 25), (10, 50)),  # half scale: edges on the even grid of the padded square survive
        ("stretch", 80, (6, 30), (11, 57)),  # 40x80 -> 80x80 doubles rows only
        ("crop", 40, (4, 36), (10, 50)),  # the centred 40x40 window; the margins are background
    ])
def test_from_square_exactly_inverts_to_square(aspect, size, rows, cols):
  h, w = (50 if aspect == "pad" else 40), 80
  mask = rectangle(h, w, rows, cols)
  square = pipeline.to_square(mask[..., None], size, aspect, Image.NEAREST)[..., 0]
  back = predict.from_square(square, (h, w), aspect, Image.NEAREST)
  want = mask.copy()
  if aspect == "crop":
    want[:, :20] = want[:, 60:] = 0
  assert back.shape == (h, w)
  np.testing.assert_array_equal(back, want)


def test_logits_outside_a_crop_are_background():
  logits = np.ones((8, 8), np.float32)
  back = predict.from_square(logits, (8, 20), "crop", fill=-np.inf) > 0
  assert back[:, 6:14].all() and not back[:, :6].any() and not back[:, 14:].any()


def test_settings_come_from_meta_then_overrides_then_fallback():
  meta = {"data": {"image_size": 32, "channels": 1, "aspect": "crop"}}
  assert predict.settings(meta) == {"image_size": 32, "channels": 1, "aspect": "crop"}
  assert predict.settings(meta, image_size=48)["image_size"] == 48
  assert predict.settings({}) == predict.FALLBACK_DATA
  with pytest.raises(DataError, match="aspect"):
    predict.settings(meta, aspect="squash")


def test_score_at_original_resolution():
  true = rectangle(30, 50, (5, 15), (10, 30)).astype(bool)  # 200 pixels
  pred = rectangle(30, 50, (5, 15), (20, 40)).astype(bool)  # 200, 100 shared
  s = predict.score(pred, true)
  assert s["dice"] == pytest.approx(0.5) and s["iou"] == pytest.approx(1 / 3)
  assert s["hd95"] == pytest.approx(10.0)
  empty = np.zeros_like(true)
  assert predict.score(empty, empty)["dice"] == 1.0 and predict.score(pred, empty)["dice"] == 0.0


def test_predict_folder_writes_masks_at_original_sizes(finetuned, tmp_path):
  _, p = finetuned
  rng = np.random.default_rng(0)
  (tmp_path / "in" / "sub").mkdir(parents=True)
  Image.fromarray(rng.integers(0, 256, (50, 80), np.uint8)).save(tmp_path / "in" / "a.png")
  Image.fromarray(rng.integers(0, 256, (64, 40, 3), np.uint8)).save(tmp_path / "in" / "sub" / "b.jpg")
  Image.fromarray(rng.integers(0, 256, (33, 47), np.uint8)).save(tmp_path / "in" / "sub" / "c.png")
  Image.fromarray(np.zeros((50, 80), np.uint8)).save(tmp_path / "in" / "a_mask.png")  # ground truth: skipped
  rows = predict.predict_folder(p, str(tmp_path / "in"), str(tmp_path / "out"))
  assert [r["image"] for r in rows] == ["a.png", "sub/b.jpg", "sub/c.png"]
  for rel, (h, w) in [("a", (50, 80)), ("sub/b", (64, 40)), ("sub/c", (33, 47))]:
    mask = np.asarray(Image.open(tmp_path / "out" / f"{rel}_mask.png"))
    assert mask.shape == (h, w) and set(np.unique(mask)) <= {0, 255}
    assert np.asarray(Image.open(tmp_path / "out" / f"{rel}_overlay.png")).shape == (h, w, 3)
  assert json.loads((tmp_path / "out" / "predictions.json").read_text()) == rows
  assert p._forward._cache_size() == 1  # three sizes, a part-filled batch: one compiled forward pass


def write_busi(folder, size=48):
  """Synthetic breast scans cropped to non-square sizes, in the BUSI layout; one lesion split over two masks."""
  counts = {"benign": 0, "malignant": 0, "normal": 0}
  index = 1000
  while min(counts.values()) < 2:
    ex = phantoms.generate("breast", index, size, seed=0)
    index += 1
    label = ex["label"]
    if counts[label] >= 2:
      continue
    counts[label] += 1
    stem = folder / label / f"{label} ({counts[label]})"
    stem.parent.mkdir(parents=True, exist_ok=True)
    image, mask = ex["image"][4:-4, :, 0], ex["mask"][4:-4, :, 0]
    Image.fromarray(image).save(f"{stem}.png")
    if label == "benign" and counts[label] == 1:
      top, rest = mask.copy(), mask.copy()
      top[mask.shape[0] // 2:], rest[:mask.shape[0] // 2] = 0, 0
      Image.fromarray(top).save(f"{stem}_mask.png")
      Image.fromarray(rest).save(f"{stem}_mask_1.png")
    else:
      Image.fromarray(mask).save(f"{stem}_mask.png")


def test_evaluate_folder_scores_busi_layout(finetuned, tmp_path):
  _, p = finetuned
  write_busi(tmp_path / "busi")
  summary = predict.evaluate_folder(p, str(tmp_path / "busi"), str(tmp_path / "eval"), save_predictions=True)
  rows = json.loads((tmp_path / "eval" / "per_image.json").read_text())
  assert [r["id"] for r in rows][:2] == ["benign/benign (1).png", "benign/benign (2).png"]
  assert {r["label"] for r in rows} == {"benign", "malignant", "normal"} and len(rows) == 6
  for r in rows:
    assert 0 <= r["dice"] <= 1 and 0 <= r["iou"] <= r["dice"] + 1e-6 and "hd95" in r
  assert summary == json.loads((tmp_path / "eval" / "summary.json").read_text())
  assert summary["num_images"] == 6 and "false_positive_rate" in summary
  assert {"dice_benign", "dice_malignant", "dice_normal", "iou_normal"} <= set(summary)
  # Scores are at the original 40x48 resolution, against the two masks merged.
  pred = np.asarray(Image.open(tmp_path / "eval" / "benign" / "benign (1)_mask.png")) > 0
  true = np.asarray(Image.open(tmp_path / "busi" / "benign" / "benign (1)_mask.png")) > 0
  true |= np.asarray(Image.open(tmp_path / "busi" / "benign" / "benign (1)_mask_1.png")) > 0
  assert pred.shape == (40, 48)
  assert rows[0]["dice"] == pytest.approx(predict.score(pred, true)["dice"])


def test_missing_workdir_or_folder_is_one_line_naming_it(finetuned, tmp_path):
  workdir, p = finetuned
  with pytest.raises(predict.PredictError, match="nowhere") as e:
    predict.load(str(tmp_path / "nowhere"))
  assert "\n" not in str(e.value)
  with pytest.raises(DataError, match="nofolder"):
    predict.predict_folder(p, str(tmp_path / "nofolder"), str(tmp_path / "out"))
  (tmp_path / "flat").mkdir()
  with pytest.raises(DataError, match="flat: not the BUSI layout"):
    predict.evaluate_folder(p, str(tmp_path / "flat"), str(tmp_path / "out"))
  out = subprocess.run([
      sys.executable, "launch/predict.py", f"--workdir={tmp_path / 'gone'}", f"--input={tmp_path}",
      f"--output={tmp_path / 'o'}"
  ], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert out.returncode == 1
  assert out.stderr.strip().splitlines()[-1].startswith("error: ") and "gone" in out.stderr
