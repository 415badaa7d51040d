"""`runtime.keep_host_memory`: XLA:CPU's per-step temporaries stop page-faulting back in once the heap is kept."""
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
