"""Compact copy of the real data (BUSI, POCUS, CIFAR-10 folder) for a machine that receives only the working tree.

    python launch/compact_data.py --data_root=../shared/data --out=data_cache/compact --max_side=256 \
        [--natural_per_class=N] [--force] [--check]

Writes `<out>/{busi,pocus,cifar10_test}/` in the layouts the builders read (usjax/data/busi.py, pocus.py,
folders.py), with every file name kept, so each image keeps its id, class and source group, and so its split:
- BUSI and POCUS images: the grayscale the builders read (`imageio.read_image`, 1 channel), downscaled (bilinear,
  antialiased) so the longer side is at most --max_side, in the file's own format (PNG; JPEG at quality 90).
- BUSI masks: read as the builder reads them (thresholded), downscaled (nearest) to their image's size, PNG 0/255.
- CIFAR-10 JPEGs: copied byte for byte, all of them or the first N by name per class.
- Every other file (POCUS's dataset_metadata.csv, which its by-patient split reads; frame_licenses.csv; the data
  README with the licences) copied as is; `compact.json` records the options and sizes.
The source is checked with the builders' own scans before anything is written (a wrong layout is one line
`error: ...`, exit 1); the copy is written into a hidden folder beside --out and renamed at the end, so --out is
either complete or absent. --check then prepares BUSI and POCUS from the copy and from the source in a temporary
data_dir and compares their split ids (and prepares the natural set from the copy).
"""
import json
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # `configs` and `usjax`

from absl import app, flags  # noqa: E402

flags.DEFINE_string("data_root", "../shared/data", "Folder holding busi/, pocus/ and cifar10_test/ as downloaded.")
flags.DEFINE_string("out", "data_cache/compact", "Folder to write the copy to (must not exist unless --force).")
flags.DEFINE_integer("max_side", 256, "Longest image side in the copy; smaller images keep their size.")
flags.DEFINE_integer("natural_per_class", 0, "CIFAR images kept per class (the first by name); 0 = all.")
flags.DEFINE_bool("force", False, "Replace --out if it exists.")
flags.DEFINE_bool("check", False, "Prepare BUSI and POCUS from the copy and the source and compare their splits.")

SETS = {"busi": "busi", "pocus": "pocus", "natural": "cifar10_test"}  # source name -> folder under data_root
JPEG_QUALITY = 90


def target_size(width: int, height: int, max_side: int) -> tuple[int, int]:
  """(width, height) scaled so the longer side is at most `max_side`, aspect kept."""
  scale = max_side / max(width, height)
  if scale >= 1:
    return width, height
  return max(1, round(width * scale)), max(1, round(height * scale))


def _save(img, path: str) -> None:
  if path.lower().endswith(".png"):
    img.save(path, format="PNG", optimize=True)
  else:
    img.save(path, format="JPEG", quality=JPEG_QUALITY)


def _write_image(src: str, dst: str, max_side: int) -> None:
  from PIL import Image
  from usjax.data import imageio
  img = Image.fromarray(imageio.read_image(src, 1)[..., 0])
  _save(img.resize(target_size(*img.size, max_side), Image.BILINEAR), dst)


def _write_mask(src: str, dst: str, max_side: int) -> None:
  import numpy as np
  from PIL import Image
  from usjax.data import imageio
  img = Image.fromarray(imageio.read_mask(src).astype(np.uint8) * 255)
  _save(img.resize(target_size(*img.size, max_side), Image.NEAREST), dst)


def scan_source(data_root: str, natural_per_class: int) -> dict:
  """{set: (folder, mask paths, kept natural paths or None)}; raises DataError (one line) on a wrong layout."""
  from usjax.data import DataError, busi, folders, pocus
  folders.require_dir(data_root, "data root not found")
  found = {}
  for name, sub in SETS.items():
    root = os.path.realpath(os.path.join(data_root, sub))
    masks, keep = set(), None
    if name == "busi":
      masks = {p for it in busi.scan(busi.find_root(root)) for p in it.paths[1:]}
    elif name == "pocus":
      pocus.scan(pocus.find_root(root))
    else:
      layout = folders.folder_layout(folders.require_dir(root, f"folder not found; expected {sub}/<class>/*.jpg"))
      keep = {p for paths in layout.values() for p in (paths[:natural_per_class] if natural_per_class else paths)}
      if len(layout) < 2:
        raise DataError(f"{root}: expected one folder per class, found {len(layout)}")
    found[name] = (root, masks, keep)
  return found


def _copy_set(src: str, dst: str, masks: set, keep, max_side: int, is_natural: bool) -> tuple[int, int]:
  """Copies one set's tree (hidden files skipped); returns (files, bytes) written."""
  from usjax.data import imageio
  files = size = 0
  for dirpath, dirnames, filenames in os.walk(src):
    dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
    here = os.path.join(dst, os.path.relpath(dirpath, src))
    os.makedirs(here, exist_ok=True)
    for name in sorted(f for f in filenames if not f.startswith(".")):
      s, d = os.path.join(dirpath, name), os.path.join(here, name)
      if not imageio.is_image_file(name) or is_natural:
        if keep is not None and imageio.is_image_file(name) and s not in keep:
          continue
        shutil.copyfile(s, d)
      elif s in masks:
        _write_mask(s, d, max_side)
      else:
        _write_image(s, d, max_side)
      files, size = files + 1, size + os.path.getsize(d)
  return files, size


def _tree_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def compact(data_root: str, out: str, max_side: int = 256, natural_per_class: int = 0, force: bool = False,
            log=print) -> dict:
  """Writes the compact copy of `data_root` to `out` (atomically); returns {set: {files, bytes, source_bytes}}."""
  from usjax.data import DataError
  if max_side < 1 or natural_per_class < 0:
    raise DataError(f"--max_side must be >= 1 and --natural_per_class >= 0, got {max_side}, {natural_per_class}")
  data_root, out = os.path.abspath(data_root), os.path.abspath(out)
  if os.path.exists(out) and not force:
    raise DataError(f"{out}: already exists; remove it or pass --force")
  found = scan_source(data_root, natural_per_class)
  parent = os.path.dirname(out)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=parent)
  try:
    sizes = {}
    for name, (src, masks, keep) in found.items():
      sub = SETS[name]
      files, size = _copy_set(src, os.path.join(tmp, sub), masks, keep, max_side, name == "natural")
      sizes[sub] = {"files": files, "bytes": size, "source_bytes": _tree_bytes(src)}
      log(f"{sub:<13} {files:>6} files {size / 1e6:8.1f} MB  (source {sizes[sub]['source_bytes'] / 1e6:.1f} MB)")
    readme = os.path.join(data_root, "README.md")
    if os.path.isfile(readme):  # the licences and citations travel with the images
      shutil.copyfile(readme, os.path.join(tmp, "README.md"))
    total = _tree_bytes(tmp)
    with open(os.path.join(tmp, "compact.json"), "w") as f:
      json.dump(
          {
              "source": data_root, "max_side": max_side, "natural_per_class": natural_per_class,
              "jpeg_quality": JPEG_QUALITY, "sets": sizes, "total_bytes": total
          }, f, indent=1)
    if os.path.exists(out):  # --force: the old copy goes only once the new one is complete
      old = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.old-", dir=parent)
      os.rename(out, os.path.join(old, "x"))
      os.rename(tmp, out)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.rename(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  log(f"{'total':<13} {sum(s['files'] for s in sizes.values()):>6} files {total / 1e6:8.1f} MB  in {out}")
  return sizes


def split_ids(name: str, data_root: str, data_dir: str) -> dict:
  """{split: sorted [(id, label)]} of source `name` prepared from `data_root` with the project's builders."""
  import tensorflow_datasets as tfds
  from configs import default
  from usjax.data import sources
  cfg = default.get_config().data
  cfg.data_dir = data_dir
  for src, sub in SETS.items():
    setattr(cfg, sources.SOURCE_DIR_KEY[src], os.path.join(data_root, sub))
  builder = sources.builder_for(name, cfg)
  keys = [k for k in ("image", "mask") if k in builder.info.features]
  ds = builder.as_data_source(decoders={k: tfds.decode.SkipDecoding() for k in keys})
  return {s: sorted((ds[s][i]["id"].decode(), int(ds[s][i]["label"])) for i in range(len(ds[s]))) for s in ds}


def check(data_root: str, out: str, log=print) -> bool:
  """Prepares BUSI and POCUS from the copy and the source; True when every split holds the same ids."""
  import collections
  ok = True
  with tempfile.TemporaryDirectory(prefix="compact-check-") as tmp:
    for name in ("busi", "pocus", "natural"):
      copy = split_ids(name, out, os.path.join(tmp, "copy"))
      orig = split_ids(name, data_root, os.path.join(tmp, "orig")) if name != "natural" else None
      for s in sorted(copy):
        counts = dict(sorted(collections.Counter(label for _, label in copy[s]).items()))
        same = "" if orig is None else ("  same ids as the source" if copy[s] == orig[s] else "  DIFFERENT ids")
        ok &= orig is None or copy[s] == orig[s]
        log(f"check {name:<8} {s:<5} {len(copy[s]):>6} images  classes {counts}{same}")
  return ok


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  from usjax import UsjaxError
  f = flags.FLAGS
  try:
    compact(f.data_root, f.out, f.max_side, f.natural_per_class, f.force)
    if f.check and not check(f.data_root, f.out):
      raise UsjaxError(f"{f.out}: the copy's splits differ from the source's (lines marked DIFFERENT)")
  except (UsjaxError, OSError) as e:
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
