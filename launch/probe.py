"""Probe a checkpoint's frozen encoder: k-NN and linear classification of BUSI and POCUS, and feature spread.

    python launch/probe.py --workdir=runs/pretrain --data_root=../shared/data [--image_size=128]
    python launch/probe.py --random --data_root=../shared/data            # a random encoder: the floor

Reads the latest checkpoint (or --step) of a pre-training or fine-tuning workdir (its online encoder; the model and the
preprocessing come from the checkpoint's meta, flags override them), or with --random a randomly initialised
encoder of --encoder. Probes on each source's prepared 'train' split and scores on --eval_split; prints a table
and, with --output, writes the metrics and the per-source sizes as JSON.
"""
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # `configs` and `usjax`

from absl import app, flags, logging  # noqa: E402

flags.DEFINE_string("workdir", None, "Pre-training or fine-tuning workdir (or its checkpoints/ folder).")
flags.DEFINE_integer("step", None, "Checkpoint step to probe (default: the latest).")
flags.DEFINE_bool("random", False, "Probe a randomly initialised encoder (of --encoder) instead of a checkpoint.")
flags.DEFINE_string("data_root", os.path.join(os.path.dirname(ROOT), "shared", "data"),
                    "Folder holding each source as downloaded, in a sub-folder of its name (busi/, pocus/); a "
                    "missing one is skipped.")
flags.DEFINE_list("sources", ["busi", "pocus"], "Labelled sources to probe on.")
flags.DEFINE_string("data_dir", "~/tensorflow_datasets", "Where prepared data sets live (config.data.data_dir).")
flags.DEFINE_string("eval_split", "val", "Split to score on (never the fine-tuning test split while tuning).")
flags.DEFINE_integer("image_size", None, "Override the checkpoint's image size.")
flags.DEFINE_integer("channels", None, "Override the checkpoint's channels (1 or 3).")
flags.DEFINE_enum("aspect", None, ["pad", "stretch", "crop"], "Override the checkpoint's aspect handling.")
flags.DEFINE_string("encoder", "resnet18", "Encoder of --random: resnet18/34/50 or plain.")
flags.DEFINE_enum("norm", "batch", ["batch", "group"], "Normalisation of the --random encoder.")
flags.DEFINE_integer("seed", 0, "Initialisation seed of --random.")
flags.DEFINE_integer("k", 20, "Neighbours of the k-NN probe.")
flags.DEFINE_float("temperature", 0.07, "Vote temperature of the k-NN probe.")
flags.DEFINE_float("l2", 1e-4, "L2 penalty of the linear probe.")
flags.DEFINE_bool("balanced", False, "Class-balanced weighting in the linear probe's fit.")
flags.DEFINE_integer("batch_size", 64, "Images per forward pass.")
flags.DEFINE_string("output", None, "JSON file for the metrics.")


def table(metrics: dict, described: dict) -> str:
  """One row per source: sizes, the majority-class baseline, k-NN and linear accuracy / balanced accuracy."""
  w = max([8, *map(len, described)])
  head = f"{'source':<{w}} {'train':>5} {'eval':>5} {'major':>6} {'knn':>6} {'knn_b':>6} {'lin':>6} {'lin_b':>6} " \
         f"{'z_std':>7}  classes"
  rows = [head, "-" * len(head)]
  for name, d in described.items():
    m = lambda key: metrics[f"probe/{name}_{key}"]
    rows.append(f"{name:<{w}} {d['train']:>5} {d['eval']:>5} {d['majority_acc']:>6.3f} {m('knn_acc'):>6.3f} "
                f"{m('knn_bacc'):>6.3f} {m('linear_acc'):>6.3f} {m('linear_bacc'):>6.3f} {m('z_std'):>7.4f}  "
                f"{', '.join(d['classes'])}")
  return "\n".join(rows)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  from usjax import UsjaxError, report, runtime
  runtime.keep_host_memory()  # before JAX's first computation
  report.quiet_libraries()
  f = flags.FLAGS
  try:
    run(f)
  except UsjaxError as e:
    logging.error("%s", e)
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


def run(f) -> dict:
  from configs import default
  from usjax import UsjaxError, predict, probe_data
  from usjax.data import sources
  if f.random == bool(f.workdir):
    raise UsjaxError("give exactly one of --workdir (a checkpoint to probe) and --random (a random encoder)")
  cfg = default.get_config()
  model = {"encoder": f.encoder, "norm": f.norm, "dtype": "float32"}
  checkpoint, meta = "random", {}
  if f.workdir:
    meta = probe_data.read_meta(f.workdir, f.step)
    model = meta["model"]
  pre = predict.settings(meta, f.image_size, f.channels, f.aspect) if meta else {
      "image_size": f.image_size or cfg.data.image_size, "channels": f.channels or cfg.data.channels,
      "aspect": f.aspect or cfg.data.aspect
  }
  data = cfg.data
  data.data_dir, data.image_size, data.channels, data.aspect = f.data_dir, pre["image_size"], pre["channels"], \
      pre["aspect"]
  root = os.path.abspath(os.path.expanduser(f.data_root))
  for name in f.sources:  # each source's folder setting (usjax.data.sources), from its sub-folder of --data_root
    if key := sources.SOURCE_DIR_KEY.get(name):
      setattr(data, key, os.path.join(root, name) if os.path.isdir(os.path.join(root, name)) else "")
  probe = probe_data.ProbeData(data, model, names=tuple(f.sources), eval_split=f.eval_split, batch_size=f.batch_size,
                               k=f.k, temperature=f.temperature, l2=f.l2, balanced=f.balanced)
  if f.random:
    variables = probe.init_variables(f.seed)
  else:
    variables, _, checkpoint = probe_data.load_encoder(f.workdir, pre["image_size"], pre["channels"], f.step)
  metrics = probe.run(variables)
  described = probe.describe()
  print(f"{checkpoint}: {model['encoder']}, {pre['image_size']} px, {pre['channels']} channel(s), "
        f"scored on {f.eval_split}")
  print(table(metrics, described))
  print(f"prepare {probe.build_seconds:.1f} s, probe {metrics['probe/seconds']:.1f} s")
  out = {
      "checkpoint": checkpoint, "model": dict(model), "preprocess": pre, "eval_split": f.eval_split, "metrics": metrics,
      "sources": described, "prepare_seconds": probe.build_seconds
  }
  if f.output:
    os.makedirs(os.path.dirname(os.path.abspath(f.output)), exist_ok=True)
    with open(f.output, "w") as fh:
      json.dump(out, fh, indent=2)
  return out


if __name__ == "__main__":
  app.run(main)
