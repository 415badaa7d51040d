"""CAMUS echocardiography (Leclerc et al., 2019), from the public NIfTI release.

Layout: `patientNNNN/patientNNNN_{2CH,4CH}_{ED,ES}.nii.gz` with `..._gt.nii.gz`
label maps (1 = LV endocardium, 2 = myocardium, 3 = left atrium), found either
directly under `manual_dir` or under `database_nifti/` or
`CAMUS_public/database_nifti/`. The `_half_sequence` cine loops are ignored: only
the annotated ED/ES frames are used, so every example has a mask.

Mask: by default the union of all three structures (the heart region), so the
binary-segmentation head learns the same foreground/background task as on BUSI;
`structures=(1,)` gives the LV cavity only. Label = view ('2CH', '4CH'); group
= patient, so no patient is on both sides of a split and label fractions count
patients (each patient contributes both views).
"""

import dataclasses
import os
import re
import zlib

import nibabel as nib
import numpy as np
import tensorflow_datasets as tfds

from usjax.data import DataError
from usjax.data import folders
from usjax.data import imageio
from usjax.data import staging

CLASSES = ('2CH', '4CH')
STRUCTURES = {1: 'LV endocardium', 2: 'myocardium', 3: 'left atrium'}
_PATIENT = re.compile(r'^patient\d+$')
_IMAGE = re.compile(r'^(?P<patient>patient\d+)_(?P<view>2CH|4CH)_(?P<phase>ED|ES)\.nii(?:\.gz)?$')
_EXPECTED = 'expected patientNNNN/patientNNNN_{2CH,4CH}_{ED,ES}.nii.gz with _gt.nii.gz masks'
_NIFTI_ERRORS = (OSError, EOFError, ValueError, zlib.error, nib.filebasedimages.ImageFileError)


def _header(path: str) -> tuple[int, int]:
  """Header-only check of a 2D NIfTI; returns the upright (height, width)."""
  if not os.path.isfile(path):
    raise DataError(f'{path}: file not found')
  try:
    shape = nib.load(path).shape
  except _NIFTI_ERRORS as e:
    raise DataError(f'{path}: not a readable NIfTI file ({imageio.reason(e, path)})') from None
  if not (len(shape) == 2 or (len(shape) == 3 and shape[2] == 1)):
    raise DataError(f'{path}: expected a 2D image stored (W,H) or (W,H,1), got shape {shape}')
  return shape[1], shape[0]


def read_nifti(path: str) -> np.ndarray:
  """Full decode of a 2D NIfTI as an upright [H, W] uint8 array (stored as (W,H) or (W,H,1))."""
  _header(path)
  try:
    arr = np.asanyarray(nib.load(path).dataobj)
  except _NIFTI_ERRORS as e:
    raise DataError(f'{path}: corrupt or truncated NIfTI file ({imageio.reason(e, path)})') from None
  arr = arr.reshape(arr.shape[:2])
  if arr.size and (arr.min() < 0 or arr.max() > 255 or not np.array_equal(arr, np.round(arr))):
    raise DataError(f'{path}: expected 8-bit values (integers 0-255), got {arr.dtype} in '
                    f'[{arr.min()}, {arr.max()}]; convert to 8-bit first')
  return np.ascontiguousarray(arr.T.astype(np.uint8))


@dataclasses.dataclass(eq=False)
class CamusConfig(folders.Config):
  structures: tuple[int, ...] = (1, 2, 3)


class Camus(folders.ManualBuilder):
  """CAMUS: ED/ES frame, binary heart mask (0/255), view, patient group, label fraction."""

  name = 'camus'
  HAS_MASK = True
  HAS_GROUP = True
  HAS_LABEL_FRACTION = True
  DESCRIPTION = 'Echocardiography ED/ES frames (CAMUS) with heart masks; 2-chamber and 4-chamber views.'
  HOMEPAGE = 'https://www.creatis.insa-lyon.fr/Challenge/camus/'
  CITATION = ('Leclerc S, et al. Deep learning for segmentation using an open large-scale dataset in 2D '
              'echocardiography. IEEE Transactions on Medical Imaging 38(9):2198-2210, 2019.')

  def _class_names(self):
    return CLASSES

  def _scan(self):
    return scan(self.builder_config.root)

  def _encode(self, item):
    image = read_nifti(item.paths[0])
    labels = read_nifti(item.paths[1])
    bad = np.setdiff1d(np.unique(labels), [0, *STRUCTURES])
    if bad.size:
      raise DataError(f'{item.paths[1]}: unexpected label values {bad.tolist()} (expected 0-3)')
    mask = np.isin(labels, self.builder_config.structures)
    return {'image': imageio.encode_png(image), 'mask': imageio.encode_png(mask)}


def find_root(manual_dir: str) -> str:
  """The folder that holds the `patientNNNN/` folders."""
  folders.require_dir(manual_dir)
  for root in (manual_dir, os.path.join(manual_dir,
                                        'database_nifti'), os.path.join(manual_dir, 'CAMUS_public', 'database_nifti')):
    if os.path.isdir(root) and any(_PATIENT.match(d) for d in folders.subdirs(root)):
      return os.path.realpath(root)
  raise DataError(f'{manual_dir}: not the CAMUS layout; {_EXPECTED}')


def scan(root: str) -> list[folders.Item]:
  """Pairs every ED/ES image with its mask and header-checks both; writes nothing."""
  items = []
  for patient in (d for d in folders.subdirs(root) if _PATIENT.match(d)):
    folder = os.path.join(root, patient)
    names = sorted(f for f in os.listdir(folder) if _IMAGE.match(f) and _IMAGE.match(f)['patient'] == patient)
    if not names:
      raise DataError(f'{folder}: no ED/ES images; {_EXPECTED}')
    for name in names:
      path = os.path.join(folder, name)
      gt = re.sub(r'(\.nii(?:\.gz)?)$', r'_gt\1', path)
      if not os.path.isfile(gt):
        raise DataError(f'{path}: image has no mask ("{os.path.basename(gt)}" expected beside it)')
      size, gt_size = _header(path), _header(gt)
      if size != gt_size:
        raise DataError(f'{gt}: mask is {gt_size[1]}x{gt_size[0]} but its image is {size[1]}x{size[0]}')
      view = _IMAGE.match(name)['view']
      items.append(folders.Item(id=f'{patient}/{name}', label=CLASSES.index(view), group=patient, paths=(path, gt)))
  return items


def prepare(manual_dir: str, data_dir: str, *, split=folders.DEFAULT_SPLIT, seed: int = 0,
            structures=(1, 2, 3)) -> tfds.core.DatasetBuilder:
  """Validates the CAMUS folder and prepares it once under `data_dir` (array_record).

  `structures` picks which labels form the mask: (1, 2, 3) the whole heart
  region (default), (1,) the LV cavity only.
  """
  root = find_root(os.fspath(manual_dir))
  structures = tuple(sorted(set(int(s) for s in structures)))
  if not structures or not set(structures) <= set(STRUCTURES):
    raise DataError(f'{manual_dir}: structures must be a non-empty subset of {tuple(STRUCTURES)}, got {structures}')
  config = CamusConfig(name=folders.config_name(root, split, seed, 'm' + ''.join(map(str, structures))),
                       description=f'{root}, split={folders.check_split(split)}, seed={seed}, structures={structures}',
                       root=root, split=folders.check_split(split), seed=seed, structures=structures)
  return staging.build(lambda d: Camus(data_dir=d, config=config, file_format='array_record'), data_dir)
