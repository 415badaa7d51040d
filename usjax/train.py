"""The step and the loop both stages share: one pure step, compiled once with `jax.jit` over a device mesh, and the
loop around it (checkpoints, resume, the divergence guard). The stages build on it, `usjax.pretrain` and
`usjax.finetune`; this module knows neither.

The train state is a plain dict pytree {params, batch_stats, opt_state, step, rng}. Batches are sharded over the
mesh's `data` axis and the state is replicated, so BatchNorm statistics and contrastive negatives span the global
batch with no hand-written collectives. The state buffers are donated to each step. A non-finite loss, gradient
or update leaves the state unchanged (the step selects the old one), and the loop stops at a bad step (`guard`)
before the next save, so a good checkpoint is never overwritten by a diverged one.
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

from usjax import UsjaxError, checkpoint, guard, models, report, runtime


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


# ---------------------------------------------------------------------------------------------------- the step
def to_float(images):
  return images.astype(jnp.float32) / 255.0


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
  tracker = guard.GoodStepTracker.from_config(cfg.guard, ckpt, start, first)
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
    record_divergence(workdir, task, step, why, last, rep.history)
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
        bad = tracker.check(step, host)
        if bad:
          diverged(*bad)
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


def record_divergence(workdir: str, task: str, step: int, why: str, last_good: int | None, history: list,
                      **fields) -> None:
  """The summary.json of a run the divergence guard stopped at `step`, alone (`fit`) or stacked: why, the last
  checkpoint from before it (None: none), the training history so far, and `fields`."""
  if jax.process_index() == 0:
    report.write_json(
        os.path.join(workdir, "summary.json"), {
            "task": task, "status": "diverged", "stopped_at_step": step, "reason": why,
            "last_good_checkpoint": last_good, "history": history, **fields
        })


def data_meta(cfg) -> dict:
  """What a later user of the checkpoint (prediction on new images) needs to preprocess like training did."""
  return {"image_size": cfg.data.image_size, "channels": cfg.data.channels, "aspect": cfg.data.aspect}
