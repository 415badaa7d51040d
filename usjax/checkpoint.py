"""Checkpoint stage: orbax saves of the whole train state, resume, and transfer of pre-trained weights.

A checkpoint directory holds `<step>/state` (params, batch statistics, optimiser state, step, RNG),
`<step>/meta` (JSON: what kind of run wrote it, the model config) and `<step>/data` (the grain iterator
position, one file per process). Saves are asynchronous and atomic (orbax writes to a temporary directory and
renames it), so an interrupted save never replaces the previous good checkpoint.
"""
from __future__ import annotations

import os

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from usjax import UsjaxError


class CheckpointError(UsjaxError):
  """A checkpoint that is missing or does not fit the model: the message names the path."""


def manager(directory: str, keep: int = 3, create: bool = True) -> ocp.CheckpointManager:
  opts = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create, enable_async_checkpointing=True)
  return ocp.CheckpointManager(os.path.abspath(directory), options=opts)


def save(mngr: ocp.CheckpointManager, step: int, state, meta: dict, data_iter=None) -> None:
  items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
  if data_iter is not None:
    items["data"] = grain.checkpoint.CheckpointSave(data_iter)
  mngr.save(step, args=ocp.args.Composite(**items), force=True)


def restore_latest(mngr: ocp.CheckpointManager, abstract_state, data_iter=None):
  """(state, meta) of the latest checkpoint, the iterator moved to its saved position; None if there is none."""
  step = mngr.latest_step()
  if step is None:
    return None
  items = {"state": ocp.args.StandardRestore(abstract_state), "meta": ocp.args.JsonRestore()}
  if data_iter is not None and os.path.isdir(os.path.join(mngr.directory, str(step), "data")):
    items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
  out = mngr.restore(step, args=ocp.args.Composite(**items))
  return out["state"], out["meta"]


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


def load_pretrained(path: str, params: dict, batch_stats: dict, parts: tuple[str, ...]):
  """Copies sub-trees `parts` (e.g. ('encoder',) or ('encoder', 'decoder')) from a pre-training checkpoint.

  Returns new (params, batch_stats) and a report {'loaded': [...], 'init': [...]} of top-level modules.
  Every leaf of the requested parts must exist in the checkpoint with the same shape; otherwise the error
  names the checkpoint and the first mismatching parameter (orbax alone would silently keep the init values).
  """
  ckdir = find_checkpoint_dir(path)
  mngr = ocp.CheckpointManager(ckdir, options=ocp.CheckpointManagerOptions(read_only=True, create=False),
                               item_handlers={"state": ocp.PyTreeCheckpointHandler()})
  step = mngr.latest_step()
  if step is None:
    raise CheckpointError(f"config.init_from: {ckdir} holds no checkpoint")
  try:
    stored = _flat(mngr.item_metadata(step)["state"].tree)
  except (KeyError, AttributeError, ValueError, FileNotFoundError) as e:  # not an orbax state checkpoint of this project
    raise CheckpointError(f"config.init_from: {ckdir}/{step} is not a usjax checkpoint ({type(e).__name__})") from e
  target = jax.tree.map(lambda x: x, {"params": {p: params[p] for p in parts if p in params},   # own containers
                                      "batch_stats": {p: batch_stats[p] for p in parts if p in batch_stats}})
  for p in parts:
    if p not in params:
      raise CheckpointError(f"config.transfer: the model has no {p!r} to load into")
  stem = "params/encoder/stem/kernel"
  for name, shape in _flat(target).items():
    if name not in stored:
      raise CheckpointError(f"config.init_from: {ckdir}/{step} has no parameter {name} (was it pre-trained with "
                            f"the same model.encoder and, for decoder transfer, model.with_decoder=True?)")
    if stored[name] != shape and not (name == stem and stored[name][:2] + stored[name][3:] == shape[:2] + shape[3:]):
      raise CheckpointError(f"config.init_from: {ckdir}/{step}: {name} has shape {stored[name]}, the model "
                            f"expects {shape} (different model.encoder?)")
  # A stem pre-trained on another number of input channels (RGB natural images -> grayscale ultrasound) is
  # restored as stored and converted: summed over its input channels for 1 channel (a gray image seen as
  # R=G=B gives the same response), or its mean repeated for several.
  want = None
  if stem in _flat(target) and stored[stem] != _flat(target)[stem]:
    want = target["params"]["encoder"]["stem"]["kernel"]
    target["params"]["encoder"]["stem"]["kernel"] = np.zeros(stored[stem], np.float32)
  restore_args = ocp.checkpoint_utils.construct_restore_args(target)
  got = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
      item=target, partial_restore=True, restore_args=restore_args)))["state"]
  mngr.close()
  if want is not None:
    k = np.asarray(got["params"]["encoder"]["stem"]["kernel"])
    k = k.sum(2, keepdims=True) if want.shape[2] == 1 else np.repeat(k.mean(2, keepdims=True), want.shape[2], 2)
    got["params"]["encoder"]["stem"]["kernel"] = jax.numpy.asarray(k, want.dtype)
    logging.info("transfer: stem kernel %s converted to %s input channels", stored[stem], want.shape[2])
  params = {**params, **got["params"]}
  batch_stats = {**batch_stats, **got.get("batch_stats", {})}
  report = {"checkpoint": f"{ckdir}/{step}", "loaded": sorted(target["params"]),
            "init": sorted(k for k in params if k not in parts)}
  logging.info("transfer from %s: loaded %s (params and batch statistics); left at init: %s",
               report["checkpoint"], ", ".join(report["loaded"]), ", ".join(report["init"]))
  return params, batch_stats, report

