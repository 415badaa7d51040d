"""Fine-tuning stage: the U-Net on image/mask pairs, model selection on the validation split, one final scoring.

Every `config.val_every` steps the validation split is scored with the trained weights and, with
`config.ema_decay`, their EMA; the best by validation Dice is kept (in memory and in <workdir>/best) and is what
the run scores at the end, with left-right flip averaging only where it raises validation Dice (`config.tta`),
then post-processing (`config.postprocess`) and, with the lesion-presence head (`config.presence.weight`), the
presence gate, each chosen on the validation probabilities (`usjax.postprocess`) and recorded in
best/selection.json. The evaluation split (`config.eval_split`, 'val' by default) is read once, after training;
a study asks for 'test', and then the last step's test score is recorded beside the chosen model's.
"""
from __future__ import annotations

import functools
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec as P

from usjax import (UsjaxError, augment, checkpoint, evaluate, methods, models, objectives, postprocess, report,
                   torch_weights, train)
from usjax.data import pipeline


def segmentation_loss(params, batch_stats, extra, batch, key, step, *, model, aug_cfg, ema_decay=0.0,
                      presence_weight=0.0):
  """Dice + BCE on image/mask pairs that share one random geometric transform, plus `presence_weight` times the
  lesion-presence BCE where the model has the presence head.

  With `ema_decay`, `extra` carries an EMA of the weights (a model-selection candidate): its batch statistics
  follow here, its parameters in `ema_after_step` once the optimiser has moved them.
  """
  images, masks = augment.augment_batch_pairs(key, train.to_float(batch[0]), batch[1].astype(jnp.float32), aug_cfg)
  out, new_vars = model.apply({"params": params, "batch_stats": batch_stats}, images, train=True,
                              mutable=["batch_stats"])
  logits, presence = evaluate.split_outputs(out)
  dice, _ = evaluate.dice_iou(logits > 0, masks > 0.5)
  loss, metrics = objectives.dice_bce(logits, masks), {"train_dice": dice.mean()}
  if presence is not None:
    if presence_weight <= 0:  # a head that nothing trains would gate on noise
      raise UsjaxError("config.presence.weight must be > 0 for a model with the presence head")
    metrics["presence_bce"] = objectives.presence_bce(presence, masks)
    loss = loss + presence_weight * metrics["presence_bce"]
  if extra:
    extra = {**extra, "ema_batch_stats": methods.ema(extra["ema_batch_stats"], new_vars["batch_stats"], ema_decay)}
  return loss, (new_vars["batch_stats"], extra, metrics)


def ema_after_step(extra, params, step, *, decay):
  return {**extra, "ema_params": methods.ema(extra["ema_params"], params, decay)}


class Validation:
  """The fine-tuning loop's hook: validation scores to the log and TensorBoard, the best weights to
  <workdir>/best (what `launch/predict.py` and the final scoring use)."""
  def __init__(self, selector: evaluate.Selector, best_dir: str, meta: dict, abstract_variables):
    self.selector, self.meta = selector, meta
    self.mngr = checkpoint.manager(best_dir, keep=1)
    self.abstract = abstract_variables

  def due(self, step: int, last: int) -> bool:
    return self.selector.due(step, last)

  def __call__(self, step: int, state, rep) -> None:
    row, improved = self.selector(step, state)
    best = self.selector.best
    rep.scalars(step, {k: v for k, v in row.items() if k != "step"}, "val")
    logging.info("validation at step %d: %s; best Dice %.4f (%s weights, step %d)", step,
                 " ".join(f"{k}={v:.4f}" for k, v in row.items() if k != "step"), best["dice"], best["weights"],
                 best["step"])
    if improved:
      if step in self.mngr.all_steps():  # a resumed run re-validating a step it had saved before
        self.mngr.delete(step)
      checkpoint.save(self.mngr, step, self.selector.best_variables, {**self.meta, **self.selector.state_dict()})

  def state_dict(self) -> dict:
    return self.selector.state_dict()

  def resume(self, meta: dict) -> None:
    """The validation history from the resumed checkpoint, the best weights from <workdir>/best."""
    saved = checkpoint.restore_latest(self.mngr, self.abstract)
    best_meta = saved[1] if saved else {}
    self.selector.load({"val_history": meta.get("val_history"), "best": best_meta.get("best")},
                       saved[0] if saved else None)

  def close(self) -> None:
    checkpoint.finish(self.mngr)
    self.mngr.close()


def init_override(cfg, transfer: dict):
  """The `params_override` of `train.init_state` that `config.init_from` asks for (None from scratch): ImageNet
  weights from a .safetensors file, else a pre-training run's encoder (and decoder); what it loaded goes into
  `transfer`."""
  if cfg.init_from.endswith(".safetensors"):  # ImageNet weights exported from torchvision or timm
    if cfg.transfer != "encoder":
      raise UsjaxError(f"config.transfer must be 'encoder' with a .safetensors config.init_from (the file has no "
                       f"decoder), got {cfg.transfer!r}")

    def override(params, batch_stats):
      params, batch_stats, info = torch_weights.load_resnet(os.path.abspath(os.path.expanduser(cfg.init_from)), params,
                                                            batch_stats, cfg.model.encoder)
      transfer.update(info)
      return params, batch_stats

    return override
  if cfg.init_from:
    parts = {"encoder": ("encoder",), "encoder+decoder": ("encoder", "decoder")}.get(cfg.transfer)
    if parts is None:
      raise UsjaxError(f"config.transfer must be 'encoder' or 'encoder+decoder', got {cfg.transfer!r}")

    def override(params, batch_stats):
      params, batch_stats, info = checkpoint.load_pretrained(cfg.init_from, params, batch_stats, parts,
                                                             encoder=cfg.model.encoder)
      transfer.update(info)
      return params, batch_stats

    return override
  return None


def step_parts(cfg, model) -> tuple:
  """(loss, after_step) of the train step, alone or stacked: `segmentation_loss` and, with `config.ema_decay`,
  `ema_after_step`."""
  aug_cfg = augment.AugmentConfig.from_dict(cfg.augment)
  loss_fn = functools.partial(segmentation_loss, model=model, aug_cfg=aug_cfg, ema_decay=cfg.ema_decay,
                              presence_weight=cfg.presence.weight)
  after = functools.partial(ema_after_step, decay=cfg.ema_decay) if cfg.ema_decay > 0 else None
  return loss_fn, after


class Run:
  """One fine-tuning run, alone (`finetune`) or a member of a stack (`usjax.stacked`): everything but the
  stepping. Its initial state (transferred weights, the EMA copy), the meta its checkpoints record, model
  selection (`evaluate.Selector`) behind the validation hook, and the final scoring (`finish`).

  Validation: the split is small (BUSI: 63 images), so its batches are prepared once and kept.
  """
  def __init__(self, cfg, workdir: str, model, tx, mesh, scorers, probers, train_images: int):
    self.cfg, self.workdir, self.scorers, self.probers, self.train_images = cfg, workdir, scorers, probers, train_images
    self.transfer = {}
    s = cfg.data.image_size
    self.state = train.init_state(model, tx, cfg.seed, (2, s, s, cfg.data.channels), mesh,
                                  init_override(cfg, self.transfer))
    if cfg.ema_decay > 0:
      copy = jax.jit(lambda t: jax.tree.map(jnp.copy, t))
      self.state["extra"] = {
          "ema_params": copy(self.state["params"]), "ema_batch_stats": copy(self.state["batch_stats"])
      }
    self.meta = {
        "task": "finetune", "model": train.model_config(cfg), "source": cfg.data.finetune_source,
        "data": train.data_meta(cfg), "init_from": cfg.init_from, "transfer": cfg.transfer if cfg.init_from else "none"
    }
    self.to_global = lambda a: train.global_batch(a, mesh)
    val_ids, val_labels = pipeline.split_labels(cfg.data, "val")
    self.selector = evaluate.Selector(cfg.val_every, scorers[False],
                                      list(pipeline.eval_batches(cfg.data, "val", cfg.batch_size)), self.to_global,
                                      val_ids, val_labels, candidates)
    abstract_vars = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                                 {"params": self.state["params"], "batch_stats": self.state["batch_stats"]})
    self.hook = Validation(self.selector, os.path.join(workdir, "best"), self.meta, abstract_vars)

  def describe(self) -> str:
    cfg = self.cfg
    return (f"U-Net/{cfg.model.encoder} ({models.count_params(self.state['params']) / 1e6:.2f}M parameters) on "
            f"{cfg.data.finetune_source}, {cfg.data.label_fraction}% labels = {self.train_images} training images, "
            f"{f'from {cfg.init_from}' if cfg.init_from else 'from scratch'}")

  def finish(self, last_vars, rep, summary: dict, who: str = "") -> dict:
    """The validation hook closed, then `finish`: the model chosen on validation, the one read of the evaluation
    split."""
    self.hook.close()
    return finish(self.cfg, self.workdir, self.selector, self.scorers, self.probers, self.to_global, last_vars, rep,
                  summary, who, train_images=self.train_images, transfer=self.transfer or None)


def finetune(cfg, workdir: str) -> dict:
  """Fine-tunes `cfg`'s U-Net in `workdir`, resuming from its latest checkpoint: -> the summary (`finish`)."""
  mesh = train.make_mesh()
  model, tx = train.build_model(cfg), train.make_optimizer(cfg, cfg.num_steps)
  scorers, probers = make_scorers(model, mesh)
  train_ds, n_train = pipeline.finetune_dataset(cfg.data, cfg.batch_size, cfg.seed)
  best_dir = os.path.join(workdir, "best")
  if os.path.isdir(best_dir) and not checkpoint.holds_steps(os.path.join(workdir, "checkpoints")):
    shutil.rmtree(best_dir)  # a best model from a run that saved nothing to resume from: this run starts over
  run = Run(cfg, workdir, model, tx, mesh, scorers, probers, n_train)
  logging.info("fine-tuning %s", run.describe())
  loss_fn, after = step_parts(cfg, model)
  step_fn = train.compile_step(loss_fn, tx, mesh, after)
  state, rep, summary = train.fit(cfg, workdir, "finetune", run.state, step_fn, iter(train_ds),
                                  lambda b: train.global_batch((b["image"], b["mask"]), mesh), mesh, run.meta, run.hook)
  run.state = None  # the loop donated it
  return run.finish({"params": state["params"], "batch_stats": state["batch_stats"]}, rep, summary)


def make_scorers(model, mesh) -> tuple[dict, dict]:
  """The jitted scorers, without and with flip averaging (keyed by `tta`): Dice on the device for model
  selection while training (`evaluate.make_scorer`), probability maps for the final choices and scoring
  (`evaluate.make_prober`)."""
  sharding = NamedSharding(mesh, P("data"))
  return ({tta: evaluate.make_scorer(model, sharding, tta) for tta in (False, True)},
          {tta: evaluate.make_prober(model, sharding, tta) for tta in (False, True)})


def finish(cfg, workdir, selector, scorers, probers, to_global, last_vars, rep, summary: dict, who: str = "",
           **fields) -> dict:
  """The end of a fine-tuning run, alone or stacked (`usjax.stacked`): the model chosen on validation, then the
  one read of the evaluation split. -> the summary, also written with per_image.json and examples.npz.

  The choice: the best (step, weights), then flip averaging and post-processing, each kept only where it raises
  validation Dice over all images, and the presence gate by `config.presence.gate` (the last two on the chosen
  model's validation probabilities), all recorded in best/selection.json, which `usjax.predict` applies; the
  validation per-image scores they were chosen on go to best/val_per_image.json.
  `fields` (train_images, transfer) go into the summary; `who` prefixes the log lines.
  """
  best_vars, chosen = selector.best_variables, dict(selector.best)
  use_tta = cfg.tta == "hflip"
  val = selector.score(best_vars, scorers[use_tta])  # 'hflip' needs no plain pass
  if cfg.tta == "auto":
    val_tta = selector.score(best_vars, scorers[True])
    use_tta = val_tta["dice"] > val["dice"]
    chosen["val_dice_tta"] = val_tta["dice"]
    val = val_tta if use_tta else val
  chosen.update(tta=use_tta, val_dice=val["dice"], val_dice_lesion=val.get("dice_lesion"))
  head, search = cfg.presence.weight > 0, cfg.postprocess == "auto"
  val_split = evaluate.probabilities(probers[use_tta], best_vars, selector.batches, to_global, selector.ids,
                                     selector.labels) if head or search or cfg.eval_split == "val" else None
  if head or search:
    budget = cfg.presence.lesion_budget if cfg.presence.gate == "lesion_budget" else None
    chosen.update(postprocess.select(val_split["prob"], val_split["mask"], val_split.get("presence"), search, budget,
                                     cfg.presence.gate_on))
  else:
    chosen.update(presence_threshold=None, postprocess=dict(postprocess.NONE))
  if jax.process_index() == 0:  # what launch/predict.py applies with the best weights
    report.write_json(os.path.join(workdir, "best", "selection.json"), chosen)
    if head or search:  # the validation masks (at 0.5, ungated) the choice was made on: launch/gate_frontier.py
      report.write_json(os.path.join(workdir, "best", "val_per_image.json"),
                        evaluate.per_image_rows(evaluate.score_probabilities(val_split)[0]))
  logging.info(
      "%sselected on validation: step %d, %s weights, flip averaging %s, post-processing %s, presence gate %s%s: "
      "validation Dice %.4f (lesion images %.4f)%s", who, chosen["step"], chosen["weights"],
      "on" if use_tta else "off", chosen["postprocess"], _fmt(chosen["presence_threshold"], "off"),
      f" on the {chosen['presence_gate_on']}" if chosen.get("presence_gate_on") else "", val["dice"],
      val.get("dice_lesion", float("nan")),
      f", {chosen['val_dice_postprocessed']:.4f} post-processed" if "val_dice_postprocessed" in chosen else "")

  # The one read of the evaluation split (the test split only where the config asks for it).
  if cfg.eval_split == "val":
    split = val_split
  else:
    ids, labels = pipeline.split_labels(cfg.data, cfg.eval_split)
    batches = list(pipeline.eval_batches(cfg.data, cfg.eval_split, cfg.batch_size))
    split = evaluate.probabilities(probers[use_tta], best_vars, batches, to_global, ids, labels)
    last, _ = evaluate.score_split(scorers[False], last_vars, batches, to_global, ids, labels)
    summary["last_step"] = {
        k: v for k, v in evaluate.summarize(last).items() if k in ("dice", "dice_lesion", "iou", "iou_lesion")
    }
  scores, examples = evaluate.score_probabilities(split, chosen["postprocess"], chosen["presence_threshold"],
                                                  chosen.get("presence_gate_on"))
  if chosen["presence_threshold"] is not None or chosen["postprocess"] != postprocess.NONE:
    # The same model's masks thresholded at 0.5 alone: what the gate and post-processing changed.
    plain, _ = evaluate.score_probabilities(split)
    summary["ungated"] = {
        k: v for k, v in evaluate.summarize(plain).items() if k in ("dice", "dice_lesion", "false_positive_rate")
    }
  summary.update(evaluate.summarize(scores), source=cfg.data.finetune_source, label_fraction=cfg.data.label_fraction,
                 train_images=fields.get("train_images"), eval_split=cfg.eval_split, init_from=cfg.init_from or None,
                 transfer=fields.get("transfer"), selected=chosen, val_history=selector.history)
  rep.scalars(cfg.num_steps, {k: summary[k] for k in ("dice", "dice_lesion", "iou") if k in summary}, cfg.eval_split)
  if jax.process_index() == 0:
    report.write_json(os.path.join(workdir, "per_image.json"), evaluate.per_image_rows(scores))
    np.savez_compressed(os.path.join(workdir, "examples.npz"), **examples)
  logging.info(
      "%s%s split, the validation-chosen model: Dice %.4f over %d images, %.4f over the %d with a lesion; IoU %.4f; "
      "false positives on %s of the normal images; presence AUC %s (from %s)", who, cfg.eval_split, summary["dice"],
      summary["num_images"], summary.get("dice_lesion", float("nan")), summary.get("num_lesion_images", 0),
      summary["iou"], _pct(summary.get("false_positive_rate")), _fmt(summary.get("presence_auc")),
      summary.get("presence_auc_from", "-"))
  rep.close(workdir, summary)
  return summary


def _pct(x) -> str:
  return "-" if x is None else f"{100 * x:.0f}%"


def _fmt(x, none: str = "-") -> str:
  return none if x is None else f"{x:.3f}"


def candidates(state) -> dict:
  """The weights that model selection compares: the trained ones and, when kept, their EMA."""
  out = {"raw": {"params": state["params"], "batch_stats": state["batch_stats"]}}
  if "extra" in state and "ema_params" in state["extra"]:
    out["ema"] = {"params": state["extra"]["ema_params"], "batch_stats": state["extra"]["ema_batch_stats"]}
  return out
