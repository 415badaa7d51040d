"""CPU lowerings of the models' convolutions and max-pool: the same functions as XLA's, computed in ways that
XLA:CPU runs faster (im2col and shifted-window matmuls, Winograd, convolutions of upsampled maps on the low-res
map, a max-pool with an elementwise gradient). `models.layers` puts them in the models' place of `nn.Conv`,
`models.UpsampleConv` and `nn.max_pool` (`config.model.conv_impl`: by default on the CPU backend only); every one
is tested against the plain XLA or Flax operation it replaces (`tests/test_conv_lowering.py`), and
`launch/benchmark.py --what=conv` times the convolution lowerings per pass (measurements: docs/performance.md).

Mixed precision (`model.dtype='bfloat16'` on a CPU with native bf16): the network computes in f32 and only the
convolutions' matmul operands are bf16 (`matmul_dtype`), rounded inside each lowering as the last step before
its matmuls, with f32 sums. XLA:CPU's elementwise code is slower on bf16 arrays than on f32 ones (it converts
each element to f32 and back around every operation), so bf16 activations would cost more than they save.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from usjax import winograd
from usjax.conv_matmul import conv3x3_upsampled, conv_as_matmul, conv_weight_grad_by_taps, lax_conv, same_pads
from usjax.precision import low_precision


def cpu_conv_paths(x_shape, kernel_shape, stride: int, dtype=jnp.float32) -> tuple[str, str, str]:
  """Which lowering (lax | matmul | winograd | taps) the forward, input-gradient and weight-gradient passes use
  on CPU, with matmul operands in `dtype`.

  Chosen per shape from `launch/benchmark.py --what=conv`, on both cores and on one (`taskset -c 0`, the work a
  pass costs when the step runs another pass beside it): XLA's convolution is fastest on large maps with few
  channels (the U-Net decoder's 128x128 stage); Winograd wins all three passes of 3x3 stride-1 convolutions with
  >= 64 channels in and out (ResNet-18's 32x32 to 4x4 stages) once its 16 matmuls have >= 64 rows, below which
  they are too short to pay for the transforms; im2col matmuls win on tiny maps and strided convolutions;
  shifted-window ("taps") matmuls win the other weight gradients on maps up to 64x64, and for the single-channel
  stem at any size. With bf16 operands they also win the weight gradient of the 128x128 stage's 16-channel
  convolutions (0.8x XLA's f32 time; not the 1-channel head's, 2x)."""
  kh, kw, cin, cout = kernel_shape
  out_hw = same_pads(x_shape[1], kh, stride)[1] * same_pads(x_shape[2], kw, stride)[1]
  small = out_hw <= 16 or (stride > 1 and kh > 1 and cin > 3)
  fwd = dx = "matmul" if small else "lax"
  if small and kh > 1 and cin > 4:
    dw = "matmul"
  else:
    bf16_wide = low_precision(dtype) and cout >= 16
    dw = "taps" if out_hw <= 64 * 64 or cin <= 4 or bf16_wide else "lax"
  tiles = x_shape[0] * out_hw // 4  # rows of each of Winograd's 16 matmuls
  if winograd.fits(x_shape, kernel_shape, stride) and min(cin, cout) >= 64 and tiles >= 64:
    fwd = dx = dw = "winograd"
  return fwd, dx, dw


def cpu_conv_dtypes(x_shape, kernel_shape, stride: int, dtype=jnp.float32) -> tuple:
  """The matmul operand dtype of each pass (forward, input gradient, weight gradient): `dtype`, except two
  passes that bf16 makes slower (`--what=conv`). Winograd's bf16 input gradient copies its 16 transformed
  kernel elements transposed (`winograd.conv3x3_input_grad`), a cost that only matmuls of >= 256 rows repay
  (ResNet-18's 4x4 stage: 1.2-1.4x the f32 time). The stem's weight gradient (up to 4 input channels) has
  matmuls too narrow for bf16 to gain."""
  if not low_precision(dtype):
    return (dtype,) * 3
  _, dx_path, _ = cpu_conv_paths(x_shape, kernel_shape, stride, dtype)
  out_hw = same_pads(x_shape[1], kernel_shape[0], stride)[1] * same_pads(x_shape[2], kernel_shape[1], stride)[1]
  dx = jnp.dtype(jnp.float32) if dx_path == "winograd" and x_shape[0] * out_hw // 4 < 256 else dtype
  dw = jnp.dtype(jnp.float32) if kernel_shape[2] <= 4 else dtype
  return dtype, dx, dw


def conv_by(path: str):
  """The forward lowering `path` (lax | matmul | winograd) as f(x, kernel, stride, dtype=None), in f32."""
  if path == "winograd":
    return lambda x, kernel, stride, dtype=None: winograd.conv3x3(x, kernel, dtype)
  return conv_as_matmul if path == "matmul" else lax_conv


def conv_input_grad(path: str, dy, x, kernel, stride: int, dtype=None):
  """dL/dx of the convolution by the lowering `path`, in f32, with matmul operands in `dtype` (default x's)."""
  dtype = dtype or x.dtype
  if path == "winograd":
    return winograd.conv3x3_input_grad(dy, kernel, dtype)
  x32 = x.astype(jnp.float32)
  return jax.vjp(lambda x: conv_by(path)(x, kernel, stride, dtype), x32)[1](dy.astype(jnp.float32))[0]


def conv_weight_grad(path: str, dy, x, kernel, stride: int, dtype=None):
  """dL/dkernel of the convolution by the lowering `path`, in f32, with matmul operands in `dtype`."""
  dtype = dtype or x.dtype
  if path == "taps":
    return conv_weight_grad_by_taps(x, dy, kernel.shape, stride, dtype)
  if path == "winograd":
    return winograd.conv3x3_weight_grad(x, dy, dtype)
  k32 = kernel.astype(jnp.float32)
  return jax.vjp(lambda k: conv_by(path)(x, k, stride, dtype), k32)[1](dy.astype(jnp.float32))[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def cpu_conv(x, kernel, stride: int, matmul_dtype=None):
  """SAME NHWC/HWIO convolution whose three passes each take the fastest CPU lowering for their shape, with
  matmul operands in `matmul_dtype` (default: x's) and results in x's dtype."""
  dtype = jnp.dtype(matmul_dtype or x.dtype)
  fwd_dtype = cpu_conv_dtypes(x.shape, kernel.shape, stride, dtype)[0]
  y = conv_by(cpu_conv_paths(x.shape, kernel.shape, stride, dtype)[0])(x, kernel, stride, fwd_dtype)
  return y.astype(x.dtype)


def _cpu_conv_fwd(x, kernel, stride, matmul_dtype):
  return cpu_conv(x, kernel, stride, matmul_dtype), (x, kernel)


def _cpu_conv_bwd(stride, matmul_dtype, res, dy):
  x, kernel = res
  dtype = jnp.dtype(matmul_dtype or x.dtype)
  _, dx_path, dw_path = cpu_conv_paths(x.shape, kernel.shape, stride, dtype)
  _, dx_dtype, dw_dtype = cpu_conv_dtypes(x.shape, kernel.shape, stride, dtype)
  dx = conv_input_grad(dx_path, dy, x, kernel, stride, dx_dtype).astype(x.dtype)
  return dx, conv_weight_grad(dw_path, dy, x, kernel, stride, dw_dtype).astype(kernel.dtype)


cpu_conv.defvjp(_cpu_conv_fwd, _cpu_conv_bwd)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, precision=None, matmul_dtype=None):
  """`jax.lax.conv_general_dilated` for `nn.Conv(conv_general_dilated=...)`: the convolutions the models make
  (SAME, NHWC/HWIO, equal strides, no dilation or groups) go to `cpu_conv`, any other to XLA's."""
  nhwc = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, ("NHWC", "HWIO", "NHWC"))
  if (isinstance(padding, str) and padding == "SAME" and lhs.ndim == 4 and len(set(window_strides)) == 1 and
      set(lhs_dilation or (1,)) == set(rhs_dilation or (1,)) == {1} and feature_group_count == 1 and
      jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) == nhwc):
    return cpu_conv(lhs, rhs, window_strides[0], matmul_dtype)
  return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                                      feature_group_count, precision=precision)


# `nn.Conv` with the convolution above: the same module, parameters and auto-names (Conv_0, ...)
Conv = functools.partial(nn.Conv, conv_general_dilated=conv_general_dilated)


class UpsampleConv(nn.Conv):
  """`models.UpsampleConv` (`nn.Conv` of `concat([upsample2x(x), skip])`, 3x3, SAME, stride 1), with the same
  parameters, computed without building that concatenation: `conv3x3_upsampled` of x with the kernel's first
  input channels, plus `cpu_conv` of the skip with the others; matmul operands in `matmul_dtype`."""
  matmul_dtype: jnp.dtype | None = None

  @nn.compact
  def __call__(self, x, skip=None):
    if (tuple(self.kernel_size), self.strides, self.padding) not in (((3, 3), 1, "SAME"), ((3, 3), (1, 1), "SAME")):
      raise ValueError(f"cpu_ops.UpsampleConv is 3x3, stride 1, SAME only: got kernel_size={self.kernel_size}, "
                       f"strides={self.strides}, padding={self.padding!r}")
    c = x.shape[-1]
    cin = c + (0 if skip is None else skip.shape[-1])
    # created in nn.Conv's order (kernel, then bias), so that they initialise to the same values
    kernel = self.param("kernel", self.kernel_init, (3, 3, cin, self.features), self.param_dtype)
    bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
    x, skip, kernel, bias = self.promote_dtype(x, skip, kernel, bias, dtype=self.dtype)
    y = conv3x3_upsampled(x, kernel[:, :, :c], self.matmul_dtype).astype(x.dtype)
    if skip is not None:
      y = y + cpu_conv(skip, kernel[:, :, c:], 1, self.matmul_dtype)
    return y if bias is None else y + bias


@functools.cache
def conv_layers(matmul_dtype=None) -> tuple:
  """(conv, up_conv) for `models.layers`: `Conv` and `UpsampleConv`, with their matmuls' operands in
  `matmul_dtype` where one is given (the same objects for the same dtype, so models built twice compare
  equal)."""
  if matmul_dtype is None:
    return Conv, UpsampleConv
  conv = functools.partial(conv_general_dilated, matmul_dtype=jnp.dtype(matmul_dtype))
  return (functools.partial(nn.Conv, conv_general_dilated=conv),
          functools.partial(UpsampleConv, matmul_dtype=jnp.dtype(matmul_dtype)))


def _pool_windows(x) -> list[jax.Array]:
  """The nine stride-2 windows of a 3x3 max-pool with 1 pixel of -inf padding (ResNet's stem pool)."""
  n, h, w, c = x.shape
  ho, wo = (h - 1) // 2 + 1, (w - 1) // 2 + 1
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
  return [
      jax.lax.slice(xp, (0, i, j, 0), (n, i + 2 * ho - 1, j + 2 * wo - 1, c), (1, 2, 2, 1))
      for i in range(3)
      for j in range(3)
  ]


@jax.custom_vjp
def max_pool_3x3_s2(x):
  """`nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))` as a max over nine strided windows, with a
  gradient that goes to the first maximum of each window, as XLA's select-and-scatter does. XLA:CPU expands the
  select-and-scatter gradient of its reduce-window into iotas and a scatter; here both passes are elementwise
  (max, compare, strided pad)."""
  wins = _pool_windows(x)
  y = wins[0]
  for win in wins[1:]:
    y = jnp.maximum(y, win)
  return y


def _max_pool_fwd(x):
  y = max_pool_3x3_s2(x)
  return y, (x, y)


def _max_pool_bwd(res, dy):
  x, y = res
  n, h, w, c = x.shape
  ho, wo = y.shape[1:3]
  taken, dxp = jnp.zeros(y.shape, bool), jnp.zeros((n, h + 2, w + 2, c), x.dtype)
  for t, win in enumerate(_pool_windows(x)):
    i, j = divmod(t, 3)
    hit = (win == y) & ~taken  # the first window element equal to the max takes the gradient
    taken = taken | hit
    # back to padded-input positions (i + 2a, j + 2b): a pad with one interior zero between elements
    pads = ((0, 0, 0), (i, h + 3 - i - 2 * ho, 1), (j, w + 3 - j - 2 * wo, 1), (0, 0, 0))
    dxp = dxp + jax.lax.pad(jnp.where(hit, dy, 0).astype(x.dtype), jnp.zeros((), x.dtype), pads)
  return (dxp[:, 1:h + 1, 1:w + 1],)


max_pool_3x3_s2.defvjp(_max_pool_fwd, _max_pool_bwd)
