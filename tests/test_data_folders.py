"""Generic data ingestion: image decoding, grouped splits and label fractions, the image-folder and TFDS-catalogue
builders (bad input on tiny files made here), then the shared CIFAR-10 copy read as a folder."""

import collections
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from usjax.data import DataError
from usjax.data import folders
from usjax.data import imageio
from usjax.data import staging

from data_helpers import assert_clean, labels_of, png, raises, raw, shared, truncate

# ---------------------------------------------------------------------------
# imageio


def test_read_image_modes_and_errors(tmp_path):
  assert imageio.read_image(png(tmp_path / 'c.png', np.full((5, 7, 3), 9, np.uint8)), 1).shape == (5, 7, 1)
  assert imageio.read_image(png(tmp_path / 'g.jpg', size=(5, 7), value=9), 3).shape == (5, 7, 3)
  raises(lambda: imageio.read_image(tmp_path / 'nope.png', 1), tmp_path / 'nope.png')
  (tmp_path / 'junk.png').write_bytes(b'not an image at all')
  raises(lambda: imageio.check_image(tmp_path / 'junk.png'), 'junk.png')
  for name in ('t.png', 't.jpg'):
    path = png(tmp_path / name, np.random.default_rng(0).integers(0, 255, (64, 64), np.uint8))
    truncate(path)
    assert 'truncated' in raises(lambda: imageio.read_image(path, 1), path)
  wide = png(tmp_path / 'w.png', np.full((4, 5), 300, np.uint16))
  assert '16-bit' in raises(lambda: imageio.read_image(wide, 1), wide)
  Image.fromarray(np.zeros((4, 5), np.float32)).save(tmp_path / 'f.tif')
  assert 'unsupported' in raises(lambda: imageio.check_image(tmp_path / 'f.tif'), 'f.tif')


def test_read_mask_thresholds(tmp_path):
  assert imageio.read_mask(png(tmp_path / 'a.png', np.array([[0, 100, 200]], np.uint8))).tolist() == [[0, 0, 1]]
  assert imageio.read_mask(png(tmp_path / 'b.png', np.array([[0, 1, 1]], np.uint8))).tolist() == [[0, 1, 1]]
  one = tmp_path / 'c.png'
  Image.fromarray(np.array([[False, True]])).save(one)
  assert Image.open(one).mode == '1' and imageio.read_mask(one).tolist() == [[0, 1]]
  rgba = np.array([[[0, 0, 0, 255], [255, 255, 255, 255]]], np.uint8)
  assert imageio.read_mask(png(tmp_path / 'd.png', rgba)).tolist() == [[0, 1]]


def test_splits_grouped_stratified_and_fractions_nested():
  rng = np.random.default_rng(0)
  sizes = rng.integers(1, 20, 60)
  groups = [f'g{i}' for i, n in enumerate(sizes) for _ in range(n)]
  labels = [i % 3 for i, n in enumerate(sizes) for _ in range(n)]
  where = folders.assign_splits(labels, groups, (0.7, 0.1, 0.2), seed=1)
  assert all(len({w for g2, w in zip(groups, where) if g2 == g}) == 1 for g in set(groups))
  assert where != folders.assign_splits(labels, groups, (0.7, 0.1, 0.2), seed=2)
  frac = np.array(folders.assign_label_fractions(labels, groups, seed=1))
  assert set(frac) <= {10, 25, 50, 100}
  for c in range(3):
    n = sum(1 for lab in labels if lab == c)
    for f in (10, 25, 50):
      assert f / 100 * n <= np.sum((frac <= f) & (np.array(labels) == c)) <= f / 100 * n + 20
  with pytest.raises(DataError):
    folders.check_split((0.8, 0.0, 0.2))


# ---------------------------------------------------------------------------
# Folders, catalogue: synthetic


def test_folder_flat_nested_and_bad_input(tmp_path):
  for i in range(10):
    png(tmp_path / 'flat' / f'{i}.png', np.zeros((4, 5, 3), np.uint8))
    png(tmp_path / 'nested' / 'a' / 'deep' / f'{i}.jpg', size=(4, 5))
    png(tmp_path / 'nested' / 'b' / f'{i}.png', size=(4, 5))
  flat = folders.prepare_folder(tmp_path / 'flat', tmp_path / 'out', name='flat', channels=1)
  assert flat.info.features['label'].names == ['flat']
  assert flat.as_data_source()['train'][0]['image'].shape == (4, 5, 1)
  nested = folders.prepare_folder(tmp_path / 'nested', tmp_path / 'out', name='nested', channels=3)
  assert nested.info.features['label'].names == ['a', 'b']
  assert nested.as_data_source()['test'][0]['image'].shape == (4, 5, 3)
  twin = tmp_path / 'twin'
  os.symlink(tmp_path / 'flat', twin)
  assert folders.prepare_folder(twin, tmp_path / 'out', name='flat').info.config_name == flat.info.config_name
  (tmp_path / 'copy').mkdir()
  for f in (tmp_path / 'flat').iterdir():
    (tmp_path / 'copy' / f.name).write_bytes(f.read_bytes())
  copy = folders.prepare_folder(tmp_path / 'copy', tmp_path / 'out', name='flat', channels=1)
  assert copy.info.config_name != flat.info.config_name  # Same name, different folder.

  out = tmp_path / 'out2'
  png(tmp_path / 'nested' / 'stray.png')
  raises(lambda: folders.prepare_folder(tmp_path / 'nested', out, name='x'), tmp_path / 'nested')
  (tmp_path / 'nested' / 'stray.png').unlink()
  (tmp_path / 'nested' / 'c').mkdir()
  raises(lambda: folders.prepare_folder(tmp_path / 'nested', out, name='x'), tmp_path / 'nested' / 'c', 'empty')
  (tmp_path / 'nested' / 'c').rmdir()
  truncate(tmp_path / 'nested' / 'b' / '3.png')
  raises(lambda: folders.prepare_folder(tmp_path / 'nested', out, name='x'), tmp_path / 'nested' / 'b' / '3.png')
  raises(lambda: folders.prepare_folder(tmp_path / 'gone', out, name='x'), tmp_path / 'gone')
  raises(lambda: folders.prepare_folder(tmp_path / 'flat', out, name='Bad Name'), 'Bad Name')
  assert_clean(out)


class NumpyImages(tfds.core.GeneratorBasedBuilder):
  """Like cifar10: hands arrays to tfds.features.Image, which needs TensorFlow to encode."""

  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return tfds.core.DatasetInfo(builder=self,
                                 features=tfds.features.FeaturesDict({'image': tfds.features.Image(shape=(4, 4, 3))}))

  def _split_generators(self, dl_manager):
    return {'train': self._generate_examples()}

  def _generate_examples(self):
    yield 0, {'image': np.zeros((4, 4, 3), np.uint8)}


def test_prepare_tfds_errors(tmp_path):
  raises(lambda: staging.prepare_tfds('no_such_dataset_xyz', tmp_path / 'out'), 'no_such_dataset_xyz')
  assert_clean(tmp_path / 'out')
  try:
    import tensorflow  # pylint: disable=g-import-not-at-top,unused-import
    pytest.skip('TensorFlow is installed: catalogue sets encode fine')
  except ImportError:
    pass
  assert 'TensorFlow' in raises(lambda: staging.prepare_tfds('numpy_images', tmp_path / 'out'), 'numpy_images')
  left = [p.relative_to(tmp_path / 'out').as_posix() for p in (tmp_path / 'out').rglob('*')]
  assert set(left) <= {'downloads', 'downloads/extracted'}, left  # Downloads are kept for a retry.


# ---------------------------------------------------------------------------
# Shared real data


@pytest.fixture(scope='module')
def cifar_real(tmp_path_factory):
  return folders.prepare_folder(shared('cifar10_test'), tmp_path_factory.mktemp('cifar'), name='cifar10_test',
                                channels=3)


@pytest.mark.slow
def test_cifar_folder_real(cifar_real):
  ds = raw(cifar_real)
  assert cifar_real.info.features['label'].names[:2] == ['airplane', 'automobile']
  counts = collections.Counter(sum((labels_of(ds[s]) for s in folders.SPLITS), []))
  assert sum(counts.values()) == 10_000 and set(counts.values()) == {1000}
  decoded = cifar_real.as_data_source()
  for s in folders.SPLITS:
    assert decoded[s][0]['image'].shape == (32, 32, 3)
