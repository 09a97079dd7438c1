"""python -m fusedopt.cpu: every numba CPU kernel of states in torch's layout (each rule of the
registry, by name, under each of its options, for each param dtype and bf16 rounding but
remainders, and the grad-norm reduction for each grad dtype) compiled into numba's on-disk cache,
so that no later process pays the compile at its first step or clip; one line per kernel as it is
done. The kernels compile side by side, in as many processes as there are cores (each kernel has
its own cache index, written by one process)."""
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed

import torch

from .. import formats
from . import available, kernel_ready

DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
BF16_ROUNDINGS = ("nearest", "stochastic", "master")


def covers(storage):
    """Whether the kernels compiled here include those of buckets stored as `storage`
    (fusedopt.formats.Storage): states in torch's layout, any param rounding but remainders."""
    return (all(fmt in (formats.PLAIN, formats.ABSENT) for fmt in storage.states)
            and storage.state_rounding == "nearest" and storage.param_rounding in BF16_ROUNDINGS)


def rule_specs():
    """Every rule's spec in the registry, by name (rules that share one, such as Adam and AdamW,
    once)."""
    from ..registry import RULES

    return {info.optimizer.spec.name: info.optimizer.spec for info in RULES.values()}


def kernels_of(name):
    """(rule name, options) of every kernel of the rule `name`."""
    return [(name, options) for options in rule_specs()[name].option_variants()]


GRAD_NORM = "grad_norm"  # the name under which the grad-norm reduction is listed beside the rules


def compile_kernel(name, options):
    """Compile (or load from the cache) the kernel of rule `name` under `options`, its states in
    the params' dtype (torch's layout), (or, for GRAD_NORM, the grad-norm reduction) for every
    dtype and bf16 rounding: (the ones that failed, as "rule options dtype rounding"; seconds it
    took). (Kernels of states in bf16 or 8 bits, and of bf16 params with 16-bit remainders, compile
    at first use.)"""
    from . import grad_norm_ready

    start = time.perf_counter()
    failed = []
    for dtype in DTYPES:
        if name == GRAD_NORM:
            if not grad_norm_ready(dtype):
                failed.append(f"{name} {dtype}")
            continue
        for rounding in BF16_ROUNDINGS if dtype == torch.bfloat16 else ("nearest",):
            spec = rule_specs()[name]
            states = tuple(formats.PLAIN if present else formats.ABSENT for present in spec.present(options))
            if not kernel_ready(spec, options, formats.Storage(states, "nearest", rounding), dtype):
                failed.append(f"{name} {options} {dtype} {rounding}")
    return failed, time.perf_counter() - start


def _compile(kernel):
    from .. import cpu

    cpu.announce_compiles = False  # the parent reports each kernel
    return compile_kernel(*kernel)


def _cores():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def describe(kernel):
    """A kernel as its progress line names it: the rule and its options that are on."""
    name, options = kernel
    if options is None:
        return "grad-norm reduction"
    flags = [field for field, value in zip(options._fields, options) if value]
    return name + (f" ({', '.join(flags)})" if flags else "")


def main(names=None):
    if not available():
        print("fusedopt: numba is unavailable; CPU params use the plain-torch reference", file=sys.stderr)
        return 1
    start = time.perf_counter()
    kernels = [kernel for name in (names or rule_specs()) for kernel in kernels_of(name)]
    if names is None:
        kernels.append((GRAD_NORM, None))
    workers = min(len(kernels), _cores())
    print(f"fusedopt: compiling {len(kernels)} numba CPU kernels into numba's cache, each for every param dtype "
          f"({workers} process{'es' if workers > 1 else ''}; kernels already cached load in well under a second)",
          flush=True)
    failed = []

    def report(done, kernel, result):
        failures, seconds = result
        failed.extend(failures)
        status = f"FAILED: {', '.join(failures)}" if failures else f"{seconds:.1f} s"
        print(f"[{done:{len(str(len(kernels)))}}/{len(kernels)}] {describe(kernel)}: {status}", flush=True)

    if workers > 1:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(_compile, kernel): kernel for kernel in kernels}
            for done, future in enumerate(as_completed(futures), start=1):
                report(done, futures[future], future.result())
    else:
        for done, kernel in enumerate(kernels, start=1):
            report(done, kernel, _compile(kernel))
    if failed:
        print(f"fusedopt: these CPU kernels did not compile: {', '.join(failed)}", file=sys.stderr)
        return 1
    print(f"fusedopt: numba CPU kernels ready ({len(kernels)} kernels, {time.perf_counter() - start:.1f} s)")
    return 0
