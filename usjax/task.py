"""A run of one task, either stage: the config checked before any data is prepared, the workdir locked, and a
workdir this run created removed again when it fails on bad input before saving anything.

This sits above both stages (`usjax.pretrain`, `usjax.finetune`), which sit above the shared step and loop
(`usjax.train`); the entry points (`launch/main.py`, the grid) call `run`.
"""
from __future__ import annotations

import functools
import os
import shutil

import jax

from usjax import UsjaxError, checkpoint, finetune, methods, postprocess, pretrain, runtime
from usjax.data import sources

TASKS = {"pretrain": pretrain.pretrain, "finetune": finetune.finetune}


def check_config(cfg) -> None:
  """The values a run would otherwise reject only after preparing its data (minutes on real data): one line each."""
  choices = {
      "task": tuple(TASKS), "optim.name": ("adamw", "lars", "sgd"), "data.aspect": ("pad", "stretch", "crop"),
      "model.norm": ("batch", "group")
  }
  if cfg.task == "finetune":
    choices.update({
        "eval_split": ("val", "test"), "tta": ("auto", "none", "hflip"), "transfer": ("encoder", "encoder+decoder"),
        "data.label_fraction": (100, 50, 25, 10), "postprocess": ("auto", "none")
    })
    if not cfg.presence.weight >= 0:
      raise UsjaxError(f"config.presence.weight must be >= 0, got {cfg.presence.weight!r}")
    if not 0 <= cfg.presence.lesion_budget <= 1:
      raise UsjaxError(f"config.presence.lesion_budget must be in [0, 1], got {cfg.presence.lesion_budget!r}")
    choices["presence.gate"] = postprocess.GATES
    choices["presence.gate_on"] = postprocess.GATE_SOURCES
  for key, allowed in choices.items():
    value = functools.reduce(getattr, key.split("."), cfg)
    if value not in allowed:
      raise UsjaxError(f"config.{key} must be one of {', '.join(map(repr, allowed))}, got {value!r}")
  if cfg.task == "pretrain":
    methods.check_config(cfg)  # the name and the method's own section
  sources.check_config(cfg)
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
  if cfg.task not in TASKS:
    raise UsjaxError(f"config.task must be 'pretrain' or 'finetune', got {cfg.task!r}")
  check_config(cfg)
  runtime.maybe_initialize_distributed()
  existed = runtime.check_workdir(workdir)
  workdir = os.path.abspath(os.path.expanduser(workdir))
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
  lock = runtime.lock_workdir(workdir)  # one run per workdir: two would rotate each other's checkpoints
  try:
    return TASKS[cfg.task](cfg, workdir)
  except UsjaxError:
    saved = checkpoint.holds_steps(os.path.join(workdir, "checkpoints"))
    if not existed and not saved and jax.process_index() == 0:
      lock()
      shutil.rmtree(workdir, ignore_errors=True)
    raise
  finally:
    lock()
