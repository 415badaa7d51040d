"""The CPU study: C1 and C2 on duplicate-aware, 5-fold cross-validated BUSI, with the power to read them.

    python launch/main.py --config=configs/study_cpu.py:../shared/data --workdir=runs/study_cpu
    python launch/main.py --config=configs/study_cpu.py:../shared/data,c3 --workdir=runs/study_cpu   # + C3

    python launch/main.py --config=configs/study_cpu.py:../shared/data,presence --workdir=runs/study_cpu_presence
    python launch/main.py --config=configs/study_cpu.py:../shared/data,bf16 --workdir=runs/study_cpu_bf16

The argument after ':' is the folder holding `busi/` and `pocus/`; `,c3` adds the breast-only arm that C3 needs;
`,presence` is the scratch arm alone with the lesion-presence head and gate and post-processing chosen on
validation (`presence.weight=0.1`, `postprocess=auto`; results in results/study_cpu_presence/), paired per image
with the study's scratch cells of the same fold and seed. `,bf16` is the quality check of bf16 compute on CPUs that
multiply bf16 natively: the scratch arm of fold 0, both fractions, seeds 0-2, in bf16 (results in
results/study_cpu_bf16/), paired per image with the study's f32 cells of the same fold and seed (6 fine-tunes).
BUSI's near-duplicates are grouped (usjax.data.duplicates; mixed-class groups left out) and the images dealt into
5 grouped, class-stratified folds: each fold is the test part once, the model is chosen on a validation part
carved from the other four, and every image is a test image exactly once per seed. Arms: scratch and SimCLR
multi-organ pre-training (BUSI + POCUS lung, 600 steps of 32 at 64 px, run once per fold on that fold's
training split, so it never sees the fold's test images), fine-tuned with the 64-px recipe of configs/grid_cpu.py
at 100% and 50% of the labels, seeds 0-2. Claims are paired per image and pooled over folds and seeds, with the CI
half-width and the smallest effect detectable at 80% power beside each verdict (README: The study).

Why this size: the 3-seed grid on one fixed 125-image test split (configs/grid_cpu.py) gave paired CIs of
±0.03-0.05; the spread is run-to-run, so the CI narrows with the number of (fold, seed) runs paired, and cross-
validation scores all ~610 images instead of 125. Two arms x 2 fractions x 5 folds is 20 fine-tunes and 5
pre-trainings a seed; the resolution stays at 64 px because a 128-px fine-tune costs about 4 times as much on 2
cores. Measured rates are in results/study_cpu/timing.json and docs/performance.md. Cells train seed by seed and
fold by fold, each fold's pre-training just before its first cell, so a study cut short has whole folds; finished
runs are recorded in results/study_cpu/ and a run started elsewhere goes on from them.
"""
from configs import grid_cpu


def get_config(arg: str = "../shared/data"):
  data_root, *extra = arg.split(",")
  g = grid_cpu.get_config(data_root)
  g.name = "study_cpu"
  g.sources = {"multiorgan": "busi,pocus"}
  if "c3" in extra:
    g.sources["breast"] = "busi"
  if "presence" in extra or "bf16" in extra:  # the scratch arm alone (README: normal scans; mixed precision)
    g.sources = {}
  g.pretrain_steps = {}
  g.folds = 5
  g.fold_list = ()  # a subset of folds to run (default: all)
  g.label_fractions = (100, 50)
  g.image_sizes = (64,)
  g.seeds = (0, 1, 2)
  g.results_dir = "results/study_cpu"
  for part in (g.pretrain, g.finetune):
    part.data.duplicate_threshold = 0.95  # near-duplicates grouped (grid_cpu keeps its results' ungrouped split)
  if "presence" in extra:
    g.finetune.presence.weight, g.finetune.postprocess = 0.1, "auto"
    g.name, g.results_dir = "study_cpu_presence", "results/study_cpu_presence"
  if "bf16" in extra:
    g.finetune.model.dtype, g.fold_list = "bfloat16", (0,)
    g.name, g.results_dir = "study_cpu_bf16", "results/study_cpu_bf16"
  return g
