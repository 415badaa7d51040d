"""CPU lowerings of the models' convolutions and max-pool: the same functions as XLA's, computed in ways that
XLA:CPU runs faster (im2col and shifted-window matmuls, Winograd, convolutions of upsampled maps on the low-res
map, a max-pool with an elementwise gradient). `models.layers` puts them in the models' place of `nn.Conv`,
`models.UpsampleConv` and `nn.max_pool` (`config.model.conv_impl`: by default on the CPU backend only); every one
is tested against the plain XLA or Flax operation it replaces (`tests/test_conv_lowering.py`), and
`launch/benchmark.py --what=conv` times the convolution lowerings per pass (measurements: docs/performance.md).
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp


def _same_pads(n: int, k: int, s: int):
  out = -(-n // s)
  total = max((out - 1) * s + k - n, 0)
  return (total // 2, total - total // 2), out


def _tap_windows(x, kh: int, kw: int, stride: int, axis: int = 1, barrier: bool = False) -> list[jax.Array]:
  """The kh*kw strided input windows of a SAME convolution over spatial axes (axis, axis + 1), one per tap.

  With `barrier`, the padded input is materialised once: otherwise XLA fuses its producer (a transpose, a
  BatchNorm) into some of the window copies, which then each re-read the input transposed, a strided read where
  a plain copy streams it."""
  (ph, ho), (pw, wo) = _same_pads(x.shape[axis], kh, stride), _same_pads(x.shape[axis + 1], kw, stride)
  pads = [(0, 0)] * x.ndim
  pads[axis], pads[axis + 1] = ph, pw
  x = jnp.pad(x, pads)
  x = jax.lax.optimization_barrier(x) if barrier else x
  rows = [jax.lax.slice_in_dim(x, i, i + stride * (ho - 1) + 1, stride, axis) for i in range(kh)]
  return [jax.lax.slice_in_dim(r, j, j + stride * (wo - 1) + 1, stride, axis + 1) for r in rows for j in range(kw)]


def conv_as_matmul(x, kernel, stride: int):
  """SAME convolution as patches @ kernel. XLA's CPU convolution is slow on tiny feature maps (ResNet's last
  stages) and on strided backward passes; one matmul over the gathered patches is not."""
  kh, kw, _, cout = kernel.shape
  cols = _tap_windows(x, kh, kw, stride)
  patches = jnp.concatenate(cols, axis=-1) if len(cols) > 1 else cols[0]
  return jnp.einsum("nhwk,ko->nhwo", patches, kernel.reshape(-1, cout))


# Winograd F(2x2, 3x3) (Lavin & Gray, 2016): each 4x4 input tile gives 2x2 outputs with 16 multiplies instead
# of 36. The input and output transforms (B^T d B, A^T m A) are additions only; G g G^T is on the kernel.
_WINO_BT = ((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1))
_WINO_G = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))
_WINO_AT = ((1, 1, 1, 0), (0, 1, -1, -1))


def _signed_sum(signs, terms):
  """sum(s * t) over the nonzero coefficients s; those of +-1 are additions and subtractions."""
  out = None
  for s, t in zip(signs, terms):
    if s:
      t = t if abs(s) == 1 else t * abs(s)
      out = (t if s > 0 else -t) if out is None else (out + t if s > 0 else out - t)
  return out


def _winograd_kernel(kernel) -> list[jax.Array]:
  """G g G^T: the 16 transformed kernel elements, each (C, D), as sums of the nine (C, D) taps. Written as an
  einsum, XLA runs it as matmuls only 3-4 wide, with transposes; as sums it is elementwise passes."""
  k = kernel.astype(jnp.float32)
  rows = [[_signed_sum(gi, [k[a, b] for a in range(3)]) for b in range(3)] for gi in _WINO_G]
  return [_signed_sum(gj, row).astype(kernel.dtype) for row in rows for gj in _WINO_G]


def _winograd_input(x, axis: int) -> list[jax.Array]:
  """B^T d B of every 4x4 tile d (stride 2, one pixel of zero padding) of x's spatial axes (axis, axis + 1),
  for even H and W: 16 arrays, one per tile element, with the (H/2, W/2) tile grid in place of those axes."""
  h, w = x.shape[axis], x.shape[axis + 1]
  pads = [(0, 0)] * x.ndim
  pads[axis] = pads[axis + 1] = (1, 1)
  xp = jnp.pad(x, pads)
  rows = [jax.lax.slice_in_dim(xp, i, i + h - 1, 2, axis) for i in range(4)]
  d = [[jax.lax.slice_in_dim(r, j, j + w - 1, 2, axis + 1) for j in range(4)] for r in rows]
  bd = [[_signed_sum(b, [d[i][j] for i in range(4)]) for j in range(4)] for b in _WINO_BT]
  return [_signed_sum(b, row) for row in bd for b in _WINO_BT]


def _winograd_conv(x, u):
  """Winograd F(2x2, 3x3) of x with the transformed kernel u (16 (C, D) elements, `_winograd_kernel`)."""
  n, h, w, c = x.shape
  # 16 separate matmuls, not one batched one: stacking their inputs for a batched matmul costs a copy of the 4x
  # larger transformed map
  v = [t.reshape(-1, c) for t in _winograd_input(x, 1)]
  m = [(v[t] @ u[t]).reshape(n, h // 2, w // 2, -1) for t in range(16)]
  mrows = [[_signed_sum(a, [m[4 * i + j] for i in range(4)]) for j in range(4)] for a in _WINO_AT]
  y = jnp.stack([jnp.stack([_signed_sum(a, row) for a in _WINO_AT], axis=3) for row in mrows], axis=2)
  return y.reshape(n, h, w, -1)


def conv3x3_winograd(x, kernel):
  """SAME stride-1 3x3 convolution by Winograd F(2x2, 3x3), for even H and W: 2.25x fewer multiplies, done as
  16 channel matmuls. Where it runs: `cpu_conv_paths`; with fewer than 64 channels the transforms cost what the
  matmuls save."""
  return _winograd_conv(x, _winograd_kernel(kernel.astype(x.dtype)))


def conv3x3_winograd_input_grad(dy, kernel):
  """dL/dx of `conv3x3_winograd(x, kernel)`: the Winograd convolution of dy with the kernel flipped in space and
  transposed in channels. G with its columns reversed is G with rows 0 and 3 swapped, so that kernel's
  transformed elements are this kernel's, permuted, each transposed inside its matmul, so the pass makes no
  transposed copy of the kernel in memory."""
  u, p = _winograd_kernel(kernel.astype(dy.dtype)), (3, 1, 2, 0)
  return _winograd_conv(dy, [u[4 * p[i] + p[j]].T for i in range(4) for j in range(4)])


def conv3x3_winograd_weight_grad(x, dy):
  """dL/dkernel of `conv3x3_winograd(x, kernel)` from the output gradient dy: the gradient of each of the 16
  transformed kernel elements is a (C, tiles) @ (tiles, D) matmul of the transformed input and A dY A^T, and
  G^T (.) G takes it back to the 3x3 kernel. 4 multiplies per output pixel and channel pair instead of 9, and a
  transformed input 4x the input's size where the shifted-window matmuls (`conv_weight_grad_by_taps`) copy 9x.
  The input is transformed channels-first, so that the matmuls need no transposed operand."""
  c, d = x.shape[-1], dy.shape[-1]
  v = [t.reshape(c, -1) for t in _winograd_input(jnp.transpose(x, (3, 0, 1, 2)), 2)]
  a_cols = [(_WINO_AT[0][i], _WINO_AT[1][i]) for i in range(4)]  # row i of A = AT^T
  dy_ab = [[dy[:, a::2, b::2].reshape(-1, d) for b in range(2)] for a in range(2)]
  dy_aj = [[_signed_sum(a_cols[j], dy_ab[a]) for j in range(4)] for a in range(2)]
  dm = [_signed_sum(a_cols[i], [dy_aj[0][j], dy_aj[1][j]]) for i in range(4) for j in range(4)]
  du = [(v[t] @ dm[t]).astype(jnp.float32) for t in range(16)]
  # G^T (du) G, as sums of the (C, D) elements like `_winograd_kernel`
  rows = [[_signed_sum([gi[a] for gi in _WINO_G], du[j::4]) for j in range(4)] for a in range(3)]
  return jnp.stack([jnp.stack([_signed_sum([gj[b] for gj in _WINO_G], row) for b in range(3)]) for row in rows])


# Nearest x2 upsampling, then a 3x3 SAME convolution: output row 2i+a reads only low-res rows (i-1, i) for a = 0
# and (i, i+1) for a = 1, with the kernel rows that land on the same low-res row summed. [phase][tap][kernel row]
_UP2X_ROWS = (((1.0, 0.0, 0.0), (0.0, 1.0, 1.0)), ((1.0, 1.0, 0.0), (0.0, 0.0, 1.0)))


def conv3x3_upsampled(x, kernel):
  """`conv(upsample2x(x), kernel)` (3x3, SAME, stride 1) computed on x itself: each of the four output phases of
  the upsampling is a 2x2 convolution of x, so a low-res pixel costs 16 multiplies per channel pair instead of
  the 36 of its four upsampled copies, and the 4x larger upsampled map is never built. The four phases are
  one (N*(H+1)*(W+1), 4C) @ (4C, 4D) matmul over x's 2x2 windows."""
  n, h, w, c = x.shape
  r = jnp.asarray(_UP2X_ROWS, jnp.float32)
  k = jnp.einsum("api,bqj,ijco->pqcabo", r, r, kernel.astype(jnp.float32)).astype(x.dtype).reshape(4 * c, -1)
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  patches = jnp.concatenate([xp[:, p:p + h + 1, q:q + w + 1] for p in range(2) for q in range(2)], axis=-1)
  z = (patches.reshape(-1, 4 * c) @ k).reshape(n, h + 1, w + 1, 2, 2, -1)
  y = jnp.stack([jnp.stack([z[:, a:a + h, b:b + w, a, b] for b in range(2)], axis=3) for a in range(2)], axis=2)
  return y.reshape(n, 2 * h, 2 * w, -1)


def lax_conv(x, kernel, stride: int):
  return jax.lax.conv_general_dilated(x, kernel, (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def conv_weight_grad_by_taps(x, dy, kernel_shape, stride: int):
  """dL/dkernel of a SAME convolution as one (kw*C, N*H*W) @ (N*H*W, D) matmul per kernel row.

  XLA lowers the weight gradient as a convolution whose window is the whole feature map, which XLA:CPU runs far
  below its matmul rate on mid-sized maps (ResNet's 32x32 and 16x16 stages). Matmuls over a channels-first copy
  of the input are plain large matmuls and never materialise the 9x larger im2col matrix. A kernel row's kw
  windows are copied in one pass and share one matmul, with kw*C output rows, where one matmul per tap has a
  C x D output that leaves a matmul short of work at 64 channels."""
  kh, kw, c, d = kernel_shape
  dy2 = dy.reshape(-1, d)
  wins = _tap_windows(jnp.transpose(x, (3, 0, 1, 2)), kh, kw, stride, axis=2, barrier=True)
  if c <= 4:  # the stem: one (taps x C) row per tap and channel in a single matmul, not kh matmuls of kw*C rows
    return jnp.einsum("tck,kd->tcd", jnp.stack([w.reshape(c, -1) for w in wins]), dy2).reshape(kh, kw, c, d)
  rows = [jnp.concatenate(wins[i * kw:(i + 1) * kw], axis=0).reshape(kw * c, -1) @ dy2 for i in range(kh)]
  return jnp.stack(rows).reshape(kh, kw, c, d)


def cpu_conv_paths(x_shape, kernel_shape, stride: int) -> tuple[str, str, str]:
  """Which lowering (lax | matmul | winograd | taps) the forward, input-gradient and weight-gradient passes use
  on CPU.

  Chosen per shape from `launch/benchmark.py --what=conv`, on both cores and on one (`taskset -c 0`, the work a
  pass costs when the step runs another pass beside it): XLA's convolution is fastest on large maps with few
  channels (the U-Net decoder's 128x128 stage); Winograd wins all three passes of 3x3 stride-1 convolutions with
  >= 64 channels in and out (ResNet-18's 32x32 to 4x4 stages) once its 16 matmuls have >= 64 rows, below which
  they are too short to pay for the transforms; im2col matmuls win on tiny maps and strided convolutions;
  shifted-window ("taps") matmuls win the other weight gradients on maps up to 64x64, and for the single-channel
  stem at any size."""
  kh, kw, cin, cout = kernel_shape
  out_hw = _same_pads(x_shape[1], kh, stride)[1] * _same_pads(x_shape[2], kw, stride)[1]
  small = out_hw <= 16 or (stride > 1 and kh > 1 and cin > 3)
  fwd = dx = "matmul" if small else "lax"
  if small and kh > 1 and cin > 4:
    dw = "matmul"
  else:
    dw = "taps" if out_hw <= 64 * 64 or cin <= 4 else "lax"
  tiles = x_shape[0] * out_hw // 4  # rows of each of Winograd's 16 matmuls
  if winograd_fits(x_shape, kernel_shape, stride) and min(cin, cout) >= 64 and tiles >= 64:
    fwd = dx = dw = "winograd"
  return fwd, dx, dw


def winograd_fits(x_shape, kernel_shape, stride: int) -> bool:
  return kernel_shape[:2] == (3, 3) and stride == 1 and x_shape[1] % 2 == 0 and x_shape[2] % 2 == 0


def conv_by(path: str):
  """The forward lowering `path` (lax | matmul | winograd) as f(x, kernel, stride)."""
  if path == "winograd":
    return lambda x, kernel, stride: conv3x3_winograd(x, kernel)
  return conv_as_matmul if path == "matmul" else lax_conv


def conv_input_grad(path: str, dy, x, kernel, stride: int):
  if path == "winograd":
    return conv3x3_winograd_input_grad(dy, kernel)
  return jax.vjp(lambda x: conv_by(path)(x, kernel, stride), x)[1](dy)[0]


def conv_weight_grad(path: str, dy, x, kernel, stride: int):
  if path == "taps":
    return conv_weight_grad_by_taps(x, dy, kernel.shape, stride).astype(kernel.dtype)
  if path == "winograd":
    return conv3x3_winograd_weight_grad(x, dy).astype(kernel.dtype)
  return jax.vjp(lambda k: conv_by(path)(x, k, stride), kernel)[1](dy)[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def cpu_conv(x, kernel, stride: int):
  """SAME NHWC/HWIO convolution whose three passes each take the fastest CPU lowering for their shape."""
  return conv_by(cpu_conv_paths(x.shape, kernel.shape, stride)[0])(x, kernel, stride)


def _cpu_conv_fwd(x, kernel, stride):
  return cpu_conv(x, kernel, stride), (x, kernel)


def _cpu_conv_bwd(stride, res, dy):
  x, kernel = res
  _, dx_path, dw_path = cpu_conv_paths(x.shape, kernel.shape, stride)
  return conv_input_grad(dx_path, dy, x, kernel, stride), conv_weight_grad(dw_path, dy, x, kernel, stride)


cpu_conv.defvjp(_cpu_conv_fwd, _cpu_conv_bwd)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, precision=None):
  """`jax.lax.conv_general_dilated` for `nn.Conv(conv_general_dilated=...)`: the convolutions the models make
  (SAME, NHWC/HWIO, equal strides, no dilation or groups) go to `cpu_conv`, any other to XLA's."""
  nhwc = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, ("NHWC", "HWIO", "NHWC"))
  if (isinstance(padding, str) and padding == "SAME" and lhs.ndim == 4 and len(set(window_strides)) == 1 and
      set(lhs_dilation or (1,)) == set(rhs_dilation or (1,)) == {1} and feature_group_count == 1 and
      jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) == nhwc):
    return cpu_conv(lhs, rhs, window_strides[0])
  return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                                      feature_group_count, precision=precision)


# `nn.Conv` with the convolution above: the same module, parameters and auto-names (Conv_0, ...)
Conv = functools.partial(nn.Conv, conv_general_dilated=conv_general_dilated)


class UpsampleConv(nn.Conv):
  """`models.UpsampleConv` (`nn.Conv` of `concat([upsample2x(x), skip])`, 3x3, SAME, stride 1), with the same
  parameters, computed without building that concatenation: `conv3x3_upsampled` of x with the kernel's first
  input channels, plus `cpu_conv` of the skip with the others."""
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
    y = conv3x3_upsampled(x, kernel[:, :, :c])
    if skip is not None:
      y = y + cpu_conv(skip, kernel[:, :, c:], 1)
    return y if bias is None else y + bias


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
