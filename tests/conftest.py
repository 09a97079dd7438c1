"""Test setup: without CUDA, the triton backend runs its kernels on CPU tensors through the
Triton interpreter, which must be switched on before triton is first imported."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Triton 3.9 warns that its FP-fusion default will change; keep today's default, quietly.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

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


def _patch_the_language_once_per_launch():
    """The Triton interpreter re-patches triton.language (every member, by inspect.getmembers) at
    each call of a @triton.jit helper inside a kernel: over half the tests' run time, for nothing,
    since the launch has patched the same module objects already. Inside a launch, skip it."""
    try:
        from triton.runtime import interpreter

        patch_lang, scope_type, grid_call = (interpreter._patch_lang, interpreter._LangPatchScope,
                                             interpreter.GridExecutor.__call__)
    except (ImportError, AttributeError):  # another Triton: leave it as it is
        return
    launch = {"running": False, "patched": False}

    def run_launch(self, *args, **kwargs):
        launch["running"], launch["patched"] = True, False
        try:
            return grid_call(self, *args, **kwargs)
        finally:
            launch["running"], launch["patched"] = False, False

    def patched_once(fn):
        if launch["running"] and launch["patched"]:
            return scope_type()
        launch["patched"] = launch["running"]
        return patch_lang(fn)

    interpreter.GridExecutor.__call__ = run_launch
    interpreter._patch_lang = patched_once


if os.environ.get("TRITON_INTERPRET") == "1":
    _patch_the_language_once_per_launch()
