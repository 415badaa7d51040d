"""`runtime.keep_host_memory`: XLA:CPU's per-step temporaries stop page-faulting back in once the heap is kept.
`runtime.compilation_cache`: a program compiled in one process is loaded from disk by the next."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = """
import resource, sys
from usjax import runtime
applied = runtime.keep_host_memory() if sys.argv[1] == "keep" else False
import jax, jax.numpy as jnp
x = jnp.ones((1024, 1024))
f = jax.jit(lambda x: jnp.sum(jnp.tanh(x @ x) @ jnp.exp(x)))  # temporaries of 4 MiB each, above glibc's mmap threshold
f(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
  f(x).block_until_ready()
print(applied, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
"""


def faults_per_call(mode: str, **env) -> tuple[str, float]:
  out = subprocess.run([sys.executable, "-c", SCRIPT, mode], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": ROOT, **env}, check=True).stdout.split()
  return out[0], float(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt tuning is for glibc (Linux)")
def test_keep_host_memory_stops_per_step_page_faults():
  applied, kept = faults_per_call("keep")
  _, system = faults_per_call("system")
  assert applied == "True"
  assert kept < system / 10, (kept, system)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt tuning is for glibc (Linux)")
def test_keep_host_memory_can_be_switched_off():
  assert faults_per_call("keep", USJAX_SYSTEM_MALLOC="1")[0] == "False"


CACHE_SCRIPT = """
import sys
from usjax import runtime
print(runtime.compilation_cache(sys.argv[1]))
import jax, jax.numpy as jnp
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.jit(lambda x: jnp.sin(x @ x.T) * 2)(jnp.ones((64, 64))).block_until_ready()
"""


def cached_run(setting: str, tmp_path, **env) -> str:
  base = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}  # the suite sets its own
  out = subprocess.run([sys.executable, "-c", CACHE_SCRIPT, setting], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env={**base, "PYTHONPATH": ROOT, "XDG_CACHE_HOME": str(tmp_path / "xdg"), **env},
                       check=True).stdout.split()
  return out[0]


def entries(folder) -> list[str]:
  return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


def test_compilation_cache_keeps_a_program_for_the_next_process(tmp_path):
  path = cached_run("auto", tmp_path)
  assert path == str(tmp_path / "xdg" / "usjax" / "jax")
  first = entries(path)
  assert any(name.startswith("jit_") for name in first), first
  cached_run("auto", tmp_path)
  assert entries(path) == first  # the same program: found, not written again

  assert cached_run("none", tmp_path / "off") == "None"
  assert not os.path.exists(tmp_path / "off" / "xdg")
  path = cached_run("auto", tmp_path / "env", JAX_COMPILATION_CACHE_DIR=str(tmp_path / "env_cache"))
  assert path == str(tmp_path / "env_cache") and entries(path)
  path = cached_run(str(tmp_path / "mine"), tmp_path)
  assert path == str(tmp_path / "mine") and entries(path)
