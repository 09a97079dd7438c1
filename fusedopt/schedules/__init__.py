"""Learning-rate schedules: warmup and decay phases that compose, driven by a torch LRScheduler.

Works with fusedopt's optimizers and with any ``torch.optim.Optimizer``::

    from fusedopt import schedules
    sched = schedules.warmup_cosine(opt, warmup_steps=500, total_steps=20_000, min_lr=1e-5)
    for batch in loader:
        ...; opt.step(); sched.step()

Schedules are immutable (frozen dataclasses) pure functions ``schedule(step) -> factor``; the lr of
a param group at a step is ``base_lr * factor`` (the base lr is the group's lr when the scheduler
was attached). Each phase counts steps from its own start.

Warmup phases (the factor rises to 1 over ``steps``, then stays at 1):
    linear_warmup(steps, start=0.0)          start + (1 - start) * t / steps
    exponential_warmup(steps, start=0.01)    start ** (1 - t / steps)
    constant_warmup(steps, factor=0.1)       factor, then 1 from t = steps

Decay phases (the factor starts at 1; ``floor`` is the factor they end at and keep):
    constant(value=1.0)                      value
    step_decay(step_size, gamma=0.1)         gamma ** (t // step_size)
    multistep_decay(milestones, gamma=0.1)   gamma ** (number of milestones <= t)
    exponential_decay(gamma, floor=0.0)      max(floor, gamma ** t)
    linear_decay(steps, floor=0.0)           floor + (1 - floor) * (1 - t / steps)
    polynomial_decay(steps, power=1.0, floor=0.0)
                                             floor + (1 - floor) * (1 - t / steps) ** power
    cosine_decay(steps, floor=0.0)           floor + (1 - floor) * (1 + cos(pi * t / steps)) / 2
    cosine_restarts(period, period_mult=1, floor=0.0)
                                             the cosine again from 1 after each period (SGDR)
    inverse_sqrt_decay(timescale=10_000, floor=0.0)
                                             max(floor, sqrt(timescale / (t + timescale)))
The finite decays hold ``floor`` past ``steps``.

Whole-run policies:
    transformer_schedule(d_model, warmup_steps=4000)
        d_model**-0.5 * min(t**-0.5, t * warmup_steps**-1.5): an absolute lr (use base lr 1.0)
    one_cycle(total_steps, pct_start=0.3, div_factor=25.0, final_div_factor=1e4,
              anneal="cos", three_phase=False)
        the 1cycle policy as a factor of the peak lr (torch's OneCycleLR, lr only)

Composition: ``join(schedules, boundaries)`` runs ``schedules[i]`` from ``boundaries[i - 1]`` on,
e.g. ``join([linear_warmup(500), cosine_decay(19_500, floor=0.01)], boundaries=[500])``.

Driving: ``ScheduledLR(optimizer, schedule_or_list_per_group, last_epoch=-1)``, a
``torch.optim.lr_scheduler.LRScheduler`` (``step()``, ``get_last_lr()``, ``state_dict()``, ...).

Recipes, optimizer first (each returns a ``ScheduledLR``):
    ``warmup_cosine(opt, *, warmup_steps, total_steps, min_lr=None)``
    ``warmup_linear(opt, *, warmup_steps, total_steps, min_lr=None)``
    ``warmup_constant(opt, *, warmup_steps, total_steps=None)``
    ``warmup_inverse_sqrt(opt, *, warmup_steps, total_steps=None, timescale=None, min_lr=None)``
    ``transformer(opt, *, warmup_steps=4000, d_model=512, total_steps=None)``
``from_name(name, **kwargs)`` returns the schedule behind a recipe name (and ``one_cycle``).

Plotting (needs matplotlib: ``pip install fusedopt[plot]``): ``schedule.plot(total_steps, path)``,
``sched.plot(...)``, or ``python -m fusedopt.schedules plot warmup_cosine --warmup-steps 500
--total-steps 20000 -o lr.png``.
"""

from .base import Join, Schedule, join
from .phases import (
    Constant,
    ConstantWarmup,
    CosineDecay,
    CosineRestarts,
    ExponentialDecay,
    ExponentialWarmup,
    InverseSqrtDecay,
    LinearDecay,
    LinearWarmup,
    MultiStepDecay,
    OneCycle,
    PolynomialDecay,
    StepDecay,
    TransformerSchedule,
    constant,
    constant_warmup,
    cosine_decay,
    cosine_restarts,
    exponential_decay,
    exponential_warmup,
    inverse_sqrt_decay,
    linear_decay,
    linear_warmup,
    multistep_decay,
    one_cycle,
    polynomial_decay,
    step_decay,
    transformer_schedule,
)
from .recipes import (
    RECIPES,
    from_name,
    transformer,
    warmup_constant,
    warmup_cosine,
    warmup_inverse_sqrt,
    warmup_linear,
)
from .scheduler import ScheduledLR

__all__ = [
    # composition and driving
    "Schedule",
    "Join",
    "join",
    "ScheduledLR",
    # warmup phases
    "linear_warmup",
    "exponential_warmup",
    "constant_warmup",
    # decay phases
    "constant",
    "step_decay",
    "multistep_decay",
    "exponential_decay",
    "linear_decay",
    "polynomial_decay",
    "cosine_decay",
    "cosine_restarts",
    "inverse_sqrt_decay",
    # whole-run policies
    "transformer_schedule",
    "one_cycle",
    # recipes
    "warmup_cosine",
    "warmup_linear",
    "warmup_constant",
    "warmup_inverse_sqrt",
    "transformer",
    "from_name",
    "RECIPES",
    # the classes behind the lower-case names
    "LinearWarmup",
    "ExponentialWarmup",
    "ConstantWarmup",
    "Constant",
    "StepDecay",
    "MultiStepDecay",
    "ExponentialDecay",
    "LinearDecay",
    "PolynomialDecay",
    "CosineDecay",
    "CosineRestarts",
    "InverseSqrtDecay",
    "TransformerSchedule",
    "OneCycle",
]
