import os
import sys

from absl import flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARED_DATA = os.path.join(os.path.dirname(ROOT), "shared", "data")

# grain worker processes read absl flags; pytest does not parse them.
flags.FLAGS.mark_as_parsed()

import jax  # noqa: E402

from usjax import runtime  # noqa: E402

# The references here are fp32; on GPUs, fp32 matmuls and convolutions default to TF32 (about 1e-3 relative).
jax.config.update("jax_default_matmul_precision", "highest")

runtime.keep_host_memory()  # as the entry points do: the suite runs the same steps, faster
