"""RMSprop: the per-element update rule and the kernel that applies it to a tensor table."""
import triton
import triton.language as tl

from .multi_tensor import (device_lr, grad_scaling, load_block, load_param, locate_block, scale_grad, store_block,
                           store_param, tensor_pointer)


@triton.jit
def rmsprop_update(param, grad, square_avg, momentum_buffer, grad_avg, lr, alpha, one_minus_alpha, eps, weight_decay,
                   momentum, grad_sign, MOMENTUM: tl.constexpr, CENTERED: tl.constexpr):
    """sq = a sq + (1-a) g^2;  avg = sqrt(sq - gavg^2 if centered else sq) + eps;
    buf = mu buf + g / avg, p -= lr buf  (without momentum: p -= lr g / avg)."""
    grad = grad * grad_sign
    if weight_decay != 0:
        grad = grad + weight_decay * param
    square_avg = square_avg * alpha + one_minus_alpha * grad * grad
    if CENTERED:
        grad_avg = grad_avg + one_minus_alpha * (grad - grad_avg)
        avg = tl.sqrt(square_avg - grad_avg * grad_avg) + eps
    else:
        avg = tl.sqrt(square_avg) + eps
    if MOMENTUM:
        momentum_buffer = momentum * momentum_buffer + grad / avg
        param = param - lr * momentum_buffer
    else:
        param = param - lr * (grad / avg)
    return param, square_avg, momentum_buffer, grad_avg


@triton.jit
def rmsprop_block(param_ptr, master_ptr, grad_ptr, square_avg_ptr, momentum_buffer_ptr, grad_avg_ptr, offsets, numel,
                  lr, alpha, one_minus_alpha, eps, weight_decay, momentum, grad_sign, inv_scale, clip_factor,
                  MOMENTUM: tl.constexpr, CENTERED: tl.constexpr, SCALED_GRADS: tl.constexpr,
                  rounding_seed, tensor, group_step, MASTER: tl.constexpr, STOCHASTIC: tl.constexpr,
                  FULL: tl.constexpr):
    param = load_param(param_ptr, master_ptr, offsets, numel, MASTER, FULL)
    grad = scale_grad(load_block(grad_ptr, offsets, numel, FULL), inv_scale, clip_factor, SCALED_GRADS)
    square_avg = load_block(square_avg_ptr, offsets, numel, FULL)
    momentum_buffer = square_avg
    grad_avg = square_avg
    if MOMENTUM:
        momentum_buffer = load_block(momentum_buffer_ptr, offsets, numel, FULL)
    if CENTERED:
        grad_avg = load_block(grad_avg_ptr, offsets, numel, FULL)
    param, square_avg, momentum_buffer, grad_avg = rmsprop_update(
        param, grad, square_avg, momentum_buffer, grad_avg, lr, alpha, one_minus_alpha, eps, weight_decay, momentum,
        grad_sign, MOMENTUM, CENTERED)
    store_param(param_ptr, master_ptr, offsets, numel, param, rounding_seed, tensor, group_step, MASTER, STOCHASTIC,
                FULL)
    store_block(square_avg_ptr, offsets, numel, square_avg, FULL)
    if MOMENTUM:
        store_block(momentum_buffer_ptr, offsets, numel, momentum_buffer, FULL)
    if CENTERED:
        store_block(grad_avg_ptr, offsets, numel, grad_avg, FULL)


@triton.jit(do_not_specialize=["num_tensors", "num_blocks"])
def rmsprop_kernel(
    tensor_table,  # int64 [roles + 2, num_tensors]: sizes, (unused), addresses
    block_table,  # int64 [2, num_blocks]: owning tensor and first element of each block
    num_tensors, num_blocks,
    found_inf, grad_scale, clip_coef,  # one-element tensors, read when SCALED_GRADS
    schedule, group_step, schedule_length,  # the lr schedule's factors (SCHEDULED), the group's step count
    rounding_seed,  # int64 seed of stochastic rounding (STOCHASTIC)
    lr, alpha,
    one_minus_alpha,  # 1 - alpha computed on the host, in double
    eps, weight_decay, momentum,
    grad_sign,  # -1 to maximize
    MOMENTUM: tl.constexpr,  # a momentum buffer is the next role
    CENTERED: tl.constexpr,  # a grad average is the last role
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
        if LR_TENSOR or SCHEDULED:  # read here, so that a captured graph sees the lr change
            lr_now = device_lr(lr, schedule, group_step, schedule_length, LR_TENSOR, SCHEDULED)
            lr_now = lr_now.to(tl.float64 if DTYPE == tl.float64 else tl.float32)
        # (a number lr is passed on as it came: the interpreter would round a copy of it to fp32)
        param_ptr = tensor_pointer(tensor_table, num_tensors, tensor, 0, DTYPE, ALIGNED)
        grad_ptr = tensor_pointer(tensor_table, num_tensors, tensor, 1, DTYPE, ALIGNED)
        master_ptr = param_ptr
        if MASTER:
            master_ptr = tensor_pointer(tensor_table, num_tensors, tensor, 3 + MOMENTUM + CENTERED, tl.float32, ALIGNED)
        square_avg_ptr = tensor_pointer(tensor_table, num_tensors, tensor, 2, DTYPE, ALIGNED)
        momentum_buffer_ptr = square_avg_ptr
        grad_avg_ptr = square_avg_ptr
        if MOMENTUM:
            momentum_buffer_ptr = tensor_pointer(tensor_table, num_tensors, tensor, 3, DTYPE, ALIGNED)
        if CENTERED:
            grad_avg_ptr = tensor_pointer(tensor_table, num_tensors, tensor, 3 + MOMENTUM, DTYPE, ALIGNED)
        if full:
            rmsprop_block(param_ptr, master_ptr, grad_ptr, square_avg_ptr, momentum_buffer_ptr, grad_avg_ptr, offsets,
                          numel, lr_now if LR_TENSOR or SCHEDULED else lr, alpha, one_minus_alpha, eps, weight_decay,
                          momentum, grad_sign, inv_scale, clip_factor, MOMENTUM, CENTERED, SCALED_GRADS,
                          rounding_seed, tensor, group_step, MASTER, STOCHASTIC, True)
        else:
            rmsprop_block(param_ptr, master_ptr, grad_ptr, square_avg_ptr, momentum_buffer_ptr, grad_avg_ptr, offsets,
                          numel, lr_now if LR_TENSOR or SCHEDULED else lr, alpha, one_minus_alpha, eps, weight_decay,
                          momentum, grad_sign, inv_scale, clip_factor, MOMENTUM, CENTERED, SCALED_GRADS,
                          rounding_seed, tensor, group_step, MASTER, STOCHASTIC, False)


def rmsprop_step(table, *, lr, alpha, eps, weight_decay, momentum, centered, maximize, scaling=None, group_step=None,
              param_rounding="nearest"):
    """One RMSprop step over a TensorTable whose roles are param, grad, square_avg
    [, momentum_buffer when momentum > 0] [, grad_avg when centered]; `scaling` (a GradScaling)
    skips the step or unscales and clips the grads; `lr` may be a one-element tensor on the
    table's device, `group_step` (a GroupStep)
    brings a schedule and a rounding seed; `param_rounding` is "nearest", "stochastic" or "master"."""
    found_inf, grad_scale, clip_coef, scaled = table.scaling_arguments(scaling)
    lr, schedule_arguments, lr_flags = table.lr_arguments(lr, group_step, param_rounding)
    table.launch(
        rmsprop_kernel,
        found_inf, grad_scale, clip_coef, *schedule_arguments,
        lr, alpha, 1 - alpha, eps, weight_decay, momentum, -1.0 if maximize else 1.0,
        MOMENTUM=momentum > 0, CENTERED=centered, SCALED_GRADS=scaled, **lr_flags,
    )
