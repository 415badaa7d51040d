"""Pre-training stage: a contrastive or self-distillation method (`usjax.methods`) on unlabelled ultrasound images,
with the frozen-feature probes and the collapse monitor as it runs.

Two augmented views of each uint8 image are made on the device inside the step (`usjax.augment`); the step and
the loop (checkpoints, resume, the divergence guard) are `usjax.train`'s.
"""
from __future__ import annotations

import functools
import math

import jax
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec as P

from usjax import augment, methods, models, probe_data, probes, train
from usjax.data import pipeline, sources


def pretrain_loss(params, batch_stats, extra, images, key, step, *, method, aug_cfg):
  """Two augmented views of each uint8 image, made on device, then the method's objective."""
  v1, v2 = augment.two_views(key, train.to_float(images), aug_cfg)
  return method.loss(params, batch_stats, extra, v1, v2, step)


class Probes:
  """What pre-training has learned, while it runs: the frozen-feature k-NN and linear probes
  (`usjax.probes`) every `config.probe.every` steps and at the end, on the labelled sets among
  `config.probe.sources` whose folders are given; and the collapse monitor on every logged step's embedding
  statistics (a per-dimension std of the normalised projections below COLLAPSE_FRACTION / sqrt(D))."""
  def __init__(self, cfg):
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
  mesh = train.make_mesh()
  method, tx = methods.make_method(cfg), train.make_optimizer(cfg, cfg.num_steps)
  aug_cfg = augment.AugmentConfig.from_dict(cfg.augment)
  s = cfg.data.image_size
  state = train.init_state(method.model, tx, cfg.seed, (2, s, s, cfg.data.channels), mesh)
  extra = jax.jit(method.init_extra, out_shardings=NamedSharding(mesh, P()))(state["params"], state["batch_stats"])
  if extra:
    state["extra"] = extra
  logging.info("pre-training %s (%s, %.2fM parameters) with %s on %s", cfg.model.encoder,
               "encoder+decoder" if cfg.model.with_decoder else "encoder",
               models.count_params(state["params"]) / 1e6, cfg.method, cfg.data.pretrain_sources)
  data_iter = iter(pipeline.pretrain_dataset(cfg.data, cfg.batch_size, cfg.seed))
  loss_fn = functools.partial(pretrain_loss, method=method, aug_cfg=aug_cfg)
  step_fn = train.compile_step(loss_fn, tx, mesh, method.after_step)
  meta = {
      "task": "pretrain", "method": cfg.method, "model": cfg.model.to_dict(), "sources": cfg.data.pretrain_sources,
      "data": train.data_meta(cfg)
  }
  hook = Probes(cfg)
  state, rep, summary = train.fit(cfg, workdir, "pretrain", state, step_fn, data_iter,
                                  lambda b: train.global_batch(b["image"], mesh), mesh, meta, hook)
  summary.update(method=cfg.method, sources=cfg.data.pretrain_sources,
                 first_loss=rep.history[0]["loss"] if rep.history else None, probe_history=hook.history,
                 collapsed=hook.collapsed_at is not None, collapsed_at_step=hook.collapsed_at, z_std_ideal=hook.z_ideal)
  if hook.history:
    summary["probe"] = {k: v for k, v in hook.history[-1].items() if k != "step"}
  if rep.history and "z_std" in rep.history[-1]:
    summary.update({k: rep.history[-1][k] for k in ("z_std", "align", "uniform") if k in rep.history[-1]})
  rep.close(workdir, summary)
  return summary
