"""Several fine-tuning runs trained at once in one program: the train step `jax.vmap`-ed over a leading run axis.

On an accelerator one U-Net step at a small batch leaves the chip mostly idle; runs that share every shape (a
study grid's seeds and label fractions) fill it when they train together. Every leaf of the train state and of
the batch gets a leading run axis; the step is `train.train_step` under `jax.vmap`, so each run keeps its own
BatchNorm statistics, optimiser state and RNG (its state's `rng`), and a run's non-finite step leaves only its
own state unchanged. Each run has its own data iterator, initialisation (`init_from`) and validation-based model
selection, and writes what `finetune.finetune` writes: <workdir>/best, summary.json, history.json,
per_image.json and examples.npz.

Checkpointing: a stacked group is all-or-nothing. The stack saves no checkpoints while it trains (only each
run's best weights, in <workdir>/best); a run whose summary.json exists is skipped, and the others of the group
train again from step 0 (an interrupted group restarts). A run that diverges (a non-finite or spiking loss) gets
a 'diverged' summary.json at once; the other runs finish, then the group raises `train.DivergedError`.
"""
from __future__ import annotations

import functools
import json
import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec as P

from usjax import UsjaxError, augment, evaluate, finetune, guard, models, report, runtime, train
from usjax.data import pipeline

# What stacked runs may differ in; every other config key must be equal (one compiled step serves them all).
MAY_DIFFER = ("seed", "data.label_fraction", "init_from", "transfer")


# ---------------------------------------------------------------------------------------------------- the step
def stack(trees):
  """Pytrees of equal structure -> one pytree whose leaves have a leading run axis."""
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def unstack(tree, n: int) -> list:
  """The inverse of `stack`: the `n` members of a pytree with a leading run axis."""
  return [jax.tree.map(lambda x: x[i], tree) for i in range(n)]


def compile_stacked_step(loss_fn, tx, mesh, after_step=None):
  """`train.train_step` vmapped over the run axis and jitted once: the state replicated but for its run axis, the
  batch [runs, batch, ...] sharded on the mesh's `data` axis along its per-run batch dimension; state donated."""
  repl, data = NamedSharding(mesh, P()), NamedSharding(mesh, P(None, "data"))
  step = jax.vmap(functools.partial(train.train_step, loss_fn=loss_fn, tx=tx, after_step=after_step))
  return jax.jit(step, in_shardings=(repl, data), out_shardings=(repl, repl), donate_argnums=0)


def global_batch(local, mesh):
  """Per-process numpy arrays [runs, local batch, ...] -> global arrays sharded on the per-run batch dimension."""
  sharding = NamedSharding(mesh, P(None, "data"))
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local)


# ---------------------------------------------------------------------------------------------------- configs
def flat_config(cfg) -> dict:
  """{'data.image_size': 64, ...}: every leaf of a config, by dotted key."""
  out = {}

  def walk(d, prefix):
    for k, v in d.items():
      if isinstance(v, dict):
        walk(v, f"{prefix}{k}.")
      else:
        out[prefix + k] = v

  walk(cfg.to_dict(), "")
  return out


def stack_key(cfg) -> str:
  """Equal for configs that can train stacked (they differ only in MAY_DIFFER)."""
  return json.dumps({k: v for k, v in flat_config(cfg).items() if k not in MAY_DIFFER}, sort_keys=True, default=str)


def check_stackable(cfgs, workdirs) -> None:
  """Fails in one line naming the first config key in which a run differs from the first run."""
  if not cfgs or len(cfgs) != len(workdirs):
    raise UsjaxError(f"stacked fine-tuning needs one workdir per config, got {len(cfgs)} configs and "
                     f"{len(workdirs)} workdirs")
  if len({os.path.abspath(os.path.expanduser(w)) for w in workdirs}) != len(workdirs):
    raise UsjaxError(f"stacked runs need distinct workdirs, got {list(workdirs)}")
  first = flat_config(cfgs[0])
  for i, cfg in enumerate(cfgs):
    if cfg.task != "finetune":
      raise UsjaxError(f"only fine-tuning runs can be stacked: run {i} has config.task={cfg.task!r}")
    other = flat_config(cfg)
    for key in sorted(first.keys() | other.keys()):
      if key not in MAY_DIFFER and first.get(key, "(unset)") != other.get(key, "(unset)"):
        raise UsjaxError(f"stacked runs must share config.{key}: run 0 has {first.get(key, '(unset)')!r}, run {i} "
                         f"{other.get(key, '(unset)')!r} (only {', '.join(MAY_DIFFER)} may differ)")


# ---------------------------------------------------------------------------------------------------- one run
class _Run:
  """One member of the stack: its initial state, data, validation hook and reporter, and its final scoring."""
  def __init__(self, cfg, workdir: str, model, tx, mesh, scorers):
    if cfg.eval_split not in ("val", "test"):
      raise UsjaxError(f"config.eval_split must be 'val' or 'test', got {cfg.eval_split!r}")
    if cfg.tta not in ("auto", "none", "hflip"):
      raise UsjaxError(f"config.tta must be 'auto', 'none' or 'hflip', got {cfg.tta!r}")
    self.cfg, self.workdir, self.mesh, self.scorers = cfg, workdir, mesh, scorers
    self.transfer = {}
    s = cfg.data.image_size
    self.state = train.init_state(model, tx, cfg.seed, (2, s, s, cfg.data.channels), mesh,
                                  finetune.init_override(cfg, self.transfer))
    if cfg.ema_decay > 0:
      copy = jax.jit(lambda t: jax.tree.map(jnp.copy, t))
      self.state["extra"] = {
          "ema_params": copy(self.state["params"]), "ema_batch_stats": copy(self.state["batch_stats"])
      }
    train_ds, self.n_train = pipeline.finetune_dataset(cfg.data, cfg.batch_size, cfg.seed)
    self.data = iter(train_ds)
    logging.info(
        "stacked fine-tuning run %s: U-Net/%s (%.2fM parameters) on %s, %d%% labels = %d training images, "
        "%s", workdir, cfg.model.encoder,
        models.count_params(self.state["params"]) / 1e6, cfg.data.finetune_source, cfg.data.label_fraction,
        self.n_train, f"from {cfg.init_from}" if cfg.init_from else "from scratch")
    self.meta = {
        "task": "finetune", "model": cfg.model.to_dict(), "source": cfg.data.finetune_source,
        "data": train.data_meta(cfg), "init_from": cfg.init_from, "transfer": cfg.transfer if cfg.init_from else "none"
    }
    self.to_global = lambda a: train.global_batch(a, mesh)
    self.val_ids, self.val_labels = pipeline.split_labels(cfg.data, "val")
    self.selector = evaluate.Selector(cfg.val_every, scorers[False],
                                      list(pipeline.eval_batches(cfg.data, "val", cfg.batch_size)), self.to_global,
                                      self.val_ids, self.val_labels, finetune.candidates)
    abstract_vars = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                                 {"params": self.state["params"], "batch_stats": self.state["batch_stats"]})
    for stale in ("best", "tb"):  # left by an earlier attempt at this run: it starts over
      shutil.rmtree(os.path.join(workdir, stale), ignore_errors=True)
    self.hook = finetune.Validation(self.selector, os.path.join(workdir, "best"), self.meta, abstract_vars)
    self.rep = report.Reporter(workdir, cfg.num_steps, cfg.batch_size)
    self.recent: list[float] = []  # the loss-spike guard's window
    self.row: dict = {}  # the last logged training row
    self.diverged = False

  def check(self, step: int, metrics: list[dict]) -> None:
    """The divergence guard of `train.fit` over this run's steps up to `step`; a 'diverged' summary if it fires."""
    cfg = self.cfg
    for i, m in enumerate(metrics):
      at, loss = step - len(metrics) + 1 + i, float(m["loss"])
      why = None
      if cfg.guard.loss_spike_factor > 0:
        if guard.spike(loss, self.recent, cfg.guard.loss_spike_factor, cfg.guard.window):
          why = f"loss spike (loss={loss:.4g}, over {cfg.guard.loss_spike_factor:g}x the recent median and spread)"
        else:
          self.recent = (self.recent + [loss])[-cfg.guard.window:]
      if not m["finite"]:
        why = f"non-finite loss or gradient (loss={loss})"
      if why:
        self.diverged = True
        logging.error("stacked run %s: %s at step %d; it stops, the other runs go on", self.workdir, why, at)
        if jax.process_index() == 0:
          report.write_json(
              os.path.join(self.workdir, "summary.json"), {
                  "task": "finetune", "status": "diverged", "stopped_at_step": at, "reason": why,
                  "last_good_checkpoint": None, "history": self.rep.history, "stacked": True
              })
        return

  def finish(self, summary: dict, last_vars) -> dict:
    """Model choice on validation, then the one read of the evaluation split (as `finetune.finetune`)."""
    cfg, workdir, selector, scorers, to_global = self.cfg, self.workdir, self.selector, self.scorers, self.to_global
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
    self.hook.close()
    if jax.process_index() == 0:
      report.write_json(os.path.join(workdir, "best", "selection.json"), chosen)
    if cfg.eval_split == "val":
      scores, examples = evaluate.score_split(scorers[use_tta], best_vars, selector.batches, to_global, self.val_ids,
                                              self.val_labels)
    else:
      ids, labels = pipeline.split_labels(cfg.data, cfg.eval_split)
      batches = list(pipeline.eval_batches(cfg.data, cfg.eval_split, cfg.batch_size))
      scores, examples = evaluate.score_split(scorers[use_tta], best_vars, batches, to_global, ids, labels)
      last, _ = evaluate.score_split(scorers[False], last_vars, batches, to_global, ids, labels)
      summary["last_step"] = {
          k: v for k, v in evaluate.summarize(last).items() if k in ("dice", "dice_lesion", "iou", "iou_lesion")
      }
    summary.update(evaluate.summarize(scores), source=cfg.data.finetune_source, label_fraction=cfg.data.label_fraction,
                   train_images=self.n_train, eval_split=cfg.eval_split, init_from=cfg.init_from or None,
                   transfer=self.transfer or None, selected=chosen, val_history=selector.history)
    self.rep.scalars(cfg.num_steps, {k: summary[k] for k in ("dice", "dice_lesion", "iou") if k in summary},
                     cfg.eval_split)
    if jax.process_index() == 0:
      report.write_json(os.path.join(workdir, "per_image.json"), evaluate.per_image_rows(scores))
      np.savez_compressed(os.path.join(workdir, "examples.npz"), **examples)
    logging.info(
        "stacked run %s: selected step %d (%s weights, flip averaging %s), validation Dice %.4f; %s Dice "
        "%.4f", workdir, chosen["step"], chosen["weights"], "on" if use_tta else "off", val["dice"], cfg.eval_split,
        summary["dice"])
    self.rep.close(workdir, summary)
    return summary


# ---------------------------------------------------------------------------------------------------- the group
def _summary(workdir: str) -> dict | None:
  path = os.path.join(workdir, "summary.json")
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)


def finetune_stacked(cfgs, workdirs) -> list[dict]:
  """`finetune.finetune` for each config, with one compiled step for all: -> their summaries, in order.

  The configs may differ only in MAY_DIFFER (seed, label fraction, `init_from` and `transfer`). Runs whose
  summary.json exists are skipped (their summary is returned); the others train together from step 0 (see the
  module docstring: no mid-run checkpoints). Each workdir is locked as `train.run` locks it; one this call
  created is removed again if the group fails on bad input before writing a summary there.
  """
  check_stackable(cfgs, workdirs)
  for cfg in cfgs:
    train.check_config(cfg)
  workdirs = [os.path.abspath(os.path.expanduser(w)) for w in workdirs]
  todo = [i for i, w in enumerate(workdirs) if _summary(w) is None]
  if todo:
    runtime.maybe_initialize_distributed()
    created, locks = [], []
    try:
      for i in todo:
        if not runtime.check_workdir(workdirs[i]):
          created.append(workdirs[i])
        locks.append(runtime.lock_workdir(workdirs[i]))
      _train([cfgs[i] for i in todo], [workdirs[i] for i in todo])
    except UsjaxError as e:
      for lock in locks:
        lock()
      if not isinstance(e, train.DivergedError) and jax.process_index() == 0:
        for w in created:
          if _summary(w) is None:
            shutil.rmtree(w, ignore_errors=True)
      raise
    finally:
      for lock in locks:
        lock()
  return [_summary(w) for w in workdirs]


def _train(cfgs, workdirs) -> None:
  cfg, n = cfgs[0], len(cfgs)  # every shared setting is read from the first run's config
  mesh = train.make_mesh()
  model, tx = train.build_model(cfg), train.make_optimizer(cfg, cfg.num_steps)
  repl = NamedSharding(mesh, P())
  scorers = {tta: evaluate.make_scorer(model, NamedSharding(mesh, P("data")), tta) for tta in (False, True)}
  runs = []
  try:
    for c, w in zip(cfgs, workdirs):
      runs.append(_Run(c, w, model, tx, mesh, scorers))
  except BaseException:
    for r in runs:
      r.hook.close()
    raise
  state = jax.jit(stack, out_shardings=repl)([r.state for r in runs])
  for r in runs:
    r.state = None  # the stack holds the only copy
  aug_cfg = augment.AugmentConfig.from_dict(cfg.augment)
  loss_fn = functools.partial(finetune.segmentation_loss, model=model, aug_cfg=aug_cfg, ema_decay=cfg.ema_decay)
  after = functools.partial(finetune.ema_after_step, decay=cfg.ema_decay) if cfg.ema_decay > 0 else None
  step_fn = compile_stacked_step(loss_fn, tx, mesh, after)
  # Each run's variables as a state of its own (what `finetune.candidates` reads), copied out of the stack.
  members = jax.jit(lambda st: unstack({k: st[k] for k in ("params", "batch_stats", "extra") if k in st}, n),
                    out_shardings=repl)
  logging.info("training %d fine-tuning runs stacked in one program (%d steps, batch %d each)", n, cfg.num_steps,
               cfg.batch_size)

  t0, compile_s, pending = time.perf_counter(), 0.0, []
  try:
    with runtime.Interrupts() as interrupts:
      for step in range(1, cfg.num_steps + 1):
        host = [next(r.data) for r in runs]
        batch = (np.stack([b["image"] for b in host]), np.stack([b["mask"] for b in host]))
        state, metrics = step_fn(state, global_batch(batch, mesh))
        pending.append(metrics)
        if step == 1:
          jax.block_until_ready(metrics["loss"])
          compile_s = time.perf_counter() - t0
          for r in runs:
            r.rep.mark(step)
        if step < cfg.num_steps and interrupts.requested():
          raise runtime.Preempted(f"stopped by {interrupts.signal or 'another process'} at step {step}: stacked runs "
                                  f"keep no checkpoints, so running the same command again trains these {n} runs "
                                  f"again from step 0")
        # The steps where `train.fit` logs (and would save), so history.json has the same rows as an unstacked run.
        if step % cfg.log_every == 0 or step % cfg.checkpoint_every == 0 or step == cfg.num_steps:
          got = jax.device_get(pending)
          pending = []
          for i, r in enumerate(runs):
            if r.diverged:
              continue
            mine = [{k: v[i] for k, v in m.items()} for m in got]
            r.check(step, mine)
            if not r.diverged:
              r.row = r.rep.log(step, {k: np.mean([m[k] for m in mine]) for k in mine[-1] if k != "finite"})
        if runs[0].hook.due(step, cfg.num_steps):
          for r, member in zip(runs, members(state)):
            if not r.diverged:
              r.hook(step, member, r.rep)
  except BaseException:
    for r in runs:  # let the best weights already being written finish
      r.hook.close()
    raise
  wall_s = time.perf_counter() - t0

  last = members(state)
  for r, last_vars in zip(runs, last):
    if r.diverged:
      r.hook.close()
      continue
    summary = {
        "task": "finetune", "steps": cfg.num_steps, "batch_size": cfg.batch_size, "final_loss": r.row.get("loss"),
        "images_per_sec": r.rep.mean_rate(), "compile_s": compile_s, "wall_s": wall_s, "resumed_at": None,
        "devices": jax.device_count(), "processes": jax.process_count(), "stacked_runs": n
    }
    r.finish(summary, {"params": last_vars["params"], "batch_stats": last_vars["batch_stats"]})
  bad = [r.workdir for r in runs if r.diverged]
  if bad:
    raise train.DivergedError(f"{len(bad)} of {n} stacked runs diverged ({', '.join(bad)}: see their summary.json); "
                              f"the other runs finished")
