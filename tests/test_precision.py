"""`usjax.precision`: which compute dtype `model.dtype` resolves to (bf16 only where the CPU has it natively,
read from a mocked /proc/cpuinfo), f32 as the default, and the bf16 matmul with f32 accumulation."""
import logging

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from configs import default
from usjax import models, precision

ZEN4 = "fpu vme sse sse2 avx2 avx512f avx512bw avx512_bf16 avx512_vnni"
SAPPHIRE_RAPIDS = "fpu sse2 avx2 avx512f amx_bf16 amx_tile amx_int8"
ZEN3 = "fpu vme sse sse2 avx avx2 fma"


def fake_cpuinfo(tmp_path, flags: str) -> str:
  path = tmp_path / "cpuinfo"
  path.write_text(f"processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: {flags}\n\nprocessor\t: 1\n"
                  f"flags\t\t: {flags}\n")
  return str(path)


@pytest.fixture
def cpu_with(monkeypatch, tmp_path):
  """Makes `precision.cpu_flags` read a /proc/cpuinfo with the given flags line."""
  read = precision.cpu_flags

  def use(flags: str):
    path = fake_cpuinfo(tmp_path, flags)
    monkeypatch.setattr(precision, "cpu_flags", lambda: read(path))

  return use


def test_cpuinfo_flags_are_read_from_the_flags_line(tmp_path):
  assert precision.cpu_flags(fake_cpuinfo(tmp_path, ZEN4)) >= {"avx512_bf16", "avx512f", "avx2"}
  assert precision.cpu_flags(str(tmp_path / "missing")) == frozenset()  # no /proc (macOS): no flags


@pytest.mark.parametrize("flags,native", [(ZEN4, True), (SAPPHIRE_RAPIDS, True), (ZEN3, False), ("", False)])
def test_auto_is_bf16_only_on_cpus_with_native_bf16(cpu_with, flags, native):
  cpu_with(flags)
  assert precision.native_bf16() is native
  assert precision.compute_dtype("auto", "cpu") == (jnp.bfloat16 if native else jnp.float32)
  assert precision.compute_dtype("float32", "cpu") == jnp.float32
  assert precision.compute_dtype("auto", "gpu") == jnp.bfloat16  # accelerators: bf16 whatever the host CPU


def test_explicit_bf16_on_a_cpu_without_it_is_kept_with_one_notice(cpu_with, caplog):
  cpu_with(ZEN3)
  precision._emulated_notice.cache_clear()
  with caplog.at_level(logging.WARNING):
    assert precision.compute_dtype("bfloat16", "cpu") == jnp.bfloat16
    assert precision.compute_dtype("bfloat16", "cpu") == jnp.bfloat16
  notices = [r for r in caplog.records if "without native bf16" in r.getMessage()]
  assert len(notices) == 1 and "\n" not in notices[0].getMessage()
  caplog.clear()
  cpu_with(ZEN4)
  with caplog.at_level(logging.WARNING):
    assert precision.compute_dtype("bfloat16", "gpu") == jnp.bfloat16
  assert not caplog.records


def test_float32_stays_the_default_on_every_cpu(cpu_with):
  """The default config computes in f32 on every CPU; 'auto' gives bf16 where it is native: with the CPU
  lowerings, as their matmul operands (the modules compute in f32), elsewhere as the modules' dtype."""
  cfg = default.get_config()
  assert cfg.model.dtype == "float32"
  f32_layers = models.layers(cfg.model.conv_impl)
  for flags in (ZEN4, ZEN3):
    cpu_with(flags)
    common = models._common(cfg.model)
    assert common["dtype"] == jnp.float32 and common["up_conv"] == f32_layers["up_conv"]
  cfg.model.dtype = "auto"
  on_cpu = jax.default_backend() == "cpu"
  assert models._common(cfg.model)["up_conv"] == f32_layers["up_conv"] or not on_cpu  # ZEN3, the last one
  cpu_with(ZEN4)
  common = models._common(cfg.model)
  assert common["up_conv"] == models.layers(cfg.model.conv_impl, jnp.bfloat16)["up_conv"]
  if on_cpu:  # the tests' backend
    assert common["dtype"] == jnp.float32 and common["up_conv"].keywords["matmul_dtype"] == jnp.bfloat16
    cfg.model.conv_impl = "xla"  # XLA's layers compute in the modules' dtype
    assert models._common(cfg.model)["dtype"] == jnp.bfloat16


def test_unknown_dtype_is_one_line():
  with pytest.raises(ValueError, match="model.dtype must be one of auto, float32, bfloat16, got 'float16'"):
    precision.compute_dtype("float16")


def bf16(a):
  return np.asarray(a, np.float32).astype(ml_dtypes.bfloat16)


def test_bf16_matmul_accumulates_in_f32_and_its_gradients_too():
  """Against float64 products of the bf16 operands: accumulated in f32 over 4096 terms, the result is within
  1e-4 of the largest output before its one rounding to bf16; the gradients within bf16's rounding."""
  rng = np.random.default_rng(0)
  a, b, g = bf16(rng.normal(size=(8, 4096))), bf16(rng.normal(size=(4096, 16))), bf16(rng.normal(size=(8, 16)))
  a64, b64, g64 = (np.asarray(v, np.float64) for v in (a, b, g))
  out = precision.matmul(jnp.asarray(a), jnp.asarray(b), jnp.float32)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, a64 @ b64, rtol=0, atol=1e-4 * np.abs(a64 @ b64).max())
  rounded = precision.matmul(jnp.asarray(a), jnp.asarray(b))
  assert rounded.dtype == jnp.bfloat16
  np.testing.assert_array_equal(rounded, bf16(out))  # one rounding, of the f32 sum
  da, db = jax.vjp(lambda a, b: precision.matmul(a, b), jnp.asarray(a), jnp.asarray(b))[1](jnp.asarray(g))
  assert da.dtype == db.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.float32(da), g64 @ b64.T, rtol=0, atol=2**-8 * np.abs(g64 @ b64.T).max())
  np.testing.assert_allclose(np.float32(db), a64.T @ g64, rtol=0, atol=2**-8 * np.abs(a64.T @ g64).max())


def test_f32_matmul_is_plain():
  a, b = jnp.ones((3, 4)), jnp.ones((4, 5))
  assert "custom_vjp" not in str(jax.make_jaxpr(precision.matmul)(a, b))
  np.testing.assert_array_equal(precision.matmul(a, b), a @ b)
