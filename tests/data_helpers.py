"""Helpers shared by the data-builder tests (test_data_ultrasound.py, test_data_folders.py): tiny image files,
one-line-error checks, label counting and the shared real-data copies."""

from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from usjax.data import DataError

SHARED = Path(__file__).resolve().parents[2] / 'shared' / 'data'


def png(path, arr=None, size=(6, 8), value=0):
  """Writes a tiny image (size is (H, W)); returns its path."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  arr = np.full(size, value, np.uint8) if arr is None else arr
  Image.fromarray(arr).save(path)
  return path


def truncate(path):
  data = Path(path).read_bytes()
  Path(path).write_bytes(data[:len(data) // 2])


def assert_clean(data_dir):
  """Nothing half-prepared: no data set folder, staging or incomplete dir."""
  left = [str(p) for p in Path(data_dir).rglob('*')] if Path(data_dir).exists() else []
  assert not left, left


def raises(fn, *names):
  """Calls fn, expects a one-line DataError naming every given file or folder."""
  with pytest.raises(DataError) as e:
    fn()
  msg = str(e.value)
  assert '\n' not in msg, msg
  for name in names:
    assert str(name) in msg, msg
  return msg


def labels_of(source):
  return [source[i]['label'] for i in range(len(source))]


def raw(builder):
  """Data sources that leave images encoded: counting labels need not decode them."""
  keys = [k for k in ('image', 'mask') if k in builder.info.features]
  return builder.as_data_source(decoders={k: tfds.decode.SkipDecoding() for k in keys})


def shared(name):
  path = SHARED / name
  if not path.is_dir():
    pytest.skip(f'shared data {path} not present')
  return path
