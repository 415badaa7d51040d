"""FLOPs of a step, counted from its traced program, from which benchmarks report GFLOP/s and MFU."""
from __future__ import annotations

import math

import jax


def _eqn_flops(eqn) -> float:
  """FLOPs (2 per multiply-add) of one matmul or convolution equation; 0 for every other primitive."""
  name, out = eqn.primitive.name, eqn.outvars[0].aval.shape
  if name == "dot_general":
    (contract, _), _ = eqn.params["dimension_numbers"]
    return 2.0 * math.prod(out) * math.prod(eqn.invars[0].aval.shape[d] for d in contract)
  if name == "conv_general_dilated":
    # Each output element: one input-feature group x the kernel window. An input dilated by d (a strided
    # convolution's input gradient) has d-1 zeros between its values, which meet 1/d of the window's taps.
    rhs, spec = eqn.invars[1].aval.shape, eqn.params["dimension_numbers"].rhs_spec
    zeros = math.prod(eqn.params["lhs_dilation"])
    return 2.0 * math.prod(out) * math.prod(rhs[d] for d in spec[1:]) / zeros
  return 0.0


def _sub_jaxprs(value):
  if hasattr(value, "eqns"):
    yield value
  elif hasattr(value, "jaxpr") and hasattr(value.jaxpr, "eqns"):
    yield value.jaxpr
  elif isinstance(value, (tuple, list)):
    for v in value:
      yield from _sub_jaxprs(v)


def _live_eqns(jaxpr) -> list:
  """The equations that the outputs depend on: traced programs carry dead code that XLA removes (under
  `value_and_grad`, a custom-VJP function's forward pass appears twice, and one copy's result is dropped)."""
  live, kept = {v for v in jaxpr.outvars if not hasattr(v, "val")}, []
  for eqn in reversed(jaxpr.eqns):
    if eqn.effects or any(v in live for v in eqn.outvars):
      kept.append(eqn)
      live.update(v for v in eqn.invars if not hasattr(v, "val"))
  return kept[::-1]


def _jaxpr_flops(jaxpr) -> float:
  total = 0.0
  for eqn in _live_eqns(jaxpr):
    subs = [f for v in eqn.params.values() for f in map(_jaxpr_flops, _sub_jaxprs(v))]
    if eqn.primitive.name == "cond":  # one branch runs
      total += max(subs, default=0.0)
    else:  # a scan runs its body `length` times; a while loop's trip count is unknown, counted once
      total += _eqn_flops(eqn) + eqn.params.get("length", 1) * sum(subs)
  return total


def step_flops(fn, *args) -> float:
  """FLOPs of `fn(*args)` in its matmuls and convolutions, counted from the traced program.

  Unlike XLA's cost analysis it counts on every backend: on GPU that analysis no longer sees the convolutions
  once they became cuDNN calls. Element-wise work (normalisation, activations, the optimiser) is not counted, as in MFU.
  On an accelerator this is the model's count. On CPU it counts what runs: a Winograd convolution
  (`winograd.conv3x3`) does 2.25x fewer multiplies than the model's direct one, and the decoder's
  convolution of an upsampled map (`cpu_ops.conv3x3_upsampled`) about 2.25x fewer.
  """
  return _jaxpr_flops(jax.make_jaxpr(fn)(*args).jaxpr)
