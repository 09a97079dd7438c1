"""Host-side cost of one step() per tensor, measurable without a GPU: fusedopt's triton path with
the kernel launch itself left out, against the Python work torch.optim does per step.

    python -m bench.host_overhead [--tensors 2000] [--numel 4096] [--steps 200]

The triton path's host work is what bounds a step of many small tensors on a GPU (the kernel is
one launch); torch.optim's `fused=True` pays its `_init_group` loop per step as well.
"""
import argparse
import os
import time

os.environ.setdefault("TRITON_INTERPRET", "1")  # only to import the kernels on a CPU-only machine

import torch  # noqa: E402

import fusedopt  # noqa: E402
from fusedopt.kernels import multi_tensor  # noqa: E402


def median_us(function, steps):
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2] * 1e6


def torch_init_group_us(params, steps):
    """torch.optim.Adam(fused=True)'s per-step Python work: collecting params, grads and state."""
    optimizer = torch.optim.Adam(params, fused=True)
    optimizer.step()
    group = optimizer.param_groups[0]

    def init_group():
        optimizer._init_group(group, [], [], [], [], [], [])

    return median_us(init_group, steps)


def fusedopt_host_us(params, steps, reallocate_grads):
    """fusedopt.Adam's step() on the triton path, with the kernel launch replaced by nothing."""
    optimizer = fusedopt.Adam(params, backend="triton")
    launch = multi_tensor.TensorTable.launch
    multi_tensor.TensorTable.launch = lambda table, kernel, *scalars, **constexprs: None
    try:
        optimizer.step()
        spare = [torch.empty_like(p) for p in params] if reallocate_grads else None

        def step():
            if spare is not None:  # new grad storage every step, as after zero_grad(set_to_none=True)
                for p, grad in zip(params, spare):
                    spare_grad, p.grad = p.grad, grad
                    grad.copy_(spare_grad)
            optimizer.step()

        return median_us(step, steps)
    finally:
        multi_tensor.TensorTable.launch = launch


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.host_overhead", description=__doc__.split("\n")[0])
    parser.add_argument("--tensors", type=int, default=2000)
    parser.add_argument("--numel", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args(argv)
    params = [torch.nn.Parameter(torch.randn(args.numel)) for _ in range(args.tensors)]
    for p in params:
        p.grad = torch.randn_like(p)
    rows = [
        ("torch.optim.Adam(fused=True): _init_group only", torch_init_group_us(params, args.steps)),
        ("fusedopt.Adam triton path, same grads", fusedopt_host_us(params, args.steps, False)),
        ("fusedopt.Adam triton path, grads re-allocated (incl. the swap)", fusedopt_host_us(params, args.steps, True)),
    ]
    print(f"host time per step, {args.tensors} tensors of {args.numel} elements, median of {args.steps} steps")
    print(f"| {'what':<64} | {'us/step':>9} | {'us/tensor':>9} |")
    print(f"|{'-' * 66}|{'-' * 11}|{'-' * 11}|")
    for name, us in rows:
        print(f"| {name:<64} | {us:9.0f} | {us / args.tensors:9.3f} |")


if __name__ == "__main__":
    main()
