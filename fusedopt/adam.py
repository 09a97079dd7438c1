"""Adam and AdamW: the rule (its numbers and equations, which the kernels compile), and the
defaults, argument checks and state layout of torch.optim.Adam / AdamW."""
from typing import NamedTuple

import torch

from . import reference
from .optimizer import FusedOptimizer, as_float, reference_states
from .spec import RuleSpec, StateSlot, exp2, grad_sign, lerp, log2_or_minus_inf, maximum, sqrt, to_compute


class AdamOptions(NamedTuple):
    amsgrad: bool


class AdamLaunch(NamedTuple):
    """Adam's numbers for one launch (1 - beta in double on the host)."""

    one_minus_beta1: float
    beta2: float
    one_minus_beta2: float
    eps: float
    coupled_weight_decay: float  # Adam's: added to the grad
    decoupled_weight_decay: float  # AdamW's: p *= 1 - lr * wd
    param_scale: float  # that 1 - lr * wd from the host's lr (1 where the kernel reads the lr)
    grad_sign: float
    log2_beta1: float
    log2_beta2: float


class AdamBlock(NamedTuple):
    one_minus_beta1: float
    beta2: float
    one_minus_beta2: float
    eps: float
    coupled_weight_decay: float
    param_scale: float
    grad_sign: float
    step_size: float  # lr / (1 - beta1^step)
    bias_correction2_sqrt: float  # sqrt(1 - beta2^step)


def adam_options(group):
    return AdamOptions(amsgrad=bool(group["amsgrad"]))


def adam_launch_numbers(group, lr_on_device):
    beta1, beta2 = map(as_float, group["betas"])
    weight_decay, decoupled = group["weight_decay"], group["decoupled_weight_decay"]
    return AdamLaunch(
        one_minus_beta1=1 - beta1, beta2=beta2, one_minus_beta2=1 - beta2, eps=group["eps"],
        coupled_weight_decay=0.0 if decoupled else weight_decay,
        decoupled_weight_decay=weight_decay if decoupled else 0.0,
        param_scale=1 - group["lr"] * weight_decay if decoupled and not lr_on_device else 1.0,
        grad_sign=grad_sign(group), log2_beta1=log2_or_minus_inf(beta1), log2_beta2=log2_or_minus_inf(beta2))


def adam_block_numbers(lr, step, extra, n, DEVICE_LR, COMPUTE):
    """The bias corrections lr / (1 - b1^step) and sqrt(1 - b2^step), in fp64 once per block;
    AdamW's 1 - lr * wd from the lr read on the device (else the host's)."""
    step_size = lr / (1 - exp2(step * n.log2_beta1))
    bias_correction2_sqrt = sqrt(1 - exp2(step * n.log2_beta2))
    param_scale = to_compute(n.param_scale, COMPUTE)
    if DEVICE_LR:
        param_scale = to_compute(1 - lr * n.decoupled_weight_decay, COMPUTE)
    return AdamBlock(
        one_minus_beta1=to_compute(n.one_minus_beta1, COMPUTE), beta2=to_compute(n.beta2, COMPUTE),
        one_minus_beta2=to_compute(n.one_minus_beta2, COMPUTE), eps=to_compute(n.eps, COMPUTE),
        coupled_weight_decay=to_compute(n.coupled_weight_decay, COMPUTE), param_scale=param_scale,
        grad_sign=to_compute(n.grad_sign, COMPUTE), step_size=to_compute(step_size, COMPUTE),
        bias_correction2_sqrt=to_compute(bias_correction2_sqrt, COMPUTE))


def adam_update(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, b, options):
    """m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2;  p -= lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps)."""
    grad = grad * b.grad_sign
    if b.coupled_weight_decay != 0:
        grad = grad + b.coupled_weight_decay * param
    if b.param_scale != 1:  # AdamW: p *= 1 - lr * wd
        param = param * b.param_scale
    exp_avg = lerp(exp_avg, grad, b.one_minus_beta1)
    exp_avg_sq = exp_avg_sq * b.beta2 + b.one_minus_beta2 * grad * grad
    if options.amsgrad:
        max_exp_avg_sq = maximum(max_exp_avg_sq, exp_avg_sq)
        denom = sqrt(max_exp_avg_sq) / b.bias_correction2_sqrt + b.eps
    else:
        denom = sqrt(exp_avg_sq) / b.bias_correction2_sqrt + b.eps
    param = param - b.step_size * (exp_avg / denom)
    return param, exp_avg, exp_avg_sq, max_exp_avg_sq


ADAM = RuleSpec(
    "adam",
    states=(StateSlot("exp_avg", signed=True), StateSlot("exp_avg_sq", signed=False),
            StateSlot("max_exp_avg_sq", signed=False, present_when="amsgrad")),
    Options=AdamOptions, options=adam_options, Launch=AdamLaunch, launch_numbers=adam_launch_numbers,
    Block=AdamBlock, block_numbers=adam_block_numbers, update=adam_update, steps=True)


def check_moments_arguments(lr, betas, eps, weight_decay):
    """torch.optim's checks, and messages, shared by Adam, AdamW and RAdam (eps None: a rule
    without one)."""
    if torch.is_tensor(lr) and lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}")
    if eps is not None and not 0.0 <= eps:
        raise ValueError(f"Invalid epsilon value: {eps}")
    if not 0.0 <= betas[0] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
    if not 0.0 <= betas[1] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
    if not 0.0 <= weight_decay:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")


def check_adam_arguments(lr, betas, eps, weight_decay, foreach, capturable):
    if torch.is_tensor(lr) and foreach and not capturable:
        raise ValueError("lr as a Tensor is not supported for capturable=False and foreach=True")
    check_moments_arguments(lr, betas, eps, weight_decay)
    if not (all(isinstance(beta, float) for beta in betas) or all(torch.is_tensor(beta) for beta in betas)):
        raise ValueError("betas must be either both floats or both Tensors")
    for index, beta in enumerate(betas):
        if torch.is_tensor(beta):
            if foreach and not capturable:
                raise ValueError(f"betas[{index}] as a Tensor is not supported for capturable=False and foreach=True")
            if beta.numel() != 1:
                raise ValueError(f"Tensor betas[{index}] must be 1-element")


class Adam(FusedOptimizer):
    r"""Adam (Kingma & Ba), drop-in for :class:`torch.optim.Adam`, one fused kernel launch per
    (device, dtype) bucket.

    .. math::
        g_t &= \pm\nabla f(\theta_{t-1}) \;(+\lambda\theta_{t-1} \text{ unless decoupled}) \\
        \theta_t &\leftarrow \theta_{t-1}(1 - \gamma\lambda) \text{ if decoupled (AdamW)} \\
        m_t &= \beta_1 m_{t-1} + (1-\beta_1) g_t, \quad v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2 \\
        \hat v_t &= \max(\hat v_{t-1}, v_t) \text{ if amsgrad else } v_t \\
        \theta_t &= \theta_t - \frac{\gamma}{1-\beta_1^t}\,
                    \frac{m_t}{\sqrt{\hat v_t}/\sqrt{1-\beta_2^t} + \epsilon}

    Args:
        {params}
        lr (float, Tensor, optional): learning rate; a tensor is read by the kernels at every step
            (default: 1e-3)
        betas (tuple[float, float] or tuple[Tensor, Tensor], optional): coefficients of the running
            averages of the gradient and of its square (default: (0.9, 0.999))
        eps (float, optional): added to the denominator for numerical stability (default: 1e-8)
        weight_decay (float, optional): weight decay, added to the gradient (L2 penalty), or decoupled
            (default: 0)
        amsgrad (bool, optional): the AMSGrad variant: the maximum of the past averages of squared
            gradients in the denominator (default: False)
        {foreach}
        {maximize}
        {capturable}
        {differentiable}
        {fused}
        decoupled_weight_decay (bool, optional): decay the params themselves, as AdamW
            (default: False)
        {shared_arguments}

    State per param (torch's layout): ``step`` (0-dim float32 tensor: on the CPU until the kernels
    take the param, then on its device, as with torch's fused=True), ``exp_avg``,
    ``exp_avg_sq`` and, with amsgrad, ``max_exp_avg_sq`` (like the param).
    """

    spec = ADAM

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, amsgrad=False, *,
                 foreach=None, maximize=False, capturable=False, differentiable=False, fused=None,
                 decoupled_weight_decay=False, **shared):
        check_adam_arguments(lr, betas, eps, weight_decay, foreach, capturable)
        # torch keeps tensor betas as 0-dim tensors in the param groups
        betas = tuple(b.squeeze() if torch.is_tensor(b) and b.dim() != 0 else b for b in betas)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        amsgrad=amsgrad, maximize=maximize, foreach=foreach, capturable=capturable,
                        differentiable=differentiable, fused=fused,
                        decoupled_weight_decay=decoupled_weight_decay)
        super().__init__(params, defaults, **shared)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in (("amsgrad", False), ("maximize", False), ("foreach", None), ("capturable", False),
                               ("differentiable", False), ("fused", None), ("decoupled_weight_decay", False)):
                group.setdefault(key, value)

    def check_grad(self, grad):
        if grad.is_sparse:  # torch.optim's words, AdamW's included
            raise RuntimeError("Adam does not support sparse gradients, please consider SparseAdam instead")

    def lerped_state_keys(self, group):
        return ("exp_avg",)

    def hyperparameters(self, group):
        beta1, beta2 = group["betas"]
        return dict(lr=group["lr"], beta1=as_float(beta1), beta2=as_float(beta2), eps=group["eps"],
                    weight_decay=group["weight_decay"], decoupled_weight_decay=group["decoupled_weight_decay"],
                    amsgrad=group["amsgrad"], maximize=group["maximize"])

    def reference_step(self, group, params, grads, targets=None):
        reference.adam(
            params if targets is None else targets, grads, reference_states(self, params, "exp_avg"),
            reference_states(self, params, "exp_avg_sq"), reference_states(self, params, "max_exp_avg_sq"),
            reference_states(self, params, "step"), **self.reference_hyperparameters(group))


class AdamW(Adam):
    r"""AdamW (Loshchilov & Hutter): Adam with decoupled weight decay,
    :math:`\theta \leftarrow \theta(1-\gamma\lambda)` before the Adam update; drop-in for
    :class:`torch.optim.AdamW`, one fused kernel launch per (device, dtype) bucket. See
    :class:`Adam` for the update.

    Args:
        {params}
        lr (float, Tensor, optional): learning rate; a tensor is read by the kernels at every step
            (default: 1e-3)
        betas (tuple[float, float] or tuple[Tensor, Tensor], optional): coefficients of the running
            averages of the gradient and of its square (default: (0.9, 0.999))
        eps (float, optional): added to the denominator for numerical stability (default: 1e-8)
        weight_decay (float, optional): decoupled weight decay coefficient (default: 1e-2)
        amsgrad (bool, optional): the AMSGrad variant (default: False)
        {maximize}
        {foreach}
        {capturable}
        {differentiable}
        {fused}
        {shared_arguments}

    State per param: as :class:`Adam`.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, *,
                 maximize=False, foreach=None, capturable=False, differentiable=False, fused=None, **shared):
        if "decoupled_weight_decay" in shared:  # AdamW's decay is decoupled by definition
            raise TypeError("AdamW.__init__() got an unexpected keyword argument 'decoupled_weight_decay'")
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach, maximize=maximize,
                         capturable=capturable, differentiable=differentiable, fused=fused,
                         decoupled_weight_decay=True, **shared)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group["decoupled_weight_decay"] = True
