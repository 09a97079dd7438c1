"""How optimizer states are stored: as the param (torch.optim's layout), in bf16, or as blockwise
8-bit codes with one scale per block; and an fp32 master kept as the bf16 param plus a 16-bit
remainder. The kernels decode each state on load and encode it on store in their shared load/store
path, so a rule's equations never see a format; this module holds the host side (which format a
state takes, making it, reading it off the tensors) and the plain-torch codec, which is the
reference the kernels are held to.

A param's format is decided from its global shape (a DTensor's, not its shard's), so every mesh
stores the same numbers: fewer than SMALLEST_QUANTIZED elements keep the param's dtype; 8-bit
blocks lie within one dim-0 slice of the param (QUANT_BLOCK elements of one row), so that an FSDP2
shard, which holds whole dim-0 slices, never splits one, and the scales (one per block, shaped
(rows, row // QUANT_BLOCK)) shard with the param; a param whose rows cannot be cut so (1-D, or a
row length that is not a multiple of QUANT_BLOCK) takes bf16, which needs no blocks.
"""
import math
from typing import NamedTuple

import torch

PRECISIONS = ("fp32", "bf16", "8bit")
STATE_ROUNDINGS = ("nearest", "stochastic")

# Storage formats of one state tensor
ABSENT, PLAIN, BF16, Q8 = "absent", "plain", "bf16", "8bit"

QUANT_BLOCK = 64  # elements per 8-bit block (one row's): one fp32 scale each, 1/16 byte per element
SMALLEST_QUANTIZED = 4096  # params with fewer elements keep states in their own dtype
SIGNED_CODES = 127  # signed states: codes -127..127 (int8); non-negative: 0..255 (uint8)
UNSIGNED_CODES = 255
SCALES = "_scales"  # state[key + SCALES]: the scales of an 8-bit state
CODE_DTYPES = (torch.int8, torch.uint8)  # the codes of signed, of non-negative 8-bit states
MASTER_KEYS = ("master_param", "master_remainder")  # a bf16 param's master: an fp32 copy, a 16-bit remainder


# How a param is stored (Storage.param_rounding); each kernel backend codes them by their index here
PARAM_ROUNDINGS = ("nearest", "stochastic", "master", "remainder")


class Storage(NamedTuple):
    """How a kernel bucket's tensors are stored, one of its kernel's compile-time constants: each
    state slot's format (ABSENT, PLAIN, BF16, Q8), the rounding of bf16 and 8-bit states
    ("nearest", "stochastic"), and the param's ("nearest", "stochastic", "master": an fp32 copy,
    "remainder": a 16-bit remainder)."""

    states: tuple
    state_rounding: str = "nearest"
    param_rounding: str = "nearest"


def suffixes(state, key):
    """The key suffixes of the tensors state[key] is made of: its values (or codes), and the scales
    of 8-bit codes."""
    return ("", SCALES) if state[key].dtype in CODE_DTYPES else ("",)


def check_precision(value):
    if value not in PRECISIONS:
        raise ValueError(f"Invalid state_precision: {value!r} (expected one of {', '.join(map(repr, PRECISIONS))})")
    return value


def check_state_rounding(value):
    if value not in STATE_ROUNDINGS:
        raise ValueError(f"Invalid state_rounding: {value!r} (expected one of "
                         f"{', '.join(map(repr, STATE_ROUNDINGS))})")
    return value


def blocks_fit(param):
    """Whether 8-bit blocks can be laid out within the dim-0 slices of `param` (its global shape):
    2-D or more, contiguous, rows a whole number of blocks, and a DTensor split over dim 0 alone."""
    from . import distributed

    if param.dim() < 2 or not param.is_contiguous() or not param.shape[0]:
        return False
    if distributed.is_dtensor(param) and not distributed.splits_rows_only(param):
        return False
    return (param.numel() // param.shape[0]) % QUANT_BLOCK == 0


def state_format(precision, param, coded=True):
    """The format of `param`'s states under `precision` ("fp32", "bf16", "8bit"), from its global
    shape and dtype; complex params (updated as real views) and fp64 ones keep their dtype. A state
    that may not be `coded` takes bf16 where it would take 8-bit codes."""
    check_precision(precision)
    if precision == "fp32" or param.is_complex() or param.dtype == torch.float64 or not param.is_floating_point():
        return PLAIN
    if precision == "bf16" or param.numel() < SMALLEST_QUANTIZED:
        return PLAIN if param.dtype == torch.bfloat16 or param.numel() < SMALLEST_QUANTIZED else BF16
    return Q8 if coded and blocks_fit(param) else (PLAIN if param.dtype == torch.bfloat16 else BF16)


def zeros(param, fmt, signed):
    """A new state of `param` in `fmt`, holding zeros: {key suffix: tensor} ("" the values or
    codes, SCALES the scales). DTensor params get DTensor states with their placements."""
    if fmt == PLAIN:
        return {"": torch.zeros_like(param, memory_format=torch.preserve_format)}
    if fmt == BF16:
        return {"": torch.zeros_like(param, dtype=torch.bfloat16, memory_format=torch.preserve_format)}
    codes = torch.zeros_like(param, dtype=torch.int8 if signed else torch.uint8)
    return {"": codes, SCALES: scales_like(param)}


def scales_like(param):
    """The zero scales of an 8-bit state of `param`: (rows, blocks per row), fp32, split over the
    ranks as the param's dim 0 is (a DTensor with its placements)."""
    from . import distributed

    rows = param.shape[0]
    local = distributed.local_tensor(param)
    shape = (local.shape[0], param.numel() // rows // QUANT_BLOCK)
    scales = torch.zeros(shape, dtype=torch.float32, device=local.device)
    if distributed.is_dtensor(param):
        from torch.distributed.tensor import DTensor

        return DTensor.from_local(scales, param.device_mesh, param.placements, run_check=False,
                                  shape=(rows, shape[1]), stride=(shape[1], 1))
    return scales


def format_of(state, key, param):
    """The format of state[key] as its tensors are: 8-bit codes (int8 or uint8, with their scales
    under key + SCALES), bf16 beside a param of another dtype, or the param's own dtype."""
    return stored_format(state[key], param)


def stored_format(value, param):
    """format_of a state tensor `value` of `param`."""
    if value.dtype in CODE_DTYPES:
        return Q8
    if value.dtype == torch.bfloat16 and param.dtype != torch.bfloat16:
        return BF16
    return PLAIN


def fp32_state_dict(optimizer):
    """`optimizer.state_dict()` in torch.optim's layout, which torch.optim loads: every state
    decoded into its param's dtype (8-bit codes, bf16 states), scales, fp32 masters and remainders
    left out, and the param groups without fusedopt's storage options."""
    import itertools

    state_dict = optimizer.state_dict()
    params = list(itertools.chain.from_iterable(group["params"] for group in optimizer.param_groups))
    ids = list(itertools.chain.from_iterable(group["params"] for group in state_dict["param_groups"]))
    by_id = dict(zip(ids, params))
    state = {}
    for index, values in state_dict["state"].items():
        param = by_id[index]
        state[index] = {key: decode(values, key, param.dtype) if torch.is_tensor(value) and key != "step" else value
                        for key, value in values.items()
                        if not key.endswith(SCALES) and key not in MASTER_KEYS}
    groups = [{key: value for key, value in group.items() if key not in ("state_precision", "state_rounding")}
              for group in state_dict["param_groups"]]
    return {"state": state, "param_groups": groups}


def keeps_its_dtype(key, value, param):
    """Whether a saved state entry is loaded as it is, not cast to its param's dtype as torch.optim
    casts its states: 8-bit codes and their scales, fp32 masters and 16-bit remainders, and bf16
    states beside a param of another dtype."""
    return key.endswith(SCALES) or key in MASTER_KEYS or stored_format(value, param) != PLAIN


def check_codes_fit(entries, param, error=ValueError):
    """Raise `error` where 8-bit codes, scales or a remainder (saved, or in a state) do not fit
    `param` (another shape, or blocks its rows cannot hold)."""
    for key, value in entries.items():
        if key.endswith(SCALES):
            rows = param.shape[0] if param.dim() else 0
            expected = (rows, param.numel() // rows // QUANT_BLOCK) if rows and blocks_fit(param) else None
            if expected is None or tuple(value.shape) != expected:
                raise error(f"the scales of state {key[:-len(SCALES)]!r} have shape {tuple(value.shape)}; a param "
                                 f"of shape {tuple(param.shape)} has {expected} (blocks of {QUANT_BLOCK} within rows)")
        elif value.shape != param.shape:
            raise error(f"state {key!r} has shape {tuple(value.shape)}, its param {tuple(param.shape)}")
        elif value.dtype in CODE_DTYPES and key + SCALES not in entries:
            raise error(f"state {key!r} holds 8-bit codes without their scales ({key + SCALES!r})")


# ---- the plain-torch codec: the reference the kernels' decode and encode are held to ----

def decode(state, key, dtype):
    """state[key] as values of `dtype` (the math dtype), whatever its format; a DTensor state
    decodes shard by shard into a DTensor."""
    from . import distributed

    value = state[key]
    local = distributed.local_tensor(value)
    if local.dtype == torch.int8:
        decoded = decode_signed(local, distributed.local_tensor(state[key + SCALES])).to(dtype)
    elif local.dtype == torch.uint8:
        decoded = decode_unsigned(local, distributed.local_tensor(state[key + SCALES])).to(dtype)
    else:
        decoded = local.to(dtype)
    return distributed.shard_like(decoded, value)


def encode(values, state, key, rounding="nearest", random_key=None):
    """Store `values` into state[key] in its own format, in place (shard by shard): rounded to
    nearest, or stochastically (bf16 and 8-bit) with random bits drawn from a generator seeded by
    `random_key` (a tuple of ints), so that a run is reproducible."""
    from . import distributed

    local = distributed.local_tensor
    target, values = local(state[key]), local(values)
    generator = None
    if rounding == "stochastic":
        generator = torch.Generator().manual_seed(hash(random_key) & (2**63 - 1))
    if target.dtype in CODE_DTYPES:
        codec = encode_signed if target.dtype == torch.int8 else encode_unsigned
        codes, scales = codec(values.reshape(target.shape), generator)
        target.copy_(codes)
        local(state[key + SCALES]).copy_(scales)
    elif target.dtype == torch.bfloat16 and generator is not None and values.dtype != torch.bfloat16:
        from .reference import stochastic_round_to_bfloat16

        target.copy_(stochastic_round_to_bfloat16(values, random_key))
    else:
        target.copy_(values)


def _blocks(values):
    """`values` as rows of QUANT_BLOCK elements, in fp32."""
    return values.float().reshape(-1, QUANT_BLOCK)


def _scales_shaped(scales, values):
    """A block's scales as (rows, blocks per row) of `values` (a shard may have no rows)."""
    return scales.reshape(values.shape[0], math.prod(values.shape[1:]) // QUANT_BLOCK)


def _to_code(scaled, generator):
    """Round to a code: to nearest (ties to even), or up with probability the fraction (generator)."""
    if generator is None:
        return torch.round(scaled)
    return torch.floor(scaled + torch.rand(scaled.shape, generator=generator).to(scaled.device))


def encode_signed(values, generator=None):
    """Signed states: codes -127..127 linear in x / (the block's largest |x|), which is the
    block's scale. (Returns codes shaped as `values`, scales as (rows, blocks per row).)"""
    blocks = _blocks(values)
    scales = blocks.abs().amax(dim=1)
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    codes = _to_code(blocks * (SIGNED_CODES / safe)[:, None], generator).clamp(-SIGNED_CODES, SIGNED_CODES)
    codes = torch.nan_to_num(codes, nan=0.0)  # a NaN's code: 0 (its block's scale is NaN)
    return codes.to(torch.int8).reshape(values.shape), _scales_shaped(scales, values)


def decode_signed(codes, scales):
    blocks = codes.float().reshape(-1, QUANT_BLOCK)
    return (blocks * (scales.reshape(-1)[:, None] / SIGNED_CODES)).reshape(codes.shape)


def encode_unsigned(values, generator=None):
    """Non-negative states: codes 0..255 linear in sqrt(x) / (the block's largest sqrt(x)), which is
    the block's scale; a nonzero value never becomes code 0 (a second moment read as zero would
    make the update divide by eps)."""
    roots = _blocks(values).clamp_min(0).sqrt()
    scales = roots.amax(dim=1)
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    codes = _to_code(roots * (UNSIGNED_CODES / safe)[:, None], generator).clamp(0, UNSIGNED_CODES)
    codes = torch.where((roots > 0) & (codes == 0), torch.ones_like(codes), codes)
    codes = torch.nan_to_num(codes, nan=0.0)
    return codes.to(torch.uint8).reshape(values.shape), _scales_shaped(scales, values)


def decode_unsigned(codes, scales):
    roots = codes.float().reshape(-1, QUANT_BLOCK) * (scales.reshape(-1)[:, None] / UNSIGNED_CODES)
    return (roots * roots).reshape(codes.shape)
