"""SGD with momentum, dampening and Nesterov: the rule (its numbers and equations, which the
kernels compile), and the defaults, argument checks and state layout of torch.optim.SGD."""
import weakref
from typing import NamedTuple

import torch

from . import reference
from .optimizer import FusedOptimizer, as_float, reference_states
from .spec import RuleSpec, StateSlot, grad_sign, to_compute


class SgdOptions(NamedTuple):
    momentum: bool


class SgdLaunch(NamedTuple):
    weight_decay: float
    momentum: float
    one_minus_dampening: float
    nesterov: float  # 1 or 0
    grad_sign: float


class SgdBlock(NamedTuple):
    lr: float
    weight_decay: float
    momentum: float
    nesterov: float
    grad_sign: float
    buffer_decay: float  # buf = buffer_decay * buf + grad_share * g
    grad_share: float


def sgd_options(group):
    return SgdOptions(momentum=group["momentum"] != 0)


def sgd_launch_numbers(group, lr_on_device):
    return SgdLaunch(weight_decay=as_float(group["weight_decay"]), momentum=group["momentum"],
                     one_minus_dampening=1 - group["dampening"], nesterov=float(group["nesterov"]),
                     grad_sign=grad_sign(group))


def sgd_block_numbers(lr, step, extra, n, DEVICE_LR, COMPUTE):
    """buf = decay * buf + share * g: mu and 1 - dampening, or 0 and 1 for a buffer that starts
    at this step (the per-tensor integer; the new buffer holds zeros, so that it takes the grad
    exactly)."""
    buffer_decay = to_compute(n.momentum, COMPUTE)
    grad_share = to_compute(n.one_minus_dampening, COMPUTE)
    if extra != 0:
        buffer_decay = to_compute(0.0, COMPUTE)
        grad_share = to_compute(1.0, COMPUTE)
    return SgdBlock(lr=to_compute(lr, COMPUTE), weight_decay=to_compute(n.weight_decay, COMPUTE),
                    momentum=to_compute(n.momentum, COMPUTE), nesterov=to_compute(n.nesterov, COMPUTE),
                    grad_sign=to_compute(n.grad_sign, COMPUTE), buffer_decay=buffer_decay, grad_share=grad_share)


def sgd_update(param, grad, momentum_buffer, b, options):
    """buf = g on the first step, else mu buf + (1 - dampening) g;  d = g + mu buf (Nesterov) or buf;
    p -= lr d  (without momentum: p -= lr g)."""
    grad = grad * b.grad_sign
    if b.weight_decay != 0:
        grad = grad + b.weight_decay * param
    if options.momentum:
        momentum_buffer = b.buffer_decay * momentum_buffer + b.grad_share * grad
        if b.nesterov != 0:
            grad = grad + b.momentum * momentum_buffer
        else:
            grad = momentum_buffer
    param = param - b.lr * grad
    return param, momentum_buffer


SGD_RULE = RuleSpec(
    "sgd", states=(StateSlot("momentum_buffer", signed=True, present_when="momentum"),),
    Options=SgdOptions, options=sgd_options, Launch=SgdLaunch, launch_numbers=sgd_launch_numbers,
    Block=SgdBlock, block_numbers=sgd_block_numbers, update=sgd_update, extra=True)


class SGD(FusedOptimizer):
    r"""Stochastic gradient descent with momentum, drop-in for :class:`torch.optim.SGD`.

    .. math::
        g_t &= \pm\nabla f(\theta_{t-1}) + \lambda\theta_{t-1} \\
        b_t &= g_t \text{ at the first step, else } \mu b_{t-1} + (1-\tau) g_t \\
        g_t &= g_t + \mu b_t \text{ if nesterov else } b_t \quad (\text{when } \mu \ne 0) \\
        \theta_t &= \theta_{t-1} - \gamma g_t

    Args:
        {params}
        lr (float, Tensor, optional): learning rate; a tensor is read by the kernels at every step
            (default: 1e-3)
        momentum (float, optional): momentum factor (default: 0)
        dampening (float, optional): dampening of the momentum (default: 0)
        weight_decay (float, optional): weight decay, added to the gradient (L2 penalty) (default: 0)
        nesterov (bool, optional): Nesterov momentum (default: False)
        {maximize}
        {foreach}
        {differentiable}
        {fused}
        {shared_arguments}

    Sparse gradients go through the reference implementation, as torch's for-loop does.
    State per param (torch's layout): ``momentum_buffer`` when momentum != 0.
    """

    spec = SGD_RULE
    has_step = False

    def __init__(self, params, lr=1e-3, momentum=0, dampening=0, weight_decay=0, nesterov=False, *,
                 maximize=False, foreach=None, differentiable=False, fused=None, **shared):
        if torch.is_tensor(lr) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if momentum < 0.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, maximize=maximize, foreach=foreach, differentiable=differentiable,
                        fused=fused)
        super().__init__(params, defaults, **shared)
        # Momentum buffers allocated for a first step that has not run yet (or was skipped by
        # AMP): they hold no value, and the kernel must start them from the grad.
        self._unstarted_buffers = weakref.WeakValueDictionary()

    def __setstate__(self, state):
        super().__setstate__(state)
        self._unstarted_buffers = weakref.WeakValueDictionary()
        for group in self.param_groups:
            for key, value in (("nesterov", False), ("maximize", False), ("foreach", None),
                               ("differentiable", False), ("fused", False)):
                group.setdefault(key, value)

    def check_grad(self, grad):
        pass  # sparse grads are supported, through the reference

    def check_fused_param(self, param, grad):
        super().check_fused_param(param, grad)
        if grad.is_sparse:
            raise RuntimeError("`_fused_sgd` does not support sparse gradients")

    def init_state(self, param, group):
        pass  # the momentum buffer is created by the first step, from the grad

    def check_state(self, state, group, grad, param):
        pass  # a missing momentum buffer is made at the next step, as in torch

    def prepare_fresh_buffers(self, group, params, states):
        """Give each param without a momentum buffer a new one (negative zeros, so that the
        kernel's uniform buf = 0 * buf + 1 * g takes the grad exactly, its sign of zero included:
        0 * -0 + g is g, where 0 * +0 + -0 would be +0); flag those, and the new ones whose first
        step has not run."""
        if group["momentum"] == 0:
            return [False] * len(params)
        fresh = []
        for param, state in zip(params, states):
            buffer = state.get("momentum_buffer")
            if buffer is None:
                self.new_state(param, group, "momentum_buffer")
                buffer = state["momentum_buffer"]
                if buffer.is_floating_point():
                    buffer.neg_()
                self._unstarted_buffers[id(buffer)] = buffer
            fresh.append(self._unstarted_buffers.get(id(buffer)) is buffer)
        return fresh

    def buffers_started(self, states, skipped):
        """The first step ran on these states' momentum buffers, or (skipped by AMP) it did not:
        then the buffers, never written, leave the state, as in torch."""
        for state in states:
            buffer = state.get("momentum_buffer")
            if self._unstarted_buffers.get(id(buffer)) is buffer:
                del self._unstarted_buffers[id(buffer)]
                if skipped:
                    del state["momentum_buffer"]

    def hyperparameters(self, group):
        return dict(lr=group["lr"], weight_decay=as_float(group["weight_decay"]),
                    momentum=group["momentum"], dampening=group["dampening"], nesterov=group["nesterov"],
                    maximize=group["maximize"])

    def reference_step(self, group, params, grads, targets=None):
        buffers = reference.sgd(params if targets is None else targets, grads,
                                reference_states(self, params, "momentum_buffer"),
                                **self.reference_hyperparameters(group))
        if group["momentum"] != 0:
            for param, buffer, target in zip(params, buffers, params if targets is None else targets):
                state = self.state[param]
                if state.get("momentum_buffer") is not buffer:  # a new buffer (no needless state change)
                    # as torch.optim and the kernels keep it: the step of a bf16 param through fp32
                    # (its master, or a copy rounded back) made it from fp32 values
                    through_fp32 = target is not param and not buffer.is_sparse
                    state["momentum_buffer"] = buffer.to(param.dtype) if through_fp32 else buffer
