"""Adagrad: the rule (its numbers and equations, which the kernels compile), and the defaults,
argument checks and state layout of torch.optim.Adagrad."""
import functools
import inspect
from typing import NamedTuple

import torch

from . import reference
from .optimizer import FusedOptimizer, reference_states, scalar_step_tensor, torch_fused_check
from .spec import NoOptions, RuleSpec, StateSlot, grad_sign, sqrt, to_compute


class AdagradLaunch(NamedTuple):
    lr_decay: float
    weight_decay: float
    eps: float
    grad_sign: float


class AdagradBlock(NamedTuple):
    decayed_lr: float  # lr / (1 + (step - 1) lr_decay)
    weight_decay: float
    eps: float
    grad_sign: float


def adagrad_options(group):
    return NoOptions()


def adagrad_launch_numbers(group, lr_on_device):
    return AdagradLaunch(lr_decay=group["lr_decay"], weight_decay=group["weight_decay"], eps=group["eps"],
                         grad_sign=grad_sign(group))


def adagrad_block_numbers(lr, step, extra, n, DEVICE_LR, COMPUTE):
    """The decayed lr, in fp64 once per block."""
    return AdagradBlock(decayed_lr=to_compute(lr / (1 + (step - 1) * n.lr_decay), COMPUTE),
                        weight_decay=to_compute(n.weight_decay, COMPUTE), eps=to_compute(n.eps, COMPUTE),
                        grad_sign=to_compute(n.grad_sign, COMPUTE))


def adagrad_update(param, grad, sum, b, options):
    """sum += g^2;  p -= clr * g / (sqrt(sum) + eps)."""
    grad = grad * b.grad_sign
    if b.weight_decay != 0:
        grad = grad + b.weight_decay * param
    sum = sum + grad * grad
    param = param - b.decayed_lr * (grad / (sqrt(sum) + b.eps))
    return param, sum


@functools.cache
def torch_fused_adagrad_refuses_cuda():
    """Whether the installed torch.optim.Adagrad refuses CUDA params under fused=True: torch 2.11's
    fused Adagrad runs on the CPU alone, and its step checks each param with cuda_unsupported=True."""
    try:
        return "cuda_unsupported=True" in inspect.getsource(torch.optim.Adagrad._init_group)
    except (OSError, TypeError):  # torch's source is not at hand: the newer torch, which takes them
        return False


ADAGRAD = RuleSpec(
    "adagrad", states=(StateSlot("sum", signed=False),),
    Options=NoOptions, options=adagrad_options, Launch=AdagradLaunch, launch_numbers=adagrad_launch_numbers,
    Block=AdagradBlock, block_numbers=adagrad_block_numbers, update=adagrad_update, steps=True)


class Adagrad(FusedOptimizer):
    r"""Adagrad (Duchi et al.), drop-in for :class:`torch.optim.Adagrad`.

    .. math::
        g_t &= \pm\nabla f(\theta_{t-1}) + \lambda\theta_{t-1}, \quad
        \tilde\gamma = \gamma / (1 + (t-1)\eta) \\
        s_t &= s_{t-1} + g_t^2, \quad
        \theta_t = \theta_{t-1} - \tilde\gamma\, g_t / (\sqrt{s_t} + \epsilon)

    Args:
        {params}
        lr (float, Tensor, optional): learning rate; a tensor is read by the kernels at every step
            (default: 1e-2)
        lr_decay (float, optional): learning rate decay (default: 0)
        weight_decay (float, optional): weight decay, added to the gradient (L2 penalty) (default: 0)
        initial_accumulator_value (float, optional): initial value of the sums of squared gradients
            (default: 0)
        eps (float, optional): added to the denominator for numerical stability (default: 1e-10)
        {foreach}
        {maximize}
        {differentiable}
        {fused}
        {shared_arguments}

    Sparse gradients go through the reference implementation, as in torch. State per param
    (torch's layout, created at construction as torch does): ``step`` and ``sum`` (filled with
    initial_accumulator_value).
    """

    spec = ADAGRAD

    def __init__(self, params, lr=1e-2, lr_decay=0, weight_decay=0, initial_accumulator_value=0, eps=1e-10,
                 foreach=None, *, maximize=False, differentiable=False, fused=None, **shared):
        if torch.is_tensor(lr) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= lr_decay:
            raise ValueError(f"Invalid lr_decay value: {lr_decay}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if not 0.0 <= initial_accumulator_value:
            raise ValueError(f"Invalid initial_accumulator_value value: {initial_accumulator_value}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        defaults = dict(lr=lr, lr_decay=lr_decay, eps=eps, weight_decay=weight_decay,
                        initial_accumulator_value=initial_accumulator_value, foreach=foreach, maximize=maximize,
                        differentiable=differentiable, fused=fused)
        super().__init__(params, defaults, **shared)
        for group in self.param_groups:
            for param in group["params"]:
                self.init_state(param, group)
                self._prepare_master(param)  # with the state, so that a state_dict() names it (DCP's template)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in (("foreach", None), ("maximize", False), ("differentiable", False), ("fused", None)):
                group.setdefault(key, value)

    def check_grad(self, grad):
        pass  # sparse grads are supported, through the reference

    def check_fused_param(self, param, grad):
        torch_fused_check(param, cuda_unsupported=torch_fused_adagrad_refuses_cuda())
        if grad.is_sparse:
            raise RuntimeError("`fused` does not support sparse grad or complex param")

    def init_state(self, param, group):
        self.state[param]["step"] = scalar_step_tensor()
        self.new_state(param, group, "sum", fill=group["initial_accumulator_value"])

    def hyperparameters(self, group):
        return dict(lr=group["lr"], lr_decay=group["lr_decay"], weight_decay=group["weight_decay"],
                    eps=group["eps"], maximize=group["maximize"])

    def reference_step(self, group, params, grads, targets=None):
        reference.adagrad(params if targets is None else targets, grads, reference_states(self, params, "sum"),
                          reference_states(self, params, "step"), **self.reference_hyperparameters(group))
