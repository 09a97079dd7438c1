"""Adam and AdamW: the per-element update rule, its per-block numbers, and its launch."""
import math

import triton
import triton.language as tl

from .multi_tensor import UpdateRule


@triton.jit
def adam_update(param, grad, states, block_scalars, OPTIONS: tl.constexpr):
    """m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2;  p -= lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps)."""
    AMSGRAD: tl.constexpr = OPTIONS[0]
    exp_avg, exp_avg_sq, max_exp_avg_sq = states
    (one_minus_beta1, beta2, one_minus_beta2, eps, coupled_weight_decay, param_scale, grad_sign, step_size,
     bias_correction2_sqrt) = block_scalars
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
    return param, (exp_avg, exp_avg_sq, max_exp_avg_sq)


@triton.jit
def adam_block_scalars(lr, step, extra, scalars, OPTIONS: tl.constexpr, DEVICE_LR: tl.constexpr,
                       COMPUTE: tl.constexpr):
    """The bias corrections lr / (1 - b1^step) and sqrt(1 - b2^step), in fp64 once per block; AdamW's
    1 - lr * wd from the lr read on the device (else the host's)."""
    (one_minus_beta1, beta2, one_minus_beta2, eps, coupled_weight_decay, decoupled_weight_decay, param_scale,
     grad_sign, log2_beta1, log2_beta2) = scalars
    step_size = lr / (1 - tl.exp2(step * log2_beta1))
    bias_correction2_sqrt = tl.sqrt(1 - tl.exp2(step * log2_beta2))
    if DEVICE_LR:
        param_scale = (1 - lr * decoupled_weight_decay).to(COMPUTE)
    return (one_minus_beta1, beta2, one_minus_beta2, eps, coupled_weight_decay, param_scale, grad_sign,
            step_size.to(COMPUTE), bias_correction2_sqrt.to(COMPUTE))


ADAM = UpdateRule(adam_update, adam_block_scalars, ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"), steps=True)


def adam_arguments(*, lr, beta1, beta2, eps, weight_decay, decoupled_weight_decay, amsgrad, maximize,
                   lr_in_memory=False):
    """The update kernel's rule, numbers, flags and present states for Adam/AdamW (1 - beta in
    double on the host; AdamW's 1 - lr * wd too, unless the kernel reads the lr from memory)."""
    scalars = (1 - beta1, beta2, 1 - beta2, eps,
               0.0 if decoupled_weight_decay else weight_decay,
               weight_decay if decoupled_weight_decay else 0.0,
               1 - lr * weight_decay if decoupled_weight_decay and not lr_in_memory else 1.0,
               -1.0 if maximize else 1.0,
               math.log2(beta1) if beta1 > 0 else -math.inf, math.log2(beta2) if beta2 > 0 else -math.inf)
    return dict(rule=ADAM, scalars=scalars, options=(amsgrad,), present=(True, True, amsgrad))


def adam_step(table, steps, *, lr, beta1, beta2, eps, weight_decay, decoupled_weight_decay, amsgrad, maximize,
              **launch):
    """One Adam/AdamW step over a TensorTable whose roles are param, grad, exp_avg, exp_avg_sq
    [, max_exp_avg_sq]; `steps` holds each tensor's step count, already incremented; `launch`
    as TensorTable.step takes it (scaling, group_step, param_rounding)."""
    table.step(lr=lr, steps=steps, **launch,
               **adam_arguments(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                                decoupled_weight_decay=decoupled_weight_decay, amsgrad=amsgrad, maximize=maximize,
                                lr_in_memory=table.lr_in_memory(lr)))
