"""Contrastive methods: SimCLR, MoCo v2, SimSiam and BYOL, registered by name behind one interface of pure functions.

Each method is a `Method` subclass registered in METHODS under the name `config.method` selects; it holds a
`PretrainNet` configured for it and its own hyper-parameters, read from its own config section
(`config.<name>`, defaults in configs/default.py) by its `from_config` and checked by its `check`. The train
step owns the optimiser; a method adds only an `extra` pytree to the train state (EMA target weights and
BatchNorm statistics, MoCo's queue) and two pure functions: `loss` (differentiable in `params`, returns the new
`extra` its forward pass produced) and `after_step` (the EMA update of the target once the optimiser has moved
`params`). A new method is one class here with its `@register` line, and its config section (README: Extending
usjax).

Every forward pass runs over both views at once, inside the jitted step over the global batch, so BatchNorm
statistics are global (SyncBN) and a view never normalises with a subset that holds only its own pair.
"""
from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from usjax import UsjaxError, models, objectives, probes

METHODS: dict[str, type[Method]] = {}  # config.method -> its class, filled by @register below


def register(name: str):
  """Class decorator: registers a `Method` subclass as `config.method=name`; its config section is `config.<name>`."""
  def add(cls):
    METHODS[name] = cls
    return cls

  return add


# ---------------------------------------------------------------------------------------------------- helpers
def ema(target, online, momentum):
  """Exponential moving average: momentum * target + (1 - momentum) * online, leaf by leaf."""
  return jax.tree.map(lambda t, o: (momentum * t + (1.0 - momentum) * o).astype(t.dtype), target, online)


def byol_momentum(step, num_steps: int, base: float):
  """BYOL's target momentum: base at step 0, rising along a half cosine to 1 at `num_steps`."""
  frac = jnp.clip(jnp.asarray(step, jnp.float32) / max(num_steps, 1), 0.0, 1.0)
  return 1.0 - (1.0 - base) * (jnp.cos(math.pi * frac) + 1.0) / 2.0


def _without_predictor(tree):
  """The target network's share of a variable tree: encoder (+ decoder) and projector, copied (the train step
  donates its state, and a target that aliased the online buffers would be donated twice)."""
  return {k: jax.tree.map(jnp.array, v) for k, v in tree.items() if k != "predictor"}


def init_target(params, batch_stats) -> dict:
  """The EMA target's extra state (MoCo, BYOL): the online weights and BatchNorm statistics, without predictor."""
  return {"target_params": _without_predictor(params), "target_batch_stats": _without_predictor(batch_stats)}


def update_target(extra, params, momentum) -> dict:
  """Moves the target towards the updated online `params` by `momentum` (`ema`)."""
  online = {k: params[k] for k in extra["target_params"]}
  return {**extra, "target_params": ema(extra["target_params"], online, momentum)}


def collapse_metrics(z, n: int) -> dict:
  """The collapse monitor on the projections z [2N, D] of two views (rows [0, N) and [N, 2N)): per-dimension std of
  the l2-normalised embeddings (about 1/sqrt(D) healthy, towards 0 collapsed; SimSiam), and the alignment of
  positive pairs and uniformity over the batch (Wang & Isola 2020)."""
  z = z.astype(jnp.float32)
  return {
      "z_std": probes.embedding_stats(z[:n])["z_std"], "align": probes.alignment(z[:n], z[n:]),
      "uniform": probes.uniformity(z[:n])
  }


def _queue_accuracy(q, k, queue):
  """Fraction of queries whose own key beats every queued negative."""
  q, k = objectives.l2_normalize(q), objectives.l2_normalize(k)
  return jnp.mean(jnp.sum(q * k, axis=-1) > jnp.max(q @ queue.T, axis=-1))


# ---------------------------------------------------------------------------------------------------- method
@dataclasses.dataclass(frozen=True)
class Method:
  """What every method has: its network, the schedule length and a seed. A subclass adds its hyper-parameters as
  fields, reads them from its config section in `from_config`, checks them in `check` and defines `loss`; one
  with extra train state (an EMA target, a queue) overrides `init_extra` and `after_step`."""
  name: str
  model: nn.Module
  num_steps: int = 1  # schedule length
  seed: int = 0  # initial MoCo queue and key-batch shuffles
  has_target: ClassVar[bool] = False  # keeps an EMA target network in `extra`

  @classmethod
  def check(cls, cfg) -> None:
    """Fails in one line on a bad value in the method's config section, before anything is built or prepared."""

  @classmethod
  def from_config(cls, cfg, net, **common) -> Method:
    """The method of `cfg`; `net(pred_dims)` builds the PretrainNet, `common` holds name, num_steps and seed."""
    raise NotImplementedError

  @property
  def target_model(self) -> nn.Module:
    """The EMA network: the same PretrainNet without the predictor (whose target output nothing uses)."""
    return self.model.clone(pred_dims=())

  def init_extra(self, params, batch_stats) -> dict:
    """Extra train state next to params and batch_stats: none by default."""
    return {}

  def loss(self, params, batch_stats, extra, v1, v2, step):
    """(loss, (new_batch_stats, new_extra, metrics)) for views v1, v2 [N, H, W, C] of the same N images."""
    raise NotImplementedError

  def after_step(self, extra, params, step) -> dict:
    """Runs once the optimiser has moved `params`; `step` is the index of the step just applied."""
    return extra


def _online(m: Method, params, batch_stats, v1, v2):
  """One online forward pass over both views: (z, p, new_batch_stats), rows [0, N) from v1, [N, 2N) from v2."""
  (z, p), new = m.model.apply({"params": params, "batch_stats": batch_stats}, jnp.concatenate([v1, v2]), train=True,
                              mutable=["batch_stats"])
  return z, p, new["batch_stats"]


def _target(m: Method, extra, x):
  """Target forward pass in train mode (its BatchNorm uses and updates its own statistics); no gradient."""
  (z, _), new = m.target_model.apply({"params": extra["target_params"], "batch_stats": extra["target_batch_stats"]}, x,
                                     train=True, mutable=["batch_stats"])
  return jax.lax.stop_gradient(z), new["batch_stats"]


def _pred_dims(cfg, section: str) -> tuple[int, ...]:
  dims = tuple(cfg[section].pred_dims)
  if not dims or dims[-1] != cfg.model.proj_dims[-1]:
    raise UsjaxError(f"config.{section}.pred_dims must end with the projection size "
                     f"config.model.proj_dims[-1] = {cfg.model.proj_dims[-1]}, got {dims}")
  return dims


# ---------------------------------------------------------------------------------------------------- methods
@register("simclr")
@dataclasses.dataclass(frozen=True)
class SimCLR(Method):
  """SimCLR (Chen et al. 2020). config.simclr: temperature."""
  temperature: float = 0.5

  @classmethod
  def from_config(cls, cfg, net, **common) -> SimCLR:
    return cls(model=net(()), temperature=cfg.simclr.temperature, **common)

  def loss(self, params, batch_stats, extra, v1, v2, step):
    """NT-Xent over the 2N views; every other view in the global batch is a negative."""
    z, _, new_bs = _online(self, params, batch_stats, v1, v2)
    n = v1.shape[0]
    loss = objectives.nt_xent(z[:n], z[n:], self.temperature)
    return loss, (new_bs, extra,
                  {"contrast_acc": objectives.contrastive_accuracy(z[:n], z[n:]), **collapse_metrics(z, n)})


@register("moco")
@dataclasses.dataclass(frozen=True)
class MoCo(Method):
  """MoCo v2 (Chen et al. 2020) with an EMA key encoder and a queue of negatives. config.moco: temperature,
  queue_size, momentum (the key encoder's EMA; the base of the cosine if scheduled), momentum_schedule."""
  temperature: float = 0.2
  queue_size: int = 0  # K negatives
  momentum: float = 0.99
  momentum_schedule: str = "constant"  # 'constant' | 'cosine' (byol_momentum)
  has_target = True

  @classmethod
  def check(cls, cfg) -> None:
    k, keys = cfg.moco.queue_size, 2 * cfg.batch_size
    if k <= 0 or k % keys:
      raise UsjaxError(f"config.moco.queue_size must be a positive multiple of 2 x config.batch_size ({keys}: "
                       f"both views' keys are enqueued each step), got {k}")
    if cfg.moco.momentum_schedule not in ("constant", "cosine"):
      raise UsjaxError(f"config.moco.momentum_schedule must be 'constant' or 'cosine', "
                       f"got {cfg.moco.momentum_schedule!r}")

  @classmethod
  def from_config(cls, cfg, net, **common) -> MoCo:
    return cls(model=net(()), temperature=cfg.moco.temperature, queue_size=cfg.moco.queue_size,
               momentum=cfg.moco.momentum, momentum_schedule=cfg.moco.momentum_schedule, **common)

  def momentum_at(self, step):
    if self.momentum_schedule == "cosine":
      return byol_momentum(step, self.num_steps, self.momentum)
    return jnp.asarray(self.momentum, jnp.float32)

  def init_extra(self, params, batch_stats) -> dict:
    """The EMA key encoder, and the queue of K unit-norm negatives with its write pointer."""
    queue = jax.random.normal(jax.random.key(self.seed), (self.queue_size, self.model.proj_dims[-1]))
    return {**init_target(params, batch_stats), "queue": objectives.l2_normalize(queue),
            "queue_ptr": jnp.zeros((), jnp.int32)}

  def loss(self, params, batch_stats, extra, v1, v2, step):
    """Symmetrised: q(v1) against k(v2) and q(v2) against k(v1), each with the queue as negatives; the loss is the
    mean of the two directions (the scale of the one-directional MoCo v2 loss, log(K + 1) at chance). The 2N new
    keys are then enqueued first-in first-out.

    BatchNorm leak: MoCo v1 shuffles the key batch across GPUs because per-GPU BatchNorm lets a query find its
    positive key through shared sub-batch statistics. Here the step runs over the global batch, so every
    BatchNorm (online and key encoder) normalises with whole-batch statistics (SyncBN, MoCo v3's remedy) and
    no sub-batch pairs a query with its key. The key batch is still permuted before the key forward pass and
    un-permuted after it ("shuffling BN"): under global BatchNorm this changes nothing (normalisation is
    permutation-equivariant over the batch), it keeps parity should normalisation ever become per-device, and
    costs one gather. Neither removes what every BatchNorm key encoder shares: all current keys are normalised
    with this batch's statistics and the queued ones with older batches'. `model.norm='group'` has no batch
    communication at all.
    """
    n, k_size = v1.shape[0], extra["queue"].shape[0]
    if k_size % (2 * n):
      raise UsjaxError(f"config.moco.queue_size ({k_size}) must be a multiple of 2 x the global batch ({2 * n})")
    q, _, new_bs = _online(self, params, batch_stats, v1, v2)
    x = jnp.concatenate([v1, v2])
    perm = jax.random.permutation(jax.random.fold_in(jax.random.key(self.seed), step), 2 * n)
    k_perm, target_bs = _target(self, extra, x[perm])
    k = objectives.l2_normalize(k_perm[jnp.argsort(perm)])
    queue, ptr = extra["queue"], extra["queue_ptr"]
    loss = 0.5 * (objectives.info_nce(q[:n], k[n:], queue, self.temperature) +
                  objectives.info_nce(q[n:], k[:n], queue, self.temperature))
    acc = 0.5 * (_queue_accuracy(q[:n], k[n:], queue) + _queue_accuracy(q[n:], k[:n], queue))
    new_extra = {
        **extra, "target_batch_stats": target_bs,
        "queue": jax.lax.dynamic_update_slice(queue, k.astype(queue.dtype), (ptr, 0)),
        "queue_ptr": (ptr + 2 * n) % k_size
    }
    metrics = {"contrast_acc": acc, "ema_momentum": self.momentum_at(step), **collapse_metrics(q, n)}
    return loss, (new_bs, new_extra, metrics)

  def after_step(self, extra, params, step) -> dict:
    return update_target(extra, params, self.momentum_at(step))


@register("simsiam")
@dataclasses.dataclass(frozen=True)
class SimSiam(Method):
  """SimSiam (Chen & He 2021): a predictor and a stop-gradient, no negatives, no target. config.simsiam:
  pred_dims (the predictor's layers, ending at the projection size)."""
  @classmethod
  def check(cls, cfg) -> None:
    _pred_dims(cfg, "simsiam")

  @classmethod
  def from_config(cls, cfg, net, **common) -> SimSiam:
    return cls(model=net(_pred_dims(cfg, "simsiam")), **common)

  def loss(self, params, batch_stats, extra, v1, v2, step):
    """-0.5 cos(p1, sg(z2)) - 0.5 cos(p2, sg(z1)); the stop-gradient alone prevents collapse."""
    z, p, new_bs = _online(self, params, batch_stats, v1, v2)
    n = v1.shape[0]
    loss = 0.5 * objectives.negative_cosine(p[:n], z[n:]) + 0.5 * objectives.negative_cosine(p[n:], z[:n])
    return loss, (new_bs, extra, collapse_metrics(z, n))


@register("byol")
@dataclasses.dataclass(frozen=True)
class BYOL(Method):
  """BYOL (Grill et al. 2020): a predictor regressing an EMA target whose momentum rises from `tau_base` to 1
  along a half cosine (`byol_momentum`). config.byol: pred_dims, momentum (= tau_base)."""
  tau_base: float = 0.996
  has_target = True

  @classmethod
  def check(cls, cfg) -> None:
    _pred_dims(cfg, "byol")

  @classmethod
  def from_config(cls, cfg, net, **common) -> BYOL:
    return cls(model=net(_pred_dims(cfg, "byol")), tau_base=cfg.byol.momentum, **common)

  def momentum_at(self, step):
    return byol_momentum(step, self.num_steps, self.tau_base)

  def init_extra(self, params, batch_stats) -> dict:
    return init_target(params, batch_stats)

  def loss(self, params, batch_stats, extra, v1, v2, step):
    """The online prediction regresses the EMA target's projection of the other view, 2 - 2 cos, summed over the
    two directions as in the paper (range [0, 8]; 4 means orthogonal)."""
    z, p, new_bs = _online(self, params, batch_stats, v1, v2)
    n = v1.shape[0]
    zt, target_bs = _target(self, extra, jnp.concatenate([v1, v2]))
    loss = objectives.byol_regression(p[:n], zt[n:]) + objectives.byol_regression(p[n:], zt[:n])
    metrics = {**collapse_metrics(z, n), "ema_momentum": self.momentum_at(step)}
    return loss, (new_bs, {**extra, "target_batch_stats": target_bs}, metrics)

  def after_step(self, extra, params, step) -> dict:
    return update_target(extra, params, self.momentum_at(step))


# ---------------------------------------------------------------------------------------------------- config
def check_config(cfg) -> None:
  """Fails in one line on an unknown `config.method` or a bad value in its config section: the one check of a
  pre-training config's method, run before any data is prepared and again by `make_method`."""
  if cfg.method not in METHODS:
    raise UsjaxError(f"config.method must be one of {', '.join(METHODS)}, got {cfg.method!r}")
  METHODS[cfg.method].check(cfg)


def make_method(cfg) -> Method:
  """The method named by `cfg.method`, its PretrainNet built from `cfg.model` (the U-Net's encoder, optionally its
  decoder, with the method's predictor)."""
  check_config(cfg)
  net = lambda pred_dims: models.pretrain_net_from_config(cfg.model, pred_dims)
  return METHODS[cfg.method].from_config(cfg, net, name=cfg.method, num_steps=cfg.num_steps, seed=cfg.seed)
