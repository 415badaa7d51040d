"""Contrastive methods: their losses against numpy formulas, MoCo's queue, EMA targets, and a few training steps."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from ml_collections import ConfigDict

from configs import default
from usjax import UsjaxError, methods, objectives

N, S = 8, 16  # batch, image side: resnet18 reaches 1x1 at stride 32
# Compile time dominates on CPU; the least-optimising XLA backend halves it and the steps stay sub-second.
jit = functools.partial(
    jax.jit, compiler_options={"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True})


def small_config(method: str) -> ConfigDict:
  cfg = default.get_config()
  cfg.method, cfg.batch_size, cfg.num_steps = method, N, 8
  cfg.model.proj_dims = (32, 16)
  cfg.moco = ConfigDict({"temperature": 0.2, "queue_size": 64, "momentum": 0.99, "momentum_schedule": "constant"})
  cfg.simsiam = ConfigDict({"pred_dims": (32, 16)})
  cfg.byol = ConfigDict({"pred_dims": (32, 16), "momentum": 0.996})
  return cfg


def views(seed=0):
  """Two fixed noisy views of the same random images."""
  rng = np.random.default_rng(seed)
  images = rng.uniform(size=(N, S, S, 1)).astype(np.float32)
  noisy = lambda: np.clip(images + 0.1 * rng.normal(size=images.shape), 0, 1).astype(np.float32)
  return jnp.asarray(noisy()), jnp.asarray(noisy())


@functools.lru_cache
def variables():
  """One initialisation for every method: without a predictor, a PretrainNet's tree is this one minus
  `predictor`. rbg keys compile much faster than threefry on CPU."""
  model = methods.make_method(small_config("byol")).model
  return jit(lambda: model.init(jax.random.key(0, impl="rbg"), jnp.zeros((2, S, S, 1)), train=False))()


def init(method):
  keep = lambda tree: {k: v for k, v in tree.items() if k != "predictor" or method.model.pred_dims}
  params, batch_stats = keep(variables()["params"]), keep(variables()["batch_stats"])
  return params, batch_stats, method.init_extra(params, batch_stats)


def max_abs_diff(a, b):
  return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# ---------------------------------------------------------------------------------------------------- losses
def info_nce_numpy(q, k, queue, t):
  q = q / np.linalg.norm(q, axis=1, keepdims=True)
  k = k / np.linalg.norm(k, axis=1, keepdims=True)
  total = 0.0
  for i in range(len(q)):
    pos = np.exp(q[i] @ k[i] / t)
    total += -np.log(pos / (pos + sum(np.exp(q[i] @ n / t) for n in queue)))
  return total / len(q)


@pytest.mark.parametrize("n,d,k,t", [(4, 8, 16, 0.2), (6, 16, 32, 0.5)])
def test_info_nce_matches_numpy(n, d, k, t):
  rng = np.random.default_rng(n)
  q, key = rng.normal(size=(n, d)), rng.normal(size=(n, d))
  queue = rng.normal(size=(k, d))
  queue /= np.linalg.norm(queue, axis=1, keepdims=True)
  got = objectives.info_nce(*(x.astype(np.float32) for x in (q, key, queue)), t)
  np.testing.assert_allclose(got, info_nce_numpy(q, key, queue, t), rtol=1e-4)


def cos_numpy(p, z):
  return np.sum(p * z, 1) / (np.linalg.norm(p, axis=1) * np.linalg.norm(z, axis=1))


@pytest.mark.parametrize("fn,formula", [(objectives.negative_cosine, lambda p, z: -cos_numpy(p, z).mean()),
                                        (objectives.byol_regression, lambda p, z: (2 - 2 * cos_numpy(p, z)).mean())])
def test_cosine_losses_match_numpy_and_stop_gradient(fn, formula):
  rng = np.random.default_rng(0)
  p, z = rng.normal(size=(6, 16)).astype(np.float32), rng.normal(size=(6, 16)).astype(np.float32)
  np.testing.assert_allclose(fn(p, z), formula(p, z), rtol=1e-5)
  gp, gz = jax.grad(fn, argnums=(0, 1))(p, z)
  assert np.abs(gp).sum() > 0 and np.all(gz == 0)


def test_ema_and_byol_momentum():
  t, o = {"a": jnp.array([1.0, 2.0])}, {"a": jnp.array([3.0, -2.0])}
  np.testing.assert_allclose(methods.ema(t, o, 0.9)["a"], 0.9 * np.array([1, 2]) + 0.1 * np.array([3, -2]), rtol=1e-6)
  np.testing.assert_allclose(methods.byol_momentum(0, 100, 0.996), 0.996, rtol=1e-7)
  np.testing.assert_allclose(methods.byol_momentum(100, 100, 0.996), 1.0, rtol=1e-7)
  assert 0.996 < methods.byol_momentum(50, 100, 0.996) < 1.0


def test_make_method_validates_config():
  for method, field, value in [("moco", "queue_size", 40), ("simsiam", "pred_dims", (32, 8)),
                               ("byol", "pred_dims", ())]:
    cfg = small_config(method)
    cfg[method][field] = value
    with pytest.raises(UsjaxError, match=f"config.{method}.{field}"):
      methods.make_method(cfg)
  with pytest.raises(UsjaxError, match="config.method"):
    methods.make_method(small_config("swav"))


# ---------------------------------------------------------------------------------------------------- steps
@functools.lru_cache
def trainer(name):
  """(method, optimiser, jitted train step), cached so the MoCo tests share one compilation."""
  method, tx = methods.make_method(small_config(name)), optax.adam(1e-3)
  v1, v2 = views()

  @jit
  def step(params, batch_stats, opt_state, extra, i):
    grad_fn = jax.value_and_grad(method.loss, has_aux=True)
    (loss, (batch_stats, extra, metrics)), grads = grad_fn(params, batch_stats, extra, v1, v2, i)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return params, batch_stats, opt_state, method.after_step(extra, params, i), loss, metrics

  return method, tx, step


@pytest.mark.slow  # compiles a MoCo train step
def test_moco_enqueues_normalised_keys_at_the_pointer():
  method, tx, step = trainer("moco")
  params, batch_stats, extra = init(method)
  v1, v2 = views()

  @jit
  def keys(extra):  # the key encoder without the shuffle: global BatchNorm makes the shuffle a no-op
    variables = {"params": extra["target_params"], "batch_stats": extra["target_batch_stats"]}
    (k, _), _ = method.target_model.apply(variables, jnp.concatenate([v1, v2]), train=True, mutable=["batch_stats"])
    return objectives.l2_normalize(k)

  expected, k_size = keys(extra), extra["queue"].shape[0]
  for ptr in (0, k_size - 2 * N):  # a plain advance and a wrap-around
    before = {**extra, "queue_ptr": jnp.asarray(ptr, jnp.int32)}
    after = step(params, batch_stats, tx.init(params), before, 3)[3]
    np.testing.assert_allclose(after["queue"][ptr:ptr + 2 * N], expected, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(after["queue"][ptr:ptr + 2 * N], axis=1), 1.0, rtol=1e-5)
    rest = np.ones(k_size, bool)
    rest[ptr:ptr + 2 * N] = False
    np.testing.assert_array_equal(after["queue"][rest], extra["queue"][rest])
    assert int(after["queue_ptr"]) == (ptr + 2 * N) % k_size


@pytest.mark.slow  # compiles and runs each method's train step
@pytest.mark.parametrize("name", methods.METHODS)
def test_method_trains_a_few_steps(name):
  method, tx, step = trainer(name)
  params, batch_stats, extra = init(method)
  assert ("predictor" in params) == (name in ("simsiam", "byol"))
  opt_state, extra0, losses = tx.init(params), extra, []
  for i in range(6):
    params, batch_stats, opt_state, extra, loss, metrics = step(params, batch_stats, opt_state, extra, i)
    if name == "moco":  # a fixed batch would fill the queue with its own positives: keep the negatives fixed
      extra = {**extra, "queue": extra0["queue"]}
    losses.append(float(loss))
    assert all(np.isfinite(float(v)) for v in metrics.values())
  assert np.all(np.isfinite(losses)) and losses[-1] < losses[0], losses
  if method.has_target:
    target, online = extra["target_params"], {k: params[k] for k in extra["target_params"]}
    assert "predictor" not in target
    assert jax.tree.map(jnp.shape, target) == jax.tree.map(jnp.shape, extra0["target_params"])
    assert max_abs_diff(target, extra0["target_params"]) > 0  # the target moved...
    assert max_abs_diff(target, online) > 0  # ...but lags the online network
    assert max_abs_diff(extra["target_batch_stats"], extra0["target_batch_stats"]) > 0
  else:
    assert extra == {}
