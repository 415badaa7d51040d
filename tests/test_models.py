"""Model layout: parameter counts against the reference segmentation U-Net layout, shapes, shared names."""
import jax
import jax.numpy as jnp
import pytest

from usjax import models

# Parameter counts of segmentation_models_pytorch.Unet(<encoder>, in_channels=1, classes=1), the common layout.
SMP_UNET_PARAMS = {"resnet18": 14_321_937, "resnet34": 24_430_097, "resnet50": 32_514_833}


def shapes(module, x):
  return jax.eval_shape(lambda: module.init(jax.random.key(0), x, train=False))


@pytest.mark.parametrize("encoder", sorted(SMP_UNET_PARAMS))
def test_unet_parameter_count_matches_reference_layout(encoder):
  v = shapes(models.UNet(encoder=encoder), jnp.zeros((1, 64, 64, 1)))
  assert models.count_params(v["params"]) == SMP_UNET_PARAMS[encoder]


def test_resnet_features_at_strides_2_to_32():
  enc = models.ResNetEncoder(depth=18)
  x = jnp.zeros((1, 64, 64, 1))
  v = shapes(enc, x)
  feats = jax.eval_shape(lambda v: enc.apply(v, x, train=False), v)
  assert [f.shape[1] for f in feats] == [32, 16, 8, 4, 2]
  assert [f.shape[-1] for f in feats] == [64, 64, 128, 256, 512]


@pytest.mark.parametrize("encoder", ["resnet18", "plain"])
def test_unet_output_at_input_resolution(encoder):
  m = models.UNet(encoder=encoder, norm="group")
  x = jnp.ones((2, 32, 32, 3))
  v = jax.jit(lambda: m.init(jax.random.key(0), x, train=False))()
  y = jax.jit(lambda v: m.apply(v, x, train=False))(v)
  assert y.shape == (2, 32, 32, 1) and bool(jnp.all(jnp.isfinite(y)))


def test_pretrain_net_shares_encoder_and_decoder_names_with_unet():
  x = jnp.zeros((2, 32, 32, 1))
  unet = shapes(models.UNet(), x)
  enc_only = shapes(models.PretrainNet(proj_dims=(64, 16)), x)
  enc_dec = shapes(models.PretrainNet(with_decoder=True, proj_dims=(64, 16)), x)
  same = lambda a, b: jax.tree.map(lambda p: p.shape, a) == jax.tree.map(lambda p: p.shape, b)
  assert same(enc_only["params"]["encoder"], unet["params"]["encoder"])
  assert same(enc_only["batch_stats"]["encoder"], unet["batch_stats"]["encoder"])
  assert same(enc_dec["params"]["decoder"], unet["params"]["decoder"])
  assert "decoder" not in enc_only["params"]
