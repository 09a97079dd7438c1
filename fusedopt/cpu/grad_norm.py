"""The grad-norm reduction of the numba CPU backend: one parallel pass over the grads of a bucket's
tensor table (the blocks its update walks), each block's sum of |g|^p (its max |g| for the inf
norm) and count of non-finite elements, summed (maxed) per norm group. A kernel of its own: it only
reads the grads.

The grads are unscaled (times 1/scale, in the math dtype) before anything is computed from them,
as GradScaler.unscale_ then clip_grad_norm_ see them. Sums are kept in fp64: a block's partial
sums vectorize (reassociated), and the total is then closer to the exact norm than torch's fp32
per-tensor norms. Like the rule kernels (fusedopt.cpu.kernels), the kernel is cached on disk under
a name carrying a digest of every source file it is made from.
"""
import math

import numpy as np
from numba import njit, prange

from .. import tables
from ..tables import GRAD_ROW, NUMEL_ROW
from . import kernels
from .kernels import KERNEL_OPTIONS, tensor_array, to_compute, widen

# The norm a launch computes: sum g^2, sum |g|, sum |g|^p, or max |g|
TWO_NORM, ONE_NORM, P_NORM, INF_NORM = range(4)
INF = math.inf


def norm_kind(norm_type):
    """The kernel's norm kind for `norm_type` (> 0; the others take torch's norm of norms)."""
    if norm_type == math.inf:
        return INF_NORM
    return {2.0: TWO_NORM, 1.0: ONE_NORM}.get(norm_type, P_NORM)


@njit(inline="always", error_model="numpy")
def block_partial(grad, count, inv_scale, kind, norm_type):
    """(sum of |g|^p, or max |g| for the inf norm, NaN where a grad is NaN; the number of
    non-finite elements) of one block's `count` grads, each times `inv_scale` first. One loop per
    kind, so that each vectorizes; the non-finite grads are counted in a second pass over the
    blocks whose partial is not finite (a sum of squares in fp64 of 16- and 32-bit values is
    finite unless one is: the second pass is rare)."""
    total = 0.0
    if kind == TWO_NORM:
        for index in range(count):
            g = np.float64(widen(grad, index) * inv_scale)
            total += g * g
    elif kind == ONE_NORM:
        for index in range(count):
            total += abs(np.float64(widen(grad, index) * inv_scale))
    elif kind == P_NORM:
        for index in range(count):
            total += abs(np.float64(widen(grad, index) * inv_scale)) ** norm_type
    else:
        nans = 0
        for index in range(count):
            magnitude = abs(np.float64(widen(grad, index) * inv_scale))
            total = magnitude if magnitude > total else total
            nans += magnitude != magnitude
        if nans:  # torch's inf norm of a tensor holding a NaN is NaN
            total = math.nan
    nonfinite = 0
    if not abs(total) < INF:
        for index in range(count):
            nonfinite += not (abs(widen(grad, index) * inv_scale) < INF)  # inf and NaN
    return total, nonfinite


def grad_norm_kernel(table, blocks, block, like, inv_scale, norm_type, kind, block_groups, groups):
    """Per norm group g: out[0, g], the sum over its blocks' partials (their max for the inf norm),
    and out[1, g], its count of non-finite grads. `block_groups` holds each block's norm group
    (empty: one group)."""
    num_blocks = blocks.shape[1]
    partials = np.empty(num_blocks, np.float64)
    counts = np.empty(num_blocks, np.int64)
    scale = to_compute(inv_scale, like)
    for block_index in prange(num_blocks):
        tensor = blocks[0, block_index]
        start = blocks[1, block_index]
        count = min(block, table[NUMEL_ROW, tensor] - start)
        grad = tensor_array(table[GRAD_ROW, tensor] + start * like.itemsize, count, like)
        partials[block_index], counts[block_index] = block_partial(grad, count, scale, kind, norm_type)
    out = np.zeros((2, groups), np.float64)
    for block_index in range(num_blocks):
        group = block_groups[block_index] if block_groups.shape[0] else 0
        partial = partials[block_index]
        if kind == INF_NORM:
            current = out[0, group]
            if current == current and (partial != partial or partial > current):  # a NaN stays
                out[0, group] = partial
        else:
            out[0, group] += partial
        out[1, group] += counts[block_index]
    return out


# fp64 sums reassociated (several partial sums per block, in vector lanes): without it each add
# waits for the last, about 3x slower than reading the grads
NORM_KERNEL_OPTIONS = dict(KERNEL_OPTIONS, fastmath={"reassoc"})


def kernel_name():
    """The kernel's name, which its cache entry carries: a digest of this file, the shared walks'
    (kernels.py: loads, widening) and the table layout's."""
    return f"grad_norm_{kernels.files_digest([__file__, kernels.__file__, tables.__file__])}"


_kernel = None


def grad_norm_kernel_compiled():
    """The reduction kernel, made once (numba compiles it per grad dtype at its first call, or
    loads it from its cache)."""
    global _kernel
    if _kernel is None:
        _kernel = njit(**NORM_KERNEL_OPTIONS)(kernels.with_names(grad_norm_kernel, {}, kernel_name()))
    return _kernel
