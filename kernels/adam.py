"""Adam and AdamW: the per-element update rule and the kernel that applies it to a tensor table."""
import math

import triton
import triton.language as tl

from .multi_tensor import load_block, locate_block, store_block, tensor_extra, tensor_pointer


@triton.jit
def adam_update(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, one_minus_beta1, beta2, one_minus_beta2, eps,
                coupled_weight_decay, param_scale, grad_sign, step_size, bias_correction2_sqrt,
                AMSGRAD: tl.constexpr):
    """m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2;  p -= lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps)."""
    grad = grad * grad_sign
    if coupled_weight_decay != 0:
        grad = grad + coupled_weight_decay * param
    if param_scale != 1:  # AdamW: p *= 1 - lr * wd
        param = param * param_scale
    exp_avg = exp_avg + one_minus_beta1 * (grad - exp_avg)
    exp_avg_sq = exp_avg_sq * beta2 + one_minus_beta2 * grad * grad
    if AMSGRAD:
        max_exp_avg_sq = tl.maximum(max_exp_avg_sq, exp_avg_sq, propagate_nan=tl.PropagateNan.ALL)
        denom = tl.sqrt(max_exp_avg_sq) / bias_correction2_sqrt + eps
    else:
        denom = tl.sqrt(exp_avg_sq) / bias_correction2_sqrt + eps
    param = param - step_size * (exp_avg / denom)
    return param, exp_avg, exp_avg_sq, max_exp_avg_sq


@triton.jit
def adam_block(param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, max_exp_avg_sq_ptr, offsets, numel,
               one_minus_beta1, beta2, one_minus_beta2, eps, coupled_weight_decay, param_scale, grad_sign,
               step_size, bias_correction2_sqrt, AMSGRAD: tl.constexpr, FULL: tl.constexpr):
    param = load_block(param_ptr, offsets, numel, FULL)
    grad = load_block(grad_ptr, offsets, numel, FULL)
    exp_avg = load_block(exp_avg_ptr, offsets, numel, FULL)
    exp_avg_sq = load_block(exp_avg_sq_ptr, offsets, numel, FULL)
    max_exp_avg_sq = exp_avg_sq
    if AMSGRAD:
        max_exp_avg_sq = load_block(max_exp_avg_sq_ptr, offsets, numel, FULL)
    param, exp_avg, exp_avg_sq, max_exp_avg_sq = adam_update(
        param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, one_minus_beta1, beta2, one_minus_beta2, eps,
        coupled_weight_decay, param_scale, grad_sign, step_size, bias_correction2_sqrt, AMSGRAD)
    store_block(param_ptr, offsets, numel, param, FULL)
    store_block(exp_avg_ptr, offsets, numel, exp_avg, FULL)
    store_block(exp_avg_sq_ptr, offsets, numel, exp_avg_sq, FULL)
    if AMSGRAD:
        store_block(max_exp_avg_sq_ptr, offsets, numel, max_exp_avg_sq, FULL)


@triton.jit(do_not_specialize=["num_tensors", "num_blocks", "step"])
def adam_kernel(
    tensor_table,  # int64 [roles + 2, num_tensors]: sizes, step offsets, addresses
    block_table,  # int64 [2, num_blocks]: owning tensor and first element of each block
    num_tensors, num_blocks,
    lr, one_minus_beta1, beta2, one_minus_beta2, eps,  # 1 - beta computed on the host, in double
    coupled_weight_decay,  # Adam's L2 penalty added to the grad (0 for AdamW)
    param_scale,  # AdamW's 1 - lr * weight_decay (1 for Adam)
    grad_sign,  # -1 to maximize
    step,  # the step count of tensors whose step offset is 0
    step_size, bias_correction2_sqrt,  # lr / (1 - b1^step) and sqrt(1 - b2^step), from the host
    log2_beta1, log2_beta2,  # for the bias corrections of tensors whose step differs
    AMSGRAD: tl.constexpr,
    PER_TENSOR_STEP: tl.constexpr,  # some tensors' steps differ: the extra row holds the offsets
    DTYPE: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
):
    tensor, offsets, numel, full = locate_block(tensor_table, block_table, num_blocks, BLOCK, ALIGNED)
    param_ptr = tensor_pointer(tensor_table, num_tensors, tensor, 0, DTYPE, ALIGNED)
    grad_ptr = tensor_pointer(tensor_table, num_tensors, tensor, 1, DTYPE, ALIGNED)
    exp_avg_ptr = tensor_pointer(tensor_table, num_tensors, tensor, 2, DTYPE, ALIGNED)
    exp_avg_sq_ptr = tensor_pointer(tensor_table, num_tensors, tensor, 3, DTYPE, ALIGNED)
    max_exp_avg_sq_ptr = exp_avg_sq_ptr
    if AMSGRAD:
        max_exp_avg_sq_ptr = tensor_pointer(tensor_table, num_tensors, tensor, 4, DTYPE, ALIGNED)
    if PER_TENSOR_STEP:
        # Lagging tensors get their own bias corrections (scalar math in fp64, once per block);
        # the others keep the host's.
        offset = tensor_extra(tensor_table, num_tensors, tensor)
        own_step = (offset + step).to(tl.float64)
        own_step_size = lr / (1 - tl.exp2(own_step * log2_beta1))
        own_bias_correction2_sqrt = tl.sqrt(1 - tl.exp2(own_step * log2_beta2))
        step_size = tl.where(offset != 0, own_step_size, step_size).to(tl.float64 if DTYPE == tl.float64 else tl.float32)
        bias_correction2_sqrt = tl.where(offset != 0, own_bias_correction2_sqrt,
                                         bias_correction2_sqrt).to(tl.float64 if DTYPE == tl.float64 else tl.float32)
    if full:
        adam_block(param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, max_exp_avg_sq_ptr, offsets, numel,
                   one_minus_beta1, beta2, one_minus_beta2, eps, coupled_weight_decay, param_scale, grad_sign,
                   step_size, bias_correction2_sqrt, AMSGRAD, True)
    else:
        adam_block(param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, max_exp_avg_sq_ptr, offsets, numel,
                   one_minus_beta1, beta2, one_minus_beta2, eps, coupled_weight_decay, param_scale, grad_sign,
                   step_size, bias_correction2_sqrt, AMSGRAD, False)


def adam_step(table, *, step, lr, beta1, beta2, eps, weight_decay, decoupled_weight_decay, amsgrad, maximize,
              per_tensor_step=False):
    """One Adam/AdamW step over a TensorTable whose roles are param, grad, exp_avg, exp_avg_sq
    [, max_exp_avg_sq]. `step` is the new step count; with per_tensor_step the table's extra row
    holds each tensor's offset from it."""
    table.launch(
        adam_kernel,
        lr, 1 - beta1, beta2, 1 - beta2, eps,
        0.0 if decoupled_weight_decay else weight_decay,
        1 - lr * weight_decay if decoupled_weight_decay else 1.0,
        -1.0 if maximize else 1.0,
        step, lr / (1 - beta1**step), math.sqrt(1 - beta2**step),
        math.log2(beta1) if beta1 > 0 else -math.inf, math.log2(beta2) if beta2 > 0 else -math.inf,
        AMSGRAD=amsgrad, PER_TENSOR_STEP=per_tensor_step,
    )
