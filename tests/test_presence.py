"""No lesion drawn on a normal scan: the presence gate and post-processing chosen on validation, the presence head
and its loss, the lesion-presence AUC, and a short fine-tune whose choices prediction applies."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import finetune_busi
from usjax import analysis, checkpoint, evaluate, models, objectives, postprocess, predict, task

from test_end_to_end import tiny


def blob(shape, top, left, size, value):
  p = np.zeros(shape, np.float32)
  p[top:top + size, left:left + size] = value
  return p


# ---------------------------------------------------------------------------------------------------- the gate
def test_the_gate_threshold_is_chosen_on_validation():
  """Six validation images: three with a lesion (segmented with Dice 0.8), three normal scans of which two carry a
  false lesion (Dice 0). Presence probabilities: lesions 0.9, 0.7, 0.4; normal scans 0.6, 0.3, 0.2 (the clean
  one 0.2). Thresholds between observed values, by hand:
    0.25 empties the 0.2 scan (clean: stays 1)           -> (0.8*3 + 0 + 0 + 1) / 6 = 3.4 / 6
    0.35 also the 0.3 scan (a false lesion: 0 -> 1)      -> (2.4 + 0 + 1 + 1) / 6   = 4.4 / 6
    0.5  also the 0.4 lesion (0.8 -> 0)                  -> (1.6 + 0 + 1 + 1) / 6   = 3.6 / 6
    0.65 also the 0.6 scan (0 -> 1)                      -> (1.6 + 1 + 1 + 1) / 6   = 4.6 / 6
    0.8  also the 0.7 lesion (0.8 -> 0)                  -> (0.8 + 3) / 6           = 3.8 / 6
  so 0.65 (the midpoint of 0.6 and 0.7) with 4.6 / 6, against 3.4 / 6 without a gate."""
  presence = [0.9, 0.7, 0.4, 0.6, 0.3, 0.2]
  dices = [0.8, 0.8, 0.8, 0.0, 0.0, 1.0]
  empty = [False, False, False, True, True, True]
  threshold, off, gated = postprocess.choose_threshold(presence, dices, empty)
  assert threshold == pytest.approx(0.65) and off == pytest.approx(3.4 / 6) and gated == pytest.approx(4.6 / 6)
  np.testing.assert_allclose(postprocess.gated_dice(dices, empty, presence, threshold), [0.8, 0.8, 0, 1, 1, 1])
  # A head that ranks a lesion image lowest of all has nothing to gate: off.
  assert postprocess.choose_threshold([0.1, 0.9, 0.8], [0.9, 0.0, 1.0], [False, True, True])[0] is None


def test_the_lesion_budget_gate_clears_the_most_false_lesions_it_can_afford():
  """The six images above, chosen by the budget rule. Mean lesion-image Dice ungated: 0.8. By hand:
    0.25 clears no false lesion (the 0.2 scan was clean)      lesion Dice 0.8
    0.35 clears the 0.3 scan                                  lesion Dice 0.8          (cost 0)
    0.5  gates the 0.4 lesion                                 lesion Dice 1.6/3 = 0.533 (cost 0.267)
    0.65 clears the 0.6 scan too                              lesion Dice 0.533         (cost 0.267)
    0.8  gates the 0.7 lesion                                 lesion Dice 0.267         (cost 0.533)
  A budget of 0.01 affords 0.35 (one of two false lesions cleared); 0.3 affords 0.65 (both); a lesion image the
  network missed anyway (Dice 0) costs nothing to gate."""
  presence = [0.9, 0.7, 0.4, 0.6, 0.3, 0.2]
  dices = [0.8, 0.8, 0.8, 0.0, 0.0, 1.0]
  empty = [False, False, False, True, True, True]
  threshold, off, gated = postprocess.choose_threshold(presence, dices, empty, lesion_budget=0.01)
  assert threshold == pytest.approx(0.35) and off == pytest.approx(3.4 / 6) and gated == pytest.approx(4.4 / 6)
  assert postprocess.choose_threshold(presence, dices, empty, lesion_budget=0.3)[0] == pytest.approx(0.65)
  assert [postprocess.cleared(dices, empty, presence, t) for t in (0.25, 0.35, 0.65, 0.8)] == [0, 1, 2, 2]
  missed = [0.8, 0.8, 0.0, 0.0, 0.0, 1.0]  # the 0.4 lesion scored 0: gating it is free
  assert postprocess.choose_threshold(presence, missed, empty, lesion_budget=0.0)[0] == pytest.approx(0.65)
  # Nothing to clear (no normal scan carries a false lesion): off, whatever the budget.
  assert postprocess.choose_threshold(presence, [0.8, 0.8, 0.8, 1, 1, 1], empty, lesion_budget=1.0)[0] is None
  probs = [blob((16, 16), 2, 2, 6, 0.9)] * 3 + [blob((16, 16), 2, 2, 4, 0.9)] * 2 + [np.zeros((16, 16))]
  choice = postprocess.select(probs, [p > 0.5 for p in probs[:3]] + [np.zeros((16, 16), bool)] * 3,
                              presence, search_rule=False, lesion_budget=0.01)
  assert choice["presence_threshold"] == pytest.approx(0.35) and choice["presence_gate"] == "lesion_budget=0.01"


def test_the_gate_thresholds_the_peak_probability_where_that_separates_better_on_validation():
  """Two lesion images (blobs of peak 0.95, masks equal to them) and two normal scans with false lesions of peak
  0.6. The head ranks one normal scan (0.7) above a lesion (0.5): on it, within a budget of 0.01, only the 0.2 scan
  can be cleared (threshold 0.35); the peak separates all four (threshold 0.775 clears both). 'auto' takes the
  peak; the record names it, and the final scoring gates on it."""
  shape = (16, 16)
  probs = [blob(shape, 2, 2, 6, 0.95), blob(shape, 6, 6, 6, 0.95), blob(shape, 1, 9, 4, 0.6), blob(shape, 9, 1, 4, 0.6)]
  masks = [probs[0] > 0.5, probs[1] > 0.5, np.zeros(shape, bool), np.zeros(shape, bool)]
  presence = [0.5, 0.9, 0.7, 0.2]
  head = postprocess.select(probs, masks, presence, search_rule=False, lesion_budget=0.01, gate_on="head")
  assert head["presence_threshold"] == pytest.approx(0.35) and head["presence_gate_on"] == "head"
  auto = postprocess.select(probs, masks, presence, search_rule=False, lesion_budget=0.01, gate_on="auto")
  assert auto["presence_threshold"] == pytest.approx(0.775) and auto["presence_gate_on"] == "peak"
  assert auto["val_dice_postprocessed"] == pytest.approx(1.0) and auto["val_dice_raw"] == pytest.approx(0.5)
  split = {"prob": np.stack(probs), "mask": np.stack(masks), "presence": np.array(presence),
           "max_prob": np.array([0.95, 0.95, 0.6, 0.6]), "image": np.zeros((0, *shape, 1), np.uint8)}
  by_peak, _ = evaluate.score_probabilities(split, None, auto["presence_threshold"], "peak")
  np.testing.assert_allclose(by_peak["dice"], [1, 1, 1, 1])
  by_head, _ = evaluate.score_probabilities(split, None, auto["presence_threshold"], "head")
  np.testing.assert_allclose(by_head["dice"], [0, 1, 1, 1])  # on the head's values it gates the 0.5 lesion


def test_select_gates_then_post_processes_and_final_mask_applies_it():
  shape = (32, 32)
  probs = [blob(shape, 4, 4, 8, 0.95), blob(shape, 8, 8, 8, 0.95), blob(shape, 10, 10, 6, 0.97),
           blob(shape, 2, 20, 6, 0.96)]
  masks = [blob(shape, 4, 4, 8, 1) > 0, blob(shape, 8, 8, 8, 1) > 0, np.zeros(shape, bool), np.zeros(shape, bool)]
  presence = [0.9, 0.8, 0.3, 0.2]  # the head knows the last two are normal; their false lesions are sure ones
  choice = postprocess.select(probs, masks, presence, search_rule=True)
  assert choice["presence_threshold"] == pytest.approx(0.55) and choice["postprocess"] == postprocess.NONE
  assert choice["val_dice_raw"] == pytest.approx(0.5) and choice["val_dice_postprocessed"] == pytest.approx(1.0)
  assert not postprocess.final_mask(probs[2], None, 0.3, 0.55).any()
  assert postprocess.final_mask(probs[0], None, 0.9, 0.55).sum() == 64
  assert postprocess.final_mask(probs[2], None, 0.3, None).sum() == 36  # no gate: the head is not consulted
  without_head = postprocess.select(probs, masks, None, search_rule=False)
  assert without_head["presence_threshold"] is None and without_head["val_dice_postprocessed"] == pytest.approx(0.5)


# ---------------------------------------------------------------------------------------------------- scoring
def test_auc_rank_formula_by_hand():
  # Positives 0.8, 0.4, 0.6; negatives 0.5, 0.4, 0.1. Of the 9 pairs the positive scores higher in 0.8 > all
  # three (3), 0.6 > 0.5, 0.4, 0.1 (3), 0.4 > 0.1 (1), ties with the negative 0.4 (half): (7 + 0.5) / 9.
  scores = [0.8, 0.4, 0.6, 0.5, 0.4, 0.1]
  positive = [True, True, True, False, False, False]
  assert evaluate.auc(scores, positive) == pytest.approx(7.5 / 9)
  assert evaluate.auc([0.1, 0.9], [False, True]) == 1.0 and evaluate.auc([0.9, 0.1], [False, True]) == 0.0
  assert np.isnan(evaluate.auc([0.3, 0.4], [True, True]))


def test_a_speck_and_a_lesion_through_the_final_scoring():
  """One lesion image whose map also has a 4-pixel speck, one normal scan with a faint false lesion: plain
  thresholding scores Dice 2*144/(148+144) and 0; the rule chosen on them removes both."""
  shape = (64, 64)
  lesion = blob(shape, 10, 10, 12, 0.95)
  split = {
      "prob": np.stack([np.maximum(lesion, blob(shape, 50, 50, 2, 0.9)), blob(shape, 30, 30, 5, 0.65)]),
      "mask": np.stack([lesion > 0, np.zeros(shape, bool)]), "index": np.array([0, 1]), "id": np.array(["a", "b"]),
      "label": np.array(["benign", "normal"]), "max_prob": np.array([0.95, 0.65], np.float32),
      "image": np.zeros((2, 64, 64, 1), np.uint8)
  }
  raw, _ = evaluate.score_probabilities(split)
  np.testing.assert_allclose(raw["dice"], [2 * 144 / (148 + 144), 0.0], rtol=1e-6)
  rule, _ = postprocess.choose(split["prob"], split["mask"])
  assert rule["min_peak"] > 0.65 and rule["min_area"] > 0
  scores, examples = evaluate.score_probabilities(split, rule)
  np.testing.assert_array_equal(scores["dice"], [1.0, 1.0])
  assert examples["pred"].shape == (2, 64, 64, 1) and examples["pred"].sum() == 144
  summary = evaluate.summarize(scores)
  assert summary["false_positive_rate"] == 0.0 and summary["dice_lesion"] == 1.0
  assert summary["presence_auc"] == 1.0 and summary["presence_auc_from"] == "max_prob"
  rows = evaluate.per_image_rows(scores)
  assert rows[0]["max_prob"] == pytest.approx(0.95) and rows[1]["lesion"] is False


def test_group_table_reports_the_presence_auc_and_its_source():
  rows = [{"pretrain": "none", "label_fraction": 100, "seed": s, "dice": 0.6, "dice_lesion": 0.5,
           "false_positive_rate": 0.2, "presence_auc": a, "presence_auc_from": "head"} for s, a in ((0, 0.8), (1, 0.9))]
  table = analysis.group_table(rows, n_boot=50)
  assert "Presence AUC (from)" in table and "0.850 (head)" in table and "0.200" in table


# ---------------------------------------------------------------------------------------------------- the head
def test_the_presence_head_is_off_by_default_and_its_loss_reaches_the_encoder():
  x = jax.random.uniform(jax.random.key(0), (2, 32, 32, 1))
  masks = jnp.zeros((2, 32, 32, 1)).at[0, 4:9, 4:9].set(1.0)
  plain = models.UNet(decoder_widths=(16, 8, 8, 8, 8))
  shapes = jax.eval_shape(lambda: plain.init(jax.random.key(0), x, train=False))
  assert "presence_head" not in shapes["params"]
  assert isinstance(jax.eval_shape(lambda v: plain.apply(v, x, train=False), shapes), jax.ShapeDtypeStruct)

  net = models.UNet(decoder_widths=(16, 8, 8, 8, 8), presence_head=True)
  variables = jax.jit(lambda: net.init(jax.random.key(0), x, train=False))()  # jitted: one compile, not op by op
  logits, presence = jax.jit(lambda v: net.apply(v, x, train=False))(variables)
  assert logits.shape == (2, 32, 32, 1) and presence.shape == (2,)

  def loss(params):  # the presence loss alone
    _, p = net.apply({**variables, "params": params}, x, train=False)
    return objectives.presence_bce(p, masks)

  grads = jax.jit(lambda p: jax.tree.map(lambda g: jnp.sum(jnp.abs(g)), jax.grad(loss)(p)))(variables["params"])
  norm = lambda tree: float(sum(np.asarray(g) for g in jax.tree.leaves(tree)))
  assert norm(grads["encoder"]["stem"]) > 0 and norm(grads["encoder"]["layer4_1"]) > 0
  assert norm(grads["presence_head"]) > 0
  assert norm(grads["decoder"]) == 0 and norm(grads["seg_head"]) == 0
  # BCE against "has a lesion pixel": image 0 yes, image 1 no.
  want = np.mean([np.log1p(np.exp(-presence[0])), np.log1p(np.exp(presence[1]))])
  assert float(objectives.presence_bce(presence, masks)) == pytest.approx(want, rel=1e-5)


def test_transfer_leaves_the_presence_head_at_init(tmp_path):
  x = jnp.zeros((1, 32, 32, 1))
  rng = np.random.default_rng(0)
  random = lambda net: jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32),
                                    jax.eval_shape(lambda: net.init(jax.random.key(0), x, train=False)))
  saved = random(models.UNet())  # a checkpoint of a network without the head
  mngr = ocp.CheckpointManager(str(tmp_path / "checkpoints"))
  mngr.save(1, args=ocp.args.Composite(state=ocp.args.StandardSave({k: saved[k] for k in ("params", "batch_stats")})))
  mngr.wait_until_finished()
  fresh = random(models.UNet(presence_head=True))
  params, _, report = checkpoint.load_pretrained(str(tmp_path), fresh["params"], fresh["batch_stats"],
                                                 ("encoder", "decoder"))
  assert report["init"] == ["presence_head", "seg_head"]
  np.testing.assert_array_equal(params["presence_head"]["kernel"], fresh["params"]["presence_head"]["kernel"])
  np.testing.assert_array_equal(params["encoder"]["stem"]["kernel"], saved["params"]["encoder"]["stem"]["kernel"])


# ---------------------------------------------------------------------------------------------------- a run
@pytest.fixture(scope="module")
def run(tmp_path_factory):
  root = tmp_path_factory.mktemp("presence")
  cfg = tiny(finetune_busi.get_config(), root / "data")
  cfg.model.decoder_widths = (32, 16, 16, 8, 8)
  cfg.num_steps, cfg.val_every, cfg.tta = 4, 2, "none"
  cfg.presence.weight, cfg.postprocess = 0.5, "auto"
  summary = task.run(cfg, str(root / "fine"))
  return cfg, root / "fine", summary


@pytest.mark.slow
def test_a_short_fine_tune_with_the_head_records_presence_and_its_choices(run):
  cfg, workdir, summary = run
  rows = json.loads((workdir / "per_image.json").read_text())
  assert rows and all(0.0 <= r["presence"] <= 1.0 and 0.0 <= r["max_prob"] <= 1.0 for r in rows)
  selection = json.loads((workdir / "best" / "selection.json").read_text())
  assert set(selection["postprocess"]) == set(postprocess.NONE) and "none" in selection["postprocess_tried"]
  assert "presence_threshold" in selection and selection == summary["selected"]
  # The validation rows the choice was made on reproduce it: the gate chosen from them alone, by the same rule.
  val = json.loads((workdir / "best" / "val_per_image.json").read_text())
  dices, empty = [r["dice"] for r in val], [not r["lesion"] for r in val]
  assert np.mean(dices) == pytest.approx(selection["val_dice_raw"], abs=1e-6)
  ranked = []
  for name, key in (("head", "presence"), ("peak", "max_prob")):
    t, _, gated = postprocess.choose_threshold([r[key] for r in val], dices, empty,
                                               lesion_budget=cfg.presence.lesion_budget)
    n = postprocess.cleared(dices, empty, [r[key] for r in val], t) if t is not None else 0
    ranked.append((n, gated, name == "head", name, t))
  *_, source, threshold = max(ranked)
  assert selection["presence_threshold"] == (pytest.approx(threshold) if threshold is not None else None)
  assert selection["presence_gate_on"] == (source if threshold is not None else None)
  if "presence_auc" in summary:  # both classes among the few validation images
    assert summary["presence_auc_from"] == "head"
  history = json.loads((workdir / "history.json").read_text())
  assert all(np.isfinite(r["presence_bce"]) for r in history if "presence_bce" in r)
  assert any("presence_bce" in r for r in history)


@pytest.mark.slow
def test_predict_applies_the_recorded_rule_and_gate(run, tmp_path):
  cfg, workdir, _ = run
  from usjax.data import pipeline
  images = [b["image"][i] for b in pipeline.eval_batches(cfg.data, "val", cfg.batch_size)
            for i in range(len(b["image"])) if b["index"][i] >= 0]
  p = predict.load(str(workdir), batch_size=4)
  selection = json.loads((workdir / "best" / "selection.json").read_text())
  assert p.rule == selection["postprocess"] and p.presence_threshold == selection["presence_threshold"]
  p.rule, p.presence_threshold = None, None
  plain = p.segment(images)
  presence = np.array([r["presence"] for r in plain])
  assert presence.shape == (len(images),) and np.all((presence >= 0) & (presence <= 1))

  # A gate at the median: the images below it come back empty, the others as without the gate.
  p.presence_threshold = float(np.median(presence))
  for r, g in zip(plain, p.segment(images)):
    want = np.zeros_like(r["mask"]) if r["presence"] < p.presence_threshold else r["mask"]
    np.testing.assert_array_equal(g["mask"], want)
  # A rule asks for components of at least the whole image: nothing is left.
  p.presence_threshold, p.rule = None, {**postprocess.NONE, "min_area": 1.0}
  assert not any(r["mask"].any() for r in p.segment(images))

  # Through the workdir: what selection.json records is what predict_folder applies, with presence written.
  sel_path = workdir / "best" / "selection.json"
  original = sel_path.read_text()
  try:
    sel_path.write_text(json.dumps({**selection, "presence_threshold": 1.5}))  # above every probability
    folder = tmp_path / "in"
    folder.mkdir()
    from PIL import Image
    for i, im in enumerate(images[:3]):
      Image.fromarray(im[..., 0]).save(folder / f"scan{i}.png")
    out = predict.predict_folder(predict.load(str(workdir)), str(folder), str(tmp_path / "out"))
    assert [r["lesion_pixels"] for r in out] == [0, 0, 0] and all(0 <= r["presence"] <= 1 for r in out)
  finally:
    sel_path.write_text(original)


@pytest.mark.slow
def test_stacked_runs_train_the_head_and_record_its_choices(tmp_path):
  from usjax import stacked
  cfgs = []
  for seed in (0, 1):
    cfg = tiny(finetune_busi.get_config(), tmp_path / "data")
    cfg.model.decoder_widths = (32, 16, 16, 8, 8)
    cfg.seed, cfg.num_steps, cfg.val_every, cfg.tta = seed, 4, 2, "none"
    cfg.presence.weight, cfg.postprocess = 0.5, "auto"
    cfgs.append(cfg)
  summaries = stacked.finetune_stacked(cfgs, [str(tmp_path / f"run{i}") for i in range(2)])
  for i, summary in enumerate(summaries):
    rows = json.loads((tmp_path / f"run{i}" / "per_image.json").read_text())
    assert all(0.0 <= r["presence"] <= 1.0 for r in rows)
    selection = json.loads((tmp_path / f"run{i}" / "best" / "selection.json").read_text())
    assert selection == summary["selected"] and "presence_threshold" in selection and "postprocess" in selection
    assert summary["stacked_runs"] == 2
