"""python -m fusedopt.cpu: every numba CPU kernel (each rule of the registry, by name, under each of
its options, for each param dtype and bf16 rounding) compiled into numba's on-disk cache, so that
no later process pays the compile at its first step. The kernels compile side by side, in as many
processes as there are cores (each kernel has its own cache index, written by one process)."""
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import torch

from .. import formats
from . import available, kernel_ready

DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
BF16_ROUNDINGS = ("nearest", "stochastic", "master")


def rule_specs():
    """Every rule's spec in the registry, by name (rules that share one, such as Adam and AdamW,
    once)."""
    from ..registry import RULES

    return {info.optimizer.spec.name: info.optimizer.spec for info in RULES.values()}


def kernels_of(name):
    """(rule name, options) of every kernel of the rule `name`."""
    return [(name, options) for options in rule_specs()[name].option_variants()]


def compile_kernel(name, options):
    """Compile (or load from the cache) the kernel of rule `name` under `options`, its states in
    the params' dtype (torch's layout), for every dtype and bf16 rounding; the ones that failed,
    as "rule options dtype rounding". (Kernels of states in bf16 or 8 bits compile at first use.)"""
    spec = rule_specs()[name]
    states = tuple(formats.PLAIN if present else formats.ABSENT for present in spec.present(options))
    failed = []
    for dtype in DTYPES:
        for rounding in BF16_ROUNDINGS if dtype == torch.bfloat16 else ("nearest",):
            if not kernel_ready(spec, options, formats.Storage(states, "nearest", rounding), dtype):
                failed.append(f"{name} {options} {dtype} {rounding}")
    return failed


def _compile(kernel):
    return compile_kernel(*kernel)


def _cores():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def main(names=None):
    if not available():
        print("fusedopt: numba is unavailable; CPU params use the plain-torch reference", file=sys.stderr)
        return 1
    start = time.perf_counter()
    kernels = [kernel for name in (names or rule_specs()) for kernel in kernels_of(name)]
    workers = min(len(kernels), _cores())
    if workers > 1:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            failed = [failure for failures in pool.map(_compile, kernels) for failure in failures]
    else:
        failed = [failure for kernel in kernels for failure in _compile(kernel)]
    if failed:
        print(f"fusedopt: these CPU kernels did not compile: {', '.join(failed)}", file=sys.stderr)
        return 1
    print(f"fusedopt: numba CPU kernels ready ({len(kernels)} kernels, {time.perf_counter() - start:.1f} s, "
          f"{workers} process{'es' if workers > 1 else ''})")
    return 0
