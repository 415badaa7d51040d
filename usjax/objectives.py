"""Objectives stage: every loss is a pure function of arrays, so it can be tested against a numpy formula.

Called inside a `jax.jit` over the device mesh with the batch sharded on the data axis, these functions see the
*global* batch: the negatives of NT-Xent span all devices and hosts without any explicit gather.
"""
import jax
import jax.numpy as jnp
import optax

LARGE_NUM = 1e9


def l2_normalize(x, axis=-1, eps=1e-12):
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=axis, keepdims=True), eps))


def nt_xent(z1: jax.Array, z2: jax.Array, temperature: float = 0.5) -> jax.Array:
  """SimCLR's normalised-temperature cross entropy (Chen et al. 2020, eq. 1), averaged over all 2N anchors.

  Row i of `z1` and row i of `z2` are two views of one image; every other view in the batch is a negative.
  """
  z = l2_normalize(jnp.concatenate([z1, z2], axis=0).astype(jnp.float32))
  n = z1.shape[0]
  logits = z @ z.T / temperature - LARGE_NUM * jnp.eye(2 * n)  # a view is not its own negative
  positives = jnp.concatenate([jnp.arange(n, 2 * n), jnp.arange(n)])
  return optax.softmax_cross_entropy_with_integer_labels(logits, positives).mean()


def contrastive_accuracy(z1, z2) -> jax.Array:
  """Fraction of anchors whose nearest other view is their positive: a cheap sign that learning works."""
  z = l2_normalize(jnp.concatenate([z1, z2], axis=0).astype(jnp.float32))
  n = z1.shape[0]
  sim = z @ z.T - LARGE_NUM * jnp.eye(2 * n)
  positives = jnp.concatenate([jnp.arange(n, 2 * n), jnp.arange(n)])
  return jnp.mean(jnp.argmax(sim, axis=1) == positives)


def soft_dice_loss(logits: jax.Array, masks: jax.Array, eps: float = 1.0) -> jax.Array:
  """1 - soft Dice over the whole batch (one ratio, so images with empty masks do not divide by zero)."""
  probs = jax.nn.sigmoid(logits.astype(jnp.float32))
  inter = jnp.sum(probs * masks)
  return 1.0 - (2.0 * inter + eps) / (jnp.sum(probs) + jnp.sum(masks) + eps)


def dice_bce(logits: jax.Array, masks: jax.Array) -> jax.Array:
  """Segmentation loss: soft Dice plus pixel-wise binary cross entropy (the usual U-Net fine-tuning loss)."""
  bce = optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32), masks).mean()
  return soft_dice_loss(logits, masks) + bce


def presence_bce(presence_logits: jax.Array, masks: jax.Array) -> jax.Array:
  """Image-level lesion presence: binary cross entropy of one logit per image [B] against whether its mask
  [B, H, W, ...] has any lesion pixel (masks as seen after augmentation, which may crop a lesion out)."""
  target = jnp.any(masks.reshape(masks.shape[0], -1) > 0.5, axis=1).astype(jnp.float32)
  return optax.sigmoid_binary_cross_entropy(presence_logits.astype(jnp.float32), target).mean()


def info_nce(q: jax.Array, k: jax.Array, queue: jax.Array, temperature: float = 0.2) -> jax.Array:
  """MoCo's InfoNCE (He et al. 2020, eq. 1): each query against its key and the K queued negatives.

  `q` and `k` are l2-normalised here; the `queue` rows are assumed unit-norm already (MoCo stores them so).
  Keys and queue carry no gradient: they come from the momentum encoder.
  """
  q = l2_normalize(q.astype(jnp.float32))
  k = jax.lax.stop_gradient(l2_normalize(k.astype(jnp.float32)))
  queue = jax.lax.stop_gradient(queue.astype(jnp.float32))
  pos = jnp.sum(q * k, axis=-1, keepdims=True)
  logits = jnp.concatenate([pos, q @ queue.T], axis=1) / temperature
  return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.zeros(q.shape[0], jnp.int32)).mean()


def _cosine(p, z):
  return jnp.sum(l2_normalize(p.astype(jnp.float32)) * l2_normalize(z.astype(jnp.float32)), axis=-1)


def negative_cosine(p: jax.Array, z: jax.Array) -> jax.Array:
  """SimSiam's D(p, stopgrad(z)) = -cos(p, z), batch mean: the stop-gradient is what prevents collapse."""
  return -_cosine(p, jax.lax.stop_gradient(z)).mean()


def byol_regression(p: jax.Array, z: jax.Array) -> jax.Array:
  """BYOL's ||p/|p| - z/|z|||^2 = 2 - 2 cos(p, z), batch mean; the target `z` carries no gradient."""
  return (2.0 - 2.0 * _cosine(p, jax.lax.stop_gradient(z))).mean()
