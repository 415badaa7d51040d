"""Winograd F(2x2, 3x3) (Lavin & Gray, 2016) for the three passes of a SAME stride-1 3x3 convolution: each 4x4
input tile gives 2x2 outputs with 16 multiplies instead of 36, as 16 channel matmuls between addition-only
transforms. `usjax.cpu_ops.cpu_conv_paths` says where it runs.

Each pass takes f32 arrays and a matmul operand dtype `dtype` (default: the input's) and returns f32. The
transforms are computed in f32: with bf16 operands, the transformed input and kernel are rounded once, as the
last step before the 16 matmuls, which accumulate in f32 (`precision.matmul`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from usjax.precision import low_precision, matmul, row_major

# B^T d B transforms the input tile, G g G^T the kernel and A^T m A takes the 4x4 products back to 2x2 outputs;
# B and A have entries 0 and +-1 only.
_WINO_BT = ((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1))
_WINO_G = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))
_WINO_AT = ((1, 1, 1, 0), (0, 1, -1, -1))


def fits(x_shape, kernel_shape, stride: int) -> bool:
  return kernel_shape[:2] == (3, 3) and stride == 1 and x_shape[1] % 2 == 0 and x_shape[2] % 2 == 0


def _signed_sum(signs, terms):
  """sum(s * t) over the nonzero coefficients s; those of +-1 are additions and subtractions."""
  out = None
  for s, t in zip(signs, terms):
    if s:
      t = t if abs(s) == 1 else t * abs(s)
      out = (t if s > 0 else -t) if out is None else (out + t if s > 0 else out - t)
  return out


def _kernel(kernel, dtype) -> list[jax.Array]:
  """G g G^T: the 16 transformed kernel elements, each (C, D) in `dtype`, as sums of the nine (C, D) taps.
  Written as an einsum, XLA runs it as matmuls only 3-4 wide, with transposes; as sums it is elementwise
  passes."""
  k = kernel.astype(jnp.float32)
  rows = [[_signed_sum(gi, [k[a, b] for a in range(3)]) for b in range(3)] for gi in _WINO_G]
  return [_signed_sum(gj, row).astype(dtype) for row in rows for gj in _WINO_G]


def _input(x, axis: int, dtype) -> list[jax.Array]:
  """B^T d B of every 4x4 tile d (stride 2, one pixel of zero padding) of x's spatial axes (axis, axis + 1),
  for even H and W: 16 arrays in `dtype`, one per tile element, with the (H/2, W/2) tile grid in place of
  those axes."""
  h, w = x.shape[axis], x.shape[axis + 1]
  pads = [(0, 0)] * x.ndim
  pads[axis] = pads[axis + 1] = (1, 1)
  xp = jnp.pad(x.astype(jnp.float32), pads)
  rows = [jax.lax.slice_in_dim(xp, i, i + h - 1, 2, axis) for i in range(4)]
  d = [[jax.lax.slice_in_dim(r, j, j + w - 1, 2, axis + 1) for j in range(4)] for r in rows]
  bd = [[_signed_sum(b, [d[i][j] for i in range(4)]) for j in range(4)] for b in _WINO_BT]
  return [_signed_sum(b, row).astype(dtype) for row in bd for b in _WINO_BT]


def _conv(x, u):
  """Winograd F(2x2, 3x3) of x with the transformed kernel u (16 (C, D) elements, `_kernel`, in the operand
  dtype)."""
  n, h, w, c = x.shape
  # 16 separate matmuls, not one batched one: stacking their inputs for a batched matmul costs a copy of the 4x
  # larger transformed map
  v = [t.reshape(-1, c) for t in _input(x, 1, u[0].dtype)]
  m = [matmul(v[t], u[t], jnp.float32).reshape(n, h // 2, w // 2, -1) for t in range(16)]
  mrows = [[_signed_sum(a, [m[4 * i + j] for i in range(4)]) for j in range(4)] for a in _WINO_AT]
  y = jnp.stack([jnp.stack([_signed_sum(a, row) for a in _WINO_AT], axis=3) for row in mrows], axis=2)
  return y.reshape(n, h, w, -1)


def conv3x3(x, kernel, dtype=None):
  """SAME stride-1 3x3 convolution, for even H and W: 2.25x fewer multiplies than the direct one."""
  return _conv(x, _kernel(kernel, dtype or x.dtype))


def conv3x3_input_grad(dy, kernel, dtype=None):
  """dL/dx of `conv3x3(x, kernel)`: the Winograd convolution of dy with the kernel flipped in space and
  transposed in channels. G with its columns reversed is G with rows 0 and 3 swapped, so that kernel's
  transformed elements are this kernel's, permuted and transposed. In f32 each is transposed inside its
  matmul, so the pass makes no transposed copy of the kernel in memory. bf16 matmuls need row-major operands
  (`precision.row_major`): there the 16 elements are transposed in one copy, after the transform (transposed
  before it, XLA fuses the kernel's transposing read into each of the 16 sums: the pass took 2-2.6x as long at
  256-512 channels)."""
  dtype, p = dtype or dy.dtype, (3, 1, 2, 0)
  if low_precision(dtype):
    u = row_major(jnp.transpose(jnp.stack(_kernel(kernel, jnp.float32)), (0, 2, 1)).astype(dtype))
  else:
    u = [t.T for t in _kernel(kernel, dtype)]
  return _conv(dy, [u[4 * p[i] + p[j]] for i in range(4) for j in range(4)])


def conv3x3_weight_grad(x, dy, dtype=None):
  """dL/dkernel of `conv3x3(x, kernel)` from the output gradient dy, in f32: the gradient of each of the 16
  transformed kernel elements is a (C, tiles) @ (tiles, D) matmul of the transformed input and A dY A^T, and
  G^T (.) G takes it back to the 3x3 kernel. 4 multiplies per output pixel and channel pair instead of 9, and a
  transformed input 4x the input's size where shifted-window matmuls copy 9x. The input is transformed
  channels-first, so that the matmuls need no transposed operand."""
  c, d, dtype = x.shape[-1], dy.shape[-1], dtype or x.dtype
  v = [t.reshape(c, -1) for t in _input(jnp.transpose(x, (3, 0, 1, 2)), 2, dtype)]
  a_cols = [(_WINO_AT[0][i], _WINO_AT[1][i]) for i in range(4)]  # row i of A = AT^T
  dy32 = dy.astype(jnp.float32)
  dy_ab = [[dy32[:, a::2, b::2].reshape(-1, d) for b in range(2)] for a in range(2)]
  dy_aj = [[_signed_sum(a_cols[j], dy_ab[a]) for j in range(4)] for a in range(2)]
  dm = [_signed_sum(a_cols[i], [dy_aj[0][j], dy_aj[1][j]]).astype(dtype) for i in range(4) for j in range(4)]
  du = [matmul(v[t], dm[t], jnp.float32) for t in range(16)]
  # G^T (du) G, as sums of the (C, D) elements like `_kernel`
  rows = [[_signed_sum([gi[a] for gi in _WINO_G], du[j::4]) for j in range(4)] for a in range(3)]
  return jnp.stack([jnp.stack([_signed_sum([gj[b] for gj in _WINO_G], row) for b in range(3)]) for row in rows])
