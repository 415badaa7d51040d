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

from usjax import UsjaxError, augment, checkpoint, evaluate, methods, models, objectives, report, runtime
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


def segmentation_loss(params, batch_stats, extra, batch, key, step, *, model, aug_cfg):
  """Dice + BCE on image/mask pairs that share one random geometric transform."""
  images, masks = augment.augment_batch_pairs(key, to_float(batch[0]), batch[1].astype(jnp.float32), aug_cfg)
  logits, new_vars = model.apply({"params": params, "batch_stats": batch_stats}, images, train=True,
                                 mutable=["batch_stats"])
  dice, _ = evaluate.dice_iou(logits > 0, masks > 0.5)
  return objectives.dice_bce(logits, masks), (new_vars["batch_stats"], extra, {"train_dice": dice.mean()})


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
def fit(cfg, workdir: str, task: str, state, step_fn, data_iter, to_batch, mesh, meta: dict):
  """Runs `cfg.num_steps` steps with progress, checkpoints and the NaN guard; resumes from the latest save."""
  ckpt = checkpoint.manager(os.path.join(workdir, "checkpoints"), keep=cfg.keep_checkpoints)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
  restored = checkpoint.restore_latest(ckpt, abstract, data_iter)
  if restored is not None:
    state = restored[0]
    logging.info("resuming from %s at step %d", ckpt.directory, int(state["step"]))
  start = int(state["step"])
  rep = report.Reporter(workdir, cfg.num_steps, cfg.batch_size, start)
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
    if is_save:
      checkpoint.save(ckpt, step, state, meta, data_iter)
  ckpt.wait_until_finished()
  ckpt.close()
  summary = {"task": task, "steps": cfg.num_steps, "batch_size": cfg.batch_size,
             "final_loss": row.get("loss"), "images_per_sec": rep.mean_rate(), "compile_s": compile_s,
             "wall_s": time.perf_counter() - t0, "devices": jax.device_count(), "processes": jax.process_count()}
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


def finetune(cfg, workdir: str) -> dict:
  mesh = make_mesh()
  model, tx = build_model(cfg), make_optimizer(cfg, cfg.num_steps)
  transfer = {}
  override = None
  if cfg.init_from:
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
  train_ds, n_train = pipeline.finetune_dataset(cfg.data, cfg.batch_size, cfg.seed)
  logging.info("fine-tuning U-Net/%s (%.2fM parameters) on %s, %d%% labels = %d training images",
               cfg.model.encoder, models.count_params(state["params"]) / 1e6, cfg.data.finetune_source,
               cfg.data.label_fraction, n_train)
  aug_cfg = augment.AugmentConfig.from_dict(cfg.augment)
  step_fn = compile_step(functools.partial(segmentation_loss, model=model, aug_cfg=aug_cfg), tx, mesh)
  meta = {"task": "finetune", "model": cfg.model.to_dict(), "source": cfg.data.finetune_source, "data": data_meta(cfg),
          "init_from": cfg.init_from, "transfer": cfg.transfer if cfg.init_from else "none"}
  state, rep, summary = fit(cfg, workdir, "finetune", state, step_fn, iter(train_ds),
                            lambda b: global_batch((b["image"], b["mask"]), mesh), mesh, meta)
  scores, examples = evaluate_split(model, state, cfg, cfg.eval_split, mesh)
  summary.update(evaluate.summarize(scores), source=cfg.data.finetune_source, label_fraction=cfg.data.label_fraction,
                 train_images=n_train, eval_split=cfg.eval_split, init_from=cfg.init_from or None,
                 transfer=transfer or None)
  rep.scalars(cfg.num_steps, {"dice": summary["dice"], "iou": summary["iou"]}, cfg.eval_split)
  if jax.process_index() == 0:
    report.write_json(os.path.join(workdir, "per_image.json"), per_image_rows(scores))
    np.savez_compressed(os.path.join(workdir, "examples.npz"), **examples)
  logging.info("%s split: Dice %.4f, IoU %.4f over %d images", cfg.eval_split, summary["dice"], summary["iou"],
               summary["num_images"])
  rep.close(workdir, summary)
  return summary


def evaluate_split(model, state, cfg, split: str, mesh) -> dict[str, np.ndarray]:
  """Per-image scores on `split` with ids and classes: {'index', 'id', 'label', 'dice', 'iou', ...}."""
  variables = {"params": state["params"], "batch_stats": state["batch_stats"]}

  @functools.partial(jax.jit, out_shardings=NamedSharding(mesh, P("data")))
  def score(variables, images, masks):
    pred = model.apply(variables, to_float(images), train=False) > 0
    return (*evaluate.dice_iou(pred, masks > 0), pred)
  batches = pipeline.eval_batches(cfg.data, split, cfg.batch_size)
  scores, examples = evaluate.evaluate(lambda x, m: score(variables, x, m), batches,
                                       lambda a: global_batch(a, mesh))
  ids, labels = pipeline.split_labels(cfg.data, split)
  scores["id"] = np.asarray(ids)[scores["index"]]
  scores["label"] = np.asarray(labels)[scores["index"]]
  return scores, examples


def per_image_rows(scores: dict[str, np.ndarray]) -> list[dict]:
  keys = [k for k in ("id", "label", "dice", "iou", "hd95") if k in scores]
  rows = [{k: scores[k][i].item() for k in keys} for i in range(len(scores["dice"]))]
  for r in rows:   # JSON has no NaN: HD95 is undefined when exactly one of the masks is empty
    if "hd95" in r and not np.isfinite(r["hd95"]):
      r["hd95"] = None
  return rows


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
