#!/usr/bin/env bash
# The prepared device run of the GPU grid (configs/grid_gpu.py): versions, GPU tests, the grid, the results packed.
#
#   OUT=/some/empty/folder bash launch/gpu_study.sh      # needs data_cache/compact (launch/compact_data.py)
#
# Env: GRID_TIMEOUT (s, default 480), TEST_TIMEOUT (s, 60, for each of the two test commands), OUT (runs/gpu_out), GRID (runs/grid_gpu). Every
# step is timed and may fail without stopping the later ones; the packing step always runs. Writes into $OUT:
# versions.txt, tests.log, grid.log, steps.txt (exit status and seconds per step) and results.tgz, which holds every
# finished run's summary.json, per_image.json, history.json, examples.npz and best/selection.json (never checkpoints),
# the grid's timing.json and report/, and these logs (grid_gpu/logs/). The device's `python` is used throughout. On the lead's machine:
#   tar -xzf results.tgz -C results/
#   python launch/main.py --config=configs/grid_gpu.py:data_cache/compact --workdir=results/grid_gpu \
#       --config.report_only=True
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_out}
GRID_TIMEOUT=${GRID_TIMEOUT:-480}
TEST_TIMEOUT=${TEST_TIMEOUT:-60}
GRID=${GRID:-runs/grid_gpu}   # the grid workdir; its name is the top folder in results.tgz
mkdir -p "$OUT" "$GRID"
: > "$OUT/steps.txt"
START=$(date +%s)

step() {  # step NAME COMMAND...: runs it, logs its exit status and seconds, never stops the script
  local name=$1 t0 rc
  shift
  t0=$(date +%s)
  echo "== $name ($(( t0 - START )) s since start)"
  "$@"
  rc=$?
  echo "== $name: rc=$rc in $(( $(date +%s) - t0 )) s" | tee -a "$OUT/steps.txt"
}

versions() {
  {
  python --version
  python - <<'EOF'
import importlib.metadata as md
for name in ("jax", "jaxlib", "jax-cuda12-plugin", "jax-cuda13-plugin", "flax", "optax", "orbax-checkpoint",
             "grain", "tensorflow-datasets", "numpy"):
  try:
    print(f"{name} {md.version(name)}")
  except md.PackageNotFoundError:
    pass
import jax
print("devices", jax.devices())
EOF
  nvidia-smi -L
  } > "$OUT/versions.txt" 2>&1
  local rc=$?
  cat "$OUT/versions.txt"
  return $rc
}

gpu_tests() {
  # The lowering and model tests, then the stacked step against each run stepped alone: vmapped convolutions go
  # through cuDNN differently from single ones, so this is the GPU's own check of stacked fine-tuning.
  local files=() f rc
  for f in tests/test_models.py tests/test_conv_lowering.py tests/test_selection.py tests/test_transfer.py; do
    [ -f "$f" ] && files+=("$f") || echo "missing: $f"
  done
  timeout -k 10 "$TEST_TIMEOUT" python -m pytest "${files[@]}" -q -x -p no:cacheprovider -m "not slow" 2>&1 |
    tee "$OUT/tests.log"
  rc=${PIPESTATUS[0]}
  timeout -k 10 "$TEST_TIMEOUT" python -m pytest tests/test_stacked.py -q -p no:cacheprovider -k "stepped_alone" \
    2>&1 | tee -a "$OUT/tests.log"
  [ "${PIPESTATUS[0]}" -ne 0 ] && rc=1
  return $rc
}

grid() {
  # The persistent compilation cache makes a rerun on a still-warm machine skip XLA compiles (names: JAX 0.10/0.11).
  # SIGTERM at the timeout makes the run checkpoint at its next step and exit; -k kills it if that takes too long.
  JAX_COMPILATION_CACHE_DIR="$PWD/runs/jax_cache" JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 \
    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=-1 \
    timeout -k 20 "$GRID_TIMEOUT" python launch/main.py --config=configs/grid_gpu.py:data_cache/compact \
    --workdir="$GRID" 2>&1 | tee "$OUT/grid.log"
  return "${PIPESTATUS[0]}"
}

pack() {
  local list runs parent name
  list=$(mktemp)
  parent=$(dirname "$GRID") name=$(basename "$GRID")
  mkdir -p "$GRID/logs"
  cp "$OUT"/versions.txt "$OUT"/tests.log "$OUT"/grid.log "$OUT"/steps.txt "$GRID/logs/" 2>/dev/null
  # Only finished runs (summary.json written); their checkpoints stay behind.
  runs=$(cd "$parent" && find "$name" -mindepth 2 -maxdepth 2 -name summary.json -printf '%h\n' | sort)
  (cd "$parent" && for run in $runs; do
    for f in summary.json per_image.json history.json examples.npz best/selection.json; do
      [ -f "$run/$f" ] && echo "$run/$f"
    done
  done; [ -d "$name/report" ] && echo "$name/report"; [ -f "$name/timing.json" ] && echo "$name/timing.json"
  echo "$name/logs") > "$list"
  tar -czf "$OUT/results.tgz" -C "$parent" -T "$list" && rm -f "$list" &&
    echo "packed $(echo "$runs" | grep -c .) finished runs: $(du -h "$OUT/results.tgz" | cut -f1)"
}

step versions versions
step gpu_tests gpu_tests
step grid grid
step pack pack
echo "== total $(( $(date +%s) - START )) s"
cat "$OUT/steps.txt"
