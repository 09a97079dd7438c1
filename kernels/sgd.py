"""SGD with momentum, dampening and Nesterov: the per-element rule and its kernel."""
import triton
import triton.language as tl

from .multi_tensor import (device_lr, grad_scaling, load_block, load_param, locate_block, scale_grad, store_block,
                           store_param, tensor_extra, tensor_pointer)


@triton.jit
def sgd_update(param, grad, momentum_buffer, fresh_buffer, lr, weight_decay, momentum, one_minus_dampening, nesterov,
               grad_sign, MOMENTUM: tl.constexpr):
    """buf = g on the first step, else mu buf + (1 - dampening) g;  d = g + mu buf (Nesterov) or buf;
    p -= lr d  (without momentum: p -= lr g)."""
    grad = grad * grad_sign
    if weight_decay != 0:
        grad = grad + weight_decay * param
    if MOMENTUM:
        if fresh_buffer:
            momentum_buffer = grad
        else:
            momentum_buffer = momentum * momentum_buffer + one_minus_dampening * grad
        if nesterov:
            grad = grad + momentum * momentum_buffer
        else:
            grad = momentum_buffer
    param = param - lr * grad
    return param, momentum_buffer


@triton.jit
def sgd_block(param_ptr, master_ptr, grad_ptr, momentum_buffer_ptr, fresh_buffer, offsets, numel, lr, weight_decay,
              momentum, one_minus_dampening, nesterov, grad_sign, inv_scale, clip_factor, MOMENTUM: tl.constexpr,
              SCALED_GRADS: tl.constexpr,
              rounding_seed, tensor, group_step, MASTER: tl.constexpr, STOCHASTIC: tl.constexpr, FULL: tl.constexpr):
    param = load_param(param_ptr, master_ptr, offsets, numel, MASTER, FULL)
    grad = scale_grad(load_block(grad_ptr, offsets, numel, FULL), inv_scale, clip_factor, SCALED_GRADS)
    momentum_buffer = grad
    if MOMENTUM:
        if not fresh_buffer:  # a fresh buffer holds no value yet
            momentum_buffer = load_block(momentum_buffer_ptr, offsets, numel, FULL)
    param, momentum_buffer = sgd_update(param, grad, momentum_buffer, fresh_buffer, lr, weight_decay,
                                        momentum, one_minus_dampening, nesterov, grad_sign, MOMENTUM)
    store_param(param_ptr, master_ptr, offsets, numel, param, rounding_seed, tensor, group_step, MASTER, STOCHASTIC,
                FULL)
    if MOMENTUM:
        store_block(momentum_buffer_ptr, offsets, numel, momentum_buffer, FULL)


@triton.jit(do_not_specialize=["num_tensors", "num_blocks"])
def sgd_kernel(
    tensor_table,  # int64 [roles + 2, num_tensors]: sizes, fresh-buffer flags, addresses
    block_table,  # int64 [2, num_blocks]: owning tensor and first element of each block
    num_tensors, num_blocks,
    found_inf, grad_scale, clip_coef,  # one-element tensors, read when SCALED_GRADS
    schedule, group_step, schedule_length,  # the lr schedule's factors (SCHEDULED), the group's step count
    rounding_seed,  # int64 seed of stochastic rounding (STOCHASTIC)
    lr, weight_decay, momentum,
    one_minus_dampening,  # 1 - dampening from the host
    nesterov,  # 1.0 for Nesterov momentum
    grad_sign,  # -1 to maximize
    MOMENTUM: tl.constexpr,  # a momentum buffer is the third role
    FRESH_BUFFERS: tl.constexpr,  # some buffers are new this step: the extra row flags them
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
            master_ptr = tensor_pointer(tensor_table, num_tensors, tensor, 2 + MOMENTUM, tl.float32, ALIGNED)
        momentum_buffer_ptr = grad_ptr
        fresh_buffer = False
        if MOMENTUM:
            momentum_buffer_ptr = tensor_pointer(tensor_table, num_tensors, tensor, 2, DTYPE, ALIGNED)
            if FRESH_BUFFERS:
                fresh_buffer = tensor_extra(tensor_table, num_tensors, tensor) != 0
        if full:
            sgd_block(param_ptr, master_ptr, grad_ptr, momentum_buffer_ptr, fresh_buffer, offsets, numel,
                      lr_now if LR_TENSOR or SCHEDULED else lr, weight_decay, momentum, one_minus_dampening,
                      nesterov, grad_sign, inv_scale, clip_factor, MOMENTUM, SCALED_GRADS,
                      rounding_seed, tensor, group_step, MASTER, STOCHASTIC, True)
        else:
            sgd_block(param_ptr, master_ptr, grad_ptr, momentum_buffer_ptr, fresh_buffer, offsets, numel,
                      lr_now if LR_TENSOR or SCHEDULED else lr, weight_decay, momentum, one_minus_dampening,
                      nesterov, grad_sign, inv_scale, clip_factor, MOMENTUM, SCALED_GRADS,
                      rounding_seed, tensor, group_step, MASTER, STOCHASTIC, False)


def sgd_step(table, *, lr, weight_decay, momentum, dampening, nesterov, maximize, fresh_buffers=False, scaling=None,
             group_step=None, param_rounding="nearest"):
    """One SGD step over a TensorTable whose roles are param, grad [, momentum_buffer when
    momentum != 0]; with fresh_buffers the extra row flags buffers to start from the grad;
    `scaling` (a GradScaling) skips the step or unscales and clips the grads; `lr` may be a
    one-element tensor on the table's device, `group_step` (a GroupStep)
    brings a schedule and a rounding seed; `param_rounding` is "nearest", "stochastic" or "master"."""
    found_inf, grad_scale, clip_coef, scaled = table.scaling_arguments(scaling)
    lr, schedule_arguments, lr_flags = table.lr_arguments(lr, group_step, param_rounding)
    table.launch(
        sgd_kernel,
        found_inf, grad_scale, clip_coef, *schedule_arguments,
        lr, weight_decay, momentum, 1 - dampening, float(nesterov), -1.0 if maximize else 1.0,
        MOMENTUM=momentum != 0, FRESH_BUFFERS=fresh_buffers, SCALED_GRADS=scaled, **lr_flags,
    )
