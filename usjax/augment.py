"""On-device augmentation for contrastive pre-training and segmentation.

Transforms are pure functions of one example [H, W, C] (float32 in [0, 1])
with static shapes, so the pipeline jits and vmaps over a batch with
per-example keys; random on/off decisions are `jnp.where` blends. Each random
`fn(key, image, ...)` has a core `_fn(u, ...)` driven by a few uniforms, so a
composite view makes one PRNG call for everything: each call is a threefry
instance in the compiled graph, and on CPU those dominated compile time.

Geometry (crop + flips) is a 3x3 affine mapping output pixel coordinates
(row, col, 1) to input ones, so one sample applies identically to an image
and its mask. Index i sits at coordinate i (pixel centres): the full-image
crop is an exact identity. Rows are depth (row 0 touches the probe), hence no
vertical flips by default and depth-aware ultrasound transforms.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy import ndimage

Array = jax.Array


def _scale(u, *ranges):
  """Maps uniforms u[i] in [0, 1) onto the given (low, high) ranges."""
  return tuple(lo + (hi - lo) * u[i] for i, (lo, hi) in enumerate(ranges))


def _split(u, *counts):
  """Consecutive slices of a pre-drawn uniform vector."""
  offsets = [sum(counts[:i]) for i in range(len(counts) + 1)]
  return [u[a:b] for a, b in zip(offsets[:-1], offsets[1:])]


def _draw(key, n: int) -> Array:
  return jax.random.uniform(key, (n,))


def crop_matrix(box, height: int, width: int) -> Array:
  """Affine matrix resampling the box (y0, x0, h, w) onto the full grid."""
  y0, x0, h, w = (jnp.asarray(v, jnp.float32) for v in box)
  sy, sx = h / height, w / width
  # Output pixel centre r + 0.5 lands on y0 + (r + 0.5) * sy.
  return jnp.array([[sy, 0.0, y0 + 0.5 * sy - 0.5],
                    [0.0, sx, x0 + 0.5 * sx - 0.5],
                    [0.0, 0.0, 1.0]], jnp.float32)


def flip_matrix(hflip, vflip, height: int, width: int) -> Array:
  """Affine matrix of optional flips; the flags may be traced booleans."""
  fh, fv = jnp.asarray(hflip, jnp.float32), jnp.asarray(vflip, jnp.float32)
  return jnp.array([[1.0 - 2.0 * fv, 0.0, fv * (height - 1)],
                    [0.0, 1.0 - 2.0 * fh, fh * (width - 1)],
                    [0.0, 0.0, 1.0]], jnp.float32)


def warp(image: Array, matrix: Array, order: int = 1) -> Array:
  """Resamples [H, W, C] at `matrix @ (row, col, 1)`, clamping at edges."""
  height, width = image.shape[:2]
  rows, cols = jnp.meshgrid(jnp.arange(height, dtype=jnp.float32),
                            jnp.arange(width, dtype=jnp.float32), indexing='ij')
  src_r = matrix[0, 0] * rows + matrix[0, 1] * cols + matrix[0, 2]
  src_c = matrix[1, 0] * rows + matrix[1, 1] * cols + matrix[1, 2]
  # Per-channel 2-D interpolation: a third (channel) coordinate doubles gathers.
  sample = lambda ch: ndimage.map_coordinates(
      ch, [src_r, src_c], order=order, mode='nearest')
  return jax.vmap(sample, in_axes=2, out_axes=2)(image)


def _crop_box(u, height, width, scale, ratio) -> Array:
  frac, log_r, u_y, u_x = _scale(
      u, scale, (math.log(ratio[0]), math.log(ratio[1])), (0, 1), (0, 1))
  area, aspect = height * width * frac, jnp.exp(log_r)  # aspect = w / h
  w = jnp.clip(jnp.sqrt(area * aspect), 1.0, width)
  h = jnp.clip(jnp.sqrt(area / aspect), 1.0, height)
  return jnp.stack([u_y * (height - h), u_x * (width - w), h, w])


def sample_crop_box(key, height: int, width: int,
                    scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)) -> Array:
  """Random (y0, x0, h, w): area fraction ~ U(scale), aspect log-uniform.

  An oversized side is clipped to the image instead of rejection sampling (a
  data-dependent loop), at the cost of a smaller area for extreme draws.
  """
  return _crop_box(_draw(key, 4), height, width, scale, ratio)


def crop_and_resize(image: Array, box) -> Array:
  """Bilinear resample of the box (y0, x0, h, w) to the full image size."""
  return warp(image, crop_matrix(box, *image.shape[:2]), order=1)


def random_resized_crop(key, image: Array, scale=(0.2, 1.0),
                        ratio=(3 / 4, 4 / 3)) -> Array:
  """SimCLR's random resized crop; the output keeps the input size."""
  box = sample_crop_box(key, *image.shape[:2], scale, ratio)
  return crop_and_resize(image, box)


def flip(key, image: Array, p: float = 0.5, vertical: bool = False) -> Array:
  """Flips left-right (up-down if `vertical`) with probability p."""
  flipped = jnp.flip(image, axis=0 if vertical else 1)
  return jnp.where(_draw(key, 1)[0] < p, flipped, image)


_GEOMETRY_DRAWS = 6


def _geometry(u, height, width, cfg) -> Array:
  u_crop, u_flip = _split(u, 4, 2)
  box = _crop_box(u_crop, height, width, cfg.crop_scale, cfg.crop_ratio)
  fh = (u_flip[0] < 0.5) & cfg.hflip
  fv = (u_flip[1] < 0.5) & cfg.vflip
  # Flip the output grid, then map it through the crop: a flipped crop.
  return crop_matrix(box, height, width) @ flip_matrix(fh, fv, height, width)


def rotation_matrix(degrees, height: int, width: int) -> Array:
  """Affine matrix of a rotation by `degrees` about the image centre (may be traced)."""
  t = jnp.deg2rad(jnp.asarray(degrees, jnp.float32))
  c, s = jnp.cos(t), jnp.sin(t)
  cy, cx = (height - 1) / 2.0, (width - 1) / 2.0
  return jnp.array([[c, -s, cy - c * cy + s * cx],
                    [s, c, cx - s * cy - c * cx],
                    [0.0, 0.0, 1.0]], jnp.float32)


def sample_geometry(key, height: int, width: int, cfg: AugmentConfig):
  """One random crop + flips as a single affine, shareable with a mask."""
  return _geometry(_draw(key, _GEOMETRY_DRAWS), height, width, cfg)


def adjust_brightness(image: Array, factor) -> Array:
  """Multiplicative, like scanner gain: an offset would lift the background."""
  return jnp.clip(image * factor, 0.0, 1.0)


def adjust_contrast(image: Array, factor) -> Array:
  """Scales deviations from the per-channel mean (tf.image convention)."""
  mean = jnp.mean(image, axis=(0, 1), keepdims=True)
  return jnp.clip((image - mean) * factor + mean, 0.0, 1.0)


def adjust_gamma(image: Array, g) -> Array:
  return jnp.clip(image, 0.0, 1.0) ** g


def brightness(key, image: Array, max_delta: float) -> Array:
  """Gain factor ~ U(1 - max_delta, 1 + max_delta)."""
  factor, = _scale(_draw(key, 1), (max(0.0, 1 - max_delta), 1 + max_delta))
  return adjust_brightness(image, factor)


def contrast(key, image: Array, lower: float, upper: float) -> Array:
  factor, = _scale(_draw(key, 1), (lower, upper))
  return adjust_contrast(image, factor)


def gamma(key, image: Array, lower: float, upper: float) -> Array:
  """Log-uniform exponent: brightening and darkening equally likely."""
  log_g, = _scale(_draw(key, 1), (math.log(lower), math.log(upper)))
  return adjust_gamma(image, jnp.exp(log_g))


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
  return jnp.einsum('ij,jwc,kw->ikc', rows, image, cols,
                    precision=jax.lax.Precision.HIGHEST)


def apply_gaussian_blur(image: Array, sigma, radius: int) -> Array:
  """Separable Gaussian blur of rows and columns with a static radius."""
  x = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
  k = jnp.exp(-0.5 * (x / sigma) ** 2)
  return _separable(image, k / jnp.sum(k))


def _gaussian_blur(u, image, sigma, p):
  u_on, s = _scale(u, (0, 1), sigma)
  blurred = apply_gaussian_blur(image, s, max(1, math.ceil(3 * sigma[1])))
  return jnp.where(u_on < p, blurred, image)


def gaussian_blur(key, image: Array, sigma=(0.1, 2.0), p: float = 0.5):
  """Blurs with probability p; sigma ~ U(sigma), radius 3 * max sigma."""
  return _gaussian_blur(_draw(key, 2), image, sigma, p)


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
  field = jnp.maximum(1.0 - b * b + b * z, 0.0) ** 3
  if smooth:
    field = 1.0 + (_separable(field, _BINOMIAL) - 1.0) / _BINOMIAL_STD
  return field


def _speckle(u, z, image, strength, smooth=True):
  if strength <= 0:
    return image
  field = _gamma_field(z, strength, smooth)
  return jnp.clip(image * (1.0 + u[0] * (field - 1.0)), 0.0, 1.0)


def speckle(key, image: Array, strength: float, smooth: bool = True) -> Array:
  """Multiplicative speckle with per-example level U(0, strength).

  One field for all channels: speckle belongs to the tissue, not a channel.
  """
  if strength <= 0:
    return image
  k_level, k_field = jax.random.split(key)
  z = jax.random.normal(k_field, image.shape[:2] + (1,))
  return _speckle(_draw(k_level, 1), z, image, strength, smooth)


def _depth_gain(u, image, max_db):
  knots = u.shape[0]
  db = -max_db + 2.0 * max_db * u
  rows = jnp.arange(image.shape[0], dtype=jnp.float32)
  db_rows = jnp.interp(rows, jnp.linspace(0.0, image.shape[0] - 1.0, knots), db)
  gain = 10.0 ** (db_rows / 20.0)
  return jnp.clip(image * gain[:, None, None], 0.0, 1.0)


def depth_gain(key, image: Array, max_db: float, knots: int = 4) -> Array:
  """Time-gain-compensation-like gain that depends on depth only.

  Piecewise linear in dB between `knots` random levels in [-max_db, max_db]
  spread over the depth, like a scanner's bank of TGC sliders.
  """
  return _depth_gain(_draw(key, knots), image, max_db)


def fan_field(height: int, width: int, apex_row, apex_col, half_angle,
              radius) -> Array:
  """[H, W, 1] indicator of a sector (apex, half angle, outer radius)."""
  rows, cols = jnp.meshgrid(jnp.arange(height, dtype=jnp.float32),
                            jnp.arange(width, dtype=jnp.float32), indexing='ij')
  dy, dx = rows - apex_row, cols - apex_col
  inside = ((jnp.arctan2(jnp.abs(dx), dy) <= half_angle)
            & (jnp.hypot(dx, dy) <= radius))
  return inside.astype(jnp.float32)[..., None]


def _fan(u, height, width, p):
  """Random convex-probe sector (or all ones with probability 1 - p).

  Apex at most 0.3 H above the top and half angle at most 40 degrees keep
  both top corners outside for square-ish images.
  """
  u_on, depth, shift, degrees, reach = _scale(
      u, (0, 1), (0.05, 0.3), (-0.05, 0.05), (25.0, 40.0), (0.9, 1.2))
  apex_row = -height * depth
  # A reach below 1 cuts the bottom with the sector's curved far edge.
  field = fan_field(height, width, apex_row, (width - 1) / 2 + width * shift,
                    jnp.deg2rad(degrees), (height - apex_row) * reach)
  return jnp.where(u_on < p, field, 1.0)


def fan_mask(key, image: Array, p: float = 0.5) -> Array:
  """With probability p, zeroes everything outside a random sector."""
  return image * _fan(_draw(key, 5), *image.shape[:2], p)


def shadow_field(height: int, width: int, center, half_width, start_row,
                 strength, softness) -> Array:
  """[H, W, 1] multiplier: a soft-edged band darkened below `start_row`."""
  rows = jnp.arange(height, dtype=jnp.float32)[:, None]
  cols = jnp.arange(width, dtype=jnp.float32)[None, :]
  across = jax.nn.sigmoid((half_width - jnp.abs(cols - center)) / softness)
  below = jax.nn.sigmoid((rows - start_row) / softness)
  return (1.0 - strength * across * below)[..., None]


def _shadow(u, image, p):
  height, width = image.shape[:2]
  u_on, center, half_width, start_row, strength = _scale(
      u, (0, 1), (0, width), (0.03 * width, 0.12 * width),
      (0.2 * height, 0.8 * height), (0.5, 0.95))
  field = shadow_field(height, width, center, half_width, start_row, strength,
                       jnp.maximum(1.0, 0.3 * half_width))
  return image * jnp.where(u_on < p, field, 1.0)


def shadow_dropout(key, image: Array, p: float = 0.2) -> Array:
  """With probability p, darkens a band below a random depth.

  Mimics acoustic shadowing: calcifications and some lesions block the beam.
  """
  return _shadow(_draw(key, 5), image, p)


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  """Augmentation recipe; hashable so it can be a static jit argument.

  Defaults are the SimCLR recipe adapted to grayscale ultrasound: no
  saturation/hue or vertical flip; speckle, depth gain, fan masks and shadows
  added. A strength or probability of 0 switches a transform off.
  """
  crop_scale: tuple[float, float] = (0.2, 1.0)
  crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
  hflip: bool = True
  vflip: bool = False
  brightness: float = 0.4  # gain factor ~ U(1 - b, 1 + b)
  contrast: float = 0.4  # factor ~ U(1 - c, 1 + c)
  gamma: float = 0.3  # exponent log-uniform in [1 / (1 + g), 1 + g]
  blur_prob: float = 0.5
  speckle: float = 0.3  # largest std of the multiplicative speckle field
  depth_gain_db: float = 6.0  # depth-gain knots ~ U(-dB, dB)
  fan_prob: float = 0.2
  shadow_prob: float = 0.2
  rotate: float = 0.0  # rotation angle ~ U(-rotate, rotate) degrees (segmentation)

  def __post_init__(self):
    for f in dataclasses.fields(self):
      value = getattr(self, f.name)
      top = (1 if f.name.endswith('prob') or f.name == 'crop_scale' else
             180 if f.name == 'rotate' else math.inf)
      if isinstance(f.default, tuple) and not (
          len(value) == 2 and 0 < value[0] <= value[1] <= top):
        raise ValueError(f'{f.name} needs (low, high), 0 < low <= high <= '
                         f'{top}; got {value}')
      if isinstance(f.default, float) and not 0 <= value <= top:
        raise ValueError(f'{f.name} must be in [0, {top}], got {value}')

  @classmethod
  def segmentation(cls) -> AugmentConfig:
    """Milder recipe for fine-tuning, where labels must stay plausible."""
    return cls(crop_scale=(0.5, 1.0), brightness=0.2, contrast=0.2, gamma=0.15,
               blur_prob=0.2, speckle=0.15, depth_gain_db=3.0, fan_prob=0.0,
               shadow_prob=0.0, rotate=15.0)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any] | Any,
                base: AugmentConfig | None = None) -> AugmentConfig:
    """Overrides `base` (default: the defaults) from a dict or ConfigDict.

    Unknown keys raise, so a typo cannot silently fall back to a default.
    """
    if hasattr(d, 'to_dict'):
      d = d.to_dict()
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    for key in d:
      if key not in defaults:
        raise ValueError(f'unknown augmentation key {key!r}; expected one of '
                         f'{sorted(defaults)}')
    cast = lambda k, v: (tuple(map(float, v)) if isinstance(defaults[k], tuple)
                         else type(defaults[k])(v))
    return dataclasses.replace(base or cls(),
                               **{k: cast(k, v) for k, v in dict(d).items()})


# Uniform draws per stage: speckle level, shadow, depth knots, blur,
# brightness, contrast, gamma.
_PHOTO_COUNTS = (1, 5, 4, 2, 1, 1, 1)
_FAN_DRAWS = 5
_VIEW_DRAWS = _GEOMETRY_DRAWS + sum(_PHOTO_COUNTS) + _FAN_DRAWS


def _photometric(u, z, image: Array, cfg: AugmentConfig) -> Array:
  """Intensity transforms in acquisition order: tissue, receiver, display.

  Speckle (from the normals z) and shadows arise in the tissue, depth gain in
  the receiver, blur mimics a coarser probe, then the display controls act.
  Disabled transforms are skipped at trace time (cfg is static).
  """
  u_sp, u_sh, u_dg, u_bl, u_br, u_co, u_ga = _split(u, *_PHOTO_COUNTS)
  image = _speckle(u_sp, z, image, cfg.speckle)
  if cfg.shadow_prob > 0:
    image = _shadow(u_sh, image, cfg.shadow_prob)
  if cfg.depth_gain_db > 0:
    image = _depth_gain(u_dg, image, cfg.depth_gain_db)
  if cfg.blur_prob > 0:
    image = _gaussian_blur(u_bl, image, (0.1, 2.0), cfg.blur_prob)
  if cfg.brightness > 0:
    b = cfg.brightness
    image = adjust_brightness(image, _scale(u_br, (max(0, 1 - b), 1 + b))[0])
  if cfg.contrast > 0:
    c = cfg.contrast
    image = adjust_contrast(image, _scale(u_co, (max(0, 1 - c), 1 + c))[0])
  if cfg.gamma > 0:
    log_g = math.log1p(cfg.gamma)
    image = adjust_gamma(image, jnp.exp(_scale(u_ga, (-log_g, log_g))[0]))
  return jnp.clip(image, 0.0, 1.0)


def _sample_view(key, height, width, cfg):
  """Everything random about one view from a single PRNG call.

  Scalars and speckle normals (by inverse CDF) share the call; see the module
  docstring for why.
  """
  n_noise = height * width if cfg.speckle > 0 else 0
  n_rot = 1 if cfg.rotate > 0 else 0  # drawn only when on: views without it are unchanged
  u = jax.random.uniform(key, (_VIEW_DRAWS + n_noise + n_rot,))
  u_geo, u_photo, u_fan, u_noise, u_rot = _split(
      u, _GEOMETRY_DRAWS, sum(_PHOTO_COUNTS), _FAN_DRAWS, n_noise, n_rot)
  eps = jnp.finfo(jnp.float32).eps
  z = math.sqrt(2) * jax.scipy.special.erfinv(
      jnp.clip(2.0 * u_noise - 1.0, -1.0 + eps, 1.0 - eps))
  fan = _fan(u_fan, height, width, cfg.fan_prob) if cfg.fan_prob > 0 else 1.0
  matrix = _geometry(u_geo, height, width, cfg)
  if n_rot:
    matrix = matrix @ rotation_matrix(cfg.rotate * (2.0 * u_rot[0] - 1.0), height, width)
  return (matrix, u_photo, fan,
          z.reshape(height, width, 1) if n_noise else None)


def augment_view(key, image: Array, cfg: AugmentConfig) -> Array:
  """One random view of one example [H, W, C]."""
  matrix, u_photo, fan, z = _sample_view(key, *image.shape[:2], cfg)
  image = _photometric(u_photo, z, warp(image, matrix), cfg)
  return jnp.clip(image * fan, 0.0, 1.0)


def two_views(key, images: Array, cfg: AugmentConfig):
  """Two independently augmented views of a batch [B, H, W, C]."""
  batch = images.shape[0]
  keys = jax.random.split(key, 2 * batch)  # views 1 and 2: disjoint keys
  # One vmap over 2B examples traces and compiles the pipeline once.
  views = jax.vmap(lambda k, x: augment_view(k, x, cfg))(
      keys, jnp.concatenate([images, images]))
  return views[:batch], views[batch:]


def augment_pair(key, image: Array, mask: Array, cfg: AugmentConfig):
  """Image and mask under one geometry; intensity changes on the image only.

  The mask is resampled bilinearly and thresholded at 0.5, so its boundary
  follows the image's interpolated edge. A fan mask, when enabled, zeroes the
  label too: a lesion blanked out of the image cannot be segmented.
  """
  matrix, u_photo, fan, z = _sample_view(key, *image.shape[:2], cfg)
  image = _photometric(u_photo, z, warp(image, matrix), cfg)
  mask = (warp(mask, matrix) >= 0.5).astype(mask.dtype)
  return jnp.clip(image * fan, 0.0, 1.0), mask * fan


def augment_batch_pairs(key, images: Array, masks: Array, cfg: AugmentConfig):
  """`augment_pair` over a batch [B, H, W, C] with one key per example."""
  keys = jax.random.split(key, images.shape[0])
  return jax.vmap(lambda k, x, m: augment_pair(k, x, m, cfg))(
      keys, images, masks)
