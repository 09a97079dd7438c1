"""RAdam (rectified Adam): the per-element update rule, its per-block numbers, and its launch."""
import math

import triton
import triton.language as tl

from .multi_tensor import UpdateRule


@triton.jit
def radam_update(param, grad, states, block_scalars, OPTIONS: tl.constexpr):
    """m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2;  p -= step_size * m / (sqrt(v) + eps) where the
    variance is tractable (rho_t > 5), else p -= step_size * m."""
    exp_avg, exp_avg_sq = states
    (one_minus_beta1, beta2, one_minus_beta2, eps, coupled_weight_decay, param_scale, grad_sign, step_size,
     rectified) = block_scalars
    grad = grad * grad_sign
    if coupled_weight_decay != 0:
        grad = grad + coupled_weight_decay * param
    if param_scale != 1:  # decoupled weight decay: p *= 1 - lr * wd
        param = param * param_scale
    exp_avg = exp_avg + one_minus_beta1 * (grad - exp_avg)
    exp_avg_sq = exp_avg_sq * beta2 + one_minus_beta2 * grad * grad
    if rectified:
        param = param - step_size * (exp_avg / (tl.sqrt(exp_avg_sq) + eps))
    else:
        param = param - step_size * exp_avg
    return param, (exp_avg, exp_avg_sq)


@triton.jit
def radam_block_scalars(lr, step, extra, scalars, OPTIONS: tl.constexpr, DEVICE_LR: tl.constexpr,
                        COMPUTE: tl.constexpr):
    """In fp64 once per block: the length of the approximated SMA, rho_t = rho_inf - 2 t b2^t /
    (1 - b2^t), and the step size lr / (1 - b1^t), times the rectification r_t sqrt(1 - b2^t)
    where rho_t > 5; the decoupled 1 - lr * wd from the lr read on the device (else the host's)."""
    (one_minus_beta1, beta2, one_minus_beta2, eps, coupled_weight_decay, decoupled_weight_decay, param_scale,
     grad_sign, log2_beta1, log2_beta2, rho_inf) = scalars
    beta2_power = tl.exp2(step * log2_beta2)
    bias_correction2 = 1 - beta2_power
    rho_t = rho_inf - 2 * step * beta2_power / bias_correction2
    rectified = rho_t > 5
    # (only where rectified: elsewhere the square root's argument may be negative)
    rect = tl.sqrt(tl.maximum((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t), 0.0))
    step_size = lr / (1 - tl.exp2(step * log2_beta1))
    step_size = tl.where(rectified, step_size * rect * tl.sqrt(bias_correction2), step_size)
    if DEVICE_LR:
        param_scale = (1 - lr * decoupled_weight_decay).to(COMPUTE)
    return (one_minus_beta1, beta2, one_minus_beta2, eps, coupled_weight_decay, param_scale, grad_sign,
            step_size.to(COMPUTE), rectified)


RADAM = UpdateRule(radam_update, radam_block_scalars, ("exp_avg", "exp_avg_sq"), steps=True)


def radam_arguments(*, lr, beta1, beta2, eps, weight_decay, decoupled_weight_decay, maximize, lr_in_memory=False):
    """The update kernel's rule, numbers, flags and present states for RAdam (1 - beta, rho_inf
    and the decoupled 1 - lr * wd in double on the host)."""
    scalars = (1 - beta1, beta2, 1 - beta2, eps,
               0.0 if decoupled_weight_decay else weight_decay,
               weight_decay if decoupled_weight_decay else 0.0,
               1 - lr * weight_decay if decoupled_weight_decay and not lr_in_memory else 1.0,
               -1.0 if maximize else 1.0,
               math.log2(beta1) if beta1 > 0 else -math.inf, math.log2(beta2) if beta2 > 0 else -math.inf,
               2 / (1 - beta2) - 1)
    return dict(rule=RADAM, scalars=scalars, options=(), present=(True, True))


def radam_step(table, steps, *, lr, beta1, beta2, eps, weight_decay, decoupled_weight_decay, maximize, **launch):
    """One RAdam step over a TensorTable whose roles are param, grad, exp_avg, exp_avg_sq; `steps`
    holds each tensor's step count, already incremented; `launch` as TensorTable.step takes it."""
    table.step(lr=lr, steps=steps, **launch,
               **radam_arguments(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                                 decoupled_weight_decay=decoupled_weight_decay, maximize=maximize,
                                 lr_in_memory=table.lr_in_memory(lr)))
