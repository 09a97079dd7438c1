"""python -m fusedopt.cpu: compile every numba CPU kernel (each rule, each param dtype) into
numba's on-disk cache, once per numba version and kernel source, so that no later process pays
the compile at its first step."""
import sys
import time

import torch

from ..registry import RULES
from . import available, kernel_ready

DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def main():
    if not available():
        print("fusedopt: numba is unavailable; CPU params use the plain-torch reference", file=sys.stderr)
        return 1
    start = time.perf_counter()
    failed = []
    for info in RULES.values():
        optimizer = info.optimizer([torch.nn.Parameter(torch.zeros(1))], backend="numba")
        for dtype in DTYPES:
            if not kernel_ready(optimizer, optimizer.param_groups[0], dtype):
                failed.append(f"{info.name} {dtype}")
    if failed:
        print(f"fusedopt: these CPU kernels did not compile: {', '.join(failed)}", file=sys.stderr)
        return 1
    print(f"fusedopt: numba CPU kernels ready ({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
