"""python -m fusedopt.cpu: every numba CPU kernel (each rule, each param dtype) compiled into
numba's on-disk cache, once per numba version and kernel source, so that no later process pays
the compile at its first step. The kernels compile side by side, in as many processes as there
are cores (one process per kernel: each writes its own cache index)."""
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import torch

from ..registry import RULES
from . import available, kernel_ready

DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def compile_rules(names):
    """Compile (or load from the cache) the kernels of these rules on every dtype; the ones that
    failed, as "rule dtype"."""
    failed = []
    for name in names:
        info = RULES[name]
        optimizer = info.optimizer([torch.nn.Parameter(torch.zeros(1))], backend="numba")
        for dtype in DTYPES:
            if not kernel_ready(optimizer, optimizer.param_groups[0], dtype):
                failed.append(f"{name} {dtype}")
    return failed


def _cores():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def main():
    if not available():
        print("fusedopt: numba is unavailable; CPU params use the plain-torch reference", file=sys.stderr)
        return 1
    start = time.perf_counter()
    by_kernel = {}  # rules that share a kernel (SGD with and without momentum, Adam and AdamW)
    for name, info in RULES.items():
        by_kernel.setdefault(info.optimizer.kernel_step, []).append(name)
    workers = min(len(by_kernel), _cores())
    if workers > 1:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            failed = [rule for rules in pool.map(compile_rules, by_kernel.values()) for rule in rules]
    else:
        failed = compile_rules(list(RULES))
    if failed:
        print(f"fusedopt: these CPU kernels did not compile: {', '.join(failed)}", file=sys.stderr)
        return 1
    print(f"fusedopt: numba CPU kernels ready ({time.perf_counter() - start:.1f} s, {workers} "
          f"process{'es' if workers > 1 else ''})")
    return 0
