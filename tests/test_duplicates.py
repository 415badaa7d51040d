"""Near-duplicate groups and the splits and folds built on them: hand-made scans and their altered copies, group
and fold invariants, the study grid's per-fold pre-training, and the counts on the shared BUSI."""

import collections

import numpy as np
import pytest
from PIL import Image, ImageDraw
from scipy import ndimage

from usjax.data import busi, duplicates, folders

from data_helpers import png, raw, shared


def scan(seed: int, size=(120, 160)) -> np.ndarray:
  """A made-up B-mode frame: smooth tissue texture fading with depth, as every real scan does (so distinct
  frames share a layout and correlate, as BUSI's do)."""
  rng = np.random.default_rng(seed)
  tissue = ndimage.gaussian_filter(rng.normal(size=size), 4)
  tissue = (tissue - tissue.mean()) / tissue.std()
  depth = np.linspace(1.0, 0.3, size[0])[:, None]
  return np.clip(110 + 45 * tissue * depth + 60 * depth - 30, 0, 255).astype(np.uint8)


def altered(img: np.ndarray) -> dict[str, np.ndarray]:
  """The copies a data set picks up: re-cropped, rescaled, re-exposed, marked, and all of these at once."""
  h, w = img.shape
  marked = Image.fromarray(img)
  draw = ImageDraw.Draw(marked)
  for x, y in ((40, 45), (90, 70)):  # two calipers, thin crosses as scanners draw them
    draw.line([(x - 4, y), (x + 4, y)], fill=255)
    draw.line([(x, y - 4), (x, y + 4)], fill=255)
  draw.text((6, h - 16), "RT 2", fill=255)  # a burned-in label
  marked = np.asarray(marked)
  crop = img[h // 10:, w // 10:]
  return {
      "crop": crop,
      "rescale": np.asarray(Image.fromarray(img).resize((w * 7 // 10, h * 7 // 10), Image.BILINEAR)),
      "brightness": np.clip(img.astype(float) * 1.2 + 15, 0, 255).astype(np.uint8),
      "mark": marked,
      "all": np.clip(marked[h // 10:, w // 10:].astype(float) * 0.85 - 10, 0, 255).astype(np.uint8),
  }


def prints_of(images) -> np.ndarray:
  return np.stack([duplicates.fingerprints(Image.fromarray(a)) for a in images])


def test_altered_copies_group_with_their_original_and_distinct_scans_do_not():
  original = scan(0)
  copies = altered(original)
  others = [scan(s) for s in range(1, 9)]
  images = [original, *copies.values(), *others]
  found = duplicates.find(prints_of(images), [0] * len(images))
  n = 1 + len(copies)
  assert found.group[:n] == [0] * n, dict(zip(["original", *copies], found.group))
  assert found.group[n:] == list(range(n, len(images)))  # each distinct scan alone
  # The distinct scans share a layout, so they do correlate: the threshold, not zero correlation, separates them.
  best_other = max(r for i, j, r in duplicates.similar_pairs(prints_of(others), -1.0))
  assert 0.3 < best_other < duplicates.THRESHOLD


def test_similarity_is_correlation_of_standardised_thumbnails():
  """Against a numpy reference: the whole-image similarity is Pearson's r of the 32x32 thumbnails."""
  a, b = scan(3), scan(4)
  ta, tb = (np.asarray(Image.fromarray(x).resize((32, 32), Image.BILINEAR), float).ravel() for x in (a, b))
  pa, pb = prints_of([a, b])
  assert float(pa[0] @ pb[0]) == pytest.approx(np.corrcoef(ta, tb)[0, 1], abs=1e-5)
  (i, j, r), = duplicates.similar_pairs(np.stack([pa, pb]), -1.0)
  assert (i, j) == (0, 1) and r >= float(pa[0] @ pb[0]) - 1e-6  # windows can only raise it


def test_union_find_and_conflicts():
  assert duplicates.union_find(6, [(0, 3), (3, 5), (1, 2)]) == [0, 1, 1, 0, 4, 0]
  prints = prints_of([scan(0), scan(0), scan(1), scan(1), scan(2)])
  found = duplicates.find(prints, [0, 0, 0, 1, 1])
  assert found.group == [0, 0, 2, 2, 4] and found.conflicts == {2}
  s = found.summary([0, 0, 0, 1, 1], ("a", "b"))
  assert (s["pairs"], s["groups"], s["images_after_dedup"], s["conflicts"]) == (2, 2, 3, [[2, 3]])
  assert s["per_class"]["a"] == {"images": 3, "pairs": 1, "groups": 1, "images_in_groups": 2}


def make_busi_with_copies(root, n=12):
  """A BUSI folder of distinct scans, where benign (1) has two altered copies in benign/, and malignant (1) is a
  copy of normal (1) filed under both classes (a mixed-class group)."""
  inner = root / "Dataset_BUSI_with_GT"
  mask = np.zeros((120, 160), np.uint8)
  mask[40:60, 50:80] = 255
  seed = 100
  for cls in busi.CLASSES:
    for i in range(1, n + 1):
      seed += 1
      png(inner / cls / f"{cls} ({i}).png", scan(seed))
      png(inner / cls / f"{cls} ({i})_mask.png", mask * (cls != "normal"))
  first = np.asarray(Image.open(inner / "benign" / "benign (1).png"))
  for k, name in enumerate(("brightness", "mark"), start=n + 1):
    png(inner / "benign" / f"benign ({k}).png", altered(first)[name])
    png(inner / "benign" / f"benign ({k})_mask.png", mask)
  png(inner / "malignant" / "malignant (1).png", np.asarray(Image.open(inner / "normal" / "normal (1).png")))
  return inner


def split_groups(builder):
  ds = raw(builder)
  return {s: [(ds[s][i]["id"].decode(), ds[s][i]["group"].decode()) for i in range(len(ds[s]))] for s in ds}


def test_busi_groups_stay_in_one_split_and_conflicts_are_left_out(tmp_path):
  make_busi_with_copies(tmp_path / "busi")
  builder = busi.prepare(tmp_path / "busi", tmp_path / "out", dedup=duplicates.THRESHOLD)
  parts = split_groups(builder)
  ids = {i: g for part in parts.values() for i, g in part}
  assert ids["benign/benign (13).png"] == ids["benign/benign (14).png"] == ids["benign/benign (1).png"]
  where = collections.defaultdict(set)
  for s, part in parts.items():
    for _, g in part:
      where[g].add(s)
  assert all(len(s) == 1 for s in where.values()), where
  assert "malignant/malignant (1).png" not in ids and "normal/normal (1).png" not in ids  # left out
  assert len(ids) == 3 * 12 + 2 - 2
  kept = busi.prepare(tmp_path / "busi", tmp_path / "out", dedup=duplicates.THRESHOLD, keep_conflicts=True)
  assert kept.info.config_name != builder.info.config_name
  kept_ids = {i: g for part in split_groups(kept).values() for i, g in part}
  assert kept_ids["malignant/malignant (1).png"] == kept_ids["normal/normal (1).png"]


def test_folds_partition_the_images_and_keep_groups_whole():
  rng = np.random.default_rng(0)
  labels = list(rng.integers(0, 3, 200))
  groups = [f"g{rng.integers(0, 150)}" for _ in labels]  # groups of 1-5 images
  groups = [f"{g}-{lb}" for g, lb in zip(groups, labels)]  # one class per group
  k = 5
  seen = collections.Counter()
  for fold in range(k):
    where = folders.assign_fold_splits(labels, groups, folders.DEFAULT_SPLIT, 0, k, fold)
    for s in folders.SPLITS:
      part = {g for g, w in zip(groups, where) if w == s}
      assert not part & {g for g, w in zip(groups, where) if w != s}, f"a group straddles {s} in fold {fold}"
    seen.update(i for i, w in enumerate(where) if w == "test")
    n_test, n_val = where.count("test"), where.count("val")
    assert abs(n_test - len(labels) / k) <= 6
    assert abs(n_val / (len(labels) - n_test) - 0.125) < 0.03  # train:val as 70:10
    for c in range(3):  # class-stratified
      share = sum(1 for lb, w in zip(labels, where) if lb == c and w == "test") / labels.count(c)
      assert abs(share - 1 / k) < 0.06
  assert sorted(seen) == list(range(len(labels))) and set(seen.values()) == {1}  # every image tested once


def test_fold_options_fail_in_one_line():
  with pytest.raises(Exception, match="config.data.folds=5, config.data.fold=5"):
    folders.check_folds(5, 5)
  assert folders.check_folds(0, 3) == (0, 0)


@pytest.mark.slow
def test_shared_busi_duplicate_counts():
  items = busi.scan(busi.find_root(shared("busi")))
  prints = np.stack([duplicates.read_fingerprints(it.paths[0]) for it in items])
  s = duplicates.find(prints, [it.label for it in items]).summary([it.label for it in items], busi.CLASSES)
  # README (Data, near-duplicates) gives these counts.
  assert (s["images"], s["pairs"], s["groups"], s["images_in_groups"]) == (624, 148, 102, 227)
  assert (len(s["conflicts"]), s["conflict_images"]) == (7, 15)
