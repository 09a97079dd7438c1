"""Storage formats for one optimizer state tensor, in plain torch, for the study that chooses the
low-precision state formats (bench/state_accuracy.py): fp32, bf16 (round to nearest or
stochastic) and blockwise 8-bit and 4-bit codes with one fp32 scale per block.

A blockwise format is a *layout* (which elements share a scale) and a *code* (how a value divided
by its block's absmax becomes an integer): a dynamic code map searched per element (bitsandbytes'
kind) or a closed-form linear code on companded values (softsign, square root, fourth root, log).
Codes here are held one per byte; 4-bit codes are counted as packed two per byte in `nbytes`.
Nothing here is used by fusedopt itself: it is the oracle the measurements are taken with.
"""
import math
from dataclasses import dataclass

import torch

# ---- codes: a normalized value (the value over its block's absmax, in [-1, 1] or [0, 1]) <-> an integer ----


def dynamic_code_map(signed, bits=8, exponent_bits=None):
    """bitsandbytes' dynamic data type (Dettmers et al. 2016/2022), rebuilt from its description: for
    each decade i of `exponent_bits` decades below 1, 2^i (signed) or 2^(i+1) (unsigned) linearly
    spaced fractions in [0.1, 1]; plus 0 and 1. Sorted ascending; `2^bits` entries."""
    exponent_bits = bits - 1 if exponent_bits is None else exponent_bits
    magnitude_bits = bits - 1  # bitsandbytes counts the sign bit in both maps
    values = [0.0, 1.0]
    extra = 2 ** (magnitude_bits - exponent_bits) - 1
    decade = 0
    for decade in range(exponent_bits):
        count = 2 ** (decade + magnitude_bits - exponent_bits + (0 if signed else 1))
        edges = torch.linspace(0.1, 1.0, count + 1, dtype=torch.float64)
        means = ((edges[:-1] + edges[1:]) / 2 * 10.0 ** (decade - exponent_bits + 1)).tolist()
        values += means + ([-v for v in means] if signed else [])
    if extra > 0:
        edges = torch.linspace(0.1, 1.0, extra + 1, dtype=torch.float64)
        means = ((edges[:-1] + edges[1:]) / 2 * 10.0 ** (decade - exponent_bits + 1)).tolist()
        values += means + ([-v for v in means] if signed else [])
    values += [0.0] * (2**bits - len(values))  # fills a map of fewer exponent bits, as bitsandbytes does
    if len(values) != 2**bits:
        raise ValueError(f"dynamic map of {bits} bits with {exponent_bits} exponent bits has {len(values)} values")
    return torch.tensor(sorted(values), dtype=torch.float32)


class DynamicMapCode:
    """Nearest entry of a sorted code map (a binary search per element on encode, a table lookup on
    decode); stochastic: the lower or upper neighbour, the upper with probability proportional to
    the distance from the lower, so that the expectation is the value."""

    def __init__(self, signed, bits=8):
        self.signed, self.bits = signed, bits
        self.table = dynamic_code_map(signed, bits)
        self.midpoints = (self.table[1:] + self.table[:-1]) / 2
        self.name = f"{'' if signed else 'u'}dynamic.{bits}bit"

    def encode(self, y, noise=None):
        if noise is None:
            return torch.searchsorted(self.midpoints, y.contiguous()).to(torch.uint8)
        upper = torch.searchsorted(self.table, y.contiguous()).clamp(1, len(self.table) - 1)
        low, high = self.table[upper - 1], self.table[upper]
        up = noise * (high - low) < (y - low)
        return torch.where(up, upper, upper - 1).to(torch.uint8)

    def decode(self, q):
        return self.table[q.long()]


def _identity(a):
    return a


def _softsign(a):  # [0, 1] -> [0, 1], slope 2 at 0: twice the resolution of linear for small values
    return 2 * a / (1 + a)


def _softsign_inverse(c):
    return c / (2 - c)


def _sqrt(a):
    return a.sqrt()


def _square(c):
    return c * c


def _fourth_root(a):
    return a.sqrt().sqrt()


def _fourth_power(c):
    return (c * c) * (c * c)


COMPANDERS = {  # name: (forward, inverse) on magnitudes in [0, 1]
    "linear": (_identity, _identity),
    "softsign": (_softsign, _softsign_inverse),
    "sqrt": (_sqrt, _square),
    "root4": (_fourth_root, _fourth_power),
}


class CompandedCode:
    """A closed-form code: q = round(f(|y|) * top) (signed: with y's sign, top = 2^(bits-1) - 1;
    unsigned: top = 2^bits - 1), decoded as f^-1(q / top). `floor_nonzero`: a nonzero value never
    takes code 0 (it rounds up to the smallest nonzero code: a small second moment is overstated,
    never zero). "log" companding: code 0 is exactly zero, codes 1..top spread log2|y| evenly over
    [-log_range, 0] (values below 2^-log_range take code 1). Stochastic: q_low or q_low + 1, the
    upper with probability proportional to the distance in value (not in companded) space, so the
    expectation is the value."""

    def __init__(self, signed, compander, bits=8, floor_nonzero=False, log_range=24.0):
        self.signed, self.bits, self.compander = signed, bits, compander
        self.floor_nonzero, self.log_range = floor_nonzero, log_range
        self.top = 2 ** (bits - 1) - 1 if signed else 2**bits - 1
        if compander != "log":
            self.forward, self.inverse = COMPANDERS[compander]
        self.name = f"{'' if signed else 'u'}{compander}.{bits}bit" + ("-nz" if floor_nonzero else "")

    def _position(self, a):
        """|y| -> its position on the code scale (a float in [0, top])."""
        if self.compander == "log":
            steps = (torch.log2(a) + self.log_range) * ((self.top - 1) / self.log_range)
            return torch.where(a > 0, 1 + steps.clamp(0, self.top - 1), torch.zeros_like(a))
        return self.forward(a) * self.top

    def _magnitude(self, q):
        """Code magnitude (float) -> |y|."""
        if self.compander == "log":
            return torch.where(q > 0, torch.exp2((q - 1) * (self.log_range / (self.top - 1)) - self.log_range),
                               torch.zeros_like(q))
        return self.inverse(q / self.top)

    def encode(self, y, noise=None):
        a = y.abs()
        position = self._position(a)
        if noise is None:
            q = position.round()
        else:
            low = position.floor().clamp(max=self.top - 1)
            low_value, high_value = self._magnitude(low), self._magnitude(low + 1)
            q = low + (noise * (high_value - low_value) < (a - low_value)).float()
        if self.floor_nonzero:
            q = torch.where(a > 0, q.clamp(min=1), q)
        q = q.clamp(0, self.top)
        return (torch.where(y < 0, -q, q) if self.signed else q).to(torch.int8 if self.signed else torch.uint8)

    def decode(self, q):
        magnitude = self._magnitude(q.float().abs())
        return torch.where(q < 0, -magnitude, magnitude) if self.signed else magnitude


def code(kind, signed, bits=8, **options):
    """A code by name: "dynamic" (bitsandbytes' map) or a compander name ("linear", "softsign",
    "sqrt", "root4", "log")."""
    if kind == "dynamic":
        return DynamicMapCode(signed, bits)
    return CompandedCode(signed, kind, bits, **options)


# ---- formats: what one state tensor is stored as ----


@dataclass
class Encoded:
    """A stored state tensor: its tensors (codes and scales, or the values) and the bytes they take."""

    tensors: dict
    nbytes: int


class Fp32:
    name = "fp32"

    def encode(self, x, generator=None):
        return Encoded({"values": x.clone()}, 4 * x.numel())

    def decode(self, encoded, shape):
        return encoded.tensors["values"]

    def storage_bytes(self, shape):
        return 4 * math.prod(shape)


class Bf16:
    """bf16, rounded to nearest even, or stochastically: the fp32 bits plus 16 random bits, then
    truncated, so the value rounds up in magnitude with probability (dropped bits) / 2^16."""

    def __init__(self, stochastic=False):
        self.stochastic = stochastic
        self.name = "bf16-sr" if stochastic else "bf16"

    def encode(self, x, generator=None):
        if not self.stochastic:
            values = x.to(torch.bfloat16)
        else:
            noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, generator=generator)
            bits = x.float().contiguous().view(torch.int32)
            values = torch.bitwise_right_shift(bits + noise, 16).to(torch.int16).view(torch.bfloat16)
            values = torch.where(x.isfinite(), values, x.to(torch.bfloat16))
        return Encoded({"values": values}, 2 * x.numel())

    def decode(self, encoded, shape):
        return encoded.tensors["values"].float()

    def storage_bytes(self, shape):
        return 2 * math.prod(shape)


class Blockwise:
    """Codes with one fp32 scale (the absmax) per block. Layout "rows": blocks of `block` elements
    within each dim-0 slice of the param (a row of its [shape[0], -1] view; a row shorter than
    `block` is one block, a row that does not divide ends in a short block), so FSDP2's dim-0
    shards never split a block and the scales shard with the rows. "flat": blocks of the flattened
    tensor (what a per-tensor library does; a block may straddle a shard boundary)."""

    def __init__(self, code, block=256, stochastic=False, layout="rows"):
        self.code, self.block, self.stochastic, self.layout = code, block, stochastic, layout
        self.name = f"{code.name}/b{block}" + ("-sr" if stochastic else "") + ("" if layout == "rows" else f"-{layout}")

    def _rows(self, shape):
        """(rows, row length, block width) of a tensor of `shape`."""
        rows = shape[0] if (self.layout == "rows" and len(shape) > 0) else 1
        length = math.prod(shape) // rows if rows else 0
        return rows, length, max(1, min(self.block, length) if self.layout == "rows" else self.block)

    def _blocks(self, x):
        """x as [blocks, width] (each row zero-padded to a whole number of blocks)."""
        rows, length, width = self._rows(x.shape)
        padded = torch.nn.functional.pad(x.reshape(rows, length), (0, -length % width))
        return padded.reshape(-1, width)

    def storage_bytes(self, shape):
        """What `encode` stores for a tensor of `shape` (codes packed, fp32 scales), without encoding."""
        rows, length, width = self._rows(shape)
        return math.ceil(math.prod(shape) * self.code.bits / 8) + 4 * rows * math.ceil(length / width)

    def encode(self, x, generator=None):
        blocks = self._blocks(x.float())
        scales = blocks.abs().amax(dim=1, keepdim=True)
        y = blocks / torch.where(scales > 0, scales, torch.ones_like(scales))
        noise = torch.rand(y.shape, generator=generator) if self.stochastic else None
        codes = self.code.encode(y, noise)
        nbytes = math.ceil(x.numel() * self.code.bits / 8) + 4 * scales.numel()
        return Encoded({"codes": codes, "scales": scales.squeeze(1)}, nbytes)

    def decode(self, encoded, shape):
        codes, scales = encoded.tensors["codes"], encoded.tensors["scales"]
        blocks = self.code.decode(codes) * scales[:, None]
        rows, length, _ = self._rows(shape)
        return blocks.reshape(rows, -1)[:, :length].reshape(shape)


def roundtrip(fmt, x, generator=None):
    """x stored in `fmt` and read back (fp32)."""
    return fmt.decode(fmt.encode(x, generator), x.shape)


# ---- a policy: which format each state of each param takes ----


@dataclass(frozen=True)
class StatePolicy:
    """The formats of a run: `signed` for states that may be negative (momentum, exp_avg, grad_avg),
    `nonnegative` for the others (exp_avg_sq, max_exp_avg_sq, sum, square_avg). A param with fewer
    than `min_numel` elements, or fewer than two dims where the format needs blocks within dim-0
    slices (a 1-D param's slices are single elements), keeps `small` (fp32 unless said).
    `overrides`: (when, key, format) entries: state `key` takes `format` where the rule keeps a
    state named `when` (e.g. centered RMSprop, the one rule with a grad_avg)."""

    name: str
    signed: object
    nonnegative: object
    min_numel: int = 0
    small: object = None
    overrides: tuple = ()

    def overridden(self, keys):
        """Whether an override applies to a rule keeping the states `keys` (if not, the policy
        stores them as its plain `signed` and `nonnegative` formats do)."""
        return any(when in keys for when, _, _ in self.overrides)

    def format_for(self, param, signed, key=None, keys=()):
        fmt = self.signed if signed else self.nonnegative
        for when, overridden, override in self.overrides:
            if key == overridden and when in keys:
                fmt = override
        needs_rows = isinstance(fmt, Blockwise) and fmt.layout == "rows"
        if param.numel() < self.min_numel or (needs_rows and param.dim() < 2):
            return self.small or FP32
        return fmt


FP32 = Fp32()


def blockwise(signed_code, nonneg_code, block=256, stochastic=False, layout="rows", bits=8, name=None, **nonneg_options):
    """A policy of two blockwise codes by name (see `code`); options of the non-negative code (e.g.
    floor_nonzero=True, log_range=...) pass through."""
    signed = Blockwise(code(signed_code, True, bits), block, stochastic, layout)
    nonneg = Blockwise(code(nonneg_code, False, bits, **nonneg_options), block, stochastic, layout)
    return StatePolicy(name or f"{signed.name}+{nonneg.name}", signed, nonneg)


def candidate_policies():
    """Every candidate the study compares, by name: the baselines, bf16, and the blockwise codes
    (8-bit at 256-element blocks unless named; block sizes and 4-bit for the leading ones)."""
    p = {}

    def add(policy):
        p[policy.name] = policy

    add(StatePolicy("fp32", FP32, FP32))
    add(StatePolicy("bf16", Bf16(), Bf16()))
    add(StatePolicy("bf16-sr", Bf16(True), Bf16(True)))
    # the closed-form codes on companded values, as flashoptim and the simulation had them
    add(blockwise("softsign", "sqrt", name="softsign+sqrt"))
    add(blockwise("softsign", "sqrt", layout="flat", name="softsign+sqrt flat"))
    add(blockwise("linear", "linear", name="linear+linear"))
    # bitsandbytes' dynamic maps
    add(blockwise("dynamic", "dynamic", name="dynamic+udynamic"))
    add(blockwise("dynamic", "dynamic", stochastic=True, name="dynamic+udynamic sr"))
    # what the smallest second moments become: never zero, log or fourth-root companding
    add(blockwise("softsign", "sqrt", floor_nonzero=True, name="softsign+sqrt-nz"))
    add(blockwise("softsign", "log", name="softsign+log"))
    add(blockwise("softsign", "root4", floor_nonzero=True, name="softsign+root4-nz"))
    add(blockwise("softsign", "sqrt", floor_nonzero=True, stochastic=True, name="softsign+sqrt-nz sr"))
    add(blockwise("softsign", "log", stochastic=True, name="softsign+log sr"))
    # centered RMSprop divides by sqrt(square_avg - grad_avg^2): that pair in bf16
    log = p["softsign+log"]
    add(StatePolicy("softsign+log centered-bf16", log.signed, log.nonnegative,
                    overrides=(("grad_avg", "grad_avg", Bf16()), ("grad_avg", "square_avg", Bf16()))))
    for block in (32, 64, 128):
        add(blockwise("softsign", "sqrt", block=block, name=f"softsign+sqrt b{block}"))
        # the never-zero square-root code of second moments with linear or softsign first moments
        add(blockwise("linear", "sqrt", block=block, floor_nonzero=True, name=f"linear+sqrt-nz b{block}"))
        add(blockwise("softsign", "sqrt", block=block, floor_nonzero=True, name=f"softsign+sqrt-nz b{block}"))
        add(blockwise("softsign", "log", block=block, name=f"softsign+log b{block}"))
    # 4-bit: the same mechanism with 15 (signed) or 16 (unsigned) levels
    add(blockwise("softsign", "log", bits=4, block=32, name="4bit softsign+log b32"))
    add(blockwise("softsign", "log", bits=4, block=32, stochastic=True, name="4bit softsign+log b32 sr"))
    add(blockwise("softsign", "root4", bits=4, block=32, floor_nonzero=True, name="4bit softsign+root4-nz b32"))
    return p


def state_bytes(policy, shapes, slots):
    """Bytes of the stored states of params of `shapes` under `policy` (each format's
    `storage_bytes`, which equals what its `encode` stores: tests/test_state_codecs.py); `slots`
    lists each state as (key, signed)."""
    total, keys = 0, [key for key, _ in slots]
    for shape in shapes:
        param = torch.empty(shape, device="meta")
        total += sum(policy.format_for(param, signed, key, keys).storage_bytes(shape) for key, signed in slots)
    return total
