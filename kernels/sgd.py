"""SGD with momentum, dampening and Nesterov: the per-element rule, its per-block numbers, and its
launch."""
import triton
import triton.language as tl

from .multi_tensor import UpdateRule


@triton.jit
def sgd_update(param, grad, states, block_scalars, OPTIONS: tl.constexpr):
    """buf = g on the first step, else mu buf + (1 - dampening) g;  d = g + mu buf (Nesterov) or buf;
    p -= lr d  (without momentum: p -= lr g)."""
    MOMENTUM: tl.constexpr = OPTIONS[0]
    (momentum_buffer,) = states
    lr, weight_decay, momentum, one_minus_dampening, nesterov, grad_sign, buffer_decay, grad_share = block_scalars
    grad = grad * grad_sign
    if weight_decay != 0:
        grad = grad + weight_decay * param
    if MOMENTUM:
        momentum_buffer = buffer_decay * momentum_buffer + grad_share * grad
        if nesterov:
            grad = grad + momentum * momentum_buffer
        else:
            grad = momentum_buffer
    param = param - lr * grad
    return param, (momentum_buffer,)


@triton.jit
def sgd_block_scalars(lr, step, extra, scalars, OPTIONS: tl.constexpr, DEVICE_LR: tl.constexpr,
                      COMPUTE: tl.constexpr):
    """The lr (read on the device: in the math dtype), and buf = decay * buf + share * g: mu and
    1 - dampening, or 0 and 1 for a buffer that starts at this step (the per-tensor integer; the
    new buffer holds zeros, so that it takes the grad exactly)."""
    weight_decay, momentum, one_minus_dampening, nesterov, grad_sign = scalars
    if DEVICE_LR:
        lr = lr.to(COMPUTE)
    buffer_decay, grad_share = momentum, one_minus_dampening
    if extra != 0:
        buffer_decay, grad_share = 0.0, 1.0
    return lr, weight_decay, momentum, one_minus_dampening, nesterov, grad_sign, buffer_decay, grad_share


SGD = UpdateRule(sgd_update, sgd_block_scalars, ("momentum_buffer",))
# The per-tensor integer flags the momentum buffers that start from the grad at this step.
SGD_FRESH_BUFFERS = SGD._replace(extra=True)


def sgd_arguments(*, weight_decay, momentum, dampening, nesterov, maximize, fresh_buffers=False):
    """The update kernel's rule, numbers, flags and present states for SGD."""
    scalars = (weight_decay, momentum, 1 - dampening, float(nesterov), -1.0 if maximize else 1.0)
    return dict(rule=SGD_FRESH_BUFFERS if fresh_buffers else SGD, scalars=scalars, options=(momentum != 0,),
                present=(momentum != 0,))


def sgd_step(table, *, lr, weight_decay, momentum, dampening, nesterov, maximize, fresh_buffers=False, **launch):
    """One SGD step over a TensorTable whose roles are param, grad [, momentum_buffer when
    momentum != 0]; with fresh_buffers the extra row flags buffers to start from the grad;
    `launch` as TensorTable.step takes it (scaling, group_step, param_rounding)."""
    table.step(lr=lr, **launch,
               **sgd_arguments(weight_decay=weight_decay, momentum=momentum, dampening=dampening, nesterov=nesterov,
                               maximize=maximize, fresh_buffers=fresh_buffers))
