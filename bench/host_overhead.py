"""Host-side cost of one step() per tensor, measurable without a GPU: fusedopt's triton path with
the kernel launch itself left out, against the Python work torch.optim does per step.

    python -m bench.host_overhead [--tensors 2000] [--numel 4096] [--steps 200]

The triton path's host work is what bounds a step of many small tensors on a GPU (the kernel is
one launch); torch.optim's `fused=True` pays its `_init_group` loop per step as well. fusedopt's
includes the check that every tensor a cached table names is still the one held (address,
layout). The cases are timed interleaved, round after round and in a shuffled order, so that a
machine that speeds up or slows down during the run, and the state of the caches, affect them
alike; each row is the median over the rounds.
"""
import argparse
import os
import random
import time

os.environ.setdefault("TRITON_INTERPRET", "1")  # only to import the kernels on a CPU-only machine

import torch  # noqa: E402

import fusedopt  # noqa: E402
from fusedopt.kernels import multi_tensor  # noqa: E402


def torch_init_group(params):
    """torch.optim.Adam(fused=True)'s per-step Python work: collecting params, grads and state."""
    optimizer = torch.optim.Adam(params, fused=True)
    optimizer.step()
    group = optimizer.param_groups[0]
    return lambda: optimizer._init_group(group, [], [], [], [], [], [])


def fusedopt_step(params):
    """fusedopt.Adam's step() on the triton path (launches left out by the caller)."""
    optimizer = fusedopt.Adam(params, backend="triton")
    optimizer.step()
    return optimizer.step


def grad_swap(params):
    """Give every param a grad at a new address, as after zero_grad(set_to_none=True)."""
    spare = [torch.empty_like(p) for p in params]

    def swap():
        for index, (p, grad) in enumerate(zip(params, spare)):
            spare[index], p.grad = p.grad, grad
    return swap


def interleaved_medians_us(cases, rounds, seed=0):
    """{name: median µs} of each case's function, timed once per round, in an order shuffled
    every round (what ran just before, and so what is in the caches, averages out)."""
    order = random.Random(seed)
    times = {name: [] for name in cases}
    for _ in range(rounds):
        names = list(cases)
        order.shuffle(names)
        for name in names:
            start = time.perf_counter()
            cases[name]()
            times[name].append(time.perf_counter() - start)
    return {name: sorted(values)[len(values) // 2] * 1e6 for name, values in times.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.host_overhead", description=__doc__.split("\n")[0])
    parser.add_argument("--tensors", type=int, default=2000)
    parser.add_argument("--numel", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=200, help="rounds: each case is timed once per round")
    args = parser.parse_args(argv)
    params = [torch.nn.Parameter(torch.randn(args.numel)) for _ in range(args.tensors)]
    for p in params:
        p.grad = torch.randn_like(p)
    launch = multi_tensor.TensorTable.launch
    multi_tensor.TensorTable.launch = lambda table, kernel, *scalars, **constexprs: None
    try:
        swap, fused_step = grad_swap(params), fusedopt_step(params)

        def swap_and_step():
            swap()
            fused_step()

        medians = interleaved_medians_us({
            "torch": torch_init_group(params), "same grads": fused_step, "swap": swap, "moved grads": swap_and_step,
        }, args.steps)
    finally:
        multi_tensor.TensorTable.launch = launch
    rows = [
        ("torch.optim.Adam(fused=True): _init_group only", medians["torch"]),
        ("fusedopt.Adam triton path, same grads", medians["same grads"]),
        ("fusedopt.Adam triton path, grads at new addresses (swap time taken out)",
         medians["moved grads"] - medians["swap"]),
    ]
    from fusedopt import native

    check = "compiled (python -m fusedopt.native)" if native.table_check_class() else "Python"
    print(f"host time per step, {args.tensors} tensors of {args.numel} elements, median of {args.steps} "
          f"interleaved rounds; table check: {check}")
    print(f"| {'what':<72} | {'us/step':>9} | {'us/tensor':>9} | {'/ torch':>7} |")
    print(f"|{'-' * 74}|{'-' * 11}|{'-' * 11}|{'-' * 9}|")
    for name, us in rows:
        print(f"| {name:<72} | {us:9.0f} | {us / args.tensors:9.3f} | {us / medians['torch']:7.2f} |")


if __name__ == "__main__":
    main()
