"""Checkpoint stage: orbax saves of the whole train state, resume, and transfer of pre-trained weights.

A checkpoint directory holds `<step>/state` (params, batch statistics, optimiser state, step, RNG),
`<step>/meta` (JSON: what kind of run wrote it, the model config) and `<step>/data` (the grain iterator
position, one file per process). Saves are asynchronous and atomic (orbax writes to a temporary directory and
renames it), so an interrupted save never replaces the previous good checkpoint. A checkpoint damaged later
(a truncated file) is moved aside to `unreadable-<step>` on resume, which falls back to the next older one.

Rotation keeps the newest `keep` checkpoints and, besides them, the one pinned by `mark_good` and, once
`mark_bad` recorded a run's first bad step, the newest one from before it (both in `good_step.json`): with the
divergence guard (`GoodStepTracker`) the last checkpoint from before a loss spike survives however long the run
goes on after it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import math
import os
import sys
import weakref
from collections.abc import Sequence

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from usjax import UsjaxError

GOOD_STEP_FILE = "good_step.json"
# Loss-spike guard defaults (config fields guard.loss_spike_factor and guard.window): see `spike`.
SPIKE_FACTOR = 10.0
SPIKE_WINDOW = 50


class CheckpointError(UsjaxError):
  """A checkpoint that is missing or does not fit the model: the message names the path."""


def _first_line(e: BaseException, limit: int = 200) -> str:
  """An exception as one short line: orbax and TensorStore messages run to dozens of lines of specs."""
  lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
  text = lines[0].split(" See full TensorStore details")[0] if lines else ""
  text = text if len(text) <= limit else text[:limit - 3] + "..."
  return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _abandoned_read(u) -> bool:
  """Whether an unraisable error is the aftermath of a failed orbax read (see `_quiet_failed_reads`)."""
  code = getattr(u.object, "cr_code", None)
  if code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename:
    return True
  if isinstance(u.exc_value, RuntimeError) and "Event loop is closed" in str(u.exc_value):
    tb = u.exc_traceback
    while tb is not None:
      if tb.tb_frame.f_code.co_name == "call_soon_threadsafe":
        return True
      tb = tb.tb_next
  return False


_quiet_hook_installed = False


@contextlib.contextmanager
def _quiet_failed_reads():
  """Drops the 'Exception ignored in ...' reports a failed orbax read leaves behind.

  When one array of a checkpoint cannot be read, orbax abandons the reads of the others: their coroutines are
  finalised later, and reads still in flight call back into the event loop orbax has closed meanwhile, and
  Python prints each error (a 60-line TensorStore spec apiece) to stderr. The one-line warning of the caller
  says all there is to say. After a failure the filter stays installed, since the call-backs may come at any
  time; every other unraisable error still reaches the previous hook.
  """
  global _quiet_hook_installed
  previous = sys.unraisablehook

  def hook(u):
    if not _abandoned_read(u):
      previous(u)
  if not _quiet_hook_installed:
    sys.unraisablehook = hook
  try:
    yield
  except BaseException:
    gc.collect()   # finalise the abandoned coroutines now, under the filter
    _quiet_hook_installed = True
    raise
  finally:
    if not _quiet_hook_installed:
      sys.unraisablehook = previous


# ---------------------------------------------------------------------------------------------------- rotation
@dataclasses.dataclass
class _Pinned(ocp.checkpoint_managers.PreservationPolicy):
  """Preserves the step pinned by `mark_good` and, once a bad step is recorded, the newest step before it.

  The second rule holds even where the pinned save never completed (a crash during an async save) or no step
  was marked. Combined with LatestN, which keeps the newest.
  """
  step: int | None = None
  bad_step: int | None = None
  path: str | None = None   # where the pin is recorded, so a resumed run keeps honouring it

  def should_preserve(self, checkpoints, *, context) -> list[bool]:
    del context
    keep = {self.step} - {None}
    before_bad = [c.step for c in checkpoints if self.bad_step is not None and c.step < self.bad_step]
    if before_bad:
      keep.add(max(before_bad))
    return [c.step in keep for c in checkpoints]

  def write(self) -> None:
    if self.path is None or jax.process_index() != 0:
      return
    tmp = f"{self.path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
      json.dump({"step": self.step, "bad_step": self.bad_step}, f)
    os.replace(tmp, self.path)   # atomic: a reader never sees half a record


def _read_pin(path: str) -> _Pinned:
  pin = _Pinned(path=path)
  try:
    with open(path) as f:
      rec = json.load(f)
    pin.step, pin.bad_step = rec.get("step"), rec.get("bad_step")
  except (OSError, ValueError, AttributeError):   # none yet, or damaged: nothing is pinned
    pass
  return pin


_PINS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()   # manager -> its pin (also in its options)


def manager(directory: str, keep: int = 3, create: bool = True) -> ocp.CheckpointManager:
  """Async checkpoint manager that keeps the newest `keep` steps and the step pinned by `mark_good`."""
  directory = os.path.abspath(directory)
  pin = _read_pin(os.path.join(directory, GOOD_STEP_FILE))
  policy = ocp.checkpoint_managers.AnyPreservationPolicy([ocp.checkpoint_managers.LatestN(keep), pin])
  opts = ocp.CheckpointManagerOptions(preservation_policy=policy, create=create, enable_async_checkpointing=True)
  mngr = ocp.CheckpointManager(directory, options=opts)
  _PINS[mngr] = pin
  return mngr


def _pin(mngr: ocp.CheckpointManager) -> _Pinned:
  pin = _PINS.get(mngr)
  if pin is None:
    raise CheckpointError(f"{mngr.directory}: not a manager made by checkpoint.manager (no pinned step)")
  return pin


def mark_good(mngr: ocp.CheckpointManager, step: int) -> None:
  """Pins `step` (saved, or being saved, by `mngr`) so that rotation keeps it; it replaces the previous pin."""
  pin = _pin(mngr)
  pin.step = int(step)
  pin.write()


def good_step(mngr: ocp.CheckpointManager) -> int | None:
  """The pinned step (`mark_good`), kept by rotation; None if none."""
  return _pin(mngr).step


def mark_bad(mngr: ocp.CheckpointManager, step: int) -> None:
  """Records the first bad step of a run: from then on rotation keeps the newest checkpoint from before it."""
  pin = _pin(mngr)
  pin.bad_step = int(step)
  pin.write()


def spike(loss: float, history: Sequence[float], factor: float = SPIKE_FACTOR, window: int = SPIKE_WINDOW) -> bool:
  """Whether `loss` is far above the recent losses: a sign of divergence before anything turns non-finite.

  True when `loss` is not finite, or exceeds the median m of the last `window` finite losses of `history` by
  more than `factor` times the larger of |m| and the losses' spread (1.4826 x their median absolute deviation).
  The |m| term makes it a ratio test where the loss is far from zero; the spread term keeps a loss that
  fluctuates about zero, or is negative (SimSiam's -cosine), from firing on ordinary noise. With fewer than
  min(window, 10) finite losses in `history` it gives no verdict (False).

  The default factor 10 needs a loss 11x the median of a positive loss: batch-to-batch noise and the ups of a
  warm-up stay far below that (NT-Xent / InfoNCE are bounded by about log(2B) + 2/T, Dice + BCE of a sane
  network by a few units), while a blow-up passes it by orders of magnitude.
  """
  if not math.isfinite(loss):
    return True
  recent = [x for x in history if math.isfinite(x)][-window:] if window > 0 else []
  if len(recent) < min(window, 10) or not recent:
    return False
  m = float(np.median(recent))
  spread = 1.4826 * float(np.median(np.abs(np.asarray(recent) - m)))
  return loss - m > factor * max(abs(m), spread, 1e-12)


class GoodStepTracker:
  """The divergence guard of a run: loss-spike watch, and the pin on the last checkpoint before the first bad step.

  Per step, `observe(step, loss)` says whether the step is bad (`spike`) and records the first bad step with
  the manager (`mark_bad`), from when on rotation keeps the newest checkpoint older than it; per save,
  `saved(step)` pins the checkpoint (`mark_good`) while no bad step has been seen. Either way rotation never
  deletes the last checkpoint taken before the first bad step. Both records live in `good_step.json` beside
  the checkpoints: a run resumed from a checkpoint at or after the bad step (it descends from the spike) keeps
  them; one resumed from before it starts afresh.
  """

  def __init__(self, mngr: ocp.CheckpointManager, start_step: int, factor: float = SPIKE_FACTOR,
               window: int = SPIKE_WINDOW):
    if not factor > 0 or int(window) < 1:
      raise UsjaxError(f"config.guard: loss_spike_factor must be positive and window at least 1, got {factor} and "
                       f"{window}")
    self.mngr, self.factor, self.window = mngr, float(factor), int(window)
    self.pin = _pin(mngr)
    self.history: list[float] = []
    self.first_bad: int | None = None
    self.bad_steps = 0
    if self.pin.bad_step is not None:
      if self.pin.bad_step <= start_step:
        self.first_bad = self.pin.bad_step
      else:
        self.pin.bad_step = None
        self.pin.write()

  def observe(self, step: int, loss: float) -> bool:
    """Records the loss of `step`; True if it is a spike (or not finite). Spikes stay out of the history."""
    loss = float(loss)
    bad = spike(loss, self.history, self.factor, self.window)
    if not bad:
      self.history.append(loss)
      del self.history[:-self.window]
      return False
    self.bad_steps += 1
    if self.first_bad is None:
      self.first_bad = step
      mark_bad(self.mngr, step)
      recent = [x for x in self.history if math.isfinite(x)][-self.window:]
      median = float(np.median(recent)) if recent else float("nan")
      before = [s for s in self.mngr.all_steps() if s < step]
      kept = f"checkpoint step {max(before)} is kept" if before else "no checkpoint before it"
      logging.warning("loss spike at step %d: loss %.4g against a median of %.4g over the last %d steps; %s in %s "
                      "(no later checkpoint replaces it)", step, loss, median, len(recent), kept,
                      self.mngr.directory)
    return True

  def saved(self, step: int) -> None:
    """Call after each `save`: pins `step` while the run has seen no bad step."""
    if self.first_bad is None:
      mark_good(self.mngr, step)

  @property
  def good_step(self) -> int | None:
    return self.pin.step


# ---------------------------------------------------------------------------------------------------- save/resume
def save(mngr: ocp.CheckpointManager, step: int, state, meta: dict, data_iter=None) -> None:
  items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
  if data_iter is not None:
    items["data"] = grain.checkpoint.CheckpointSave(data_iter)
  mngr.save(step, args=ocp.args.Composite(**items), force=True)


def _restore(mngr: ocp.CheckpointManager, step: int, abstract_state, data_iter):
  items = {"state": ocp.args.StandardRestore(abstract_state), "meta": ocp.args.JsonRestore()}
  if data_iter is not None and os.path.isdir(os.path.join(mngr.directory, str(step), "data")):
    items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
  out = mngr.restore(step, args=ocp.args.Composite(**items))
  return out["state"], out["meta"]


def _move_aside(mngr: ocp.CheckpointManager, steps: list[int]) -> list[str]:
  """Renames unreadable steps to `unreadable-<step>` (orbax ignores them), so later saves can reuse the numbers."""
  moved = []
  if jax.process_index() == 0:
    for step in steps:
      src = os.path.join(mngr.directory, str(step))
      dst, n = os.path.join(mngr.directory, f"unreadable-{step}"), 1
      while os.path.exists(dst):
        dst, n = os.path.join(mngr.directory, f"unreadable-{step}-{n}"), n + 1
      os.rename(src, dst)
      moved.append(dst)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("usjax_checkpoint_move_aside")
  mngr.reload()
  return moved


def _everywhere(ok: bool) -> bool:
  """Whether `ok` holds on every process of the run."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils
  return bool(np.all(multihost_utils.process_allgather(np.asarray(ok))))


def restore_latest(mngr: ocp.CheckpointManager, abstract_state, data_iter=None):
  """(state, meta) of the newest readable checkpoint, the iterator moved to its position; None if there is none.

  A checkpoint that cannot be read (a truncated or damaged file) is skipped with a warning naming its step and
  directory, and the next older one is tried. Once one is restored, the unreadable newer ones are moved aside to
  `unreadable-<step>` (kept for inspection; rename one back if its failure was a passing read error), so the
  run saves those step numbers again. If none can be read, CheckpointError says so in one line and nothing is
  moved: when every step fails, the cause is more likely the run (a changed model config) than the files. In a
  multi-process run a step counts as read only if every process read it.
  """
  steps = sorted(mngr.all_steps(), reverse=True)
  failed: list[tuple[int, str]] = []
  for step in steps:
    path = os.path.join(mngr.directory, str(step))
    try:
      with _quiet_failed_reads():
        out = _restore(mngr, step, abstract_state, data_iter)
      error = None
    except Exception as e:   # noqa: BLE001 (orbax and TensorStore raise plain Exception on damaged files)
      error = _first_line(e)
    if not _everywhere(error is None):   # all processes resume from the same step, or none does
      failed.append((step, error or "unreadable on another process"))
      logging.warning("checkpoint step %d in %s cannot be read (%s); %s", step, path, failed[-1][1],
                      "trying the next older one" if step != steps[-1] else "no older one left")
      continue
    if failed:
      moved = _move_aside(mngr, [s for s, _ in failed])
      logging.warning("resuming from step %d instead of step %s: moved the unreadable checkpoint(s) aside to %s",
                      step, ", ".join(str(s) for s, _ in failed), ", ".join(moved) or "(process 0 moves them)")
    return out
  if not failed:
    return None
  raise CheckpointError(f"no readable checkpoint in {mngr.directory} (steps {', '.join(str(s) for s, _ in failed)}); "
                        f"step {failed[0][0]}: {failed[0][1]}. A changed model config, or damaged files? A new "
                        f"--workdir starts afresh")


# ---------------------------------------------------------------------------------------------------- transfer
def _flat(tree) -> dict[str, tuple]:
  return {"/".join(str(getattr(k, "key", k)) for k in path): tuple(getattr(v, "shape", ()))
          for path, v in jax.tree_util.tree_leaves_with_path(tree)}


def find_checkpoint_dir(path: str) -> str:
  """Accepts a pre-training workdir or its `checkpoints/` directory."""
  path = os.path.abspath(os.path.expanduser(path))
  cand = os.path.join(path, "checkpoints")
  if os.path.isdir(cand):
    return cand
  if os.path.isdir(path):
    return path
  raise CheckpointError(f"config.init_from: no checkpoint at {path} (expected a pre-training workdir)")


def _read_meta(ckdir: str, step: int) -> dict | None:
  """The `meta` item of a step; None if it has none (a checkpoint written by other code)."""
  path = os.path.join(ckdir, str(step), "meta")
  if not os.path.isdir(path):
    return None
  try:
    meta = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(path)
  except Exception as e:   # noqa: BLE001 (a damaged file: orbax's error types vary)
    raise CheckpointError(f"config.init_from: {path} cannot be read ({_first_line(e)})") from None
  return meta if isinstance(meta, dict) else None


def load_pretrained(path: str, params: dict, batch_stats: dict, parts: tuple[str, ...], encoder: str | None = None):
  """Copies sub-trees `parts` (e.g. ('encoder',) or ('encoder', 'decoder')) from a pre-training checkpoint.

  Returns new (params, batch_stats) and a report: 'checkpoint', 'encoder' (the pre-training's model.encoder,
  None if its meta does not say), 'loaded' and 'init' (top-level modules), and the tensor counts
  'loaded_tensors', 'init_tensors' (left at initialisation) and 'ignored_tensors' (in the checkpoint's
  transferred parts but not in the model). With `encoder` (this model's model.encoder), a checkpoint whose
  meta records another encoder is refused: a ResNet-34 holds every ResNet-18 weight under the same name and
  shape, so without this check it would transfer a truncated network silently. Every leaf of the requested
  parts must exist in the checkpoint with the same shape; otherwise the error names the checkpoint and the first
  mismatching parameter (orbax alone would silently keep the init values). A damaged checkpoint fails in one
  line naming its step and directory.
  """
  ckdir = find_checkpoint_dir(path)
  mngr = ocp.CheckpointManager(ckdir, options=ocp.CheckpointManagerOptions(read_only=True, create=False),
                               item_handlers={"state": ocp.PyTreeCheckpointHandler()})
  try:
    return _load_pretrained(mngr, ckdir, params, batch_stats, parts, encoder)
  finally:
    mngr.close()


def _load_pretrained(mngr, ckdir, params, batch_stats, parts, encoder):
  step = mngr.latest_step()
  if step is None:
    raise CheckpointError(f"config.init_from: {ckdir} holds no checkpoint")
  where = f"{ckdir}/{step}"
  stored_encoder = ((_read_meta(ckdir, step) or {}).get("model") or {}).get("encoder")
  if encoder is not None and stored_encoder is not None and stored_encoder != encoder:
    raise CheckpointError(f"config.init_from: {where} was pre-trained with model.encoder={stored_encoder!r}, but this "
                          f"model has model.encoder={encoder!r}: fine-tune with model.encoder={stored_encoder!r} or "
                          f"pre-train a {encoder}")
  try:
    stored = _flat(mngr.item_metadata(step)["state"].tree)
  except (KeyError, AttributeError, ValueError, FileNotFoundError) as e:  # not an orbax state checkpoint of ours
    raise CheckpointError(f"config.init_from: {where} is not a usjax checkpoint ({_first_line(e, 120)})") from e
  for p in parts:
    if p not in params:
      raise CheckpointError(f"config.transfer: the model has no {p!r} to load into")
  target = jax.tree.map(lambda x: x, {"params": {p: params[p] for p in parts if p in params},   # own containers
                                      "batch_stats": {p: batch_stats[p] for p in parts if p in batch_stats}})
  wanted = _flat(target)
  stem = "params/encoder/stem/kernel"
  for name, shape in wanted.items():
    if name not in stored:
      raise CheckpointError(f"config.init_from: {where} has no parameter {name} (was it pre-trained with "
                            f"the same model.encoder and, for decoder transfer, model.with_decoder=True?)")
    if stored[name] != shape and not (name == stem and stored[name][:2] + stored[name][3:] == shape[:2] + shape[3:]):
      raise CheckpointError(f"config.init_from: {where}: {name} has shape {stored[name]}, the model "
                            f"expects {shape} (different model.encoder?)")
  ignored = sorted(n for n in stored if n.split("/")[0] in ("params", "batch_stats") and len(n.split("/")) > 2
                   and n.split("/")[1] in parts and n not in wanted)
  # A stem pre-trained on another number of input channels (RGB natural images -> grayscale ultrasound) is
  # restored as stored and converted: summed over its input channels for 1 channel (a gray image seen as
  # R=G=B gives the same response), or its mean repeated for several.
  want = None
  if stem in wanted and stored[stem] != wanted[stem]:
    want = target["params"]["encoder"]["stem"]["kernel"]
    target["params"]["encoder"]["stem"]["kernel"] = np.zeros(stored[stem], np.float32)
  restore_args = ocp.checkpoint_utils.construct_restore_args(target)
  try:
    with _quiet_failed_reads():
      got = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
          item=target, partial_restore=True, restore_args=restore_args)))["state"]
  except Exception as e:   # noqa: BLE001 (orbax and TensorStore raise plain Exception on damaged files)
    older = [s for s in mngr.all_steps() if s != step]
    hint = f"; steps {', '.join(map(str, sorted(older)))} remain: move {where} aside to use step {max(older)}" \
        if older else ""
    raise CheckpointError(f"config.init_from: checkpoint step {step} in {ckdir} cannot be read, damaged? "
                          f"({_first_line(e, 120)}){hint}") from None
  if want is not None:
    k = np.asarray(got["params"]["encoder"]["stem"]["kernel"])
    k = k.sum(2, keepdims=True) if want.shape[2] == 1 else np.repeat(k.mean(2, keepdims=True), want.shape[2], 2)
    got["params"]["encoder"]["stem"]["kernel"] = jax.numpy.asarray(k, want.dtype)
    logging.info("transfer: stem kernel %s converted to %s input channels", stored[stem], want.shape[2])
  params = {**params, **got["params"]}
  batch_stats = {**batch_stats, **got.get("batch_stats", {})}
  init = sorted(k for k in params if k not in parts)
  init_tensors = len(_flat({"params": {k: params[k] for k in init},
                            "batch_stats": {k: v for k, v in batch_stats.items() if k not in parts}}))
  report = {"checkpoint": where, "encoder": stored_encoder, "loaded": sorted(target["params"]), "init": init,
            "loaded_tensors": len(wanted), "init_tensors": init_tensors, "ignored_tensors": len(ignored)}
  logging.info("transfer from %s%s: loaded %s (%d tensors: params and batch statistics); left at init: %s "
               "(%d tensors); ignored: %d tensors of the checkpoint", where,
               f" (model.encoder={stored_encoder})" if stored_encoder else "", ", ".join(report["loaded"]),
               len(wanted), ", ".join(init) or "nothing", init_tensors, len(ignored))
  if ignored:
    logging.warning("transfer: %d tensors of %s's %s have no place in this model and were ignored (first: %s); "
                    "was it pre-trained with another model.encoder or model.norm?", len(ignored), where,
                    "+".join(parts), ignored[0])
  return params, batch_stats, report
