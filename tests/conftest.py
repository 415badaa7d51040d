import os
import sys

from absl import flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARED_DATA = os.path.join(os.path.dirname(ROOT), "shared", "data")

# grain worker processes read absl flags; pytest does not parse them.
flags.FLAGS.mark_as_parsed()

# One disk cache of compiled programs for the session, shared with the commands tests start: the suite trains the
# same tiny networks many times, and a program compiled once is loaded after that (usjax.runtime.compilation_cache).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  import atexit
  import shutil
  import tempfile
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="usjax_test_jax_cache_")
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)

import jax  # noqa: E402

from usjax import runtime  # noqa: E402

# The references here are fp32; on GPUs, fp32 matmuls and convolutions default to TF32 (about 1e-3 relative).
jax.config.update("jax_default_matmul_precision", "highest")

runtime.keep_host_memory()  # as the entry points do: the suite runs the same steps, faster
