"""The registries of methods, data sources and metrics: a new entry is found everywhere its kind is used, and
names are checked in one place."""
import dataclasses
import json
import os

import numpy as np
import pytest

from configs import default
from usjax import UsjaxError, analysis, evaluate, methods, metrics, predict
from usjax.data import DataError, busi, phantoms, sources


# ---------------------------------------------------------------------------------------------------- metrics
@pytest.fixture
def precision(monkeypatch):
  """The README's example metric, registered for one test."""
  def fn(pred, true):
    return float((pred & true).sum() / pred.sum()) if pred.any() else float("nan")

  monkeypatch.setitem(metrics.PER_IMAGE, "precision", metrics.PerImage(fn, header="Precision", undefined=True))
  return fn


def masks():
  true = np.zeros((3, 6, 6), bool)
  true[0, 1:4, 1:4] = True  # 9 pixels
  true[1, 0:2, 0:2] = True
  pred = np.zeros_like(true)
  pred[0, 1:4, 1:3] = True  # 6 of them
  pred[0, 5, 5] = True  # and a stray pixel: precision 6/7
  pred[2, 0, 0] = True  # a false positive on the empty image: precision 0; image 1 predicts nothing: NaN
  return pred, true


def test_a_registered_metric_is_scored_summarised_and_reported(precision, tmp_path):
  pred, true = masks()
  scores = metrics.score_masks(pred, true)
  assert list(scores) == ["dice", "iou", "hd95", "precision"]
  np.testing.assert_allclose(scores["precision"], [6 / 7, np.nan, 0.0])
  scores.update(empty_true=~true.reshape(3, -1).any(1), empty_pred=~pred.reshape(3, -1).any(1),
                id=np.array(list("abc")), label=np.array(["benign", "benign", "normal"]))
  summary = evaluate.summarize(scores)
  assert summary["precision"] == pytest.approx(3 / 7)  # the NaN left out
  assert "precision_lesion" not in summary and "precision_benign" not in summary  # not asked for
  rows = evaluate.per_image_rows(scores)
  assert rows[1]["precision"] is None and rows[0]["precision"] == pytest.approx(6 / 7)
  assert predict.score(pred[0], true[0])["precision"] == pytest.approx(6 / 7)
  # The study report: a results.csv column with its count of images without a value, and a report.md column.
  wd = tmp_path / "run"
  wd.mkdir()
  (wd / "summary.json").write_text(json.dumps({"task": "finetune", "source": "busi", "label_fraction": 100,
                                               **summary}))
  (wd / "per_image.json").write_text(json.dumps(rows))
  row, = analysis.collect([({"pretrain": "none", "seed": 0}, str(wd))])
  assert row["precision"] == pytest.approx(3 / 7) and row["precision_undefined"] == 1
  cols = analysis.columns([row])
  assert cols.index("hd95_undefined") < cols.index("precision") < cols.index("precision_undefined")
  assert cols.index("precision_undefined") < cols.index("dice_benign")
  assert "| HD95 (px) | Precision | Dice benign |" in analysis.group_table([row], n_boot=20)


def test_metric_columns_follow_the_registries_and_the_source_classes():
  assert analysis.metric_columns(sources.class_names("busi")) == [
      "dice", "dice_lesion", "iou", "iou_lesion", "hd95", "hd95_undefined", "dice_benign", "dice_malignant",
      "dice_normal", "iou_benign", "iou_malignant", "iou_normal", "false_positive_rate", "presence_auc",
      "presence_auc_from", "num_images", "train_images", "steps", "images_per_sec"
  ]
  assert analysis.metric_columns(sources.class_names("pocus"))[6] == "false_positive_rate"  # no fixed classes
  rows = [{"pretrain": "none", "label_fraction": 100, "dice": 0.5, "dice_benign": 0.4, "dice_normal": 0.9}]
  headers = [c.header for c in analysis.table_columns(rows)]
  assert headers == ["IoU", "HD95 (px)", "Dice benign", "FPR on normal", "Presence AUC (from)"]  # normal: FPR


def test_score_one_matches_the_batched_scores():
  pred, true = masks()
  batch = metrics.score_masks(pred, true)
  for i in range(3):
    one = metrics.score_one(pred[i], true[i])
    for name, value in one.items():
      np.testing.assert_equal(np.float32(value), batch[name][i])


# ---------------------------------------------------------------------------------------------------- sources
def test_source_classes_agree_with_the_builders():
  assert sources.class_names("busi") == busi.CLASSES
  assert sources.class_names("synthetic_breast") == tuple(phantoms.BREAST_LABELS)
  assert sources.class_names() == busi.CLASSES and sources.lesion_free_classes() == ("normal",)
  assert sources.SOURCE_DIR_KEY["busi"] == "busi_dir" and "busi" in sources.SPLIT_AWARE
  cfg = default.get_config()
  for name, source in sources.SOURCES.items():  # every folder setting exists in the default config
    assert not source.dir_key or source.dir_key in cfg.data


def test_a_registered_source_is_checked_and_built(monkeypatch, tmp_path):
  seen = {}

  def prepare(folder, ddir, data_cfg):
    seen.update(folder=folder, ddir=ddir)
    return "builder"

  monkeypatch.setitem(sources.SOURCES, "thyroid", sources.Source(prepare, "us_folder_dir", split_aware=True))
  cfg = default.get_config()
  cfg.data.data_dir = str(tmp_path)
  with pytest.raises(DataError, match="config.data.us_folder_dir must name the folder for source 'thyroid'"):
    sources.check_name("thyroid", cfg.data, "finetune_source")
  cfg.data.us_folder_dir = "~/thyroid"
  sources.check_name("thyroid", cfg.data, "finetune_source")
  assert sources.builder_for("thyroid", cfg.data) == "builder"
  assert seen == {"folder": os.path.expanduser("~/thyroid"), "ddir": str(tmp_path)}
  assert sources.split_options("thyroid", cfg.data)["folds"] == cfg.data.folds
  with pytest.raises(DataError, match="unknown source 'thyroidd'; known: .*thyroid, tfds:NAME"):
    sources.check_name("thyroidd", cfg.data, "finetune_source")


def test_source_names_are_checked_in_one_call():
  cfg = default.get_config()
  cfg.task, cfg.data.pretrain_sources = "pretrain", "synthetic_lung,pocus"
  with pytest.raises(DataError, match="config.data.pocus_dir"):
    sources.check_config(cfg)
  cfg.task, cfg.data.finetune_source = "finetune", "bussi"
  with pytest.raises(DataError, match="config.data.finetune_source: unknown source 'bussi'"):
    sources.check_config(cfg)
  cfg.data.finetune_source = "tfds:anything"
  sources.check_config(cfg)


# ---------------------------------------------------------------------------------------------------- methods
def test_methods_register_their_own_hyper_parameters():
  assert list(methods.METHODS) == ["simclr", "moco", "simsiam", "byol"]
  fields = lambda name: {f.name for f in dataclasses.fields(methods.METHODS[name])}
  common = {"name", "model", "num_steps", "seed"}
  assert fields("simclr") - common == {"temperature"}
  assert fields("moco") - common == {"temperature", "queue_size", "momentum", "momentum_schedule"}
  assert fields("byol") - common == {"tau_base"} and fields("simsiam") == common
  assert methods.METHODS["moco"].has_target and not methods.METHODS["simsiam"].has_target


def test_a_registered_method_is_checked_and_made(monkeypatch):
  @dataclasses.dataclass(frozen=True)
  class Toy(methods.Method):
    scale: float = 1.0

    @classmethod
    def check(cls, cfg):
      if cfg.toy.scale <= 0:
        raise UsjaxError("config.toy.scale must be positive")

    @classmethod
    def from_config(cls, cfg, net, **common):
      return cls(model=net(()), scale=cfg.toy.scale, **common)

  monkeypatch.setitem(methods.METHODS, "toy", Toy)
  cfg = default.get_config()
  cfg.method, cfg.model.encoder = "toy", "plain"
  cfg.toy = {"scale": -1.0}
  with pytest.raises(UsjaxError, match="config.toy.scale"):
    methods.check_config(cfg)
  cfg.toy.scale = 2.0
  m = methods.make_method(cfg)
  assert isinstance(m, Toy) and m.scale == 2.0 and m.name == "toy" and m.init_extra({}, {}) == {}
  cfg.method = "swav"
  with pytest.raises(UsjaxError, match="config.method must be one of simclr, moco, simsiam, byol, toy"):
    methods.check_config(cfg)
