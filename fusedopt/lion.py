"""Lion (EvoLved Sign Momentum): the rule (its numbers and equations, which the kernels compile),
and its defaults, argument checks and state layout. torch.optim has no Lion: the float64
reference (fusedopt.reference.lion) is its oracle."""
from typing import NamedTuple

from . import reference
from .adam import check_moments_arguments
from .optimizer import FusedOptimizer, as_float, reference_states
from .spec import NoOptions, RuleSpec, StateSlot, grad_sign, lerp, sign, to_compute


class LionLaunch(NamedTuple):
    one_minus_beta1: float
    one_minus_beta2: float
    weight_decay: float
    param_scale: float  # 1 - lr * wd from the host's lr (1 where the kernel reads the lr)
    grad_sign: float


class LionBlock(NamedTuple):
    lr: float
    one_minus_beta1: float
    one_minus_beta2: float
    param_scale: float
    grad_sign: float


def lion_options(group):
    return NoOptions()


def lion_launch_numbers(group, lr_on_device):
    beta1, beta2 = map(as_float, group["betas"])
    weight_decay = group["weight_decay"]
    return LionLaunch(one_minus_beta1=1 - beta1, one_minus_beta2=1 - beta2, weight_decay=weight_decay,
                      param_scale=1.0 if lr_on_device else 1 - group["lr"] * weight_decay, grad_sign=grad_sign(group))


def lion_block_numbers(lr, step, extra, n, DEVICE_LR, COMPUTE):
    """The decoupled 1 - lr * wd from the lr read on the device (else the host's)."""
    param_scale = to_compute(n.param_scale, COMPUTE)
    if DEVICE_LR:
        param_scale = to_compute(1 - lr * n.weight_decay, COMPUTE)
    return LionBlock(lr=to_compute(lr, COMPUTE), one_minus_beta1=to_compute(n.one_minus_beta1, COMPUTE),
                     one_minus_beta2=to_compute(n.one_minus_beta2, COMPUTE), param_scale=param_scale,
                     grad_sign=to_compute(n.grad_sign, COMPUTE))


def lion_update(param, grad, exp_avg, b, options):
    """c = b1 m + (1 - b1) g;  p = p (1 - lr wd) - lr sign(c);  m = b2 m + (1 - b2) g."""
    grad = grad * b.grad_sign
    if b.param_scale != 1:
        param = param * b.param_scale
    param = param - b.lr * sign(lerp(exp_avg, grad, b.one_minus_beta1))
    exp_avg = lerp(exp_avg, grad, b.one_minus_beta2)
    return param, exp_avg


LION = RuleSpec(
    "lion", states=(StateSlot("exp_avg", signed=True),),
    Options=NoOptions, options=lion_options, Launch=LionLaunch, launch_numbers=lion_launch_numbers,
    Block=LionBlock, block_numbers=lion_block_numbers, update=lion_update)


class Lion(FusedOptimizer):
    r"""Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"): the sign of an
    interpolation of momentum and gradient, with decoupled weight decay; one fused kernel per
    bucket.

    .. math::
        g_t &= \pm\nabla f(\theta_{t-1}), \quad c_t = \beta_1 m_{t-1} + (1-\beta_1) g_t \\
        \theta_t &= \theta_{t-1}(1 - \gamma\lambda) - \gamma\,\mathrm{sign}(c_t) \\
        m_t &= \beta_2 m_{t-1} + (1-\beta_2) g_t

    Args:
        {params}
        lr (float, Tensor, optional): learning rate, 3-10x smaller than AdamW's in the paper; a
            tensor is read by the kernels at every step (default: 1e-4)
        betas (tuple[float, float], optional): the interpolation of momentum and gradient whose sign
            is the update, and the momentum's own average (default: (0.9, 0.99))
        weight_decay (float, optional): decoupled weight decay, 3-10x larger than AdamW's for the
            same effect (default: 0)
        {maximize}
        {foreach}
        {differentiable}
        {shared_arguments}

    State per param: ``exp_avg`` (no step count).
    """

    spec = LION
    has_step = False

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, *, maximize=False, foreach=None,
                 differentiable=False, **shared):
        check_moments_arguments(lr, betas, None, weight_decay)
        defaults = dict(lr=lr, betas=betas, weight_decay=weight_decay, maximize=maximize, foreach=foreach,
                        differentiable=differentiable)
        super().__init__(params, defaults, **shared)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in (("maximize", False), ("foreach", None), ("differentiable", False)):
                group.setdefault(key, value)

    def lerped_state_keys(self, group):
        return ("exp_avg",)

    def coupled_weight_decay(self, group):
        return 0  # the param decays itself

    def hyperparameters(self, group):
        beta1, beta2 = group["betas"]
        return dict(lr=group["lr"], beta1=as_float(beta1), beta2=as_float(beta2), weight_decay=group["weight_decay"],
                    maximize=group["maximize"])

    def reference_step(self, group, params, grads, targets=None):
        reference.lion(params if targets is None else targets, grads, reference_states(self, params, "exp_avg"),
                       **self.reference_hyperparameters(group))
