"""RMSprop: defaults, argument checks and state layout of torch.optim.RMSprop."""
import torch

from . import reference
from .optimizer import FusedOptimizer, reference_states


class RMSprop(FusedOptimizer):
    r"""RMSprop (Hinton), drop-in for :class:`torch.optim.RMSprop`.

    .. math::
        g_t &= \pm\nabla f(\theta_{t-1}) + \lambda\theta_{t-1}, \quad
        v_t = \alpha v_{t-1} + (1-\alpha) g_t^2 \\
        \bar g_t &= \alpha \bar g_{t-1} + (1-\alpha) g_t, \quad
        d_t = \sqrt{v_t - \bar g_t^2} + \epsilon \text{ if centered else } \sqrt{v_t} + \epsilon \\
        b_t &= \mu b_{t-1} + g_t / d_t, \quad \theta_t = \theta_{t-1} - \gamma b_t
        \quad (\mu = 0:\ \theta_t = \theta_{t-1} - \gamma g_t / d_t)

    Args: as torch.optim.RMSprop (lr, alpha, eps, weight_decay, momentum, centered, maximize;
    foreach accepted and recorded), plus ``backend``. State per param (torch's layout): ``step``,
    ``square_avg``, ``momentum_buffer`` when momentum > 0, ``grad_avg`` when centered.
    """

    def __init__(self, params, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0, momentum=0, centered=False,
                 capturable=False, foreach=None, maximize=False, differentiable=False, backend=None,
                 **options):
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
        super().__init__(params, defaults, backend, **options)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in (("momentum", 0), ("centered", False), ("foreach", None), ("maximize", False),
                               ("differentiable", False), ("capturable", False)):
                group.setdefault(key, value)

    def structure(self, group):
        return group["momentum"] > 0, group["centered"]

    def state_keys(self, group):
        keys = ["square_avg"]
        if group["momentum"] > 0:
            keys.append("momentum_buffer")
        if group["centered"]:
            keys.append("grad_avg")
        return keys

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

    def kernel_step(self, group, table, steps, **launch):
        from . import kernels

        kernels.rmsprop_step(table, steps=steps, **launch,
                          **self.hyperparameters(group))
