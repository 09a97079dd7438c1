"""RMSprop: the per-element update rule, its per-block numbers, and its launch."""
import triton
import triton.language as tl

from .multi_tensor import UpdateRule


@triton.jit
def rmsprop_update(param, grad, states, block_scalars, OPTIONS: tl.constexpr):
    """sq = a sq + (1-a) g^2;  avg = sqrt(sq - gavg^2 if centered else sq) + eps;
    buf = mu buf + g / avg, p -= lr buf  (without momentum: p -= lr g / avg)."""
    MOMENTUM: tl.constexpr = OPTIONS[0]
    CENTERED: tl.constexpr = OPTIONS[1]
    square_avg, momentum_buffer, grad_avg = states
    lr, alpha, one_minus_alpha, eps, weight_decay, momentum, grad_sign = block_scalars
    grad = grad * grad_sign
    if weight_decay != 0:
        grad = grad + weight_decay * param
    square_avg = square_avg * alpha + one_minus_alpha * grad * grad
    if CENTERED:
        if one_minus_alpha < 0.5:  # torch's lerp, from the nearer end: gavg = g exactly at alpha = 0
            grad_avg = grad_avg + one_minus_alpha * (grad - grad_avg)
        else:
            grad_avg = grad + (one_minus_alpha - 1) * (grad - grad_avg)
        # one rounding, as torch's addcmul(grad_avg, grad_avg, value=-1) (sq - gavg^2 cancels): for
        # fp32 math in fp64, where gavg^2 is exact and so is a difference that cancels, so that it
        # holds whatever a Triton makes of fma (Triton 3.6's interpreter rounds the product)
        if square_avg.dtype == tl.float64:
            variance = tl.fma(-grad_avg, grad_avg, square_avg)
        else:
            wide = grad_avg.to(tl.float64)
            variance = (square_avg.to(tl.float64) - wide * wide).to(tl.float32)
        avg = tl.sqrt(variance) + eps
    else:
        avg = tl.sqrt(square_avg) + eps
    if MOMENTUM:
        momentum_buffer = momentum * momentum_buffer + grad / avg
        param = param - lr * momentum_buffer
    else:
        param = param - lr * (grad / avg)
    return param, (square_avg, momentum_buffer, grad_avg)


@triton.jit
def rmsprop_block_scalars(lr, step, extra, scalars, OPTIONS: tl.constexpr, DEVICE_LR: tl.constexpr,
                          COMPUTE: tl.constexpr):
    """The lr (read on the device: in the math dtype) and the launch's numbers."""
    alpha, one_minus_alpha, eps, weight_decay, momentum, grad_sign = scalars
    if DEVICE_LR:
        lr = lr.to(COMPUTE)
    return lr, alpha, one_minus_alpha, eps, weight_decay, momentum, grad_sign


RMSPROP = UpdateRule(rmsprop_update, rmsprop_block_scalars, ("square_avg", "momentum_buffer", "grad_avg"))


def rmsprop_arguments(*, alpha, eps, weight_decay, momentum, centered, maximize):
    """The update kernel's rule, numbers, flags and present states for RMSprop."""
    scalars = (alpha, 1 - alpha, eps, weight_decay, momentum, -1.0 if maximize else 1.0)
    return dict(rule=RMSPROP, scalars=scalars, options=(momentum > 0, centered), present=(True, momentum > 0, centered))


def rmsprop_step(table, *, lr, alpha, eps, weight_decay, momentum, centered, maximize, **launch):
    """One RMSprop step over a TensorTable whose roles are param, grad, square_avg
    [, momentum_buffer when momentum > 0] [, grad_avg when centered]; `launch` as TensorTable.step
    takes it (steps, which the update does not read, scaling, group_step, param_rounding)."""
    table.step(lr=lr, **launch,
               **rmsprop_arguments(alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum,
                                   centered=centered, maximize=maximize))
