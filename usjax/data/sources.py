"""Names -> prepared TFDS data sources: the registry every config's source names are looked up in.

Source names used in configs (`config.data.pretrain_sources` for pre-training, `config.data.finetune_source` for
fine-tuning):
  synthetic_breast, synthetic_lung, synthetic_heart   embedded generator, needs nothing (the default)
  busi      BUSI, `config.data.busi_dir` (the downloaded `Dataset_BUSI_with_GT` or its parent)
  pocus     POCUS lung ultrasound, `config.data.pocus_dir`
  camus     CAMUS echocardiography, `config.data.camus_dir`
  us_folder any folder of ultrasound images, `config.data.us_folder_dir`
  natural   any folder of natural images (e.g. CIFAR-10 as JPEGs), `config.data.natural_dir`
  tfds:NAME a TFDS catalogue set by name (e.g. tfds:imagenette), downloaded by TFDS on first use
Every prepared set lives under `config.data.data_dir` and is reused by later runs.

A new source is its builder module (a `prepare` that returns a TFDS builder, like `usjax.data.pocus`) and one
entry in SOURCES below; its folder setting `config.data.<dir_key>` goes into configs/default.py beside the
others. Nothing else names it (README: Extending usjax).
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

from usjax.data import DataError


@dataclasses.dataclass(frozen=True)
class Source:
  """A registered data source. `prepare(folder, data_dir, data_cfg)` prepares it once under `data_dir` and returns
  its TFDS builder; `folder` is `config.data.<dir_key>`, expanded (None for a source that needs no folder)."""
  prepare: Callable
  dir_key: str = ""  # the config.data field naming its downloaded folder ('' = needs none)
  # Near-duplicate grouping and k-fold splits (`split_options`): the labelled sets a study scores (`natural` is a
  # pre-training source only, and 10,000 CIFAR images would take minutes to compare pairwise).
  split_aware: bool = False
  classes: tuple[str, ...] = ()  # its class names, where fixed: per-class columns in the study report
  lesion_free: tuple[str, ...] = ()  # classes whose images show no lesion (their Dice is 1 - false-positive rate)


def _synthetic(organ: str) -> Callable:
  def prepare(folder, ddir, data_cfg):
    from usjax.data import synthetic
    return synthetic.prepare(organ, ddir, image_size=data_cfg.synthetic_size,
                             num_images=data_cfg.synthetic_num_images, seed=data_cfg.synthetic_seed)

  return prepare


def _busi(folder, ddir, data_cfg):
  from usjax.data import busi
  return busi.prepare(folder, ddir, **split_options("busi", data_cfg))


def _pocus(folder, ddir, data_cfg):
  from usjax.data import pocus
  return pocus.prepare(folder, ddir)


def _camus(folder, ddir, data_cfg):
  from usjax.data import camus
  return camus.prepare(folder, ddir)


def _folder(name: str, channels: int) -> Callable:
  def prepare(folder, ddir, data_cfg):
    from usjax.data import folders
    return folders.prepare_folder(folder, ddir, name=name, channels=channels, **split_options(name, data_cfg))

  return prepare


# BUSI's classes (usjax.data.busi.CLASSES), and the synthetic breast phantoms' (usjax.data.phantoms.BREAST_LABELS):
# written out so that reading the registry prepares and imports nothing; a test checks they agree.
_BREAST = ("benign", "malignant", "normal")
SOURCES: dict[str, Source] = {
    "synthetic_breast": Source(_synthetic("breast"), classes=_BREAST, lesion_free=("normal",)),
    "synthetic_lung": Source(_synthetic("lung")),
    "synthetic_heart": Source(_synthetic("heart")),
    "busi": Source(_busi, "busi_dir", split_aware=True, classes=_BREAST, lesion_free=("normal",)),
    "pocus": Source(_pocus, "pocus_dir"),
    "camus": Source(_camus, "camus_dir"),
    "us_folder": Source(_folder("us_folder", 1), "us_folder_dir", split_aware=True),
    "natural": Source(_folder("natural", 3), "natural_dir"),
}
TFDS_PREFIX = "tfds:"  # any TFDS catalogue set by name, outside the registry

# Views of the registry that callers name.
SYNTHETIC = tuple(n for n in SOURCES if n.startswith("synthetic_"))
SOURCE_DIR_KEY = {n: s.dir_key for n, s in SOURCES.items() if s.dir_key}
SPLIT_AWARE = tuple(n for n, s in SOURCES.items() if s.split_aware)


def data_dir(data_cfg) -> str:
  return os.path.expanduser(data_cfg.data_dir)


def _known() -> str:
  return f"{', '.join(SOURCES)}, {TFDS_PREFIX}NAME"


def check_name(name: str, data_cfg, key: str) -> None:
  """Fails in one line, before anything is prepared, on a source name that is unknown or whose folder is unset."""
  if name.startswith(TFDS_PREFIX):
    return
  if name not in SOURCES:
    raise DataError(f"config.data.{key}: unknown source {name!r}; known: {_known()}")
  dir_key = SOURCES[name].dir_key
  if dir_key and not getattr(data_cfg, dir_key):
    raise DataError(f"config.data.{dir_key} must name the folder for source {name!r}")


def check_config(cfg) -> None:
  """The source names of `cfg` (the fine-tuning set, or the pre-training mixture and its weights), checked in one
  line each before anything is prepared."""
  if cfg.task == "finetune":
    check_name(cfg.data.finetune_source, cfg.data, "finetune_source")
  else:
    names, _ = parse_sources(cfg.data.pretrain_sources, cfg.data.pretrain_weights)
    for name in names:
      check_name(name, cfg.data, "pretrain_sources")


def builder_for(name: str, data_cfg):
  """Prepares (once) and returns the TFDS builder of source `name`."""
  ddir = data_dir(data_cfg)
  if name.startswith(TFDS_PREFIX):
    from usjax.data import staging
    return staging.prepare_tfds(name[len(TFDS_PREFIX):], ddir)
  if name not in SOURCES:
    raise DataError(f"config.data: unknown source {name!r}; known: {_known()}")
  source = SOURCES[name]
  folder = getattr(data_cfg, source.dir_key) if source.dir_key else None
  if source.dir_key and not folder:
    raise DataError(f"config.data.{source.dir_key} must name the folder for source {name!r}")
  folder = os.path.expanduser(folder) if folder else None
  return source.prepare(folder, ddir, data_cfg)


def split_options(name: str, data_cfg) -> dict:
  """The near-duplicate and fold options of `data_cfg` that apply to source `name` (none unless split-aware)."""
  if name not in SOURCES or not SOURCES[name].split_aware:
    return {}
  return dict(folds=data_cfg.folds, fold=data_cfg.fold, dedup=data_cfg.duplicate_threshold,
              keep_conflicts=data_cfg.keep_conflicts)


def class_names(name: str | None = None) -> tuple[str, ...]:
  """The class names of source `name`, or of every registered source in registry order; () where not fixed."""
  names = [name] if name is not None else list(SOURCES)
  return tuple(dict.fromkeys(c for n in names if n in SOURCES for c in SOURCES[n].classes))


def lesion_free_classes() -> tuple[str, ...]:
  """The classes, over every registered source, whose images show no lesion (BUSI's 'normal')."""
  return tuple(dict.fromkeys(c for s in SOURCES.values() for c in s.lesion_free))


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
