"""Stacked fine-tuning (usjax.stacked): runs trained at once in one vmapped program end where each trained alone
ends, and the grid trains its cells `stack_runs` at a time."""
import functools
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import finetune_busi, grid_cpu, grid_gpu
from usjax import UsjaxError, augment, checkpoint, feed, finetune, grid, guard, stacked, task, torch_weights, train
from usjax.data import pipeline

from test_end_to_end import tiny
from test_torch_weights import random_value, torchvision_state_dict

RTOL, ATOL = 1e-5, 1e-6  # vmapped convolutions may round differently from unbatched ones
FILES = ["best", "examples.npz", "history.json", "per_image.json", "summary.json", "tb"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("stacked") / "data"


def small(data_dir, seed=0, fraction=100):
  cfg = tiny(finetune_busi.get_config(), data_dir)
  cfg.seed, cfg.data.label_fraction = seed, fraction
  cfg.num_steps, cfg.val_every, cfg.ema_decay = 4, 2, 0.5
  return cfg


def close(a, b):
  """Pytrees equal up to the rounding of vmapped convolutions."""
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64), rtol=RTOL, atol=ATOL)


def same(a, b):
  """JSON-like values equal, their floats up to that rounding."""
  if isinstance(a, dict):
    assert sorted(a) == sorted(b)
    for k in a:
      same(a[k], b[k])
  elif isinstance(a, list):
    assert len(a) == len(b)
    for x, y in zip(a, b):
      same(x, y)
  elif isinstance(a, float):
    assert b == pytest.approx(a, rel=RTOL, abs=ATOL)
  else:
    assert a == b


def test_stack_and_unstack_are_inverse():
  trees = [{"w": np.full((2, 3), i, np.float32), "step": np.int32(i)} for i in range(3)]
  s = stacked.stack(trees)
  assert s["w"].shape == (3, 2, 3) and s["step"].shape == (3,)
  for a, b in zip(stacked.unstack(s, 3), trees):
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_epoch_order_is_grains_shuffle():
  """One epoch of `MapDataset.shuffle(seed)` over n items, against grain's own index_shuffle (the small n walk
  longest: a 65,536-value block holds few values below them)."""
  from grain._src.python.experimental.index_shuffle.python import index_shuffle_module
  for n in (1, 2, 3, 44, 109, 436, 1000):
    for seed in (0, 1, 7, 2**32 - 1):
      want = [0] if n == 1 else [index_shuffle_module.index_shuffle(i, n - 1, seed, 4) for i in range(n)]
      assert feed.epoch_order(n, seed).tolist() == want, (n, seed)
  assert feed.epoch_order(70000, 3)[:50].tolist() == [index_shuffle_module.index_shuffle(i, 69999, 3, 4)
                                                      for i in range(50)]


def test_the_shared_split_feeds_each_run_the_batches_of_its_own_pipeline(data_dir):
  """The group's one decoded copy gives each run, step by step, what its grain pipeline (label-fraction subset,
  shuffled with its seed, PNGs decoded and resized) would give it, across epochs of the smaller subsets."""
  cfgs = [small(data_dir, seed=s, fraction=f) for s, f in ((0, 100), (1, 50), (2, 10), (0, 10))]
  indices = [feed.subset_indices(c.data) for c in cfgs]
  shared = feed.SharedSplit(cfgs[0].data, np.concatenate(indices))
  assert len(shared.rows) == len(indices[0]) and all(set(i) <= set(indices[0]) for i in indices)
  feeds = [feed.Feed(shared, idx, c.seed, c.batch_size) for c, idx in zip(cfgs, indices)]
  alone = [iter(pipeline.finetune_dataset(c.data, c.batch_size, c.seed)[0]) for c in cfgs]
  for _ in range(3 * len(indices[0]) // cfgs[0].batch_size):
    image, mask = feed.group_batch(shared, feeds)
    assert image.shape == (4, 8, 32, 32, 1) and mask.shape == (4, 8, 32, 32, 1)
    for i, it in enumerate(alone):
      want = next(it)
      np.testing.assert_array_equal(image[i], want["image"])
      np.testing.assert_array_equal(mask[i], want["mask"])
  assert not np.array_equal(image[2], image[3])  # same subset, other seed: another order


def test_configs_that_differ_in_a_shape_cannot_stack(tmp_path, data_dir):
  a, b = small(data_dir), small(data_dir, seed=1, fraction=50)
  b.data.image_size = 64
  with pytest.raises(UsjaxError) as e:
    stacked.finetune_stacked([a, b], [str(tmp_path / "a"), str(tmp_path / "b")])
  assert "config.data.image_size" in str(e.value) and "\n" not in str(e.value)
  assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
  b = small(data_dir, seed=1)
  b.optim.learning_rate = 0.5
  with pytest.raises(UsjaxError, match="config.optim.learning_rate"):
    stacked.check_stackable([a, b], ["a", "b"])
  b = small(data_dir, seed=1, fraction=10)
  b.init_from, b.transfer = "somewhere", "encoder+decoder"
  stacked.check_stackable([a, b], ["a", "b"])  # what a study grid varies may differ


@pytest.mark.slow
def test_stacked_step_equals_each_run_stepped_alone():
  """Two runs (different weights, RNGs and batches) through the vmapped step and each through the plain step:
  after an optimiser step, the same parameters, BatchNorm statistics, optimiser state, EMA and metrics; after a
  second step the same forward pass (loss, Dice, BatchNorm statistics).

  Not bitwise: the batched convolutions round differently (~1e-7 relative), and two things amplify that. Adam
  divides by the gradient's magnitude, so an element whose gradient is near zero moves by a rounding-sized
  fraction of the learning rate (seen: 16 of 221,184 decoder kernel elements off by up to 6e-6 after one step at
  1e-3); hence SGD, whose step is linear in the gradient. And a ReLU input or max-pool near-tie within rounding of
  its kink sends a gradient element elsewhere, so later gradients differ by up to ~1e-3 relative; hence only the
  second step's forward pass. The same happens to an unstacked run on other hardware.
  """
  cfg = tiny(finetune_busi.get_config(), "unused")
  cfg.model.decoder_widths = (32, 16, 16, 8, 8)
  cfg.ema_decay, cfg.optim.name, cfg.optim.learning_rate, cfg.optim.warmup_steps = 0.5, "sgd", 0.1, 0
  mesh = train.make_mesh()
  model, tx = train.build_model(cfg), train.make_optimizer(cfg, 10)
  loss_fn = functools.partial(finetune.segmentation_loss, model=model, ema_decay=cfg.ema_decay,
                              aug_cfg=augment.AugmentConfig.from_dict(cfg.augment))
  after = functools.partial(finetune.ema_after_step, decay=cfg.ema_decay)

  def state(seed):
    st = train.init_state(model, tx, seed, (2, 32, 32, 1), mesh)
    st["extra"] = {
        "ema_params": jax.tree.map(jnp.copy, st["params"]),
        "ema_batch_stats": jax.tree.map(jnp.copy, st["batch_stats"])
    }
    return st

  rng = np.random.default_rng(0)
  batches = [[(rng.integers(0, 256, (8, 32, 32, 1), np.uint8), rng.integers(0, 2, (8, 32, 32, 1), np.uint8))
              for _ in range(2)]
             for _ in range(2)]  # [step][run]
  single, alone = train.compile_step(loss_fn, tx, mesh, after), []
  for run in range(2):
    st = state(run)
    for b in batches:
      st, m = single(st, train.global_batch(b[run], mesh))
      alone.append(jax.device_get((st, m)))
  step = stacked.compile_stacked_step(loss_fn, tx, mesh, after)
  st, together = stacked.stack([state(0), state(1)]), []
  for b in batches:
    st, m = step(st, stacked.global_group_batch(tuple(np.stack(x) for x in zip(*b)), mesh))
    together.append(stacked.unstack(jax.device_get((st, m)), 2))
  for run in range(2):
    (first_a, m1_a), (second_a, m2_a) = alone[2 * run:2 * run + 2]
    (first_t, m1_t), (second_t, m2_t) = together[0][run], together[1][run]
    assert int(first_t["step"]) == 1 and int(second_t["step"]) == 2
    close(first_a, first_t)
    close(m1_a, m1_t)
    close(second_a["batch_stats"], second_t["batch_stats"])
    close({k: m2_a[k] for k in ("loss", "train_dice")}, {k: m2_t[k] for k in ("loss", "train_dice")})
  assert not np.allclose(together[0][0][1]["loss"], together[0][1][1]["loss"])  # two different runs


@pytest.mark.parametrize("bad", [
    {4: {"update_ratio": 50.0}},  # a parameter blow-up
    {2: {"loss": 300.0}},  # far above the first losses
    {20: {"loss": 300.0}},  # far above the recent ones
    {3: {"loss": float("nan"), "finite": False}},
    {7: {"finite": False}},  # a finite loss from a step whose gradient was not
])
def test_a_stacked_run_is_guarded_as_a_run_alone(tmp_path, bad):
  """A stacked run keeps no checkpoints, and its guard, the one `train.fit` runs, gives the same verdicts."""
  cfg = small("unused")
  steps = [{"loss": 2.7 + 0.01 * (i % 3), "update_ratio": 0.01, "finite": True, **bad.get(i, {})} for i in range(1, 31)]
  mngr = checkpoint.manager(str(tmp_path / "checkpoints"))
  alone = guard.GoodStepTracker.from_config(cfg.guard, mngr)
  together = guard.GoodStepTracker.from_config(cfg.guard, None)
  for end in range(5, 31, 5):  # the host metrics of five steps at a time, as the loops fetch them
    want, got = alone.check(end, steps[end - 5:end]), together.check(end, steps[end - 5:end])
    assert got == want
    if want:
      break
  assert want is not None and want[0] == next(iter(bad))
  mngr.close()

  train.record_divergence(str(tmp_path), "finetune", *got, None, [{"step": 1}], stacked=True)
  assert json.loads((tmp_path / "summary.json").read_text()) == {
      "task": "finetune", "status": "diverged", "stopped_at_step": got[0], "reason": got[1],
      "last_good_checkpoint": None, "history": [{"step": 1}], "stacked": True
  }


@pytest.fixture
def validated(monkeypatch):
  """The variables each validation saw, by (workdir, step)."""
  seen = {}
  real = finetune.Validation.__call__

  def call(self, step, state, rep):
    workdir = os.path.dirname(str(self.mngr.directory))
    seen[(os.path.basename(workdir), step)] = jax.device_get({k: state[k] for k in ("params", "batch_stats")})
    return real(self, step, state, rep)

  monkeypatch.setattr(finetune.Validation, "__call__", call)
  return seen


@pytest.mark.slow
def test_stacked_runs_equal_runs_trained_alone(tmp_path, data_dir, validated):
  """Two runs with different seeds, label fractions and initialisations, trained stacked and each alone: the same
  batches, augmentations, BatchNorm statistics, EMA, validation scores, selection and files.

  At learning rate 0, so that the weights stay where both start: with a moving network the kinks of ReLU and
  max-pool amplify the convolutions' rounding (see the step test above), and two runs drift apart by more than
  any rounding tolerance whether or not one of them is stacked. The optimiser step itself is checked there.
  """
  weights = str(tmp_path / "resnet18.safetensors")  # run 1 starts from (fake) ImageNet weights, run 0 from scratch
  torch_weights.write_safetensors(weights, torchvision_state_dict(18, random_value(0)))

  def cfgs():
    a, b = small(data_dir, seed=0, fraction=100), small(data_dir, seed=1, fraction=50)
    b.init_from = weights
    for c in (a, b):
      c.eval_split, c.optim.learning_rate = "test", 0.0
    return [a, b]

  alone = [task.run(c, str(tmp_path / f"alone{i}")) for i, c in enumerate(cfgs())]
  together = stacked.finetune_stacked(cfgs(), [str(tmp_path / f"stacked{i}") for i in range(2)])

  for i, (a, t) in enumerate(zip(alone, together)):
    assert t["stacked_runs"] == 2 and t["steps"] == 4
    for step in (2, 4):  # the weights each validation scored: the run's parameters and BatchNorm statistics
      close(validated[(f"alone{i}", step)], validated[(f"stacked{i}", step)])
    assert [h["step"] for h in t["val_history"]] == [2, 4]
    same(a["val_history"], t["val_history"])
    same(a["selected"], t["selected"])
    for key in ("dice", "iou", "dice_lesion", "last_step", "final_loss", "train_images", "label_fraction", "init_from",
                "transfer", "eval_split"):
      same(a[key], t[key])
    read = lambda run, name: json.loads((tmp_path / run / name).read_text())
    hist_a, hist_t = read(f"alone{i}", "history.json"), read(f"stacked{i}", "history.json")
    same([{k: r[k] for k in ("step", "loss", "train_dice")} for r in hist_a],
         [{k: r[k] for k in ("step", "loss", "train_dice")} for r in hist_t])
    same(read(f"alone{i}", "per_image.json"), read(f"stacked{i}", "per_image.json"))
    same(read(f"alone{i}", "best/selection.json"), read(f"stacked{i}", "best/selection.json"))
    # The same files as an unstacked run, less its checkpoints (a stack keeps none).
    assert sorted(os.listdir(tmp_path / f"stacked{i}")) == FILES
    assert sorted(set(os.listdir(tmp_path / f"alone{i}")) - {"checkpoints", ".lock"}) == FILES
  assert together[1]["transfer"]["checkpoint"] == weights and together[1]["transfer"]["loaded"] > 0
  assert together[0]["transfer"] is None
  assert together[0]["val_history"] != together[1]["val_history"]
  # Finished runs are skipped: the summaries come back from disk.
  mtime = os.path.getmtime(tmp_path / "stacked0" / "summary.json")
  assert stacked.finetune_stacked(cfgs(), [str(tmp_path / f"stacked{i}") for i in range(2)]) == together
  assert os.path.getmtime(tmp_path / "stacked0" / "summary.json") == mtime


def test_grid_stacks_cells_that_differ_in_seed_fraction_and_arm(tmp_path):
  g = grid_cpu.get_config()
  pre, fine = grid.plan(g)
  todo = pre + fine
  assert [len(x) for x in grid.schedule(todo, 1, str(tmp_path))] == [1] * len(todo)
  g.stack_runs = 6
  groups = grid.schedule(todo, g.stack_runs, str(tmp_path))
  assert [x for grp in groups for x in grp][:len(pre)] == pre  # pre-training first, alone
  stacks = groups[len(pre):]
  assert sorted(r for grp in stacks for _, r, _ in grp) == sorted(r for _, r, _ in fine)
  # grid_cpu: 4 arms x 2 fractions x 3 seeds, in plan order: each stack of 6 is one arm's cells.
  assert [len(grp) for grp in stacks] == [6, 6, 6, 6]
  assert [{f["pretrain"] for f, _, _ in grp} for grp in stacks] == [{"none"}, {"breast"}, {"breast_1200"},
                                                                    {"multiorgan"}]
  # A cell with checkpoints of its own (an unstacked attempt) resumes alone; its arm's other cells stack.
  os.makedirs(tmp_path / fine[0][1] / "checkpoints" / "500")
  groups = grid.schedule(todo, 6, str(tmp_path))
  assert [len(grp) for grp in groups[len(pre):]] == [1, 5, 6, 6, 6] and groups[len(pre)] == [fine[0]]
  assert {f["pretrain"] for f, _, _ in groups[len(pre) + 1]} == {"none"}


def test_the_gpu_grid_trains_each_arm_in_one_program(tmp_path):
  """grid.run hands `schedule` the cells seed by seed; each stacked program still holds one arm's 12 cells (4
  fractions x 3 seeds), filled by fraction, then seed."""
  pre, fine = grid.plan(grid_gpu.get_config())
  todo = pre + sorted(fine, key=lambda x: x[0]["seed"])
  groups = grid.schedule(todo, 12, str(tmp_path))
  assert groups[:len(pre)] == [[p] for p in pre]
  arms = [[f for f, _, _ in grp] for grp in groups[len(pre):]]
  assert [{f["pretrain"] for f in arm} for arm in arms] == [{"none"}, {"breast"}, {"multiorgan"},
                                                            {"multiorgan_natural"}]
  want = [(lf, seed) for lf in (100, 50, 25, 10) for seed in (0, 1, 2)]
  assert all([(f["label_fraction"], f["seed"]) for f in arm] == want for arm in arms)
  assert len(grid.schedule(todo, 5, str(tmp_path))) == len(pre) + 4 * 3  # 12 cells in groups of 5, 5 and 2


@pytest.mark.slow
def test_grid_with_stack_runs_trains_its_cells_together(tmp_path, data_dir):
  g = ml_collections.ConfigDict()
  g.task, g.name, g.report_only, g.stack_runs = "grid", "tiny", False, 2
  g.sources = ml_collections.ConfigDict()
  g.methods, g.transfers, g.label_fractions, g.image_sizes, g.seeds = ("simclr",), ("encoder",), (100, 50), (32,), (0,)
  g.pretrain = ml_collections.ConfigDict()
  g.finetune = small(data_dir)
  _, fine = grid.plan(g)
  grid.run(g, str(tmp_path / "grid"))
  for _, run, _ in fine:
    assert sorted(os.listdir(tmp_path / "grid" / run)) == FILES  # what an unstacked cell writes, less checkpoints
    summary = json.loads((tmp_path / "grid" / run / "summary.json").read_text())
    assert summary["stacked_runs"] == 2 and 0.0 <= summary["dice"] <= 1.0
  assert (tmp_path / "grid" / "report" / "results.csv").is_file()
