"""A learning-rate schedule evaluated by the kernels: each group's lr is scaled by the schedule's
factor read at the group's step count on the device, so nothing on the host changes between steps
and a captured CUDA graph replays a whole scheduled run.

The count (``group["group_step"]``, saved in state_dict) also keys stochastic rounding's random bits.
"""
import torch

from .steps import as_float


class DeviceSchedule:
    """A fusedopt.schedules.Schedule tabulated once, for steps 0..length (the last factor is held)."""

    def __init__(self, schedule, schedule_steps, param_groups):
        from .schedules import Schedule

        if not isinstance(schedule, Schedule):
            raise TypeError(f"schedule must be a fusedopt.schedules.Schedule, got {type(schedule).__name__}")
        length = schedule.length
        if schedule_steps is not None:
            if isinstance(schedule_steps, bool) or not isinstance(schedule_steps, int) or schedule_steps < 1:
                raise ValueError(f"Invalid schedule_steps: {schedule_steps!r} (expected an int >= 1)")
            length = max(length or 0, schedule_steps)
        elif length is None:
            raise ValueError(f"{type(schedule).__name__} has no end: pass schedule_steps, the number of steps "
                             "whose factors the kernels should read (the last one is held after them)")
        for group in param_groups:
            if torch.is_tensor(group["lr"]):
                raise ValueError("schedule= scales a number lr (the base lr); this group's lr is a tensor")
        self.schedule = schedule
        self.factors = schedule.values(length)  # steps 0..length

    def factor(self, group):
        """The factor at the group's current step, on the host (the plain-torch path)."""
        count = int(as_float(group["group_step"]))
        return self.factors[max(0, min(count, len(self.factors)) - 1)]

    def on_device(self, device):
        """The factors as an fp64 tensor on `device`."""
        return torch.tensor(self.factors, dtype=torch.float64, device=device)

    def current_lr(self, group):
        """The lr the last step used in `group`: base lr times the factor, read on the device."""
        count = group["group_step"]
        table = self.on_device(count.device)
        return group["lr"] * table[count.long().clamp(1, table.numel()) - 1]


def advance_group_step(group, device=None):
    """Count this step() in the group's counter (``group["group_step"]``: a 0-dim fp32 tensor made
    at the first step, kept on `device`, the first kernel bucket's, so that counting needs no
    copy); returns it."""
    count = group.get("group_step")
    if count is None or (device is not None and count.device != device):
        with torch.inference_mode(False):  # counted in place at every step, in inference mode or not
            if count is None:
                count = torch.zeros((), dtype=torch.float32)
            if device is not None and count.device != device:
                count = count.to(device)
    group["group_step"] = count
    count += 1
    return count
