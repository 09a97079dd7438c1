"""fusedopt.kernels: multi-tensor Triton kernels for the optimizer update rules.

They take tensor tables and numbers, and know nothing of optimizer classes or param groups.
"""
from .adagrad import adagrad_step
from .adam import adam_step
from .grad_norm import grad_norm_partials, norm_kind
from .multi_tensor import GroupStep, TensorTable, fits_kernel, launch_count
from .radam import radam_step
from .rmsprop import rmsprop_step
from .sgd import sgd_step

__all__ = ["TensorTable", "GroupStep", "fits_kernel", "launch_count", "adam_step", "adagrad_step",
           "radam_step", "rmsprop_step", "sgd_step", "grad_norm_partials", "norm_kind"]
