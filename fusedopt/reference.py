"""CPU reference: each update rule as plain per-tensor torch code, line by line from its equation.
The "torch" backend for CPU tensors, and the oracle the Triton kernels are tested against."""

import torch

__all__ = [
    "sgd_update",
    "adam_update",
    "adagrad_update",
    "rmsprop_update",
    "radam_update",
    "lion_update",
    "sgd",
    "adam",
    "adagrad",
    "rmsprop",
    "radam",
    "lion",
]

# Parameters of these dtypes (and their states, which share the dtype) are updated with fp32 math.
_FP32_MATH_DTYPES = (torch.float16, torch.bfloat16)


def _scalar(value):
    """A 1-element tensor hyperparameter (torch.optim accepts a tensor lr) as a 0-dim tensor."""
    if isinstance(value, torch.Tensor) and value.dim() != 0:
        return value.reshape(())
    return value


def _math_operand(tensor):
    """The tensor the math runs on: an fp32 copy of a 16-bit float tensor, else the tensor itself.

    Results in an fp32 copy go back to the tensor through `_write_back`.
    """
    if tensor is not None and tensor.dtype in _FP32_MATH_DTYPES:
        return tensor.float()
    return tensor


def _real_views(*tensors):
    """Complex tensors as real views (..., 2): real and imaginary parts update as two reals."""
    return [torch.view_as_real(t) if t is not None and t.is_complex() else t for t in tensors]


def _write_back(stored, results):
    """Copies fp32 results into the 16-bit tensors they were computed for, once per step."""
    for tensor, result in zip(stored, results):
        if tensor is not None and tensor.dtype in _FP32_MATH_DTYPES:
            tensor.copy_(result)


def _effective_grad(grad, param, weight_decay, maximize):
    """g = -grad if maximize else grad, then g + weight_decay * param; never writes into grad."""
    if maximize:
        grad = -grad
    if weight_decay != 0:
        grad = grad.add(param, alpha=weight_decay)
    return grad


# Per-tensor updates


@torch.no_grad()
def sgd_update(
    param, grad, momentum_buffer, *, lr, weight_decay, momentum, dampening, nesterov, maximize
):
    r"""One SGD step on one tensor; returns the momentum buffer.

    .. math::
        g &\leftarrow \pm \nabla + \lambda \theta \\
        b &\leftarrow g \text{ on the first step, else } \mu b + (1 - \tau) g \\
        g &\leftarrow g + \mu b \text{ if nesterov, else } b \\
        \theta &\leftarrow \theta - \gamma g

    The buffer is a new tensor (a copy of the effective gradient, in its dtype: the grad's,
    promoted to the param's by weight decay, as in torch.optim) on the first step when
    ``momentum != 0`` and ``momentum_buffer is None``; ``None`` when ``momentum == 0``.
    Complex tensors update with complex arithmetic, as in torch.optim. A sparse gradient takes the
    same steps with sparse arithmetic: its momentum buffer is sparse, and weight decay raises
    (torch cannot add a dense param to a sparse grad).
    """
    lr = _scalar(lr)
    p = _math_operand(param)
    g = _effective_grad(_math_operand(grad), p, weight_decay, maximize)

    if momentum != 0:
        if momentum_buffer is None:
            buf = g.clone()
            dtype = grad.dtype if weight_decay == 0 else torch.promote_types(grad.dtype, param.dtype)
            momentum_buffer = buf.to(dtype)  # stored like torch.optim's effective grad
        else:
            buf = _math_operand(momentum_buffer)
            buf.mul_(momentum).add_(g, alpha=1 - dampening)
            _write_back([momentum_buffer], [buf])
        if nesterov:
            g = g.add(buf, alpha=momentum)
        else:
            g = buf
    else:
        momentum_buffer = None

    p.add_(g, alpha=-lr)
    _write_back([param], [p])
    return momentum_buffer


@torch.no_grad()
def adam_update(
    param,
    grad,
    exp_avg,
    exp_avg_sq,
    max_exp_avg_sq,
    *,
    step,
    lr,
    beta1,
    beta2,
    eps,
    weight_decay,
    decoupled_weight_decay,
    amsgrad,
    maximize,
):
    r"""One Adam (AdamW when ``decoupled_weight_decay``) step on one tensor; ``step`` is t >= 1.

    .. math::
        g &\leftarrow \pm \nabla \; (+ \lambda \theta \text{ if coupled}), \qquad
            \theta \leftarrow (1 - \gamma \lambda) \theta \text{ if decoupled} \\
        m &\leftarrow \beta_1 m + (1 - \beta_1) g \\
        v &\leftarrow \beta_2 v + (1 - \beta_2) g^2, \qquad
            \hat v \leftarrow \max(\hat v, v) \text{ if amsgrad, else } v \\
        \theta &\leftarrow \theta - \frac{\gamma}{1 - \beta_1^t}
            \frac{m}{\sqrt{\hat v} / \sqrt{1 - \beta_2^t} + \epsilon}

    ``max_exp_avg_sq`` is the :math:`\hat v` state, ``None`` unless ``amsgrad``.
    """
    lr = _scalar(lr)
    stored = [param, exp_avg, exp_avg_sq, max_exp_avg_sq if amsgrad else None]
    p, m, v, v_max = [_math_operand(t) for t in stored]
    g = _effective_grad(
        _math_operand(grad), p, 0 if decoupled_weight_decay else weight_decay, maximize
    )
    if decoupled_weight_decay and weight_decay != 0:
        p.mul_(1 - lr * weight_decay)
    stored_math = [p, m, v, v_max]
    p, g, m, v, v_max = _real_views(p, g, m, v, v_max)

    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)

    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    step_size = lr / bias_correction1
    if amsgrad:
        torch.maximum(v_max, v, out=v_max)
        second_moment = v_max
    else:
        second_moment = v
    denom = (second_moment.sqrt() / bias_correction2**0.5).add_(eps)
    p.addcdiv_(m, denom, value=-step_size)

    _write_back(stored, stored_math)


@torch.no_grad()
def adagrad_update(param, grad, state_sum, *, step, lr, lr_decay, weight_decay, eps, maximize):
    r"""One Adagrad step on one tensor; ``step`` is t >= 1.

    .. math::
        g &\leftarrow \pm \nabla + \lambda \theta \\
        \tilde\gamma &\leftarrow \gamma / (1 + (t - 1) \eta) \\
        s &\leftarrow s + g^2 \\
        \theta &\leftarrow \theta - \tilde\gamma \, g / (\sqrt{s} + \epsilon)

    A sparse gradient is coalesced first (the update is not linear in g, so each index must
    appear once) and only the entries it names change; weight decay is refused with it.
    """
    lr = _scalar(lr)
    if weight_decay != 0 and grad.is_sparse:
        raise RuntimeError("weight_decay option is not compatible with sparse gradients")
    stored = [param, state_sum]
    stored_math = p, s = [_math_operand(t) for t in stored]
    g = _effective_grad(_math_operand(grad), p, weight_decay, maximize)

    decayed_lr = lr / (1 + (step - 1) * lr_decay)

    if g.is_sparse:
        g = g.coalesce()
        indices, values = g.indices(), g.values()
        squares = torch.sparse_coo_tensor(indices, values.square(), g.shape, check_invariants=False)
        s.add_(squares)
        std_values = s.sparse_mask(g).values().sqrt().add_(eps)
        update = values / std_values
        p.add_(
            torch.sparse_coo_tensor(indices, update, g.shape, check_invariants=False),
            alpha=-decayed_lr,
        )
    else:
        p, g, s = _real_views(p, g, s)
        s.addcmul_(g, g, value=1)
        p.addcdiv_(g, s.sqrt().add_(eps), value=-decayed_lr)

    _write_back(stored, stored_math)


@torch.no_grad()
def rmsprop_update(
    param,
    grad,
    square_avg,
    momentum_buffer,
    grad_avg,
    *,
    lr,
    alpha,
    eps,
    weight_decay,
    momentum,
    centered,
    maximize,
):
    r"""One RMSprop step on one tensor.

    .. math::
        g &\leftarrow \pm \nabla + \lambda \theta \\
        v &\leftarrow \alpha v + (1 - \alpha) g^2 \\
        \bar g &\leftarrow \alpha \bar g + (1 - \alpha) g \\
        d &\leftarrow \sqrt{v - \bar g^2} + \epsilon \text{ (centered) or } \sqrt{v} + \epsilon \\
        b &\leftarrow \mu b + g / d, \qquad \theta \leftarrow \theta - \gamma b \text{ if } \mu > 0,
            \text{ else } \theta \leftarrow \theta - \gamma g / d

    ``momentum_buffer`` (b) is ``None`` unless ``momentum > 0``; ``grad_avg`` (:math:`\bar g`)
    is ``None`` unless ``centered``.
    """
    lr = _scalar(lr)
    stored = [
        param,
        square_avg,
        momentum_buffer if momentum > 0 else None,
        grad_avg if centered else None,
    ]
    stored_math = p, v, buf, g_avg = [_math_operand(t) for t in stored]
    g = _effective_grad(_math_operand(grad), p, weight_decay, maximize)
    p, g, v, buf, g_avg = _real_views(p, g, v, buf, g_avg)

    v.mul_(alpha).addcmul_(g, g, value=1 - alpha)
    if centered:
        g_avg.lerp_(g, 1 - alpha)
        denom = v.addcmul(g_avg, g_avg, value=-1).sqrt_()
    else:
        denom = v.sqrt()
    denom.add_(eps)

    if momentum > 0:
        buf.mul_(momentum).addcdiv_(g, denom)
        p.add_(buf, alpha=-lr)
    else:
        p.addcdiv_(g, denom, value=-lr)

    _write_back(stored, stored_math)


@torch.no_grad()
def radam_update(param, grad, exp_avg, exp_avg_sq, *, step, lr, beta1, beta2, eps, weight_decay,
                 decoupled_weight_decay, maximize):
    r"""One RAdam step (Liu et al., rectified Adam) on one tensor; ``step`` is t >= 1.

    .. math::
        g &\leftarrow \pm \nabla \; (+ \lambda \theta \text{ if coupled}), \qquad
            \theta \leftarrow (1 - \gamma \lambda) \theta \text{ if decoupled} \\
        m &\leftarrow \beta_1 m + (1 - \beta_1) g, \qquad v \leftarrow \beta_2 v + (1 - \beta_2) g^2 \\
        \rho_\infty &= 2 / (1 - \beta_2) - 1, \qquad
            \rho_t = \rho_\infty - 2 t \beta_2^t / (1 - \beta_2^t) \\
        \theta &\leftarrow \theta - \gamma \frac{m}{1 - \beta_1^t} \cdot
            \begin{cases} r_t \sqrt{1 - \beta_2^t} / (\sqrt{v} + \epsilon) & \rho_t > 5 \\
            1 & \text{otherwise} \end{cases}, \qquad
            r_t = \sqrt{\frac{(\rho_t - 4)(\rho_t - 2)\rho_\infty}{(\rho_\infty - 4)(\rho_\infty - 2)\rho_t}}
    """
    lr = _scalar(lr)
    stored = [param, exp_avg, exp_avg_sq]
    p, m, v = [_math_operand(t) for t in stored]
    stored_math = [p, m, v]
    # torch's RAdam adds the weight decay on the real views (Adam, on the complex tensors)
    p, g, m, v = _real_views(p, _math_operand(grad), m, v)
    g = _effective_grad(g, p, 0 if decoupled_weight_decay else weight_decay, maximize)
    if decoupled_weight_decay and weight_decay != 0:
        p.mul_(1 - lr * weight_decay)

    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)

    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    bias_corrected_exp_avg = m / bias_correction1
    rho_inf = 2 / (1 - beta2) - 1
    rho_t = rho_inf - 2 * step * (beta2**step) / bias_correction2
    if rho_t > 5.0:
        rect = ((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)) ** 0.5
        adaptive_lr = bias_correction2**0.5 / v.sqrt().add_(eps)
        p.add_(bias_corrected_exp_avg * lr * adaptive_lr * rect, alpha=-1.0)
    else:
        p.add_(bias_corrected_exp_avg * lr, alpha=-1.0)

    _write_back(stored, stored_math)


@torch.no_grad()
def lion_update(param, grad, exp_avg, *, lr, beta1, beta2, weight_decay, maximize):
    r"""One Lion step (Chen et al. 2023) on one tensor.

    .. math::
        g &\leftarrow \pm \nabla, \qquad c \leftarrow \beta_1 m + (1 - \beta_1) g \\
        \theta &\leftarrow (1 - \gamma \lambda) \theta - \gamma \, \mathrm{sign}(c) \\
        m &\leftarrow \beta_2 m + (1 - \beta_2) g
    """
    lr = _scalar(lr)
    stored = [param, exp_avg]
    stored_math = p, m = [_math_operand(t) for t in stored]
    p, g, m = _real_views(p, _math_operand(grad), m)
    if maximize:
        g = -g
    if weight_decay != 0:
        p.mul_(1 - lr * weight_decay)
    p.add_(m.lerp(g, 1 - beta1).sign_(), alpha=-lr)
    m.lerp_(g, 1 - beta2)
    _write_back(stored, stored_math)


# List-level functions: the backend interface, one call per param group.


def _advance(step_t):
    """Adds one to a state['step'] tensor in place and returns the new count as a number."""
    step_t += 1
    return step_t.item()


def sgd(
    params, grads, momentum_buffers, *, lr, weight_decay, momentum, dampening, nesterov, maximize
):
    """Applies `sgd_update` to each tensor; returns the momentum buffers, new where None was passed.

    With ``momentum != 0`` new buffers are also written into ``momentum_buffers`` (as torch.optim's
    functional sgd does); with ``momentum == 0`` the list is not read and the result is all None.
    """
    if momentum == 0:
        momentum_buffers = [None] * len(params)
    for i, (param, grad) in enumerate(zip(params, grads)):
        momentum_buffers[i] = sgd_update(
            param,
            grad,
            momentum_buffers[i],
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            dampening=dampening,
            nesterov=nesterov,
            maximize=maximize,
        )
    return momentum_buffers


def adam(
    params,
    grads,
    exp_avgs,
    exp_avg_sqs,
    max_exp_avg_sqs,
    state_steps,
    *,
    lr,
    beta1,
    beta2,
    eps,
    weight_decay,
    decoupled_weight_decay,
    amsgrad,
    maximize,
):
    """Applies `adam_update` to each tensor after advancing its step count.

    ``max_exp_avg_sqs`` is read only with ``amsgrad`` (its entries may be None otherwise).
    """
    for i, (param, grad, step_t) in enumerate(zip(params, grads, state_steps)):
        adam_update(
            param,
            grad,
            exp_avgs[i],
            exp_avg_sqs[i],
            max_exp_avg_sqs[i] if amsgrad else None,
            step=_advance(step_t),
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            eps=eps,
            weight_decay=weight_decay,
            decoupled_weight_decay=decoupled_weight_decay,
            amsgrad=amsgrad,
            maximize=maximize,
        )


def adagrad(params, grads, state_sums, state_steps, *, lr, lr_decay, weight_decay, eps, maximize):
    """Applies `adagrad_update` to each tensor after advancing its step count."""
    for param, grad, state_sum, step_t in zip(params, grads, state_sums, state_steps):
        adagrad_update(
            param,
            grad,
            state_sum,
            step=_advance(step_t),
            lr=lr,
            lr_decay=lr_decay,
            weight_decay=weight_decay,
            eps=eps,
            maximize=maximize,
        )


def rmsprop(
    params,
    grads,
    square_avgs,
    momentum_buffers,
    grad_avgs,
    state_steps,
    *,
    lr,
    alpha,
    eps,
    weight_decay,
    momentum,
    centered,
    maximize,
):
    """Applies `rmsprop_update` to each tensor after advancing its step count.

    ``momentum_buffers`` is read only when ``momentum > 0``, ``grad_avgs`` only when ``centered``.
    """
    for i, (param, grad, step_t) in enumerate(zip(params, grads, state_steps)):
        _advance(step_t)
        rmsprop_update(
            param,
            grad,
            square_avgs[i],
            momentum_buffers[i] if momentum > 0 else None,
            grad_avgs[i] if centered else None,
            lr=lr,
            alpha=alpha,
            eps=eps,
            weight_decay=weight_decay,
            momentum=momentum,
            centered=centered,
            maximize=maximize,
        )


def radam(params, grads, exp_avgs, exp_avg_sqs, state_steps, *, lr, beta1, beta2, eps, weight_decay,
          decoupled_weight_decay, maximize):
    """Applies `radam_update` to each tensor after advancing its step count."""
    for param, grad, exp_avg, exp_avg_sq, step_t in zip(params, grads, exp_avgs, exp_avg_sqs, state_steps):
        radam_update(param, grad, exp_avg, exp_avg_sq, step=_advance(step_t), lr=lr, beta1=beta1, beta2=beta2,
                     eps=eps, weight_decay=weight_decay, decoupled_weight_decay=decoupled_weight_decay,
                     maximize=maximize)


def lion(params, grads, exp_avgs, *, lr, beta1, beta2, weight_decay, maximize):
    """Applies `lion_update` to each tensor."""
    for param, grad, exp_avg in zip(params, grads, exp_avgs):
        lion_update(param, grad, exp_avg, lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay,
                    maximize=maximize)


def stochastic_round_to_bfloat16(values, key):
    """fp32 `values` rounded to bf16 up in magnitude with probability (dropped bits) / 2^16, so
    that the expectation is the value; the random bits come from a generator seeded by `key`
    (a tuple of ints: seed, step, tensor), so a run is reproducible."""
    generator = torch.Generator().manual_seed(hash(key) & (2**63 - 1))
    noise = torch.randint(0, 1 << 16, values.shape, dtype=torch.int32, generator=generator).to(values.device)
    bits = values.float().contiguous().view(torch.int32)
    rounded = torch.bitwise_right_shift(bits + noise, 16).to(torch.int16).view(torch.bfloat16)
    return torch.where(values.isnan(), values.to(torch.bfloat16), rounded)
