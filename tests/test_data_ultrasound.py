"""Builders for the ultrasound data sets: BUSI, POCUS and CAMUS on tiny files made here (layout, bad input), then
the shared BUSI and POCUS copies."""

import collections
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from usjax.data import busi
from usjax.data import camus
from usjax.data import folders
from usjax.data import imageio
from usjax.data import pocus

from data_helpers import assert_clean, labels_of, png, raises, raw, shared, truncate

# ---------------------------------------------------------------------------
# BUSI, synthetic


def make_busi(root, n=10):
  inner = root / 'Dataset_BUSI_with_GT'
  lesion, extra = np.zeros((2, 6, 8), np.uint8)
  lesion[1:3, 1:3] = extra[4:, 5:] = 255
  for cls in busi.CLASSES:
    for i in range(1, n + 1):
      png(inner / cls / f'{cls} ({i}).png', value=i)
      png(inner / cls / f'{cls} ({i})_mask.png', lesion * (cls != 'normal'))
  png(inner / 'benign' / 'benign (1)_mask_1.png', extra)
  return inner


def test_busi_synthetic_build_reuse_and_merge(tmp_path):
  inner = make_busi(tmp_path / 'busi')
  builder = busi.prepare(tmp_path / 'busi', tmp_path / 'out')
  again = busi.prepare(inner, tmp_path / 'out')
  assert again.info.config_name == builder.info.config_name
  other = busi.prepare(inner, tmp_path / 'out', seed=1)
  assert other.info.config_name != builder.info.config_name
  ds = builder.as_data_source()
  assert {s: len(ds[s]) for s in folders.SPLITS} == {'train': 21, 'val': 3, 'test': 6}
  ex = next(ds[s][i] for s in ds for i in range(len(ds[s])) if ds[s][i]['id'] == b'benign/benign (1).png')
  assert ex['image'].shape == ex['mask'].shape == (6, 8, 1)
  assert ex['mask'][..., 0].sum() == 255 * (4 + 6)  # Both lesions merged.
  assert set(np.unique(ex['mask'])) <= {0, 255}
  assert sorted(os.listdir(tmp_path / 'out')) == ['busi']


@pytest.mark.parametrize('case', [
    'missing', 'layout', 'no_class', 'empty_class', 'no_mask', 'orphan_mask', 'mask_size', 'corrupt', 'truncated',
    'sixteen_bit'
])
def test_busi_bad_input(tmp_path, case):
  inner = make_busi(tmp_path / 'busi')
  benign = inner / 'benign'
  manual, names = tmp_path / 'busi', []
  if case == 'missing':
    manual = tmp_path / 'nowhere'
    names = [manual]
  elif case == 'layout':
    manual = png(tmp_path / 'cats' / 'tabby' / 'a.png').parents[1]
    names = [manual, 'Dataset_BUSI_with_GT/{benign,malignant,normal}']
  elif case in ('no_class', 'empty_class'):
    shutil.rmtree(inner / 'normal')
    if case == 'empty_class':
      (inner / 'normal').mkdir()
    names = [inner / 'normal', 'not found' if case == 'no_class' else 'empty']
  elif case == 'no_mask':
    (benign / 'benign (3)_mask.png').unlink()
    names = [benign / 'benign (3).png', 'no mask']
  elif case == 'orphan_mask':
    (benign / 'benign (3).png').unlink()
    names = [benign / 'benign (3)_mask.png']
  elif case == 'mask_size':
    png(benign / 'benign (4)_mask.png', size=(6, 9))
    names = [benign / 'benign (4)_mask.png', '9x6', '8x6']
  elif case == 'corrupt':
    (benign / 'benign (5).png').write_bytes(b'\x89PNG garbage')
    names = [benign / 'benign (5).png']
  elif case == 'truncated':
    png(benign / 'benign (6).png', np.random.default_rng(0).integers(0, 255, (6, 8), np.uint8))
    truncate(benign / 'benign (6).png')
    names = [benign / 'benign (6).png']
  elif case == 'sixteen_bit':
    png(benign / 'benign (7).png', np.full((6, 8), 999, np.uint16))
    names = [benign / 'benign (7).png', '16-bit']
  raises(lambda: busi.prepare(manual, tmp_path / 'out'), *names)
  assert_clean(tmp_path / 'out')


# ---------------------------------------------------------------------------
# POCUS, CAMUS: synthetic


def make_pocus(root):
  for cls, videos in (('covid', 4), ('pneumonia', 2), ('regular', 6)):
    for v in range(videos):
      for f in range(5):
        png(root / 'image_dataset' / cls / f'{cls[:3].title()}_vid{v}.mp4_frame{f * 7}.jpg', value=v)
  png(root / 'image_dataset' / 'covid' / 'Cov_paper_Fig1.png')
  png(root / 'pocus_images' / 'convex' / 'Cov_paper_Fig1.png')
  png(root / 'pocus_images' / 'linear' / 'Pneu_site_2.png')
  (root / 'dataset_metadata.csv'
  ).write_text('Filename,Label,Patient ID / Name\nCov_vid0,COVID-19,7\nCov_vid1,COVID-19,7\nReg_vid0,regular,\n')


def test_pocus_synthetic_groups(tmp_path):
  make_pocus(tmp_path / 'pocus')
  assert pocus.source_of('Reg_pat1Image_133138.mpeg_frame13.jpg') == 'Reg_pat1Image_133138'
  assert pocus.source_of('Cov_Oliviera_2020_Fig4A.jpg') == 'Cov_Oliviera_2020_Fig4A'
  items = pocus.scan(str(tmp_path / 'pocus'))
  group = {it.id: it.group for it in items}
  frames = 'image_dataset/covid/Cov_vid0.mp4_frame0.jpg', 'image_dataset/covid/Cov_vid1.mp4_frame7.jpg'
  assert group[frames[0]] == group[frames[1]] == 'patient:7'
  assert group['image_dataset/regular/Reg_vid0.mp4_frame0.jpg'] == 'video:Reg_vid0'
  assert group['pocus_images/convex/Cov_paper_Fig1.png'] == group['image_dataset/covid/Cov_paper_Fig1.png']
  label = {it.id: pocus.CLASSES[it.label] for it in items}
  assert label['pocus_images/linear/Pneu_site_2.png'] == 'pneumonia'
  builder = pocus.prepare(tmp_path / 'pocus', tmp_path / 'out', group_by='video')
  ds = builder.as_data_source()
  assert sum(len(ds[s]) for s in folders.SPLITS) == 63
  assert_groups_disjoint(ds)


def assert_groups_disjoint(ds):
  seen = {s: {ds[s][i]['group'] for i in range(len(ds[s]))} for s in folders.SPLITS}
  assert not seen['train'] & seen['val'] and not seen['train'] & seen['test'] and not seen['val'] & seen['test']


def test_pocus_bad_input(tmp_path):
  make_pocus(tmp_path / 'pocus')
  raises(lambda: pocus.prepare(tmp_path / 'x', tmp_path / 'out'), tmp_path / 'x')
  raises(lambda: pocus.prepare(tmp_path / 'pocus' / 'pocus_images', tmp_path / 'out'), 'image_dataset/')
  (tmp_path / 'pocus' / 'image_dataset' / 'extra').mkdir()
  raises(lambda: pocus.prepare(tmp_path / 'pocus', tmp_path / 'out'), tmp_path / 'pocus' / 'image_dataset' / 'extra')
  assert_clean(tmp_path / 'out')


def write_nifti(path, arr):
  path.parent.mkdir(parents=True, exist_ok=True)
  nib.Nifti1Image(arr, np.eye(4)).to_filename(path)


def make_camus(root, patients=10):
  upright = np.zeros((6, 4), np.uint8)  # (H, W): bright top row, labels 0-3 down the first rows.
  upright[0] = 200
  labels = np.repeat(np.array([0, 1, 2, 3, 0, 0], np.uint8)[:, None], 4, 1)
  for p in range(1, patients + 1):
    for view in camus.CLASSES:
      for phase in ('ED', 'ES'):
        base = root / f'patient{p:04d}' / f'patient{p:04d}_{view}_{phase}'
        stored = upright.T if p % 2 else upright.T[..., None]  # (W,H) or (W,H,1).
        write_nifti(Path(f'{base}.nii.gz'), stored)
        write_nifti(Path(f'{base}_gt.nii.gz'), labels.T)
    write_nifti(root / f'patient{p:04d}' / f'patient{p:04d}_2CH_half_sequence.nii.gz', np.zeros((4, 6, 3), np.uint8))
  return upright, labels


def test_camus_synthetic(tmp_path):
  upright, labels = make_camus(tmp_path / 'CAMUS_public' / 'database_nifti')
  builder = camus.prepare(tmp_path, tmp_path / 'out')
  lv = camus.prepare(tmp_path, tmp_path / 'out', structures=(1,))
  ds, ds_lv = builder.as_data_source(), lv.as_data_source()
  assert sum(len(ds[s]) for s in folders.SPLITS) == 40
  assert_groups_disjoint(ds)
  ex, ex_lv = ds['train'][0], ds_lv['train'][0]
  assert ex['image'][..., 0].tolist() == upright.tolist()
  assert ex['mask'][..., 0].tolist() == np.where(labels > 0, 255, 0).tolist()
  assert ex_lv['mask'][..., 0].tolist() == np.where(labels == 1, 255, 0).tolist()
  assert {ds['train'][i]['label_fraction'] for i in range(len(ds['train']))} <= {10, 25, 50, 100}


@pytest.mark.parametrize('case', ['layout', 'no_mask', 'mask_size', 'not_8bit', 'truncated'])
def test_camus_bad_input(tmp_path, case):
  make_camus(tmp_path)
  image = tmp_path / 'patient0003' / 'patient0003_4CH_ES.nii.gz'
  gt = tmp_path / 'patient0003' / 'patient0003_4CH_ES_gt.nii.gz'
  manual, names = tmp_path, [image]
  if case == 'layout':
    manual, names = tmp_path / 'patient0003', [tmp_path / 'patient0003', 'patientNNNN_{2CH,4CH}_{ED,ES}']
  elif case == 'no_mask':
    gt.unlink()
  elif case == 'mask_size':
    write_nifti(gt, np.zeros((5, 6), np.uint8))
    names = [gt]
  elif case == 'not_8bit':
    write_nifti(image, np.full((4, 6), 1000, np.int16))
  elif case == 'truncated':  # Large enough that the header survives and the pixel data does not.
    write_nifti(image, np.random.default_rng(0).integers(0, 255, (60, 80), np.uint8))
    write_nifti(gt, np.zeros((60, 80), np.uint8))
    truncate(image)
  raises(lambda: camus.prepare(manual, tmp_path / 'out'), *names)
  assert_clean(tmp_path / 'out')


# ---------------------------------------------------------------------------
# Shared real data


@pytest.fixture(scope='module')
def busi_real(tmp_path_factory):
  return busi.prepare(shared('busi'), tmp_path_factory.mktemp('busi'))


@pytest.fixture(scope='module')
def pocus_real(tmp_path_factory):
  return pocus.prepare(shared('pocus'), tmp_path_factory.mktemp('pocus'))


@pytest.mark.slow
def test_busi_real_counts_splits_fractions(busi_real):
  ds = raw(busi_real)
  per_split = {s: collections.Counter(labels_of(ds[s])) for s in folders.SPLITS}
  total = sum(per_split.values(), collections.Counter())
  assert [total[i] for i in range(3)] == [350, 168, 106]
  for s, frac in zip(folders.SPLITS, folders.DEFAULT_SPLIT):
    for c in range(3):
      assert abs(per_split[s][c] - frac * total[c]) <= 1
  train = ds['train']
  frac = np.array([train[i]['label_fraction'] for i in range(len(train))])
  labels = np.array(labels_of(train))
  for c in range(3):
    n = np.sum(labels == c)
    sizes = [np.sum((frac <= f) & (labels == c)) for f in (10, 25, 50, 100)]
    assert sizes == sorted(sizes) and sizes[-1] == n
    for f, size in zip((10, 25, 50), sizes):
      assert abs(size - f / 100 * n) <= 1
  for s in ('val', 'test'):
    assert {ds[s][i]['label_fraction'] for i in range(len(ds[s]))} == {100}


@pytest.mark.slow
def test_busi_real_masks(busi_real):
  ds = busi_real.as_data_source()
  root = shared('busi') / 'Dataset_BUSI_with_GT'
  checked = 0
  for s in folders.SPLITS:
    for i in range(len(ds[s])):
      ex = ds[s][i]
      assert ex['image'].shape == ex['mask'].shape and ex['image'].shape[-1] == 1
      assert (ex['mask'].any()) == (ex['label'] != 2), ex['id']
      if ex['id'] == b'benign/benign (195).png':
        files = sorted(root.glob('benign/benign (195)_mask*.png'))
        assert len(files) == 3
        merged = np.logical_or.reduce([imageio.read_mask(f) for f in files])
        assert np.array_equal(ex['mask'][..., 0] == 255, merged)
        assert not np.array_equal(merged, imageio.read_mask(files[0]))
        checked += 1
  assert checked == 1


@pytest.mark.slow
def test_pocus_real(pocus_real):
  ds = raw(pocus_real)
  assert sum(len(ds[s]) for s in folders.SPLITS) == 1048
  counts = collections.Counter(sum((labels_of(ds[s]) for s in folders.SPLITS), []))
  assert counts == {0: 242, 1: 2, 2: 804}  # Frames plus the 8 stills, labelled by name prefix.
  assert_groups_disjoint(ds)
  assert min(len(ds[s]) for s in folders.SPLITS) > 50
