"""Pixel-value augmentations: what changes an image's intensities but never moves a pixel.

The display controls (brightness, contrast, gamma), a Gaussian blur and the ultrasound physics that act on intensity
(speckle, acoustic shadow, depth-dependent gain), plus `photometric`, which composes them for one view. These touch
the image only; the spatial transforms applied to an image and its mask alike (crop, flips, rotation, fan sector), the
recipe and the composed views are in `usjax.augment`.

Every random transform is a pure function of a few pre-drawn uniforms `u` (and, for speckle, normals `z`): a
composed view draws everything in one PRNG call (`augment._sample_view`; each call is a threefry instance in the
compiled graph, and on CPU those dominated compile time), and a test draws them with `uniforms`. Training and the
tests run the same functions. The helpers that draw and slice the uniforms live here, the lower of the two modules.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def to_ranges(u, *ranges):
  """Maps uniforms u[i] in [0, 1) onto the given (low, high) ranges."""
  return tuple(lo + (hi - lo) * u[i] for i, (lo, hi) in enumerate(ranges))


def split_uniforms(u, *counts):
  """Consecutive slices of a pre-drawn uniform vector."""
  offsets = [sum(counts[:i]) for i in range(len(counts) + 1)]
  return [u[a:b] for a, b in zip(offsets[:-1], offsets[1:])]


def uniforms(key, n: int) -> Array:
  """`n` uniforms in [0, 1): what one transform's `u` holds."""
  return jax.random.uniform(key, (n,))


def adjust_brightness(image: Array, factor) -> Array:
  """Multiplicative, like scanner gain: an offset would lift the background."""
  return jnp.clip(image * factor, 0.0, 1.0)


def adjust_contrast(image: Array, factor) -> Array:
  """Scales deviations from the per-channel mean (tf.image convention)."""
  mean = jnp.mean(image, axis=(0, 1), keepdims=True)
  return jnp.clip((image - mean) * factor + mean, 0.0, 1.0)


def adjust_gamma(image: Array, g) -> Array:
  return jnp.clip(image, 0.0, 1.0)**g


def brightness(u, image: Array, strength: float) -> Array:
  """Gain factor ~ U(1 - strength, 1 + strength), from u[0]."""
  return adjust_brightness(image, to_ranges(u, (max(0, 1 - strength), 1 + strength))[0])


def contrast(u, image: Array, strength: float) -> Array:
  """Contrast factor ~ U(1 - strength, 1 + strength), from u[0]."""
  return adjust_contrast(image, to_ranges(u, (max(0, 1 - strength), 1 + strength))[0])


def gamma(u, image: Array, strength: float) -> Array:
  """Exponent log-uniform in [1 / (1 + strength), 1 + strength], from u[0]: brightening and darkening equally
  likely."""
  log_g = math.log1p(strength)
  return adjust_gamma(image, jnp.exp(to_ranges(u, (-log_g, log_g))[0]))


def _correlation_matrix(kernel, n: int) -> Array:
  """[n, n] matrix of a same-size 1-D correlation, half-sample reflection.

  The tap pattern is static, the weights may be traced (per-example sigma).
  A matmul compiles much faster on CPU than a fused sum of shifted slices.
  """
  radius = (len(kernel) - 1) // 2
  src = np.arange(n)[None, :] + np.arange(-radius, radius + 1)[:, None]
  src = np.mod(src, 2 * n)
  src = np.where(src < n, src, 2 * n - 1 - src)  # == scipy mode='reflect'
  onehot = (src[..., None] == np.arange(n)).astype(np.float32)
  return jnp.einsum('k,kij->ij', jnp.asarray(kernel, jnp.float32), onehot)


def _separable(image: Array, kernel) -> Array:
  """Correlates rows and columns of [H, W, C] with the same 1-D kernel."""
  height, width = image.shape[:2]
  rows = _correlation_matrix(kernel, height)
  cols = _correlation_matrix(kernel, width)
  return jnp.einsum('ij,jwc,kw->ikc', rows, image, cols, precision=jax.lax.Precision.HIGHEST)


def apply_gaussian_blur(image: Array, sigma, radius: int) -> Array:
  """Separable Gaussian blur of rows and columns with a static radius."""
  x = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
  k = jnp.exp(-0.5 * (x / sigma)**2)
  return _separable(image, k / jnp.sum(k))


def gaussian_blur(u, image: Array, sigma=(0.1, 2.0), p: float = 0.5) -> Array:
  """Blurs with probability p (u[0] < p); sigma ~ U(sigma) from u[1], radius 3 * max sigma."""
  u_on, s = to_ranges(u, (0, 1), sigma)
  blurred = apply_gaussian_blur(image, s, max(1, math.ceil(3 * sigma[1])))
  return jnp.where(u_on < p, blurred, image)


_BINOMIAL = (0.25, 0.5, 0.25)
# Std of white noise after the separable [1,2,1]/4 smoothing, relative to
# before: sqrt(sum_ij (w_i w_j)^2) = sum_i w_i^2.
_BINOMIAL_STD = sum(w * w for w in _BINOMIAL)


def _gamma_field(z, sigma: float, smooth: bool) -> Array:
  """Mean-1 speckle field of std `sigma` from standard normals z.

  Multi-look speckle intensity is gamma distributed: Gamma(k)/k, k = 1/sigma^2.
  Its Wilson-Hilferty cube-of-normal form (mean 1 - b^6, b = sigma/3) avoids
  the rejection loop of exact sampling, by far the slowest op. Smoothing
  mimics a resolution cell wider than a pixel; the deviation is rescaled so
  `sigma` keeps its meaning.
  """
  b = sigma / 3.0
  field = jnp.maximum(1.0 - b * b + b * z, 0.0)**3
  if smooth:
    field = 1.0 + (_separable(field, _BINOMIAL) - 1.0) / _BINOMIAL_STD
  return field


def speckle(u, z, image: Array, strength: float, smooth: bool = True) -> Array:
  """Multiplicative speckle from the standard normals z [H, W, 1], at level u[0] * `strength` (per example).

  One field for all channels: speckle belongs to the tissue, not a channel.
  """
  if strength <= 0:
    return image
  field = _gamma_field(z, strength, smooth)
  return jnp.clip(image * (1.0 + u[0] * (field - 1.0)), 0.0, 1.0)


def depth_gain(u, image: Array, max_db: float) -> Array:
  """Time-gain-compensation-like gain that depends on depth only.

  Piecewise linear in dB between len(u) levels in [-max_db, max_db] (from u) spread over the depth, like a
  scanner's bank of TGC sliders.
  """
  knots = u.shape[0]
  db = -max_db + 2.0 * max_db * u
  rows = jnp.arange(image.shape[0], dtype=jnp.float32)
  db_rows = jnp.interp(rows, jnp.linspace(0.0, image.shape[0] - 1.0, knots), db)
  gain = 10.0**(db_rows / 20.0)
  return jnp.clip(image * gain[:, None, None], 0.0, 1.0)


def shadow_field(height: int, width: int, center, half_width, start_row, strength, softness) -> Array:
  """[H, W, 1] multiplier: a soft-edged band darkened below `start_row`."""
  rows = jnp.arange(height, dtype=jnp.float32)[:, None]
  cols = jnp.arange(width, dtype=jnp.float32)[None, :]
  across = jax.nn.sigmoid((half_width - jnp.abs(cols - center)) / softness)
  below = jax.nn.sigmoid((rows - start_row) / softness)
  return (1.0 - strength * across * below)[..., None]


def shadow(u, image: Array, p: float = 0.2) -> Array:
  """With probability p (u[0] < p), darkens a band below a depth; u[1:5] place and size it.

  Mimics acoustic shadowing: calcifications and some lesions block the beam.
  """
  height, width = image.shape[:2]
  u_on, center, half_width, start_row, strength = to_ranges(u, (0, 1), (0, width), (0.03 * width, 0.12 * width),
                                                            (0.2 * height, 0.8 * height), (0.5, 0.95))
  field = shadow_field(height, width, center, half_width, start_row, strength, jnp.maximum(1.0, 0.3 * half_width))
  return image * jnp.where(u_on < p, field, 1.0)


# Uniform draws per stage: speckle level, shadow, depth knots, blur,
# brightness, contrast, gamma.
_PHOTO_COUNTS = (1, 5, 4, 2, 1, 1, 1)
PHOTO_DRAWS = sum(_PHOTO_COUNTS)


def photometric(u, z, image: Array, cfg) -> Array:
  """Intensity transforms in acquisition order: tissue, receiver, display.

  Speckle (from the normals z) and shadows arise in the tissue, depth gain in
  the receiver, blur mimics a coarser probe, then the display controls act.
  Disabled transforms are skipped at trace time (`cfg`, an `augment.AugmentConfig`,
  is static). u holds PHOTO_DRAWS uniforms; z is [H, W, 1] (None when speckle is off).
  """
  u_sp, u_sh, u_dg, u_bl, u_br, u_co, u_ga = split_uniforms(u, *_PHOTO_COUNTS)
  image = speckle(u_sp, z, image, cfg.speckle)
  if cfg.shadow_prob > 0:
    image = shadow(u_sh, image, cfg.shadow_prob)
  if cfg.depth_gain_db > 0:
    image = depth_gain(u_dg, image, cfg.depth_gain_db)
  if cfg.blur_prob > 0:
    image = gaussian_blur(u_bl, image, (0.1, 2.0), cfg.blur_prob)
  if cfg.brightness > 0:
    image = brightness(u_br, image, cfg.brightness)
  if cfg.contrast > 0:
    image = contrast(u_co, image, cfg.contrast)
  if cfg.gamma > 0:
    image = gamma(u_ga, image, cfg.gamma)
  return jnp.clip(image, 0.0, 1.0)
