"""TFDS builder over the synthetic ultrasound of `phantoms`: fixed splits and label fractions, prepared once.

Image `i` of an organ's stream is the example with id `<organ>/<i>`, so a
prepared data set can always be checked against `phantoms.generate`.
"""

import dataclasses
import io

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from usjax.data import phantoms
from usjax.data import staging

LABEL_NAMES = {'breast': list(phantoms.BREAST_LABELS), 'lung': ['lung'], 'heart': ['heart']}
LABEL_FRACTIONS = (10, 25, 50, 100)


def split_indices(num_images: int) -> dict[str, range]:
  """Contiguous 70/10/20 index ranges: images are i.i.d., so ranges are fair."""
  n_train = round(0.7 * num_images)
  n_val = round(0.1 * num_images)
  return {
      'train': range(0, n_train), 'val': range(n_train, n_train + n_val), 'test': range(n_train + n_val, num_images)
  }


def label_fractions(organ: str, num_images: int, seed: int) -> dict[int, int]:
  """Train index -> smallest label-fraction percent whose subset contains it.

  Within each class a seeded permutation is cut at 10/25/50/100 % (rounded up,
  so every class shows up in every subset), hence `fraction <= f` selects a
  nested, class-stratified f % subset of the train split.
  """
  train = split_indices(num_images)['train']
  labels = np.array([phantoms.label_of(organ, i, seed) for i in train])
  out = {}
  for k, name in enumerate(LABEL_NAMES[organ]):
    members = np.flatnonzero(labels == name)
    perm = np.random.default_rng([seed, phantoms.ORGAN_ID[organ], k, 7919]).permutation(members)
    cuts = [-(-f * len(members) // 100) for f in LABEL_FRACTIONS]
    for pos, j in enumerate(perm):
      out[train[j]] = next(f for f, cut in zip(LABEL_FRACTIONS, cuts) if pos < cut)
  return out


def _png(a: np.ndarray) -> bytes:
  buf = io.BytesIO()
  # Speckle barely compresses: the fastest level is ~2.5x quicker, ~7% larger.
  Image.fromarray(a[..., 0]).save(buf, format='png', compress_level=1)
  return buf.getvalue()


@dataclasses.dataclass(eq=False)
class SyntheticConfig(tfds.core.BuilderConfig):
  """One prepared data set per (organ, image_size, num_images, seed)."""
  organ: str = 'breast'
  image_size: int = 64
  num_images: int = 600
  seed: int = 0

  @classmethod
  def make(cls, organ: str, image_size: int, num_images: int, seed: int):
    name = f'{organ}-s{image_size}-n{num_images}-seed{seed}'
    return cls(name=name, organ=organ, image_size=image_size, num_images=num_images, seed=seed,
               description=f'{num_images} synthetic {organ} scans, {image_size}px.')


class SyntheticUltrasound(tfds.core.GeneratorBasedBuilder):
  """Synthetic B-mode scans with the same schema as the real-data builders."""

  # Bump when the pixels of `phantoms` change: prepared data sets are reused by name.
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}

  def _info(self) -> tfds.core.DatasetInfo:
    cfg = self.builder_config
    shape = (cfg.image_size, cfg.image_size, 1)
    image = lambda: tfds.features.Image(shape=shape, dtype=np.uint8, encoding_format='png')
    features = {
        'image': image(), 'id': tfds.features.Text(), 'label': tfds.features.ClassLabel(names=LABEL_NAMES[cfg.organ])
    }
    if cfg.organ == 'breast':
      features['mask'] = image()
      features['label_fraction'] = tfds.features.Scalar(dtype=np.int32)
    return tfds.core.DatasetInfo(
        builder=self,
        description=cfg.description,
        features=tfds.features.FeaturesDict(features),
        supervised_keys=('image', 'label'),
        # Split order = index order, so ds[i] is predictable; pipelines shuffle.
        disable_shuffling=True)

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    cfg = self.builder_config
    fractions = {}
    if cfg.organ == 'breast':
      fractions = label_fractions(cfg.organ, cfg.num_images, cfg.seed)
    return {name: self._generate_examples(idx, fractions) for name, idx in split_indices(cfg.num_images).items()}

  def _generate_examples(self, indices, fractions):
    cfg = self.builder_config
    for i in indices:
      ex = phantoms.generate(cfg.organ, i, cfg.image_size, cfg.seed)
      key = f'{cfg.organ}/{i:06d}'
      out = {'image': _png(ex['image']), 'label': ex['label'], 'id': key}
      if cfg.organ == 'breast':
        out['mask'] = _png(ex['mask'])
        out['label_fraction'] = fractions.get(i, 100)
      yield i, out


def prepare(organ: str, data_dir: str, image_size: int = 64, num_images: int = 600,
            seed: int = 0) -> tfds.core.DatasetBuilder:
  """Builds the data set once (array_record) and returns its builder.

  Built in a staging folder and moved into place only on success
  (`staging.build`), so an interrupted build is never mistaken for a prepared
  one, and the leftovers of a killed one are removed by the next build.
  """
  phantoms.check_organ(organ)
  image_size = phantoms.int_at_least('image_size', image_size, 32)
  num_images = phantoms.int_at_least('num_images', num_images, 10)
  seed = phantoms.int_at_least('seed', seed, 0)
  config = SyntheticConfig.make(organ, image_size, num_images, seed)
  return staging.build(lambda d: SyntheticUltrasound(config=config, data_dir=d, file_format='array_record'), data_dir)
