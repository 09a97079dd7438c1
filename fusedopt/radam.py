"""RAdam: the rule (its numbers and equations, which the kernels compile), and the defaults,
argument checks and state layout of torch.optim.RAdam."""
from typing import NamedTuple

from . import reference
from .adam import adam_launch_numbers, check_moments_arguments
from .optimizer import FusedOptimizer, as_float, reference_states
from .spec import NoOptions, RuleSpec, StateSlot, exp2, lerp, maximum, sqrt, to_compute


class RadamLaunch(NamedTuple):
    """RAdam's numbers for one launch: Adam's (fusedopt.adam.AdamLaunch), and rho_inf, in double
    on the host."""

    one_minus_beta1: float
    beta2: float
    one_minus_beta2: float
    eps: float
    coupled_weight_decay: float
    decoupled_weight_decay: float
    param_scale: float  # 1 - lr * wd from the host's lr (1 where the kernel reads the lr)
    grad_sign: float
    log2_beta1: float
    log2_beta2: float
    rho_inf: float  # the length of the approximated SMA's limit, 2 / (1 - beta2) - 1


class RadamBlock(NamedTuple):
    one_minus_beta1: float
    beta2: float
    one_minus_beta2: float
    eps: float
    coupled_weight_decay: float
    param_scale: float
    grad_sign: float
    step_size: float
    rectified: bool  # whether the variance is tractable (rho_t > 5)


def radam_options(group):
    return NoOptions()


def radam_launch_numbers(group, lr_on_device):
    """Adam's numbers (by name), and rho_inf."""
    return RadamLaunch(**adam_launch_numbers(group, lr_on_device)._asdict(),
                       rho_inf=2 / (1 - as_float(group["betas"][1])) - 1)


def radam_block_numbers(lr, step, extra, n, DEVICE_LR, COMPUTE):
    """In fp64 once per block: the length of the approximated SMA, rho_t = rho_inf - 2 t b2^t /
    (1 - b2^t), and the step size lr / (1 - b1^t), times the rectification r_t sqrt(1 - b2^t)
    where rho_t > 5; the decoupled 1 - lr * wd from the lr read on the device (else the host's)."""
    beta2_power = exp2(step * n.log2_beta2)
    bias_correction2 = 1 - beta2_power
    rho_t = n.rho_inf - 2 * step * beta2_power / bias_correction2
    rectified = rho_t > 5
    # clamped: where not rectified, the square root's argument may be negative (and is not used)
    rect = sqrt(maximum((rho_t - 4) * (rho_t - 2) * n.rho_inf / ((n.rho_inf - 4) * (n.rho_inf - 2) * rho_t), 0.0))
    step_size = lr / (1 - exp2(step * n.log2_beta1))
    if rectified:
        step_size = step_size * rect * sqrt(bias_correction2)
    param_scale = to_compute(n.param_scale, COMPUTE)
    if DEVICE_LR:
        param_scale = to_compute(1 - lr * n.decoupled_weight_decay, COMPUTE)
    return RadamBlock(
        one_minus_beta1=to_compute(n.one_minus_beta1, COMPUTE), beta2=to_compute(n.beta2, COMPUTE),
        one_minus_beta2=to_compute(n.one_minus_beta2, COMPUTE), eps=to_compute(n.eps, COMPUTE),
        coupled_weight_decay=to_compute(n.coupled_weight_decay, COMPUTE), param_scale=param_scale,
        grad_sign=to_compute(n.grad_sign, COMPUTE), step_size=to_compute(step_size, COMPUTE), rectified=rectified)


def radam_update(param, grad, exp_avg, exp_avg_sq, b, options):
    """m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2;  p -= step_size * m / (sqrt(v) + eps) where the
    variance is tractable (rho_t > 5), else p -= step_size * m."""
    grad = grad * b.grad_sign
    if b.coupled_weight_decay != 0:
        grad = grad + b.coupled_weight_decay * param
    if b.param_scale != 1:  # decoupled weight decay: p *= 1 - lr * wd
        param = param * b.param_scale
    exp_avg = lerp(exp_avg, grad, b.one_minus_beta1)
    exp_avg_sq = exp_avg_sq * b.beta2 + b.one_minus_beta2 * grad * grad
    if b.rectified:
        param = param - b.step_size * (exp_avg / (sqrt(exp_avg_sq) + b.eps))
    else:
        param = param - b.step_size * exp_avg
    return param, exp_avg, exp_avg_sq


RADAM = RuleSpec(
    "radam", states=(StateSlot("exp_avg", signed=True), StateSlot("exp_avg_sq", signed=False)),
    Options=NoOptions, options=radam_options, Launch=RadamLaunch, launch_numbers=radam_launch_numbers,
    Block=RadamBlock, block_numbers=radam_block_numbers, update=radam_update, steps=True)


class RAdam(FusedOptimizer):
    r"""RAdam (Liu et al., "On the Variance of the Adaptive Learning Rate and Beyond"), drop-in for
    :class:`torch.optim.RAdam`, one fused kernel per bucket: Adam whose adaptive step is rectified,
    and left out while its variance is intractable (the first steps), the principled warmup.

    .. math::
        g_t &= \pm\nabla f(\theta_{t-1}) \;(+\lambda\theta_{t-1} \text{ unless decoupled}), \quad
        \theta_t \leftarrow \theta_{t-1}(1 - \gamma\lambda) \text{ if decoupled} \\
        m_t &= \beta_1 m_{t-1} + (1-\beta_1) g_t, \quad v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2 \\
        \rho_\infty &= 2/(1-\beta_2) - 1, \quad \rho_t = \rho_\infty - 2t\beta_2^t/(1-\beta_2^t) \\
        \theta_t &= \theta_t - \gamma \frac{m_t}{1-\beta_1^t}
            \begin{cases} r_t \sqrt{1-\beta_2^t} / (\sqrt{v_t} + \epsilon) & \rho_t > 5 \\
            1 & \text{otherwise} \end{cases}

    Args:
        {params}
        lr (float, Tensor, optional): learning rate; a tensor is read by the kernels at every step
            (default: 1e-3)
        betas (tuple[float, float], optional): coefficients of the running averages of the
            gradient and of its square (default: (0.9, 0.999))
        eps (float, optional): added to the denominator for numerical stability (default: 1e-8)
        weight_decay (float, optional): weight decay, added to the gradient (L2 penalty), or
            decoupled (default: 0)
        decoupled_weight_decay (bool, optional): decay the params themselves, as AdamW
            (default: False)
        {foreach}
        {maximize}
        {capturable}
        {differentiable}
        {shared_arguments}

    State per param (torch's layout): ``step``, ``exp_avg``, ``exp_avg_sq``.
    """

    spec = RADAM

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, decoupled_weight_decay=False,
                 *, foreach=None, maximize=False, capturable=False, differentiable=False, **shared):
        check_moments_arguments(lr, betas, eps, weight_decay)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, maximize=maximize, foreach=foreach,
                        capturable=capturable, decoupled_weight_decay=decoupled_weight_decay,
                        differentiable=differentiable)
        super().__init__(params, defaults, **shared)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in (("foreach", None), ("maximize", False), ("differentiable", False),
                               ("decoupled_weight_decay", False), ("capturable", False)):
                group.setdefault(key, value)

    def lerped_state_keys(self, group):
        return ("exp_avg",)

    def hyperparameters(self, group):
        beta1, beta2 = group["betas"]
        return dict(lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
                    decoupled_weight_decay=group["decoupled_weight_decay"], maximize=group["maximize"])

    def reference_step(self, group, params, grads, targets=None):
        reference.radam(params if targets is None else targets, grads, reference_states(self, params, "exp_avg"),
                        reference_states(self, params, "exp_avg_sq"), reference_states(self, params, "step"),
                        **self.reference_hyperparameters(group))
