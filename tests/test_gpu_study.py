"""launch/gpu_study.sh rehearsed on CPU with tiny shapes (the same script, shrunk by USJAX_GPU_OVERRIDES): it runs
the grid end to end under its deadline, what it leaves in $OUT fits what a device call brings back, the archive
rebuilds the report, and a run cut by the deadline still packs and exits 124. Then the wheel set of
launch/fetch_wheels.py is checked complete: the project imports and reads data from it under a Python that sees
only the GPU image's packages. And a stacked group stopped by SIGTERM records its time and rate, marked cut."""
import importlib.util
import json
import os
import re
import subprocess
import sys
import tarfile
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ALLOWED = re.compile(r"^[A-Za-z0-9._-]+$")  # names a device call brings back
ARMS = ("none", "breast", "multiorgan", "multiorgan_natural")


def tiny_overrides(tmp: Path, recorded: str = "recorded") -> list[str]:
  """configs/grid_gpu.py at CPU size: synthetic data, a plain fp32 32-px U-Net (XLA's convolutions, which compile
  faster than the CPU lowerings), 2 steps, 2 fractions, 1 seed, no EMA or flip-averaging candidates."""
  flags = [
      "--config.sources.breast=synthetic_breast", "--config.sources.multiorgan=synthetic_breast,synthetic_lung",
      "--config.sources.multiorgan_natural=synthetic_breast,synthetic_lung,synthetic_heart",
      "--config.image_sizes=(32,)", "--config.label_fractions=(100,10)", "--config.seeds=(0,)",
      f"--config.results_dir={tmp / recorded}", "--config.pretrain.probe.every=-1",
      "--config.pretrain.model.proj_dims=(64,32)", "--config.finetune.val_every=2", "--config.finetune.tta=none",
      "--config.finetune.ema_decay=0.0", "--config.finetune.data.finetune_source=synthetic_breast"
  ]
  each = [
      f"data.data_dir={tmp / 'tfds'}", "data.synthetic_size=32", "data.synthetic_num_images=40", "data.num_workers=0",
      "model.encoder=plain", "model.dtype=float32", "model.conv_impl=xla", "model.decoder_widths=(32,16,16,8,8)",
      "batch_size=8", "num_steps=2", "log_every=1", "checkpoint_every=2"
  ]
  return flags + [f"--config.{part}.{k}" for part in ("pretrain", "finetune") for k in each]


def study(tmp: Path, name: str, budget: int, overrides: list[str], **env) -> tuple[subprocess.CompletedProcess, Path]:
  out = tmp / f"out_{name}"
  env = dict(os.environ, **env, OUT=str(out), GRID=str(tmp / name / "grid_gpu"), BUDGET_S=str(budget),
             WHEELS=str(tmp / "no_wheels"), USJAX_GPU_OVERRIDES=" ".join(overrides),
             GPU_TESTS="tests/test_stacked.py::test_stack_and_unstack_are_inverse",
             JAX_COMPILATION_CACHE_DIR=str(tmp / "jax_cache"),
             PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")  # python3 is this venv's
  p = subprocess.run(["bash", "launch/gpu_study.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                     timeout=budget + 60)
  return p, out


def check_returnable(out: Path) -> list[str]:
  """The device call's limits on $OUT: at most 8 files, 16 MiB each, plain names, at most 2 folders down."""
  files = [p for p in out.rglob("*") if p.is_file()]
  assert 0 < len(files) <= 8, files
  for p in files:
    rel = p.relative_to(out)
    assert len(rel.parts) <= 3 and all(ALLOWED.match(part) for part in rel.parts), rel
    assert p.stat().st_size <= 16 * 2**20, (rel, p.stat().st_size)
  return sorted(str(p.relative_to(out)) for p in files)


@pytest.mark.slow
def test_the_gpu_study_rehearsed_on_cpu_packs_the_whole_answer(tmp_path):
  overrides = tiny_overrides(tmp_path)
  p, out = study(tmp_path, "full", 540, overrides)  # 180-330 s on 2 cores with other jobs, mostly compiling
  assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
  assert check_returnable(out) == ["grid.log", "results.tgz", "steps.txt", "tests.log", "versions.txt"]
  steps = (out / "steps.txt").read_text()
  assert "verdict: ok" in steps and "grid: rc=0" in steps and "gpu_tests: rc=0" in steps
  assert "1 passed" in (out / "tests.log").read_text()

  results = tmp_path / "results"
  with tarfile.open(out / "results.tgz") as t:
    assert all(not n.startswith(("/", "..")) and "/checkpoints" not in n for n in t.getnames())
    t.extractall(results)
  cells = sorted(d.name for d in (results / "grid_gpu").glob("ft_*"))
  assert len(cells) == 4 * 2 and all((results / "grid_gpu" / c / "summary.json").is_file() for c in cells)
  summaries = {c: json.loads((results / "grid_gpu" / c / "summary.json").read_text()) for c in cells}
  assert {s["stacked_runs"] for s in summaries.values()} == {2}  # one arm a program: 2 fractions x 1 seed
  timing = json.loads((results / "grid_gpu" / "timing.json").read_text())
  groups = [t["runs"] for t in timing if t["task"] == "finetune"]
  assert sorted(len(g) for g in groups) == [2] * 4 and not any(t.get("cut") for t in timing)
  assert [{c.split("_method")[0].removeprefix("ft_pretrain-") for c in g} for g in groups] == [{a} for a in ARMS]
  assert {"steps.txt", "grid.log"} <= {p.name for p in (results / "grid_gpu" / "logs").iterdir()}

  # The report rebuilt from the archive alone: a results.csv row a cell, with the Dice its summary recorded.
  (results / "grid_gpu" / "report").rename(results / "grid_gpu" / "report_packed")
  r = subprocess.run([sys.executable, "launch/main.py", "--config=configs/grid_gpu.py",
                      f"--workdir={results / 'grid_gpu'}", "--config.report_only=True"] + overrides, cwd=ROOT,
                     capture_output=True, text=True, timeout=180)
  assert r.returncode == 0, r.stderr[-3000:]
  rows = (results / "grid_gpu" / "report" / "results.csv").read_text().splitlines()
  assert len(rows) == 1 + len(cells)
  header = rows[0].split(",")
  dice = sorted(float(row.split(",")[header.index("dice")]) for row in rows[1:])
  assert dice == pytest.approx(sorted(s["dice"] for s in summaries.values()), abs=1e-4)
  assert "## Where the time went" in (results / "grid_gpu" / "report" / "report.md").read_text()

  # A deadline too short for the grid (SIGTERM about 20 s in): cut, packed, exit 124, reported as a timeout.
  p, out = study(tmp_path, "cut", 45, tiny_overrides(tmp_path, "recorded_cut"), PACK_S="10", KILL_S="5")
  assert p.returncode == 124, p.stdout[-3000:] + p.stderr[-3000:]
  assert "results.tgz" in check_returnable(out)
  steps = (out / "steps.txt").read_text()
  assert "(timeout)" in steps and "verdict: timeout" in steps and "failed" not in steps
  stopped = re.search(r"stacked group of 2 runs stopped (.*?): cut=(\w+)", (out / "grid.log").read_text())
  if stopped:  # the deadline fell inside a group: its time is recorded, `cut` unless all its steps had run
    with tarfile.open(out / "results.tgz") as t:
      timing = json.load(t.extractfile("grid_gpu/timing.json"))
      names = t.getnames()
    assert len(timing[-1]["runs"]) == 2
    finished = stopped.group(1) == "after its runs finished"
    assert timing[-1]["cut"] is (not finished) and stopped.group(2) == str(not finished)
    # A group stopped after its runs finished still returns their summaries; a cut one returns none of them.
    assert all((f"grid_gpu/{r}/summary.json" in names) is finished for r in timing[-1]["runs"])


@pytest.mark.slow
def test_a_failed_import_check_stops_in_one_line_and_still_packs(tmp_path):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "python3").write_text(f'#!/bin/sh\nexec {sys.executable} -S "$@"\n')  # no site-packages: no grain
  (bin_dir / "python3").chmod(0o755)
  out = tmp_path / "out"
  env = dict(os.environ, OUT=str(out), GRID=str(tmp_path / "grid_gpu"), WHEELS=str(tmp_path / "none"),
             PATH=f"{bin_dir}:{os.environ['PATH']}")
  p = subprocess.run(["bash", "launch/gpu_study.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
  assert p.returncode == 1
  failed = [line for line in (p.stdout + p.stderr).splitlines() if "import check failed" in line]
  assert failed == ["gpu_study: import check failed: ModuleNotFoundError: No module named 'grain'"]
  assert "Traceback" in (out / "versions.txt").read_text() and "Traceback" not in p.stdout + p.stderr
  assert "grid" not in (out / "steps.txt").read_text() and "results.tgz" in check_returnable(out)


@pytest.mark.slow
def test_a_stacked_group_stopped_by_sigterm_records_its_time_and_rate(tmp_path, monkeypatch):
  from configs import finetune_busi
  from test_end_to_end import tiny
  from usjax import feed, runtime, stacked

  steps = []
  monkeypatch.setattr(runtime.Interrupts, "requested", lambda self: len(steps) >= 3)  # asked at step 3
  real = feed.group_batch
  monkeypatch.setattr(feed, "group_batch", lambda *a: (steps.append(1), real(*a))[1])
  cfgs = []
  for seed in (0, 1):
    cfg = tiny(finetune_busi.get_config(), tmp_path / "data")
    cfg.seed, cfg.num_steps, cfg.val_every = seed, 50, 0  # validation only at the end, which is never reached
    cfg.model.encoder, cfg.model.conv_impl, cfg.model.decoder_widths = "plain", "xla", (32, 16, 16, 8, 8)
    cfgs.append(cfg)
  workdirs = [str(tmp_path / "grid" / f"run{i}") for i in range(2)]
  with pytest.raises(runtime.Preempted, match="at step 3"):
    stacked.finetune_stacked(cfgs, workdirs)
  [entry] = json.loads((tmp_path / "grid" / "timing.json").read_text())
  assert entry["runs"] == ["run0", "run1"] and entry["cut"] is True and entry["task"] == "finetune"
  assert (entry["steps_done"], entry["steps"]) == (3, 50) and entry["compile_s"] > 0 and entry["seconds"] > 0
  assert entry["images_per_sec"] == pytest.approx(2 * 8 / entry["step_s"], rel=1e-2)  # 2 runs x 8 images a step
  assert not any((tmp_path / "grid" / f"run{i}" / "summary.json").exists() for i in range(2))


def test_cut_timing_counts_the_steps_after_the_first():
  from usjax import stacked
  assert stacked.cut_timing(5, 10, 64, 30.0, 2.0) == {
      "cut": True, "steps_done": 5, "steps": 10, "compile_s": 30.0, "step_s": 0.5, "images_per_sec": 128.0
  }
  assert stacked.cut_timing(1, 10, 64, 30.0, 0.0)["images_per_sec"] is None  # one step: compilation only
  assert stacked.cut_timing(10, 10, 64, 30.0, 9.0)["cut"] is False


# ---------------------------------------------------------------------------------------------------- the wheels
def _fetch_wheels():
  spec = importlib.util.spec_from_file_location("fetch_wheels", ROOT / "launch" / "fetch_wheels.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def image_view(dest: Path, names: set[str]) -> None:
  """A site folder holding, as symlinks, only the files of this venv's distributions named in `names`."""
  from packaging.utils import canonicalize_name
  site = Path(metadata.distribution("numpy").locate_file(""))
  for dist in metadata.distributions(path=[str(site)]):
    if canonicalize_name(dist.metadata["Name"]) not in names:
      continue
    for f in dist.files or []:
      if f.parts[0] == "..":  # scripts in bin/
        continue
      target = dest / f
      target.parent.mkdir(parents=True, exist_ok=True)
      if not target.exists():
        target.symlink_to(dist.locate_file(f))


ISOLATED = """
import importlib, json, pkgutil, sys
import usjax
for m in pkgutil.walk_packages(usjax.__path__, "usjax."):  # every project module, camus's nibabel included
  importlib.import_module(m.name)
import configs.grid_gpu
from configs import default
from usjax import report
from usjax.data import pipeline
cfg = default.get_config()
cfg.data.data_dir, cfg.data.image_size, cfg.data.synthetic_size, cfg.data.synthetic_num_images = sys.argv[1], 32, 32, 20
ds, n = pipeline.finetune_dataset(cfg.data, 4, 0)  # tfds builds array_record files, grain reads them
batch = next(iter(ds))
report.Reporter(sys.argv[1], 1, 1).close(sys.argv[1], {})  # tensorboardX
print(json.dumps({"shape": list(batch["image"].shape), "files": {m: sys.modules[m].__file__ for m in
      ("grain", "tensorflow_datasets", "ml_collections", "tensorboardX", "array_record", "tree", "promise")}}))
"""


@pytest.mark.slow
def test_the_wheel_set_completes_the_gpu_image(tmp_path):
  """The .whl/ set installed into an empty --target, plus only the image's packages (this venv's copies, linked
  into a folder), is all a `python -S` (no site-packages) needs to import every project module and read data.

  This interpreter is Python 3.11 and the set is for 3.12: the pure-Python wheels are installed as the script
  installs them; a compiled wheel (array_record, dm-tree, grain) cannot load here, so this venv's build of the
  same distribution at the same version stands in for it. Each package then comes from the wheel set or the
  image, never from the venv at large: without the wheel set the same imports fail."""
  wheels = sorted((ROOT / ".whl").glob("*.whl"))
  if not wheels:
    pytest.skip(".whl/ is absent (launch/fetch_wheels.py fills it; CI has no wheels)")
  from packaging.utils import canonicalize_name, parse_wheel_filename
  fetch = _fetch_wheels()
  names = [canonicalize_name(parse_wheel_filename(w.name)[0]) for w in wheels]
  assert len(names) == len(set(names)), "two versions of one package stop the install"
  assert not set(names) & fetch.IMAGE
  pure = [w for w in wheels if all(t.abi == "none" for t in parse_wheel_filename(w.name)[3])]
  compiled = {canonicalize_name(parse_wheel_filename(w.name)[0]): str(parse_wheel_filename(w.name)[1])
              for w in wheels if w not in pure}
  for name, version in compiled.items():
    assert metadata.version(name) == version, f"{name}: the venv's build is not the wheel's version"
  site, view = tmp_path / "site", tmp_path / "image"
  subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                  "--target", str(site)] + [str(w) for w in pure], check=True, timeout=120)
  image_view(view, set(fetch.IMAGE) | set(compiled))

  def isolated(path: list[Path]) -> subprocess.CompletedProcess:
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "PYTHONPATH": os.pathsep.join(map(str, path)),
           "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-S", "-c", ISOLATED, str(tmp_path / "data")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)

  bare = isolated([ROOT, view])  # the image alone lacks them
  assert bare.returncode != 0 and "ModuleNotFoundError" in bare.stderr
  p = isolated([ROOT, site, view])
  assert p.returncode == 0, p.stderr[-3000:]
  got = json.loads(p.stdout.strip().splitlines()[-1])
  assert got["shape"] == [4, 32, 32, 1]
  for module, path in got["files"].items():
    assert path.startswith((str(site), str(view))), (module, path)
