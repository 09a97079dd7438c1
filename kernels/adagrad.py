"""Adagrad: the per-element update rule, its per-block numbers, and its launch."""
import triton
import triton.language as tl

from .multi_tensor import UpdateRule


@triton.jit
def adagrad_update(param, grad, states, block_scalars, OPTIONS: tl.constexpr):
    """sum += g^2;  p -= clr * g / (sqrt(sum) + eps),  clr = lr / (1 + (step - 1) lr_decay)."""
    (state_sum,) = states
    clr, weight_decay, eps, grad_sign = block_scalars
    grad = grad * grad_sign
    if weight_decay != 0:
        grad = grad + weight_decay * param
    state_sum = state_sum + grad * grad
    param = param - clr * (grad / (tl.sqrt(state_sum) + eps))
    return param, (state_sum,)


@triton.jit
def adagrad_block_scalars(lr, step, extra, scalars, OPTIONS: tl.constexpr, DEVICE_LR: tl.constexpr,
                          COMPUTE: tl.constexpr):
    """The decayed lr, lr / (1 + (step - 1) lr_decay), in fp64 once per block."""
    lr_decay, weight_decay, eps, grad_sign = scalars
    clr = lr / (1 + (step - 1) * lr_decay)
    return clr.to(COMPUTE), weight_decay, eps, grad_sign


ADAGRAD = UpdateRule(adagrad_update, adagrad_block_scalars, ("sum",), steps=True)


def adagrad_arguments(*, lr_decay, weight_decay, eps, maximize):
    """The update kernel's rule, numbers, flags and present states for Adagrad."""
    return dict(rule=ADAGRAD, scalars=(lr_decay, weight_decay, eps, -1.0 if maximize else 1.0), options=(),
                present=(True,))


def adagrad_step(table, steps, *, lr, lr_decay, weight_decay, eps, maximize, **launch):
    """One Adagrad step over a TensorTable whose roles are param, grad, sum; `steps` holds each
    tensor's step count, already incremented; `launch` as TensorTable.step takes it."""
    table.step(lr=lr, steps=steps, **launch,
               **adagrad_arguments(lr_decay=lr_decay, weight_decay=weight_decay, eps=eps, maximize=maximize))
