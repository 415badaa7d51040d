"""Probes stage: how much class information frozen encoder features hold, and whether embeddings collapsed.

Self-supervised pre-training has no accuracy of its own: its loss falls whether or not the features become
useful, and a collapsed network (every image mapped to the same point) can reach a low loss too. This stage
measures the encoder from outside, on labelled ultrasound sets the pre-training never uses as labels:

  k-NN probe      cosine k-nearest-neighbour vote on l2-normalised features (InstDisc, Wu et al. 2018; the
                  k-NN evaluation of SimCLR/DINO): no training, so it measures the feature geometry itself.
  linear probe    multinomial logistic regression on standardised features, fitted full-batch in JAX.
  collapse        `embedding_stats` (SimSiam's per-dimension std of normalised embeddings), and Wang & Isola's
                  (2020) `alignment` of positive pairs and `uniformity` on the hypersphere.

Accuracy and balanced accuracy (the mean per-class recall) are both reported: BUSI's classes are imbalanced
(350/168/106 benign/malignant/normal), so a majority-class guess already scores about 0.56 accuracy but 0.33
balanced accuracy.

This module holds the mathematics, on feature arrays; `probe_data` reads an encoder's features of the labelled
sets and runs these probes on them (`ProbeData`).
"""
from __future__ import annotations

import functools
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

# `collapsed` fires when the mean per-dimension std of normalised embeddings falls below this fraction of
# 1/sqrt(d), its value for isotropic embeddings. SimSiam's collapsed runs sit at ~0 and healthy ones near
# 1/sqrt(d); 0.2 leaves room for the anisotropy of a healthy projector while catching a collapse early.
COLLAPSE_FRACTION = 0.2


# ---------------------------------------------------------------------------------------------------- metrics
def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
  x = np.asarray(x, np.float64)
  return x / np.sqrt(np.maximum(np.sum(x * x, axis=-1, keepdims=True), eps))


def accuracy(pred, labels) -> float:
  """Fraction of predictions equal to the labels."""
  return float(np.mean(np.asarray(pred) == np.asarray(labels))) if len(labels) else float("nan")


def balanced_accuracy(pred, labels) -> float:
  """Mean per-class recall over the classes present in `labels` (sklearn's definition): chance is
  1 / (number of classes) whatever the class sizes, and a majority-class guess scores no better."""
  pred, labels = np.asarray(pred), np.asarray(labels)
  classes = np.unique(labels)
  if not len(classes):
    return float("nan")
  return float(np.mean([np.mean(pred[labels == c] == c) for c in classes]))


def knn_predict(train_feats, train_labels, test_feats, num_classes: int, k: int = 20,
                temperature: float = 0.07) -> np.ndarray:
  """Weighted k-NN labels [M] for `test_feats` [M, D] from `train_feats` [N, D] with `train_labels` [N].

  Cosine similarity on l2-normalised features; each of the k most similar training features votes for its
  class with weight exp(sim / temperature) (InstDisc's k-NN, as in the SimCLR/DINO evaluations); the class with
  the largest total wins, ties to the lower class index. In float64, so it is exact against a reference.
  """
  train, test = l2_normalize(train_feats), l2_normalize(test_feats)
  train_labels = np.asarray(train_labels, np.int64)
  k = min(k, len(train))
  sim = test @ train.T  # [M, N]
  nearest = np.argpartition(-sim, k - 1, axis=1)[:, :k]  # the k most similar, in any order
  weights = np.exp(np.take_along_axis(sim, nearest, axis=1) / temperature)
  votes = np.zeros((len(test), num_classes))
  np.add.at(votes, (np.arange(len(test))[:, None], train_labels[nearest]), weights)
  return np.argmax(votes, axis=1)


def knn_accuracy(train_feats, train_labels, test_feats, test_labels, num_classes: int, k: int = 20,
                 temperature: float = 0.07) -> dict[str, float]:
  """{'acc', 'bacc'} of `knn_predict` on the test set."""
  pred = knn_predict(train_feats, train_labels, test_feats, num_classes, k, temperature)
  return {"acc": accuracy(pred, test_labels), "bacc": balanced_accuracy(pred, test_labels)}


@functools.partial(jax.jit, static_argnames=("num_classes", "steps"))
def _fit_logistic(x, y, weights, l2, *, num_classes: int, steps: int, tol: float = 1e-5):
  """Minimises weighted mean cross-entropy + l2/2 ||W||^2 over (W, b) with L-BFGS, from zeros (deterministic).

  A convex problem, so L-BFGS with a line search reaches the optimum in tens of steps where Adam needs
  hundreds; the loop stops early once the gradient norm is below `tol` (L-BFGS updates near a zero gradient
  divide by ~0)."""
  def loss(p):
    logits = x @ p["w"] + p["b"]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    return jnp.sum(weights * ce) / jnp.sum(weights) + 0.5 * l2 * jnp.sum(p["w"]**2)

  opt = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(loss)
  params = {"w": jnp.zeros((x.shape[1], num_classes), jnp.float32), "b": jnp.zeros((num_classes,), jnp.float32)}

  def step(carry):
    p, state = carry
    value, grad = value_and_grad(p, state=state)
    updates, state = opt.update(grad, state, p, value=value, grad=grad, value_fn=loss)
    return optax.apply_updates(p, updates), state

  def running(carry):
    _, state = carry
    count = optax.tree_utils.tree_get(state, "count")
    grad_norm = optax.tree_utils.tree_l2_norm(optax.tree_utils.tree_get(state, "grad"))
    return (count == 0) | ((count < steps) & (grad_norm >= tol))

  params, _ = jax.lax.while_loop(running, step, (params, opt.init(params)))
  return params


def linear_probe(train_feats, train_labels, test_feats, num_classes: int, l2: float = 1e-4, steps: int = 500,
                 balanced: bool = False) -> np.ndarray:
  """Labels [M] predicted by multinomial logistic regression fitted on (`train_feats`, `train_labels`).

  Features are standardised with the training mean and std (the probe then sees every channel on one scale,
  and one `l2` suits every encoder); channels constant on the training set (dead ReLUs) are left at 0.
  `l2` weighs 0.5 ||W||^2 against the mean cross-entropy. `balanced` weighs each example by the inverse of
  its class's training frequency, so every class counts equally in the fit. Compiled once per shape.
  """
  train = np.asarray(train_feats, np.float32)
  mean, std = train.mean(0), train.std(0)
  std = np.where(std > 1e-6, std, 1.0)
  x = (train - mean) / std
  y = np.asarray(train_labels, np.int32)
  weights = np.ones(len(y), np.float32)
  if balanced:
    counts = np.bincount(y, minlength=num_classes).astype(np.float32)
    weights = (len(y) / (np.count_nonzero(counts) * np.maximum(counts, 1)))[y].astype(np.float32)
  p = _fit_logistic(x, y, weights, jnp.float32(l2), num_classes=num_classes, steps=steps)
  test = (np.asarray(test_feats, np.float32) - mean) / std
  return np.argmax(test @ np.asarray(p["w"]) + np.asarray(p["b"]), axis=1)


def linear_accuracy(train_feats, train_labels, test_feats, test_labels, num_classes: int, l2: float = 1e-4,
                    steps: int = 500, balanced: bool = False) -> dict[str, float]:
  """{'acc', 'bacc'} of `linear_probe` on the test set."""
  pred = linear_probe(train_feats, train_labels, test_feats, num_classes, l2, steps, balanced)
  return {"acc": accuracy(pred, test_labels), "bacc": balanced_accuracy(pred, test_labels)}


def _normalize(z):
  z = jnp.asarray(z, jnp.float32)
  return z * jax.lax.rsqrt(jnp.maximum(jnp.sum(z * z, axis=-1, keepdims=True), 1e-12))


def embedding_stats(z) -> dict[str, Any]:
  """{'z_std', 'z_std_ideal'} of embeddings z [N, D] (jnp; works inside jit).

  z_std is the per-dimension std over the batch of the l2-normalised embeddings, averaged over dimensions
  (SimSiam, Chen & He 2021, fig. 2): about 1/sqrt(D) (= z_std_ideal) for embeddings spread evenly over the
  sphere, 0 when every image maps to the same point. Meant for projector outputs (z): pooled encoder features
  are post-ReLU, so they share a large common direction and sit far below 1/sqrt(D) even when healthy (a
  random ResNet-18 on BUSI: 0.006 against 0.044), and `collapsed` must not be applied to them.
  """
  return {"z_std": _z_std(z), "z_std_ideal": 1.0 / math.sqrt(z.shape[-1])}


@jax.jit
def _z_std(z):
  return jnp.mean(jnp.std(_normalize(z), axis=0))


def collapsed(stats: Mapping[str, Any], threshold: float = COLLAPSE_FRACTION) -> bool:
  """Whether `embedding_stats` says the embeddings collapsed: z_std < threshold * 1/sqrt(D) (0.2 by default,
  see COLLAPSE_FRACTION)."""
  return bool(float(stats["z_std"]) < threshold * float(stats["z_std_ideal"]))


@jax.jit
def alignment(z1, z2, alpha: float = 2.0):
  """Wang & Isola (2020): mean ||z1_i - z2_i||^alpha over positive pairs of l2-normalised embeddings (lower is
  better aligned; 0 when the two views of every image map to the same point)."""
  return jnp.mean(jnp.linalg.norm(_normalize(z1) - _normalize(z2), axis=-1)**alpha)


@jax.jit
def uniformity(z, t: float = 2.0):
  """Wang & Isola (2020): log mean exp(-t ||z_i - z_j||^2) over distinct pairs i < j of l2-normalised
  embeddings (lower is more uniform; 0 when all collapse to one point, about -4 for t=2 on a high-dimensional
  sphere). Computed with logsumexp, so it stays finite for spread-out embeddings."""
  z = _normalize(z)
  sq = jnp.sum(z * z, axis=-1)
  d2 = jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * z @ z.T, 0.0)
  i, j = np.triu_indices(z.shape[0], k=1)
  return jax.nn.logsumexp(-t * d2[i, j]) - math.log(len(i))
