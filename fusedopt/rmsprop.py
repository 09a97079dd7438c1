"""RMSprop: the rule (its numbers and equations, which the kernels compile), and the defaults,
argument checks and state layout of torch.optim.RMSprop."""
from typing import NamedTuple

import torch

from . import reference
from .optimizer import FusedOptimizer, reference_states
from .spec import RuleSpec, StateSlot, fma, grad_sign, lerp, sqrt, to_compute


class RmspropOptions(NamedTuple):
    momentum: bool
    centered: bool


class RmspropLaunch(NamedTuple):
    alpha: float
    one_minus_alpha: float
    eps: float
    weight_decay: float
    momentum: float
    grad_sign: float


class RmspropBlock(NamedTuple):
    lr: float
    alpha: float
    one_minus_alpha: float
    eps: float
    weight_decay: float
    momentum: float
    grad_sign: float


def rmsprop_options(group):
    return RmspropOptions(momentum=group["momentum"] > 0, centered=bool(group["centered"]))


def rmsprop_launch_numbers(group, lr_on_device):
    return RmspropLaunch(alpha=group["alpha"], one_minus_alpha=1 - group["alpha"], eps=group["eps"],
                         weight_decay=group["weight_decay"], momentum=group["momentum"], grad_sign=grad_sign(group))


def rmsprop_block_numbers(lr, step, extra, n, DEVICE_LR, COMPUTE):
    """The launch's numbers and the lr, in the math dtype."""
    return RmspropBlock(lr=to_compute(lr, COMPUTE), alpha=to_compute(n.alpha, COMPUTE),
                        one_minus_alpha=to_compute(n.one_minus_alpha, COMPUTE), eps=to_compute(n.eps, COMPUTE),
                        weight_decay=to_compute(n.weight_decay, COMPUTE), momentum=to_compute(n.momentum, COMPUTE),
                        grad_sign=to_compute(n.grad_sign, COMPUTE))


def rmsprop_update(param, grad, square_avg, momentum_buffer, grad_avg, b, options):
    """sq = a sq + (1-a) g^2;  avg = sqrt(sq - gavg^2 if centered else sq) + eps;
    buf = mu buf + g / avg, p -= lr buf  (without momentum: p -= lr g / avg)."""
    grad = grad * b.grad_sign
    if b.weight_decay != 0:
        grad = grad + b.weight_decay * param
    square_avg = square_avg * b.alpha + b.one_minus_alpha * grad * grad
    if options.centered:
        grad_avg = lerp(grad_avg, grad, b.one_minus_alpha)
        # one rounding, as torch's addcmul(grad_avg, grad_avg, value=-1) (sq - gavg^2 cancels)
        avg = sqrt(fma(-grad_avg, grad_avg, square_avg)) + b.eps
    else:
        avg = sqrt(square_avg) + b.eps
    if options.momentum:
        momentum_buffer = b.momentum * momentum_buffer + grad / avg
        param = param - b.lr * momentum_buffer
    else:
        param = param - b.lr * (grad / avg)
    return param, square_avg, momentum_buffer, grad_avg


RMSPROP = RuleSpec(
    "rmsprop",
    states=(StateSlot("square_avg", signed=False), StateSlot("momentum_buffer", signed=True, present_when="momentum"),
            StateSlot("grad_avg", signed=True, present_when="centered")),
    Options=RmspropOptions, options=rmsprop_options, Launch=RmspropLaunch, launch_numbers=rmsprop_launch_numbers,
    Block=RmspropBlock, block_numbers=rmsprop_block_numbers, update=rmsprop_update,
    # centered: sqrt(square_avg - grad_avg^2) of two 8-bit codings can take the root of a negative
    uncoded=(("centered", ("square_avg", "grad_avg")),))


class RMSprop(FusedOptimizer):
    r"""RMSprop (Hinton), drop-in for :class:`torch.optim.RMSprop`.

    .. math::
        g_t &= \pm\nabla f(\theta_{t-1}) + \lambda\theta_{t-1}, \quad
        v_t = \alpha v_{t-1} + (1-\alpha) g_t^2 \\
        \bar g_t &= \alpha \bar g_{t-1} + (1-\alpha) g_t, \quad
        d_t = \sqrt{v_t - \bar g_t^2} + \epsilon \text{ if centered else } \sqrt{v_t} + \epsilon \\
        b_t &= \mu b_{t-1} + g_t / d_t, \quad \theta_t = \theta_{t-1} - \gamma b_t
        \quad (\mu = 0:\ \theta_t = \theta_{t-1} - \gamma g_t / d_t)

    Args:
        {params}
        lr (float, Tensor, optional): learning rate; a tensor is read by the kernels at every step
            (default: 1e-2)
        alpha (float, optional): smoothing constant of the average of squared gradients
            (default: 0.99)
        eps (float, optional): added to the denominator for numerical stability (default: 1e-8)
        weight_decay (float, optional): weight decay, added to the gradient (L2 penalty) (default: 0)
        momentum (float, optional): momentum factor (default: 0)
        centered (bool, optional): divide by an estimate of the gradient's variance (the average of
            squares less the squared average) (default: False)
        {capturable}
        {foreach}
        {maximize}
        {differentiable}
        {shared_arguments}

    State per param (torch's layout): ``step``, ``square_avg``, ``momentum_buffer`` when
    momentum > 0, ``grad_avg`` when centered.
    """

    spec = RMSPROP

    def __init__(self, params, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0, momentum=0, centered=False,
                 capturable=False, foreach=None, maximize=False, differentiable=False, **shared):
        if torch.is_tensor(lr) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not 0.0 <= momentum:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if not 0.0 <= alpha:
            raise ValueError(f"Invalid alpha value: {alpha}")
        defaults = dict(lr=lr, momentum=momentum, alpha=alpha, eps=eps, centered=centered,
                        weight_decay=weight_decay, capturable=capturable, foreach=foreach, maximize=maximize,
                        differentiable=differentiable)
        super().__init__(params, defaults, **shared)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in (("momentum", 0), ("centered", False), ("foreach", None), ("maximize", False),
                               ("differentiable", False), ("capturable", False)):
                group.setdefault(key, value)

    def lerped_state_keys(self, group):
        return ("grad_avg",) if group["centered"] else ()

    def hyperparameters(self, group):
        return dict(lr=group["lr"], alpha=group["alpha"], eps=group["eps"],
                    weight_decay=group["weight_decay"], momentum=group["momentum"], centered=group["centered"],
                    maximize=group["maximize"])

    def reference_step(self, group, params, grads, targets=None):
        reference.rmsprop(params if targets is None else targets, grads, reference_states(self, params, "square_avg"),
                          reference_states(self, params, "momentum_buffer"),
                          reference_states(self, params, "grad_avg"), reference_states(self, params, "step"),
                          **self.reference_hyperparameters(group))
