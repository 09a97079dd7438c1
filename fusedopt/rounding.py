"""How updated bf16 params are stored: rounded to nearest (the default), rounded stochastically
(unbiased: E[stored] = fp32 value), or kept as fp32 master copies the bf16 params are rounded from.
"""
import torch

from . import distributed, reference
from .steps import as_float


def param_rounding(stochastic_rounding, master_weights):
    """How updated bf16 params are stored: "nearest", "stochastic" or "master" (fp32 copies)."""
    if stochastic_rounding and master_weights:
        raise ValueError("stochastic_rounding and master_weights are alternatives: with an fp32 master copy the "
                         "bf16 param is rounded to nearest from it")
    return "stochastic" if stochastic_rounding else "master" if master_weights else "nearest"


def check_rounding_seed(seed):
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValueError(f"Invalid rounding_seed: {seed!r} (expected an int in [0, 2**63))")
    return seed


def keeps_master(param_rounding, param):
    """Whether `param` has an fp32 master copy in its state: bf16 under master_weights=True."""
    return param_rounding == "master" and param.dtype == torch.bfloat16


def rounded_reference_step(optimizer, group, params, grads):
    """optimizer.reference_step, with bf16 params updated through fp32 (their master copies, or copies
    rounded back stochastically) when param_rounding asks for it."""
    rounded = [p.dtype == torch.bfloat16 and optimizer.param_rounding != "nearest" for p in params]
    if not any(rounded):
        return optimizer.reference_step(group, params, grads)
    state = optimizer.state
    targets = [state[p]["master_param"] if flag and optimizer.param_rounding == "master" else
               p.detach().float() if flag else p for p, flag in zip(params, rounded)]
    optimizer.reference_step(group, params, grads, targets)
    count = int(as_float(group["group_step"])) if "group_step" in group else 0
    with torch.no_grad():
        for index, (p, target, flag) in enumerate(zip(params, targets, rounded)):
            if not flag:
                continue
            if optimizer.param_rounding == "master":
                p.copy_(target)
            else:  # on the local shards of DTensors: the random bits are drawn per shard
                bf16_values = reference.stochastic_round_to_bfloat16(distributed.local_tensor(target),
                                                                     (optimizer.rounding_seed, count, index))
                distributed.local_tensor(p).copy_(bf16_values)
