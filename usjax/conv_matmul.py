"""Convolutions as matmuls over gathered windows (im2col, shifted-window weight gradients, the decoder's
convolution of an upsampled map), and XLA's own convolution: the lowerings `usjax.cpu_ops.cpu_conv` chooses
from, beside `usjax.winograd`.

Each takes its operands in f32 and a matmul operand dtype `dtype` (default: x's). Windows are gathered in f32 and
rounded to `dtype` as the last step before a matmul, and every result is the matmul's f32 sum: XLA:CPU runs bf16
copies, pads and sums many times slower than f32 ones (it converts each element to f32 and back around each
operation), while the conversion itself is one cheap pass.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from usjax.precision import low_precision, matmul, row_major


def same_pads(n: int, k: int, s: int):
  out = -(-n // s)
  total = max((out - 1) * s + k - n, 0)
  return (total // 2, total - total // 2), out


def tap_windows(x, kh: int, kw: int, stride: int, axis: int = 1, barrier: bool = False) -> list[jax.Array]:
  """The kh*kw strided input windows of a SAME convolution over spatial axes (axis, axis + 1), one per tap.

  With `barrier`, the padded input is materialised once: otherwise XLA fuses its producer (a transpose, a
  BatchNorm) into some of the window copies, which then each re-read the input transposed, a strided read where
  a plain copy streams it."""
  (ph, ho), (pw, wo) = same_pads(x.shape[axis], kh, stride), same_pads(x.shape[axis + 1], kw, stride)
  pads = [(0, 0)] * x.ndim
  pads[axis], pads[axis + 1] = ph, pw
  x = jnp.pad(x, pads)
  x = jax.lax.optimization_barrier(x) if barrier else x
  rows = [jax.lax.slice_in_dim(x, i, i + stride * (ho - 1) + 1, stride, axis) for i in range(kh)]
  return [jax.lax.slice_in_dim(r, j, j + stride * (wo - 1) + 1, stride, axis + 1) for r in rows for j in range(kw)]


def _channels_first(x):
  return jnp.transpose(x, (3, 0, 1, 2))


def _im2col(x, kh: int, kw: int, stride: int, channels_first: bool = False):
  """The (N*Ho*Wo, kh*kw*C) patches of a SAME convolution, or with `channels_first` their (kh*kw*C, N*Ho*Wo)
  transpose, gathered from a channels-first copy of x."""
  if channels_first:
    windows = tap_windows(_channels_first(x), kh, kw, stride, axis=2, barrier=True)
    return jnp.concatenate(windows).reshape(kh * kw * x.shape[-1], -1)
  cols = tap_windows(x, kh, kw, stride)
  patches = jnp.concatenate(cols, axis=-1) if len(cols) > 1 else cols[0]
  return patches.reshape(-1, patches.shape[-1])


def _windows2x2(x, channels_first: bool = False):
  """The (N*(H+1)*(W+1), 4C) 2x2 windows of x padded by one pixel, or their transpose (`channels_first`)."""
  n, h, w, c = x.shape
  if channels_first:
    xp = jnp.pad(_channels_first(x), ((0, 0), (0, 0), (1, 1), (1, 1)))
    return jnp.concatenate([xp[:, :, p:p + h + 1, q:q + w + 1] for p in range(2) for q in range(2)]).reshape(4 * c, -1)
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  windows = [xp[:, p:p + h + 1, q:q + w + 1] for p in range(2) for q in range(2)]
  return jnp.concatenate(windows, axis=-1).reshape(-1, 4 * c)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _gathered_matmul(gather, dtype, x, w):
  """gather(x) @ w in f32 with operands in `dtype`, for a linear `gather` of x into a (rows, K) matrix
  (`_im2col`, `_windows2x2`: they take `channels_first`).

  Its gradients are matmuls of the same kind. x's scatters the patches' gradient back onto x in f32. With bf16
  operands, w's gradient multiplies channels-first patches: XLA:CPU multiplies bf16 at its bf16 rate only with
  row-major operands, and the transpose of the (rows, K) patches in that matmul would make it an f32 one."""
  return matmul(gather(x).astype(dtype), w.astype(dtype), jnp.float32)


def _gathered_matmul_fwd(gather, dtype, x, w):
  patches = gather(x).astype(dtype)
  return matmul(patches, w.astype(dtype), jnp.float32), (x, patches, w)


def _gathered_matmul_bwd(gather, dtype, res, g):
  x, patches, w = res
  g = g.astype(dtype)
  scatter = jax.linear_transpose(gather, jax.ShapeDtypeStruct(x.shape, jnp.float32))
  w_t = row_major(w.T).astype(dtype) if low_precision(dtype) else w.T.astype(dtype)
  dx = scatter(matmul(g, w_t, jnp.float32))[0].astype(x.dtype)
  if low_precision(dtype):
    dw = matmul(gather(x, channels_first=True).astype(dtype), g, jnp.float32)
  else:
    dw = patches.T @ g
  return dx, dw.astype(w.dtype)


_gathered_matmul.defvjp(_gathered_matmul_fwd, _gathered_matmul_bwd)


def conv_as_matmul(x, kernel, stride: int, dtype=None):
  """SAME convolution as patches @ kernel. XLA's CPU convolution is slow on tiny feature maps (ResNet's last
  stages) and on strided backward passes; one matmul over the gathered patches is not."""
  kh, kw, _, cout = kernel.shape
  n, ho, wo = x.shape[0], same_pads(x.shape[1], kh, stride)[1], same_pads(x.shape[2], kw, stride)[1]
  gather = functools.partial(_im2col, kh=kh, kw=kw, stride=stride)
  return _gathered_matmul(gather, jnp.dtype(dtype or x.dtype), x, kernel.reshape(-1, cout)).reshape(n, ho, wo, cout)


# Nearest x2 upsampling, then a 3x3 SAME convolution: output row 2i+a reads only low-res rows (i-1, i) for a = 0
# and (i, i+1) for a = 1, with the kernel rows that land on the same low-res row summed. [phase][tap][kernel row]
_UP2X_ROWS = (((1.0, 0.0, 0.0), (0.0, 1.0, 1.0)), ((1.0, 1.0, 0.0), (0.0, 0.0, 1.0)))


def _upsampled_kernel(kernel):
  """The (4C, 4D) kernel of `conv3x3_upsampled`'s matmul, rows (tap p, tap q, C) and columns (phase a, phase b, D):
  for each phase and 2x2 tap, the sum of the (C, D) kernel taps that land on it. Written as an einsum with
  `_UP2X_ROWS`, XLA runs it (and its transpose in the backward pass) as matmuls only 3 wide, far below the
  matmul rate; as sums it is elementwise passes, like Winograd's kernel transform."""
  k = kernel.astype(jnp.float32)
  rows = lambda a, p: [i for i in range(3) if _UP2X_ROWS[a][p][i]]

  def tap(a, p, b, q):
    return sum(k[i, j] for i in rows(a, p) for j in rows(b, q))

  return jnp.concatenate([
      jnp.concatenate([tap(a, p, b, q) for a in range(2) for b in range(2)], axis=1)
      for p in range(2)
      for q in range(2)
  ])


def conv3x3_upsampled(x, kernel, dtype=None):
  """`conv(upsample2x(x), kernel)` (3x3, SAME, stride 1) computed on x itself: each of the four output phases of
  the upsampling is a 2x2 convolution of x, so a low-res pixel costs 16 multiplies per channel pair instead of
  the 36 of its four upsampled copies, and the 4x larger upsampled map is never built. The four phases are
  one (N*(H+1)*(W+1), 4C) @ (4C, 4D) matmul over x's 2x2 windows."""
  n, h, w, c = x.shape
  z = _gathered_matmul(_windows2x2, jnp.dtype(dtype or x.dtype), x, _upsampled_kernel(kernel))
  z = z.reshape(n, h + 1, w + 1, 2, 2, -1)
  y = jnp.stack([jnp.stack([z[:, a:a + h, b:b + w, a, b] for b in range(2)], axis=3) for a in range(2)], axis=2)
  return y.reshape(n, 2 * h, 2 * w, -1)


def lax_conv(x, kernel, stride: int, dtype=None):
  """XLA's convolution, in f32 whatever `dtype`: XLA:CPU's bf16 convolution runs below its f32 one."""
  return jax.lax.conv_general_dilated(x.astype(jnp.float32), kernel.astype(jnp.float32), (stride, stride), "SAME",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def conv_weight_grad_by_taps(x, dy, kernel_shape, stride: int, dtype=None):
  """dL/dkernel of a SAME convolution as one (kw*C, N*H*W) @ (N*H*W, D) matmul per kernel row.

  XLA lowers the weight gradient as a convolution whose window is the whole feature map, which XLA:CPU runs far
  below its matmul rate on mid-sized maps (ResNet's 32x32 and 16x16 stages). Matmuls over a channels-first copy
  of the input are plain large matmuls and never materialise the 9x larger im2col matrix. A kernel row's kw
  windows are copied in one pass and share one matmul, with kw*C output rows, where one matmul per tap has a
  C x D output that leaves a matmul short of work at 64 channels."""
  kh, kw, c, d = kernel_shape
  dtype = dtype or x.dtype
  dy2 = dy.reshape(-1, d).astype(dtype)
  if c <= 4:  # the stem: one (taps x C) row per tap and channel in a single matmul, not kh matmuls of kw*C rows
    return matmul(_im2col(x, kh, kw, stride, channels_first=True).astype(dtype), dy2,
                  jnp.float32).reshape(kh, kw, c, d)
  wins = tap_windows(_channels_first(x), kh, kw, stride, axis=2, barrier=True)
  rows = [jnp.concatenate(wins[i * kw:(i + 1) * kw]).reshape(kw * c, -1).astype(dtype) for i in range(kh)]
  return jnp.stack([matmul(row, dy2, jnp.float32) for row in rows]).reshape(kh, kw, c, d)
