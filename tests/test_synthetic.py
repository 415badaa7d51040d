"""Tests for the synthetic ultrasound phantoms and their TFDS builder."""

import pathlib

import numpy as np
import pytest
from scipy import ndimage

from usjax.data import DataError
from usjax.data import phantoms
from usjax.data import synthetic

ORGANS = ('breast', 'lung', 'heart')


@pytest.mark.parametrize('organ', ORGANS)
def test_generate_is_deterministic(organ):
  a = phantoms.generate(organ, 3, 64, seed=0)
  b = phantoms.generate(organ, 3, 64, seed=0)
  c = phantoms.generate(organ, 3, 64, seed=1)
  assert a['image'].shape == (64, 64, 1) and a['image'].dtype == np.uint8
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  assert not np.array_equal(a['image'], c['image'])
  assert ('mask' in a) == (organ == 'breast')
  assert 30 < a['image'].mean() < 180  # moderate, not blank or saturated


def test_label_of_matches_generate():
  for i in range(20):
    assert phantoms.label_of('breast', i, 5) == phantoms.generate('breast', i, 32, 5)['label']


def _breast(n, size=64):
  return [phantoms.generate('breast', i, size, seed=0) for i in range(n)]


def test_breast_masks_and_labels():
  examples = _breast(60)
  labels = [ex['label'] for ex in examples]
  assert set(labels) == set(phantoms.BREAST_LABELS)
  assert 0.3 < labels.count('benign') / 60 < 0.7
  for ex in examples:
    mask = ex['mask']
    assert mask.shape == ex['image'].shape and mask.dtype == np.uint8
    assert set(np.unique(mask)) <= {0, 255}
    assert (mask.max() == 0) == (ex['label'] == 'normal')


def test_lesions_are_darker_than_their_surroundings():
  lesions = [ex for ex in _breast(40) if ex['label'] != 'normal'][:20]
  diffs = []
  for ex in lesions:
    img, mask = ex['image'][..., 0].astype(float), ex['mask'][..., 0] > 0
    ring = ndimage.binary_dilation(mask, iterations=4) & ~mask
    diffs.append(img[ring].mean() - img[mask].mean())
  diffs = np.array(diffs)
  assert diffs.mean() > 20
  assert (diffs > 0).mean() >= 0.8


def test_malignant_lesions_cast_shadows():
  """Tissue below a malignant lesion is darker than below a benign one."""
  ratios = {'benign': [], 'malignant': []}
  for ex in _breast(60):
    if ex['label'] == 'normal':
      continue
    img, mask = ex['image'][..., 0].astype(float), ex['mask'][..., 0] > 0
    rows, cols = np.nonzero(mask)
    below = img[rows.max() + 2:]
    inside = np.zeros(below.shape[1], bool)
    inside[cols.min():cols.max() + 1] = True
    ratios[ex['label']].append(below[:, inside].mean() / below[:, ~inside].mean())
  assert np.mean(ratios['malignant']) < np.mean(ratios['benign']) - 0.1


def test_heart_is_black_outside_the_fan():
  for i in range(6):
    img = phantoms.generate('heart', i, 64, seed=0)['image'][..., 0]
    for corner in (img[0, 0], img[0, -1], img[-1, 0], img[-1, -1]):
      assert corner == 0
    assert img[:8, :8].max() == 0 and img[:8, -8:].max() == 0
    assert img[32:48, 16:48].mean() > 10  # but the fan itself is not empty


def test_lung_pleural_line_and_a_lines():
  size, peaks, a_lines = 128, 0, 0
  for i in range(10):
    img = phantoms.generate('lung', i, size, seed=0)['image'][..., 0].astype(float)
    profile = img[:, int(0.4 * size):int(0.6 * size)].mean(1)
    lo, hi = int(0.12 * size), int(0.3 * size)
    p = lo + int(np.argmax(profile[lo:hi]))
    assert profile[p - 1:p + 2].mean() > profile[p + 3:p + 9].mean() + 25
    peaks += 1
    if 2 * p + 4 < size:  # first reverberation at twice the pleural depth
      a_lines += profile[2 * p - 3:2 * p + 4].max() > profile[int(1.5 * p)] + 10
  assert a_lines >= 7


def test_unknown_organ():
  with pytest.raises(DataError, match='kidney'):
    phantoms.generate('kidney', 0, 64, 0)
  with pytest.raises(DataError, match='kidney'):
    synthetic.prepare('kidney', '/nonexistent')


@pytest.mark.parametrize('kwargs,name', [({'image_size': 16}, 'image_size'), ({'num_images': 5}, 'num_images')])
def test_prepare_validates_arguments(tmp_path, kwargs, name):
  with pytest.raises(DataError, match=name):
    synthetic.prepare('breast', str(tmp_path), **kwargs)


# ---------------------------------------------------------------- builder

SIZE, N = 32, 40


@pytest.fixture(scope='module')
def breast_dir(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp('tfds')
  synthetic.prepare('breast', str(data_dir), image_size=SIZE, num_images=N, seed=0)
  return data_dir


def _files(root: pathlib.Path):
  return {p: p.stat().st_mtime_ns for p in root.rglob('*') if p.is_file()}


def test_prepare_reuses_a_prepared_data_set(breast_dir, monkeypatch):
  before = _files(breast_dir)
  monkeypatch.setattr(phantoms, 'generate', lambda *a, **k: pytest.fail('regenerated'))
  builder = synthetic.prepare('breast', str(breast_dir), image_size=SIZE, num_images=N)
  assert _files(breast_dir) == before
  assert builder.info.splits['train'].num_examples == 28
  assert sorted(p.name for p in (breast_dir / 'synthetic_ultrasound').iterdir()) == [f'breast-s{SIZE}-n{N}-seed0']


def test_builder_splits_and_pixels(breast_dir):
  builder = synthetic.prepare('breast', str(breast_dir), image_size=SIZE, num_images=N)
  sources = builder.as_data_source()
  assert {k: len(v) for k, v in sources.items()} == {'train': 28, 'val': 4, 'test': 8}
  names = builder.info.features['label'].names
  for split, ds in sources.items():
    for j in (0, len(ds) - 1):
      ex = ds[j]
      assert ex['image'].shape == (SIZE, SIZE, 1) and ex['mask'].shape == (SIZE, SIZE, 1)
      organ, index = ex['id'].decode().split('/')
      ref = phantoms.generate(organ, int(index), SIZE, seed=0)
      np.testing.assert_array_equal(ex['image'], ref['image'])
      np.testing.assert_array_equal(ex['mask'], ref['mask'])
      assert names[ex['label']] == ref['label']
      assert int(index) in synthetic.split_indices(N)[split]
      if split != 'train':
        assert ex['label_fraction'] == 100


def test_label_fractions_are_nested_and_stratified(breast_dir):
  builder = synthetic.prepare('breast', str(breast_dir), image_size=SIZE, num_images=N)
  train = builder.as_data_source()['train']
  examples = [train[i] for i in range(len(train))]
  labels = np.array([int(ex['label']) for ex in examples])
  fractions = np.array([int(ex['label_fraction']) for ex in examples])
  assert set(fractions) <= set(synthetic.LABEL_FRACTIONS)
  assert (fractions == 100).any() and (fractions == 10).any()
  for f in synthetic.LABEL_FRACTIONS:  # each class cut at ceil(f %)
    for c in np.unique(labels):
      n_c = (labels == c).sum()
      assert ((labels == c) & (fractions <= f)).sum() == -(-f * n_c // 100)
  big = synthetic.label_fractions('breast', 600, 0)
  assert len(big) == 420
  assert sum(f <= 10 for f in big.values()) in range(42, 46)
  assert sum(f <= 50 for f in big.values()) in range(210, 213)


def test_lung_builder_has_no_mask(tmp_path):
  builder = synthetic.prepare('lung', str(tmp_path), image_size=SIZE, num_images=10)
  ex = builder.as_data_source()['test'][0]
  assert set(ex) == {'image', 'label', 'id'}
  assert ex['id'] == b'lung/000008'  # test split = last 20 % of the indices
  np.testing.assert_array_equal(ex['image'], phantoms.generate('lung', 8, SIZE, 0)['image'])


def test_failed_build_leaves_nothing_prepared(tmp_path, monkeypatch):
  real, calls = phantoms.generate, []

  def flaky(*args, **kwargs):
    calls.append(1)
    if len(calls) > 12:
      raise RuntimeError('disk on fire')
    return real(*args, **kwargs)

  monkeypatch.setattr(phantoms, 'generate', flaky)
  with pytest.raises(RuntimeError, match='disk on fire'):
    synthetic.prepare('heart', str(tmp_path), image_size=SIZE, num_images=20)
  assert not list(tmp_path.rglob('dataset_info.json'))
  assert not list(tmp_path.rglob('incomplete*'))
  monkeypatch.setattr(phantoms, 'generate', real)
  builder = synthetic.prepare('heart', str(tmp_path), image_size=SIZE, num_images=20)
  assert len(builder.as_data_source()['train']) == 14
