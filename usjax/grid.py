"""A named experiment grid: pre-training runs, the fine-tuning cells that use them, and the study report.

One command runs a grid (`python launch/main.py --config=configs/grid_cpu.py --workdir=runs/grid_cpu`): every
run has its own workdir under the grid's, a finished run (its summary.json exists) is skipped, an unfinished one
resumes from its latest checkpoint, and the report (results.csv, report.md with the claim rows, plots) is
rewritten after every run, so it can be read at any time. `--config.report_only=True` only writes the report.
"""
from __future__ import annotations

import itertools
import os

import ml_collections
from absl import logging

from usjax import UsjaxError, analysis, train


def _name(**fields) -> str:
  return "_".join(f"{k}-{v}" for k, v in fields.items()).replace("+", "").replace(",", "")


def plan(g) -> tuple[list[tuple[dict, str, ml_collections.ConfigDict]], list[tuple[dict, str, ml_collections.ConfigDict]]]:
  """(pre-training runs, fine-tuning cells) as (varying fields, workdir name, full config)."""
  pre, fine = [], []
  sources = dict(g.sources.items()) if g.sources else {}
  for name, (method, transfer, size) in itertools.product(
      sources, itertools.product(g.methods, g.transfers, g.image_sizes)):
    cfg = ml_collections.ConfigDict(g.pretrain.to_dict())
    cfg.data.pretrain_sources, cfg.method, cfg.data.image_size = sources[name], method, size
    cfg.model.with_decoder = transfer == "encoder+decoder"
    fields = dict(pretrain=name, method=method, transfer=transfer, image_size=size)
    run = "pre_" + _name(**fields)
    if run not in [r for _, r, _ in pre]:
      pre.append((fields, run, cfg))
  arms = [("none", None)] + [(p["pretrain"], (p, r)) for p, r, _ in pre]
  for (name, arm), fraction, size, seed in itertools.product(arms, g.label_fractions, g.image_sizes, g.seeds):
    variants = [(g.methods[0], "encoder")] if arm is None else [(arm[0]["method"], arm[0]["transfer"])]
    if arm is not None and arm[0]["image_size"] != size:
      continue
    for method, transfer in variants:
      cfg = ml_collections.ConfigDict(g.finetune.to_dict())
      cfg.data.label_fraction, cfg.data.image_size, cfg.seed = fraction, size, seed
      cfg.init_from = "" if arm is None else arm[1]            # a run name; made absolute in `run`
      cfg.transfer = transfer
      fields = dict(pretrain=name, method=method if arm else "none", transfer=transfer if arm else "none",
                    label_fraction=fraction, image_size=size, seed=seed)
      fine.append((fields, "ft_" + _name(**fields), cfg))
  imagenet = g.get("imagenet", "")   # a torchvision/timm ResNet .safetensors file: the field's default start
  for fraction, size, seed in itertools.product(g.label_fractions if imagenet else (), g.image_sizes, g.seeds):
    cfg = ml_collections.ConfigDict(g.finetune.to_dict())
    cfg.data.label_fraction, cfg.data.image_size, cfg.seed = fraction, size, seed
    cfg.init_from, cfg.transfer = os.path.abspath(os.path.expanduser(imagenet)), "encoder"
    fields = dict(pretrain="imagenet", method="supervised", transfer="encoder", label_fraction=fraction,
                  image_size=size, seed=seed)
    fine.append((fields, "ft_" + _name(**fields), cfg))
  return pre, fine


def finished(workdir: str) -> bool:
  return os.path.isfile(os.path.join(workdir, "summary.json"))


def write_report(g, root: str, pre, fine) -> dict:
  cells = [(fields, os.path.join(root, run)) for fields, run, _ in fine]
  pre_runs = {run: os.path.join(root, run) for _, run, _ in pre if finished(os.path.join(root, run))}
  overlays = None
  for fields, run, _ in fine:   # overlay panel from the best-labelled pre-trained cell that has finished
    path = os.path.join(root, run, "examples.npz")
    if os.path.isfile(path) and (overlays is None or fields["pretrain"] != "none"):
      import numpy as np
      ex = np.load(path)
      overlays = {"images": ex["image"], "masks": ex["mask"], "preds": ex["pred"],
                  "titles": [f"{fields['pretrain']} {fields['label_fraction']}% #{i}" for i in range(len(ex["image"]))]}
  return analysis.write_report(cells, os.path.join(root, "report"), pretrain_runs=pre_runs, overlays=overlays)


def run(g, root: str) -> dict:
  """Runs (or resumes) every run of grid `g` under `root`, refreshing the report after each."""
  root = os.path.abspath(os.path.expanduser(root))
  pre, fine = plan(g)
  os.makedirs(os.path.join(root, "report"), exist_ok=True)
  if g.report_only:
    return write_report(g, root, pre, fine)
  todo = [(f, r, c) for f, r, c in pre + fine if not finished(os.path.join(root, r))]
  logging.info("grid %s: %d pre-training runs, %d fine-tuning cells, %d still to run", g.name, len(pre), len(fine),
               len(todo))
  for k, (fields, run_name, cfg) in enumerate(todo):
    if cfg.task == "finetune" and cfg.init_from and not cfg.init_from.endswith(".safetensors"):
      if not finished(os.path.join(root, cfg.init_from)):
        raise UsjaxError(f"grid {g.name}: pre-training run {cfg.init_from} did not finish")
      cfg.init_from = os.path.join(root, cfg.init_from)
    logging.info("grid %s: run %d/%d %s", g.name, k + 1, len(todo), run_name)
    train.run(cfg, os.path.join(root, run_name))
    paths = write_report(g, root, pre, fine)
  paths = write_report(g, root, pre, fine)
  logging.info("grid %s: report in %s", g.name, paths.get("report.md", root))
  return paths
