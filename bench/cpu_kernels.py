"""The numba CPU kernels against torch's fastest CPU implementation of each rule (fused=True where
torch has it, else foreach; fusedopt's plain-torch reference for a rule torch.optim has not), side by
side on the same buffers, interleaved, medians; and the first step's latency in a new process,
with numba's cache cold and warm.

    python -m bench.cpu_kernels [--quick]
"""
import argparse
import functools
import inspect
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch

import fusedopt
from fusedopt.registry import RULES as REGISTRY

SETS = {"2000 x 4K": [4096] * 2000, "150 x 50K": [50_000] * 150, "1 x 8M": [8_000_000]}


def _fastest(twin):
    """torch's fastest CPU implementation of a rule: fused=True where the class takes it, else foreach."""
    return "fused" if "fused" in inspect.signature(twin).parameters else "foreach"


# Each benchmark variant of the registry: (fusedopt's class, torch's, options, torch's implementation);
# a rule torch.optim has not is timed against fusedopt's plain-torch reference.
RULES = {variant.name: (info.optimizer, info.twin or functools.partial(info.optimizer, backend="torch"),
                        variant.options, _fastest(info.twin) if info.twin else "reference")
         for info in REGISTRY.values() for variant in info.benchmarks}


def optimizers(rule, sizes):
    """(fusedopt on the CPU kernels, torch's fastest) on separate copies of the same params."""
    ours, theirs, options, flavour = RULES[rule]
    generator = torch.Generator().manual_seed(0)
    params = [torch.randn(n, generator=generator) for n in sizes]
    made = []
    for factory, extra in ((ours, {"backend": "numba"}), (theirs, {} if flavour == "reference" else {flavour: True})):
        copies = [p.clone().requires_grad_() for p in params]
        for p in copies:
            p.grad = torch.randn(p.shape, generator=generator) * 1e-3
        made.append(factory(copies, **{"lr": 1e-3, **options, **extra}))
    return made


def median_ms(fn_pairs, repeats):
    times = [[] for _ in fn_pairs]
    for _ in range(repeats):
        for index, fn in enumerate(fn_pairs):  # interleaved: both see the same machine state
            start = time.perf_counter()
            fn()
            times[index].append(time.perf_counter() - start)
    return [statistics.median(t) * 1e3 for t in times]


FIRST_STEP = r"""
import time, torch, fusedopt
p = torch.randn(1000, requires_grad=True); p.grad = torch.randn(1000)
opt = getattr(fusedopt, "{cls}")([p], lr=1e-3, backend="numba")
start = time.perf_counter(); opt.step(); print(time.perf_counter() - start)
"""


def first_step_seconds(cls, cache_dir):
    env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir)
    out = subprocess.run([sys.executable, "-c", FIRST_STEP.format(cls=cls)], env=env, capture_output=True,
                         text=True, check=True)
    return float(out.stdout.split()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (11 instead of 31)")
    parser.add_argument("--rules", default=",".join(RULES))
    args = parser.parse_args(argv)
    repeats = 11 if args.quick else 31
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; fusedopt backend "
          f"{fusedopt.backends.backend_name('numba', 'cpu')}; median of {repeats}, interleaved\n")
    print("| rule | set | fusedopt numba ms | torch ms (impl) | torch / fusedopt |")
    print("|---|---|---|---|---|")
    for rule in args.rules.split(","):
        for name, sizes in SETS.items():
            ours, theirs = optimizers(rule, sizes)
            ours.step(), theirs.step()  # compile, tables, state
            mine, torch_ms = median_ms([ours.step, theirs.step], repeats)
            print(f"| {rule} | {name} | {mine:.3f} | {torch_ms:.3f} ({RULES[rule][3]}) | {torch_ms / mine:.2f}x |",
                  flush=True)
    cache = tempfile.mkdtemp(prefix="fusedopt-numba-cache-")
    try:
        print("\nfirst step in a new process (1,000 fp32 elements; compile or cache load included):")
        for cls in ("Adam", "SGD"):
            cold = first_step_seconds(cls, cache)
            warm = first_step_seconds(cls, cache)
            print(f"- {cls}: cold cache {cold:.2f} s, from the cache {warm:.2f} s")
    finally:
        shutil.rmtree(cache, ignore_errors=True)


if __name__ == "__main__":
    main()
