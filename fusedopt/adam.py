"""Adam and AdamW: defaults, argument checks and state layout of torch.optim.Adam / AdamW."""
import torch

from . import reference
from .optimizer import FusedOptimizer, as_float, reference_states


def check_moments_arguments(lr, betas, eps, weight_decay):
    """torch.optim's checks, and messages, shared by Adam, AdamW and RAdam."""
    if torch.is_tensor(lr) and lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}")
    if not 0.0 <= eps:
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
    r"""Adam (Kingma & Ba), drop-in for :class:`torch.optim.Adam`, one fused kernel per bucket.

    .. math::
        g_t &= \pm\nabla f(\theta_{t-1}) \;(+\lambda\theta_{t-1} \text{ unless decoupled}) \\
        \theta_t &\leftarrow \theta_{t-1}(1 - \gamma\lambda) \text{ if decoupled (AdamW)} \\
        m_t &= \beta_1 m_{t-1} + (1-\beta_1) g_t, \quad v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2 \\
        \hat v_t &= \max(\hat v_{t-1}, v_t) \text{ if amsgrad else } v_t \\
        \theta_t &= \theta_t - \frac{\gamma}{1-\beta_1^t}\,
                    \frac{m_t}{\sqrt{\hat v_t}/\sqrt{1-\beta_2^t} + \epsilon}

    Args: as torch.optim.Adam (lr, betas, eps, weight_decay, amsgrad, maximize,
    decoupled_weight_decay; foreach and fused are accepted and recorded, fusedopt always runs
    its own fused kernel on CUDA), plus ``backend``: "auto" (kernels for CUDA tensors, the
    reference for CPU ones), "triton" or "torch"; default from ``FUSEDOPT_BACKEND``.
    ``capturable=True`` keeps the step counts on the params' device, and the lr may be a tensor
    that the kernel reads, so ``step()`` can be captured in a CUDA graph; ``differentiable=True``
    raises NotImplementedError. ``max_grad_norm`` clips every step by the total 2-norm of the
    grads (see :meth:`clip_grad_norm_`).

    State per param (torch's layout): ``step`` (0-dim float32 tensor: on the CPU until the kernels
    take the param, then on its device, as with torch's fused=True), ``exp_avg``,
    ``exp_avg_sq`` and, with amsgrad, ``max_exp_avg_sq`` (like the param).
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, amsgrad=False, *,
                 foreach=None, maximize=False, capturable=False, differentiable=False, fused=None,
                 decoupled_weight_decay=False, backend=None, **options):
        check_adam_arguments(lr, betas, eps, weight_decay, foreach, capturable)
        # torch keeps tensor betas as 0-dim tensors in the param groups
        betas = tuple(b.squeeze() if torch.is_tensor(b) and b.dim() != 0 else b for b in betas)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        amsgrad=amsgrad, maximize=maximize, foreach=foreach, capturable=capturable,
                        differentiable=differentiable, fused=fused,
                        decoupled_weight_decay=decoupled_weight_decay)
        super().__init__(params, defaults, backend, **options)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in (("amsgrad", False), ("maximize", False), ("foreach", None), ("capturable", False),
                               ("differentiable", False), ("fused", None), ("decoupled_weight_decay", False)):
                group.setdefault(key, value)

    def structure(self, group):
        return group["amsgrad"]

    def state_keys(self, group):
        keys = ["exp_avg", "exp_avg_sq"]
        return keys + ["max_exp_avg_sq"] if group["amsgrad"] else keys

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

    def kernel_step(self, group, table, steps, **launch):
        from . import kernels

        kernels.adam_step(table, steps, **launch,
                          **self.hyperparameters(group))


class AdamW(Adam):
    r"""AdamW (Loshchilov & Hutter): Adam with decoupled weight decay,
    :math:`\theta \leftarrow \theta(1-\gamma\lambda)` before the Adam update; drop-in for
    :class:`torch.optim.AdamW` (default weight_decay 1e-2). See :class:`Adam`."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, *,
                 maximize=False, foreach=None, capturable=False, differentiable=False, fused=None, backend=None,
                 **options):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach, maximize=maximize,
                         capturable=capturable, differentiable=differentiable, fused=fused,
                         decoupled_weight_decay=True, backend=backend, **options)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group["decoupled_weight_decay"] = True
