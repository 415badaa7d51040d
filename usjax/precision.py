"""Mixed precision: the compute dtype `config.model.dtype` names, and the matmul that the CPU lowerings of
`usjax.cpu_ops` use for it.

bf16 compute keeps weights, optimizer state, loss, BatchNorm statistics and metrics in f32 (Flax's `dtype` is the
compute dtype; `param_dtype` stays f32). On a CPU it pays only where the cores multiply bf16 themselves (AVX512-BF16,
AMX): elsewhere XLA:CPU emulates it, slower than f32. So 'auto' is bf16 on accelerators and on such CPUs, f32 on
other CPUs, and an explicit 'bfloat16' on those CPUs is honoured with a one-line notice.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from absl import logging

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
DTYPE_NAMES = ("auto", *DTYPES)
# /proc/cpuinfo flags of x86 CPUs whose cores multiply bf16 natively
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def cpu_flags(path: str = "/proc/cpuinfo") -> frozenset[str]:
  """The first processor's feature flags in /proc/cpuinfo; empty where there is none (macOS, Windows)."""
  try:
    with open(path) as f:
      line = next((line for line in f if line.startswith("flags")), "")
  except OSError:
    return frozenset()
  return frozenset(line.partition(":")[2].split())


def native_bf16() -> bool:
  """Whether this host's CPU multiplies bf16 natively."""
  return bool(BF16_FLAGS & cpu_flags())


@functools.cache
def _emulated_notice() -> None:
  logging.warning("model.dtype=bfloat16 on a CPU without native bf16 (no %s in /proc/cpuinfo): emulated, slower "
                  "than float32", " or ".join(sorted(BF16_FLAGS)))


def compute_dtype(name: str, backend: str | None = None):
  """The compute dtype of `config.model.dtype` on `backend` (default: JAX's): 'float32', 'bfloat16', or 'auto'
  (bf16 on accelerators and on CPUs with native bf16, else f32)."""
  if name not in DTYPE_NAMES:
    raise ValueError(f"model.dtype must be one of {', '.join(DTYPE_NAMES)}, got {name!r}")
  cpu = (backend or jax.default_backend()) == "cpu"
  if name == "auto":
    return jnp.bfloat16 if not cpu or native_bf16() else jnp.float32
  if name == "bfloat16" and cpu and not native_bf16():
    _emulated_notice()
  return DTYPES[name]


def low_precision(dtype) -> bool:
  return jnp.dtype(dtype).itemsize < 4


def row_major(x):
  """x, stored row-major. XLA gives a transpose's result the transposed memory layout (so that the transpose
  is free), and XLA:CPU multiplies bf16 at its bf16 rate only with row-major operands: it does any other bf16
  matmul in f32. A flattened copy behind an optimization barrier keeps the transposed layout from reaching the
  matmul (XLA may still fuse the transposing copy into the operand's producer)."""
  return jax.lax.optimization_barrier(x.reshape(-1)).reshape(x.shape)


def matmul(a, b, out_dtype=None):
  """a @ b of 2-D arrays. bf16 operands are multiplied as bf16 with f32 accumulation (`preferred_element_type`),
  the form XLA:CPU runs at its bf16 rate (a bf16 result type takes a far slower path), and rounded to
  `out_dtype` (default: a's dtype). Their gradients are the same kind of matmul of the cotangent in a's dtype.
  f32 operands are a plain a @ b. Both operands must be row-major for the bf16 rate (`row_major`)."""
  if not low_precision(a.dtype):
    return a @ b
  return _mixed_matmul(a, b.astype(a.dtype), jnp.dtype(out_dtype or a.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _mixed_matmul(a, b, out_dtype):
  return jnp.matmul(a, b, preferred_element_type=jnp.float32).astype(out_dtype)


def _mixed_matmul_fwd(a, b, out_dtype):
  return _mixed_matmul(a, b, out_dtype), (a, b)


def _mixed_matmul_bwd(out_dtype, res, g):
  a, b = res
  g = g.astype(a.dtype)
  return _mixed_matmul(g, row_major(b.T), a.dtype), _mixed_matmul(row_major(a.T), g, b.dtype)


_mixed_matmul.defvjp(_mixed_matmul_fwd, _mixed_matmul_bwd)
