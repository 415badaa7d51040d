"""Train stage: one pure step per task, compiled once with `jax.jit` over a device mesh, and the loop around it.

The train state is a plain dict pytree {params, batch_stats, opt_state, step, rng}. Batches are sharded over the
mesh's `data` axis and the state is replicated, so BatchNorm statistics and contrastive negatives span the global
batch with no hand-written collectives. The state buffers are donated to each step. A non-finite loss, gradient
or update leaves the state unchanged (the step selects the old one), and the loop stops at a bad step (`guard`)
before the next save, so a good checkpoint is never overwritten by a diverged one.
"""
from __future__ import annotations

import functools
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from usjax import UsjaxError, augment, checkpoint, guard, methods, models, probe_data, probes, report, runtime
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


def model_config(cfg) -> dict:
  """`cfg.model` as fine-tuning builds it and records it in checkpoint metas, with `presence_head`: whether the
  U-Net has the lesion-presence head (`config.presence.weight > 0`), so prediction rebuilds the same network."""
  return {**cfg.model.to_dict(), "presence_head": cfg.presence.weight > 0}


def build_model(cfg) -> models.UNet:
  """The segmentation U-Net of `cfg.model` (pre-training networks come from `methods.make_method`)."""
  return models.unet_from_config(model_config(cfg))


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
  return {
      "params": params, "batch_stats": batch_stats, "opt_state": opt_state,
      "step": jax.device_put(jnp.zeros((), jnp.int32), repl), "rng": rng
  }


# ---------------------------------------------------------------------------------------------------- losses
def to_float(images):
  return images.astype(jnp.float32) / 255.0


def pretrain_loss(params, batch_stats, extra, images, key, step, *, method, aug_cfg):
  """Two augmented views of each uint8 image, made on device, then the method's objective."""
  v1, v2 = augment.two_views(key, to_float(images), aug_cfg)
  return method.loss(params, batch_stats, extra, v1, v2, step)


def train_step(state, batch, *, loss_fn, tx, after_step=None):
  """One optimiser step. Pure: (state, batch) -> (state, metrics).

  `state["extra"]`, when present, is a method's own state (EMA target, queue): the loss returns its new value
  and `after_step(extra, params, step)` updates it once the optimiser has moved the parameters.
  """
  key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  inputs = (state["params"], state["batch_stats"], state.get("extra", {}), batch, key, state["step"])
  (loss, (batch_stats, extra, metrics)), grads = grad_fn(*inputs)
  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  grad_norm, update_norm = optax.global_norm(grads), optax.global_norm(updates)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(update_norm)
  # How far this update moves the parameters, relative to their size: the guard's blow-up test (guard.blowup).
  update_ratio = update_norm / jnp.maximum(optax.global_norm(state["params"]), 1e-12)
  params = optax.apply_updates(state["params"], updates)
  new = {"params": params, "batch_stats": batch_stats, "opt_state": opt_state}
  if "extra" in state:
    new["extra"] = after_step(extra, params, state["step"]) if after_step else extra
  new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, {k: state[k] for k in new})
  new.update(step=state["step"] + 1, rng=state["rng"])
  return new, {"loss": loss, "grad_norm": grad_norm, "update_ratio": update_ratio, "finite": finite, **metrics}


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
  """Runs `cfg.num_steps` steps with progress, checkpoints and the divergence guard; resumes from the latest save.

  `hook(step, state, rep)`, when given, runs on the steps where `hook.due(step, num_steps)` (validation), before
  that step's checkpoint, and `hook.state_dict()` is saved in the checkpoint's meta so a resumed run continues
  it. The training history and wall time also live in the meta: after a resume they span the whole run. A
  resume whose batch size, image size or model differ from the checkpoint's stops (`checkpoint.check_resume`)
  unless `config.resume_anyway`. The data iterator is closed on the way out, whatever the way: its worker
  processes then end quietly.
  """
  try:
    return _fit(cfg, workdir, task, state, step_fn, data_iter, to_batch, meta, hook)
  finally:
    if hasattr(data_iter, "close"):
      data_iter.close()


def _fit(cfg, workdir, task, state, step_fn, data_iter, to_batch, meta, hook):
  meta = {**meta, "batch_size": cfg.batch_size}
  ckpt = checkpoint.manager(os.path.join(workdir, "checkpoints"), keep=cfg.keep_checkpoints)
  checkpoint.check_resume(ckpt, meta, cfg.get("resume_anyway", False))
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
  restored = checkpoint.restore_latest(ckpt, abstract, data_iter)
  start, earlier_s, history, first = 0, 0.0, [], []
  if restored is not None:
    state, saved_meta = restored
    start = int(state["step"])
    earlier_s, history = float(saved_meta.get("elapsed_s", 0.0)), list(saved_meta.get("history", []))
    first = saved_meta.get("first_losses") or [r["loss"] for r in history[:guard.FIRST_LOSSES] if "loss" in r]
    if hook is not None:
      hook.resume(saved_meta)
    logging.info("resuming from %s at step %d", ckpt.directory, start)
  rep = report.Reporter(workdir, cfg.num_steps, cfg.batch_size, start)
  rep.history = history
  g = cfg.guard
  tracker = guard.GoodStepTracker(ckpt, start, g.loss_spike_factor, g.window,
                                  g.get("max_update_ratio", guard.MAX_UPDATE_RATIO), first)
  t0, compile_s, row, pending, unlogged = time.perf_counter(), 0.0, {}, [], []

  def save(step):
    extra_meta = {
        "history": rep.history, "elapsed_s": earlier_s + time.perf_counter() - t0, "first_losses": tracker.first
    }
    tracker.saved(step)  # pinned first, so that rotation at the end of this save already spares it
    checkpoint.save(ckpt, step, state, {**meta, **extra_meta, **(hook.state_dict() if hook else {})}, data_iter)

  def diverged(step, why):
    checkpoint.finish(ckpt)
    last = max((s for s in ckpt.all_steps() if s < step), default=None)
    if jax.process_index() == 0:
      report.write_json(
          os.path.join(workdir, "summary.json"), {
              "task": task, "status": "diverged", "stopped_at_step": step, "reason": why, "last_good_checkpoint": last,
              "history": rep.history
          })
    kept = "no checkpoint was saved before it" if last is None else \
        f"the last good checkpoint (step {last}) in {ckpt.directory} is kept"
    raise DivergedError(f"{why} by step {step}; stopped, {kept}")

  with runtime.Interrupts() as interrupts:
    for step in range(start + 1, cfg.num_steps + 1):
      state, metrics = step_fn(state, to_batch(next(data_iter)))
      pending.append(metrics)
      if step == start + 1:
        jax.block_until_ready(metrics["loss"])
        compile_s = time.perf_counter() - t0
        rep.mark(step)
      is_save = step % cfg.checkpoint_every == 0 or step == cfg.num_steps
      stop = step < cfg.num_steps and interrupts.requested()
      is_log = step % cfg.log_every == 0 or is_save or stop
      hook_due = hook is not None and hook.due(step, cfg.num_steps)
      if is_log or hook_due:
        # The guard judges every step before anything is made of its state (validation, a checkpoint): no
        # checkpoint is ever taken after a bad step, so rotation never removes the last good one.
        host = jax.device_get(pending)
        pending = []
        for i, m in enumerate(host):
          at = step - len(host) + 1 + i
          why = tracker.observe(at, float(m["loss"]), m.get("update_ratio"))
          if not m["finite"]:
            why = f"non-finite loss, gradient or update (loss={m['loss']})"
          if why:
            diverged(at, why)
        unlogged += host
      if is_log:
        row = rep.log(step, {k: np.mean([m[k] for m in unlogged]) for k in unlogged[-1] if k != "finite"})
        unlogged = []
      if hook_due:
        hook(step, state, rep)
      if is_save or stop:
        save(step)
      if stop:
        checkpoint.finish(ckpt)
        ckpt.close()
        raise runtime.Preempted(f"stopped by {interrupts.signal or 'another process'} at step {step}: checkpoint "
                                f"saved in {ckpt.directory}; run the same command again to resume")
  checkpoint.finish(ckpt)
  ckpt.close()
  summary = {
      "task": task, "steps": cfg.num_steps, "batch_size": cfg.batch_size, "final_loss": row.get("loss"),
      "images_per_sec": rep.mean_rate(), "compile_s": compile_s, "wall_s": earlier_s + time.perf_counter() - t0,
      "resumed_at": start or None, "devices": jax.device_count(), "processes": jax.process_count()
  }
  return state, rep, summary


def data_meta(cfg) -> dict:
  """What a later user of the checkpoint (prediction on new images) needs to preprocess like training did."""
  return {"image_size": cfg.data.image_size, "channels": cfg.data.channels, "aspect": cfg.data.aspect}


class Probes:
  """What pre-training has learned, while it runs: the frozen-feature k-NN and linear probes
  (`usjax.probes`) every `config.probe.every` steps and at the end, on the labelled sets among
  `config.probe.sources` whose folders are given; and the collapse monitor on every logged step's embedding
  statistics (a per-dimension std of the normalised projections below COLLAPSE_FRACTION / sqrt(D))."""
  def __init__(self, cfg):
    from usjax.data import sources
    names = [
        n for n in cfg.probe.sources.split(",")
        if n.strip() and getattr(cfg.data, sources.SOURCE_DIR_KEY.get(n.strip(), ""), "")
    ]
    self.every, self.log_every, self.history, self.collapsed_at = cfg.probe.every, cfg.log_every, [], None
    self.z_ideal = 1.0 / math.sqrt(cfg.model.proj_dims[-1])
    self.data = None
    if names and cfg.probe.every >= 0 and jax.process_index() == 0:
      self.data = probe_data.ProbeData(cfg.data, cfg.model, names=[n.strip() for n in names])
      logging.info("probes: %s (prepared in %.1f s)",
                   ", ".join(f"{k} {v['train']}->{v['eval']} images" for k, v in self.data.describe().items()),
                   self.data.build_seconds)
    elif cfg.probe.every >= 0:
      logging.info("probes off: none of config.probe.sources (%s) has its data folder set", cfg.probe.sources)

  def probe_due(self, step: int, last: int) -> bool:
    return self.data is not None and (step == last or (self.every > 0 and step % self.every == 0))

  def due(self, step: int, last: int) -> bool:
    return self.probe_due(step, last) or step % self.log_every == 0

  def __call__(self, step: int, state, rep) -> None:
    z_std = rep.history[-1].get("z_std") if rep.history else None
    if z_std is not None and self.collapsed_at is None and z_std < probes.COLLAPSE_FRACTION * self.z_ideal:
      self.collapsed_at = step
      logging.warning("embeddings collapsing at step %d: z_std %.4f against %.4f for spread-out embeddings", step,
                      z_std, self.z_ideal)
    if self.probe_due(step, rep.total):
      out = self.data.run({"params": state["params"], "batch_stats": state["batch_stats"]})
      out = {k.removeprefix("probe/"): float(v) for k, v in out.items()}
      self.history.append({"step": step, **out})
      rep.scalars(step, out, "probe")
      logging.info("probe at step %d: %s", step, " ".join(f"{k}={v:.3f}" for k, v in out.items()))

  def state_dict(self) -> dict:
    return {"probe_history": self.history, "collapsed_at": self.collapsed_at}

  def resume(self, meta: dict) -> None:
    self.history, self.collapsed_at = list(meta.get("probe_history") or []), meta.get("collapsed_at")


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
  meta = {
      "task": "pretrain", "method": cfg.method, "model": cfg.model.to_dict(), "sources": cfg.data.pretrain_sources,
      "data": data_meta(cfg)
  }
  hook = Probes(cfg)
  state, rep, summary = fit(cfg, workdir, "pretrain", state, step_fn, data_iter,
                            lambda b: global_batch(b["image"], mesh), mesh, meta, hook)
  summary.update(method=cfg.method, sources=cfg.data.pretrain_sources,
                 first_loss=rep.history[0]["loss"] if rep.history else None, probe_history=hook.history,
                 collapsed=hook.collapsed_at is not None, collapsed_at_step=hook.collapsed_at, z_std_ideal=hook.z_ideal)
  if hook.history:
    summary["probe"] = {k: v for k, v in hook.history[-1].items() if k != "step"}
  if rep.history and "z_std" in rep.history[-1]:
    summary.update({k: rep.history[-1][k] for k in ("z_std", "align", "uniform") if k in rep.history[-1]})
  rep.close(workdir, summary)
  return summary


def check_config(cfg) -> None:
  """The values a run would otherwise reject only after preparing its data (minutes on real data): one line each."""
  from usjax.data import sources
  choices = {
      "task": ("pretrain", "finetune"), "method": methods.METHODS, "optim.name": ("adamw", "lars", "sgd"),
      "data.aspect": ("pad", "stretch", "crop"), "model.norm": ("batch", "group")
  }
  if cfg.task == "finetune":
    choices.update({
        "eval_split": ("val", "test"), "tta": ("auto", "none", "hflip"), "transfer": ("encoder", "encoder+decoder"),
        "data.label_fraction": (100, 50, 25, 10), "postprocess": ("auto", "none")
    })
    if not cfg.presence.weight >= 0:
      raise UsjaxError(f"config.presence.weight must be >= 0, got {cfg.presence.weight!r}")
  for key, allowed in choices.items():
    value = functools.reduce(getattr, key.split("."), cfg)
    if value not in allowed:
      raise UsjaxError(f"config.{key} must be one of {', '.join(map(repr, allowed))}, got {value!r}")
  if cfg.task == "finetune":
    sources.check_name(cfg.data.finetune_source, cfg.data, "finetune_source")
  else:
    names, _ = sources.parse_sources(cfg.data.pretrain_sources, cfg.data.pretrain_weights)
    for name in names:
      sources.check_name(name, cfg.data, "pretrain_sources")
  check_data_dir(cfg.data.data_dir)
  if cfg.init_from and not os.path.exists(os.path.expanduser(cfg.init_from)):
    raise checkpoint.CheckpointError(f"config.init_from: no checkpoint at {cfg.init_from} (expected a pre-training "
                                     f"workdir or a .safetensors file)")


def check_data_dir(data_dir: str) -> None:
  """Fails in one line when `config.data.data_dir` cannot be created: a missing or read-only HOME under the default
  ~/tensorflow_datasets. One that exists is left to the preparation (`staging.build`): reading needs no writing."""
  path = os.path.expanduser(data_dir)
  if path.startswith("~"):
    raise UsjaxError(f"config.data.data_dir: {data_dir} names a home folder that cannot be found (HOME is not set?); "
                     f"set --config.data.data_dir to a writable folder")
  parent = os.path.abspath(path)
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if parent != os.path.abspath(path) and not (os.path.isdir(parent) and os.access(parent, os.W_OK | os.X_OK)):
    raise UsjaxError(f"config.data.data_dir: cannot create {os.path.abspath(path)} ({parent} is not a writable "
                     f"folder); set --config.data.data_dir to a writable folder")


def run(cfg, workdir: str) -> dict:
  """Runs the task of `cfg` in `workdir`. A run that fails on bad input removes the workdir it created."""
  if cfg.task not in ("pretrain", "finetune"):
    raise UsjaxError(f"config.task must be 'pretrain' or 'finetune', got {cfg.task!r}")
  check_config(cfg)
  runtime.maybe_initialize_distributed()
  existed = runtime.check_workdir(workdir)
  workdir = os.path.abspath(os.path.expanduser(workdir))
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
  lock = runtime.lock_workdir(workdir)  # one run per workdir: two would rotate each other's checkpoints
  try:
    if cfg.task == "pretrain":
      return pretrain(cfg, workdir)
    from usjax import finetune  # it builds on this module's step and loop
    return finetune.finetune(cfg, workdir)
  except UsjaxError:
    ckdir = os.path.join(workdir, "checkpoints")
    saved = os.path.isdir(ckdir) and any(n.isdigit() for n in os.listdir(ckdir))
    if not existed and not saved and jax.process_index() == 0:
      import shutil
      lock()
      shutil.rmtree(workdir, ignore_errors=True)
    raise
  finally:
    lock()
