"""A named experiment grid: pre-training runs, the fine-tuning cells that use them, and the study report.

One command runs a grid (`python launch/main.py --config=configs/grid_cpu.py --workdir=runs/grid_cpu`): every
run has its own workdir under the grid's, a finished run (its summary.json exists) is skipped, an unfinished one
resumes from its latest checkpoint, and the report (results.csv, report.md with the claim rows, plots) is
rewritten after every run, so it can be read at any time; its last section says where the time went (per
device and phase, from the grid's own clock in `timing.json`). `--config.report_only=True` only writes the report.

`g.results_dir` (e.g. `results/grid_cpu`, relative to where the command runs) keeps each finished run's small
outputs (RESULTS: summary, per-image scores, history, the model choice; never checkpoints), copied there as each
run ends, so they can be committed. A grid run in an empty workdir takes its finished fine-tuning cells from there
and trains only the rest: this is how a grid that did not finish on one machine goes on on another. A
pre-training run counts as finished only where its checkpoint is (the cells that start from it need the
weights): one whose cells are all finished is not run again; one with a cell left to train is.

`g.stack_runs` (default 1: one run at a time) trains up to that many fine-tuning cells at once in one program
(`usjax.stacked`): cells that differ only in seed, label fraction and pre-training arm. A stacked group saves no
checkpoints while it trains: an interrupted group trains again from step 0, and a cell with checkpoints of its own
(from an unstacked attempt) resumes alone.
"""
from __future__ import annotations

import functools
import itertools
import json
import os
import shutil
import time

import ml_collections
from absl import logging

from usjax import UsjaxError, analysis, checkpoint, stacked, task
from usjax.timing import TIMING, log_time as _log_time, read_timing as _read_timing


def _name(**fields) -> str:
  return "_".join(f"{k}-{v}" for k, v in fields.items()).replace("+", "").replace(",", "")


def _fold_options(g) -> list[int | None]:
  """The folds a grid runs: None (the fixed split) unless `g.folds` = k, then `g.fold_list` or all k."""
  k = int(g.get("folds", 0) or 0)
  if not k:
    return [None]
  folds = tuple(g.get("fold_list", ()) or range(k))
  if k < 2 or any(not 0 <= f < k for f in folds):
    raise UsjaxError(f"grid config: folds={k}, fold_list={folds}: need folds >= 2 and every fold in 0..{k - 1}")
  return list(folds)


def _uses_split_aware(sources: str) -> bool:
  """Whether a pre-training mixture reads a source whose splits follow the fold (so it must be run per fold)."""
  from usjax.data import sources as data_sources
  return any(s.strip() in data_sources.SPLIT_AWARE for s in sources.split(","))


def _set_fold(cfg, folds: int, fold: int | None) -> None:
  if fold is not None:
    cfg.data.folds, cfg.data.fold = folds, fold


def plan(
    g) -> tuple[list[tuple[dict, str, ml_collections.ConfigDict]], list[tuple[dict, str, ml_collections.ConfigDict]]]:
  """(pre-training runs, fine-tuning cells) as (varying fields, workdir name, full config).

  With `g.folds` = k, every cell is run on each fold (field `fold`): fine-tuning trains on that fold's training
  part and is scored on its test part, and a pre-training that reads BUSI (or another split-aware source) is run
  once per fold on that fold's training split, so it never sees the fold's test images.
  """
  pre, fine = [], []
  sources = dict(g.sources.items()) if g.sources else {}
  steps = dict(g.get("pretrain_steps", None) or {})  # an arm's own pre-training length, else g.pretrain.num_steps
  if set(steps) - set(sources):
    raise UsjaxError(f"grid config: pretrain_steps names {sorted(set(steps) - set(sources))}, not in sources")
  k, folds = int(g.get("folds", 0) or 0), _fold_options(g)
  arms_of = {f: [("none", None)] for f in folds}
  for name, (method, transfer, size), fold in itertools.product(
      sources, itertools.product(g.methods, g.transfers, g.image_sizes), folds):
    cfg = ml_collections.ConfigDict(g.pretrain.to_dict())
    cfg.data.pretrain_sources, cfg.method, cfg.data.image_size = sources[name], method, size
    cfg.num_steps = steps.get(name, cfg.num_steps)
    cfg.model.with_decoder = transfer == "encoder+decoder"
    fields = dict(pretrain=name, method=method, transfer=transfer, image_size=size)
    per_fold = fold is not None and _uses_split_aware(sources[name])
    if per_fold:
      _set_fold(cfg, k, fold)
      fields["fold"] = fold
    run = "pre_" + _name(**fields)
    if run not in [r for _, r, _ in pre]:
      pre.append((fields, run, cfg))
    arms_of[fold].append((name, (fields, run)))
  for fold in folds:
    for (name, arm), fraction, size, seed in itertools.product(arms_of[fold], g.label_fractions, g.image_sizes,
                                                               g.seeds):
      if arm is not None and arm[0]["image_size"] != size:
        continue
      method, transfer = (g.methods[0], "encoder") if arm is None else (arm[0]["method"], arm[0]["transfer"])
      cfg = ml_collections.ConfigDict(g.finetune.to_dict())
      cfg.data.label_fraction, cfg.data.image_size, cfg.seed = fraction, size, seed
      _set_fold(cfg, k, fold)
      cfg.init_from = "" if arm is None else arm[1]  # a run name; made absolute in `run`
      cfg.transfer = transfer
      fields = dict(pretrain=name, method=method if arm else "none", transfer=transfer if arm else "none",
                    label_fraction=fraction, image_size=size, seed=seed)
      if fold is not None:
        fields["fold"] = fold
      fine.append((fields, "ft_" + _name(**fields), cfg))
    imagenet = g.get("imagenet", "")  # a torchvision/timm ResNet .safetensors file: the field's default start
    for fraction, size, seed in itertools.product(g.label_fractions if imagenet else (), g.image_sizes, g.seeds):
      cfg = ml_collections.ConfigDict(g.finetune.to_dict())
      cfg.data.label_fraction, cfg.data.image_size, cfg.seed = fraction, size, seed
      _set_fold(cfg, k, fold)
      cfg.init_from, cfg.transfer = os.path.abspath(os.path.expanduser(imagenet)), "encoder"
      fields = dict(pretrain="imagenet", method="supervised", transfer="encoder", label_fraction=fraction,
                    image_size=size, seed=seed)
      if fold is not None:
        fields["fold"] = fold
      fine.append((fields, "ft_" + _name(**fields), cfg))
  return pre, fine


# A run's small outputs, the ones committed under results/ (paths inside its workdir).
RESULTS = ("summary.json", "per_image.json", "history.json", os.path.join("best", "selection.json"),
           os.path.join("best", "val_per_image.json"))


def finished(workdir: str) -> bool:
  return os.path.isfile(os.path.join(workdir, "summary.json"))


def has_weights(workdir: str) -> bool:
  """A finished pre-training run whose checkpoint is here, so fine-tuning can start from it."""
  return finished(workdir) and resumable(workdir)


def _copy_results(src: str, dst: str) -> int:
  """Copies a finished run's RESULTS from `src` to `dst` (summary.json last, so `dst` counts as finished only
  once the rest is there); -> the number of files copied."""
  n = 0
  for name in sorted(RESULTS, key=lambda f: f == "summary.json"):
    if os.path.isfile(os.path.join(src, name)):
      os.makedirs(os.path.dirname(os.path.join(dst, name)), exist_ok=True)
      shutil.copyfile(os.path.join(src, name), os.path.join(dst, name) + ".tmp")
      os.replace(os.path.join(dst, name) + ".tmp", os.path.join(dst, name))
      n += 1
  return n


def take_results(results: str, root: str, fine) -> list[str]:
  """Finished fine-tuning cells recorded in `results` but not in `root`, copied into `root`; -> their names."""
  taken = []
  for _, run_name, _ in fine:
    src, dst = os.path.join(results, run_name), os.path.join(root, run_name)
    if finished(src) and not finished(dst) and not resumable(dst):
      _copy_results(src, dst)
      taken.append(run_name)
  return taken


def resumable(workdir: str) -> bool:
  return checkpoint.holds_steps(os.path.join(workdir, "checkpoints"))


def schedule(todo, stack_runs: int, root: str) -> list[list]:
  """`todo`'s runs in groups that train together: pre-training runs and resumable cells alone, the other
  fine-tuning cells in groups of up to `stack_runs` that `stacked.finetune_stacked` can train at once.

  A group holds one pre-training arm (its cells start from the same weights, so a grid cut short has whole arms),
  filled by label fraction, then seed; with 4 fractions x 3 seeds and `stack_runs` = 12, each arm is one program.
  Groups come in the order their arm first appears in `todo`, so after the pre-training runs `todo` lists first.
  """
  fractions = list(dict.fromkeys(f.get("label_fraction") for f, _, _ in todo))  # plan order, e.g. 100, 50, 25, 10
  slots, buckets = [], {}
  for item in todo:
    fields, run_name, cfg = item
    if stack_runs <= 1 or cfg.task != "finetune" or resumable(os.path.join(root, run_name)):
      slots.append([item])
      continue
    key = (fields.get("pretrain"), stacked.stack_key(cfg))
    if key not in buckets:
      buckets[key] = []
      slots.append(key)
    buckets[key].append(item)
  groups = []
  for slot in slots:
    if isinstance(slot, list):
      groups.append(slot)
      continue
    cells = sorted(buckets[slot], key=lambda x: (fractions.index(x[0].get("label_fraction")), x[0].get("seed", 0)))
    groups += [cells[i:i + stack_runs] for i in range(0, len(cells), stack_runs)]
  return groups


def record(root: str, results: str, names) -> None:
  """Copies the RESULTS of the runs `names` that finished in `root` into `results` (no-op without `results`).

  A run recorded there before with another summary (a pre-training re-run for a later seed because its weights
  were not at hand: the fine-tunes of the earlier seeds started from the earlier one) keeps the earlier files
  under `earlier/<n>/` of its folder, so every pre-training a recorded fine-tune started from stays recorded.
  """
  for name in names if results else ():
    src, dst = os.path.join(root, name), os.path.join(results, name)
    if not finished(src):
      continue
    if finished(dst) and _read(os.path.join(src, "summary.json")) != _read(os.path.join(dst, "summary.json")):
      n = 1
      while os.path.exists(os.path.join(dst, "earlier", str(n))):
        n += 1
      _copy_results(dst, os.path.join(dst, "earlier", str(n)))
      logging.info("grid: %s was recorded before with another summary; that one is kept in %s", name,
                   os.path.join(dst, "earlier", str(n)))
    _copy_results(src, dst)


def _read(path: str) -> bytes:
  with open(path, "rb") as f:
    return f.read()


def time_table(timing: list[dict], summaries: dict[str, dict]) -> str:
  """Markdown: where a grid's time went, per device and phase. `timing` holds the grid's measurement of each
  group it trained (seconds from start to summary: data preparation, compilation, the train loop, validation and
  the final scoring); the runs' summaries give compilation and train-loop seconds (a stacked group's once)."""
  rows = {}
  for t in timing:
    key = (t.get("device", "?"), "pre-training" if t["task"] == "pretrain" else "fine-tuning")
    r = rows.setdefault(key, {"runs": 0, "groups": 0, "seconds": 0.0, "compile": 0.0, "loop": 0.0})
    runs = [summaries[n] for n in t["runs"] if n in summaries]
    r["runs"] += len(t["runs"])
    r["groups"] += 1
    r["seconds"] += t["seconds"]
    if runs:  # the members of a stacked group report the group's compile and loop seconds
      r["compile"] += max(s.get("compile_s") or 0.0 for s in runs)
      r["loop"] += max(s.get("wall_s") or 0.0 for s in runs)
  if not rows:
    return ""
  lines = [
      "| device | phase | runs | programs | total (min) | compiling (min) | train loop (min) | rest (min) |",
      "| --- | --- | --- | --- | --- | --- | --- | --- |"
  ]
  for (device, phase), r in sorted(rows.items()):
    lines.append(f"| {device} | {phase} | {r['runs']} | {r['groups']} | {r['seconds'] / 60:.1f} | "
                 f"{r['compile'] / 60:.1f} | {(r['loop'] - r['compile']) / 60:.1f} | "
                 f"{(r['seconds'] - r['loop']) / 60:.1f} |")
  total = sum(r["seconds"] for r in rows.values())
  return ("\n".join(lines) + f"\n\nTotal: {total / 60:.1f} min over {sum(r['runs'] for r in rows.values())} runs. "
          "Train loop: the steps and periodic validation/probes, compilation excluded; rest: data preparation, "
          "start-up, the final scoring and writing.\n")


def write_report(g, root: str, pre, fine, results: str = "") -> dict:
  cells = [(fields, os.path.join(root, run)) for fields, run, _ in fine]
  # The probe table: a pre-training's summary here, else the one recorded in `results`, under its arm's name (the
  # cells' `pretrain` field, which its Dice gains are looked up by) where one pre-training makes each arm.
  arms = [f["pretrain"] for f, _, _ in pre]
  pre_runs, pre_cells = {}, {}
  for fields, run, _ in pre:
    where = [d for d in (root, results) if d and finished(os.path.join(d, run))]
    if where:
      if arms.count(fields["pretrain"]) == 1:
        pre_runs[fields["pretrain"]] = os.path.join(where[0], run)
      else:  # one of several (a fold, a method): its gains are those of the fine-tunes it started
        pre_runs[run] = os.path.join(where[0], run)
        pre_cells[run] = dict(fields)
  overlays = None
  for fields, run, _ in fine:  # overlay panel from the best-labelled pre-trained cell that has finished
    path = os.path.join(root, run, "examples.npz")
    if os.path.isfile(path) and (overlays is None or fields["pretrain"] != "none"):
      import numpy as np
      ex = np.load(path)
      overlays = {
          "images": ex["image"], "masks": ex["mask"], "preds": ex["pred"],
          "titles": [f"{fields['pretrain']} {fields['label_fraction']}% #{i}" for i in range(len(ex["image"]))]
      }
  # C3's single-organ references: every arm pre-trained on breast ultrasound alone.
  breast = tuple(name for name, src in (g.sources.items() if g.sources else ()) if src == "busi") or ("breast",)
  paths = analysis.write_report(cells, os.path.join(root, "report"), pretrain_runs=pre_runs, overlays=overlays,
                                breast=breast, pretrain_cells=pre_cells)
  summaries = {}
  for _, run, _ in pre + fine:
    if finished(os.path.join(root, run)):
      with open(os.path.join(root, run, "summary.json")) as f:
        summaries[run] = json.load(f)
  table = time_table(_read_timing(os.path.join(root, TIMING)), summaries)
  if table and paths.get("md"):
    with open(paths["md"], "a") as f:
      f.write("\n## Where the time went\n\n" + table)
  return paths


def run(g, root: str) -> dict:
  """Runs (or resumes) every run of grid `g` under `root`, refreshing the report after each."""
  root = os.path.abspath(os.path.expanduser(root))
  pre, fine = plan(g)
  results = os.path.abspath(os.path.expanduser(g.results_dir)) if g.get("results_dir") else ""
  if results == root:
    results = ""
  os.makedirs(os.path.join(root, "report"), exist_ok=True)
  if results:
    taken = take_results(results, root, fine)
    if taken:
      logging.info("grid %s: %d finished fine-tuning cells taken from %s", g.name, len(taken), results)
    if not os.path.isfile(os.path.join(root, TIMING)) and os.path.isfile(os.path.join(results, TIMING)):
      shutil.copyfile(os.path.join(results, TIMING), os.path.join(root, TIMING))
  refresh = functools.partial(write_report, g, root, pre, fine, results)
  if g.report_only:
    return refresh()
  record(root, results, [r for _, r, _ in pre + fine])
  # Seed by seed: a grid cut short leaves every arm and label fraction with the same seeds, so its claim rows
  # compare like with like.
  # Fold by fold within a seed, for the same reason: a study cut short has whole folds.
  fine_todo = sorted(((f, r, c) for f, r, c in fine if not finished(os.path.join(root, r))),
                     key=lambda x: (x[0]["seed"], x[0].get("fold", 0)))
  needed = {c.init_from for _, _, c in fine_todo}
  pre_todo = [(f, r, c) for f, r, c in pre if r in needed and not has_weights(os.path.join(root, r))]
  if g.get("stack_runs", 1) > 1:
    todo = pre_todo + fine_todo  # stacked groups gather cells from anywhere in the plan: their weights come first
  else:  # each pre-training just before the first cell that needs it, so results of early folds come early
    todo, waiting = [], {r: item for item in pre_todo for r in [item[1]]}
    for item in fine_todo:
      if item[2].init_from in waiting:
        todo.append(waiting.pop(item[2].init_from))
      todo.append(item)
  logging.info("grid %s: %d pre-training runs, %d fine-tuning cells, %d still to run", g.name, len(pre), len(fine),
               len(todo))
  done = 0
  for group in schedule(todo, g.get("stack_runs", 1), root):
    for _, _, cfg in group:
      if cfg.task == "finetune" and cfg.init_from and not cfg.init_from.endswith(".safetensors"):
        if not has_weights(os.path.join(root, cfg.init_from)):
          raise UsjaxError(f"grid {g.name}: pre-training run {cfg.init_from} did not finish")
        cfg.init_from = os.path.join(root, cfg.init_from)
    names = [r for _, r, _ in group]
    logging.info("grid %s: run%s %d%s/%d %s", g.name, "s" if len(group) > 1 else "", done + 1,
                 f"-{done + len(group)}" if len(group) > 1 else "", len(todo), ", ".join(names))
    t0 = time.perf_counter()
    if len(group) == 1:
      task.run(group[0][2], os.path.join(root, names[0]))
    else:
      stacked.finetune_stacked([c for _, _, c in group], [os.path.join(root, r) for r in names])
    _log_time(root, results, names, group[0][2].task, time.perf_counter() - t0)
    done += len(group)
    record(root, results, names)
    refresh()
  paths = refresh()
  logging.info("grid %s: report in %s", g.name, paths.get("md", root))
  return paths
