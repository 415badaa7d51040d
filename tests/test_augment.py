"""Tests for usjax.augment and usjax.augment_intensity: numpy/scipy references and invariants."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from scipy import ndimage as sp_ndimage

from usjax import augment, augment_intensity

OFF = dict(brightness=0.0, contrast=0.0, gamma=0.0, blur_prob=0.0, speckle=0.0, depth_gain_db=0.0, fan_prob=0.0,
           shadow_prob=0.0)


def _image(shape=(16, 16, 1), seed=0):
  return np.random.default_rng(seed).uniform(size=shape).astype(np.float32)


def _jit(fn, *args, **static):
  """Runs fn under one jit: one compile beats op-by-op eager dispatch."""
  return jax.jit(lambda *a: fn(*a, **static))(*args)


def _keys(n, seed=0):
  return jax.random.split(jax.random.key(seed), n)


def _uniforms(n, count, seed=0):
  """[n, count]: the uniforms of n random draws of a transform that takes `count`, as training draws them."""
  return jax.vmap(lambda k: augment_intensity.uniforms(k, count))(_keys(n, seed))


def _disks(batch, size, seed=0):
  """Binary masks with one off-centre disk each, like a lesion."""
  rng = np.random.default_rng(seed)
  rows, cols = np.mgrid[:size, :size]
  masks = []
  for _ in range(batch):
    cy, cx = rng.uniform(0.3 * size, 0.7 * size, 2)
    r = rng.uniform(0.1 * size, 0.25 * size)
    masks.append(((rows - cy)**2 + (cols - cx)**2 <= r * r)[..., None])
  return np.stack(masks).astype(np.float32)


# Geometry.


def test_geometry_flips_match_numpy_and_follow_the_recipe():
  x = _image((16, 12, 3))
  full = dict(crop_scale=(1.0, 1.0), crop_ratio=(0.75, 0.75))  # 16 x 12: the whole image, an exact identity
  u = lambda fh, fv: jnp.array([0.0, 0.0, 0.0, 0.0, fh, fv])  # a flip is on where its uniform is below 1/2
  both = augment.AugmentConfig(vflip=True, **full)
  warp = lambda cfg, fh, fv: _jit(lambda x: augment.warp(x, augment.geometry(u(fh, fv), 16, 12, cfg)), x)
  np.testing.assert_array_equal(warp(both, 0.2, 0.9), np.flip(x, 1))
  np.testing.assert_array_equal(warp(both, 0.9, 0.2), np.flip(x, 0))
  np.testing.assert_array_equal(warp(both, 0.2, 0.2), np.flip(x, (0, 1)))
  np.testing.assert_array_equal(warp(both, 0.9, 0.9), x)
  np.testing.assert_array_equal(warp(augment.AugmentConfig(hflip=False, **full), 0.2, 0.2), x)  # off in the recipe


def test_flip_matrix_warp_is_exact_flip():
  x = _image((16, 12, 2))
  h = augment.flip_matrix(True, False, 16, 12)
  v = augment.flip_matrix(False, True, 16, 12)
  out_h, out_v, twice = _jit(lambda x: tuple(augment.warp(x, m) for m in (h, v, h @ h)), x)
  np.testing.assert_array_equal(out_h, np.flip(x, 1))
  np.testing.assert_array_equal(out_v, np.flip(x, 0))
  np.testing.assert_array_equal(twice, x)


def test_full_crop_is_identity():
  x = _image((16, 16, 1))
  box = augment.crop_box(_uniforms(1, augment.CROP_DRAWS, seed=3)[0], 16, 16, scale=(1.0, 1.0), ratio=(1.0, 1.0))
  np.testing.assert_allclose(_jit(augment.crop_and_resize, x, box), x, atol=1e-6)
  y = _image((12, 20, 3))
  np.testing.assert_allclose(_jit(augment.crop_and_resize, y, (0.0, 0.0, 12.0, 20.0)), y, atol=1e-6)


def test_crop_matches_scipy_map_coordinates():
  x = _image((16, 20, 3), seed=1)
  y0, x0, h, w = 3.5, 2.25, 10.0, 7.5
  out = np.asarray(_jit(augment.crop_and_resize, x, (y0, x0, h, w)))
  rows = y0 + (np.arange(16) + 0.5) * h / 16 - 0.5
  cols = x0 + (np.arange(20) + 0.5) * w / 20 - 0.5
  rr, cc = np.meshgrid(rows, cols, indexing='ij')
  ref = np.stack([sp_ndimage.map_coordinates(x[..., c], [rr, cc], order=1, mode='nearest') for c in range(3)], axis=-1)
  np.testing.assert_allclose(out, ref, atol=1e-5)


def test_crop_2x_upscale_of_linear_image_by_hand():
  # Bilinear sampling reproduces a linear image exactly, so the output is the
  # image formula at the sample positions: rows/cols 3.75, 4.25, ..., 11.25.
  r, c = np.mgrid[:16, :16].astype(np.float32)
  x = ((r + 2 * c) / 45.0)[..., None]
  out = _jit(augment.crop_and_resize, x, (4.0, 4.0, 8.0, 8.0))
  pos = 3.75 + 0.5 * np.arange(16, dtype=np.float32)
  expected = ((pos[:, None] + 2 * pos[None, :]) / 45.0)[..., None]
  np.testing.assert_allclose(out, expected, atol=1e-6)


def test_sampled_crop_boxes_respect_scale_and_bounds():
  boxes = _jit(jax.vmap(lambda u: augment.crop_box(u, 32, 48)), _uniforms(256, augment.CROP_DRAWS))
  y0, x0, h, w = np.asarray(boxes).T
  assert (y0 >= 0).all() and (x0 >= 0).all()
  assert (y0 + h <= 32 + 1e-4).all() and (x0 + w <= 48 + 1e-4).all()
  area = h * w / (32 * 48)
  assert area.max() <= 1.0 + 1e-5 and area.min() >= 0.2 * 0.75 - 1e-5
  assert np.std(area) > 0.1  # actually random


# Photometric.


def test_photometric_cores_match_numpy():
  x = _image((16, 16, 3), seed=2)
  np.testing.assert_allclose(augment_intensity.adjust_brightness(x, 1.3), np.clip(x * 1.3, 0, 1), atol=1e-6)
  mean = x.mean(axis=(0, 1), keepdims=True)
  np.testing.assert_allclose(augment_intensity.adjust_contrast(x, 0.7), np.clip((x - mean) * 0.7 + mean, 0, 1),
                             atol=1e-6)
  np.testing.assert_allclose(augment_intensity.adjust_gamma(x, 1.7), x**1.7, rtol=1e-5, atol=1e-6)


def test_random_photometric_factors_span_their_ranges():
  x = 0.5 * _image((16, 16, 1), seed=3) + 0.1
  ends = jnp.array([[0.0], [1.0 - 1e-7]])  # the lowest and the highest draw
  ratio = [np.asarray(augment_intensity.brightness(u, x, 0.4)) / x for u in ends]
  np.testing.assert_allclose(ratio[0], 0.6, rtol=1e-5)
  np.testing.assert_allclose(ratio[1], 1.4, rtol=1e-5)
  mean = x.mean(axis=(0, 1), keepdims=True)
  np.testing.assert_allclose(augment_intensity.contrast(jnp.array([0.25]), x, 0.4), (x - mean) * 0.8 + mean, atol=1e-6)
  g = [np.log(np.asarray(augment_intensity.gamma(u, x, 1.0))) / np.log(x) for u in ends]
  np.testing.assert_allclose(g[0], 0.5, rtol=1e-4)  # 1 / (1 + strength)
  np.testing.assert_allclose(g[1], 2.0, rtol=1e-4)  # 1 + strength


def test_gaussian_blur_matches_scipy():
  x = _image((20, 16, 2), seed=5)
  sigma, radius = 1.3, 4
  out, off, on = _jit(
      lambda u: (augment_intensity.apply_gaussian_blur(x, sigma, radius), augment_intensity.gaussian_blur(u, x, p=0.0),
                 augment_intensity.gaussian_blur(u, x, p=1.0)), _uniforms(1, 2)[0])
  ref = sp_ndimage.gaussian_filter(x, sigma=(sigma, sigma, 0), mode='reflect', truncate=radius / sigma)
  np.testing.assert_allclose(out, ref, atol=1e-5)
  np.testing.assert_array_equal(off, x)
  assert not np.allclose(on, x)


# Ultrasound-specific.


def test_speckle_preserves_mean_and_variance_grows_with_strength():
  x = jnp.full((32, 32, 1), 0.4)
  levels, z = _uniforms(16, 1), jax.vmap(lambda k: jax.random.normal(k, (32, 32, 1)))(_keys(16, seed=1))
  strengths = (0.1, 0.3, 0.6)
  outs = _jit(jax.vmap(lambda u, z: jnp.stack([augment_intensity.speckle(u, z, x, s) for s in strengths])), levels, z)
  stds = []
  for out in np.moveaxis(np.asarray(outs), 1, 0):
    np.testing.assert_allclose(out.mean(), 0.4, rtol=0.03)
    stds.append(out.std(axis=(1, 2, 3)))
  assert (stds[0] < stds[1]).all() and (stds[1] < stds[2]).all()
  # The per-example level is U(0, strength), so std ~ strength * 0.4 * level.
  assert stds[2].max() < 0.6 * 0.4 * 1.2
  np.testing.assert_array_equal(augment_intensity.speckle(levels[0], z[0], x, 0.0), x)


def test_depth_gain_depends_on_depth_only():
  x = 0.4 * _image((24, 16, 3), seed=6) + 0.05
  outs = _jit(jax.vmap(lambda u: augment_intensity.depth_gain(u, x, max_db=6.0)), _uniforms(4, 4, seed=1))
  for out in np.asarray(outs):
    ratio = out / x
    np.testing.assert_allclose(ratio, ratio[:, :1, :1] * np.ones_like(ratio), rtol=1e-5)
    assert 10**(-6 / 20) - 1e-5 <= ratio.min()
    assert ratio.max() <= 10**(6 / 20) + 1e-5
    assert np.ptp(ratio[:, 0, 0]) > 1e-3


def test_fan_mask_zeroes_top_corners():
  x = jnp.ones((32, 32, 1))
  out, off = _jit(jax.vmap(lambda u: (x * augment.fan(u, 32, 32, p=1.0), x * augment.fan(u, 32, 32, p=0.0))),
                  _uniforms(64, augment.FAN_DRAWS))
  out = np.asarray(out)
  assert (out[:, 0, 0] == 0).all() and (out[:, 0, -1] == 0).all()
  assert (out[:, 16, 15:17] == 1).all()  # the beam axis stays
  np.testing.assert_array_equal(off, np.ones_like(off))


def test_shadow_darkens_downwards_from_a_depth():
  x = jnp.ones((32, 32, 1))
  out, off = _jit(jax.vmap(lambda u: (augment_intensity.shadow(u, x, p=1.0), augment_intensity.shadow(u, x, p=0.0))),
                  _uniforms(32, 5))
  out = np.asarray(out)
  assert (out <= 1.0).all() and (out[:, 0] > 0.99).all()
  assert (np.diff(out, axis=1) <= 1e-6).all()  # never lighter deeper down
  assert (out[:, -1].min(axis=(1, 2)) < 0.7).all()
  np.testing.assert_array_equal(off, np.ones_like(off))


# Composite API.


def test_mask_moves_with_image():
  masks = _disks(4, 32)
  cfg = augment.AugmentConfig(crop_scale=(0.3, 1.0), vflip=True, **OFF)
  fn = jax.jit(augment.augment_batch_pairs, static_argnames='cfg')
  images, out_masks = fn(jax.random.key(7), masks, masks, cfg=cfg)
  np.testing.assert_array_equal(out_masks, (np.asarray(images) >= 0.5).astype(np.float32))
  assert not np.array_equal(out_masks, masks)  # the geometry did something
  assert set(np.unique(out_masks)) <= {0.0, 1.0}


def test_segmentation_pairs_jit_rgb_and_keep_binary_masks():
  masks = _disks(4, 32, seed=1)
  images = np.clip(_image((4, 32, 32, 3)) * 0.5 + 0.4 * masks, 0, 1)
  fn = jax.jit(augment.augment_batch_pairs, static_argnames='cfg')
  out_images, out_masks = fn(jax.random.key(1), images, masks, cfg=augment.AugmentConfig.segmentation())
  assert out_images.shape == images.shape and out_images.dtype == jnp.float32
  assert out_masks.shape == masks.shape and out_masks.dtype == jnp.float32
  assert set(np.unique(out_masks)) <= {0.0, 1.0}
  assert 0.0 <= float(out_images.min()) and float(out_images.max()) <= 1.0
  assert not np.allclose(out_images[0], out_images[1])


def test_two_views_jit_shapes_determinism_and_independence():
  images = _image((4, 32, 32, 1), seed=8)
  fn = jax.jit(augment.two_views, static_argnames='cfg')
  cfg = augment.AugmentConfig()
  v1, v2 = fn(jax.random.key(0), images, cfg=cfg)
  for v in (v1, v2):
    assert v.shape == images.shape and v.dtype == jnp.float32
    assert 0.0 <= float(v.min()) and float(v.max()) <= 1.0
    assert bool(jnp.isfinite(v).all())
  assert not np.allclose(v1, v2)
  for i in range(4):  # per-example keys: every example gets its own view
    assert not np.allclose(v1[i], v2[i])
  w1, w2 = fn(jax.random.key(0), images, cfg=cfg)
  np.testing.assert_array_equal(v1, w1)
  np.testing.assert_array_equal(v2, w2)
  u1, _ = fn(jax.random.key(1), images, cfg=cfg)
  assert not np.allclose(u1, v1)


# Config.


def test_config_is_hashable_and_from_dict_validates():
  cfg = augment.AugmentConfig()
  assert hash(cfg) == hash(augment.AugmentConfig())
  d = ml_collections.ConfigDict({'crop_scale': [0.3, 0.9], 'speckle': 0, 'hflip': False})
  got = augment.AugmentConfig.from_dict(d)
  assert got.crop_scale == (0.3, 0.9) and got.speckle == 0.0
  assert not got.hflip and got.brightness == cfg.brightness
  hash(got)
  seg = augment.AugmentConfig.segmentation()
  assert seg.crop_scale == (0.5, 1.0) and seg.fan_prob == seg.shadow_prob == 0
  assert seg.brightness < cfg.brightness
  assert augment.AugmentConfig.from_dict({'gamma': 0.1}, base=seg).crop_scale \
      == (0.5, 1.0)
  with pytest.raises(ValueError, match='brightnes'):
    augment.AugmentConfig.from_dict({'brightnes': 0.1})
  with pytest.raises(ValueError, match='fan_prob'):
    augment.AugmentConfig(fan_prob=1.5)
  with pytest.raises(ValueError, match='crop_scale'):
    augment.AugmentConfig(crop_scale=(0.5, 0.2))


def test_rotation_by_90_degrees_is_a_quarter_turn():
  img = _image((6, 6, 1), seed=3)
  out = augment.warp(jnp.asarray(img), augment.rotation_matrix(90.0, 6, 6))
  np.testing.assert_allclose(out, np.rot90(img, -1), atol=1e-5)  # clockwise: out[r, c] = in[n-1-c, r]
  np.testing.assert_allclose(augment.warp(jnp.asarray(img), augment.rotation_matrix(0.0, 6, 6)), img, atol=1e-6)


def test_rotated_mask_moves_with_image():
  masks = _disks(4, 32, seed=2)
  cfg = augment.AugmentConfig(crop_scale=(1.0, 1.0), hflip=False, rotate=40.0, **OFF)
  images, out_masks = jax.jit(augment.augment_batch_pairs, static_argnames='cfg')(jax.random.key(3), masks, masks,
                                                                                  cfg=cfg)
  np.testing.assert_array_equal(out_masks, (np.asarray(images) >= 0.5).astype(np.float32))
  assert not np.array_equal(out_masks, masks)  # the rotation did something
