"""Test setup: without CUDA, the triton backend runs its kernels on CPU tensors through the
Triton interpreter, which must be switched on before triton is first imported."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Triton 3.9 warns that its FP-fusion default will change; keep today's default, quietly.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
if os.environ.get("TRITON_INTERPRET") == "1":
    import interpreter_speedup

    interpreter_speedup.patch_the_language_once_per_launch()

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
BACKENDS = ["torch", "triton"]


def kernels_runnable(device):
    """The triton backend runs on CUDA, or on the CPU under the interpreter."""
    return device == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(params=BACKENDS)
def backend(request, device):
    if request.param == "triton" and not kernels_runnable(device):
        pytest.skip("the triton backend needs CUDA or TRITON_INTERPRET=1 for CPU tensors")
    return request.param
