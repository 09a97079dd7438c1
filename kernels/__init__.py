"""fusedopt.kernels: multi-tensor Triton kernels for the optimizer update rules.

They take tensor tables and numbers, and know nothing of optimizer classes or param groups.
"""
from .adagrad import adagrad
from .adam import adam
from .multi_tensor import TensorTable, fits_kernel, launch_count
from .rmsprop import rmsprop
from .sgd import sgd

__all__ = ["TensorTable", "fits_kernel", "launch_count", "adam", "adagrad", "rmsprop", "sgd"]
