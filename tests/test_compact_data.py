"""launch/compact_data.py on small generated BUSI, POCUS and image-folder trees: same names, downscaled sizes, binary
masks, the same splits from the project's builders, and bad input failing in one line with nothing left behind."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from usjax.data import DataError, imageio

from data_helpers import png, raises, truncate

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("compact_data", ROOT / "launch" / "compact_data.py")
compact_data = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(compact_data)

MAX_SIDE = 16


def noise(shape, seed):
  return np.random.default_rng(seed).integers(0, 255, shape, np.uint8)


def make_source(root: Path) -> Path:
  """BUSI (grayscale and RGB images, 1-bit and colour masks, two-lesion image, one small image), POCUS (JPEG
  frames, RGBA PNG stills, metadata grouping two videos into one patient) and a CIFAR-like folder, 12 per class."""
  busi = root / 'busi' / 'Dataset_BUSI_with_GT'
  for c, cls in enumerate(('benign', 'malignant', 'normal')):
    for i in range(1, 11):
      shape = (30, 50) if i % 2 else (44, 20)
      image = noise(shape + (3,) if i == 3 else shape, 10 * c + i)
      lesion = np.zeros(shape, bool)
      lesion[5:20, 4:15] = cls != 'normal'
      png(busi / cls / f'{cls} ({i}).png', image)
      png(busi / cls / f'{cls} ({i})_mask.png', lesion if i % 3 else np.stack([lesion * 255] * 3, -1).astype(np.uint8))
  png(busi / 'benign' / 'benign (1)_mask_1.png', np.pad(np.ones((4, 4), bool), ((20, 6), (30, 16))))
  png(busi / 'benign' / 'benign (11).png', noise((10, 12), 99))  # already small: keeps its size
  png(busi / 'benign' / 'benign (11)_mask.png', np.eye(10, 12, dtype=bool))
  pocus = root / 'pocus'
  for cls, videos in (('covid', 4), ('pneumonia', 2), ('regular', 6)):
    for v in range(videos):
      for f in range(5):
        png(pocus / 'image_dataset' / cls / f'{cls[:3].title()}_vid{v}.mp4_frame{f * 7}.jpg', noise((40, 60, 3), v))
  png(pocus / 'image_dataset' / 'covid' / 'Cov_paper_Fig1.png', noise((36, 24, 4), 1))
  png(pocus / 'pocus_images' / 'convex' / 'Cov_paper_Fig1.png', noise((36, 24, 4), 1))
  png(pocus / 'pocus_images' / 'linear' / 'Pneu_site_2.png', noise((20, 20), 2))
  (pocus / 'dataset_metadata.csv'
  ).write_text('Filename,Label,Patient ID / Name\nCov_vid0,COVID-19,7\nCov_vid1,COVID-19,7\nReg_vid0,regular,\n')
  (pocus / 'frame_licenses.csv').write_text('path,license\nimage_dataset/covid/Cov_vid0.mp4_frame0.jpg,CC BY 4.0\n')
  for cls in ('cat', 'dog', 'ship'):
    for i in range(12):
      png(root / 'cifar10_test' / cls / f'{i:04d}.jpg', noise((8, 8, 3), i))
  (root / 'README.md').write_text('licences\n')
  return root


def files(root: Path) -> set[str]:
  return {p.relative_to(root).as_posix() for p in root.rglob('*') if p.is_file()}


def test_copy_keeps_names_downscales_and_builders_give_the_same_splits(tmp_path, capsys):
  src, out = make_source(tmp_path / 'src'), tmp_path / 'cache' / 'compact'
  sizes = compact_data.compact(src, out, max_side=MAX_SIDE, natural_per_class=10)
  kept = {f for f in files(src) if not (f.startswith('cifar10_test/') and f.endswith(('0010.jpg', '0011.jpg')))}
  assert files(out) == kept | {'compact.json'}
  assert sizes['cifar10_test']['files'] == 30 and sizes['pocus']['files'] == 65
  assert sorted(os.listdir(out.parent)) == ['compact']  # no temporary folder left
  for rel in files(src):
    if rel.startswith(('busi/', 'pocus/')) and imageio.is_image_file(rel):
      with Image.open(src / rel) as a, Image.open(out / rel) as b:
        assert b.size == compact_data.target_size(*a.size, MAX_SIDE) and max(b.size) <= MAX_SIDE, rel
        assert b.format == ('PNG' if rel.endswith('.png') else 'JPEG') and b.mode == 'L', rel
        if rel.startswith('busi/') and '_mask' in rel:
          arr = np.asarray(b)
          assert set(np.unique(arr)) <= {0, 255}, rel
          want = Image.fromarray(imageio.read_mask(src / rel).astype(np.uint8) * 255).resize(b.size, Image.NEAREST)
          assert np.array_equal(arr, np.asarray(want)), rel
  busi = 'busi/Dataset_BUSI_with_GT/benign/'
  assert Image.open(out / f'{busi}benign (11).png').size == (12, 10)
  assert Image.open(out / f'{busi}benign (1).png').size == (16, 10)  # 50x30 -> 16x10
  for rel in ('pocus/dataset_metadata.csv', 'pocus/frame_licenses.csv', 'cifar10_test/cat/0003.jpg', 'README.md'):
    assert (out / rel).read_bytes() == (src / rel).read_bytes(), rel
  capsys.readouterr()
  assert compact_data.check(src, out)  # BUSI and POCUS: the same ids in each split as from the source
  lines = capsys.readouterr().out.splitlines()
  assert sum('same ids as the source' in line for line in lines) == 6 and not any('DIFFERENT' in l for l in lines)
  assert sum(line.startswith('check natural') for line in lines) == 3


def run_cli(*args):
  return subprocess.run([sys.executable, str(ROOT / 'launch' / 'compact_data.py'), *map(str, args)],
                        capture_output=True, text=True, timeout=300)


def error_line(proc) -> str:
  errors = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith('error:')]
  assert proc.returncode == 1 and len(errors) == 1, proc.stdout + proc.stderr
  return errors[0]


@pytest.mark.parametrize('case', ['no_pocus', 'busi_orphan_mask', 'natural_flat'])
def test_wrong_layout_fails_in_one_line_and_writes_nothing(tmp_path, case):
  src = make_source(tmp_path / 'src')
  if case == 'no_pocus':
    os.rename(src / 'pocus', src / 'lung')
    name = src / 'pocus'
  elif case == 'busi_orphan_mask':
    name = src / 'busi' / 'Dataset_BUSI_with_GT' / 'malignant' / 'malignant (4)_mask.png'
    (name.parent / 'malignant (4).png').unlink()
  else:
    png(src / 'cifar10_test' / 'stray.jpg')
    name = src / 'cifar10_test'
  proc = run_cli(f'--data_root={src}', f'--out={tmp_path / "cache" / "compact"}', f'--max_side={MAX_SIDE}')
  assert str(name) in error_line(proc)
  assert not (tmp_path / 'cache').exists() or not os.listdir(tmp_path / 'cache')


def test_bad_image_while_writing_leaves_nothing_and_out_is_kept_unless_forced(tmp_path):
  src, out = make_source(tmp_path / 'src'), tmp_path / 'cache' / 'compact'
  bad = src / 'pocus' / 'image_dataset' / 'regular' / 'Reg_vid5.mp4_frame28.jpg'
  truncate(bad)  # its header passes the scan; the full decode while writing fails
  raises(lambda: compact_data.compact(src, out, max_side=MAX_SIDE), bad)
  assert not os.listdir(out.parent)
  png(bad, noise((40, 60, 3), 5))
  compact_data.compact(src, out, max_side=MAX_SIDE)
  assert 'exists' in error_line(run_cli(f'--data_root={src}', f'--out={out}'))
  compact_data.compact(src, out, max_side=8, force=True)
  assert sorted(os.listdir(out.parent)) == ['compact']
  assert max(Image.open(out / 'busi/Dataset_BUSI_with_GT/normal/normal (2).png').size) == 8
  with pytest.raises(DataError):
    compact_data.compact(src, tmp_path / 'other', max_side=0)
