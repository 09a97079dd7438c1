"""The gradient-norm reduction: one launch reads every grad of a tensor table once and leaves, per
block, a partial of the norm and a count of non-finite elements, which the caller combines."""
import math

import torch
import triton
import triton.language as tl

from .multi_tensor import load_block, locate_block, tensor_pointer, tl_max, tl_sum

# Norm kinds, a constexpr of the kernel.
TWO_NORM, INF_NORM, P_NORM = 0, 1, 2


def norm_kind(norm_type):
    """The kernel's norm kind for `norm_type`, or None where the kernel has no formula (p <= 0)."""
    if norm_type == math.inf:
        return INF_NORM
    if norm_type == 2:
        return TWO_NORM
    return P_NORM if 0 < norm_type < math.inf else None


@triton.jit
def block_partial(grad, norm_type, NORM: tl.constexpr):
    """(sum |g|^p, or max |g| for the inf norm; number of non-finite elements) of one block."""
    magnitude = tl.abs(grad)
    nonfinite = (grad - grad) != 0  # inf - inf and NaN - NaN are NaN
    if NORM == 0:
        partial = tl_sum(grad * grad)
    elif NORM == 1:
        # tl.max may drop NaN: add the block's NaNs (NaN + x is NaN) so that they reach the norm
        partial = tl_max(magnitude) + tl_sum(tl.where(grad != grad, grad, 0.0))
    else:
        partial = tl_sum(tl.exp2(norm_type * tl.log2(magnitude)))  # |0|^p: exp2(-inf) = 0
    return partial, tl_sum(nonfinite.to(grad.dtype))


@triton.jit(do_not_specialize=["num_tensors", "num_blocks"])
def grad_norm_kernel(
    tensor_table,  # int64 [roles + 2, num_tensors]: sizes, extras, addresses (grads are role 1)
    block_table,  # int64 [2, num_blocks]: owning tensor and first element of each block
    num_tensors, num_blocks,
    partials,  # [2, num_blocks]: each block's partial, then its count of non-finite elements
    grad_scale,  # one-element tensor: grads are multiplied by its reciprocal first (AMP's unscaling)
    norm_type,
    NORM: tl.constexpr,  # TWO_NORM, INF_NORM or P_NORM
    DTYPE: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
):
    tensor, offsets, numel, full, _ = locate_block(tensor_table, block_table, num_tensors, num_blocks, BLOCK,
                                                   ALIGNED)
    grad_ptr = tensor_pointer(tensor_table, num_tensors, tensor, 1, DTYPE, ALIGNED)
    # unscaled before squaring, as unscale_ then clip_grad_norm_ see them (a scaled norm overflows)
    inv_scale = (1.0 / tl.load(grad_scale).to(tl.float64)).to(tl.float32)
    if full:
        grad = load_block(grad_ptr, offsets, numel, True)
        partial, nonfinite = block_partial(grad * inv_scale.to(grad.dtype), norm_type, NORM)
    else:
        grad = load_block(grad_ptr, offsets, numel, False)
        partial, nonfinite = block_partial(grad * inv_scale.to(grad.dtype), norm_type, NORM)
    block = tl.program_id(0)
    tl.store(partials + block, partial)
    tl.store(partials + num_blocks + block, nonfinite)


def grad_norm_partials(table, norm_type, grad_scale=None):
    """One launch over the grads of `table`, divided by `grad_scale` (a one-element tensor on the
    table's device) if given: a [2, num_blocks] tensor (fp32; fp64 for fp64 grads) whose first row
    holds each block's sum of |g|^p (its max |g| for the inf norm) and whose second row counts
    each block's inf and NaN elements."""
    kind = norm_kind(norm_type)
    if kind is None:
        raise ValueError(f"the grad-norm kernel takes norm_type > 0, got {norm_type}")
    dtype = torch.float64 if table.dtype == torch.float64 else torch.float32
    partials = torch.zeros((2, table.num_blocks), dtype=dtype, device=table.device)
    if grad_scale is None:
        grad_scale = table.neutral[1]
    table.launch(grad_norm_kernel, partials, grad_scale, float(norm_type), NORM=kind)
    return partials
