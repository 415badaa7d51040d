"""Two results folders of the same cells compared per image: what one change did (usjax/compare.py).

    python launch/compare.py results/study_cpu results/study_cpu_bf16
    python launch/compare.py results/study_cpu results/study_cpu_presence --out=runs/presence_vs_study.json

Prints, per label fraction, the paired differences (second folder minus first) of Dice over all images, Dice over
lesion images and the share of normal scans given a false lesion, with 95% bootstrap CIs over runs and images and
the first folder's run-to-run spread; --out writes the rows as JSON.
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # `usjax`

from absl import app, flags  # noqa: E402

flags.DEFINE_string("out", None, "Optional JSON file for the rows.")
flags.DEFINE_integer("n_boot", 2000, "Bootstrap resamples.")


def main(argv):
  from usjax import UsjaxError, compare
  if len(argv) != 3:
    raise app.UsageError("usage: launch/compare.py RESULTS_A RESULTS_B [--out=rows.json]")
  a, b = (os.path.normpath(x) for x in argv[1:])
  try:
    rows = compare.compare(a, b, flags.FLAGS.n_boot)
  except UsjaxError as e:
    sys.exit(f"compare: {e}")
  print(compare.to_markdown(rows, os.path.basename(a), os.path.basename(b)), end="")
  if flags.FLAGS.out:
    os.makedirs(os.path.dirname(os.path.abspath(flags.FLAGS.out)), exist_ok=True)
    with open(flags.FLAGS.out, "w") as f:
      json.dump({"a": a, "b": b, "rows": rows}, f, indent=2)


if __name__ == "__main__":
  app.run(main)
