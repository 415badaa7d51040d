"""Models stage: a U-Net whose encoder is shared, by name, with the pre-training networks.

The parameter tree is the transfer contract: `UNet` and `PretrainNet` both call their encoder `encoder` and
their decoder `decoder`, so moving pre-trained weights into a segmentation model is a copy of sub-trees
(see `usjax.checkpoint.load_pretrained`). Layout follows the common segmentation U-Net (as in
segmentation_models_pytorch): encoder features at strides 2, 4, 8, 16, 32; a decoder of upsample + skip-concat +
two 3x3 conv blocks with widths (256, 128, 64, 32, 16); a 3x3 conv segmentation head.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from usjax.cpu_ops import conv3x3_upsampled, cpu_conv, lax_conv, max_pool_3x3_s2, upsample2x

ModuleDef = Any
# torchvision's ResNet initialisation: He normal, fan-out.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

RESNET_STAGES = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3)}


class Conv(nn.Module):
  """`nn.Conv` (same parameter names and layout, SAME padding) that picks the faster XLA lowering per shape.

  With `upsample`, it convolves `concat([upsample2x(x), skip])` (the U-Net decoder's input); on CPU the
  upsampled part is computed by `conv3x3_upsampled` without building it."""
  features: int
  kernel_size: tuple[int, int] = (3, 3)
  strides: int = 1
  use_bias: bool = True
  kernel_init: Callable = conv_init
  dtype: Any = jnp.float32
  upsample: bool = False

  @nn.compact
  def __call__(self, x, skip=None):
    kh, kw = self.kernel_size
    cin = x.shape[-1] + (0 if skip is None else skip.shape[-1])
    kernel = self.param("kernel", self.kernel_init, (kh, kw, cin, self.features), jnp.float32)
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    skip = None if skip is None else skip.astype(self.dtype)
    on_cpu = jax.default_backend() == "cpu"
    if self.upsample and on_cpu and self.kernel_size == (3, 3) and self.strides == 1:
      c = x.shape[-1]
      y = conv3x3_upsampled(x, kernel[:, :, :c])
      if skip is not None:
        y = y + cpu_conv(skip, kernel[:, :, c:], 1)
    else:
      x = upsample2x(x) if self.upsample else x
      x = x if skip is None else jnp.concatenate([x, skip], axis=-1)
      y = cpu_conv(x, kernel, self.strides) if on_cpu else lax_conv(x, kernel, self.strides)
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32).astype(self.dtype)
    return y


def norm_layer(kind: str, train: bool, dtype) -> Callable[..., nn.Module]:
  """BatchNorm (statistics over the whole global batch: under jit the batch axis is global) or GroupNorm."""
  if kind == "batch":
    return functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5,
                             dtype=dtype)
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

  @nn.compact
  def __call__(self, x, train: bool = True) -> list[jax.Array]:
    if self.depth not in RESNET_STAGES:
      raise ValueError(f"model.encoder depth must be one of {sorted(RESNET_STAGES)}, got {self.depth}")
    norm = norm_layer(self.norm, train, self.dtype)
    conv = functools.partial(Conv, use_bias=False, dtype=self.dtype)
    block = Bottleneck if self.depth >= 50 else BasicBlock
    x = nn.relu(norm(name="stem_norm")(conv(64, (7, 7), 2, name="stem")(x)))
    feats = [x]
    if jax.default_backend() == "cpu":
      x = max_pool_3x3_s2(x)
    else:
      x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
    for i, n_blocks in enumerate(RESNET_STAGES[self.depth]):
      for j in range(n_blocks):
        x = block(64 * 2**i, 2 if (j == 0 and i > 0) else 1, norm, conv, name=f"layer{i + 1}_{j}")(x)
      feats.append(x)
    return feats


class PlainEncoder(nn.Module):
  """The original U-Net encoder: double 3x3 convs and 2x2 max-pools; features at strides 1, 2, 4, 8, 16."""
  widths: Sequence[int] = (32, 64, 128, 256, 512)
  norm: str = "batch"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = True) -> list[jax.Array]:
    norm = norm_layer(self.norm, train, self.dtype)
    feats = []
    for i, w in enumerate(self.widths):
      if i:
        x = nn.max_pool(x, (2, 2), (2, 2))
      x = ConvBlock(w, norm, self.dtype, name=f"down{i}")(x)
      feats.append(x)
    return feats


class ConvBlock(nn.Module):
  """Two 3x3 conv + norm + ReLU: the U-Net decoder (and plain encoder) unit. With `upsample`, the first
  convolution's input is `concat([upsample2x(x), skip])`."""
  features: int
  norm: ModuleDef
  dtype: Any = jnp.float32
  upsample: bool = False

  @nn.compact
  def __call__(self, x, skip=None):
    x = Conv(self.features, (3, 3), use_bias=False, dtype=self.dtype, upsample=self.upsample)(x, skip)
    x = nn.relu(self.norm()(x))
    x = Conv(self.features, (3, 3), use_bias=False, dtype=self.dtype)(x)
    return nn.relu(self.norm()(x))


class UNetDecoder(nn.Module):
  """Upsample x2, concatenate the skip at that stride, ConvBlock; extra blocks (no skip) up to full size."""
  widths: Sequence[int] = (256, 128, 64, 32, 16)
  norm: str = "batch"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, feats: list[jax.Array], out_hw: tuple[int, int], train: bool = True) -> jax.Array:
    norm = norm_layer(self.norm, train, self.dtype)
    x, skips = feats[-1], feats[-2::-1]
    for i, w in enumerate(self.widths):
      h = x.shape[1]
      if h >= out_hw[0]:
        break
      x = ConvBlock(w, norm, self.dtype, upsample=True, name=f"up{i}")(x, skips[i] if i < len(skips) else None)
    return x


def make_encoder(name: str, norm: str, dtype) -> nn.Module:
  if name == "plain":
    return PlainEncoder(norm=norm, dtype=dtype, name="encoder")
  if name.startswith("resnet") and name[6:].isdigit():
    return ResNetEncoder(depth=int(name[6:]), norm=norm, dtype=dtype, name="encoder")
  raise ValueError(f"model.encoder must be 'plain' or 'resnet18/34/50', got {name!r}")


class UNet(nn.Module):
  """Segmentation network: encoder -> decoder -> 1-channel logits at input resolution."""
  encoder: str = "resnet18"
  decoder_widths: Sequence[int] = (256, 128, 64, 32, 16)
  norm: str = "batch"
  num_classes: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = True) -> jax.Array:
    feats = make_encoder(self.encoder, self.norm, self.dtype)(x.astype(self.dtype), train)
    widths = self.decoder_widths if self.encoder != "plain" else self.decoder_widths[1:]
    y = UNetDecoder(widths, self.norm, self.dtype, name="decoder")(feats, x.shape[1:3], train)
    logits = Conv(self.num_classes, (3, 3), kernel_init=nn.initializers.lecun_normal(), dtype=self.dtype,
                  name="seg_head")(y)
    return logits.astype(jnp.float32)


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
  pred_dims: Sequence[int] = ()   # a predictor head (SimSiam, BYOL) when non-empty
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = True):
    """Returns (projection z, prediction p); p is z when the method has no predictor."""
    feats = make_encoder(self.encoder, self.norm, self.dtype)(x.astype(self.dtype), train)
    if self.with_decoder:
      widths = self.decoder_widths if self.encoder != "plain" else self.decoder_widths[1:]
      y = UNetDecoder(widths, self.norm, self.dtype, name="decoder")(feats, x.shape[1:3], train)
    else:
      y = feats[-1]
    z = MLPHead(self.proj_dims, self.dtype, name="projector")(jnp.mean(y, axis=(1, 2)), train)
    p = MLPHead(self.pred_dims, self.dtype, name="predictor")(z, train) if self.pred_dims else z
    return z, p


def count_params(params) -> int:
  return sum(int(p.size) for p in jax.tree.leaves(params))
