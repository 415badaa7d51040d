"""Entry point: parse flags, then hand the config to the library.

    python launch/main.py --config=configs/pretrain_multiorgan.py --workdir=runs/pretrain [--config.x=y ...]
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # `configs` and `usjax`

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py); override fields with --config.x=y.",
                                lock_config=True)
flags.DEFINE_string("workdir", "runs/default", "Directory for checkpoints, summary.json and TensorBoard events.")
flags.mark_flags_as_required(["config"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  from usjax import UsjaxError, grid, report, runtime, train
  runtime.keep_host_memory()   # before JAX's first computation
  report.quiet_libraries()
  cfg = flags.FLAGS.config
  try:
    (grid.run if cfg.task == "grid" else train.run)(cfg, flags.FLAGS.workdir)
  except UsjaxError as e:
    logging.error("%s", e)
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
