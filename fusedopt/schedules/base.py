"""The Schedule base class, argument checks shared by every schedule, and `join`.

A schedule is an immutable value: calling it with a step returns a number, nothing else changes.
"""

from __future__ import annotations

import bisect
import math
import numbers
from dataclasses import dataclass
from typing import Callable, Sequence


# --- argument checks: every failure is a ValueError whose message starts with the argument name


def check_count(name: str, value, minimum: int = 0) -> int:
    """A step count: an integer (not a bool) no smaller than `minimum`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_number(
    name: str,
    value,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
) -> float:
    """A finite real number in [low, high] (or (low, high] with `low_open`)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    below = low is not None and (value <= low if low_open else value < low)
    above = high is not None and value > high
    if below or above:
        left = "(" if low_open else "["
        interval = f"{left}{'-inf' if low is None else low}, {'inf' if high is None else high}]"
        raise ValueError(f"{name} must lie in {interval}, got {value!r}")
    return float(value)


def check_step(step) -> float | int:
    """The argument of every schedule: a real step >= 0."""
    if isinstance(step, bool) or not isinstance(step, numbers.Real):
        raise ValueError(f"step must be a real number >= 0, got {step!r}")
    if not (step >= 0 and math.isfinite(step)):  # also rejects nan
        raise ValueError(f"step must be a finite number >= 0, got {step!r}")
    return step


class Schedule:
    """Base class of all schedules: a pure function ``step -> lr factor``.

    Subclasses are frozen dataclasses that implement ``_value(step)`` for an already checked
    ``step >= 0`` and may override :attr:`length`. The factor multiplies a param group's base lr
    when a :class:`~fusedopt.schedules.ScheduledLR` drives the schedule.
    """

    def __call__(self, step) -> float:
        return float(self._value(check_step(step)))

    def _value(self, step) -> float:
        raise NotImplementedError

    @property
    def length(self) -> int | None:
        """Steps after which the factor no longer changes; None when it changes forever."""
        return None

    def values(self, total_steps: int) -> list[float]:
        """The factors at steps ``0, 1, ..., total_steps`` (inclusive)."""
        total_steps = check_count("total_steps", total_steps)
        return [self(step) for step in range(total_steps + 1)]

    def plot(
        self,
        total_steps: int | None = None,
        path=None,
        *,
        base_lr: float = 1.0,
        ax=None,
        size: tuple[int, int] = (800, 500),
        dpi: int = 100,
        label: str | None = None,
        title: str | None = None,
        log_scale: bool = False,
    ):
        """Draw ``base_lr * self(step)`` for steps ``0..total_steps`` with matplotlib.

        Args:
            total_steps: last step drawn; defaults to :attr:`length` when the schedule has one.
            path: where to write a PNG (``size`` pixels at ``dpi``); nothing is written if None.
            base_lr: the lr the factor multiplies (1.0 draws the factor itself).
            ax: an existing matplotlib Axes to draw on; a new figure is made when None.
            size: (width, height) of a new figure in pixels.
            dpi: dots per inch of a new figure.
            label, title: legend label of the curve and title of the Axes.
            log_scale: logarithmic lr axis.

        Returns:
            The matplotlib Axes drawn on. Needs matplotlib (``pip install fusedopt[plot]``).
        """
        from .plotting import plot_curves

        if total_steps is None:
            total_steps = self.length
            if not total_steps:
                raise ValueError(
                    f"total_steps is required to plot {type(self).__name__} "
                    f"(its length is {total_steps})"
                )
        total_steps = check_count("total_steps", total_steps, minimum=1)
        base_lr = check_number("base_lr", base_lr, low=0.0)
        curve = [base_lr * factor for factor in self.values(total_steps)]
        return plot_curves(
            {label or type(self).__name__: curve},
            path=path,
            ax=ax,
            size=size,
            dpi=dpi,
            title=title,
            ylabel="lr factor" if base_lr == 1.0 else "lr",
            log_scale=log_scale,
        )


@dataclass(frozen=True)
class Join(Schedule):
    """Phases joined at step boundaries, each phase counting steps from its own start.

    ``Join([a, b, c], boundaries=[n1, n2])(step)`` is ``a(step)`` for ``step < n1``,
    ``b(step - n1)`` for ``n1 <= step < n2`` and ``c(step - n2)`` from ``n2`` on.
    Boundaries are non-decreasing integers >= 0; a phase between two equal boundaries is skipped.
    """

    schedules: Sequence[Callable[[int], float]]
    boundaries: Sequence[int]

    def __post_init__(self):
        schedules = tuple(self.schedules)
        if not schedules:
            raise ValueError("schedules must hold at least one schedule")
        for index, schedule in enumerate(schedules):
            if not callable(schedule):
                raise ValueError(f"schedules[{index}] is not callable: {schedule!r}")
        boundaries = tuple(
            check_count(f"boundaries[{index}]", boundary)
            for index, boundary in enumerate(self.boundaries)
        )
        if len(boundaries) != len(schedules) - 1:
            raise ValueError(
                f"boundaries must hold len(schedules) - 1 = {len(schedules) - 1} steps, "
                f"got {len(boundaries)}"
            )
        if any(later < earlier for earlier, later in zip(boundaries, boundaries[1:])):
            raise ValueError(f"boundaries must be non-decreasing, got {list(boundaries)}")
        object.__setattr__(self, "schedules", schedules)
        object.__setattr__(self, "boundaries", boundaries)

    def _value(self, step):
        phase = bisect.bisect_right(self.boundaries, step)
        start = self.boundaries[phase - 1] if phase else 0
        return self.schedules[phase](step - start)

    @property
    def length(self) -> int | None:
        last = self.schedules[-1]
        tail = last.length if isinstance(last, Schedule) else None
        if tail is None:
            return None
        return (self.boundaries[-1] if self.boundaries else 0) + tail


def join(schedules: Sequence[Callable[[int], float]], boundaries: Sequence[int]) -> Join:
    """Join phases at step boundaries; see :class:`Join`."""
    return Join(schedules, boundaries)
