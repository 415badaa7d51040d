"""POCUS lung ultrasound (Born et al., 2021): video frames and stills, classification only.

Layout: `image_dataset/{covid,pneumonia,regular}/` holds frames named after their
source video (`Cov_..._v1.mov_frame13.jpg`) and a few stills (`Cov_..._Fig4A.jpg`);
the optional `pocus_images/{convex,linear}/` holds stills sorted by probe, some of
them byte-identical to stills in `image_dataset/`. `dataset_metadata.csv` (the
data set's own) maps each video or still to a patient.

Labels: the class folder for `image_dataset/`; for `pocus_images/` stills the file
name prefix the data set uses (`Cov_`, `Pneu_`, `Reg_`), else 'other' (also used
for any extra class folder, e.g. a 'viral' one in other releases).

Groups: frames never straddle splits. `group_by='patient'` (default) keeps every
video and still of one patient together, using the metadata's patient column,
and falls back to the source video where it has none; `group_by='video'` keeps
only frames of one video together. Duplicated stills share a name, so they
share a group either way.
"""

import csv
import dataclasses
import os
import re

import tensorflow_datasets as tfds

from usjax.data import DataError
from usjax.data import folders
from usjax.data import imageio
from usjax.data import staging

CLASSES = ('covid', 'pneumonia', 'regular', 'other')
_FRAMES, _STILLS, _METADATA = 'image_dataset', 'pocus_images', 'dataset_metadata.csv'
_EXPECTED = f'expected {_FRAMES}/{{covid,pneumonia,regular}}/ (and optionally {_STILLS}/<probe>/)'
_PREFIX = {'cov': 'covid', 'pneu': 'pneumonia', 'reg': 'regular'}
# 'Reg_pat1Image_133138.mpeg_frame13' -> 'Reg_pat1Image_133138'.
_FRAME = re.compile(r'^(?P<source>.+?)(?:\.[A-Za-z0-9]+)?_frame\d+$')


class Pocus(folders.ManualBuilder):
  """POCUS: grayscale frame or still, class, source group (patient or video)."""

  name = 'pocus'
  HAS_GROUP = True
  DESCRIPTION = 'Lung ultrasound frames and stills (POCUS COVID-19 data set); covid/pneumonia/regular.'
  HOMEPAGE = 'https://github.com/jannisborn/covid19_ultrasound'
  CITATION = ('Born J, et al. Accelerating detection of lung pathologies with explainable ultrasound '
              'image analysis. Applied Sciences 11(2):672, 2021.')

  def _class_names(self):
    return CLASSES

  def _scan(self):
    return scan(self.builder_config.root, self.builder_config.group_by)

  def _encode(self, item):
    return {'image': imageio.image_png(item.paths[0], 1)}


def source_of(filename: str) -> str:
  """The source video (or still) a file comes from: its name without frame suffix and extension."""
  stem = os.path.splitext(os.path.basename(filename))[0]
  m = _FRAME.match(stem)
  return m['source'] if m else stem


def _patients(root: str) -> dict[str, str]:
  """{source name (lower case): patient id} from the metadata, when present."""
  path = os.path.join(root, _METADATA)
  if not os.path.isfile(path):
    return {}
  try:
    with open(path, newline='', encoding='utf-8', errors='replace') as f:
      rows = list(csv.DictReader(f))
  except csv.Error as e:
    raise DataError(f'{path}: unreadable CSV ({e})') from None
  if not rows:
    return {}
  column = next((c for c in rows[0] if c and c.lower().startswith('patient id')), None)
  if column is None or 'Filename' not in rows[0]:
    raise DataError(f'{path}: expected "Filename" and "Patient ID / Name" columns')
  return {(r['Filename'] or '').strip().lower(): r[column].strip() for r in rows if (r[column] or '').strip()}


def find_root(manual_dir: str) -> str:
  """Accepts the folder holding `image_dataset/` or the parent of a `pocus/` folder."""
  folders.require_dir(manual_dir)
  for root in (manual_dir, os.path.join(manual_dir, 'pocus')):
    if os.path.isdir(os.path.join(root, _FRAMES)):
      for c in CLASSES[:3]:
        folders.require_dir(os.path.join(root, _FRAMES, c), f'class folder not found; {_EXPECTED}')
      return os.path.realpath(root)
  raise DataError(f'{manual_dir}: not the POCUS layout; {_EXPECTED}')


def scan(root: str, group_by: str = 'patient') -> list[folders.Item]:
  """Lists and header-checks every frame and still; writes nothing."""
  if group_by not in ('patient', 'video'):
    raise DataError(f"{root}: group_by must be 'patient' or 'video', got {group_by!r}")
  patients = _patients(root) if group_by == 'patient' else {}
  entries = []  # (path, label name)
  frames = os.path.join(root, _FRAMES)
  for cls in folders.subdirs(frames):
    paths = folders.list_images(os.path.join(frames, cls), recursive=True)
    if not paths:
      raise DataError(f'{os.path.join(frames, cls)}: empty class folder (no PNG/JPEG images)')
    entries += [(path, cls if cls in CLASSES else 'other') for path in paths]
  stills = os.path.join(root, _STILLS)
  if os.path.isdir(stills):
    for probe in folders.subdirs(stills):
      for path in folders.list_images(os.path.join(stills, probe), recursive=True):
        prefix = os.path.basename(path).split('_', 1)[0].lower()
        entries.append((path, _PREFIX.get(prefix, 'other')))
  items = []
  for path, cls in entries:
    imageio.check_image(path)
    source = source_of(path)
    patient = patients.get(source.lower())
    group = f'patient:{patient}' if patient else f'video:{source}'
    rel = os.path.relpath(path, root).replace(os.sep, '/')
    items.append(folders.Item(id=rel, label=CLASSES.index(cls), group=group, paths=(path,)))
  return items


@dataclasses.dataclass(eq=False)
class PocusConfig(folders.Config):
  group_by: str = 'patient'


def prepare(manual_dir: str, data_dir: str, *, split=folders.DEFAULT_SPLIT, seed: int = 0,
            group_by: str = 'patient') -> tfds.core.DatasetBuilder:
  """Validates the POCUS folder and prepares it once under `data_dir` (array_record)."""
  root = find_root(os.fspath(manual_dir))
  if group_by not in ('patient', 'video'):
    raise DataError(f"{manual_dir}: group_by must be 'patient' or 'video', got {group_by!r}")
  config = PocusConfig(name=folders.config_name(root, split, seed, f'by{group_by}'),
                       description=f'{root}, split={folders.check_split(split)}, seed={seed}, group_by={group_by}',
                       root=root, split=folders.check_split(split), seed=seed, group_by=group_by)
  return staging.build(lambda d: Pocus(data_dir=d, config=config, file_format='array_record'), data_dir)
