"""Ready-made recipes: warmup + decay schedules by name, and helpers attaching them to an optimizer.

`warmup_cosine` and `warmup_linear` give the numbers of transformers' schedules of the same name.
"""

from __future__ import annotations

from typing import Callable

from torch.optim import Optimizer

from .base import Schedule, check_count, check_number, join
from .phases import (
    Constant,
    CosineDecay,
    InverseSqrtDecay,
    LinearDecay,
    LinearWarmup,
    OneCycle,
    TransformerSchedule,
)
from .scheduler import ScheduledLR


def check_run(warmup_steps, total_steps, *, total_required: bool = True) -> tuple[int, int | None]:
    """Check a run's step counts: both >= 0, warmup no longer than the run."""
    warmup_steps = check_count("warmup_steps", warmup_steps)
    if total_steps is None:
        if total_required:
            raise ValueError("total_steps is required")
    else:
        total_steps = check_count("total_steps", total_steps)
        if warmup_steps > total_steps:
            raise ValueError(
                f"warmup_steps ({warmup_steps}) must not exceed total_steps ({total_steps})"
            )
    return warmup_steps, total_steps


def floor_factor(min_lr, lr, where: str = "lr") -> float:
    """The decay floor as a factor of `lr`: ``min_lr / lr``, checking ``0 <= min_lr <= lr``."""
    if min_lr is None:
        return 0.0
    min_lr = check_number("min_lr", min_lr, low=0.0)
    lr = float(lr)
    if min_lr > lr:
        raise ValueError(f"min_lr ({min_lr}) must not exceed {where} ({lr})")
    return min_lr / lr if lr > 0 else 0.0


# ---------------------------------------------------------------- the schedules behind the names
# Each builds the schedule of one param group; the floor is a factor of that group's base lr.


def _warmup_cosine(*, warmup_steps, total_steps, floor=0.0) -> Schedule:
    warmup_steps, total_steps = check_run(warmup_steps, total_steps)
    decay = CosineDecay(total_steps - warmup_steps, floor=floor)
    return join([LinearWarmup(warmup_steps), decay], [warmup_steps])


def _warmup_linear(*, warmup_steps, total_steps, floor=0.0) -> Schedule:
    warmup_steps, total_steps = check_run(warmup_steps, total_steps)
    decay = LinearDecay(total_steps - warmup_steps, floor=floor)
    return join([LinearWarmup(warmup_steps), decay], [warmup_steps])


def _warmup_constant(*, warmup_steps, total_steps=None) -> Schedule:
    warmup_steps, _ = check_run(warmup_steps, total_steps, total_required=False)
    return join([LinearWarmup(warmup_steps), Constant(1.0)], [warmup_steps])


def _warmup_inverse_sqrt(*, warmup_steps, total_steps=None, timescale=None, floor=0.0) -> Schedule:
    warmup_steps, _ = check_run(warmup_steps, total_steps, total_required=False)
    if timescale is None:
        timescale = warmup_steps or 10_000
    decay = InverseSqrtDecay(timescale, floor=floor)
    return join([LinearWarmup(warmup_steps), decay], [warmup_steps])


def _transformer(*, warmup_steps=4000, d_model, total_steps=None) -> Schedule:
    warmup_steps, _ = check_run(warmup_steps, total_steps, total_required=False)
    return TransformerSchedule(d_model, check_count("warmup_steps", warmup_steps, minimum=1))


def _one_cycle(*, total_steps, warmup_steps=None) -> Schedule:
    if warmup_steps is None:
        return OneCycle(check_count("total_steps", total_steps, minimum=1))
    warmup_steps, total_steps = check_run(warmup_steps, total_steps)
    total_steps = check_count("total_steps", total_steps, minimum=1)
    return OneCycle(total_steps, pct_start=warmup_steps / total_steps)


RECIPES: dict[str, Callable[..., Schedule]] = {
    "warmup_cosine": _warmup_cosine,
    "warmup_linear": _warmup_linear,
    "warmup_constant": _warmup_constant,
    "warmup_inverse_sqrt": _warmup_inverse_sqrt,
    "transformer": _transformer,
    "one_cycle": _one_cycle,
}


def from_name(name: str, **kwargs) -> Schedule:
    """The schedule of the recipe `name`, as a factor of the base lr.

    ``from_name("warmup_cosine", warmup_steps=500, total_steps=20_000, floor=0.01)``; the keyword
    arguments are those of the helper of the same name, with ``floor`` (a factor) in place of
    ``min_lr``; ``one_cycle`` takes ``total_steps`` and optionally ``warmup_steps`` (the rise).
    Raises ValueError naming `name` when it is unknown.
    """
    if name not in RECIPES:
        raise ValueError(f"name must be one of {', '.join(RECIPES)}; got {name!r}")
    return RECIPES[name](**kwargs)


# ----------------------------------------------------------------------- helpers with an optimizer


def _base_lrs(optimizer: Optimizer) -> list[float]:
    """The base lr each group will have under a new scheduler (torch keeps a set initial_lr)."""
    if not isinstance(optimizer, Optimizer):
        raise TypeError(f"{type(optimizer).__name__} is not a torch.optim.Optimizer")
    return [float(group.get("initial_lr", group["lr"])) for group in optimizer.param_groups]


def _floors(optimizer: Optimizer, min_lr) -> list[float]:
    return [
        floor_factor(min_lr, lr, where=f"the lr of param group {index}")
        for index, lr in enumerate(_base_lrs(optimizer))
    ]


def warmup_cosine(
    optimizer: Optimizer, *, warmup_steps: int, total_steps: int, min_lr=None, last_epoch: int = -1
) -> ScheduledLR:
    """Linear warmup from 0 over `warmup_steps`, then half a cosine down to `min_lr` (default 0)
    at `total_steps`, where the lr stays.

    Factor ``step / max(1, warmup_steps)`` during warmup, then
    ``0.5 * (1 + cos(pi * (step - warmup_steps) / max(1, total_steps - warmup_steps)))`` lifted
    onto ``[min_lr / lr, 1]``: transformers' ``get_cosine_schedule_with_warmup`` (and, with
    `min_lr`, ``get_cosine_with_min_lr_schedule_with_warmup``) number for number up to
    `total_steps`. Past `total_steps` the lr stays at `min_lr` instead of rising again.
    """
    check_run(warmup_steps, total_steps)
    schedules = [
        _warmup_cosine(warmup_steps=warmup_steps, total_steps=total_steps, floor=floor)
        for floor in _floors(optimizer, min_lr)
    ]
    return ScheduledLR(optimizer, schedules, last_epoch)


def warmup_linear(
    optimizer: Optimizer, *, warmup_steps: int, total_steps: int, min_lr=None, last_epoch: int = -1
) -> ScheduledLR:
    """Linear warmup from 0 over `warmup_steps`, then linear decay to `min_lr` (default 0) at
    `total_steps`, where the lr stays.

    Factor ``step / max(1, warmup_steps)``, then
    ``max(0, (total_steps - step) / max(1, total_steps - warmup_steps))`` lifted onto
    ``[min_lr / lr, 1]``: transformers' ``get_linear_schedule_with_warmup`` number for number.
    """
    check_run(warmup_steps, total_steps)
    schedules = [
        _warmup_linear(warmup_steps=warmup_steps, total_steps=total_steps, floor=floor)
        for floor in _floors(optimizer, min_lr)
    ]
    return ScheduledLR(optimizer, schedules, last_epoch)


def warmup_constant(
    optimizer: Optimizer, *, warmup_steps: int, total_steps: int | None = None, last_epoch: int = -1
) -> ScheduledLR:
    """Linear warmup from 0 over `warmup_steps`, then the base lr (transformers'
    ``get_constant_schedule_with_warmup``). `total_steps` is only checked against the warmup."""
    schedule = _warmup_constant(warmup_steps=warmup_steps, total_steps=total_steps)
    return ScheduledLR(optimizer, schedule, last_epoch)


def warmup_inverse_sqrt(
    optimizer: Optimizer,
    *,
    warmup_steps: int,
    total_steps: int | None = None,
    timescale: int | None = None,
    min_lr=None,
    last_epoch: int = -1,
) -> ScheduledLR:
    """Linear warmup from 0 over `warmup_steps`, then ``1 / sqrt((t + timescale) / timescale)``
    with ``t = step - warmup_steps``, never below `min_lr`.

    `timescale` defaults to `warmup_steps` (or 10 000 without warmup), which makes the decay
    ``sqrt(warmup_steps / step)``: transformers' ``get_inverse_sqrt_schedule``.
    `total_steps` is only checked against the warmup.
    """
    check_run(warmup_steps, total_steps, total_required=False)
    schedules = [
        _warmup_inverse_sqrt(
            warmup_steps=warmup_steps, total_steps=total_steps, timescale=timescale, floor=floor
        )
        for floor in _floors(optimizer, min_lr)
    ]
    return ScheduledLR(optimizer, schedules, last_epoch)


def transformer(
    optimizer: Optimizer,
    *,
    warmup_steps: int = 4000,
    d_model: int = 512,
    total_steps: int | None = None,
    last_epoch: int = -1,
) -> ScheduledLR:
    """The "Attention Is All You Need" schedule:
    ``lr * d_model**-0.5 * min(step**-0.5, step * warmup_steps**-1.5)`` (0 at step 0);
    `d_model` defaults to the paper's base model, 512.

    The formula is the paper's absolute lr, used as a factor of each group's base lr: construct
    the optimizer with ``lr=1.0`` for the paper's values (any other lr scales the curve).
    `total_steps` is only checked against the warmup.
    """
    schedule = _transformer(warmup_steps=warmup_steps, d_model=d_model, total_steps=total_steps)
    return ScheduledLR(optimizer, schedule, last_epoch)
