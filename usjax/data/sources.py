"""Names -> prepared TFDS data sources. The one place that maps a config's source names to builders.

Source names used in configs (`config.data.pretrain_sources` for pre-training, `config.data.finetune_source` for fine-tuning):
  synthetic_breast, synthetic_lung, synthetic_heart   embedded generator, needs nothing (the default)
  busi      BUSI, `config.data.busi_dir` (the downloaded `Dataset_BUSI_with_GT` or its parent)
  pocus     POCUS lung ultrasound, `config.data.pocus_dir`
  camus     CAMUS echocardiography, `config.data.camus_dir`
  us_folder any folder of ultrasound images, `config.data.us_folder_dir`
  natural   any folder of natural images (e.g. CIFAR-10 as JPEGs), `config.data.natural_dir`
  tfds:NAME a TFDS catalogue set by name (e.g. tfds:imagenette), downloaded by TFDS on first use
Every prepared set lives under `config.data.data_dir` and is reused by later runs.
"""
from __future__ import annotations

import os

from usjax.data import DataError

SYNTHETIC = ("synthetic_breast", "synthetic_lung", "synthetic_heart")
SOURCE_DIR_KEY = {
    "busi": "busi_dir", "pocus": "pocus_dir", "camus": "camus_dir", "us_folder": "us_folder_dir",
    "natural": "natural_dir"
}


def data_dir(data_cfg) -> str:
  return os.path.expanduser(data_cfg.data_dir)


def builder_for(name: str, data_cfg):
  """Prepares (once) and returns the TFDS builder of source `name`."""
  ddir = data_dir(data_cfg)
  if name in SYNTHETIC:
    from usjax.data import synthetic
    return synthetic.prepare(
        name.split("_", 1)[1], ddir, image_size=data_cfg.synthetic_size, num_images=data_cfg.synthetic_num_images,
        seed=data_cfg.synthetic_seed)
  if name.startswith("tfds:"):
    from usjax.data import staging
    return staging.prepare_tfds(name[5:], ddir)
  if name not in SOURCE_DIR_KEY:
    raise DataError(f"config.data: unknown source {name!r}; known: {', '.join(SYNTHETIC + tuple(SOURCE_DIR_KEY))},"
                    " tfds:NAME")
  key = SOURCE_DIR_KEY[name]
  folder = getattr(data_cfg, key)
  if not folder:
    raise DataError(f"config.data.{key} must name the folder for source {name!r}")
  folder = os.path.expanduser(folder)
  if name == "busi":
    from usjax.data import busi
    return busi.prepare(folder, ddir, **split_options(name, data_cfg))
  if name == "pocus":
    from usjax.data import pocus
    return pocus.prepare(folder, ddir)
  if name == "camus":
    from usjax.data import camus
    return camus.prepare(folder, ddir)
  from usjax.data import folders
  return folders.prepare_folder(folder, ddir, name=name, channels=3 if name == "natural" else 1,
                                **split_options(name, data_cfg))


# Sources whose splits are made duplicate-aware and k-fold: the labelled ones a study scores (`natural` is a
# pre-training source only, and 10,000 CIFAR images would take minutes to compare pairwise).
SPLIT_AWARE = ("busi", "us_folder")


def split_options(name: str, data_cfg) -> dict:
  """The near-duplicate and fold options of `data_cfg` that apply to source `name` (none outside SPLIT_AWARE)."""
  if name not in SPLIT_AWARE:
    return {}
  return dict(folds=data_cfg.folds, fold=data_cfg.fold, dedup=data_cfg.duplicate_threshold,
              keep_conflicts=data_cfg.keep_conflicts)


def check_name(name: str, data_cfg, key: str) -> None:
  """Fails in one line, before anything is prepared, on a source name that is unknown or whose folder is unset."""
  if name in SYNTHETIC or name.startswith("tfds:"):
    return
  if name not in SOURCE_DIR_KEY:
    raise DataError(f"config.data.{key}: unknown source {name!r}; known: "
                    f"{', '.join(SYNTHETIC + tuple(SOURCE_DIR_KEY))}, tfds:NAME")
  if not getattr(data_cfg, SOURCE_DIR_KEY[name]):
    raise DataError(f"config.data.{SOURCE_DIR_KEY[name]} must name the folder for source {name!r}")


def open_split(name: str, split: str, data_cfg, decoders=None):
  """Random-access source of one split (len() and [i] -> dict of numpy arrays)."""
  builder = builder_for(name, data_cfg)
  if split not in builder.info.splits:
    raise DataError(f"source {name!r} has no split {split!r} (has {', '.join(builder.info.splits)})")
  return builder.as_data_source(split=split, decoders=decoders)


def parse_sources(spec: str, weights: str) -> tuple[list[str], list[float]]:
  """'a,b,c' and '1,1,2' (or '' for equal weights) -> names and normalised weights."""
  names = [s.strip() for s in spec.split(",") if s.strip()]
  if not names:
    raise DataError("config.data.pretrain_sources is empty: name at least one source")
  if not weights:
    return names, [1.0 / len(names)] * len(names)
  try:
    w = [float(x) for x in weights.split(",")]
  except ValueError:
    raise DataError(f"config.data.pretrain_weights must be comma-separated numbers, got {weights!r}") from None
  if len(w) != len(names) or min(w) < 0 or sum(w) <= 0:
    raise DataError(
        f"config.data.pretrain_weights {weights!r} must give one non-negative weight per source in {spec!r}")
  return names, [x / sum(w) for x in w]
