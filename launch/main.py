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
flags.DEFINE_string("compilation_cache", "auto", "Folder for compiled programs reused across runs: 'auto' "
                    "(JAX_COMPILATION_CACHE_DIR, else ~/.cache/usjax/jax), 'none', or a path.")
flags.mark_flags_as_required(["config"])

# Keys renamed so that the fine-tuning set and the pre-training mixture cannot be mistaken for each other.
RENAMED = {
    "data.source": "data.finetune_source", "data.sources": "data.pretrain_sources",
    "data.weights": "data.pretrain_weights"
}


def parse_flags(argv):
  """absl's parser, with a bad `--config.*` override reported in one line instead of a traceback."""
  for arg in argv[1:]:
    key = arg.split("=", 1)[0].removeprefix("--config.")
    if arg.startswith("--config.") and key in RENAMED:
      sys.exit(f"error: --config.{key} was renamed: use --config.{RENAMED[key]}")
  try:
    rest = flags.FLAGS(argv)
    flags.FLAGS.config.task  # config_flags reports a bad file lazily: touch it here, while errors are one line
    return rest
  except OSError as e:
    sys.exit(f"error: --config: {str(e).strip().splitlines()[-1].strip()}")
  except (AttributeError, KeyError) as e:  # ml_collections: an override of a key the config does not have
    name = str(e).strip("\"' ")
    bad = [
        a.split("=", 1)[0]
        for a in argv[1:]
        if a.startswith("--config.") and name in a.split("=", 1)[0].removeprefix("--config.").split(".")
    ]
    sys.exit(f"error: {bad[0] if bad else name}: no such config key (configs/default.py lists them all)")
  except (flags.Error, ValueError, TypeError) as e:
    last = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
    sys.exit(f"error: bad command-line flag: {last}")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  from usjax import UsjaxError, grid, report, runtime, task
  runtime.keep_host_memory()  # before JAX's first computation
  runtime.compilation_cache(flags.FLAGS.compilation_cache)  # before its first compilation
  report.quiet_libraries()
  cfg = flags.FLAGS.config
  try:
    (grid.run if cfg.task == "grid" else task.run)(cfg, flags.FLAGS.workdir)
  except runtime.Preempted as e:
    logging.warning("%s", e)
    print(f"\nstopped: {e}", file=sys.stderr)
    sys.exit(e.exit_code)
  except UsjaxError as e:
    logging.error("%s", e)
    runtime.print_error(e)  # one line, on a line of its own even after a progress bar
    sys.exit(1)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
