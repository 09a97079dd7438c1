"""fusedopt.kernels: the Triton backend. One multi-tensor update kernel, which compiles each rule's
equations (fusedopt.spec) for a whole tensor table per launch, and the grad-norm reduction.

They take tensor tables, rule specs and numbers, and know nothing of optimizer classes or param
groups.
"""
from .grad_norm import grad_norm_partials, norm_kind
from .multi_tensor import GroupStep, TensorTable, launch_count

__all__ = ["TensorTable", "GroupStep", "launch_count", "grad_norm_partials", "norm_kind"]
