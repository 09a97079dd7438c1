"""ScheduledLR: the torch.optim.lr_scheduler.LRScheduler that drives schedules.

Works with any torch.optim.Optimizer; one schedule for all param groups or one per group.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from .base import Schedule, check_count

# Attributes rebuilt by the constructor and never written to a checkpoint: the schedules may be
# arbitrary callables, and `torch.load(weights_only=True)` only reads plain data.
_NOT_SAVED = ("optimizer", "schedules")


class ScheduledLR(LRScheduler):
    """Sets each param group's lr to ``base_lr * schedule(step)``.

    ``step`` is :attr:`last_epoch`, the number of :meth:`step` calls so far: construction sets
    the lrs of step 0, and every ``sched.step()`` (after ``opt.step()``) moves one step on.
    ``base_lr`` is the group's ``initial_lr`` (its lr when the first scheduler was attached),
    as for every torch scheduler.

    Args:
        optimizer: any ``torch.optim.Optimizer``.
        schedule: a schedule (any callable ``step -> factor``) applied to every param group, or a
            sequence with one schedule per param group.
        last_epoch: the step to resume at; ``-1`` (the default) starts a new run.

    ``state_dict()`` holds the step counter and lrs but not the schedules: on resume, build the
    scheduler again with the same schedules and call ``load_state_dict``; the run continues with
    the same sequence of lrs. The lrs are a closed form of the step, so ``step(epoch)`` jumps
    directly and the scheduler mixes with torch's ``SequentialLR`` and ``ChainedScheduler``.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        schedule: Callable[[int], float] | Sequence[Callable[[int], float]],
        last_epoch: int = -1,
    ) -> None:
        groups = len(getattr(optimizer, "param_groups", ()))
        if callable(schedule):
            schedules = [schedule] * groups
        elif isinstance(schedule, (list, tuple)):
            if len(schedule) != groups:
                raise ValueError(
                    f"schedule must be one schedule or a list with one per param group: "
                    f"got {len(schedule)} schedules for {groups} param groups"
                )
            schedules = list(schedule)
            for index, item in enumerate(schedules):
                if not callable(item):
                    raise ValueError(f"schedule[{index}] is not callable: {item!r}")
        else:
            raise ValueError(f"schedule must be callable or a list of callables, got {schedule!r}")
        if last_epoch != -1 and (
            isinstance(last_epoch, bool) or not isinstance(last_epoch, int) or last_epoch < 0
        ):
            raise ValueError(f"last_epoch must be -1 (a new run) or a step >= 0, got {last_epoch!r}")
        self.schedules = schedules
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[Any]:
        """The lrs of step :attr:`last_epoch`: ``base_lr * schedule(last_epoch)`` per group."""
        return [
            base_lr * schedule(self.last_epoch)
            for base_lr, schedule in zip(self.base_lrs, self.schedules)
        ]

    def _get_closed_form_lr(self) -> list[Any]:
        return self.get_lr()

    def state_dict(self) -> dict[str, Any]:
        """The step counter, base lrs and last lrs (plain data: no schedules, no optimizer)."""
        return {key: value for key, value in self.__dict__.items() if key not in _NOT_SAVED}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the step counter, base lrs and last lrs saved by :meth:`state_dict`.

        The optimizer's lrs are left as they are, as with torch's schedulers: load the
        optimizer's own state_dict too (it holds the lrs of the saved step).
        """
        self.__dict__.update(
            {key: value for key, value in state_dict.items() if key not in _NOT_SAVED}
        )

    def plot(
        self,
        total_steps: int | None = None,
        path=None,
        *,
        ax=None,
        size: tuple[int, int] = (800, 500),
        dpi: int = 100,
        title: str | None = None,
        log_scale: bool = False,
    ):
        """Draw each param group's lr over steps ``0..total_steps``; see :meth:`Schedule.plot`.

        Evaluates the schedules only: the scheduler and optimizer are left untouched.
        """
        from .plotting import plot_curves

        if total_steps is None:
            lengths = [s.length for s in self.schedules if isinstance(s, Schedule)]
            if len(lengths) != len(self.schedules) or not all(lengths):
                raise ValueError("total_steps is required: a schedule here has no end")
            total_steps = max(lengths)
        total_steps = check_count("total_steps", total_steps, minimum=1)
        curves = {
            f"group {index}": [float(base_lr) * schedule(step) for step in range(total_steps + 1)]
            for index, (base_lr, schedule) in enumerate(zip(self.base_lrs, self.schedules))
        }
        return plot_curves(
            curves,
            path=path,
            ax=ax,
            size=size,
            dpi=dpi,
            title=title,
            ylabel="lr",
            log_scale=log_scale,
        )
