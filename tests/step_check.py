"""Runs one real train step (SimCLR pre-training and U-Net fine-tuning) on a fixed global batch and saves the
loss and updated parameters: run under different device/process layouts, the results must agree.

    PYTHONPATH=. python tests/step_check.py OUT.npz     (env: XLA_FLAGS for fake devices, JAX_COORDINATOR_ADDRESS
                                                          etc.; run from the repository root)
"""
import functools
import sys

import jax
import numpy as np

from configs import finetune_busi, pretrain_multiorgan
from usjax import augment, finetune, methods, pretrain, runtime, train


def one_step(task: str):
  cfg = (pretrain_multiorgan if task == "pretrain" else finetune_busi).get_config()
  cfg.model.proj_dims = (32, 16)
  cfg.optim.warmup_steps = 0
  cfg.optim.name, cfg.optim.learning_rate = "sgd", 0.1  # updates linear in the gradients: tight tolerances
  mesh = train.make_mesh()
  method = methods.make_method(cfg) if task == "pretrain" else None
  model, tx = method.model if method else train.build_model(cfg), train.make_optimizer(cfg, 10)
  state = train.init_state(model, tx, 0, (2, 32, 32, 1), mesh)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (8, 32, 32, 1), dtype=np.uint8)
  masks = (rng.random((8, 32, 32, 1)) > 0.7).astype(np.uint8)
  n, pi = 8 // jax.process_count(), jax.process_index()
  local = slice(pi * n, (pi + 1) * n)
  aug = augment.AugmentConfig.from_dict(cfg.augment)
  if task == "pretrain":
    step = train.compile_step(functools.partial(pretrain.pretrain_loss, method=method, aug_cfg=aug), tx, mesh)
    batch = train.global_batch(images[local], mesh)
  else:
    step = train.compile_step(functools.partial(finetune.segmentation_loss, model=model, aug_cfg=aug), tx, mesh)
    batch = train.global_batch((images[local], masks[local]), mesh)
  state, metrics = step(state, batch)
  local_copy = lambda x: np.asarray(x.addressable_data(0))  # replicated: every process holds all of it
  params = jax.tree.map(local_copy, state["params"])
  flat = {
      f"{task}/" + "/".join(str(getattr(k, "key", k)) for k in p): np.asarray(v) for p, v in
      jax.tree_util.tree_leaves_with_path(params)
  }
  return {f"{task}/loss": local_copy(metrics["loss"]), **flat}


if __name__ == "__main__":
  runtime.maybe_initialize_distributed()
  out = {**one_step("pretrain"), **one_step("finetune"), "devices": np.asarray(jax.device_count())}
  if jax.process_index() == 0:
    np.savez(sys.argv[1], **out)
