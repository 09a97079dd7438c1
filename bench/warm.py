"""Compile the numba CPU kernels the benchmarks run into numba's on-disk cache, showing each as it
is ready: one step of every registry benchmark variant on a one-element param per dtype, the
variants side by side in as many processes as there are cores.

    python -m bench.warm [--dtypes float32,bfloat16]

``python -m fusedopt.cpu`` compiles every kernel on every dtype (what the full run and the tests
use); the quick run needs the fp32 ones only, about a third of the time.
"""
import argparse
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed


def first_step(name, dtypes):
    """Seconds one step of variant `name` took on each dtype (compiling or loading its kernel)."""
    import torch

    from bench.cases import RULES

    rule, seconds = RULES[name], []
    for dtype in dtypes:
        p = torch.nn.Parameter(torch.zeros(1, dtype=getattr(torch, dtype)))
        p.grad = torch.ones_like(p)
        start = time.perf_counter()
        rule.info.optimizer([p], **rule.options, backend="numba").step()
        seconds.append(time.perf_counter() - start)
    return name, seconds


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.warm", description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", default="float32", help="comma list of torch dtypes (default: float32)")
    args = parser.parse_args(argv)
    from bench.cases import RULES
    from fusedopt import cpu

    if not cpu.available():
        print("bench.warm: numba is unavailable; CPU params use the plain-torch reference", file=sys.stderr)
        return 0
    dtypes = args.dtypes.split(",")
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    start = time.perf_counter()
    print(f"bench.warm: {len(RULES)} rule variants x {', '.join(dtypes)}, {cores} at a time "
          "(a first run compiles, later ones load numba's cache)", file=sys.stderr, flush=True)
    with ProcessPoolExecutor(cores, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(first_step, name, dtypes) for name in RULES]
        for done, future in enumerate(as_completed(futures), 1):
            name, seconds = future.result()
            print(f"bench.warm: [{done}/{len(RULES)}] {name} ready ({', '.join(f'{s:.1f}' for s in seconds)} s) "
                  f"at {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
