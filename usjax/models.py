"""Models stage: a U-Net whose encoder is shared, by name, with the pre-training networks.

The parameter tree is the transfer contract: `UNet` and `PretrainNet` both call their encoder `encoder` and
their decoder `decoder`, so moving pre-trained weights into a segmentation model is a copy of sub-trees
(see `usjax.checkpoint.load_pretrained`). Layout follows the common segmentation U-Net (as in
segmentation_models_pytorch): encoder features at strides 2, 4, 8, 16, 32; a decoder of upsample + skip-concat +
two 3x3 conv blocks with widths (256, 128, 64, 32, 16); a 3x3 conv segmentation head.

The layers are module arguments, as in Flax's ImageNet ResNet: every convolution is `conv` (default `nn.Conv`),
the decoder's first convolution at each stride is `up_conv` (default `UpsampleConv`, an `nn.Conv` of the
upsampled map concatenated with the skip) and the ResNet stem's max-pool is `pool` (default `max_pool`). `layers`
gives the CPU lowerings of `usjax.cpu_ops` in their place (the same functions with the same parameters), and
`unet_from_config`, `pretrain_net_from_config` and `encoder_from_config` build the networks of a `config.model`.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from usjax import cpu_ops, precision

ModuleDef = Any
# torchvision's ResNet initialisation: He normal, fan-out.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

RESNET_STAGES = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3)}


def upsample2x(x):
  """Nearest-neighbour x2 upsampling as a broadcast: the same values as `jax.image.resize(..., "nearest")`,
  whose gather-based gradient is slow on CPU."""
  b, h, w, c = x.shape
  return jnp.broadcast_to(x[:, :, None, :, None], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)


def max_pool(x):
  """ResNet's stem pool: 3x3 windows, stride 2, one pixel of padding."""
  return nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))


class UpsampleConv(nn.Conv):
  """`nn.Conv` of `concat([upsample2x(x), skip])`: the U-Net decoder's first convolution at each stride."""
  @nn.compact
  def __call__(self, x, skip=None):
    x = upsample2x(x)
    if skip is not None:
      x = jnp.concatenate([x, skip], axis=-1)
    return super().__call__(x)


def norm_layer(kind: str, train: bool, dtype) -> Callable[..., nn.Module]:
  """BatchNorm (statistics over the whole global batch: under jit the batch axis is global) or GroupNorm."""
  if kind == "batch":
    return functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype)
  if kind == "group":
    return functools.partial(nn.GroupNorm, num_groups=None, group_size=16, epsilon=1e-5, dtype=dtype)
  raise ValueError(f"model.norm must be 'batch' or 'group', got {kind!r}")


class BasicBlock(nn.Module):
  features: int
  strides: int
  norm: ModuleDef
  conv: ModuleDef

  @nn.compact
  def __call__(self, x):
    y = nn.relu(self.norm()(self.conv(self.features, (3, 3), self.strides)(x)))
    y = self.norm(scale_init=nn.initializers.zeros)(self.conv(self.features, (3, 3))(y))
    if x.shape[-1] != self.features or self.strides != 1:
      x = self.norm(name="proj_norm")(self.conv(self.features, (1, 1), self.strides, name="proj")(x))
    return nn.relu(x + y)


class Bottleneck(nn.Module):
  features: int
  strides: int
  norm: ModuleDef
  conv: ModuleDef

  @nn.compact
  def __call__(self, x):
    y = nn.relu(self.norm()(self.conv(self.features, (1, 1))(x)))
    y = nn.relu(self.norm()(self.conv(self.features, (3, 3), self.strides)(y)))
    y = self.norm(scale_init=nn.initializers.zeros)(self.conv(self.features * 4, (1, 1))(y))
    if x.shape[-1] != self.features * 4 or self.strides != 1:
      x = self.norm(name="proj_norm")(self.conv(self.features * 4, (1, 1), self.strides, name="proj")(x))
    return nn.relu(x + y)


class ResNetEncoder(nn.Module):
  """ResNet-18/34/50 returning the feature maps at strides 2, 4, 8, 16, 32 (the U-Net skips)."""
  depth: int = 18
  norm: str = "batch"
  dtype: Any = jnp.float32
  conv: ModuleDef = nn.Conv
  pool: Callable = max_pool

  @nn.compact
  def __call__(self, x, train: bool = True) -> list[jax.Array]:
    if self.depth not in RESNET_STAGES:
      raise ValueError(f"model.encoder depth must be one of {sorted(RESNET_STAGES)}, got {self.depth}")
    norm = norm_layer(self.norm, train, self.dtype)
    conv = functools.partial(self.conv, use_bias=False, kernel_init=conv_init, dtype=self.dtype)
    block = Bottleneck if self.depth >= 50 else BasicBlock
    x = nn.relu(norm(name="stem_norm")(conv(64, (7, 7), 2, name="stem")(x)))
    feats = [x]
    x = self.pool(x)
    for i, n_blocks in enumerate(RESNET_STAGES[self.depth]):
      for j in range(n_blocks):
        x = block(64 * 2**i, 2 if (j == 0 and i > 0) else 1, norm, conv, name=f"layer{i + 1}_{j}")(x)
      feats.append(x)
    return feats


class ConvBlock(nn.Module):
  """Two 3x3 conv + norm + ReLU: the plain encoder's unit."""
  features: int
  norm: ModuleDef
  conv: ModuleDef

  @nn.compact
  def __call__(self, x):
    x = nn.relu(self.norm()(self.conv(self.features, (3, 3))(x)))
    return nn.relu(self.norm()(self.conv(self.features, (3, 3))(x)))


class PlainEncoder(nn.Module):
  """The original U-Net encoder: double 3x3 convs and 2x2 max-pools; features at strides 1, 2, 4, 8, 16."""
  widths: Sequence[int] = (32, 64, 128, 256, 512)
  norm: str = "batch"
  dtype: Any = jnp.float32
  conv: ModuleDef = nn.Conv

  @nn.compact
  def __call__(self, x, train: bool = True) -> list[jax.Array]:
    norm = norm_layer(self.norm, train, self.dtype)
    conv = functools.partial(self.conv, use_bias=False, kernel_init=conv_init, dtype=self.dtype)
    feats = []
    for i, w in enumerate(self.widths):
      if i:
        x = nn.max_pool(x, (2, 2), (2, 2))
      x = ConvBlock(w, norm, conv, name=f"down{i}")(x)
      feats.append(x)
    return feats


class DecoderBlock(nn.Module):
  """Upsample x2, concatenate the skip (if any), then two 3x3 conv + norm + ReLU. The first convolution is
  `up_conv(x, skip)`, the convolution of that concatenation (`UpsampleConv`)."""
  features: int
  norm: ModuleDef
  conv: ModuleDef
  up_conv: ModuleDef

  @nn.compact
  def __call__(self, x, skip=None):
    # explicit names: those that auto-naming gave two `Conv` modules, which every checkpoint holds
    x = nn.relu(self.norm()(self.up_conv(self.features, (3, 3), name="Conv_0")(x, skip)))
    return nn.relu(self.norm()(self.conv(self.features, (3, 3), name="Conv_1")(x)))


class UNetDecoder(nn.Module):
  """A DecoderBlock per stride, each with the encoder's skip at its output stride; extra blocks (no skip) up to
  full size."""
  widths: Sequence[int] = (256, 128, 64, 32, 16)
  norm: str = "batch"
  dtype: Any = jnp.float32
  conv: ModuleDef = nn.Conv
  up_conv: ModuleDef = UpsampleConv

  @nn.compact
  def __call__(self, feats: list[jax.Array], out_hw: tuple[int, int], train: bool = True) -> jax.Array:
    norm = norm_layer(self.norm, train, self.dtype)
    conv, up_conv = (functools.partial(c, use_bias=False, kernel_init=conv_init, dtype=self.dtype)
                     for c in (self.conv, self.up_conv))
    x, skips = feats[-1], feats[-2::-1]
    for i, w in enumerate(self.widths):
      if x.shape[1] >= out_hw[0]:
        break
      x = DecoderBlock(w, norm, conv, up_conv, name=f"up{i}")(x, skips[i] if i < len(skips) else None)
    return x


def make_encoder(name: str, norm: str, dtype, conv: ModuleDef = nn.Conv, pool: Callable = max_pool) -> nn.Module:
  if name == "plain":
    return PlainEncoder(norm=norm, dtype=dtype, conv=conv, name="encoder")
  if name.startswith("resnet") and name[6:].isdigit():
    return ResNetEncoder(depth=int(name[6:]), norm=norm, dtype=dtype, conv=conv, pool=pool, name="encoder")
  raise ValueError(f"model.encoder must be 'plain' or 'resnet18/34/50', got {name!r}")


class UNet(nn.Module):
  """Segmentation network: encoder -> decoder -> 1-channel logits at input resolution.

  With `presence_head`, also an image-level lesion-presence logit [B] from the encoder's deepest feature (global
  average pool -> Dense -> 1), and the output is the pair (logits, presence logit); without it (the default)
  the output is the logits alone, as for every checkpoint written before the head existed.
  """
  encoder: str = "resnet18"
  decoder_widths: Sequence[int] = (256, 128, 64, 32, 16)
  norm: str = "batch"
  num_classes: int = 1
  dtype: Any = jnp.float32
  conv: ModuleDef = nn.Conv
  up_conv: ModuleDef = UpsampleConv
  pool: Callable = max_pool
  presence_head: bool = False

  @nn.compact
  def __call__(self, x, train: bool = True):
    encoder = make_encoder(self.encoder, self.norm, self.dtype, self.conv, self.pool)
    feats = encoder(x.astype(self.dtype), train)
    widths = self.decoder_widths if self.encoder != "plain" else self.decoder_widths[1:]
    y = UNetDecoder(widths, self.norm, self.dtype, self.conv, self.up_conv, name="decoder")(feats, x.shape[1:3], train)
    logits = self.conv(self.num_classes, (3, 3), kernel_init=nn.initializers.lecun_normal(), dtype=self.dtype,
                       name="seg_head")(y).astype(jnp.float32)
    if not self.presence_head:
      return logits
    # A top-level module of its own, so transfer (encoder, decoder) leaves it at initialisation and says so.
    pooled = jnp.mean(feats[-1].astype(jnp.float32), axis=(1, 2))
    presence = nn.Dense(1, dtype=self.dtype, name="presence_head")(pooled)[:, 0]
    return logits, presence.astype(jnp.float32)


class MLPHead(nn.Module):
  """Projection / prediction MLP: Dense-BN-ReLU for each hidden layer, then a plain Dense output."""
  dims: Sequence[int] = (512, 128)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = True):
    for d in self.dims[:-1]:
      x = nn.Dense(d, use_bias=False, dtype=self.dtype)(x)
      x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=self.dtype)(x))
    return nn.Dense(self.dims[-1], dtype=self.dtype)(x).astype(jnp.float32)


class PretrainNet(nn.Module):
  """Contrastive pre-training network: embeddings from the encoder (or the whole U-Net, `with_decoder`).

  Encoder-only mode pools the deepest encoder feature; encoder-decoder mode runs the U-Net decoder and pools its
  output, so both halves receive the contrastive gradient and both can be transferred.
  """
  encoder: str = "resnet18"
  decoder_widths: Sequence[int] = (256, 128, 64, 32, 16)
  norm: str = "batch"
  with_decoder: bool = False
  proj_dims: Sequence[int] = (512, 128)
  pred_dims: Sequence[int] = ()  # a predictor head (SimSiam, BYOL) when non-empty
  dtype: Any = jnp.float32
  conv: ModuleDef = nn.Conv
  up_conv: ModuleDef = UpsampleConv
  pool: Callable = max_pool

  @nn.compact
  def __call__(self, x, train: bool = True):
    """Returns (projection z, prediction p); p is z when the method has no predictor."""
    encoder = make_encoder(self.encoder, self.norm, self.dtype, self.conv, self.pool)
    feats = encoder(x.astype(self.dtype), train)
    if self.with_decoder:
      widths = self.decoder_widths if self.encoder != "plain" else self.decoder_widths[1:]
      decoder = UNetDecoder(widths, self.norm, self.dtype, self.conv, self.up_conv, name="decoder")
      y = decoder(feats, x.shape[1:3], train)
    else:
      y = feats[-1]
    z = MLPHead(self.proj_dims, self.dtype, name="projector")(jnp.mean(y, axis=(1, 2)), train)
    p = MLPHead(self.pred_dims, self.dtype, name="predictor")(z, train) if self.pred_dims else z
    return z, p


def count_params(params) -> int:
  return sum(int(p.size) for p in jax.tree.leaves(params))


# ---------------------------------------------------------------------------------------------------- from config
CONV_IMPLS = ("auto", "xla", "cpu")
DTYPES = precision.DTYPES


def _conv_impl(conv_impl: str) -> str:
  """'xla' or 'cpu': `config.model.conv_impl`, with 'auto' the CPU lowerings on the CPU backend."""
  if conv_impl not in CONV_IMPLS:
    raise ValueError(f"model.conv_impl must be one of {', '.join(CONV_IMPLS)}, got {conv_impl!r}")
  if conv_impl == "auto":
    return "cpu" if jax.default_backend() == "cpu" else "xla"
  return conv_impl


def layers(conv_impl: str = "auto", dtype=jnp.float32) -> dict[str, Any]:
  """The `conv`, `up_conv` and `pool` arguments of `config.model.conv_impl`: 'xla' the plain Flax layers (XLA's
  convolutions and pool), 'cpu' the lowerings of `usjax.cpu_ops` (the same functions and parameters, faster on
  XLA:CPU), 'auto' the CPU lowerings on the CPU backend and XLA's elsewhere. A bf16 `dtype` makes the CPU
  lowerings' matmul operands bf16 (the modules' own dtype: `_common`)."""
  if _conv_impl(conv_impl) == "cpu":
    conv, up_conv = cpu_ops.conv_layers(None if dtype == jnp.float32 else dtype)
    return {"conv": conv, "up_conv": up_conv, "pool": cpu_ops.max_pool_3x3_s2}
  return {"conv": nn.Conv, "up_conv": UpsampleConv, "pool": max_pool}


def _common(model_cfg: Mapping[str, Any]) -> dict[str, Any]:
  """The arguments every network of a model config shares: norm, the layers of its conv_impl and the compute
  dtype of its model.dtype on this machine (`precision.compute_dtype`: 'auto' is bf16 only where it is
  native). With the CPU lowerings, bf16 is their matmuls' operand dtype and the modules compute in f32: XLA:CPU's
  elementwise code runs slower on bf16 arrays than on f32 ones (`usjax.cpu_ops`). Checkpoint metas of older runs
  lack some keys: they get the defaults those runs had."""
  conv_impl = model_cfg.get("conv_impl", "auto")
  dtype = precision.compute_dtype(model_cfg.get("dtype", "float32"))
  return {
      "norm": model_cfg.get("norm", "batch"), "dtype": jnp.float32 if _conv_impl(conv_impl) == "cpu" else dtype,
      **layers(conv_impl, dtype)
  }


def unet_from_config(model_cfg: Mapping[str, Any]) -> UNet:
  """The segmentation U-Net of a model config (`config.model`, or a checkpoint's `meta['model']`); the
  lesion-presence head where `presence_head` (`train.model_config` adds it; metas of older runs lack it)."""
  return UNet(encoder=model_cfg["encoder"], decoder_widths=tuple(model_cfg["decoder_widths"]),
              presence_head=bool(model_cfg.get("presence_head", False)), **_common(model_cfg))


def pretrain_net_from_config(model_cfg: Mapping[str, Any], pred_dims: Sequence[int] = ()) -> PretrainNet:
  """The PretrainNet of a model config (the U-Net's encoder, and its decoder with `with_decoder`) with a
  predictor head of `pred_dims` (none when empty)."""
  return PretrainNet(encoder=model_cfg["encoder"], decoder_widths=tuple(model_cfg["decoder_widths"]),
                     with_decoder=model_cfg["with_decoder"], proj_dims=tuple(model_cfg["proj_dims"]),
                     pred_dims=tuple(pred_dims), **_common(model_cfg))


def encoder_from_config(model_cfg: Mapping[str, Any]) -> nn.Module:
  """The standalone encoder of a model config, named `encoder` as inside the U-Net."""
  common = _common(model_cfg)
  return make_encoder(model_cfg["encoder"], common["norm"], common["dtype"], common["conv"], common["pool"])
