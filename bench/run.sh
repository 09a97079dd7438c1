#!/usr/bin/env bash
# Install what the benchmarks need (the CPU build of torch when torch is absent), then run the
# step-time and batch-size benchmarks on CUDA when there is one, else on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch" 2>/dev/null || python -m pip install --quiet torch==2.13.0
python -m pip install --quiet -e ".[bench]"
python -m fusedopt.native || true  # the compiled table check, built once (the Python one otherwise)
python -m fusedopt.cpu || true  # the numba CPU kernels compiled into numba's cache, once
exec python -m bench all "$@"
