#!/usr/bin/env bash
# The GPU grid (configs/grid_gpu.py) in one device call that brings back the whole answer: the wheels the image
# lacks installed, an import check, the grid first under one deadline, the GPU tests with the time left, and the
# results packed into $OUT from an exit trap, so they come back however the call ends.
#
# Before the call, here: `.venv/bin/python launch/fetch_wheels.py` (.whl/, 14 MB) and
# `.venv/bin/python launch/compact_data.py --data_root=../shared/data --out=data_cache/compact` (38 MB). The call:
#   run(command="bash launch/gpu_study.sh", carry=[".whl", "data_cache/compact"], timeout_s=600)
# What comes back (files_at, 5 files): results.tgz (grid_gpu/: every finished run's summary.json, per_image.json,
# history.json, examples.npz and best/selection.json, never checkpoints; the grid's timing.json, where a group the
# deadline cut is recorded with `cut`, its steps and step rate; report/; logs/ with the four files below),
# steps.txt (each step's exit status and seconds, then the verdict), versions.txt, grid.log, tests.log. Then:
#   mkdir -p results && tar -xzf <files_at>/results.tgz -C results/       # -> results/grid_gpu/
#   .venv/bin/python launch/main.py --config=configs/grid_gpu.py:data_cache/compact --workdir=results/grid_gpu \
#       --config.report_only=True
# Exit status: 0 everything passed; 124 nothing failed but the deadline cut the grid or the tests (what finished
# is packed; unpacked into results/grid_gpu, which travels, the same call trains only the rest); 1 a step failed
# (steps.txt says which). A failed import check stops the script in one line (the whole error in versions.txt).
#
# Env: BUDGET_S (540: the whole script, install to packing, inside the call's 600 s), OUT (runs/gpu_out), GRID
# (runs/grid_gpu: its name is the top folder in results.tgz), DATA (data_cache/compact), WHEELS (.whl; absent:
# the installed packages are used), SITE (/tmp/site), GPU_TESTS (the pytest files), USJAX_GPU_OVERRIDES (extra
# `--config.x=y` flags for the grid, no spaces inside one; tests/test_gpu_study.py rehearses the script on CPU
# with tiny shapes this way), JAX_COMPILATION_CACHE_DIR (runs/jax_cache: the four arms' groups are one program
# shape, so only the first compiles; so are the pre-trainings), PACK_S and KILL_S (35 and 25, below). A group cut
# while it compiles (its first step) is killed without a record if that takes longer than KILL_S.
set -u
cd "$(dirname "$0")/.."
START=$(date +%s)
BUDGET_S=${BUDGET_S:-540}
DEADLINE=$((START + BUDGET_S))
PACK_S=${PACK_S:-35}  # seconds kept back for packing, KILL_S of them the grid's grace after SIGTERM: a stacked
KILL_S=${KILL_S:-25}  # group stops at its next step boundary and records how far it got, then SIGKILL
OUT=${OUT:-runs/gpu_out}
GRID=${GRID:-runs/grid_gpu}
DATA=${DATA:-data_cache/compact}
WHEELS=${WHEELS:-.whl}
SITE=${SITE:-/tmp/site}
GPU_TESTS=${GPU_TESTS:-tests/test_stacked.py tests/test_models.py tests/test_conv_lowering.py tests/test_selection.py \
tests/test_transfer.py}
read -r -a OVERRIDES <<< "${USJAX_GPU_OVERRIDES:-}"  # an array: no globbing of `(32,)`
export PYTHONUNBUFFERED=1 JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$PWD/runs/jax_cache}
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=-1
mkdir -p "$OUT" "$GRID"
: > "$OUT/steps.txt"
: > "$OUT/tests.log"
FAILED="" CUT=""

left() { echo $((DEADLINE - $(date +%s) - PACK_S)); }
note() { echo "$*" | tee -a "$OUT/steps.txt"; }

step() {  # step NAME COMMAND...: runs it, records its status (124/137: the deadline), never stops the script
  local name=$1 t0 rc
  shift
  t0=$(date +%s)
  echo "== $name ($((t0 - START)) s in, $(left) s left)"
  "$@"
  rc=$?
  case $rc in
    0) ;;
    124 | 137) CUT="$CUT $name" ;;
    *) FAILED="$FAILED $name" ;;
  esac
  note "$name: rc=$rc$([[ $rc == 124 || $rc == 137 ]] && echo ' (timeout)') in $(($(date +%s) - t0)) s"
}

install() {  # the wheels the image lacks (launch/fetch_wheels.py), into a folder put first on the path
  if [ ! -d "$WHEELS" ]; then
    echo "no $WHEELS/: using the installed packages"
    return 0
  fi
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    "$WHEELS"/*.whl || return 1
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
}

smoke() {
  local err
  err=$(python3 -c "import grain, ml_collections, tensorboardX, tensorflow_datasets, configs.grid_gpu, usjax.grid, \
usjax.stacked" 2>&1) && return 0
  echo "$err" > "$OUT/versions.txt"
  note "gpu_study: import check failed: $(echo "$err" | tail -1)"
  return 1
}

versions() {
  {
    python3 --version
    python3 - <<'EOF'
import importlib.metadata as md
for name in ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "flax", "optax", "orbax-checkpoint", "grain",
             "tensorflow-datasets", "numpy"):
  try:
    print(name, md.version(name))
  except md.PackageNotFoundError:
    pass
import jax
print("devices", jax.devices())
EOF
    nvidia-smi -L 2>/dev/null || echo "nvidia-smi: none"
  } > "$OUT/versions.txt" 2>&1
  local rc=$?
  cat "$OUT/versions.txt"
  return $rc
}

grid() {  # SIGTERM at the deadline: a stacked group stops at its next step and records how far it got
  local t
  t=$(left)
  [ "$t" -lt 20 ] && { echo "grid: not started, $t s left"; return 124; }
  timeout -k "$KILL_S" "$t" python3 launch/main.py --config="configs/grid_gpu.py:$DATA" --workdir="$GRID" \
    ${OVERRIDES[@]+"${OVERRIDES[@]}"} 2>&1 | tee "$OUT/grid.log"
  return "${PIPESTATUS[0]}"
}

gpu_tests() {  # the stacked step against each run stepped alone (vmapped convolutions take other cuDNN paths),
  # then the model, lowering, selection and transfer tests: the not-slow ones, with the time the grid left
  local t
  t=$(left)
  [ "$t" -lt 20 ] && { echo "gpu tests: not started, $t s left" | tee "$OUT/tests.log"; return 124; }
  # shellcheck disable=SC2086  # GPU_TESTS is a list of files
  timeout -k 5 "$t" python3 -m pytest $GPU_TESTS -p no:cacheprovider -k "stepped_alone or not slow" 2>&1 |
    tee "$OUT/tests.log"
  return "${PIPESTATUS[0]}"
}

pack() {  # finished runs' small outputs, the report, the timing and the logs; never checkpoints
  local parent name list runs
  parent=$(dirname "$GRID") name=$(basename "$GRID") list=$(mktemp)
  mkdir -p "$GRID/logs"
  cp "$OUT"/steps.txt "$OUT"/versions.txt "$OUT"/grid.log "$OUT"/tests.log "$GRID/logs/" 2>/dev/null
  runs=$(cd "$parent" && find "$name" -mindepth 2 -maxdepth 2 -name summary.json -printf '%h\n' | sort)
  for skip in "" examples.npz; do  # examples.npz (overlays) goes first if the archive would not come back
    (cd "$parent" && for run in $runs; do
      for f in summary.json per_image.json history.json examples.npz best/selection.json; do
        [ -f "$run/$f" ] && [ "$f" != "$skip" ] && echo "$run/$f"
      done
    done
    for f in report timing.json logs; do [ -e "$name/$f" ] && echo "$name/$f"; done) > "$list"
    tar -czf "$OUT/results.tgz" -C "$parent" -T "$list"
    [ "$(stat -c %s "$OUT/results.tgz")" -lt $((15 * 1024 * 1024)) ] && break
  done
  rm -f "$list"
  echo "packed $(echo "$runs" | grep -c .) finished runs into $OUT/results.tgz ($(du -h "$OUT/results.tgz" | cut -f1))"
}

finish() {
  local rc=$?
  [ -n "$FAILED" ] && rc=1
  [ -z "$FAILED" ] && [ -n "$CUT" ] && rc=124
  if [ "$rc" = 0 ]; then note "verdict: ok in $(($(date +%s) - START)) s"
  elif [ "$rc" = 124 ]; then note "verdict: timeout:$CUT cut by the ${BUDGET_S} s deadline; what finished is packed"
  else note "verdict: failed:${FAILED:- rc=$rc} (see the logs)"
  fi
  pack
  exit "$rc"
}
trap finish EXIT
trap 'CUT="$CUT signal"; exit 124' TERM INT

step install install
smoke || exit 1
step versions versions
step grid grid
step gpu_tests gpu_tests
