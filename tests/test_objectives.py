"""Losses against independent numpy formulas."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from usjax import objectives


def nt_xent_numpy(z1, z2, t):
  """SimCLR eq. 1 written out anchor by anchor."""
  z = np.concatenate([z1, z2]).astype(np.float64)
  z /= np.linalg.norm(z, axis=1, keepdims=True)
  n2 = len(z)
  n = n2 // 2
  total = 0.0
  for i in range(n2):
    j = (i + n) % n2
    sims = np.array([z[i] @ z[k] / t for k in range(n2) if k != i])
    total += -(z[i] @ z[j] / t) + np.log(np.sum(np.exp(sims)))
  return total / n2


@pytest.mark.parametrize("n,d,t", [(4, 8, 0.5), (7, 16, 0.1), (16, 128, 0.2)])
def test_nt_xent_matches_numpy(n, d, t):
  rng = np.random.default_rng(n)
  z1, z2 = rng.normal(size=(n, d)).astype(np.float32), rng.normal(size=(n, d)).astype(np.float32)
  np.testing.assert_allclose(objectives.nt_xent(z1, z2, t), nt_xent_numpy(z1, z2, t), rtol=1e-4)


def test_nt_xent_gradient_finite_and_identical_views_lower():
  rng = np.random.default_rng(0)
  z1, z2 = rng.normal(size=(8, 32)).astype(np.float32), rng.normal(size=(8, 32)).astype(np.float32)
  g1, g2 = jax.grad(objectives.nt_xent, argnums=(0, 1))(z1, z2, 0.5)
  assert np.all(np.isfinite(g1)) and np.all(np.isfinite(g2))
  assert np.abs(g1).sum() > 0
  assert objectives.nt_xent(z1, z1, 0.5) < objectives.nt_xent(z1, z2, 0.5)
  assert objectives.contrastive_accuracy(z1, z1) == 1.0


def test_dice_bce_matches_numpy():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(2, 8, 8, 1)).astype(np.float32)
  masks = (rng.random((2, 8, 8, 1)) > 0.6).astype(np.float32)
  p = 1 / (1 + np.exp(-logits.astype(np.float64)))
  bce = -np.mean(masks * np.log(p) + (1 - masks) * np.log(1 - p))
  dice = 1 - (2 * np.sum(p * masks) + 1) / (np.sum(p) + np.sum(masks) + 1)
  np.testing.assert_allclose(objectives.dice_bce(logits, masks), bce + dice, rtol=1e-5)


def test_dice_bce_perfect_prediction_is_low_and_empty_masks_finite():
  masks = np.zeros((2, 8, 8, 1), np.float32)
  masks[0, 2:5, 2:5] = 1
  good = jnp.where(masks > 0, 20.0, -20.0)
  assert objectives.dice_bce(good, masks) < 0.01
  empty = np.zeros_like(masks)
  assert np.isfinite(objectives.dice_bce(jnp.zeros_like(empty), empty))
