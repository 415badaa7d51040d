"""Train stage: one pure step per task, compiled once with `jax.jit` over a device mesh, and the loop around it.

The train state is a plain dict pytree {params, batch_stats, opt_state, step, rng}. Batches are sharded over the
mesh's `data` axis and the state is replicated, so BatchNorm statistics and contrastive negatives span the global
batch with no hand-written collectives. The state buffers are donated to each step. A non-finite loss or
gradient leaves the state unchanged (the step selects the old one) and the loop stops before the next save, so a
good checkpoint is never overwritten by a diverged one.
"""
from __future__ import annotations

import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from usjax import (UsjaxError, augment, checkpoint, evaluate, methods, models, objectives, report, runtime,
                   torch_weights)
from usjax.data import pipeline


class DivergedError(UsjaxError):
  pass


# ---------------------------------------------------------------------------------------------------- set-up
def make_mesh() -> jax.sharding.Mesh:
  return jax.make_mesh((jax.device_count(),), ("data",), axis_types=(AxisType.Auto,))


def weight_decay_mask(params):
  """Decay conv and dense kernels only: biases and normalisation scales are left alone (SimCLR, LARS)."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(cfg, total_steps: int) -> optax.GradientTransformation:
  o = cfg.optim
  warmup = min(o.warmup_steps, max(total_steps - 1, 0))
  lr = optax.warmup_cosine_decay_schedule(0.0, o.learning_rate, warmup, max(total_steps, warmup + 1))
  if o.name == "adamw":
    return optax.adamw(lr, weight_decay=o.weight_decay, mask=weight_decay_mask)
  if o.name == "lars":
    return optax.lars(lr, weight_decay=o.weight_decay, weight_decay_mask=weight_decay_mask,
                      trust_ratio_mask=weight_decay_mask, momentum=0.9)
  if o.name == "sgd":
    return optax.chain(optax.add_decayed_weights(o.weight_decay, weight_decay_mask), optax.sgd(lr, momentum=0.9))
  raise UsjaxError(f"config.optim.name must be 'adamw', 'lars' or 'sgd', got {o.name!r}")


def build_model(cfg) -> models.UNet:
  """The segmentation U-Net of `cfg.model` (pre-training networks come from `methods.make_method`)."""
  m = cfg.model
  dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[m.dtype]
  return models.UNet(encoder=m.encoder, decoder_widths=tuple(m.decoder_widths), norm=m.norm, dtype=dtype)


def init_state(model, tx, seed: int, input_shape, mesh, params_override=None) -> dict:
  """The replicated train state. `params_override(params, batch_stats)` may replace weights (transfer)."""
  def init():
    variables = model.init(jax.random.key(seed), jnp.zeros(input_shape, jnp.float32), train=False)
    return variables["params"], variables.get("batch_stats", {})
  repl = NamedSharding(mesh, P())
  params, batch_stats = jax.jit(init, out_shardings=repl)()
  if params_override is not None:
    params, batch_stats = params_override(params, batch_stats)
    params, batch_stats = jax.device_put((params, batch_stats), repl)
  opt_state = jax.jit(tx.init, out_shardings=repl)(params)
  rng = jax.device_put(jax.random.key_data(jax.random.key(seed + 1)), repl)
  return {"params": params, "batch_stats": batch_stats, "opt_state": opt_state,
          "step": jax.device_put(jnp.zeros((), jnp.int32), repl), "rng": rng}


# ---------------------------------------------------------------------------------------------------- losses
def to_float(images):
  return images.astype(jnp.float32) / 255.0


def pretrain_loss(params, batch_stats, extra, images, key, step, *, method, aug_cfg):
  """Two augmented views of each uint8 image, made on device, then the method's objective."""
  v1, v2 = augment.two_views(key, to_float(images), aug_cfg)
  return method.loss(params, batch_stats, extra, v1, v2, step)


def segmentation_loss(params, batch_stats, extra, batch, key, step, *, model, aug_cfg, ema_decay=0.0):
  """Dice + BCE on image/mask pairs that share one random geometric transform.

  With `ema_decay`, `extra` carries an EMA of the weights (a model-selection candidate): its batch statistics
  follow here, its parameters in `ema_after_step` once the optimiser has moved them.
  """
  images, masks = augment.augment_batch_pairs(key, to_float(batch[0]), batch[1].astype(jnp.float32), aug_cfg)
  logits, new_vars = model.apply({"params": params, "batch_stats": batch_stats}, images, train=True,
                                 mutable=["batch_stats"])
  dice, _ = evaluate.dice_iou(logits > 0, masks > 0.5)
  if extra:
    extra = {**extra, "ema_batch_stats": methods.ema(extra["ema_batch_stats"], new_vars["batch_stats"], ema_decay)}
  return objectives.dice_bce(logits, masks), (new_vars["batch_stats"], extra, {"train_dice": dice.mean()})


def ema_after_step(extra, params, step, *, decay):
  return {**extra, "ema_params": methods.ema(extra["ema_params"], params, decay)}


def train_step(state, batch, *, loss_fn, tx, after_step=None):
  """One optimiser step. Pure: (state, batch) -> (state, metrics).

  `state["extra"]`, when present, is a method's own state (EMA target, queue): the loss returns its new value
  and `after_step(extra, params, step)` updates it once the optimiser has moved the parameters.
  """
  key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
  (loss, (batch_stats, extra, metrics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state["params"], state["batch_stats"], state.get("extra", {}), batch, key, state["step"])
  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  grad_norm = optax.global_norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  params = optax.apply_updates(state["params"], updates)
  new = {"params": params, "batch_stats": batch_stats, "opt_state": opt_state}
  if "extra" in state:
    new["extra"] = after_step(extra, params, state["step"]) if after_step else extra
  new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, {k: state[k] for k in new})
  new.update(step=state["step"] + 1, rng=state["rng"])
  return new, {"loss": loss, "grad_norm": grad_norm, "finite": finite, **metrics}


def compile_step(loss_fn, tx, mesh, after_step=None):
  repl, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  step = functools.partial(train_step, loss_fn=loss_fn, tx=tx, after_step=after_step)
  return jax.jit(step, in_shardings=(repl, data), out_shardings=(repl, repl), donate_argnums=0)


def global_batch(local: dict | np.ndarray, mesh):
  """Per-process numpy arrays -> one global array per leaf, sharded on the data axis."""
  sharding = NamedSharding(mesh, P("data"))
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local)


# ---------------------------------------------------------------------------------------------------- loop
def fit(cfg, workdir: str, task: str, state, step_fn, data_iter, to_batch, mesh, meta: dict, hook=None):
  """Runs `cfg.num_steps` steps with progress, checkpoints and the NaN guard; resumes from the latest save.

  `hook(step, state, rep)`, when given, runs on the steps where `hook.due(step, num_steps)` (validation), before
  that step's checkpoint, and `hook.state_dict()` is saved in the checkpoint's meta so a resumed run continues
  it. The training history and wall time also live in the meta: after a resume they span the whole run.
  """
  ckpt = checkpoint.manager(os.path.join(workdir, "checkpoints"), keep=cfg.keep_checkpoints)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
  restored = checkpoint.restore_latest(ckpt, abstract, data_iter)
  start, earlier_s, history = 0, 0.0, []
  if restored is not None:
    state, saved_meta = restored
    start = int(state["step"])
    earlier_s, history = float(saved_meta.get("elapsed_s", 0.0)), list(saved_meta.get("history", []))
    if hook is not None:
      hook.resume(saved_meta)
    logging.info("resuming from %s at step %d", ckpt.directory, start)
  rep = report.Reporter(workdir, cfg.num_steps, cfg.batch_size, start)
  rep.history = history
  t0, compile_s, row, pending = time.perf_counter(), 0.0, {}, []
  for step in range(start + 1, cfg.num_steps + 1):
    state, metrics = step_fn(state, to_batch(next(data_iter)))
    pending.append(metrics)
    if step == start + 1:
      jax.block_until_ready(metrics["loss"])
      compile_s = time.perf_counter() - t0
      rep.mark(step)
    is_save = step % cfg.checkpoint_every == 0 or step == cfg.num_steps
    if step % cfg.log_every == 0 or is_save:
      host = jax.device_get(pending)
      pending = []
      bad = [m for m in host if not m["finite"]]
      if bad:
        last = ckpt.latest_step()
        ckpt.wait_until_finished()
        raise DivergedError(f"non-finite loss or gradient by step {step} (loss={bad[0]['loss']}); stopped, the "
                            f"last good checkpoint (step {last}) in {ckpt.directory} is kept")
      row = rep.log(step, {k: np.mean([m[k] for m in host]) for k in host[-1] if k != "finite"})
    if hook is not None and hook.due(step, cfg.num_steps):
      hook(step, state, rep)
    if is_save:
      extra_meta = {"history": rep.history, "elapsed_s": earlier_s + time.perf_counter() - t0}
      checkpoint.save(ckpt, step, state, {**meta, **extra_meta, **(hook.state_dict() if hook else {})}, data_iter)
  ckpt.wait_until_finished()
  ckpt.close()
  summary = {"task": task, "steps": cfg.num_steps, "batch_size": cfg.batch_size,
             "final_loss": row.get("loss"), "images_per_sec": rep.mean_rate(), "compile_s": compile_s,
             "wall_s": earlier_s + time.perf_counter() - t0, "resumed_at": start or None,
             "devices": jax.device_count(), "processes": jax.process_count()}
  return state, rep, summary


def data_meta(cfg) -> dict:
  """What a later user of the checkpoint (prediction on new images) needs to preprocess like training did."""
  return {"image_size": cfg.data.image_size, "channels": cfg.data.channels, "aspect": cfg.data.aspect}


def pretrain(cfg, workdir: str) -> dict:
  mesh = make_mesh()
  method, tx = methods.make_method(cfg), make_optimizer(cfg, cfg.num_steps)
  aug_cfg = augment.AugmentConfig.from_dict(cfg.augment)
  s = cfg.data.image_size
  state = init_state(method.model, tx, cfg.seed, (2, s, s, cfg.data.channels), mesh)
  extra = jax.jit(method.init_extra, out_shardings=NamedSharding(mesh, P()))(state["params"], state["batch_stats"])
  if extra:
    state["extra"] = extra
  logging.info("pre-training %s (%s, %.2fM parameters) with %s on %s", cfg.model.encoder,
               "encoder+decoder" if cfg.model.with_decoder else "encoder",
               models.count_params(state["params"]) / 1e6, cfg.method, cfg.data.pretrain_sources)
  data_iter = iter(pipeline.pretrain_dataset(cfg.data, cfg.batch_size, cfg.seed))
  loss_fn = functools.partial(pretrain_loss, method=method, aug_cfg=aug_cfg)
  step_fn = compile_step(loss_fn, tx, mesh, method.after_step)
  meta = {"task": "pretrain", "method": cfg.method, "model": cfg.model.to_dict(), "sources": cfg.data.pretrain_sources,
          "data": data_meta(cfg)}
  state, rep, summary = fit(cfg, workdir, "pretrain", state, step_fn, data_iter,
                            lambda b: global_batch(b["image"], mesh), mesh, meta)
  summary.update(method=cfg.method, sources=cfg.data.pretrain_sources, first_loss=rep.history[0]["loss"]
                 if rep.history else None)
  rep.close(workdir, summary)
  return summary


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
      if step in self.mngr.all_steps():   # a resumed run re-validating a step it had saved before
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
    self.mngr.wait_until_finished()
    self.mngr.close()


def finetune(cfg, workdir: str) -> dict:
  mesh = make_mesh()
  model, tx = build_model(cfg), make_optimizer(cfg, cfg.num_steps)
  if cfg.eval_split not in ("val", "test"):
    raise UsjaxError(f"config.eval_split must be 'val' or 'test', got {cfg.eval_split!r}")
  if cfg.tta not in ("auto", "none", "hflip"):
    raise UsjaxError(f"config.tta must be 'auto', 'none' or 'hflip', got {cfg.tta!r}")
  transfer = {}
  override = None
  if cfg.init_from.endswith(".safetensors"):   # ImageNet weights exported from torchvision or timm
    if cfg.transfer != "encoder":
      raise UsjaxError(f"config.transfer must be 'encoder' with a .safetensors config.init_from (the file has no "
                       f"decoder), got {cfg.transfer!r}")

    def override(params, batch_stats):
      params, batch_stats, info = torch_weights.load_resnet(os.path.abspath(os.path.expanduser(cfg.init_from)),
                                                            params, batch_stats, cfg.model.encoder)
      transfer.update(info)
      return params, batch_stats
  elif cfg.init_from:
    parts = {"encoder": ("encoder",), "encoder+decoder": ("encoder", "decoder")}.get(cfg.transfer)
    if parts is None:
      raise UsjaxError(f"config.transfer must be 'encoder' or 'encoder+decoder', got {cfg.transfer!r}")

    def override(params, batch_stats):
      params, batch_stats, info = checkpoint.load_pretrained(cfg.init_from, params, batch_stats, parts)
      transfer.update(info)
      return params, batch_stats
  s = cfg.data.image_size
  state = init_state(model, tx, cfg.seed, (2, s, s, cfg.data.channels), mesh, override)
  if not cfg.init_from:
    logging.info("training from scratch (no config.init_from): the supervised baseline")
  if cfg.ema_decay > 0:
    copy = jax.jit(lambda t: jax.tree.map(jnp.copy, t))
    state["extra"] = {"ema_params": copy(state["params"]), "ema_batch_stats": copy(state["batch_stats"])}
  train_ds, n_train = pipeline.finetune_dataset(cfg.data, cfg.batch_size, cfg.seed)
  logging.info("fine-tuning U-Net/%s (%.2fM parameters) on %s, %d%% labels = %d training images",
               cfg.model.encoder, models.count_params(state["params"]) / 1e6, cfg.data.finetune_source,
               cfg.data.label_fraction, n_train)
  aug_cfg = augment.AugmentConfig.from_dict(cfg.augment)
  loss_fn = functools.partial(segmentation_loss, model=model, aug_cfg=aug_cfg, ema_decay=cfg.ema_decay)
  after = functools.partial(ema_after_step, decay=cfg.ema_decay) if cfg.ema_decay > 0 else None
  step_fn = compile_step(loss_fn, tx, mesh, after)
  meta = {"task": "finetune", "model": cfg.model.to_dict(), "source": cfg.data.finetune_source,
          "data": data_meta(cfg), "init_from": cfg.init_from, "transfer": cfg.transfer if cfg.init_from else "none"}

  # Validation: the split is small (BUSI: 63 images), so its batches are prepared once and kept.
  to_global = lambda a: global_batch(a, mesh)
  scorers = {tta: evaluate.make_scorer(model, NamedSharding(mesh, P("data")), tta) for tta in (False, True)}
  val_ids, val_labels = pipeline.split_labels(cfg.data, "val")
  selector = evaluate.Selector(cfg.val_every, scorers[False], list(pipeline.eval_batches(cfg.data, "val",
                               cfg.batch_size)), to_global, val_ids, val_labels, lambda st: candidates(st))
  abstract_vars = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                               {"params": state["params"], "batch_stats": state["batch_stats"]})
  best_dir = os.path.join(workdir, "best")
  ckdir = os.path.join(workdir, "checkpoints")
  if os.path.isdir(best_dir) and not (os.path.isdir(ckdir) and any(n.isdigit() for n in os.listdir(ckdir))):
    import shutil   # a best model from a run that saved nothing to resume from: this run starts over
    shutil.rmtree(best_dir)
  hook = Validation(selector, best_dir, meta, abstract_vars)
  state, rep, summary = fit(cfg, workdir, "finetune", state, step_fn, iter(train_ds),
                            lambda b: global_batch((b["image"], b["mask"]), mesh), mesh, meta, hook)

  # The chosen model: the best (step, weights) on validation, then flip averaging only if validation says so.
  best_vars, chosen = selector.best_variables, dict(selector.best)
  val_plain = selector.score(best_vars)
  use_tta = cfg.tta == "hflip"
  if cfg.tta == "auto":
    val_tta = selector.score(best_vars, scorers[True])
    use_tta = val_tta["dice"] > val_plain["dice"]
    chosen["val_dice_tta"] = val_tta["dice"]
  chosen["tta"] = use_tta
  val = val_tta if use_tta and cfg.tta == "auto" else selector.score(best_vars, scorers[use_tta])
  chosen.update(val_dice=val["dice"], val_dice_lesion=val.get("dice_lesion"))
  hook.close()
  if jax.process_index() == 0:   # what launch/predict.py applies with the best weights
    report.write_json(os.path.join(workdir, "best", "selection.json"), chosen)
  logging.info("selected on validation: step %d, %s weights, flip averaging %s: validation Dice %.4f "
               "(lesion images %.4f)", chosen["step"], chosen["weights"], "on" if use_tta else "off", val["dice"],
               val.get("dice_lesion", float("nan")))

  # The one read of the evaluation split (the test split only where the config asks for it).
  if cfg.eval_split == "val":
    scores, examples = evaluate.score_split(scorers[use_tta], best_vars, selector.batches, to_global, val_ids,
                                            val_labels)
  else:
    ids, labels = pipeline.split_labels(cfg.data, cfg.eval_split)
    batches = list(pipeline.eval_batches(cfg.data, cfg.eval_split, cfg.batch_size))
    scores, examples = evaluate.score_split(scorers[use_tta], best_vars, batches, to_global, ids, labels)
    last_vars = {"params": state["params"], "batch_stats": state["batch_stats"]}
    last, _ = evaluate.score_split(scorers[False], last_vars, batches, to_global, ids, labels)
    summary["last_step"] = {k: v for k, v in evaluate.summarize(last).items()
                            if k in ("dice", "dice_lesion", "iou", "iou_lesion")}
  summary.update(evaluate.summarize(scores), source=cfg.data.finetune_source, label_fraction=cfg.data.label_fraction,
                 train_images=n_train, eval_split=cfg.eval_split, init_from=cfg.init_from or None,
                 transfer=transfer or None, selected=chosen, val_history=selector.history)
  rep.scalars(cfg.num_steps, {k: summary[k] for k in ("dice", "dice_lesion", "iou") if k in summary},
              cfg.eval_split)
  if jax.process_index() == 0:
    report.write_json(os.path.join(workdir, "per_image.json"), evaluate.per_image_rows(scores))
    np.savez_compressed(os.path.join(workdir, "examples.npz"), **examples)
  logging.info("%s split, the validation-chosen model: Dice %.4f over %d images, %.4f over the %d with a lesion; "
               "IoU %.4f", cfg.eval_split, summary["dice"], summary["num_images"],
               summary.get("dice_lesion", float("nan")), summary.get("num_lesion_images", 0), summary["iou"])
  rep.close(workdir, summary)
  return summary


def candidates(state) -> dict:
  """The weights that model selection compares: the trained ones and, when kept, their EMA."""
  out = {"raw": {"params": state["params"], "batch_stats": state["batch_stats"]}}
  if "extra" in state and "ema_params" in state["extra"]:
    out["ema"] = {"params": state["extra"]["ema_params"], "batch_stats": state["extra"]["ema_batch_stats"]}
  return out


def check_workdir(workdir: str) -> bool:
  """Fails early, in one line, on a workdir that cannot be written. Returns whether it already existed."""
  path = os.path.abspath(os.path.expanduser(workdir))
  existed = os.path.isdir(path)
  if os.path.exists(path) and not existed:
    raise UsjaxError(f"--workdir {workdir}: exists and is not a directory")
  parent = path
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
    raise UsjaxError(f"--workdir {workdir}: {parent} is not writable")
  return existed


def run(cfg, workdir: str) -> dict:
  """Runs the task of `cfg` in `workdir`. A run that fails on bad input removes the workdir it created."""
  if cfg.task not in ("pretrain", "finetune"):
    raise UsjaxError(f"config.task must be 'pretrain' or 'finetune', got {cfg.task!r}")
  runtime.maybe_initialize_distributed()
  existed = check_workdir(workdir)
  workdir = os.path.abspath(os.path.expanduser(workdir))
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
  try:
    return pretrain(cfg, workdir) if cfg.task == "pretrain" else finetune(cfg, workdir)
  except UsjaxError:
    ckdir = os.path.join(workdir, "checkpoints")
    saved = os.path.isdir(ckdir) and any(n.isdigit() for n in os.listdir(ckdir))
    if not existed and not saved and jax.process_index() == 0:
      import shutil
      shutil.rmtree(workdir, ignore_errors=True)
    raise
