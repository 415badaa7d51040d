"""Deterministic synthetic B-mode ultrasound: breast, lung and heart phantoms drawn from a seeded stream.

The images stand in for real scans in tests and smoke runs, so they imitate what
a model actually sees: tissue echogenicity times correlated speckle, depth
attenuation partly undone by TGC, log compression and the field of view of a
linear, convex or phased-array probe. Pure numpy/scipy, a few ms a frame; no
TFDS, so drawing a few images does not import it (`synthetic` builds data sets).
"""

import functools
from typing import NamedTuple

import numpy as np
from scipy import ndimage

from usjax.data import DataError

ORGAN_ID = {'breast': 0, 'lung': 1, 'heart': 2}
BREAST_LABELS = ('benign', 'malignant', 'normal')
_BREAST_PROBS = (0.5, 0.3, 0.2)

# ---------------------------------------------------------------- geometry


class _Grid(NamedTuple):
  """Beam grid (rows = depth, cols = scan lines) and how it maps to pixels.

  Anatomy is drawn at the Cartesian position of every beam sample (x, y in
  image-height units, y down) so that speckle, which lives along the beams, can
  be scan converted afterwards the way a scanner does it.
  """
  x: np.ndarray
  y: np.ndarray
  depth: np.ndarray  # distance from the transducer face, 0..1
  lateral: np.ndarray  # position across the scan lines, 0..1
  coords: np.ndarray | None  # pixel -> beam-grid coordinates; None = identity
  inside: np.ndarray | None  # pixels inside the field of view


def _frozen(*arrays):
  for a in arrays:
    a.flags.writeable = False  # cached: callers must not write into them
  return arrays


@functools.lru_cache(maxsize=16)
def _linear_grid(size: int) -> _Grid:
  c = ((np.arange(size) + 0.5) / size).astype(np.float32)
  y, x = np.meshgrid(c, c, indexing='ij')
  return _Grid(*_frozen(x, y, y, x), None, None)


@functools.lru_cache(maxsize=16)
def _fan_grid(size: int, r0: float, half: float) -> _Grid:
  """Fan from a virtual apex r0 above the top centre (r0=0: phased array)."""
  c = (np.arange(size) + 0.5) / size
  depth, lateral = np.meshgrid(c, c, indexing='ij')
  theta = (2 * lateral - 1) * half
  r = r0 + depth
  x, y = 0.5 + r * np.sin(theta), r * np.cos(theta) - r0
  py, px = np.meshgrid(c, c, indexing='ij')
  pr = np.hypot(px - 0.5, py + r0)
  pt = np.arctan2(px - 0.5, py + r0)
  coords = np.stack([(pr - r0) * size - 0.5, (pt / half + 1) / 2 * size - 0.5])
  inside = (pr >= r0) & (pr <= r0 + 1) & (np.abs(pt) <= half)
  f32 = lambda a: a.astype(np.float32)
  return _Grid(*_frozen(f32(x), f32(y), f32(depth), f32(lateral), f32(coords), inside))


def _to_image(grid: _Grid, beam: np.ndarray) -> np.ndarray:
  if grid.coords is None:
    return beam
  img = ndimage.map_coordinates(beam, grid.coords, order=1, mode='nearest')
  return np.where(grid.inside, img, 0.0)


# ---------------------------------------------------------------- physics


def _gauss_kernel(sigma: float) -> np.ndarray:
  r = max(1, int(np.ceil(3 * sigma)))
  w = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma)**2)
  return (w / w.sum()).astype(np.float32)


@functools.lru_cache(maxsize=64)
def _upsampler(size: int, cells: int) -> np.ndarray:
  """(size, cells + 2) Gaussian interpolation weights: smooth noise by matmul."""
  pos = (np.arange(size) + 0.5) / size * cells + 0.5
  w = np.exp(-0.5 * ((pos[:, None] - np.arange(cells + 2)[None]) / 0.7)**2)
  w /= np.sqrt((w**2).sum(1, keepdims=True))  # unit variance for white noise
  return _frozen(w.astype(np.float32))[0]


def _texture(rng, size: int, cells: int, cells_lat: int | None = None) -> np.ndarray:
  """Smooth zero-mean, unit-variance random field on the beam grid."""
  cells_lat = cells_lat or cells
  g = rng.standard_normal((cells + 2, cells_lat + 2), dtype=np.float32)
  rows, cols = _upsampler(size, cells), _upsampler(size, cells_lat)
  # Sum of outer products rather than a matmul: BLAS threads cost more than
  # they save at this size.
  gc = g @ cols.T
  out = np.zeros((size, size), np.float32)
  for k in range(cells + 2):
    out += np.outer(rows[:, k], gc[k])
  return out


def _band(d, centre, width):
  """Gaussian profile of a thin layer (skin, pleura, fascia) at depth `centre`."""
  return np.exp(-0.5 * ((d - centre) / width)**2)


def _bmode(rng, grid: _Grid, echo: np.ndarray, size: int) -> np.ndarray:
  """Echogenicity on the beam grid -> scan-converted 8-bit B-mode image.

  Complex Gaussian scatterers weighted by echogenicity, blurred by an
  anisotropic PSF (wider laterally than axially), give correlated speckle;
  then exponential attenuation with partial TGC and log compression.
  """
  sig_ax = max(0.45, size / 200)
  k_ax, k_lat = _gauss_kernel(sig_ax), _gauss_kernel(2.2 * sig_ax)
  norm = 4 * (k_ax**2).sum() * (k_lat**2).sum()
  z = rng.standard_normal((4,) + echo.shape, dtype=np.float32)
  z *= echo.astype(np.float32)
  z = ndimage.correlate1d(z, k_ax, axis=1, mode='reflect')
  z = ndimage.correlate1d(z, k_lat, axis=2, mode='reflect')
  # Two compounded looks: gamma(2) intensity, fewer of the deep nulls that a
  # single Rayleigh look turns into black worms after log compression.
  env = np.sqrt(np.einsum('kij,kij->ij', z, z) / norm)
  alpha = rng.uniform(0.4, 1.0)  # nepers left over after TGC
  dyn_range = rng.uniform(45.0, 55.0)
  gain = rng.uniform(-2.0, 2.0)
  db = 20 * np.log10(env * np.exp(-alpha * grid.depth) + 1e-5) + gain
  img = _to_image(grid, (db + dyn_range) * (255.0 / dyn_range))
  return np.clip(img, 0, 255).astype(np.uint8)


def _ellipse(x, y, cx, cy, a, b, rot=0.0):
  """Squared normalised radius: < 1 inside the ellipse."""
  c, s = np.cos(rot), np.sin(rot)
  u, v = (x - cx) * c + (y - cy) * s, -(x - cx) * s + (y - cy) * c
  return (u / a)**2 + (v / b)**2


# ---------------------------------------------------------------- organs


def _breast_label(rng) -> str:
  """First draw of a breast image's stream, so labels are cheap to recompute."""
  return BREAST_LABELS[rng.choice(3, p=_BREAST_PROBS)]


def _lesion(rng, x, y, label, top, bottom):
  """Lesion indicator, its centre and half width; malignant borders are spiculated."""
  cx = rng.uniform(0.28, 0.72)
  if label == 'benign':
    a = rng.uniform(0.08, 0.17)
    b = a * rng.uniform(0.5, 0.8)  # wider than tall
    cy = rng.uniform(top + b + 0.03, max(top + b + 0.04, bottom - b))
    return _ellipse(x, y, cx, cy, a, b, rng.uniform(-0.25, 0.25)) < 1, cx, a, cy
  r = rng.uniform(0.07, 0.13)
  aspect = rng.uniform(0.85, 1.3)  # often taller than wide
  cy = rng.uniform(top + r * aspect + 0.03, max(top + r * aspect + 0.04, bottom - r))
  phi = np.arctan2((y - cy) / aspect, x - cx)
  rho = np.hypot(x - cx, (y - cy) / aspect)
  mod = np.ones_like(phi)
  for k in range(2, 6):  # lobulation
    mod += rng.uniform(0.02, 0.1) * np.cos(k * phi + rng.uniform(0, 2 * np.pi))
  k = rng.integers(9, 17)
  spikes = np.cos(k * phi + rng.uniform(0, 2 * np.pi)).clip(0)**6
  mod += rng.uniform(0.25, 0.5) * spikes * (1 + 0.5 * np.cos(3 * phi))
  return rho < r * mod, cx, 1.5 * r, cy


def breast(rng, size: int):
  """Linear-probe breast scan: skin, fat, glandular tissue, chest wall and a lesion.

  Returns (image, mask, label); mask is 255 exactly on the lesion.
  """
  label = _breast_label(rng)
  g = _linear_grid(size)
  x, y = g.x, g.y
  wave = lambda amp: amp * np.sin(2 * np.pi * (rng.uniform(0.5, 1.5) * x + rng.uniform()))
  skin = rng.uniform(0.03, 0.05)
  fat_end = rng.uniform(0.18, 0.28) + wave(0.03) + 0.02 * _texture(rng, size, 3, 6)
  gland_end = rng.uniform(0.72, 0.82) + wave(0.04)
  tex = _texture(rng, size, 10, 8)
  echo = np.where(y < fat_end, 0.035 * np.exp(0.25 * tex), 0.11 * np.exp(0.55 * tex))
  lobules = _texture(rng, size, 14, 10) > 1.3  # fat islands within the gland
  echo = np.where(lobules & (y > fat_end), 0.035, echo)
  echo = np.where(y > gland_end, 0.06 * (1 + 0.4 * np.sin(size * 0.6 * y + 3 * tex)), echo)
  echo += 0.5 * _band(y, skin, 0.008) + 0.12 * _band(y, fat_end, 0.01)
  echo += 0.2 * _band(y, gland_end, 0.008)
  # Cooper's ligaments: thin bright curves through the fat.
  lig = np.abs(np.sin(2 * np.pi * (rng.uniform(2, 4) * x + 3 * y + 0.3 * tex)))
  echo += np.where((y > skin + 0.02) & (y < fat_end), 0.1 * (lig < 0.08), 0)
  mask = np.zeros((size, size), bool)
  if label != 'normal':
    mask, cx, half, cy = _lesion(rng, x, y, label, fat_end.max() + 0.02, gland_end.min() - 0.08)
    column = np.exp(-0.5 * ((x - cx) / (0.6 * half))**4) * (y > cy)
    if label == 'benign':  # posterior acoustic enhancement
      echo = echo * (1 + rng.uniform(0.3, 0.7) * column)
      inner = rng.uniform(0.008, 0.02) * np.exp(0.15 * tex)
    else:  # posterior acoustic shadowing
      echo = echo * (1 - rng.uniform(0.55, 0.8) * column)
      inner = rng.uniform(0.015, 0.025) * np.exp(0.5 * tex)
    echo = np.where(mask, inner, echo)
  image = _bmode(rng, g, echo, size)
  return image, mask.astype(np.uint8) * 255, label


def lung(rng, size: int) -> np.ndarray:
  """Linear or convex lung scan: ribs and their shadows, pleura, A-lines, maybe B-lines."""
  convex = rng.random() < 0.5
  g = _fan_grid(size, 0.6, np.deg2rad(30)) if convex else _linear_grid(size)
  d, u = g.depth, g.lateral
  pleura = rng.uniform(0.15, 0.25)
  width = max(0.006, 0.6 / size)
  tex = _texture(rng, size, 6, 10)
  wall = 0.05 * np.exp(0.3 * tex) * (1 + 0.5 * np.sin(size * 0.8 * d + 2 * tex)**2)
  echo = np.where(d < pleura, wall, 0.012 * np.exp(0.3 * tex))
  echo += 0.25 * _band(d, rng.uniform(0.03, 0.08), width)  # fascia
  echo += 1.0 * _band(d, pleura, width)
  decay = rng.uniform(0.45, 0.7)
  alines = sum(0.12 * decay**(k - 2) * _band(d, k * pleura, width * (1 + 0.2 * k))
               for k in range(2,
                              int(1 / pleura) + 1))
  blines = np.zeros_like(d)
  if rng.random() < 0.4:
    for _ in range(rng.integers(1, 5)):
      c = rng.uniform(0.3, 0.7)
      blines = np.maximum(blines, _band(u, c, rng.uniform(0.006, 0.014)))
  below = d > pleura
  echo += below * (alines * (1 - blines) + 0.45 * blines * (1 - 0.4 * d))
  for c in (rng.uniform(0.02, 0.18), rng.uniform(0.82, 0.98)):  # ribs
    half = rng.uniform(0.08, 0.13)
    top = pleura - rng.uniform(0.01, 0.04) + 2.5 * (u - c)**2
    rib = np.abs(u - c) < half
    echo = np.where(rib & (d > top), 0.004, echo)
    echo += rib * 0.6 * _band(d, top, width)
  return _bmode(rng, g, echo, size)


def heart(rng, size: int) -> np.ndarray:
  """Apical 4- or 2-chamber view through a phased-array sector, apex at the top."""
  g = _fan_grid(size, 0.0, np.deg2rad(rng.choice([40, 45])))
  x, y = g.x, g.y
  hx, hy = 0.5 + rng.uniform(-0.03, 0.03), rng.uniform(0.5, 0.55)
  rot = rng.uniform(-0.15, 0.15)
  j = lambda: rng.uniform(0.9, 1.1)
  if rng.random() < 0.6:  # LV, RV, LA, RA: (dx, dy, a, b, tilt); ventricles meet at the apex
    chambers = [(0.085, -0.1, 0.08, 0.23, -0.3), (-0.09, -0.07, 0.065, 0.17, 0.3), (0.1, 0.22, 0.085, 0.09, 0.0),
                (-0.1, 0.22, 0.075, 0.09, 0.0)]
  else:  # LV over LA
    chambers = [(0.0, -0.1, 0.1, 0.22, 0.0), (0.0, 0.22, 0.1, 0.1, 0.0)]
  wall = rng.uniform(0.03, 0.045)
  blood = np.zeros_like(x, bool)
  myo = np.zeros_like(x, bool)
  peri = np.zeros_like(x, bool)
  c, s = np.cos(rot), np.sin(rot)
  for dx, dy, a, b, tilt in chambers:
    cx, cy = hx + dx * c - dy * s, hy + dx * s + dy * c
    a, b, t = a * j(), b * j(), rot + tilt
    blood |= _ellipse(x, y, cx, cy, a, b, t) < 1
    myo |= _ellipse(x, y, cx, cy, a + wall, b + wall, t) < 1
    peri |= _ellipse(x, y, cx, cy, a + wall + 0.015, b + wall + 0.015, t) < 1
  tex, fine = _texture(rng, size, 8, 8), _texture(rng, size, 24, 16)
  echo = 0.02 * np.exp(0.6 * tex)  # lung and mediastinum around the heart
  echo = np.where(peri, 0.04 + 0.3 * np.clip((y - hy) / 0.3, 0, 1), echo)
  echo = np.where(myo, rng.uniform(0.05, 0.08) * np.exp(0.3 * tex + 0.3 * fine), echo)
  echo = np.where(blood & myo, 0.004, echo)
  echo += 0.06 * np.exp(-g.depth / 0.06)  # near-field clutter
  return _bmode(rng, g, echo, size)


# ---------------------------------------------------------------- streams

_ORGANS = {'breast': breast, 'lung': lung, 'heart': heart}


def check_organ(organ):
  """Raises a DataError naming the known organs."""
  if organ not in ORGAN_ID:
    raise DataError(f'unknown organ {organ!r}: expected one of {sorted(ORGAN_ID)}')


def int_at_least(name: str, value, low: int) -> int:
  """`value` as an int; a DataError naming `name` for a bool, a non-int or one below `low`."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
    raise DataError(f'{name} must be an int >= {low}, got {value!r}')
  return int(value)


def generate(organ: str, index: int, size: int, seed: int) -> dict:
  """Image `index` of an organ's stream: {'image', 'label'[, 'mask']}, HxWx1 uint8."""
  check_organ(organ)
  size = int_at_least('size', size, 16)
  rng = np.random.default_rng([seed, ORGAN_ID[organ], index])
  if organ == 'breast':
    image, mask, label = breast(rng, size)
    return {'image': image[..., None], 'label': label, 'mask': mask[..., None]}
  return {'image': _ORGANS[organ](rng, size)[..., None], 'label': organ}


def label_of(organ: str, index: int, seed: int) -> str:
  """The label `generate` gives, without drawing the image."""
  check_organ(organ)
  if organ != 'breast':
    return organ
  return _breast_label(np.random.default_rng([seed, ORGAN_ID[organ], index]))
