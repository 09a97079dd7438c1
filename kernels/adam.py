"""Adam and AdamW: the per-element update rule and the kernel that applies it to a tensor table."""
import math

import triton
import triton.language as tl

from .multi_tensor import (device_lr, grad_scaling, load_block, load_param, locate_block, scale_grad, store_block,
                           store_param, tensor_pointer, tensor_step)


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
def adam_block(param_ptr, master_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, max_exp_avg_sq_ptr, offsets, numel,
               one_minus_beta1, beta2, one_minus_beta2, eps, coupled_weight_decay, param_scale, grad_sign,
               step_size, bias_correction2_sqrt, inv_scale, clip_factor,
               AMSGRAD: tl.constexpr, SCALED_GRADS: tl.constexpr,
               rounding_seed, tensor, group_step, MASTER: tl.constexpr, STOCHASTIC: tl.constexpr, FULL: tl.constexpr):
    param = load_param(param_ptr, master_ptr, offsets, numel, MASTER, FULL)
    grad = scale_grad(load_block(grad_ptr, offsets, numel, FULL), inv_scale, clip_factor, SCALED_GRADS)
    exp_avg = load_block(exp_avg_ptr, offsets, numel, FULL)
    exp_avg_sq = load_block(exp_avg_sq_ptr, offsets, numel, FULL)
    max_exp_avg_sq = exp_avg_sq
    if AMSGRAD:
        max_exp_avg_sq = load_block(max_exp_avg_sq_ptr, offsets, numel, FULL)
    param, exp_avg, exp_avg_sq, max_exp_avg_sq = adam_update(
        param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, one_minus_beta1, beta2, one_minus_beta2, eps,
        coupled_weight_decay, param_scale, grad_sign, step_size, bias_correction2_sqrt, AMSGRAD)
    store_param(param_ptr, master_ptr, offsets, numel, param, rounding_seed, tensor, group_step, MASTER, STOCHASTIC,
                FULL)
    store_block(exp_avg_ptr, offsets, numel, exp_avg, FULL)
    store_block(exp_avg_sq_ptr, offsets, numel, exp_avg_sq, FULL)
    if AMSGRAD:
        store_block(max_exp_avg_sq_ptr, offsets, numel, max_exp_avg_sq, FULL)


@triton.jit
def adam_bias_corrections(step, lr, log2_beta1, log2_beta2):
    """lr / (1 - b1^step) and sqrt(1 - b2^step), in fp64 (scalar math, once per block)."""
    step_size = lr / (1 - tl.exp2(step * log2_beta1))
    bias_correction2_sqrt = tl.sqrt(1 - tl.exp2(step * log2_beta2))
    return step_size, bias_correction2_sqrt


@triton.jit(do_not_specialize=["num_tensors", "num_blocks"])
def adam_kernel(
    tensor_table,  # int64 [roles + 2, num_tensors]: sizes, (unused), addresses
    block_table,  # int64 [2, num_blocks]: owning tensor and first element of each block
    num_tensors, num_blocks,
    steps,  # [num_tensors] step counts, already incremented for this step
    found_inf, grad_scale, clip_coef,  # one-element tensors, read when SCALED_GRADS
    schedule, group_step, schedule_length,  # the lr schedule's factors (SCHEDULED), the group's step count
    rounding_seed,  # int64 seed of stochastic rounding (STOCHASTIC)
    lr, one_minus_beta1, beta2, one_minus_beta2, eps,  # 1 - beta computed on the host, in double
    coupled_weight_decay,  # Adam's L2 penalty added to the grad (0 for AdamW)
    decoupled_weight_decay,  # AdamW's weight decay (0 for Adam)
    param_scale,  # AdamW's 1 - lr * weight_decay from the host (1 for Adam) for a number lr
    grad_sign,  # -1 to maximize
    log2_beta1, log2_beta2,  # for the bias corrections
    AMSGRAD: tl.constexpr,
    SCALED_GRADS: tl.constexpr,  # skip on found_inf; grads unscaled and clipped in registers
    LR_TENSOR: tl.constexpr,  # lr points at a one-element tensor
    SCHEDULED: tl.constexpr,  # the lr is multiplied by the schedule's factor at this step
    STOCHASTIC: tl.constexpr,  # bf16 params are rounded stochastically
    MASTER: tl.constexpr,  # an fp32 master copy of the param is the last role
    DTYPE: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
):
    tensor, offsets, numel, full = locate_block(tensor_table, block_table, num_blocks, BLOCK, ALIGNED)
    skip, inv_scale, clip_factor = False, 1.0, 1.0
    if SCALED_GRADS:
        skip, inv_scale, clip_factor = grad_scaling(found_inf, grad_scale, clip_coef)
    if not skip:
        compute_dtype: tl.constexpr = tl.float64 if DTYPE == tl.float64 else tl.float32
        param_ptr = tensor_pointer(tensor_table, num_tensors, tensor, 0, DTYPE, ALIGNED)
        grad_ptr = tensor_pointer(tensor_table, num_tensors, tensor, 1, DTYPE, ALIGNED)
        master_ptr = param_ptr
        if MASTER:
            master_ptr = tensor_pointer(tensor_table, num_tensors, tensor, 4 + AMSGRAD, tl.float32, ALIGNED)
        exp_avg_ptr = tensor_pointer(tensor_table, num_tensors, tensor, 2, DTYPE, ALIGNED)
        exp_avg_sq_ptr = tensor_pointer(tensor_table, num_tensors, tensor, 3, DTYPE, ALIGNED)
        max_exp_avg_sq_ptr = exp_avg_sq_ptr
        if AMSGRAD:
            max_exp_avg_sq_ptr = tensor_pointer(tensor_table, num_tensors, tensor, 4, DTYPE, ALIGNED)
        step = tensor_step(steps, tensor)
        if LR_TENSOR or SCHEDULED:  # read here, so that a captured graph sees the lr change
            lr_now = device_lr(lr, schedule, group_step, schedule_length, LR_TENSOR, SCHEDULED)
            step_size, bias_correction2_sqrt = adam_bias_corrections(step, lr_now, log2_beta1, log2_beta2)
            device_param_scale = (1 - lr_now * decoupled_weight_decay).to(compute_dtype)
        else:
            step_size, bias_correction2_sqrt = adam_bias_corrections(step, lr, log2_beta1, log2_beta2)
        step_size = step_size.to(compute_dtype)
        bias_correction2_sqrt = bias_correction2_sqrt.to(compute_dtype)
        # (numbers are passed on as they came: the interpreter would round a copy of one to fp32)
        if full:
            adam_block(param_ptr, master_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, max_exp_avg_sq_ptr, offsets, numel,
                       one_minus_beta1, beta2, one_minus_beta2, eps, coupled_weight_decay,
                       device_param_scale if LR_TENSOR or SCHEDULED else param_scale, grad_sign,
                       step_size, bias_correction2_sqrt, inv_scale, clip_factor, AMSGRAD, SCALED_GRADS,
                       rounding_seed, tensor, group_step, MASTER, STOCHASTIC, True)
        else:
            adam_block(param_ptr, master_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, max_exp_avg_sq_ptr, offsets, numel,
                       one_minus_beta1, beta2, one_minus_beta2, eps, coupled_weight_decay,
                       device_param_scale if LR_TENSOR or SCHEDULED else param_scale, grad_sign,
                       step_size, bias_correction2_sqrt, inv_scale, clip_factor, AMSGRAD, SCALED_GRADS,
                       rounding_seed, tensor, group_step, MASTER, STOCHASTIC, False)


def adam_step(table, steps, *, lr, beta1, beta2, eps, weight_decay, decoupled_weight_decay, amsgrad, maximize,
              scaling=None, group_step=None,
              param_rounding="nearest"):
    """One Adam/AdamW step over a TensorTable whose roles are param, grad, exp_avg, exp_avg_sq
    [, max_exp_avg_sq]. `steps` holds each tensor's step count, already incremented; `scaling`
    (a GradScaling) skips the step or unscales and clips the grads; `lr` may be a one-element
    tensor on the table's device, read by the kernel, `group_step` (a GroupStep)
    brings a schedule and a rounding seed; `param_rounding` is "nearest", "stochastic" or "master"."""
    found_inf, grad_scale, clip_coef, scaled = table.scaling_arguments(scaling)
    lr, schedule_arguments, lr_flags = table.lr_arguments(lr, group_step, param_rounding)
    table.launch(
        adam_kernel,
        steps, found_inf, grad_scale, clip_coef, *schedule_arguments,
        lr, 1 - beta1, beta2, 1 - beta2, eps,
        0.0 if decoupled_weight_decay else weight_decay,
        weight_decay if decoupled_weight_decay else 0.0,
        1 - lr * weight_decay if decoupled_weight_decay and not lr_flags["LR_TENSOR"] else 1.0,
        -1.0 if maximize else 1.0,
        math.log2(beta1) if beta1 > 0 else -math.inf, math.log2(beta2) if beta2 > 0 else -math.inf,
        AMSGRAD=amsgrad, SCALED_GRADS=scaled, **lr_flags,
    )
