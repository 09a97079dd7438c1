"""Adagrad: the per-element update rule and the kernel that applies it to a tensor table."""
import triton
import triton.language as tl

from .multi_tensor import (device_lr, grad_scaling, load_block, load_param, locate_block, scale_grad, store_block,
                           store_param, tensor_pointer, tensor_step)


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
def adagrad_block(param_ptr, master_ptr, grad_ptr, state_sum_ptr, offsets, numel, clr, weight_decay, eps, grad_sign,
                  inv_scale, clip_factor, SCALED_GRADS: tl.constexpr,
                  rounding_seed, tensor, group_step, MASTER: tl.constexpr, STOCHASTIC: tl.constexpr,
                  FULL: tl.constexpr):
    param = load_param(param_ptr, master_ptr, offsets, numel, MASTER, FULL)
    grad = scale_grad(load_block(grad_ptr, offsets, numel, FULL), inv_scale, clip_factor, SCALED_GRADS)
    state_sum = load_block(state_sum_ptr, offsets, numel, FULL)
    param, state_sum = adagrad_update(param, grad, state_sum, clr, weight_decay, eps, grad_sign)
    store_param(param_ptr, master_ptr, offsets, numel, param, rounding_seed, tensor, group_step, MASTER, STOCHASTIC,
                FULL)
    store_block(state_sum_ptr, offsets, numel, state_sum, FULL)


@triton.jit(do_not_specialize=["num_tensors", "num_blocks"])
def adagrad_kernel(
    tensor_table,  # int64 [roles + 2, num_tensors]: sizes, (unused), addresses
    block_table,  # int64 [2, num_blocks]: owning tensor and first element of each block
    num_tensors, num_blocks,
    steps,  # [num_tensors] step counts, already incremented for this step
    found_inf, grad_scale, clip_coef,  # one-element tensors, read when SCALED_GRADS
    schedule, group_step, schedule_length,  # the lr schedule's factors (SCHEDULED), the group's step count
    rounding_seed,  # int64 seed of stochastic rounding (STOCHASTIC)
    lr, lr_decay, weight_decay, eps,
    grad_sign,  # -1 to maximize
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
        param_ptr = tensor_pointer(tensor_table, num_tensors, tensor, 0, DTYPE, ALIGNED)
        grad_ptr = tensor_pointer(tensor_table, num_tensors, tensor, 1, DTYPE, ALIGNED)
        master_ptr = param_ptr
        if MASTER:
            master_ptr = tensor_pointer(tensor_table, num_tensors, tensor, 3, tl.float32, ALIGNED)
        state_sum_ptr = tensor_pointer(tensor_table, num_tensors, tensor, 2, DTYPE, ALIGNED)
        # the decayed lr, lr / (1 + (step - 1) lr_decay), in fp64 once per block; a tensor lr and a
        # schedule are read here, so that a captured graph sees the lr change
        decay = 1 + (tensor_step(steps, tensor) - 1) * lr_decay
        if LR_TENSOR or SCHEDULED:
            clr = device_lr(lr, schedule, group_step, schedule_length, LR_TENSOR, SCHEDULED) / decay
        else:
            clr = lr / decay
        clr = clr.to(tl.float64 if DTYPE == tl.float64 else tl.float32)
        if full:
            adagrad_block(param_ptr, master_ptr, grad_ptr, state_sum_ptr, offsets, numel, clr, weight_decay, eps,
                          grad_sign, inv_scale, clip_factor, SCALED_GRADS, rounding_seed, tensor, group_step, MASTER,
                          STOCHASTIC, True)
        else:
            adagrad_block(param_ptr, master_ptr, grad_ptr, state_sum_ptr, offsets, numel, clr, weight_decay, eps,
                          grad_sign, inv_scale, clip_factor, SCALED_GRADS, rounding_seed, tensor, group_step, MASTER,
                          STOCHASTIC, False)


def adagrad_step(table, steps, *, lr, lr_decay, weight_decay, eps, maximize, scaling=None, group_step=None,
              param_rounding="nearest"):
    """One Adagrad step over a TensorTable whose roles are param, grad, sum; `steps` holds each
    tensor's step count, already incremented; `scaling` (a GradScaling) skips, unscales, clips;
    `lr` may be a one-element tensor on the table's device, `group_step` (a GroupStep) brings a
    schedule and a rounding seed; `param_rounding` is "nearest", "stochastic" or "master"."""
    found_inf, grad_scale, clip_coef, scaled = table.scaling_arguments(scaling)
    lr, schedule_arguments, lr_flags = table.lr_arguments(lr, group_step, param_rounding)
    table.launch(
        adagrad_kernel,
        steps, found_inf, grad_scale, clip_coef, *schedule_arguments,
        lr, lr_decay, weight_decay, eps, -1.0 if maximize else 1.0,
        SCALED_GRADS=scaled, **lr_flags,
    )
