"""grain pipelines: exact batches, mixing weights, per-process shards, resumable iterators, aspect handling."""
import os

import jax
import numpy as np
import pytest
from PIL import Image

from configs import default
from usjax.data import DataError, pipeline, sources

from conftest import SHARED_DATA


def data_cfg(tmp_path, **kw):
  c = default.get_config().data
  c.data_dir = str(tmp_path)
  c.synthetic_size = c.image_size = 32
  c.synthetic_num_images = 40
  for k, v in kw.items():
    setattr(c, k, v)
  return c


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
  return tmp_path_factory.mktemp("synth")


def test_to_square_aspect_modes():
  img = np.zeros((20, 40, 1), np.uint8)
  img[:, :20] = 200
  pad = pipeline.to_square(img, 40, "pad", Image.NEAREST)
  assert pad.shape == (40, 40, 1)
  assert pad[:10].max() == 0 and pad[30:].max() == 0  # black bands above and below
  np.testing.assert_array_equal(pad[10:30], img)  # the original, unscaled
  crop = pipeline.to_square(img, 20, "crop", Image.NEAREST)
  np.testing.assert_array_equal(crop, img[:, 10:30])  # the centred square
  assert pipeline.to_square(img, 16, "stretch", Image.BILINEAR).shape == (16, 16, 1)
  with pytest.raises(DataError, match="aspect"):
    pipeline.to_square(img, 16, "squash", Image.BILINEAR)


def test_channels_conversion_uses_luminance():
  rgb = np.zeros((2, 2, 3), np.uint8)
  rgb[..., 1] = 100
  np.testing.assert_array_equal(pipeline.to_channels(rgb, 1), np.full((2, 2, 1), 59, np.uint8))
  assert pipeline.to_channels(np.ones((2, 2, 1), np.uint8), 3).shape == (2, 2, 3)


def test_pretrain_batches_exact_and_mixture_follows_weights(synth):
  cfg = data_cfg(synth, pretrain_sources="synthetic_breast,synthetic_heart", pretrain_weights="3,1")
  it = iter(pipeline.pretrain_dataset(cfg, global_batch=8, seed=0))
  batches = [next(it) for _ in range(12)]
  assert all(b["image"].shape == (8, 32, 32, 1) and b["image"].dtype == np.uint8 for b in batches)
  # heart images are black outside the fan: count them by their top-left corner
  imgs = np.concatenate([b["image"] for b in batches])
  heart = np.mean(imgs[:, :3, :3].max(axis=(1, 2, 3)) == 0)
  assert 0.15 <= heart <= 0.35  # weight 1 of 4


def test_iterator_state_restores_the_stream(synth):
  cfg = data_cfg(synth, pretrain_sources="synthetic_breast,synthetic_lung")
  it = iter(pipeline.pretrain_dataset(cfg, global_batch=4, seed=1))
  for _ in range(3):
    next(it)
  state = it.get_state()
  expected = [next(it)["image"] for _ in range(2)]
  again = iter(pipeline.pretrain_dataset(cfg, global_batch=4, seed=1))
  again.set_state(state)
  for e in expected:
    np.testing.assert_array_equal(next(again)["image"], e)


def test_processes_read_disjoint_shards(synth, monkeypatch):
  cfg = data_cfg(synth, pretrain_sources="synthetic_breast")
  seen = []
  for pi in range(2):
    monkeypatch.setattr(jax, "process_index", lambda pi=pi: pi)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "device_count", lambda: 2)
    b = next(iter(pipeline.pretrain_dataset(cfg, global_batch=4, seed=0)))
    assert b["image"].shape[0] == 2  # the local half of the global batch
    seen.append(b["image"])
  assert not np.array_equal(seen[0], seen[1])


def test_finetune_subset_is_the_recorded_label_fraction(synth):
  cfg = data_cfg(synth, label_fraction=50)
  ds, n = pipeline.finetune_dataset(cfg, global_batch=4, seed=0)
  light = sources.open_split("synthetic_breast", "train", cfg)
  assert n == sum(int(light[i]["label_fraction"]) <= 50 for i in range(len(light)))
  b = next(iter(ds))
  assert b["image"].shape == (4, 32, 32, 1) and set(np.unique(b["mask"])) <= {0, 1}
  with pytest.raises(DataError, match="label_fraction"):
    pipeline.finetune_dataset(data_cfg(synth, label_fraction=30), 4, 0)


def test_eval_batches_cover_split_once_with_padding(synth):
  cfg = data_cfg(synth)
  batches = list(pipeline.eval_batches(cfg, "test", global_batch=3))
  index = np.concatenate([b["index"] for b in batches])
  assert sorted(index[index >= 0].tolist()) == list(range(8))
  assert all(b["image"].shape[0] == 3 for b in batches)


def test_bad_source_names_and_weights(synth):
  with pytest.raises(DataError, match="unknown source 'sythetic_lung'"):
    pipeline.pretrain_dataset(data_cfg(synth, pretrain_sources="sythetic_lung"), 4, 0)
  with pytest.raises(DataError, match="weights"):
    pipeline.pretrain_dataset(data_cfg(synth, pretrain_sources="synthetic_lung", pretrain_weights="1,2"), 4, 0)
  with pytest.raises(DataError, match="busi_dir"):
    pipeline.pretrain_dataset(data_cfg(synth, pretrain_sources="busi"), 4, 0)


@pytest.mark.slow  # prepares and streams the shared real data
@pytest.mark.skipif(not os.path.isdir(os.path.join(SHARED_DATA, "busi")), reason="../shared/data is absent")
def test_real_multi_source_mixture_streams(tmp_path_factory):
  d = tmp_path_factory.mktemp("real")
  cfg = data_cfg(d, pretrain_sources="busi,pocus,natural", pretrain_weights="1,1,1", image_size=64,
                 busi_dir=os.path.join(SHARED_DATA, "busi"), pocus_dir=os.path.join(SHARED_DATA, "pocus"),
                 natural_dir=os.path.join(SHARED_DATA, "cifar10_test"))
  it = iter(pipeline.pretrain_dataset(cfg, global_batch=16, seed=0))
  for _ in range(3):
    b = next(it)
    assert b["image"].shape == (16, 64, 64, 1) and b["image"].dtype == np.uint8
