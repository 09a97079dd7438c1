"""Which implementation updates a param: the Triton kernels, or the plain-torch reference.

The constructor's `backend=` wins; without it the FUSEDOPT_BACKEND environment variable decides;
without that, "auto".
"""
import os
import sys

import torch

BACKENDS = ("auto", "triton", "torch")


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


def runs_on_kernels(backend, device):
    """Whether, under `backend`, the kernels update a param on `device` (else the reference does)."""
    if backend == "torch":
        return False
    if device.type == "cuda":
        return True
    if backend == "auto":
        return False
    if not kernels_run_on_cpu():
        raise RuntimeError(
            "backend='triton' runs CPU tensors only through the Triton interpreter, which must be on "
            "(TRITON_INTERPRET=1) when fusedopt.kernels is first imported; these params are on the CPU"
        )
    return True


def backend_name(backend, device):
    """What updates plain params on `device` under `backend`: "triton" or "torch" (for reports)."""
    return "triton" if runs_on_kernels(backend, torch.device(device)) else "torch"
