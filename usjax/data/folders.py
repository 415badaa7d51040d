"""Image-folder builder and what every builder of a downloaded folder shares: listing, splits, the base builder.

Every builder here is prepared once into array_record under `data_dir` (through
`staging.build`, which leaves nothing behind on failure) and read back with
`builder.as_data_source()` (no TensorFlow needed). The split each example falls
in is fixed at preparation time (it is the split it was written to), so every
later run sees the same test images.

A data set's options (folder, seed, split fractions, ...) are folded into its
BuilderConfig name, so a different option set is a different prepared data set
rather than a silent reuse of the old one.
"""

import collections
import dataclasses
import hashlib
import os
import re
from collections.abc import Sequence

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from usjax.data import DataError
from usjax.data import imageio
from usjax.data import staging

SPLITS = ('train', 'val', 'test')
DEFAULT_SPLIT = (0.7, 0.1, 0.2)
LABEL_FRACTIONS = (10, 25, 50, 100)


def image_feature(channels: int) -> tfds.features.Image:
  return tfds.features.Image(shape=(None, None, channels), dtype=np.uint8, encoding_format='png')


@dataclasses.dataclass(frozen=True)
class Item:
  """One example before encoding: `paths[0]` is the image, any others its masks."""
  id: str
  label: int
  group: str
  paths: tuple[str, ...]


@dataclasses.dataclass(eq=False)
class Config(tfds.core.BuilderConfig):
  """Options shared by every builder; `name` must encode all of them."""
  root: str = ''
  split: tuple[float, float, float] = DEFAULT_SPLIT
  seed: int = 0
  folds: int = 0  # k > 0: grouped, stratified k-fold; `fold` is the test part, validation is carved from the rest
  fold: int = 0
  dedup: float = 0.0  # near-duplicate threshold (usjax.data.duplicates); 0 = images are grouped only as scanned
  keep_conflicts: bool = False  # keep duplicate groups whose members carry different classes


def path_hash(path: str) -> str:
  """Stable across runs and machines for the same absolute folder path."""
  return hashlib.sha256(os.path.realpath(path).encode()).hexdigest()[:8]


def check_split(split: Sequence[float]) -> tuple[float, float, float]:
  split = tuple(float(f) for f in split)
  if len(split) != 3 or min(split) <= 0 or abs(sum(split) - 1) > 1e-6:
    raise DataError(f'split fractions {split}: need three positive (train, val, test) fractions summing to 1')
  return split


def config_name(root: str, split, seed: int, *extra: str, folds: int = 0, fold: int = 0, dedup: float = 0.0,
                keep_conflicts: bool = False) -> str:
  """E.g. 'p1a2b3c4d_s0_70_10_20': folder hash, seed, split percentages, extras; then the fold ('k5f0'), the
  near-duplicate threshold ('d0p95', 'kc' when conflicts are kept): each option set is its own prepared data."""
  pct = '_'.join(f'{100 * f:g}'.replace('.', 'p') for f in check_split(split))
  opts = [f'k{int(folds)}f{int(fold)}'] if folds else []
  opts += [f'd{dedup:g}'.replace('.', 'p') + ('kc' if keep_conflicts else '')] if dedup else []
  return '_'.join([f'p{path_hash(root)}', *extra, f's{int(seed)}', pct, *opts])


def check_folds(folds: int, fold: int) -> tuple[int, int]:
  if folds == 0:
    return 0, 0
  if folds < 2 or not 0 <= fold < folds:
    raise DataError(f'config.data.folds={folds}, config.data.fold={fold}: need folds >= 2 (or 0 for the fixed '
                    'split) and 0 <= fold < folds')
  return int(folds), int(fold)


def require_dir(path, problem: str = 'folder not found') -> str:
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise DataError(f'{path}: {problem}')
  return path


def list_images(folder: str, recursive: bool = False) -> list[str]:
  """Sorted image paths in `folder`; hidden files and non-images are ignored."""
  found = []
  for dirpath, dirnames, filenames in os.walk(folder):
    dirnames[:] = sorted(d for d in dirnames if not d.startswith('.')) if recursive else []
    found += [os.path.join(dirpath, f) for f in sorted(filenames) if imageio.is_image_file(f)]
  return found


def subdirs(folder: str) -> list[str]:
  return sorted(d for d in os.listdir(folder) if not d.startswith('.') and os.path.isdir(os.path.join(folder, d)))


# ---------------------------------------------------------------------------
# Splits and label fractions


def _groups_by_class(labels, groups):
  """{class: [(group, size)]} using each group's majority label."""
  members = collections.defaultdict(list)
  for label, group in zip(labels, groups):
    members[group].append(label)
  by_class = collections.defaultdict(list)
  for group in sorted(members):
    counts = collections.Counter(members[group])
    by_class[min(counts, key=lambda c: (-counts[c], c))].append((group, len(members[group])))
  return by_class


def _deal(labels: Sequence[int], groups: Sequence[str], fractions, rng: np.random.Generator) -> dict[str, int]:
  """{group: part index}: stratified by class, each group wholly in one part of the given `fractions`.

  Per class, groups are dealt greedily to the part furthest below its target count. With groups of very different
  sizes the order matters, so a few seed-driven orders are tried and the best-balanced kept.
  """
  fractions = np.asarray(fractions, float) / np.sum(fractions)
  where = {}
  for _, class_groups in sorted(_groups_by_class(labels, groups).items()):
    sizes = np.array([n for _, n in class_groups])
    target = fractions * sizes.sum()
    best, best_err = None, np.inf
    for _ in range(1 if sizes.max() == 1 else 64):
      order = rng.permutation(len(class_groups))
      filled, pick = np.zeros(len(fractions)), np.zeros(len(class_groups), int)
      for i in order:
        pick[i] = int(np.argmax(target - filled))
        filled[pick[i]] += sizes[i]
      err = float(np.sum(((filled - target) / target)**2))
      if err < best_err:
        best, best_err = pick, err
    where.update({g: int(s) for (g, _), s in zip(class_groups, best)})
  return where


def assign_splits(labels: Sequence[int], groups: Sequence[str], split, seed: int) -> list[str]:
  """Split name per example: stratified by class, each group wholly in one split."""
  where = _deal(labels, groups, check_split(split), np.random.default_rng(seed))
  return [SPLITS[where[g]] for g in groups]


def assign_folds(labels: Sequence[int], groups: Sequence[str], folds: int, seed: int) -> list[int]:
  """Fold (0..folds-1) per example: class-stratified, each group wholly in one fold."""
  where = _deal(labels, groups, np.full(folds, 1 / folds), np.random.default_rng([seed, 2]))
  return [where[g] for g in groups]


def assign_fold_splits(labels: Sequence[int], groups: Sequence[str], split, seed: int, folds: int,
                       fold: int) -> list[str]:
  """Split name per example for fold `fold` of `folds`: that fold is 'test'; the other folds are dealt to 'train'
  and 'val' (grouped, stratified) in the ratio of `split`'s first two fractions. Over the folds every example is a
  test example exactly once."""
  split = check_split(split)
  fold_of = assign_folds(labels, groups, folds, seed)
  rest = [i for i, f in enumerate(fold_of) if f != fold]
  tv = _deal([labels[i] for i in rest], [groups[i] for i in rest], (split[0], split[1]),
             np.random.default_rng([seed, 3, fold]))
  out = ['test'] * len(labels)
  for i in rest:
    out[i] = SPLITS[tv[groups[i]]]
  return out


def assign_label_fractions(labels: Sequence[int], groups: Sequence[str], seed: int) -> list[int]:
  """Smallest label-fraction percent (10/25/50/100) whose subset holds each example.

  Subsets are nested by construction (one seeded order per class, cut at 10%,
  25%, 50%) and stratified by class; whole groups go in or stay out. A class's
  10% subset holds at least one group.
  """
  rng = np.random.default_rng([seed, 1])
  fraction_of = {}
  for _, class_groups in sorted(_groups_by_class(labels, groups).items()):
    total = sum(n for _, n in class_groups)
    seen = 0
    for i in rng.permutation(len(class_groups)):
      group, n = class_groups[i]
      fraction_of[group] = next(f for f in LABEL_FRACTIONS if f == 100 or seen < f / 100 * total)
      seen += n
  return [fraction_of[g] for g in groups]


# ---------------------------------------------------------------------------
# Shared builder


class ManualBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Builder over a folder the user downloaded; subclasses scan and encode."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'First release.'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = 'Download the data set, then call prepare(manual_dir=<its folder>, data_dir=...).'
  CHANNELS = 1
  HAS_MASK = False
  HAS_GROUP = False
  HAS_LABEL_FRACTION = False
  DESCRIPTION = ''
  HOMEPAGE = None
  CITATION = None

  def _class_names(self) -> Sequence[str]:
    raise NotImplementedError

  def _channels(self) -> int:
    return self.CHANNELS

  def _scan(self) -> list[Item]:
    """Lists and header-checks every example; raises DataError before any write."""
    raise NotImplementedError

  def _encode(self, item: Item) -> dict:
    """Returns {'image': png, ['mask': png]} after a full decode of the files."""
    raise NotImplementedError

  def _has_group(self) -> bool:
    return self.HAS_GROUP or bool(self.builder_config.dedup)

  def _info(self) -> tfds.core.DatasetInfo:
    features = {
        'image': image_feature(self._channels()),
        'label': tfds.features.ClassLabel(names=list(self._class_names())),
        'id': tfds.features.Text(),
    }
    if self.HAS_MASK:
      features['mask'] = image_feature(1)
    if self._has_group():
      features['group'] = tfds.features.Text()
    if self.HAS_LABEL_FRACTION:
      features['label_fraction'] = tfds.features.Scalar(dtype=np.int32)
    return tfds.core.DatasetInfo(builder=self, description=self.DESCRIPTION,
                                 features=tfds.features.FeaturesDict(features), homepage=self.HOMEPAGE,
                                 citation=self.CITATION)

  def _split_generators(self, dl_manager):
    del dl_manager  # The folder is in the config, validated by `_scan`.
    cfg = self.builder_config
    items = self._scan()
    if cfg.dedup:
      items = group_duplicates(items, cfg.dedup, cfg.keep_conflicts, self._class_names(), cfg.root)
    labels, groups = [it.label for it in items], [it.group for it in items]
    if cfg.folds:
      where = assign_fold_splits(labels, groups, cfg.split, cfg.seed, cfg.folds, cfg.fold)
    else:
      where = assign_splits(labels, groups, cfg.split, cfg.seed)
    parts = {s: [it for it, w in zip(items, where) if w == s] for s in SPLITS}
    for s, part in parts.items():
      if not part:
        raise DataError(f'{cfg.root}: too few images (or source groups) to fill the {s!r} split')
    fractions = dict.fromkeys((it.id for it in items), 100)
    train = parts['train']
    fractions.update(
        zip((it.id for it in train),
            assign_label_fractions([it.label for it in train], [it.group for it in train], cfg.seed)))
    return {s: self._generate_examples(part, fractions) for s, part in parts.items()}

  def _generate_examples(self, items, fractions):
    for item in items:
      example = self._encode(item)
      example.update(id=item.id, label=item.label)
      if self._has_group():
        example['group'] = item.group
      if self.HAS_LABEL_FRACTION:
        example['label_fraction'] = fractions[item.id]
      yield item.id, example


def group_duplicates(items: list[Item], threshold: float, keep_conflicts: bool, class_names: Sequence[str],
                     root: str = '') -> list[Item]:
  """`items` with near-duplicates (usjax.data.duplicates) joined into one group, together with the groups they
  already had (a video, a patient); groups whose members carry different classes are left out unless
  `keep_conflicts`. A group is named by its first member's id."""
  from usjax.data import duplicates
  prints = np.stack([duplicates.read_fingerprints(it.paths[0]) for it in items])
  found = duplicates.find(prints, [it.label for it in items], threshold)
  first = {}
  links = [(first.setdefault(it.group, i), i) for i, it in enumerate(items)]  # the groups the scan gave
  group = duplicates.union_find(len(items), found.pairs + links)
  classes = collections.defaultdict(set)
  for it, g in zip(items, group):
    classes[g].add(it.label)
  conflicts = {g for g, c in classes.items() if len(c) > 1}
  kept = [dataclasses.replace(it, group=items[g].id) for it, g in zip(items, group) if keep_conflicts or
          g not in conflicts]
  summary = found.summary([it.label for it in items], class_names)
  logging.info('%s: %d near-duplicate pairs (similarity >= %g) in %d groups; %d groups with mixed classes (%d '
               'images) %s', root, summary['pairs'], threshold, summary['groups'], len(conflicts),
               len(items) - len(kept) if not keep_conflicts else sum(1 for g in group if g in conflicts),
               'kept' if keep_conflicts else 'left out')
  return kept


# ---------------------------------------------------------------------------
# Generic image folder


@dataclasses.dataclass(eq=False)
class FolderConfig(Config):
  channels: int = 1
  classes: tuple[str, ...] = ()


class UsjaxFolder(ManualBuilder):
  """Any folder of PNG/JPEG: `<root>/<class>/**/*.png|jpg`, or flat `<root>/*.png|jpg` (one label)."""

  name = 'usjax_folder'
  DESCRIPTION = 'Images from a local folder; label = first-level folder, or the folder name when flat.'

  def _channels(self):
    return self.builder_config.channels

  def _class_names(self):
    return self.builder_config.classes

  def _scan(self):
    root = self.builder_config.root
    layout = folder_layout(root)
    items = []
    for label, name in enumerate(self.builder_config.classes):
      for path in layout[name]:
        imageio.check_image(path)
        rel = os.path.relpath(path, root).replace(os.sep, '/')
        items.append(Item(id=rel, label=label, group=rel, paths=(path,)))
    return items

  def _encode(self, item):
    return {'image': imageio.image_png(item.paths[0], self._channels())}


def folder_layout(root: str) -> dict[str, list[str]]:
  """{class: image paths}; nested class folders or one flat folder, never both."""
  require_dir(root)
  expected = f'expected {root}/<class>/*.png|jpg or a flat {root}/*.png|jpg'
  classes, flat = subdirs(root), list_images(root)
  if classes and flat:
    raise DataError(f'{root}: holds both images and subfolders; {expected}')
  if flat:
    return {os.path.basename(os.path.normpath(root)) or 'images': flat}
  if not classes:
    raise DataError(f'{root}: no PNG/JPEG images; {expected}')
  layout = {c: list_images(os.path.join(root, c), recursive=True) for c in classes}
  for c, paths in layout.items():
    if not paths:
      raise DataError(f'{os.path.join(root, c)}: empty class folder (no PNG/JPEG images)')
  return layout


def prepare_folder(manual_dir: str, data_dir: str, name: str, channels: int = 1, *, split=DEFAULT_SPLIT,
                   seed: int = 0, folds: int = 0, fold: int = 0, dedup: float = 0.0,
                   keep_conflicts: bool = False) -> tfds.core.DatasetBuilder:
  """Prepares an image folder once (channels=1 for ultrasound, 3 for natural images); `folds`/`fold`, `dedup`
  and `keep_conflicts` as in `Config`."""
  if not re.fullmatch(r'[a-z][a-z0-9_]*', name or ''):
    raise DataError(f'{name!r}: data set name must be lower-case letters, digits and underscores')
  if channels not in (1, 3):
    raise DataError(f'{manual_dir}: channels must be 1 or 3, got {channels}')
  root = os.path.realpath(require_dir(manual_dir))
  classes = tuple(folder_layout(root))
  folds, fold = check_folds(folds, fold)
  opts = dict(folds=folds, fold=fold, dedup=float(dedup), keep_conflicts=bool(keep_conflicts))
  config = FolderConfig(name=f'{name}_{config_name(root, split, seed, f"c{channels}", **opts)}',
                        description=f'{name}: {root}, channels={channels}, split={check_split(split)}, seed={seed}, '
                        f'{opts}', root=root, split=check_split(split), seed=seed, channels=channels,
                        classes=classes, **opts)
  return staging.build(lambda d: UsjaxFolder(data_dir=d, config=config, file_format='array_record'), data_dir)
