"""Checkpoint stage: orbax saves of the whole train state, resume, and transfer of pre-trained weights.

A checkpoint directory holds `<step>/state` (params, batch statistics, optimiser state, step, RNG),
`<step>/meta` (JSON: what kind of run wrote it, the model config) and `<step>/data` (the grain iterator
position, one file per process). Saves are asynchronous and atomic (orbax writes to a temporary directory and
renames it), so an interrupted save never replaces the previous good checkpoint; a save that cannot be written (a
full disk) fails in one line and leaves no temporary folder. A checkpoint damaged later (a truncated file) is
moved aside to `unreadable-<step>` on resume, which falls back to the next older one; a resume whose config
changes the shapes of the run (batch, images, model) is refused unless `config.resume_anyway`.

Rotation keeps the newest `keep` checkpoints and, besides them, the ones the divergence guard pins (`guard`:
the last checkpoint before a loss spike survives however long the run goes on after it). `locate` is the one
answer to "which checkpoint of this workdir": transfer (`load_pretrained`), the probes and prediction ask it.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import weakref
from collections.abc import Sequence

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from usjax import UsjaxError, guard, orbax_errors, storage


class CheckpointError(UsjaxError):
  """A checkpoint that is missing or does not fit the model: the message names the path."""


# ---------------------------------------------------------------------------------------------------- rotation


def manager(directory: str, keep: int = 3, create: bool = True) -> ocp.CheckpointManager:
  """Async checkpoint manager that keeps the newest `keep` steps and the steps the divergence guard pins."""
  directory = os.path.abspath(directory)
  pin = guard.read_pin(directory)
  policy = ocp.checkpoint_managers.AnyPreservationPolicy([ocp.checkpoint_managers.LatestN(keep), pin])
  opts = ocp.CheckpointManagerOptions(preservation_policy=policy, create=create, enable_async_checkpointing=True)
  mngr = ocp.CheckpointManager(directory, options=opts)
  guard.attach(mngr, pin)
  guard.unpin_missing(mngr)  # a pin left on a save that never completed (a run killed during it)
  return mngr


# ---------------------------------------------------------------------------------------------------- save
_IN_FLIGHT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # manager -> (step, bytes) of its async save
_TEMPORARY = re.compile(r"^\d+\.orbax-checkpoint-tmp")  # orbax writes a step here, then renames it


def save(mngr: ocp.CheckpointManager, step: int, state, meta: dict, data_iter=None) -> None:
  """Starts an asynchronous save of `step`, once the previous one has finished (`finish`).

  The free space is checked first against the size of `state`, so a disk already too full fails before anything
  is written; a write that fails later (the disk filled meanwhile) fails at the next `save` or `finish`. Either
  way in one line naming the directory and the bytes a checkpoint needs (CheckpointError), with orbax's temporary
  folders removed and the guard's pin moved off the missing step.
  """
  finish(mngr)
  need, free = storage.tree_bytes(state), storage.free_bytes(mngr.directory)
  if not _everywhere(free is None or free >= need):  # every process refuses, or none: they save together
    guard.unpin_missing(mngr)
    raise CheckpointError(storage.no_space(f"checkpoint step {step}", mngr.directory, need, free))
  items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
  if data_iter is not None:
    items["data"] = grain.checkpoint.CheckpointSave(data_iter)
  _IN_FLIGHT[mngr] = (step, need)
  try:
    with orbax_errors.quiet_failures():
      mngr.save(step, args=ocp.args.Composite(**items), force=True)
  except Exception as e:  # noqa: BLE001 (orbax and TensorStore raise plain Exception)
    _save_failed(mngr, e)


def finish(mngr: ocp.CheckpointManager) -> None:
  """Waits for the save in flight; if it failed, CheckpointError in one line (see `save`)."""
  try:
    with orbax_errors.quiet_failures():
      mngr.wait_until_finished()
  except Exception as e:  # noqa: BLE001
    _save_failed(mngr, e)
  _IN_FLIGHT.pop(mngr, None)


def remove_temporary(directory: str) -> list[str]:
  """Removes the temporary folders of saves that never completed from a checkpoint directory (process 0)."""
  if jax.process_index() != 0 or not os.path.isdir(directory):
    return []
  gone = [os.path.join(directory, n) for n in os.listdir(directory) if _TEMPORARY.match(n)]
  for path in gone:
    shutil.rmtree(path, ignore_errors=True)
  return gone


def _save_failed(mngr: ocp.CheckpointManager, e: Exception):
  step, need = _IN_FLIGHT.pop(mngr, (None, 0))
  remove_temporary(mngr.directory)
  mngr.reload()
  guard.unpin_missing(mngr)
  what = "a checkpoint" if step is None else f"checkpoint step {step}"
  if storage.is_no_space(e):
    raise CheckpointError(storage.no_space(what, mngr.directory, need, storage.free_bytes(mngr.directory))) from None
  raise CheckpointError(f"{what} could not be written to {mngr.directory} ({orbax_errors.first_line(e)}); its "
                        f"temporary files were removed") from None


# ---------------------------------------------------------------------------------------------------- resume
# What fixes the shapes of a run's state and batches: a checkpoint of other values is another run. The model
# keys that change numerics only (dtype, convolution lowering) are left out.
_NUMERICS_ONLY = ("dtype", "conv_impl")


def _shape_config(meta: dict) -> dict:
  data, model = meta.get("data") or {}, meta.get("model") or {}
  out = {
      "batch_size": meta.get("batch_size"), "method": meta.get("method"), "data.image_size": data.get("image_size"),
      "data.channels": data.get("channels"), **{f"model.{k}": v for k, v in model.items() if k not in _NUMERICS_ONLY}
  }
  return {k: json.loads(json.dumps(v)) for k, v in out.items() if v is not None}  # tuples read back as lists


def resume_conflicts(saved: dict, meta: dict) -> list[tuple[str, object, object]]:
  """(key, checkpoint's value, this run's value) for each shape-relevant value that differs; keys that one side
  does not record (checkpoints of older versions) are not compared."""
  a, b = _shape_config(saved), _shape_config(meta)
  return [(k, a[k], b[k]) for k in sorted(a.keys() & b.keys()) if a[k] != b[k]]


def check_resume(mngr: ocp.CheckpointManager, meta: dict, anyway: bool = False) -> None:
  """Refuses, in one line naming both values, to resume from a checkpoint written with other shape-relevant
  values than `meta`'s (`resume_conflicts`); with `anyway` it warns and goes on."""
  step = mngr.latest_step()
  if step is None:
    return
  try:
    saved = _read_meta(mngr.directory, step) or {}
  except CheckpointError:  # damaged: restore_latest says so, and falls back to an older step
    return
  conflicts = resume_conflicts(saved, meta)
  if not conflicts:
    return
  diff = ", ".join(f"{k}={old} (this config: {new})" for k, old, new in conflicts)
  where = os.path.join(mngr.directory, str(step))
  if anyway:
    logging.warning("resuming %s, written with %s, as config.resume_anyway asks", where, diff)
    return
  raise CheckpointError(f"{where} was written with {diff}: resuming would silently continue another run; use a new "
                        f"--workdir, or set --config.resume_anyway=True to go on with this config")


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
      with orbax_errors.quiet_failures():
        out = _restore(mngr, step, abstract_state, data_iter)
      error = None
    except Exception as e:  # noqa: BLE001 (orbax and TensorStore raise plain Exception on damaged files)
      error = orbax_errors.first_line(e)
    if not _everywhere(error is None):  # all processes resume from the same step, or none does
      failed.append((step, error or "unreadable on another process"))
      logging.warning("checkpoint step %d in %s cannot be read (%s); %s", step, path, failed[-1][1],
                      "trying the next older one" if step != steps[-1] else "no older one left")
      continue
    if failed:
      moved = _move_aside(mngr, [s for s, _ in failed])
      logging.warning("resuming from step %d instead of step %s: moved the unreadable checkpoint(s) aside to %s", step,
                      ", ".join(str(s) for s, _ in failed), ", ".join(moved) or "(process 0 moves them)")
    return out
  if not failed:
    return None
  raise CheckpointError(f"no readable checkpoint in {mngr.directory} (steps {', '.join(str(s) for s, _ in failed)}); "
                        f"step {failed[0][0]}: {failed[0][1]}. A changed model config, or damaged files? A new "
                        f"--workdir starts afresh")


# ---------------------------------------------------------------------------------------------------- look-up
def holds_steps(directory: str) -> bool:
  """Whether `directory` (a checkpoint manager's folder) holds a saved step: a run there can resume."""
  return os.path.isdir(directory) and any(n.isdigit() for n in os.listdir(directory))


def locate(path, step: int | None = None, prefer: Sequence[str] = ("checkpoints",),
           kind: str = "a pre-training or fine-tuning workdir") -> tuple[str, int]:
  """(checkpoint directory, step) that `path`, a workdir or a checkpoint directory, points to.

  The directory is the first of `prefer` under `path` that holds a step, else `path` itself: ("best",
  "checkpoints") reads the model a fine-tuning run chose on validation, or its latest save where there is none
  (runs from before model selection). The step is `step`, or the latest when None. Where there is no such
  directory or step, CheckpointError says so in one line naming `path` (and that `kind` was expected).
  """
  root = os.path.abspath(os.path.expanduser(os.fspath(path)))
  if not os.path.isdir(root):
    raise CheckpointError(f"{path}: workdir not found")
  ckdir = next((os.path.join(root, sub) for sub in prefer if holds_steps(os.path.join(root, sub))), root)
  mngr = ocp.CheckpointManager(ckdir, options=ocp.CheckpointManagerOptions(read_only=True, create=False))
  steps = sorted(mngr.all_steps())
  mngr.close()
  if not steps:
    raise CheckpointError(f"{path}: no checkpoint (expected {kind} with checkpoints/<step>/)")
  if step is not None and step not in steps:
    raise CheckpointError(f"{path}: no checkpoint of step {step} (has {', '.join(map(str, steps))})")
  return ckdir, int(steps[-1] if step is None else step)


# ---------------------------------------------------------------------------------------------------- transfer
def _flat(tree) -> dict[str, tuple]:
  return {
      "/".join(str(getattr(k, "key", k)) for k in path): tuple(getattr(v, "shape", (
      ))) for path, v in jax.tree_util.tree_leaves_with_path(tree)
  }


def _read_meta(ckdir: str, step: int) -> dict | None:
  """The `meta` item of a step; None if it has none (a checkpoint written by other code)."""
  path = os.path.join(ckdir, str(step), "meta")
  if not os.path.isdir(path):
    return None
  try:
    meta = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(path)
  except Exception as e:  # noqa: BLE001 (a damaged file: orbax's error types vary)
    raise CheckpointError(f"config.init_from: {path} cannot be read ({orbax_errors.first_line(e)})") from None
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
  try:
    ckdir, step = locate(path, kind="a pre-training workdir")
  except CheckpointError as e:
    raise CheckpointError(f"config.init_from: {e}") from None
  mngr = ocp.CheckpointManager(ckdir, options=ocp.CheckpointManagerOptions(read_only=True, create=False),
                               item_handlers={"state": ocp.PyTreeCheckpointHandler()})
  try:
    return _load_pretrained(mngr, ckdir, step, params, batch_stats, parts, encoder)
  finally:
    mngr.close()


def _load_pretrained(mngr, ckdir, step, params, batch_stats, parts, encoder):
  where = f"{ckdir}/{step}"
  stored_encoder = ((_read_meta(ckdir, step) or {}).get("model") or {}).get("encoder")
  if encoder is not None and stored_encoder is not None and stored_encoder != encoder:
    raise CheckpointError(f"config.init_from: {where} was pre-trained with model.encoder={stored_encoder!r}, but this "
                          f"model has model.encoder={encoder!r}: fine-tune with model.encoder={stored_encoder!r} or "
                          f"pre-train a {encoder}")
  try:
    stored = _flat(mngr.item_metadata(step)["state"].tree)
  except (KeyError, AttributeError, ValueError, FileNotFoundError) as e:  # not an orbax state checkpoint of ours
    raise CheckpointError(f"config.init_from: {where} is not a usjax checkpoint "
                          f"({orbax_errors.first_line(e, 120)})") from e
  for p in parts:
    if p not in params:
      raise CheckpointError(f"config.transfer: the model has no {p!r} to load into")
  target = jax.tree.map(
      lambda x: x,
      {
          "params": {p: params[p] for p in parts if p in params},  # own containers
          "batch_stats": {p: batch_stats[p] for p in parts if p in batch_stats}
      })
  wanted = _flat(target)
  stem = "params/encoder/stem/kernel"
  for name, shape in wanted.items():
    if name not in stored:
      raise CheckpointError(f"config.init_from: {where} has no parameter {name} (was it pre-trained with "
                            f"the same model.encoder and, for decoder transfer, model.with_decoder=True?)")
    if stored[name] != shape and not (name == stem and stored[name][:2] + stored[name][3:] == shape[:2] + shape[3:]):
      raise CheckpointError(f"config.init_from: {where}: {name} has shape {stored[name]}, the model "
                            f"expects {shape} (different model.encoder?)")
  ignored = sorted(n for n in stored if n.split("/")[0] in (
      "params", "batch_stats") and len(n.split("/")) > 2 and n.split("/")[1] in parts and n not in wanted)
  # A stem pre-trained on another number of input channels (RGB natural images -> grayscale ultrasound) is
  # restored as stored and converted: summed over its input channels for 1 channel (a gray image seen as
  # R=G=B gives the same response), or its mean repeated for several.
  want = None
  if stem in wanted and stored[stem] != wanted[stem]:
    want = target["params"]["encoder"]["stem"]["kernel"]
    target["params"]["encoder"]["stem"]["kernel"] = np.zeros(stored[stem], np.float32)
  restore_args = ocp.checkpoint_utils.construct_restore_args(target)
  try:
    with orbax_errors.quiet_failures():
      got = mngr.restore(
          step, args=ocp.args.Composite(
              state=ocp.args.PyTreeRestore(item=target, partial_restore=True, restore_args=restore_args)))["state"]
  except Exception as e:  # noqa: BLE001 (orbax and TensorStore raise plain Exception on damaged files)
    older = [s for s in mngr.all_steps() if s != step]
    hint = f"; steps {', '.join(map(str, sorted(older)))} remain: move {where} aside to use step {max(older)}" \
        if older else ""
    raise CheckpointError(f"config.init_from: checkpoint step {step} in {ckdir} cannot be read, damaged? "
                          f"({orbax_errors.first_line(e, 120)}){hint}") from None
  if want is not None:
    k = np.asarray(got["params"]["encoder"]["stem"]["kernel"])
    k = k.sum(2, keepdims=True) if want.shape[2] == 1 else np.repeat(k.mean(2, keepdims=True), want.shape[2], 2)
    got["params"]["encoder"]["stem"]["kernel"] = jax.numpy.asarray(k, want.dtype)
    logging.info("transfer: stem kernel %s converted to %s input channels", stored[stem], want.shape[2])
  params = {**params, **got["params"]}
  batch_stats = {**batch_stats, **got.get("batch_stats", {})}
  init = sorted(k for k in params if k not in parts)
  init_tensors = len(
      _flat({
          "params": {k: params[k] for k in init},
          "batch_stats": {k: v for k, v in batch_stats.items() if k not in parts}
      }))
  report = {
      "checkpoint": where, "encoder": stored_encoder, "loaded": sorted(target["params"]), "init": init,
      "loaded_tensors": len(wanted), "init_tensors": init_tensors, "ignored_tensors": len(ignored)
  }
  logging.info(
      "transfer from %s%s: loaded %s (%d tensors: params and batch statistics); left at init: %s "
      "(%d tensors); ignored: %d tensors of the checkpoint", where,
      f" (model.encoder={stored_encoder})" if stored_encoder else "", ", ".join(report["loaded"]), len(wanted),
      ", ".join(init) or "nothing", init_tensors, len(ignored))
  if ignored:
    logging.warning(
        "transfer: %d tensors of %s's %s have no place in this model and were ignored (first: %s); "
        "was it pre-trained with another model.encoder or model.norm?", len(ignored), where, "+".join(parts),
        ignored[0])
  return params, batch_stats, report


def restore_on_one_device(step_dir: str, shapes) -> dict:
  """The parts of `<step_dir>/state` named by `shapes` (a pytree of arrays or ShapeDtypeStructs, e.g. params and
  batch_stats of a model), restored onto the first device: inference and probes need no optimiser state or mesh."""
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), shapes)
  restore = ocp.args.PyTreeRestore(item=target, partial_restore=True,
                                   restore_args=ocp.checkpoint_utils.construct_restore_args(target))
  return ocp.Checkpointer(ocp.PyTreeCheckpointHandler()).restore(os.path.join(step_dir, "state"), args=restore)
