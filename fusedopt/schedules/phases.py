"""The schedule building blocks: warmup phases, decay phases and two whole-run policies.

Each is a frozen dataclass mapping a step (counted from the start of the phase) to an lr factor.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Sequence

from .base import Schedule, check_count, check_number


def _set(obj, name: str, value) -> None:
    """Store a checked, normalised field value on a frozen dataclass."""
    object.__setattr__(obj, name, value)


def _cosine_from_one(progress: float) -> float:
    """Half a cosine wave: 1 at progress 0, 0 at progress 1."""
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _lift(value: float, floor: float) -> float:
    """Map a factor in [0, 1] onto [floor, 1]."""
    # NOTE: written as value * (1 - floor) + floor so that floor=0 returns `value` bit for bit
    # (transformers' formulas then match exactly, min_lr_rate variant included).
    return value * (1.0 - floor) + floor


# --------------------------------------------------------------------------------------- warmups


@dataclass(frozen=True)
class LinearWarmup(Schedule):
    """``start + (1 - start) * t / steps`` for ``t < steps``, then 1."""

    steps: int
    start: float = 0.0

    def __post_init__(self):
        _set(self, "steps", check_count("steps", self.steps))
        _set(self, "start", check_number("start", self.start, low=0.0, high=1.0))

    def _value(self, t):
        if t >= self.steps:
            return 1.0
        return self.start + (1.0 - self.start) * (t / self.steps)

    @property
    def length(self) -> int:
        return self.steps


@dataclass(frozen=True)
class ExponentialWarmup(Schedule):
    """Geometric growth: ``start ** (1 - t / steps)`` for ``t < steps``, then 1."""

    steps: int
    start: float = 0.01

    def __post_init__(self):
        _set(self, "steps", check_count("steps", self.steps))
        _set(self, "start", check_number("start", self.start, low=0.0, high=1.0, low_open=True))

    def _value(self, t):
        if t >= self.steps:
            return 1.0
        return self.start ** (1.0 - t / self.steps)

    @property
    def length(self) -> int:
        return self.steps


@dataclass(frozen=True)
class ConstantWarmup(Schedule):
    """``factor`` for ``t < steps``, then 1 (torch's ``ConstantLR``)."""

    steps: int
    factor: float = 0.1

    def __post_init__(self):
        _set(self, "steps", check_count("steps", self.steps))
        _set(self, "factor", check_number("factor", self.factor, low=0.0, high=1.0))

    def _value(self, t):
        return self.factor if t < self.steps else 1.0

    @property
    def length(self) -> int:
        return self.steps


# ---------------------------------------------------------------------------------------- decays


@dataclass(frozen=True)
class Constant(Schedule):
    """``value`` at every step."""

    value: float = 1.0

    def __post_init__(self):
        _set(self, "value", check_number("value", self.value, low=0.0))

    def _value(self, t):
        return self.value

    @property
    def length(self) -> int:
        return 0


@dataclass(frozen=True)
class StepDecay(Schedule):
    """``gamma ** (t // step_size)`` (torch's ``StepLR``)."""

    step_size: int
    gamma: float = 0.1

    def __post_init__(self):
        _set(self, "step_size", check_count("step_size", self.step_size, minimum=1))
        _set(self, "gamma", check_number("gamma", self.gamma, low=0.0, low_open=True))

    def _value(self, t):
        return self.gamma ** (t // self.step_size)


@dataclass(frozen=True)
class MultiStepDecay(Schedule):
    """``gamma ** (number of milestones <= t)`` (torch's ``MultiStepLR``; a repeated milestone
    counts twice)."""

    milestones: Sequence[int]
    gamma: float = 0.1

    def __post_init__(self):
        milestones = tuple(
            sorted(check_count(f"milestones[{i}]", m) for i, m in enumerate(self.milestones))
        )
        _set(self, "milestones", milestones)
        _set(self, "gamma", check_number("gamma", self.gamma, low=0.0, low_open=True))

    def _value(self, t):
        return self.gamma ** bisect.bisect_right(self.milestones, t)

    @property
    def length(self) -> int:
        return self.milestones[-1] if self.milestones else 0


@dataclass(frozen=True)
class ExponentialDecay(Schedule):
    """``max(floor, gamma ** t)`` (torch's ``ExponentialLR`` when ``floor=0``)."""

    gamma: float
    floor: float = 0.0

    def __post_init__(self):
        _set(self, "gamma", check_number("gamma", self.gamma, low=0.0, low_open=True))
        _set(self, "floor", check_number("floor", self.floor, low=0.0, high=1.0))

    def _value(self, t):
        return max(self.floor, self.gamma**t)


@dataclass(frozen=True)
class LinearDecay(Schedule):
    """From 1 at ``t = 0`` straight down to ``floor`` at ``t = steps``, then ``floor``."""

    steps: int
    floor: float = 0.0

    def __post_init__(self):
        _set(self, "steps", check_count("steps", self.steps))
        _set(self, "floor", check_number("floor", self.floor, low=0.0, high=1.0))

    def _value(self, t):
        remaining = max(0.0, (self.steps - t) / max(1, self.steps))
        return _lift(remaining, self.floor)

    @property
    def length(self) -> int:
        return self.steps


@dataclass(frozen=True)
class PolynomialDecay(Schedule):
    """``floor + (1 - floor) * (1 - t / steps) ** power`` for ``t < steps``, then ``floor``
    (torch's ``PolynomialLR`` when ``floor=0``)."""

    steps: int
    power: float = 1.0
    floor: float = 0.0

    def __post_init__(self):
        _set(self, "steps", check_count("steps", self.steps))
        _set(self, "power", check_number("power", self.power, low=0.0, low_open=True))
        _set(self, "floor", check_number("floor", self.floor, low=0.0, high=1.0))

    def _value(self, t):
        if t >= self.steps:
            return self.floor
        return _lift((1.0 - t / self.steps) ** self.power, self.floor)

    @property
    def length(self) -> int:
        return self.steps


@dataclass(frozen=True)
class CosineDecay(Schedule):
    """``floor + (1 - floor) * (1 + cos(pi * t / steps)) / 2`` for ``t <= steps``, then ``floor``
    (torch's ``CosineAnnealingLR`` with ``eta_min = floor * base_lr`` up to ``T_max = steps``;
    torch's curve climbs back after ``T_max``, this one stays at the floor)."""

    steps: int
    floor: float = 0.0

    def __post_init__(self):
        _set(self, "steps", check_count("steps", self.steps))
        _set(self, "floor", check_number("floor", self.floor, low=0.0, high=1.0))

    def _value(self, t):
        if t > self.steps:
            return self.floor
        # max(1, steps): a zero-length decay gives 1 at its first step, as transformers does.
        return _lift(_cosine_from_one(t / max(1, self.steps)), self.floor)

    @property
    def length(self) -> int:
        return self.steps


@dataclass(frozen=True)
class CosineRestarts(Schedule):
    """Cosine from 1 to ``floor`` over ``period`` steps, then restarts at 1 with the period
    multiplied by ``period_mult`` (SGDR; torch's ``CosineAnnealingWarmRestarts``)."""

    period: int
    period_mult: int = 1
    floor: float = 0.0

    def __post_init__(self):
        _set(self, "period", check_count("period", self.period, minimum=1))
        _set(self, "period_mult", check_count("period_mult", self.period_mult, minimum=1))
        _set(self, "floor", check_number("floor", self.floor, low=0.0, high=1.0))

    def _value(self, t):
        period = self.period
        if self.period_mult == 1:
            t = t % period
        else:
            # Subtracting whole periods keeps the restart steps exact (a log would round).
            while t >= period:
                t -= period
                period *= self.period_mult
        return _lift(_cosine_from_one(t / period), self.floor)


@dataclass(frozen=True)
class InverseSqrtDecay(Schedule):
    """``max(floor, 1 / sqrt((t + timescale) / timescale))``: 1 at ``t = 0``, then ``~ t**-0.5``."""

    timescale: int = 10_000
    floor: float = 0.0

    def __post_init__(self):
        _set(self, "timescale", check_count("timescale", self.timescale, minimum=1))
        _set(self, "floor", check_number("floor", self.floor, low=0.0, high=1.0))

    def _value(self, t):
        return max(self.floor, 1.0 / math.sqrt((t + self.timescale) / self.timescale))


# ------------------------------------------------------------------------------ whole-run policies


@dataclass(frozen=True)
class TransformerSchedule(Schedule):
    """``d_model**-0.5 * min(t**-0.5, t * warmup_steps**-1.5)`` (0 at ``t = 0``).

    "Attention Is All You Need": linear warmup to a peak of ``(d_model * warmup_steps)**-0.5``,
    then inverse square root decay. The value is the paper's absolute lr: drive it with an
    optimizer lr of 1.0 to get the paper's numbers (any other lr scales the curve).
    """

    d_model: int = 512
    warmup_steps: int = 4000

    def __post_init__(self):
        _set(self, "d_model", check_count("d_model", self.d_model, minimum=1))
        _set(self, "warmup_steps", check_count("warmup_steps", self.warmup_steps, minimum=1))

    def _value(self, t):
        if t == 0:
            return 0.0
        return self.d_model**-0.5 * min(t**-0.5, t * self.warmup_steps**-1.5)


@dataclass(frozen=True)
class OneCycle(Schedule):
    """The 1cycle policy as a factor of the peak lr (torch's ``OneCycleLR``, lr part only).

    From ``1 / div_factor`` up to 1 by step ``pct_start * total_steps - 1``, then down to
    ``1 / (div_factor * final_div_factor)`` at step ``total_steps - 1``, where it stays.
    ``anneal`` is ``"cos"`` or ``"linear"``; ``three_phase`` goes back down to
    ``1 / div_factor`` symmetrically before the final descent. Momentum is not cycled.
    """

    total_steps: int
    pct_start: float = 0.3
    div_factor: float = 25.0
    final_div_factor: float = 1e4
    anneal: str = "cos"
    three_phase: bool = False

    def __post_init__(self):
        _set(self, "total_steps", check_count("total_steps", self.total_steps, minimum=1))
        _set(self, "pct_start", check_number("pct_start", self.pct_start, low=0.0, high=1.0))
        _set(
            self,
            "div_factor",
            check_number("div_factor", self.div_factor, low=0.0, low_open=True),
        )
        _set(
            self,
            "final_div_factor",
            check_number("final_div_factor", self.final_div_factor, low=0.0, low_open=True),
        )
        if self.anneal not in ("cos", "linear"):
            raise ValueError(f"anneal must be 'cos' or 'linear', got {self.anneal!r}")
        _set(self, "three_phase", bool(self.three_phase))

    def _phases(self) -> list[tuple[float, float, float]]:
        """(end step, factor at the phase start, factor at its end) of each phase."""
        initial = 1.0 / self.div_factor
        final = initial / self.final_div_factor
        rise_end = self.pct_start * self.total_steps - 1
        last = self.total_steps - 1
        if self.three_phase:
            return [
                (rise_end, initial, 1.0),
                (2 * self.pct_start * self.total_steps - 2, 1.0, initial),
                (last, initial, final),
            ]
        return [(rise_end, initial, 1.0), (last, 1.0, final)]

    def _anneal(self, start: float, end: float, pct: float) -> float:
        if self.anneal == "cos":
            return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1.0)
        return (end - start) * pct + start

    def _value(self, t):
        t = min(t, self.total_steps - 1)
        phases = self._phases()
        phase_start = 0.0
        for index, (phase_end, start, end) in enumerate(phases):
            if t <= phase_end or index == len(phases) - 1:
                span = phase_end - phase_start
                pct = (t - phase_start) / span if span else 1.0
                return self._anneal(start, end, pct)
            phase_start = phase_end
        raise AssertionError("unreachable")

    @property
    def length(self) -> int:
        return self.total_steps - 1


# The documented lower-case spellings: ``linear_warmup(500)`` builds a ``LinearWarmup``.
linear_warmup = LinearWarmup
exponential_warmup = ExponentialWarmup
constant_warmup = ConstantWarmup
constant = Constant
step_decay = StepDecay
multistep_decay = MultiStepDecay
exponential_decay = ExponentialDecay
linear_decay = LinearDecay
polynomial_decay = PolynomialDecay
cosine_decay = CosineDecay
cosine_restarts = CosineRestarts
inverse_sqrt_decay = InverseSqrtDecay
transformer_schedule = TransformerSchedule
one_cycle = OneCycle
