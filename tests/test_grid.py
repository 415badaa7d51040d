"""Grid planning: the cells each study config asks for, and the ImageNet arm."""
import json
import os
import shutil

import pytest

from configs import grid_cpu, grid_gpu
from usjax import UsjaxError, grid


def test_grids_plan_the_arms_fractions_and_seeds_their_docstrings_state():
  pre, fine = grid.plan(grid_cpu.get_config())
  assert [(f["pretrain"], c.num_steps) for f, _, c in pre] == [("breast", 600), ("breast_1200", 1200),
                                                               ("multiorgan", 600)]
  assert len(fine) == 4 * 2 * 3  # scratch/breast/breast_1200/multi-organ x 100/50% x 3 seeds
  assert all(c.eval_split == "test" and c.data.image_size == 64 for _, _, c in fine)
  assert {c.init_from for f, _, c in fine if f["pretrain"] == "breast"
         } == {r for f, r, _ in pre if f["pretrain"] == "breast"}
  pre, fine = grid.plan(grid_gpu.get_config())
  assert len(pre) == 3 and len(fine) == 4 * 4 * 3 and {c.num_steps for _, _, c in pre} == {1000}
  assert {f["label_fraction"] for f, _, _ in fine} == {100, 50, 25, 10}


def test_pretrain_steps_must_name_an_arm():
  g = grid_cpu.get_config()
  g.pretrain_steps = {"brest_1200": 1200}
  with pytest.raises(UsjaxError, match="brest_1200"):
    grid.plan(g)


def test_an_imagenet_file_adds_an_encoder_transfer_arm(tmp_path):
  g = grid_cpu.get_config()
  g.imagenet = str(tmp_path / "resnet18.safetensors")
  _, fine = grid.plan(g)
  arm = [(f, c) for f, _, c in fine if f["pretrain"] == "imagenet"]
  assert len(arm) == 2 * 3
  assert all(c.init_from == os.path.abspath(g.imagenet) and c.transfer == "encoder" for _, c in arm)


def _small_grid(tmp_path):
  g = grid_cpu.get_config()
  g.label_fractions, g.seeds = (100,), (0,)
  g.results_dir = str(tmp_path / "results")
  return g


def _fake_train(trained):
  """Stands in for `task.run`: records the run and writes what a finished run leaves (pre-training: weights)."""
  def run(cfg, workdir):
    trained.append(os.path.basename(workdir))
    if cfg.task == "finetune" and cfg.init_from:  # the grid hands over the weights' absolute path
      assert grid.has_weights(cfg.init_from), cfg.init_from
    os.makedirs(os.path.join(workdir, "checkpoints", "7"), exist_ok=True)
    os.makedirs(os.path.join(workdir, "best"), exist_ok=True)
    for name in ("history.json", "per_image.json", os.path.join("best", "selection.json")):
      with open(os.path.join(workdir, name), "w") as f:
        f.write("[]")
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      f.write('{"task": "%s", "dice": 0.5}' % cfg.task)

  return run


def test_a_grid_goes_on_from_the_results_another_machine_recorded(tmp_path, monkeypatch):
  g = _small_grid(tmp_path)
  pre, fine = grid.plan(g)
  trained = []
  monkeypatch.setattr(grid.task, "run", _fake_train(trained))
  monkeypatch.setattr(grid, "write_report", lambda *a, **k: {})
  grid.run(g, str(tmp_path / "first"))
  # One seed: plan order, each pre-training just before the first cell that starts from it.
  expected = []
  for _, run, cfg in fine:
    expected += [cfg.init_from] if cfg.init_from and cfg.init_from not in expected else []
    expected.append(run)
  assert trained == expected and sorted(trained) == sorted(r for _, r, _ in pre + fine)
  results = tmp_path / "results"
  timing = json.loads((results / "timing.json").read_text())  # the grid's clock travels with the results
  assert [t["runs"] for t in timing] == [[r] for r in trained] and all(t["seconds"] >= 0 for t in timing)
  for _, run, _ in pre + fine:  # the small outputs are recorded; the checkpoints stay behind
    assert (results / run / "summary.json").is_file() and (results / run / "best" / "selection.json").is_file()
    assert not (results / run / "checkpoints").exists()

  # Another machine, an empty workdir: nothing to train, not even the pre-training runs.
  trained.clear()
  grid.run(g, str(tmp_path / "second"))
  assert trained == []
  assert all(grid.finished(str(tmp_path / "second" / r)) for _, r, _ in fine)

  # One cell unrecorded: it trains, after the one pre-training run it starts from (its weights did not travel).
  missing = next((f, r, c) for f, r, c in fine if f["pretrain"] == "breast")
  shutil.rmtree(results / missing[1])
  trained.clear()
  grid.run(g, str(tmp_path / "third"))
  assert trained == [missing[2].init_from, missing[1]]
  assert (results / missing[1] / "summary.json").is_file()


def test_a_cell_already_in_the_workdir_is_kept_over_the_recorded_one(tmp_path, monkeypatch):
  g = _small_grid(tmp_path)
  _, fine = grid.plan(g)
  run = fine[0][1]
  for where, dice in ((tmp_path / "results", 0.1), (tmp_path / "work", 0.9)):
    os.makedirs(where / run)
    (where / run / "summary.json").write_text('{"dice": %s}' % dice)
  assert grid.take_results(str(tmp_path / "results"), str(tmp_path / "work"), fine) == []
  assert "0.9" in (tmp_path / "work" / run / "summary.json").read_text()


def test_the_time_table_counts_a_stacked_group_once():
  timing = [{"runs": ["pre"], "task": "pretrain", "seconds": 600.0,
             "device": "cpu"}, {"runs": ["a", "b"], "task": "finetune", "seconds": 300.0, "device": "cpu"},
            {"runs": ["c"], "task": "finetune", "seconds": 120.0, "device": "cpu"}]
  summaries = {
      "pre": {"compile_s": 60.0, "wall_s": 480.0}, "a": {"compile_s": 30.0, "wall_s": 240.0},
      "b": {"compile_s": 30.0, "wall_s": 240.0}, "c": {"compile_s": 6.0, "wall_s": 66.0}
  }
  rows = [line.split(" | ") for line in grid.time_table(timing, summaries).splitlines() if line.startswith("| cpu")]
  # device, phase, runs, programs, total, compiling, train loop (compile excluded), rest (total - loop), in minutes
  assert [r[1:] for r in rows] == [["fine-tuning", "3", "2", "7.0", "0.6", "4.5", "1.9 |"],
                                   ["pre-training", "1", "1", "10.0", "1.0", "7.0", "2.0 |"]]
  assert "Total: 17.0 min over 4 runs" in grid.time_table(timing, summaries)


def test_cells_train_seed_by_seed_so_a_grid_cut_short_stays_balanced(tmp_path, monkeypatch):
  g = grid_cpu.get_config()
  g.results_dir = str(tmp_path / "results")
  trained = []
  monkeypatch.setattr(grid.task, "run", _fake_train(trained))
  monkeypatch.setattr(grid, "write_report", lambda *a, **k: {})
  grid.run(g, str(tmp_path / "grid"))
  _, fine = grid.plan(g)
  fields = {r: f for f, r, _ in fine}
  cells = [fields[r] for r in trained if r in fields]
  assert [c["seed"] for c in cells] == [0] * 8 + [1] * 8 + [2] * 8
  assert {(c["pretrain"], c["label_fraction"]) for c in cells[:8]
         } == {(a, f) for a in ("none", "breast", "breast_1200", "multiorgan") for f in (100, 50)}


def test_the_report_puts_each_pretraining_beside_its_gain_and_says_where_the_time_went(tmp_path, monkeypatch):
  g = _small_grid(tmp_path)
  dice = {"none": 0.50, "breast_1200": 0.57, "breast": 0.55,
          "multiorgan": 0.60}  # longest name first: matched by prefix

  def fake(cfg, workdir):  # summaries only (no per-image scores): the report falls back to means over runs
    os.makedirs(os.path.join(workdir, "checkpoints", "7"), exist_ok=True)
    arm = next((a for a in dice if a != "none" and f"pretrain-{a}_" in cfg.init_from), "none")
    summary = {"task": cfg.task, "final_loss": 3.0, "compile_s": 1.0, "wall_s": 2.0}
    if cfg.task == "pretrain":
      summary["probe"] = {"busi_linear_bacc": 0.7}
    else:
      summary.update(dice=dice[arm], label_fraction=cfg.data.label_fraction)
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump(summary, f)

  monkeypatch.setattr(grid.task, "run", fake)
  paths = grid.run(g, str(tmp_path / "grid"))
  md = open(paths["md"]).read()
  probe_rows = {line.split(" | ")[0].strip("| "): line for line in md.splitlines() if "| 0.700 |" in line}
  assert sorted(probe_rows) == ["breast", "breast_1200", "multiorgan"]
  assert probe_rows["breast"].rstrip(" |").endswith("+0.050") and probe_rows["multiorgan"].rstrip(" |").endswith(
      "+0.100") and probe_rows["breast_1200"].rstrip(" |").endswith("+0.070")
  assert "## Where the time went" in md and "| cpu | pre-training | 3 | 3 |" in md
  # C3 against each breast-only arm (no per-image scores here, so no difference is computed).
  c3 = [line.split(" | ")[1] for line in md.splitlines() if line.startswith("| C3 |")]
  assert [c.split(" vs ")[1].split("/")[0] for c in c3] == ["breast", "breast_1200"]


def test_the_cpu_study_runs_every_cell_on_each_fold_with_that_folds_pretraining():
  from configs import study_cpu
  pre, fine = grid.plan(study_cpu.get_config())
  assert [(f["pretrain"], f["fold"], c.data.folds, c.data.fold) for f, _, c in pre
         ] == [("multiorgan", k, 5, k) for k in range(5)]
  assert len(fine) == 2 * 2 * 5 * 3  # scratch/multi-organ x 100/50% x 5 folds x 3 seeds
  pre_of = {f["fold"]: r for f, r, _ in pre}
  for f, _, c in fine:
    assert (c.data.folds, c.data.fold) == (5, f["fold"]) and c.eval_split == "test"
    assert c.init_from == ("" if f["pretrain"] == "none" else pre_of[f["fold"]])
  pre, fine = grid.plan(study_cpu.get_config("../shared/data,c3"))
  assert sorted({f["pretrain"] for f, _, _ in pre}) == ["breast", "multiorgan"] and len(fine) == 3 * 2 * 5 * 3
  # ,presence: the scratch cells alone, with the head and the choices on validation, named as the study's
  # scratch cells (so they pair by fold, seed and image) but recorded in a results folder of their own.
  study = {r: c for _, r, c in grid.plan(study_cpu.get_config())[1]}
  g = study_cpu.get_config("../shared/data,presence")
  pre, fine = grid.plan(g)
  assert pre == [] and len(fine) == 2 * 5 * 3 and g.results_dir == "results/study_cpu_presence"
  for f, r, c in fine:
    assert f["pretrain"] == "none" and (c.presence.weight, c.postprocess) == (0.1, "auto")
    assert (c.data.folds, c.data.fold, c.seed) == (study[r].data.folds, study[r].data.fold, study[r].seed)
  # ,bf16: fold 0's scratch cells in bf16, otherwise the study's (the pairs differ in the compute dtype alone).
  g = study_cpu.get_config("../shared/data,bf16")
  pre, fine = grid.plan(g)
  assert pre == [] and len(fine) == 2 * 3 and g.results_dir == "results/study_cpu_bf16"
  for f, r, c in fine:
    assert f["pretrain"] == "none" and f["fold"] == 0 and c.model.dtype == "bfloat16"
    differ = {k for k, v in c.to_dict().items() if v != study[r].to_dict()[k]}
    assert differ == {"model"} and {**c.model.to_dict(), "dtype": "float32"} == study[r].model.to_dict()


def test_a_pretraining_without_split_aware_sources_is_shared_by_the_folds():
  from configs import study_cpu
  g = study_cpu.get_config()
  g.sources = {"multiorgan": "busi,pocus", "natural": "natural"}
  g.fold_list = (0, 3)
  pre, fine = grid.plan(g)
  assert [(f["pretrain"], f.get("fold")) for f, _, _ in pre] == [("multiorgan", 0), ("multiorgan", 3),
                                                                 ("natural", None)]
  natural = next(r for f, r, _ in pre if f["pretrain"] == "natural")
  assert {f["fold"] for f, _, c in fine if c.init_from == natural} == {0, 3}
  g.fold_list = (5,)
  with pytest.raises(UsjaxError, match="fold_list"):
    grid.plan(g)


def test_a_study_trains_fold_by_fold_each_pretraining_just_before_its_cells(tmp_path, monkeypatch):
  from configs import study_cpu
  g = study_cpu.get_config()
  g.seeds, g.fold_list, g.results_dir = (0, 1), (0, 1, 2), str(tmp_path / "results")
  trained = []
  monkeypatch.setattr(grid.task, "run", _fake_train(trained))
  monkeypatch.setattr(grid, "write_report", lambda *a, **k: {})
  grid.run(g, str(tmp_path / "grid"))
  pre, fine = grid.plan(g)
  fields = {r: f for f, r, _ in pre + fine}
  order = [(fields[r].get("seed"), fields[r]["fold"], r.startswith("pre_")) for r in trained]
  scratch = [(s, k, False) for s in (0, 1) for k in (0, 1, 2)]
  expected = []
  for s, k, _ in scratch:  # per fold: scratch at 100 and 50%, the fold's pre-training (once), multi-organ cells
    expected += [(s, k, False)] * 2 + ([(None, k, True)] if s == 0 else []) + [(s, k, False)] * 2
  assert order == expected


def test_a_per_fold_pretraining_never_reads_its_folds_test_images(tmp_path, monkeypatch):
  """The ids the pre-training pipeline and its probes read, against the fold's test split."""
  from configs import study_cpu
  from test_duplicates import make_busi_with_copies
  from usjax import probe_data
  from usjax.data import pipeline, sources
  make_busi_with_copies(tmp_path / "busi")
  g = study_cpu.get_config()
  for part in (g.pretrain, g.finetune):
    part.data.busi_dir, part.data.data_dir, part.data.image_size = str(tmp_path / "busi"), str(tmp_path / "tfds"), 32
  g.sources = {"breast": "busi"}
  pre, fine = grid.plan(g)
  fold = 2
  cfg = next(c for f, _, c in pre if f["fold"] == fold)
  test_cfg = next(c for f, _, c in fine if f["fold"] == fold)
  ids = lambda split: {sources.open_split("busi", split, test_cfg.data)[i]["id"].decode()
                       for i in range(len(sources.open_split("busi", split, test_cfg.data)))}
  test, train, val = ids("test"), ids("train"), ids("val")
  read = set()
  opened = sources.open_split

  class Recording:
    def __init__(self, src):
      self.src = src

    def __len__(self):
      return len(self.src)

    def __getitem__(self, i):
      ex = self.src[i]
      read.add(ex["id"].decode())
      return ex

  monkeypatch.setattr(sources, "open_split", lambda *a, **k: Recording(opened(*a, **k)))
  it = iter(pipeline.pretrain_dataset(cfg.data, 8, 0))
  for _ in range(4 * len(train) // 8):
    next(it)
  assert read == train  # the pre-training's images: the fold's training split, all of it
  probe_data.probe_sets(cfg.data, names=("busi",), min_train=1)
  assert read == train | val and not read & test and len(test) > 0


def _study_fake(trained, dice_of):
  """`task.run` for a folded study: summaries with a Dice from `dice_of(cfg)` and the weights a pre-training
  leaves; a pre-training's summary counts its runs, so a re-run records another one."""
  def run(cfg, workdir):
    trained.append(os.path.basename(workdir))
    os.makedirs(os.path.join(workdir, "checkpoints", "7"), exist_ok=True)
    summary = {"task": cfg.task, "final_loss": 3.0 + 0.1 * trained.count(os.path.basename(workdir))}
    if cfg.task == "finetune":
      summary.update(dice=dice_of(cfg), label_fraction=cfg.data.label_fraction)
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump(summary, f)

  return run


def test_each_per_fold_pretraining_row_shows_the_gain_of_the_fine_tunes_it_started(tmp_path, monkeypatch):
  """Two folds, two seeds; scratch scores 0.5 everywhere, multi-organ 0.5 + 0.01 * (fold + 1) + 0.02 * seed (so
  fold 0 gains +0.02 averaged over seeds 0 and 1, fold 1 +0.03), minus 0.05 at 50% of the labels."""
  from configs import study_cpu
  g = study_cpu.get_config()
  g.seeds, g.fold_list, g.results_dir = (0, 1), (0, 1), str(tmp_path / "results")

  def dice_of(cfg):
    if not cfg.init_from:
      return 0.5
    return 0.5 + 0.01 * (cfg.data.fold + 1) + 0.02 * cfg.seed - (0.05 if cfg.data.label_fraction == 50 else 0)

  monkeypatch.setattr(grid.task, "run", _study_fake([], dice_of))
  md = open(grid.run(g, str(tmp_path / "grid"))["md"]).read()
  rows = {line.split(" | ")[0].strip("| "): line.rstrip(" |").split(" | ") for line in md.splitlines()
          if line.startswith("| pre_pretrain-")}
  assert sorted(rows) == [f"pre_pretrain-multiorgan_method-simclr_transfer-encoder_image_size-64_fold-{k}"
                          for k in (0, 1)]
  assert [r[-2:] for _, r in sorted(rows.items())] == [["+0.020", "-0.030"], ["+0.030", "-0.020"]]


def test_a_pretraining_rerun_for_a_later_seed_keeps_the_earlier_one_recorded(tmp_path, monkeypatch):
  """Seed 0's pass, then the workdir is lost (a new machine): seed 1's pass re-runs each fold's pre-training.
  The results folder keeps the summary seed 0's fine-tunes started from under earlier/1/."""
  from configs import study_cpu
  g = study_cpu.get_config()
  g.fold_list, g.results_dir = (0,), str(tmp_path / "results")
  trained = []
  monkeypatch.setattr(grid.task, "run", _study_fake(trained, lambda cfg: 0.5))
  monkeypatch.setattr(grid, "write_report", lambda *a, **k: {})
  g.seeds = (0,)
  grid.run(g, str(tmp_path / "grid"))
  shutil.rmtree(tmp_path / "grid")
  g.seeds = (0, 1)
  grid.run(g, str(tmp_path / "grid2"))
  pre = "pre_pretrain-multiorgan_method-simclr_transfer-encoder_image_size-64_fold-0"
  assert trained.count(pre) == 2 and sum(r.startswith("ft_") for r in trained) == 8
  recorded = tmp_path / "results" / pre
  assert json.loads((recorded / "summary.json").read_text())["final_loss"] == pytest.approx(3.2)
  assert json.loads((recorded / "earlier" / "1" / "summary.json").read_text())["final_loss"] == pytest.approx(3.1)
  assert not (recorded / "earlier" / "2").exists()
  grid.record(str(tmp_path / "grid2"), g.results_dir, [pre])  # the same run recorded again: nothing kept twice
  assert not (recorded / "earlier" / "2").exists()
