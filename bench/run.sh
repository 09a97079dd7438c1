#!/usr/bin/env bash
# The benchmarks' quickstart: install what they need (the CPU build of torch only where torch is
# absent), build what they use once, then run them on CUDA when there is one, else on the CPU.
#   bash bench/run.sh          python -m bench all --quick: indicative numbers, a few minutes
#   bash bench/run.sh --full   python -m bench all: the full run
# Further arguments go to python -m bench. Every stage prints a line as it starts, and another
# every 15 s while it runs.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
say() { printf '[bench/run.sh %4ds] %s\n' $((SECONDS - start)) "$*" >&2; }

stage() {  # label, command...: run the command in the background, saying so every 15 s
    local label=$1 pid n=0
    shift
    say "$label"
    "$@" &
    pid=$!
    while kill -0 "$pid" 2>/dev/null; do
        sleep 1
        n=$((n + 1))
        if [ $((n % 15)) -eq 0 ]; then say "  ... still $label"; fi
    done
    wait "$pid"
}

quick=--quick
if [ "${1:-}" = "--full" ]; then
    quick=
    shift
fi
say "checking for torch (the CPU build 2.13.0 is installed only where it is absent)"
if ! python -c "import torch" 2>/dev/null; then
    stage "installing torch 2.13.0 (CPU build)" python -m pip install --quiet torch==2.13.0
fi
stage "installing fusedopt and the bench extras (pip install -e '.[bench]')" \
    python -m pip install --quiet -e ".[bench]"
say "looking for a CUDA device"
if python -c "import torch, sys; sys.exit(torch.cuda.is_available())"; then
    # a CPU run: the numba kernels compile (fp32 only for --quick) beside the table check's build
    if [ -n "$quick" ]; then kernels="python -m bench.warm"; else kernels="python -m fusedopt.cpu"; fi
    say "once per source, cached after: python -m fusedopt.native and $kernels, side by side"
    stage "building the table check and compiling the numba CPU kernels" \
        bash -c "python -m fusedopt.native & $kernels; wait \$!" || true
else
    stage "building the compiled table check (once: python -m fusedopt.native)" python -m fusedopt.native || true
fi
say "running: python -m bench all $quick $*"
exec python -m bench all $quick "$@"
