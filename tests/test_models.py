"""Model layout: parameter counts against the reference segmentation U-Net layout, shapes, shared names, the
variable trees checkpoints hold, and the layers a model config chooses."""
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from configs import default
from usjax import cpu_ops, methods, models, predict, probe_data, train

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


@pytest.mark.slow
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


# {"<unet|pretrain_with_decoder> <encoder>": {"<collection>/<module path>/<name>": shape}} at 64x64x1, written by
# the models of commit 3238e58, before the layers became module arguments: the trees that checkpoints hold
with open(os.path.join(os.path.dirname(__file__), "model_trees.json")) as f:
  CHECKPOINT_TREES = json.load(f)


def flat_shapes(tree) -> dict:
  return {"/".join(k.key for k in path): list(v.shape) for path, v in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.mark.parametrize("conv_impl", ["xla", "cpu"])
@pytest.mark.parametrize("name", sorted(CHECKPOINT_TREES))
def test_variable_trees_are_those_checkpoints_hold(name, conv_impl):
  """Every path and shape of params and batch_stats, for both layer sets: checkpoints written before load."""
  kind, encoder = name.split()
  cfg = default.get_config().model
  cfg.encoder, cfg.with_decoder, cfg.conv_impl = encoder, True, conv_impl
  net = models.unet_from_config(cfg) if kind == "unet" else models.pretrain_net_from_config(cfg)
  assert flat_shapes(shapes(net, jnp.zeros((1, 64, 64, 1)))) == CHECKPOINT_TREES[name]


def test_conv_impl_chooses_the_layers_in_one_place():
  """'auto' is the CPU lowerings on the CPU backend (the tests' backend); every builder of a config uses them."""
  cfg = default.get_config()
  assert jax.default_backend() != "cpu" or models.layers("auto") == models.layers("cpu")
  assert models.layers("xla") == {"conv": nn.Conv, "up_conv": models.UpsampleConv, "pool": models.max_pool}
  assert models.layers(
      "cpu") == {"conv": cpu_ops.Conv, "up_conv": cpu_ops.UpsampleConv, "pool": cpu_ops.max_pool_3x3_s2}
  for impl in ("xla", "cpu"):
    cfg.model.conv_impl = impl
    want = models.layers(impl)
    unet, net = train.build_model(cfg), methods.make_method(cfg).model
    assert (unet.conv, unet.up_conv, unet.pool) == (net.conv, net.up_conv, net.pool) == tuple(want.values())
    assert predict.build_unet(cfg.model.to_dict()) == unet
    assert probe_data.build_encoder(cfg.model).conv == want["conv"]
  old_meta = {"encoder": "resnet18", "decoder_widths": [256, 128, 64, 32, 16], "norm": "batch"}  # no conv_impl
  assert predict.build_unet(old_meta).conv == models.layers("auto")["conv"]
  cfg.model.conv_impl = "fast"
  with pytest.raises(ValueError, match="conv_impl"):
    train.build_model(cfg)
