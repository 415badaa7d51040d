"""Near-duplicate report of an image folder: pairs and groups per class, mixed-class groups, a contact sheet.

    python launch/duplicates.py --input=../shared/data/busi --output=runs/duplicates
    python launch/duplicates.py --input=my_scans/ --layout=folder --threshold=0.95 --output=runs/dup_mine

Prints the counts per class (pairs at or above the threshold, groups of two or more images, images in them),
the groups whose members carry different classes (left out of training and scoring unless
`config.data.keep_conflicts`), and writes to --output `duplicates.json` (every pair and group, by image id) and
`contact_sheet.png`: the pairs nearest the threshold on either side, to judge where it should lie. The
similarity and the default threshold are explained in usjax/data/duplicates.py.
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # `usjax`

from absl import app, flags  # noqa: E402

flags.DEFINE_string("input", None, "BUSI as downloaded (folder holding Dataset_BUSI_with_GT) or any image folder.")
flags.DEFINE_enum("layout", "auto", ["auto", "busi", "folder"], "auto: BUSI if the folder has its layout.")
flags.DEFINE_float("threshold", None, "Similarity at or above which two images are one scan (default: "
                   "usjax.data.duplicates.THRESHOLD).")
flags.DEFINE_float("band", 0.05, "The contact sheet shows pairs within this distance of the threshold.")
flags.DEFINE_integer("sheet_pairs", 24, "Pairs on the contact sheet (half above the threshold, half below).")
flags.DEFINE_string("output", "runs/duplicates", "Folder for duplicates.json and contact_sheet.png.")
flags.mark_flags_as_required(["input"])


def scan(folder: str, layout: str):
  """(items, class names) of a BUSI folder or an image folder."""
  from usjax.data import DataError, busi, folders
  if layout in ("auto", "busi"):
    try:
      root = busi.find_root(folder)
      return busi.scan(root), busi.CLASSES
    except DataError:
      if layout == "busi":
        raise
  root = os.path.realpath(folders.require_dir(folder))
  layout_of = folders.folder_layout(root)
  items = [
      folders.Item(id=os.path.relpath(p, root), label=k, group=p, paths=(p,))
      for k, name in enumerate(layout_of)
      for p in layout_of[name]
  ]
  return items, tuple(layout_of)


def sheet_pairs(near, threshold: float, band: float, n: int):
  """The `n` pairs nearest the threshold within `band`: half from above it, half from below, nearest first."""
  above = sorted((p for p in near if threshold <= p[2] < threshold + band), key=lambda p: p[2])
  below = sorted((p for p in near if threshold - band <= p[2] < threshold), key=lambda p: -p[2])
  return sorted(above[:n - min(len(below), n // 2)] + below[:n - min(len(above), n - n // 2)], key=lambda p: -p[2])


def _short(image_id: str) -> str:
  return os.path.splitext(os.path.basename(image_id))[0]


def main(argv):
  del argv
  import numpy as np
  from PIL import Image

  from usjax import plots
  from usjax.data import DataError, duplicates
  threshold = duplicates.THRESHOLD if flags.FLAGS.threshold is None else flags.FLAGS.threshold
  try:
    items, classes = scan(flags.FLAGS.input, flags.FLAGS.layout)
    prints = np.stack([duplicates.read_fingerprints(it.paths[0]) for it in items])
  except (DataError, OSError) as e:
    sys.exit(f"error: {e}")
  labels = [it.label for it in items]
  found = duplicates.find(prints, labels, threshold, sheet_floor=threshold - flags.FLAGS.band)
  summary = found.summary(labels, classes)
  print(f"{summary['images']} images; {summary['pairs']} pairs at similarity >= {threshold:g}, in "
        f"{summary['groups']} groups holding {summary['images_in_groups']} images; "
        f"{summary['images_after_dedup']} distinct scans")
  print(f"{'class':<12}{'images':>8}{'pairs':>8}{'groups':>8}{'in groups':>11}")
  for name, c in summary["per_class"].items():
    print(f"{name:<12}{c['images']:>8}{c['pairs']:>8}{c['groups']:>8}{c['images_in_groups']:>11}")
  mixed = [[items[i].id for i in g] for g in summary["conflicts"]]
  print(f"groups of mixed classes: {len(mixed)} ({summary['conflict_images']} images; left out by default)")
  for g in mixed:
    print("  " + ", ".join(g))
  os.makedirs(flags.FLAGS.output, exist_ok=True)
  ids = [it.id for it in items]
  groups = {}
  for i, g in enumerate(found.group):
    groups.setdefault(ids[g], []).append(ids[i])
  record = {
      **{k: v for k, v in summary.items() if k != "conflicts"}, "conflicts": mixed,
      "pairs_list": [[ids[i], ids[j], round(r, 4)] for i, j, r in found.pairs],
      "groups_list": [m for m in groups.values() if len(m) > 1]
  }
  with open(os.path.join(flags.FLAGS.output, "duplicates.json"), "w") as f:
    json.dump(record, f, indent=1)

  def thumb(i):
    with Image.open(items[i].paths[0]) as img:
      return np.asarray(img.convert("L").resize((96, 96)))

  shown = sheet_pairs(found.near, threshold, flags.FLAGS.band, flags.FLAGS.sheet_pairs)
  panels = [(thumb(i), thumb(j), f"{r:.3f} {'>=' if r >= threshold else '<'} {threshold:g}\n"
             f"{_short(ids[i])}\n{_short(ids[j])}") for i, j, r in shown]
  path = plots.plot_pairs(panels, os.path.join(flags.FLAGS.output, "contact_sheet.png"))
  print(f"wrote {os.path.join(flags.FLAGS.output, 'duplicates.json')} and {path}")


if __name__ == "__main__":
  app.run(main)
