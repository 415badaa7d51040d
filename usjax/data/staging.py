"""The atomic prepare step every builder shares, and TFDS catalogue sets prepared through it.

Preparation runs in a hidden staging folder inside `data_dir` and is moved into
place only on success, so a bad input never leaves a half-prepared data set
behind; the staging folder of a preparation killed outright (it records its
owner process) is removed by the next preparation.
"""

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable

import tensorflow_datasets as tfds
from absl import logging

from usjax.data import DataError

STAGING_PREFIX = '.staging-'
_OWNER = 'owner.json'
# A leftover without an owner record (TFDS's `incomplete.*` folders, staging folders of an earlier version of
# this code, or one caught between its creation and its record's write) is removed only once it has not
# changed for this long.
_UNOWNED_GRACE_S = 3600


def _write_owner(staging: str, owner: dict) -> None:
  with open(os.path.join(staging, _OWNER), 'w') as f:
    json.dump(owner, f)


def _is_stale(path: str) -> bool:
  from usjax import runtime  # imports JAX: only when preparing
  try:
    with open(os.path.join(path, _OWNER)) as f:
      info = json.load(f)
  except (OSError, ValueError):
    info = None
  if isinstance(info, dict):
    return runtime.owner_alive(info) is False
  try:
    return time.time() - os.path.getmtime(path) > _UNOWNED_GRACE_S
  except OSError:
    return False


def remove_stale_staging(data_dir: str, incomplete_in: str | None = None) -> list[str]:
  """Removes what preparations killed before they could clean up (SIGKILL, power loss) left, and says so.

  A staging folder of `data_dir` is stale when its owner record names a process of this host that no longer runs
  (or whose pid now belongs to a later process); folders of live preparations and of other hosts sharing
  `data_dir` stay. TFDS's own `incomplete.*` folders in `incomplete_in` (the config folder of the builder
  about to be prepared; left by versions of this code that prepared in place) and staging folders without a
  record go once they have not changed for an hour. Returns the removed paths.
  """
  candidates = []
  for folder, prefix in ((data_dir, STAGING_PREFIX), (incomplete_in, 'incomplete.')):
    try:
      candidates += [os.path.join(folder, n) for n in sorted(os.listdir(folder)) if n.startswith(prefix)]
    except (OSError, TypeError):  # no such folder (yet)
      pass
  removed = []
  for path in candidates:
    if os.path.isdir(path) and not os.path.islink(path) and _is_stale(path):
      shutil.rmtree(path, ignore_errors=True)
      removed.append(path)
      logging.warning('removed %s, left by a data preparation that was killed before it finished', path)
  return removed


def build(make: Callable[[str], tfds.core.DatasetBuilder], data_dir: str,
          download_dir: str | None = None) -> tfds.core.DatasetBuilder:
  """Prepares `make(data_dir)` once; reuses it if present, leaves nothing on failure.

  TFDS itself removes its incomplete dir on failure but leaves empty dataset
  and download folders; building in a staging dir and renaming avoids both.
  """
  data_dir = os.path.abspath(os.fspath(data_dir))
  builder = make(data_dir)
  if os.path.isdir(builder.data_path) and builder.is_prepared():
    return builder
  created = not os.path.exists(data_dir)
  from usjax import runtime  # imports JAX: before the staging folder, so that it is unowned for no time at all
  owner = runtime.owner()
  try:
    os.makedirs(data_dir, exist_ok=True)
    remove_stale_staging(data_dir, os.path.dirname(os.fspath(builder.data_path)))
    staging = tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=data_dir)
  except OSError as e:  # a read-only or full file system, or a file in the way: one line, not a traceback
    raise DataError(f'{data_dir}: cannot prepare data here ({e.strerror or e}); set config.data.data_dir to a '
                    'writable folder') from None
  try:
    _write_owner(staging, owner)
    staged = make(staging)
    staged.download_and_prepare(file_format='array_record', download_dir=download_dir or
                                os.path.join(staging, 'downloads'))
    done = os.fspath(staged.data_path)
    final = os.path.join(data_dir, os.path.relpath(done, staging))
    os.makedirs(os.path.dirname(final), exist_ok=True)
    try:
      os.rename(done, final)
    except OSError:
      if not make(data_dir).is_prepared():  # Else a concurrent prepare won the race.
        raise
    meta = os.path.join(staging, staged.name, '.config')
    if os.path.isdir(meta) and not os.path.exists(os.path.join(data_dir, staged.name, '.config')):
      shutil.copytree(meta, os.path.join(data_dir, staged.name, '.config'))
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    if created and not os.listdir(data_dir):
      os.rmdir(data_dir)
    raise
  shutil.rmtree(staging, ignore_errors=True)
  return make(data_dir)


# ---------------------------------------------------------------------------
# TFDS catalogue


def _needs_tensorflow(e: BaseException | None) -> bool:
  while e is not None:
    if isinstance(e, ImportError) and 'tensorflow' in (getattr(e, 'name', None) or str(e)):
      return True
    e = e.__cause__ or e.__context__
  return False


def prepare_tfds(name: str, data_dir: str) -> tfds.core.DatasetBuilder:
  """Downloads and prepares a TFDS catalogue data set (e.g. 'cifar10') as array_record.

  Needs internet. Many catalogue builders (cifar10 and mnist among them) hand
  NumPy arrays to `tfds.features.Image`, which needs TensorFlow to encode them;
  without TensorFlow those fail after the download (kept under
  `data_dir/downloads` for a retry) with a DataError that points to
  `folders.prepare_folder` on an exported image folder instead.
  """
  def make(d):
    return tfds.builder(name, data_dir=d, file_format='array_record')

  try:
    make(os.path.abspath(os.fspath(data_dir)))
  except (tfds.core.registered.DatasetNotFoundError, ValueError):
    raise DataError(f'{name!r}: not found in the TFDS catalogue (expected a name like "imagenette/160px")') from None
  try:
    return build(make, data_dir, download_dir=os.path.join(os.path.abspath(data_dir), 'downloads'))
  except Exception as e:
    if _needs_tensorflow(e):
      raise DataError(f'{name!r}: preparing this TFDS data set needs TensorFlow, which is not installed; '
                      'install tensorflow, or save its images to a folder and use prepare_folder') from e
    raise
