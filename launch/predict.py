"""Segment your own images with a fine-tuned checkpoint, and score it when the folder has ground truth.

    python launch/predict.py --workdir=runs/finetune --input=my_scans --output=runs/predictions
    python launch/predict.py --workdir=runs/finetune --input=/data/Dataset_BUSI_with_GT --output=runs/eval --evaluate

Every PNG/JPEG under --input (any size, grayscale or RGB) gets `<name>_mask.png` (0/255) and `<name>_overlay.png`
at its original size under --output, keeping sub-folders; `predictions.json` lists each image's lesion area,
peak foreground probability and, for a model trained with the lesion-presence head, its presence probability.
The post-processing and presence gate the run chose on validation (best/selection.json) are applied. With
--evaluate, --input must be in the BUSI layout (`{benign,malignant,normal}/<name>.png` + `<name>_mask.png`):
Dice, IoU, HD95 and the presence probabilities per image at the original resolution go to `per_image.json`,
means overall and per class, the false-positive rate on normal images and the lesion-presence AUC to
`summary.json`, and overlays show the prediction in red and the ground truth in green.
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # `usjax`

from absl import app, flags, logging  # noqa: E402

flags.DEFINE_string("workdir", None, "Fine-tuning workdir (launch/main.py --config=configs/finetune_busi.py).")
flags.DEFINE_string("input", None, "Folder of PNG/JPEG images (searched recursively), or a BUSI-layout folder.")
flags.DEFINE_string("output", None, "Folder for masks, overlays and (with --evaluate) scores.")
flags.DEFINE_bool("evaluate", False, "Score against the ground-truth masks of a BUSI-layout --input.")
flags.DEFINE_integer("image_size", None, "Override the checkpoint's image size (older checkpoints lack it).")
flags.DEFINE_integer("channels", None, "Override the checkpoint's channels (1 or 3).")
flags.DEFINE_enum("aspect", None, ["pad", "stretch", "crop"], "Override the checkpoint's aspect handling.")
flags.DEFINE_integer("batch_size", 8, "Images per forward pass.")
flags.mark_flags_as_required(["workdir", "input", "output"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  from usjax import UsjaxError, predict, report, runtime
  runtime.keep_host_memory()  # before JAX's first computation
  report.quiet_libraries()
  f = flags.FLAGS
  try:
    p = predict.load(f.workdir, image_size=f.image_size, channels=f.channels, aspect=f.aspect, batch_size=f.batch_size)
    if f.evaluate:
      summary = predict.evaluate_folder(p, f.input, f.output, save_predictions=True)
      print(json.dumps({k: v for k, v in summary.items() if isinstance(v, (int, float))}, indent=2))
    else:
      rows = predict.predict_folder(p, f.input, f.output)
      print(f"{len(rows)} masks and overlays written to {f.output}")
  except UsjaxError as e:
    logging.error("%s", e)
    runtime.print_error(e)  # on a line of its own, after any progress bar
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
