"""Several fine-tuning runs trained at once in one program: the train step `jax.vmap`-ed over a leading run axis.

On an accelerator one U-Net step at a small batch leaves the chip mostly idle; runs that share every shape (a
study grid's seeds and label fractions) fill it when they train together. Every leaf of the train state and of
the batch gets a leading run axis; the step is `train.train_step` under `jax.vmap`, so each run keeps its own
BatchNorm statistics, optimiser state and RNG (its state's `rng`), and a run's non-finite step leaves only its
own state unchanged. Each run is a `finetune.Run`, as a run alone is: its own initialisation (`init_from`),
validation-based model selection and final scoring; it writes what `finetune.finetune` writes: <workdir>/best,
summary.json, history.json, per_image.json and examples.npz. Only the stepping is this module's.

Data: the group decodes the training split once into host memory and each run's batches are gathers from it, in
the order the run's own grain pipeline would give them (`usjax.feed`); augmentation runs on the device.

Checkpointing: a stacked group is all-or-nothing. The stack saves no checkpoints while it trains (only each
run's best weights, in <workdir>/best); a run whose summary.json exists is skipped, and the others of the group
train again from step 0 (an interrupted group restarts). A run that diverges (the guard of `train.fit`: a
non-finite step, a parameter blow-up or a loss spike) gets a 'diverged' summary.json at once; the other runs
finish, then the group raises `train.DivergedError`. A group stopped by SIGTERM (a time limit) stops at the next
step boundary, logs how far it got and its measured step rate, and records them in `timing.json` beside the runs
(marked `cut`) before raising `runtime.Preempted`.
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

from usjax import UsjaxError, feed, finetune, guard, report, runtime, task, train
from usjax.timing import log_time

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


def global_group_batch(local, mesh):
  """Per-process numpy arrays [runs, local batch, ...] (`feed.group_batch`) -> global arrays sharded on the
  per-run batch dimension, as `compile_stacked_step` takes them (`train.global_batch` shards the leading axis)."""
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
class _Run(finetune.Run):
  """One member of the stack: a fine-tuning run (`finetune.Run`: state, validation, final scoring) with its own
  batches, reporter and divergence guard. It starts over: what an earlier attempt left in its workdir goes."""
  def __init__(self, cfg, workdir: str, model, tx, mesh, scorers, probers, shared: feed.SharedSplit, indices):
    for stale in ("best", "tb"):
      shutil.rmtree(os.path.join(workdir, stale), ignore_errors=True)
    super().__init__(cfg, workdir, model, tx, mesh, scorers, probers, len(indices))
    self.feed = feed.Feed(shared, indices, cfg.seed, cfg.batch_size)
    logging.info("stacked fine-tuning run %s: %s", workdir, self.describe())
    self.rep = report.Reporter(workdir, cfg.num_steps, cfg.batch_size)
    self.tracker = guard.GoodStepTracker.from_config(cfg.guard, None)  # no checkpoints to pin
    self.row: dict = {}  # the last logged training row
    self.diverged = False

  def check(self, step: int, metrics: list[dict]) -> None:
    """The divergence guard of `train.fit` over this run's steps up to `step`; a 'diverged' summary if it fires."""
    bad = self.tracker.check(step, metrics)
    if bad:
      self.diverged = True
      logging.error("stacked run %s: %s at step %d; it stops, the other runs go on", self.workdir, bad[1], bad[0])
      train.record_divergence(self.workdir, "finetune", *bad, None, self.rep.history, stacked=True)


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
  module docstring: no mid-run checkpoints). Each workdir is locked as `task.run` locks it; one this call
  created is removed again if the group fails on bad input before writing a summary there.
  """
  check_stackable(cfgs, workdirs)
  for cfg in cfgs:
    task.check_config(cfg)
  workdirs = [os.path.abspath(os.path.expanduser(w)) for w in workdirs]
  todo = [i for i, w in enumerate(workdirs) if _summary(w) is None]
  if todo:
    runtime.maybe_initialize_distributed()
    created, locks, t0 = [], [], time.perf_counter()
    try:
      for i in todo:
        if not runtime.check_workdir(workdirs[i]):
          created.append(workdirs[i])
        locks.append(runtime.lock_workdir(workdirs[i]))
      _train([cfgs[i] for i in todo], [workdirs[i] for i in todo])
    except UsjaxError as e:
      for lock in locks:
        lock()
      if isinstance(e, runtime.Preempted) and getattr(e, "timing", None):
        _record_cut([workdirs[i] for i in todo], time.perf_counter() - t0, e.timing)
      if not isinstance(e, train.DivergedError) and jax.process_index() == 0:
        for w in created:
          if _summary(w) is None:
            shutil.rmtree(w, ignore_errors=True)
      raise
    finally:
      for lock in locks:
        lock()
  return [_summary(w) for w in workdirs]


def _record_cut(workdirs, seconds: float, timing: dict) -> None:
  """A stopped group's time and measured rate, into the grid's `timing.json` beside its runs."""
  parents = {os.path.dirname(w) for w in workdirs}
  if len(parents) == 1 and jax.process_index() == 0:
    log_time(parents.pop(), "", [os.path.basename(w) for w in workdirs], "finetune", seconds, **timing)


def cut_timing(steps_done: int, num_steps: int, images_per_step: int, compile_s: float, loop_s: float) -> dict:
  """What a stopped group measured: steps done (`cut` unless all), compilation, and the rate of the steps after
  the first (which includes compilation); the rates are None until a second step has run."""
  step_s = loop_s / (steps_done - 1) if steps_done > 1 and loop_s > 0 else None
  return {
      "cut": steps_done < num_steps, "steps_done": steps_done, "steps": num_steps, "compile_s": round(compile_s, 1),
      "step_s": None if step_s is None else round(step_s, 4),
      "images_per_sec": None if step_s is None else round(images_per_step / step_s, 1)
  }


class _Clock:
  """How far the group got, and the `runtime.Preempted` that stops it when a signal asked (SIGTERM at a time
  limit): it carries `cut_timing`, which `finetune_stacked` records."""
  def __init__(self, interrupts, n: int, cfg):
    self.interrupts, self.n, self.cfg = interrupts, n, cfg
    self.step, self.compile_s, self.loop_s = 0, 0.0, 0.0

  def stop_if_asked(self, where: str) -> None:
    if not self.interrupts.requested():
      return
    timing = cut_timing(self.step, self.cfg.num_steps, self.n * self.cfg.batch_size, self.compile_s, self.loop_s)
    logging.warning("stacked group of %d runs stopped %s: %s", self.n, where,
                    ", ".join(f"{k}={v}" for k, v in timing.items()))
    e = runtime.Preempted(f"stopped by {self.interrupts.signal or 'another process'} {where}: stacked runs keep no "
                          f"checkpoints, so running the same command again trains the unfinished runs from step 0")
    e.timing = timing
    raise e


def _train(cfgs, workdirs) -> None:
  """Trains the group. A SIGTERM or Ctrl-C from here on (data, initialisation, compilation, the steps) stops it
  at the next step boundary; one during the final scoring lets the runs finish, then stops the caller."""
  with runtime.Interrupts() as interrupts:
    clock = _Clock(interrupts, len(cfgs), cfgs[0])
    _train_group(cfgs, workdirs, clock)
    clock.stop_if_asked("after its runs finished")


def _train_group(cfgs, workdirs, clock: _Clock) -> None:
  cfg, n = cfgs[0], len(cfgs)  # every shared setting is read from the first run's config
  mesh = train.make_mesh()
  model, tx = train.build_model(cfg), train.make_optimizer(cfg, cfg.num_steps)
  repl = NamedSharding(mesh, P())
  scorers, probers = finetune.make_scorers(model, mesh)
  t_data = time.perf_counter()
  indices = [feed.subset_indices(c.data) for c in cfgs]
  shared = feed.SharedSplit(cfg.data, np.concatenate(indices))
  logging.info("stacked group: %d training images decoded once for %d runs in %.1f s", len(shared.rows), n,
               time.perf_counter() - t_data)
  runs = []
  try:
    for c, w, idx in zip(cfgs, workdirs, indices):
      clock.stop_if_asked("while its runs were set up")
      runs.append(_Run(c, w, model, tx, mesh, scorers, probers, shared, idx))
  except BaseException:
    for r in runs:
      r.hook.close()
    raise
  state = jax.jit(stack, out_shardings=repl)([r.state for r in runs])
  for r in runs:
    r.state = None  # the stack holds the only copy
  loss_fn, after = finetune.step_parts(cfg, model)
  step_fn = compile_stacked_step(loss_fn, tx, mesh, after)
  # Each run's variables as a state of its own (what `finetune.candidates` reads), copied out of the stack.
  members = jax.jit(lambda st: unstack({k: st[k] for k in ("params", "batch_stats", "extra") if k in st}, n),
                    out_shardings=repl)
  logging.info("training %d fine-tuning runs stacked in one program (%d steps, batch %d each)", n, cfg.num_steps,
               cfg.batch_size)

  t0, pending = time.perf_counter(), []
  try:
    clock.stop_if_asked("before its first step")
    for step in range(1, cfg.num_steps + 1):
      state, metrics = step_fn(state, global_group_batch(feed.group_batch(shared, [r.feed for r in runs]), mesh))
      pending.append(metrics)
      clock.step = step
      if step == 1:
        jax.block_until_ready(metrics["loss"])
        clock.compile_s = time.perf_counter() - t0
        for r in runs:
          r.rep.mark(step)
      if step < cfg.num_steps and clock.interrupts.requested():
        jax.block_until_ready(metrics["loss"])  # the rate counts finished steps only
        clock.loop_s = time.perf_counter() - t0 - clock.compile_s
        clock.stop_if_asked(f"at step {step}")
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
  clock.loop_s = wall_s - clock.compile_s

  last = members(state)
  for r, last_vars in zip(runs, last):
    if r.diverged:
      r.hook.close()
      continue
    summary = {
        "task": "finetune", "steps": cfg.num_steps, "batch_size": cfg.batch_size, "final_loss": r.row.get("loss"),
        "images_per_sec": r.rep.mean_rate(), "compile_s": clock.compile_s, "wall_s": wall_s, "resumed_at": None,
        "devices": jax.device_count(), "processes": jax.process_count(), "stacked_runs": n
    }
    r.finish({"params": last_vars["params"], "batch_stats": last_vars["batch_stats"]}, r.rep, summary,
             who=f"stacked run {r.workdir}: ")
  bad = [r.workdir for r in runs if r.diverged]
  if bad:
    raise train.DivergedError(f"{len(bad)} of {n} stacked runs diverged ({', '.join(bad)}: see their summary.json); "
                              f"the other runs finished")
