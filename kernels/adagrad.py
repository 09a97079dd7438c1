"""Adagrad: the per-element update rule and the kernel that applies it to a tensor table."""
import triton
import triton.language as tl

from .multi_tensor import load_block, locate_block, store_block, tensor_extra, tensor_pointer


@triton.jit
def adagrad_update(param, grad, state_sum, clr, weight_decay, eps, grad_sign):
    """sum += g^2;  p -= clr * g / (sqrt(sum) + eps),  clr = lr / (1 + (step - 1) lr_decay)."""
    grad = grad * grad_sign
    if weight_decay != 0:
        grad = grad + weight_decay * param
    state_sum = state_sum + grad * grad
    param = param - clr * (grad / (tl.sqrt(state_sum) + eps))
    return param, state_sum


@triton.jit
def adagrad_block(param_ptr, grad_ptr, state_sum_ptr, offsets, numel, clr, weight_decay, eps, grad_sign,
                  FULL: tl.constexpr):
    param = load_block(param_ptr, offsets, numel, FULL)
    grad = load_block(grad_ptr, offsets, numel, FULL)
    state_sum = load_block(state_sum_ptr, offsets, numel, FULL)
    param, state_sum = adagrad_update(param, grad, state_sum, clr, weight_decay, eps, grad_sign)
    store_block(param_ptr, offsets, numel, param, FULL)
    store_block(state_sum_ptr, offsets, numel, state_sum, FULL)


@triton.jit(do_not_specialize=["num_tensors", "num_blocks", "step"])
def adagrad_kernel(
    tensor_table,  # int64 [roles + 2, num_tensors]: sizes, step offsets, addresses
    block_table,  # int64 [2, num_blocks]: owning tensor and first element of each block
    num_tensors, num_blocks,
    lr, lr_decay, weight_decay, eps,
    grad_sign,  # -1 to maximize
    step,  # the step count of tensors whose step offset is 0
    clr,  # lr / (1 + (step - 1) lr_decay), from the host
    PER_TENSOR_STEP: tl.constexpr,  # some tensors' steps differ: clr from the table
    DTYPE: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
):
    tensor, offsets, numel, full = locate_block(tensor_table, block_table, num_blocks, BLOCK, ALIGNED)
    param_ptr = tensor_pointer(tensor_table, num_tensors, tensor, 0, DTYPE, ALIGNED)
    grad_ptr = tensor_pointer(tensor_table, num_tensors, tensor, 1, DTYPE, ALIGNED)
    state_sum_ptr = tensor_pointer(tensor_table, num_tensors, tensor, 2, DTYPE, ALIGNED)
    if PER_TENSOR_STEP:
        # Lagging tensors get their own decayed lr (scalar math in fp64); the others the host's.
        offset = tensor_extra(tensor_table, num_tensors, tensor)
        own_step = (offset + step).to(tl.float64)
        own_clr = lr / (1 + (own_step - 1) * lr_decay)
        clr = tl.where(offset != 0, own_clr, clr).to(tl.float64 if DTYPE == tl.float64 else tl.float32)
    if full:
        adagrad_block(param_ptr, grad_ptr, state_sum_ptr, offsets, numel, clr, weight_decay, eps, grad_sign, True)
    else:
        adagrad_block(param_ptr, grad_ptr, state_sum_ptr, offsets, numel, clr, weight_decay, eps, grad_sign, False)


def adagrad_step(table, *, step, lr, lr_decay, weight_decay, eps, maximize, per_tensor_step=False):
    """One Adagrad step over a TensorTable whose roles are param, grad, sum."""
    clr = lr / (1 + (step - 1) * lr_decay)
    table.launch(
        adagrad_kernel,
        lr, lr_decay, weight_decay, eps, -1.0 if maximize else 1.0, step, clr,
        PER_TENSOR_STEP=per_tensor_step,
    )
