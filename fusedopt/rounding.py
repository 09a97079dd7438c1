"""How updated bf16 params are stored: rounded to nearest (the default), rounded stochastically
(unbiased: E[stored] = fp32 value), or kept as fp32 master copies the bf16 params are rounded from.
"""
import torch

from . import distributed, formats, reference
from .steps import as_float


MASTER_WEIGHTS = (False, True, "remainder")


def param_rounding(stochastic_rounding, master_weights):
    """How updated bf16 params are stored: "nearest", "stochastic", "master" (fp32 copies) or
    "remainder" (the fp32 master as the bf16 param and a 16-bit remainder)."""
    if master_weights not in MASTER_WEIGHTS:
        raise ValueError(f"Invalid master_weights: {master_weights!r} (expected one of False, True, 'remainder')")
    if stochastic_rounding and master_weights:
        raise ValueError("stochastic_rounding and master_weights are alternatives: with an fp32 master the "
                         "bf16 param is rounded to nearest from it")
    if master_weights == "remainder":
        return "remainder"
    return "stochastic" if stochastic_rounding else "master" if master_weights else "nearest"


def master_key(param_rounding):
    """The state key of a bf16 param's master: its fp32 copy, or its 16-bit remainder."""
    return "master_remainder" if param_rounding == "remainder" else "master_param"


def split_master(master):
    """An fp32 master as (bf16 param, int16 remainder), from which join_master gives it back bit for
    bit: the param is the master rounded to nearest, ties away from zero (so that the remainder,
    the master's bits less the param's, fits 16 bits); NaN stays NaN."""
    bits = master.contiguous().view(torch.int32).to(torch.int64)
    high = (bits + 0x8000) >> 16
    remainder = (bits - (high << 16)).to(torch.int16)
    high = torch.where(master.isnan(), torch.full_like(high, 0x7FC0), high)
    return (high & 0xFFFF).to(torch.int32).to(torch.int16).view(torch.bfloat16), remainder


def join_master(param, remainder):
    """The fp32 master a bf16 param and its int16 remainder stand for (split_master's inverse)."""
    high = param.contiguous().view(torch.int16).to(torch.int64) & 0xFFFF
    bits = ((high << 16) + remainder.to(torch.int64)) & 0xFFFFFFFF
    bits = torch.where(bits >= 2**31, bits - 2**32, bits)
    return bits.to(torch.int32).view(torch.float32)


def check_rounding_seed(seed):
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValueError(f"Invalid rounding_seed: {seed!r} (expected an int in [0, 2**63))")
    return seed


def keeps_master(param_rounding, param):
    """Whether `param` keeps a master in its state (an fp32 copy, or a remainder): bf16 under
    master_weights=True or "remainder"."""
    return param_rounding in ("master", "remainder") and param.dtype == torch.bfloat16


def rounded_reference_step(optimizer, group, params, grads):
    """optimizer.reference_step, with bf16 params updated through fp32 (their master copies or
    remainders, or copies rounded back stochastically) where param_rounding asks for it, and states
    stored in bf16 or 8 bits (fusedopt.formats) decoded for the step and encoded back."""
    state = optimizer.state
    rounding = optimizer.param_rounding
    rounded = [p.dtype == torch.bfloat16 and rounding != "nearest" for p in params]
    count = int(as_float(group["group_step"])) if "group_step" in group else 0
    stored = {}  # (param index, key): the tensors a state was stored in, while it steps decoded
    for index, p in enumerate(params):
        for key in optimizer._state_keys(group):
            if key in state[p] and formats.format_of(state[p], key, p) != formats.PLAIN:
                stored[index, key] = {suffix: state[p][key + suffix] for suffix in formats.suffixes(state[p], key)}
                state[p][key] = formats.decode(state[p], key, torch.promote_types(p.dtype, torch.float32))
    targets = [p if not flag else state[p]["master_param"] if rounding == "master" else
               join_master_of(p, state[p]["master_remainder"]) if rounding == "remainder" else p.detach().float()
               for p, flag in zip(params, rounded)]
    optimizer.reference_step(group, params, grads, targets if any(rounded) else None)
    local = distributed.local_tensor
    with torch.no_grad():
        for index, (p, target, flag) in enumerate(zip(params, targets, rounded)):
            if not flag or rounding == "master":
                if flag:  # rounded as beside a remainder (split_master): the same params
                    local(p).copy_(split_master(local(target))[0])
                continue
            if rounding == "remainder":
                param, remainder = split_master(local(target))
                local(p).copy_(param)
                local(state[p]["master_remainder"]).copy_(remainder)
            else:  # on the local shards of DTensors: the random bits are drawn per shard
                local(p).copy_(reference.stochastic_round_to_bfloat16(local(target), (optimizer.rounding_seed, count,
                                                                                       index)))
        keys = list(optimizer._state_keys(group))
        for (index, key), tensors in stored.items():
            p = params[index]
            values = state[p][key]
            for suffix, tensor in tensors.items():
                state[p][key + suffix] = tensor
            formats.encode(values, state[p], key, group.get("state_rounding", "nearest"),
                           (optimizer.rounding_seed, count, index, 1 + keys.index(key)))
        # a state the step made (SGD's first momentum buffer) takes the format its group asks for
        for index, p in enumerate(params):
            optimizer._store_in_group_format(
                group, p, group.get("state_rounding", "nearest"),
                lambda key, index=index: (optimizer.rounding_seed, count, index, 1 + keys.index(key)))


def follow_written_param(master, param):
    """Where the bf16 `param` is no longer its fp32 `master` rounded to nearest (ties away from
    zero, as the step leaves it, or to even, as earlier versions did), the param was written since
    (a model's load_state_dict): there the master becomes the param (in place, shard by shard; a
    NaN stays a NaN)."""
    local = distributed.local_tensor
    master, param = local(master), local(param).detach()
    rounded = (split_master(master)[0] == param) | (master.to(torch.bfloat16) == param)
    master.copy_(torch.where(rounded, master, param.float()))


def master_from(param, state, key):
    """A bf16 param's master in the form `key` names ("master_param": an fp32 copy;
    "master_remainder"), from the other form in its `state`: the same master bit for bit. (From a
    copy, the param becomes the copy rounded ties away from zero, as the step leaves it: it moves
    only where a checkpoint of an earlier version rounded a tie to even.)"""
    local = distributed.local_tensor
    target = torch.empty_like(local(param), dtype=torch.float32 if key == "master_param" else torch.int16,
                              memory_format=torch.preserve_format)
    if key == "master_param":
        target.copy_(join_master(local(param), local(state["master_remainder"])))
    else:
        high, remainder = split_master(local(state["master_param"]))
        local(param).copy_(high)
        target.copy_(remainder)
    return distributed.shard_like(target, param)


def join_master_of(param, remainder):
    """join_master on local shards, as a tensor like `param` (a DTensor for a DTensor param)."""
    master = join_master(distributed.local_tensor(param), distributed.local_tensor(remainder))
    return distributed.shard_like(master, param)
