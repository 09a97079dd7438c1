#!/usr/bin/env bash
# Install what the tests need (the CPU build of torch when torch is absent), then run them.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
python -c "import torch" 2>/dev/null || python -m pip install --quiet torch==2.13.0
python -m pip install --quiet -e ".[test]"
python -m fusedopt.native || true  # the compiled table check (once; the tests cover both checks)
python -m fusedopt.cpu || true  # the numba CPU kernels into numba's cache (once per source)
exec python -m pytest tests -q -n 2 --dist loadfile "$@"
