"""On-device augmentation for contrastive pre-training and segmentation.

Transforms are pure functions of one example [H, W, C] (float32 in [0, 1])
with static shapes, so the pipeline jits and vmaps over a batch with
per-example keys; random on/off decisions are `jnp.where` blends. Each random
transform is driven by a few pre-drawn uniforms `u`, so a composite view makes
one PRNG call for everything (`_sample_view`): each call is a threefry
instance in the compiled graph, and on CPU those dominated compile time. The
tests call the same transforms with uniforms of their own.

Geometry (crop + flips + rotation) is a 3x3 affine mapping output pixel
coordinates (row, col, 1) to input ones, so one sample applies identically to
an image and its mask. Index i sits at coordinate i (pixel centres): the
full-image crop is an exact identity. Rows are depth (row 0 touches the
probe), hence no vertical flips by default and depth-aware ultrasound
transforms.

This module holds the spatial transforms (geometry and the fan sector, which
blanks image and label alike), the recipe and the composed views; the
image-only intensity transforms are in `usjax.augment_intensity`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax.scipy import ndimage

from usjax.augment_intensity import PHOTO_DRAWS, photometric, split_uniforms, to_ranges

Array = jax.Array


def crop_matrix(box, height: int, width: int) -> Array:
  """Affine matrix resampling the box (y0, x0, h, w) onto the full grid."""
  y0, x0, h, w = (jnp.asarray(v, jnp.float32) for v in box)
  sy, sx = h / height, w / width
  # Output pixel centre r + 0.5 lands on y0 + (r + 0.5) * sy.
  return jnp.array([[sy, 0.0, y0 + 0.5 * sy - 0.5], [0.0, sx, x0 + 0.5 * sx - 0.5], [0.0, 0.0, 1.0]], jnp.float32)


def flip_matrix(hflip, vflip, height: int, width: int) -> Array:
  """Affine matrix of optional flips; the flags may be traced booleans."""
  fh, fv = jnp.asarray(hflip, jnp.float32), jnp.asarray(vflip, jnp.float32)
  return jnp.array([[1.0 - 2.0 * fv, 0.0, fv * (height - 1)], [0.0, 1.0 - 2.0 * fh, fh * (width - 1)], [0.0, 0.0, 1.0]],
                   jnp.float32)


def warp(image: Array, matrix: Array, order: int = 1) -> Array:
  """Resamples [H, W, C] at `matrix @ (row, col, 1)`, clamping at edges."""
  height, width = image.shape[:2]
  rows, cols = jnp.meshgrid(jnp.arange(height, dtype=jnp.float32), jnp.arange(width, dtype=jnp.float32), indexing='ij')
  src_r = matrix[0, 0] * rows + matrix[0, 1] * cols + matrix[0, 2]
  src_c = matrix[1, 0] * rows + matrix[1, 1] * cols + matrix[1, 2]
  # Per-channel 2-D interpolation: a third (channel) coordinate doubles gathers.
  sample = lambda ch: ndimage.map_coordinates(ch, [src_r, src_c], order=order, mode='nearest')
  return jax.vmap(sample, in_axes=2, out_axes=2)(image)


CROP_DRAWS = 4


def crop_box(u, height: int, width: int, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)) -> Array:
  """(y0, x0, h, w) from CROP_DRAWS uniforms: area fraction ~ U(scale), aspect log-uniform (SimCLR's random
  resized crop, resampled by `crop_and_resize`).

  An oversized side is clipped to the image instead of rejection sampling (a
  data-dependent loop), at the cost of a smaller area for extreme draws.
  """
  frac, log_r, u_y, u_x = to_ranges(u, scale, (math.log(ratio[0]), math.log(ratio[1])), (0, 1), (0, 1))
  area, aspect = height * width * frac, jnp.exp(log_r)  # aspect = w / h
  w = jnp.clip(jnp.sqrt(area * aspect), 1.0, width)
  h = jnp.clip(jnp.sqrt(area / aspect), 1.0, height)
  return jnp.stack([u_y * (height - h), u_x * (width - w), h, w])


def crop_and_resize(image: Array, box) -> Array:
  """Bilinear resample of the box (y0, x0, h, w) to the full image size."""
  return warp(image, crop_matrix(box, *image.shape[:2]), order=1)


GEOMETRY_DRAWS = CROP_DRAWS + 2


def geometry(u, height: int, width: int, cfg: AugmentConfig) -> Array:
  """One random crop + flips (each on with probability 1/2 where `cfg` allows it) from GEOMETRY_DRAWS uniforms,
  as a single affine that applies identically to an image and its mask."""
  u_crop, u_flip = split_uniforms(u, CROP_DRAWS, 2)
  box = crop_box(u_crop, height, width, cfg.crop_scale, cfg.crop_ratio)
  fh = (u_flip[0] < 0.5) & cfg.hflip
  fv = (u_flip[1] < 0.5) & cfg.vflip
  # Flip the output grid, then map it through the crop: a flipped crop.
  return crop_matrix(box, height, width) @ flip_matrix(fh, fv, height, width)


def rotation_matrix(degrees, height: int, width: int) -> Array:
  """Affine matrix of a rotation by `degrees` about the image centre (may be traced)."""
  t = jnp.deg2rad(jnp.asarray(degrees, jnp.float32))
  c, s = jnp.cos(t), jnp.sin(t)
  cy, cx = (height - 1) / 2.0, (width - 1) / 2.0
  return jnp.array([[c, -s, cy - c * cy + s * cx], [s, c, cx - s * cy - c * cx], [0.0, 0.0, 1.0]], jnp.float32)


def fan_field(height: int, width: int, apex_row, apex_col, half_angle, radius) -> Array:
  """[H, W, 1] indicator of a sector (apex, half angle, outer radius)."""
  rows, cols = jnp.meshgrid(jnp.arange(height, dtype=jnp.float32), jnp.arange(width, dtype=jnp.float32), indexing='ij')
  dy, dx = rows - apex_row, cols - apex_col
  inside = ((jnp.arctan2(jnp.abs(dx), dy) <= half_angle) & (jnp.hypot(dx, dy) <= radius))
  return inside.astype(jnp.float32)[..., None]


FAN_DRAWS = 5


def fan(u, height: int, width: int, p: float = 0.5) -> Array:
  """[H, W, 1]: a random convex-probe sector with probability p (u[0] < p), else all ones; FAN_DRAWS uniforms.
  Multiplying by it zeroes everything outside the sector.

  Apex at most 0.3 H above the top and half angle at most 40 degrees keep
  both top corners outside for square-ish images.
  """
  u_on, depth, shift, degrees, reach = to_ranges(u, (0, 1), (0.05, 0.3), (-0.05, 0.05), (25.0, 40.0), (0.9, 1.2))
  apex_row = -height * depth
  # A reach below 1 cuts the bottom with the sector's curved far edge.
  field = fan_field(height, width, apex_row, (width - 1) / 2 + width * shift, jnp.deg2rad(degrees),
                    (height - apex_row) * reach)
  return jnp.where(u_on < p, field, 1.0)


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
      top = (1 if f.name.endswith('prob') or f.name == 'crop_scale' else 180 if f.name == 'rotate' else math.inf)
      if isinstance(f.default, tuple) and not (len(value) == 2 and 0 < value[0] <= value[1] <= top):
        raise ValueError(f'{f.name} needs (low, high), 0 < low <= high <= '
                         f'{top}; got {value}')
      if isinstance(f.default, float) and not 0 <= value <= top:
        raise ValueError(f'{f.name} must be in [0, {top}], got {value}')

  @classmethod
  def segmentation(cls) -> AugmentConfig:
    """Milder recipe for fine-tuning, where labels must stay plausible."""
    return cls(crop_scale=(0.5, 1.0), brightness=0.2, contrast=0.2, gamma=0.15, blur_prob=0.2, speckle=0.15,
               depth_gain_db=3.0, fan_prob=0.0, shadow_prob=0.0, rotate=15.0)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any] | Any, base: AugmentConfig | None = None) -> AugmentConfig:
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
    cast = lambda k, v: (tuple(map(float, v)) if isinstance(defaults[k], tuple) else type(defaults[k])(v))
    return dataclasses.replace(base or cls(), **{k: cast(k, v) for k, v in dict(d).items()})


# Uniform draws per view: geometry, intensity transforms, fan.
_VIEW_DRAWS = GEOMETRY_DRAWS + PHOTO_DRAWS + FAN_DRAWS


def _sample_view(key, height, width, cfg):
  """Everything random about one view from a single PRNG call.

  Scalars and speckle normals (by inverse CDF) share the call; see the module
  docstring for why.
  """
  n_noise = height * width if cfg.speckle > 0 else 0
  n_rot = 1 if cfg.rotate > 0 else 0  # drawn only when on: views without it are unchanged
  u = jax.random.uniform(key, (_VIEW_DRAWS + n_noise + n_rot,))
  u_geo, u_photo, u_fan, u_noise, u_rot = split_uniforms(u, GEOMETRY_DRAWS, PHOTO_DRAWS, FAN_DRAWS, n_noise, n_rot)
  eps = jnp.finfo(jnp.float32).eps
  z = math.sqrt(2) * jax.scipy.special.erfinv(jnp.clip(2.0 * u_noise - 1.0, -1.0 + eps, 1.0 - eps))
  sector = fan(u_fan, height, width, cfg.fan_prob) if cfg.fan_prob > 0 else 1.0
  matrix = geometry(u_geo, height, width, cfg)
  if n_rot:
    matrix = matrix @ rotation_matrix(cfg.rotate * (2.0 * u_rot[0] - 1.0), height, width)
  return (matrix, u_photo, sector, z.reshape(height, width, 1) if n_noise else None)


def augment_view(key, image: Array, cfg: AugmentConfig) -> Array:
  """One random view of one example [H, W, C]."""
  matrix, u_photo, sector, z = _sample_view(key, *image.shape[:2], cfg)
  image = photometric(u_photo, z, warp(image, matrix), cfg)
  return jnp.clip(image * sector, 0.0, 1.0)


def two_views(key, images: Array, cfg: AugmentConfig):
  """Two independently augmented views of a batch [B, H, W, C]."""
  batch = images.shape[0]
  keys = jax.random.split(key, 2 * batch)  # views 1 and 2: disjoint keys
  # One vmap over 2B examples traces and compiles the pipeline once.
  views = jax.vmap(lambda k, x: augment_view(k, x, cfg))(keys, jnp.concatenate([images, images]))
  return views[:batch], views[batch:]


def augment_pair(key, image: Array, mask: Array, cfg: AugmentConfig):
  """Image and mask under one geometry; intensity changes on the image only.

  The mask is resampled bilinearly and thresholded at 0.5, so its boundary
  follows the image's interpolated edge. A fan mask, when enabled, zeroes the
  label too: a lesion blanked out of the image cannot be segmented.
  """
  matrix, u_photo, sector, z = _sample_view(key, *image.shape[:2], cfg)
  image = photometric(u_photo, z, warp(image, matrix), cfg)
  mask = (warp(mask, matrix) >= 0.5).astype(mask.dtype)
  return jnp.clip(image * sector, 0.0, 1.0), mask * sector


def augment_batch_pairs(key, images: Array, masks: Array, cfg: AugmentConfig):
  """`augment_pair` over a batch [B, H, W, C] with one key per example."""
  keys = jax.random.split(key, images.shape[0])
  return jax.vmap(lambda k, x, m: augment_pair(k, x, m, cfg))(keys, images, masks)
