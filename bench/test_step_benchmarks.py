"""Per-case micro-benchmarks of one optimizer step, for comparing commits with pytest-benchmark.

    python -m pytest bench --benchmark-json=before.json      # on one commit
    python -m pytest bench --benchmark-json=after.json       # on another
    pytest-benchmark compare before.json after.json --group-by=group

Each round is one ``step()`` followed by a device synchronisation. Environment knobs:
FUSEDOPT_BENCH_DEVICE (``cpu``, ``cuda`` or ``cpu,cuda``; default every device present),
FUSEDOPT_BENCH_SIZE (a ``--size`` value; default tiny on CPU, medium on CUDA),
FUSEDOPT_BENCH_ROUNDS (default 20). Without a --benchmark-json (or -save, -autosave, -enable)
each case runs once at a tiny size (bench/conftest.py). ``python -m bench step`` is the full
benchmark.
"""

import functools
import os

import pytest
import torch

pytest.importorskip("pytest_benchmark")

from bench import cases  # noqa: E402
from bench.env import synchronize  # noqa: E402

_devices = os.environ.get("FUSEDOPT_BENCH_DEVICE")
DEVICES = _devices.split(",") if _devices else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
SETS = ("gpt2", "many-small")
IMPLS = cases.IMPLS[:4]  # all but torch.compile
ROUNDS = int(os.environ.get("FUSEDOPT_BENCH_ROUNDS", "20"))


@functools.lru_cache(maxsize=2)
def _tensors(set_name, device, timed):
    size = os.environ.get("FUSEDOPT_BENCH_SIZE") or (("medium" if device == "cuda" else "tiny") if timed else "0.0002")
    pset = cases.param_sets(cases.resolve_size(size, torch.device(device), quick=False)[1])[set_name]
    return pset, pset.make(torch.device(device))


@pytest.fixture(autouse=True)
def one_thread_unless_timed(benchmark):
    """A check that every case runs needs no second thread (beside other work, idle OpenMP
    threads spinning for a descheduled peer slow a tiny step a hundredfold)."""
    threads = torch.get_num_threads()
    if benchmark.disabled:
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("rule", list(cases.RULES))
@pytest.mark.parametrize("set_name", SETS)
@pytest.mark.parametrize("device", DEVICES)
def test_step(benchmark, device, set_name, rule, impl):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    dev = torch.device(device)
    pset, (values, grads) = _tensors(set_name, device, not benchmark.disabled)
    try:
        step = cases.build(impl, cases.RULES[rule], cases.attach(values, grads))[1]
        step()  # state creation and any JIT compilation stay out of the rounds
    except cases.Unsupported as exc:
        pytest.skip(str(exc))
    except RuntimeError as exc:
        if impl == "torch-fused":  # torch checks fused device/dtype support at the first step
            pytest.skip(f"torch fused: {exc}")
        raise

    def one_step():
        step()
        synchronize(dev)

    benchmark.group = f"{device} {set_name} {rule}"
    benchmark.extra_info.update(
        impl=cases.fusedopt_info("auto", dev)["impl_label"] if impl == "fusedopt" else impl, n_params=pset.n_params, n_tensors=len(pset.shapes), dtype=str(pset.dtype),
        bytes_per_step=cases.RULES[rule].bytes_per_param(pset.dtype) * pset.n_params,
        device_name=torch.cuda.get_device_name(dev) if device == "cuda" else "cpu",
        torch=torch.__version__)
    benchmark.pedantic(one_step, warmup_rounds=3, rounds=ROUNDS, iterations=1)
