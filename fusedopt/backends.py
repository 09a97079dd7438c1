"""Which implementation updates a param: the Triton kernels, the numba CPU kernels, or the
plain-torch reference.

The constructor's `backend=` wins; without it the FUSEDOPT_BACKEND environment variable decides;
without that, "auto": the Triton kernels for CUDA tensors, the numba kernels for CPU tensors.
"""
import os
import sys

import torch

BACKENDS = ("auto", "triton", "torch", "numba")


def resolve_backend(backend):
    """The constructor argument wins; else FUSEDOPT_BACKEND; else "auto"."""
    if backend is None:
        backend = os.environ.get("FUSEDOPT_BACKEND", "auto") or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"Invalid backend: {backend!r} (expected one of {', '.join(BACKENDS)})")
    return backend


def load_kernels():
    """The Triton kernels (imported on first use: the reference path needs no Triton)."""
    try:
        from . import kernels
    except ImportError as error:
        raise RuntimeError(
            "fusedopt's triton backend needs the `triton` package (pip install triton); "
            "use backend='torch' for the plain PyTorch implementation"
        ) from error
    return kernels


def kernels_run_on_cpu():
    """Whether the kernels can take CPU tensors: they were defined under the Triton interpreter.
    Without CUDA, asking for them on the CPU turns the interpreter on (unless TRITON_INTERPRET
    says otherwise), since compiled kernels could not run there anyway."""
    if "fusedopt.kernels" not in sys.modules and not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    return load_kernels().multi_tensor.INTERPRETED


def cpu_kernels_take(backend, device):
    """Whether, under `backend`, the numba CPU kernels update params on `device`: CPU tensors under
    "auto" and "numba", where numba is installed (else a one-line warning, once, and the
    reference)."""
    if device.type != "cpu" or backend not in ("auto", "numba"):
        return False
    from . import cpu

    return cpu.available()


def table_class(backend, device):
    """The TensorTable of the kernels that update params on `device` under `backend` (where
    runs_on_kernels says kernels do): the numba CPU kernels' (fusedopt.cpu) or the Triton
    kernels'."""
    if cpu_kernels_take(backend, device):
        from .cpu import CpuTensorTable

        return CpuTensorTable
    return load_kernels().TensorTable


def runs_on_kernels(backend, device):
    """Whether, under `backend`, the kernels update a param on `device` (else the reference does):
    the Triton kernels on CUDA, the numba kernels (auto, numba) or the interpreted Triton kernels
    (triton) on the CPU."""
    if backend == "torch":
        return False
    if device.type == "cuda":
        return True
    if backend in ("auto", "numba"):
        return cpu_kernels_take(backend, device)
    if not kernels_run_on_cpu():
        raise RuntimeError(
            "backend='triton' runs CPU tensors only through the Triton interpreter, which must be on "
            "(TRITON_INTERPRET=1) when fusedopt.kernels is first imported; these params are on the CPU"
        )
    return True


def backend_name(backend, device):
    """What updates plain params on `device` under `backend`: "triton", "numba" or "torch" (for
    reports)."""
    device = torch.device(device)
    if cpu_kernels_take(backend, device):
        return "numba"
    return "triton" if runs_on_kernels(backend, device) else "torch"
