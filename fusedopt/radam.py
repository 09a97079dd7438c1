"""RAdam: defaults, argument checks and state layout of torch.optim.RAdam."""

from . import reference
from .adam import check_moments_arguments
from .optimizer import FusedOptimizer, reference_states


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

    Args: as torch.optim.RAdam (lr, betas, eps, weight_decay, decoupled_weight_decay; foreach,
    maximize, capturable; differentiable=True raises NotImplementedError), plus ``backend``
    ("auto", "triton", "torch") and the epilogue options of every fusedopt optimizer.
    State per param (torch's layout): ``step``, ``exp_avg``, ``exp_avg_sq``.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, decoupled_weight_decay=False,
                 *, foreach=None, maximize=False, capturable=False, differentiable=False, backend=None, **options):
        check_moments_arguments(lr, betas, eps, weight_decay)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, maximize=maximize, foreach=foreach,
                        capturable=capturable, decoupled_weight_decay=decoupled_weight_decay,
                        differentiable=differentiable)
        super().__init__(params, defaults, backend, **options)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in (("foreach", None), ("maximize", False), ("differentiable", False),
                               ("decoupled_weight_decay", False), ("capturable", False)):
                group.setdefault(key, value)

    def structure(self, group):
        return None

    def state_keys(self, group):
        return ["exp_avg", "exp_avg_sq"]

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

    def kernel_step(self, group, table, steps, **launch):
        from . import kernels

        kernels.radam_step(table, steps, **launch, **self.hyperparameters(group))
