#!/usr/bin/env bash
# The one command for a GPU machine: the test suite on CUDA, then both benchmarks in full, all
# output under OUT_DIR (logs, env.json, JSON, markdown, plots), in under 5 minutes in total (so
# that a rerun fits in a session's device time).
#
#   bench/gpu_check.sh OUT_DIR            then: python -m bench.publish OUT_DIR
#
# GPU_CHECK_BUDGET_S (default 290) is the total time; each stage runs under `timeout` and the
# benchmark gets what the tests left. A stage that fails or times out is recorded in
# OUT_DIR/summary.txt and the script goes on; its exit status is that of the worst stage.
set -uo pipefail

OUT=${1:?usage: bench/gpu_check.sh OUT_DIR}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
BUDGET=${GPU_CHECK_BUDGET_S:-290}
START=$(date +%s)
STATUS=0
: > "$OUT/summary.txt"

left() { echo $(( BUDGET - ($(date +%s) - START) )); }

stage() {  # stage NAME SECONDS COMMAND...: run under timeout, log to OUT/NAME.log, record rc
    local name=$1 limit=$2
    shift 2
    if [ "$limit" -lt 20 ]; then
        echo "$name: skipped (time budget)" | tee -a "$OUT/summary.txt"
        return
    fi
    echo "=== $name (limit ${limit}s): $*" | tee -a "$OUT/summary.txt"
    local t0=$(date +%s)
    timeout --kill-after=15 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "$name: rc=$rc in $(( $(date +%s) - t0 ))s" | tee -a "$OUT/summary.txt"
    [ "$rc" -ne 0 ] && STATUS=$rc
    return 0
}

python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'" || exit 2
# fusedopt.kernels is mapped from the top-level kernels/ folder: it needs an install
if ! python -c "import fusedopt.kernels" 2>/dev/null; then
    python -m pip install --no-deps --no-build-isolation -q -e . 2>&1 | tee "$OUT/install.log"
fi
python -m bench.env "$OUT/env.json" --device cuda --command "bench/gpu_check.sh $*" > /dev/null

# the compiled table check (about 30 s once), so that the tests and the benchmarks use it; the
# numba CPU kernels compiled once into numba's cache, where numba is installed
stage native 60 python -m fusedopt.native
if python -c "import numba" 2>/dev/null; then
    stage cpu_kernels 90 python -m fusedopt.cpu
fi

stage pytest "$(( $(left) < 120 ? $(left) : 120 ))" python -m pytest tests -q -p no:cacheprovider -n 8 --dist loadfile

stage host_overhead 30 python -m bench.host_overhead --steps 100

# the benchmarks stop starting new cases at --time-budget, well before the hard timeout
BENCH_LIMIT=$(( $(left) - 45 ))
stage bench "$BENCH_LIMIT" python -m bench all --device cuda --out "$OUT" --no-progress \
    --time-budget "$(( BENCH_LIMIT - 20 ))"

# the CPU target (fusedopt's CPU path against torch foreach), measured on this machine's CPU
stage bench_cpu "$(( $(left) - 5 ))" python -m bench step --device cpu --quick --out "$OUT/cpu" \
    --no-progress --no-plots --time-budget 20

# per-case micro-benchmarks, JSON comparable between commits with `pytest-benchmark compare`
if python -c "import pytest_benchmark" 2>/dev/null; then
    stage microbench "$(( $(left) - 5 ))" env FUSEDOPT_BENCH_DEVICE=cuda python -m pytest bench -q \
        -p no:cacheprovider --benchmark-json="$OUT/pytest-benchmark.json"
fi

python - "$OUT/env.json" "$(( $(date +%s) - START ))" <<'PY'
import json, sys
path, seconds = sys.argv[1], int(sys.argv[2])
env = json.load(open(path))
env["gpu_check_seconds"] = seconds
json.dump(env, open(path, "w"), indent=2)
PY
echo "total: $(( $(date +%s) - START ))s, exit status $STATUS" | tee -a "$OUT/summary.txt"
echo "results in $OUT; publish with: python -m bench.publish $OUT"
exit "$STATUS"
