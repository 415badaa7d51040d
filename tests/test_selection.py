"""Model selection on validation: the scored model is the best one on validation, the test split is read only
after training, the flip-averaged scorer, and the `val` default."""
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default, finetune_busi, finetune_busi_real, grid_cpu
from usjax import evaluate, task, train
from usjax.data import sources

from test_end_to_end import tiny


def test_eval_split_defaults_to_val_and_only_studies_score_test():
  assert default.get_config().eval_split == "val"
  assert finetune_busi.get_config().eval_split == "val"
  assert finetune_busi_real.get_config().eval_split == "val"
  assert grid_cpu.get_config().finetune.eval_split == "test"


def _fake_batches():
  index = np.array([0, 1], np.int32)
  return [{"image": np.zeros((2, 4, 4, 1), np.uint8), "mask": np.ones((2, 4, 4, 1), np.uint8), "index": index}]


def test_selector_keeps_a_copy_of_the_best_candidate():
  # Each candidate's validation Dice is its weight `q`: the best is the EMA at step 3 (0.8).
  def score(variables, images, masks):
    d = jnp.full((images.shape[0],), variables["q"])
    return d, d, jnp.zeros(images.shape, bool)

  raw, ema = [0.2, 0.7, 0.5], [0.1, 0.6, 0.8]
  sel = evaluate.Selector(1, score, _fake_batches(), lambda a: a, ["a", "b"], ["x", "y"],
                          lambda s: {"raw": {"q": jnp.float32(raw[s])}, "ema": {"q": jnp.float32(ema[s])}})
  for step in range(3):
    sel(step + 1, step)
  assert sel.best == {"step": 3, "weights": "ema", "dice": pytest.approx(0.8), "dice_lesion": pytest.approx(0.8)}
  assert float(sel.best_variables["q"]) == pytest.approx(0.8)
  assert [r["raw_dice"] for r in sel.history] == pytest.approx(raw)
  assert sel.due(2, 10) and Selector_due_every_zero()


def Selector_due_every_zero():
  sel = evaluate.Selector(0, None, [], None, [], [], None)
  return not sel.due(5, 10) and sel.due(10, 10)


@pytest.mark.slow
def test_finetune_scores_the_best_on_validation_and_reads_test_only_after_training(tmp_path, monkeypatch):
  opened, trained = [], []
  real_open, real_fit = sources.open_split, train.fit

  def open_split(name, split, data_cfg, decoders=None):
    opened.append((split, bool(trained)))
    return real_open(name, split, data_cfg, decoders)

  def fit(*args, **kw):
    out = real_fit(*args, **kw)
    trained.append(True)
    return out

  monkeypatch.setattr(sources, "open_split", open_split)
  monkeypatch.setattr(train, "fit", fit)
  cfg = tiny(finetune_busi.get_config(), tmp_path / "data")
  cfg.num_steps, cfg.val_every, cfg.ema_decay, cfg.eval_split, cfg.tta = 6, 2, 0.5, "test", "auto"
  summary = task.run(cfg, str(tmp_path / "fine"))

  assert ("test", False) not in opened and ("test", True) in opened  # test only once training is over
  assert ("val", False) in opened
  # The chosen (step, weights) is the best validation Dice of the history.
  hist = summary["val_history"]
  assert [h["step"] for h in hist] == [2, 4, 6]
  best = max(((h[f"{w}_dice"], -h["step"], w) for h in hist for w in ("raw", "ema")))
  sel = summary["selected"]
  assert (sel["dice"], sel["step"], sel["weights"]) == (pytest.approx(best[0]), -best[1], best[2])
  # <workdir>/best holds that step, and its weights reproduce the reported test score.
  best_dir = tmp_path / "fine" / "best"
  assert os.listdir(best_dir / "checkpoints" if (best_dir /
                                                 "checkpoints").exists() else best_dir).count(str(sel["step"])) == 1
  from usjax import checkpoint
  mngr = checkpoint.manager(str(best_dir), create=False)
  model = train.build_model(cfg)
  init = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 1)), train=False)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), dict(init))
  variables, meta = checkpoint.restore_latest(mngr, abstract)
  assert meta["best"]["step"] == sel["step"]
  from usjax.data import pipeline
  ids, labels = pipeline.split_labels(cfg.data, "test")
  scores, _ = evaluate.score_split(evaluate.make_scorer(model, tta=sel["tta"]), variables,
                                   list(pipeline.eval_batches(cfg.data, "test", cfg.batch_size)), jnp.asarray, ids,
                                   labels)
  assert float(np.mean(scores["dice"])) == pytest.approx(summary["dice"], abs=1e-6)
  assert set(summary["last_step"]) >= {"dice", "iou"}


class Ramp(nn.Module):
  """A left-right asymmetric 'segmenter': logit = 4 * (x - 0.5) + column ramp."""
  @nn.compact
  def __call__(self, x, train=False):
    ramp = jnp.linspace(-1.0, 1.0, x.shape[2])[None, None, :, None]
    return 4.0 * (x - 0.5) + ramp


def test_flip_averaged_scorer_matches_numpy():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (2, 5, 6, 1)).astype(np.uint8)
  masks = rng.integers(0, 2, (2, 5, 6, 1)).astype(np.uint8)
  x = images / 255.0
  ramp = np.linspace(-1, 1, 6)[None, None, :, None]
  sig = lambda z: 1 / (1 + np.exp(-z))
  prob = 0.5 * (sig(4 * (x - 0.5) + ramp) + sig(4 * (x - 0.5) + ramp[:, :, ::-1]))
  dice, _, pred = evaluate.make_scorer(Ramp(), tta=True)({}, images, masks)
  np.testing.assert_array_equal(pred, prob > 0.5)
  ref = [2 * ((p > 0.5) & (m > 0)).sum() / ((p > 0.5).sum() + (m > 0).sum()) for p, m in zip(prob, masks)]
  np.testing.assert_allclose(dice, ref, rtol=1e-6)
  _, _, plain = evaluate.make_scorer(Ramp(), tta=False)({}, images, masks)
  np.testing.assert_array_equal(plain, sig(4 * (x - 0.5) + ramp) > 0.5)
