"""Test setup: without CUDA, the triton backend runs its kernels on CPU tensors through the
Triton interpreter, which must be switched on before triton is first imported."""
import os

# inductor's compile workers are processes that import torch (seconds each) to compile the
# tests' few small graphs: compile them in the test's own process.
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Triton 3.9 warns that its FP-fusion default will change; keep today's default, quietly.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
if os.environ.get("TRITON_INTERPRET") == "1":
    import interpreter_speedup

    interpreter_speedup.speed_up()

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
BACKENDS = ["torch", "triton"]


def kernels_runnable(device):
    """The triton backend runs on CUDA, or on the CPU under the interpreter."""
    return device == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(params=["python check", "compiled check"])
def table_check(request, monkeypatch):
    """The check that a cached tensor table still describes the tensors: the Python one, or the
    compiled one (fusedopt.native)."""
    from fusedopt import native

    if request.param == "python check":
        monkeypatch.setattr(native, "table_check_class", lambda: None)
        return request.param
    compiled = native.table_check_class()
    if compiled is None:
        try:
            compiled = native.build()
        except RuntimeError as error:
            pytest.skip(str(error))
    monkeypatch.setattr(native, "table_check_class", lambda: compiled)
    return request.param


# The kernels that are fastest for a device's tensors.
DEVICE_KERNELS = {"cpu": "numba", "cuda": "triton"}


def pytest_configure(config):
    config.addinivalue_line("markers", "triton_tables: in a module of host-logic tests, also run on the "
                            "Triton kernels (the test is about their cached tensor tables)")


def pytest_generate_tests(metafunc):
    """`backend` for each test that asks for it: BACKENDS, or the module's own list (a module whose
    tests run each backend beside the rule's oracle sets BESIDE_THE_ORACLE: the reference backend
    of a rule torch.optim has not is then skipped, its oracle being itself). A module
    whose tests are about host logic every kernel backend shares (the API, checkpoints) lists
    "torch" and "kernels": the reference and the kernels fastest on the test's device (numba on
    the CPU, much cheaper than Triton's interpreter); a test there marked `triton_tables` runs on
    the Triton kernels too."""
    if "backend" not in metafunc.fixturenames or _parametrizes(metafunc, "backend"):
        return
    backends = list(getattr(metafunc.module, "BACKENDS", BACKENDS))
    if metafunc.definition.get_closest_marker("triton_tables") and "triton" not in backends:
        backends.append("triton")
    metafunc.parametrize("backend", backends, indirect=True)


def _parametrizes(metafunc, name):
    for mark in metafunc.definition.iter_markers("parametrize"):
        names = mark.args[0]
        if name in ([part.strip() for part in names.split(",")] if isinstance(names, str) else names):
            return True
    return False


@pytest.fixture
def backend(request, device):
    backend = request.param
    if backend == "kernels":
        backend = DEVICE_KERNELS[device]
    elif backend == "triton" and "kernels" in getattr(request.module, "BACKENDS", ()) and device == "cuda":
        pytest.skip("on CUDA tensors the triton backend is this module's `kernels` already")
    if backend == "triton" and not kernels_runnable(device):
        pytest.skip("the triton backend needs CUDA or TRITON_INTERPRET=1 for CPU tensors")
    if getattr(request.module, "BESIDE_THE_ORACLE", False):
        from helpers import rule_of, skip_where_compared_with_itself

        skip_where_compared_with_itself(rule_of(request.node.callspec.params), backend)
    return backend
