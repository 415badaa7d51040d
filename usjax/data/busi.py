"""BUSI breast-ultrasound lesion segmentation (Al-Dhabyani et al., 2020), from the Kaggle download.

Layout: `Dataset_BUSI_with_GT/{benign,malignant,normal}/` holding `benign (1).png`
and its mask `benign (1)_mask.png`, plus `_mask_1.png`, `_mask_2.png`, ... where an
image shows several lesions; these are merged (logical OR) into one mask. Normal
images come with empty masks. Images are grayscale or RGB (stored as grayscale).
"""

import collections
import os
import re

import tensorflow_datasets as tfds

from usjax.data import DataError
from usjax.data import folders
from usjax.data import imageio
from usjax.data import staging

CLASSES = ('benign', 'malignant', 'normal')
_INNER = 'Dataset_BUSI_with_GT'
_EXPECTED = f'expected {_INNER}/{{{",".join(CLASSES)}}}/ with "<name>.png" and "<name>_mask.png"'
_MASK = re.compile(r'^(?P<stem>.+)_mask(?:_\d+)?$')


class Busi(folders.ManualBuilder):
  """BUSI: image, merged lesion mask (0/255), class, label fraction."""

  name = 'busi'
  HAS_MASK = True
  HAS_LABEL_FRACTION = True
  DESCRIPTION = 'Breast ultrasound images (BUSI) with lesion masks; benign/malignant/normal.'
  HOMEPAGE = 'https://scholar.cu.edu.eg/?q=afahmy/pages/dataset'
  CITATION = ('Al-Dhabyani W, Gomaa M, Khaled H, Fahmy A. Dataset of breast ultrasound images. '
              'Data in Brief 28:104863, 2020.')

  def _class_names(self):
    return CLASSES

  def _scan(self):
    return scan(self.builder_config.root)

  def _encode(self, item):
    mask = None
    for path in item.paths[1:]:
      mask = imageio.read_mask(path) if mask is None else mask | imageio.read_mask(path)
    return {'image': imageio.image_png(item.paths[0], 1), 'mask': imageio.encode_png(mask)}


def find_root(manual_dir: str) -> str:
  """Accepts the folder holding `Dataset_BUSI_with_GT/` or that folder itself."""
  folders.require_dir(manual_dir)
  for root in (manual_dir, os.path.join(manual_dir, _INNER)):
    if any(os.path.isdir(os.path.join(root, c)) for c in CLASSES):
      for c in CLASSES:
        folders.require_dir(os.path.join(root, c), f'class folder not found; {_EXPECTED}')
      return os.path.realpath(root)
  raise DataError(f'{manual_dir}: not the BUSI layout; {_EXPECTED}')


def scan(root: str) -> list[folders.Item]:
  """Pairs every image with its masks and header-checks them all; writes nothing."""
  items = []
  for label, cls in enumerate(CLASSES):
    folder = os.path.join(root, cls)
    paths = folders.list_images(folder)
    if not paths:
      raise DataError(f'{folder}: empty class folder (no PNG/JPEG images)')
    images, masks = {}, collections.defaultdict(list)
    for path in paths:
      stem = os.path.splitext(os.path.basename(path))[0]
      m = _MASK.match(stem)
      if m:
        masks[m['stem']].append(path)
      else:
        images[stem] = path
    orphans = sorted(set(masks) - set(images))
    if orphans:
      raise DataError(f'{masks[orphans[0]][0]}: mask without an image ("{orphans[0]}.png" expected beside it)')
    for stem, path in sorted(images.items(), key=lambda kv: _natural(kv[0])):
      if not masks[stem]:
        raise DataError(f'{path}: image has no mask ("{stem}_mask.png" expected beside it)')
      size = imageio.check_image(path)
      for mask in sorted(masks[stem]):
        mask_size = imageio.check_image(mask)
        if mask_size != size:
          raise DataError(f'{mask}: mask is {mask_size[1]}x{mask_size[0]} but its image is {size[1]}x{size[0]}')
      rel = f'{cls}/{os.path.basename(path)}'
      items.append(folders.Item(id=rel, label=label, group=rel, paths=(path, *sorted(masks[stem]))))
  return items


def _natural(stem: str):
  return [int(t) if t.isdigit() else t for t in re.split(r'(\d+)', stem)]


def prepare(manual_dir: str, data_dir: str, *, split=folders.DEFAULT_SPLIT, seed: int = 0, folds: int = 0,
            fold: int = 0, dedup: float = 0.0, keep_conflicts: bool = False) -> tfds.core.DatasetBuilder:
  """Validates the BUSI folder and prepares it once under `data_dir` (array_record); `folds`/`fold`, `dedup` and
  `keep_conflicts` as in `folders.Config` (near-duplicate groups kept inside one split, k-fold splits)."""
  root = find_root(os.fspath(manual_dir))
  folds, fold = folders.check_folds(folds, fold)
  opts = dict(folds=folds, fold=fold, dedup=float(dedup), keep_conflicts=bool(keep_conflicts))
  config = folders.Config(name=folders.config_name(root, split, seed, **opts),
                          description=f'{root}, split={folders.check_split(split)}, seed={seed}, {opts}', root=root,
                          split=folders.check_split(split), seed=seed, **opts)
  return staging.build(lambda d: Busi(data_dir=d, config=config, file_format='array_record'), data_dir)
