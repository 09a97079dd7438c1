"""torch.optim's layout of the per-param step count, state["step"], and its reading as a number."""
import torch

# torch.optim's error for a state["step"] that is not a tensor
STEP_NOT_A_TENSOR = "API has changed, `state_steps` argument must contain a list of singleton tensors"


def as_float(value):
    return value.item() if torch.is_tensor(value) else float(value)


def as_step_tensor(step):
    """A loaded step in torch.optim's default layout: legacy numbers, and the device steps of
    fused or capturable checkpoints, become 0-dim CPU tensors (loading may synchronise)."""
    if not torch.is_tensor(step):
        return torch.tensor(float(step), dtype=scalar_step_tensor().dtype)
    if step.device.type != "cpu" or step.dim() != 0:
        return step.detach().to("cpu").reshape(())
    return step


def scalar_step_tensor(device=None):
    """torch.optim's layout of state['step']: a 0-dim tensor, on the CPU unless capturable (then
    float32 on the param's device)."""
    if device is not None:
        return torch.zeros((), dtype=torch.float32, device=device)
    dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
    return torch.tensor(0.0, dtype=dtype)
