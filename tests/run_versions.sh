#!/usr/bin/env bash
# The kernel, API, compile, never-stale, distributed and torch-corner tests on the oldest versions
# fusedopt supports, each set in a venv of its own (made once, then reused):
#   triton-3.6  the oldest Triton (3.6.*) beside the CPU build of torch 2.13.0, CI's torch;
#   torch-2.11  the GPU machines' torch (2.11.*, PyPI's CUDA build: a ~3 GB download, which
#               imports and runs on a machine without a GPU), with the Triton it pins (3.6.0).
# Not part of CI (the download, and about 8 minutes of tests per set on 2 cores); the README
# records when it last ran and against what.
#
#   bash tests/run_versions.sh                 # both sets
#   bash tests/run_versions.sh torch-2.11      # one of them
#   FUSEDOPT_VERSIONS_DIR=/somewhere bash tests/run_versions.sh   # where the venvs live
set -euo pipefail
cd "$(dirname "$0")/.."
root=${FUSEDOPT_VERSIONS_DIR:-$HOME/.cache/fusedopt/versions}
tests=(tests/test_kernels.py tests/test_api.py tests/test_compile.py tests/test_never_stale.py
       tests/test_distributed.py tests/test_torch_corners.py)

# name -> what pip installs before fusedopt (whose own requirements then add nothing newer)
declare -A requirements=(
    [triton-3.6]="torch==2.13.0 triton==3.6.*"
    [torch-2.11]="torch==2.11.*"
)

run() (  # a subshell: PATH changes for this set alone
    name=$1 venv=$root/$1 status=0
    [ -x "$venv/bin/python" ] || python -m venv "$venv"
    # the venv first on PATH: pip, and the tests' subprocesses (distributed ranks, codegen) use it
    export PATH="$venv/bin:$PATH"
    # shellcheck disable=SC2086  # the requirements are words
    python -m pip install --quiet ${requirements[$name]}  # nothing to fetch once they are there
    python -m pip install --quiet -e ".[test]"
    python -c 'import torch, triton, numba; print(f"== torch {torch.__version__}, triton {triton.__version__}, numba {numba.__version__}")'
    python -m fusedopt.native >/dev/null 2>&1 || true  # the compiled table check, once per torch
    python -m fusedopt.cpu >/dev/null || true
    python -m pytest "${tests[@]}" -q -n 2 --dist loadfile -p no:cacheprovider -rs || status=$?
    echo "== $name: pytest exit $status"
    exit $status
)

names=("$@")
[ ${#names[@]} -eq 0 ] && names=(triton-3.6 torch-2.11)
failed=0
for name in "${names[@]}"; do
    if [ -z "${requirements[$name]+set}" ]; then
        echo "unknown set $name (known: ${!requirements[*]})" >&2
        exit 2
    fi
    run "$name" || failed=1
done
exit $failed
