"""The numba CPU kernels: one parallel pass over every block of every tensor in a bucket, walking
the same int64 address table as the Triton kernels (fusedopt.tables).

A rule's kernel is made from its spec (fusedopt.spec): the rule's two functions, compiled by numba
with the arithmetic below, inside the shared walk over the elements of a block (`walk_block`) and
over the blocks (`run_blocks`). One kernel per (rule, options, param rounding), which are constants
in its code (the loops then vectorize); numba compiles it per param dtype at its first use, and
keeps it in its on-disk cache. That cache is invalidated by a change to the file defining a
cached function only; the kernels are made here from functions of other files, so each kernel's
name carries a digest of every source file it is made from (`source_digest`): a change to any of
them names a new kernel, which is compiled afresh.
"""
import hashlib
import inspect
import types as python_types

import numba
import numpy as np
from numba import njit, prange, types
from numba.extending import intrinsic, overload
from numba.np.unsafe.ndarray import to_fixed_tuple

from .. import formats, tables
from .. import spec as rule_spec
from ..tables import EXTRA_ROW, FIRST_STATE_ROW, GRAD_ROW, NUMEL_ROW, PARAM_ROW

# The launch's numbers (float64): AMP's skip flag and 1/scale (already rounded to fp32), the clip
# factor, the lr (scheduled), and whether it came from memory (the rule then recomputes what the
# host computed from a number lr).
SKIP, INV_SCALE, CLIP, LR, DEVICE_LR = range(5)
# The launch's integers: whether the bucket has step counts (the launch adds the step to them),
# whether the per-tensor integers are read, and the stochastic rounding key.
COUNTS_STEPS, READS_EXTRA, SEED, COUNT = range(4)
# How the param is stored, a constant of each kernel
ROUNDINGS = {name: code for code, name in enumerate(formats.PARAM_ROUNDINGS)}
NEAREST, STOCHASTIC, MASTER, REMAINDER = ROUNDINGS.values()
MAX_STATES = 3  # state slots a rule may have here

# error_model="numpy": IEEE division (x / 0 is inf or NaN, as in torch), no ZeroDivisionError branch in
# the loops, which would keep them from vectorizing
KERNEL_OPTIONS = dict(parallel=True, cache=True, fastmath=False, nogil=True, error_model="numpy")


# ---- memory: raw addresses as arrays, 16-bit floats as integers ----

@intrinsic
def address_as_pointer(typingctx, address, like):
    """The int64 `address` as a pointer to elements of `like`'s dtype."""
    pointer_type = types.CPointer(like.dtype)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(pointer_type))

    return pointer_type(address, like), codegen


@njit(error_model="numpy")
def tensor_array(address, numel, like):
    """The `numel` elements at `address`, typed as `like`'s."""
    return numba.carray(address_as_pointer(address, like), numel)


@intrinsic
def fused_multiply_add(typingctx, a, b, c):
    """a * b + c with one rounding (torch's CPU kernels use vec::fmadd here)."""
    def codegen(context, builder, signature, args):
        return builder.fma(*args)

    return a(a, a, a), codegen


@intrinsic
def float32_bits(typingctx, value):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(types.uint32))

    return types.uint32(types.float32), codegen


@intrinsic
def bits_float32(typingctx, bits):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(types.float32))

    return types.float32(types.uint32), codegen


@njit(error_model="numpy")
def bfloat16_to_float32(stored):
    return bits_float32(np.uint32(np.int64(stored) << 16))


@njit(error_model="numpy")
def float32_to_bfloat16(value):
    """Round to nearest even (torch's conversion); NaN stays NaN (the carry could flip it)."""
    bits = np.int64(float32_bits(value))
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return np.uint16(0x7FC0 if value != value else rounded)


@njit(error_model="numpy")
def float32_to_bfloat16_stochastic(value, random_bits):
    """Round up in magnitude with probability (dropped bits) / 2^16: unbiased."""
    bits = np.int64(float32_bits(value))
    rounded = (bits + (random_bits & 0xFFFF)) >> 16
    return np.uint16(0x7FC0 if value != value else rounded)


@njit(error_model="numpy")
def float16_to_float32(stored):
    """IEEE half (held as int16) to float32, exactly: normals and infinities by moving the fields,
    subnormals as mantissa * 2^-24."""
    half = np.int64(stored) & 0xFFFF
    sign = (half & 0x8000) << 16
    exponent = (half >> 10) & 0x1F
    mantissa = half & 0x3FF
    bits = sign | (((exponent + 112) << 23) if exponent != 31 else 0x7F800000) | (mantissa << 13)
    subnormal = np.float32(mantissa) * np.float32(2.0**-24)
    if sign:
        subnormal = -subnormal
    return subnormal if exponent == 0 else bits_float32(np.uint32(bits))


@njit(error_model="numpy")
def float32_to_float16(value):
    """float32 to IEEE half (as int16), rounded to nearest even as torch rounds: overflow to inf,
    NaN to the quiet NaN 0x7E00, subnormals rounded by a float addition that aligns them."""
    bits = np.int64(float32_bits(value))
    sign = bits & 0x80000000
    magnitude = bits ^ sign
    if magnitude >= 0x47800000:  # >= 65536: inf (or NaN)
        half = 0x7E00 if magnitude > 0x7F800000 else 0x7C00
    elif magnitude < 0x38800000:  # below the smallest normal half: 0.5 aligns the mantissa
        aligned = bits_float32(np.uint32(magnitude)) + np.float32(0.5)
        half = np.int64(float32_bits(aligned)) - 0x3F000000
    else:
        odd = (magnitude >> 13) & 1
        half = (magnitude + (((15 - 127) << 23) + 0xFFF) + odd) >> 13
    return np.int16(half | (sign >> 16))


def widen(values, index):
    """Element `index` of `values` in its compute type (fp64 for fp64, else fp32)."""


@overload(widen)
def _widen(values, index):
    if values.dtype == types.uint16:  # bf16
        return lambda values, index: bfloat16_to_float32(values[index])
    if values.dtype == types.int16:  # fp16
        return lambda values, index: float16_to_float32(values[index])
    return lambda values, index: values[index]


def store_nearest(values, index, value):
    """Store `value` at `index`, rounded to nearest in the array's dtype."""


@overload(store_nearest)
def _store_nearest(values, index, value):
    if values.dtype == types.uint16:
        def store(values, index, value):
            values[index] = float32_to_bfloat16(np.float32(value))
    elif values.dtype == types.int16:
        def store(values, index, value):
            values[index] = float32_to_float16(np.float32(value))
    elif values.dtype == types.float32:
        def store(values, index, value):
            values[index] = np.float32(value)
    else:
        def store(values, index, value):
            values[index] = value
    return store


def store_stochastic(values, index, value, random_bits):
    """Store a bf16 param rounded stochastically (other dtypes never ask: to nearest)."""


@overload(store_stochastic)
def _store_stochastic(values, index, value, random_bits):
    if values.dtype == types.uint16:
        def store(values, index, value, random_bits):
            values[index] = float32_to_bfloat16_stochastic(np.float32(value), random_bits)
    else:
        def store(values, index, value, random_bits):
            store_nearest(values, index, value)
    return store


def to_compute(value, like):
    """`value` in the compute type of tables of `like`'s dtype."""


@overload(to_compute)
def _to_compute(value, like):
    if like.dtype == types.float64:
        return lambda value, like: np.float64(value)
    return lambda value, like: np.float32(value)


# ---- counter-based random bits for stochastic rounding ----

GOLDEN = np.uint64(0x9E3779B97F4A7C15)
MIX1 = np.uint64(0xBF58476D1CE4E5B9)
MIX2 = np.uint64(0x94D049BB133111EB)


@njit(error_model="numpy")
def mix64(z):
    """splitmix64's finalizer: every input bit flips each output bit with probability 1/2."""
    z = (z ^ (z >> np.uint64(30))) * MIX1
    z = (z ^ (z >> np.uint64(27))) * MIX2
    return z ^ (z >> np.uint64(31))


@njit(error_model="numpy")
def rounding_stream(seed, count, tensor):
    """The start of a tensor's random sequence at a group step: a function of these alone."""
    return mix64(np.uint64(seed) ^ mix64(np.uint64(count) * GOLDEN + np.uint64(tensor)))


@njit(error_model="numpy")
def random_bits16(stream, element):
    """16 random bits for an element: splitmix64's output at position `element` of the stream,
    the same whichever thread computes it."""
    return np.int64(mix64(stream + np.uint64(element) * GOLDEN) >> np.uint64(48))


# ---- the arithmetic a rule's equations use (fusedopt.spec), as torch's CPU kernels write it ----

@njit(error_model="numpy")
def lerp(start, end, weight):
    """torch's lerp: start + weight (end - start), fused, from the nearer end."""
    if abs(weight) < 0.5:
        return fused_multiply_add(weight, end - start, start)
    return fused_multiply_add(weight - type(weight)(1), end - start, end)


@njit(error_model="numpy")
def nan_maximum(a, b):
    """max(a, b), NaN where either is NaN (torch.maximum)."""
    return a if (a != a or a > b) else b


@njit(error_model="numpy")
def square_root(x):
    return np.sqrt(x)


@njit(error_model="numpy")
def power_of_two(x):
    return np.exp2(x)


@njit(error_model="numpy")
def sign(x):
    """-1, 0 or 1 in x's type; 0 for NaN, as torch.sign."""
    return type(x)((x > 0) - (x < 0))


NUMBA_ARITHMETIC = dict(sqrt=square_root, exp2=power_of_two, lerp=lerp, fma=fused_multiply_add, maximum=nan_maximum,
                        sign=sign, to_compute=to_compute)
assert set(NUMBA_ARITHMETIC) == set(rule_spec.ARITHMETIC)


# ---- states in their formats (fusedopt.formats): opened, decoded on load, encoded on store ----
# Each state slot's format picks its functions (state_functions), which make_kernel binds into the
# walk as that slot's own: a kernel's code holds only what its states' formats need.

BF16_LIKE = np.empty(0, np.uint16)
SIGNED_LIKE, UNSIGNED_LIKE = np.empty(0, np.int8), np.empty(0, np.uint8)  # the codes of signed, non-negative states
SCALES_LIKE = np.empty(0, np.float32)
QUANT_BLOCK = formats.QUANT_BLOCK
SIGNED_CODES, UNSIGNED_CODES = np.float32(formats.SIGNED_CODES), np.float32(formats.UNSIGNED_CODES)
# Added to a float of magnitude below 2^22, 1.5 * 2^23 rounds it to an integer, to nearest even,
# which the low bits of the sum's significand hold (two's complement for a negative one)
ROUNDING_SHIFT = np.float32(1.5 * 2**23)
SLOT_STREAM = np.uint64(0xD1B54A32D192ED03)  # sets apart the random streams of the param and each state


@njit(error_model="numpy")
def state_stream(stream, slot):
    """The random stream of state `slot` beside the param's `stream`."""
    return mix64(stream + np.uint64(slot + 1) * SLOT_STREAM)


@njit(inline="always", error_model="numpy")
def open_absent(table, row, tensor, start, count, like, param):
    return param, SCALES_LIKE  # placeholders: an absent state is never touched


@njit(inline="always", error_model="numpy")
def open_plain(table, row, tensor, start, count, like, param):
    return tensor_array(table[row, tensor] + start * like.itemsize, count, like), SCALES_LIKE


@njit(inline="always", error_model="numpy")
def open_bf16(table, row, tensor, start, count, like, param):
    return tensor_array(table[row, tensor] + start * 2, count, BF16_LIKE), SCALES_LIKE


@njit(inline="always", error_model="numpy")
def open_signed(table, row, tensor, start, count, like, param):
    return (tensor_array(table[row, tensor] + start, count, SIGNED_LIKE),
            tensor_array(table[row + 1, tensor] + start // QUANT_BLOCK * 4, count // QUANT_BLOCK, SCALES_LIKE))


@njit(inline="always", error_model="numpy")
def open_unsigned(table, row, tensor, start, count, like, param):
    return (tensor_array(table[row, tensor] + start, count, UNSIGNED_LIKE),
            tensor_array(table[row + 1, tensor] + start // QUANT_BLOCK * 4, count // QUANT_BLOCK, SCALES_LIKE))


@njit(inline="always", error_model="numpy")
def unit_of_none(scales, group):
    return np.float32(1)


@njit(inline="always", error_model="numpy")
def unit_signed(scales, group):
    """A code's value in a signed block: its scale / 127 (formats.decode_signed)."""
    return scales[group] / SIGNED_CODES


@njit(inline="always", error_model="numpy")
def unit_unsigned(scales, group):
    return scales[group] / UNSIGNED_CODES


@njit(inline="always", error_model="numpy")
def read_absent(values, index, unit, fallback):
    return fallback  # an absent state is not read by the rule


@njit(inline="always", error_model="numpy")
def read_plain(values, index, unit, fallback):
    return widen(values, index)


@njit(inline="always", error_model="numpy")
def read_bf16(values, index, unit, fallback):
    return bfloat16_to_float32(values[index])


@njit(inline="always", error_model="numpy")
def read_signed(values, index, unit, fallback):
    return np.float32(values[index]) * unit


@njit(inline="always", error_model="numpy")
def read_unsigned(values, index, unit, fallback):
    root = np.float32(values[index]) * unit
    return root * root


# A write stores a state's new value, or stashes it for its block's encoding and returns the
# block's largest magnitude so far (`largest`, the bits of an fp32 |x|, which an integer max orders
# and a NaN's lie above inf's): taken in the update's own loop, where it costs next to nothing.

@njit(inline="always", error_model="numpy")
def write_absent(values, index, value, stash, slot, position, stream, element, largest):
    return largest


@njit(inline="always", error_model="numpy")
def write_nearest(values, index, value, stash, slot, position, stream, element, largest):
    store_nearest(values, index, value)
    return largest


@njit(inline="always", error_model="numpy")
def write_bf16_stochastic(values, index, value, stash, slot, position, stream, element, largest):
    values[index] = float32_to_bfloat16_stochastic(np.float32(value), random_bits16(stream, element))
    return largest


@njit(inline="always", error_model="numpy")
def write_stash(values, index, value, stash, slot, position, stream, element, largest):
    value = np.float32(value)
    stash[slot, position] = value  # encoded with its block, once the block is done
    return max(largest, float32_bits(abs(value)))


@njit(inline="always", error_model="numpy")
def write_root(values, index, value, stash, slot, position, stream, element, largest):
    """Stash a non-negative state's square root (0 for a negative value), encoded with its block
    once the block is done. The root of the value itself: the same root the rule takes (Adam's
    denominator), which the compiler then takes once."""
    root = np.sqrt(np.float32(value))
    root = np.float32(0) if value < 0 else root
    stash[slot, position] = root
    return max(largest, float32_bits(abs(root)))


@njit(inline="always", error_model="numpy")
def finish_nothing(values, scales, stash, slot, first, last, stream, start, largest, STOCHASTIC_CODES):
    pass


@njit(inline="always", error_model="numpy")
def code_of(scaled, stream, element, STOCHASTIC_CODES):
    """Round a scaled value to a code: to nearest (ties to even), or up with probability its fraction."""
    if STOCHASTIC_CODES:
        return np.floor(scaled + np.float32(random_bits16(stream, element)) * np.float32(1.0 / 65536))
    return np.rint(scaled)


@njit(inline="always", error_model="numpy")
def group_scale(largest, codes):
    """A group's scale (its largest magnitude, from the bits `largest`), its codes' multiplier
    codes / scale (one correctly rounded division per group), and whether both are finite: then
    no scaled value is NaN or past codes + 1/2, and codes to nearest need no clamp (a scale below
    codes / the largest float makes the multiplier inf)."""
    scale = bits_float32(largest)
    per_scale = codes / (scale if scale > 0 else np.float32(1))
    return scale, per_scale, scale < np.inf and per_scale < np.inf


@njit(inline="always", error_model="numpy")
def finish_signed(values, scales, stash, slot, first, last, stream, start, largest, STOCHASTIC_CODES):
    """Encode the stashed group [first, last) of a signed state into `values` (the group's codes):
    its scale, the largest |x| (NaN where one is NaN), and codes -127..127 linear in x / scale
    (formats.encode_signed)."""
    scale, per_scale, finite = group_scale(largest, SIGNED_CODES)
    if STOCHASTIC_CODES or not finite:
        # the general case: a code rounded up may pass 127, a NaN or inf scale makes NaNs, and an
        # inf multiplier infs (codes +-127, and 0 for zeros)
        for position in range(last - first):
            code = code_of(stash[slot, position] * per_scale, stream, start + first + position, STOCHASTIC_CODES)
            code = min(max(code, -SIGNED_CODES), SIGNED_CODES)
            values[position] = np.int8(code if code == code else 0)  # a NaN's code: 0 (its scale is NaN)
    else:
        # a finite scale and multiplier: every |x| * per_scale is below 127.5, and none is NaN; its
        # code to nearest is the low byte of the sum with ROUNDING_SHIFT
        for position in range(last - first):
            values[position] = np.int8(float32_bits(stash[slot, position] * per_scale + ROUNDING_SHIFT))
    scales[first // QUANT_BLOCK] = scale


@njit(inline="always", error_model="numpy")
def finish_unsigned(values, scales, stash, slot, first, last, stream, start, largest, STOCHASTIC_CODES):
    """Encode the stashed square roots of the group [first, last) of a non-negative state into
    `values` (the group's codes): its scale, the largest root (NaN where one is NaN), codes 0..255
    linear in root / scale, and a nonzero value never code 0 (formats.encode_unsigned)."""
    scale, per_scale, finite = group_scale(largest, UNSIGNED_CODES)
    if STOCHASTIC_CODES or not finite:
        for position in range(last - first):
            root = stash[slot, position]
            code = code_of(root * per_scale, stream, start + first + position, STOCHASTIC_CODES)
            code = min(max(code, np.float32(0)), UNSIGNED_CODES)
            if root > 0 and code == 0:
                code = np.float32(1)  # a nonzero value never reads as zero
            values[position] = np.uint8(code if code == code else 0)
    else:
        # a finite scale and multiplier: every root * per_scale lies in [0, 255.5), and none is
        # NaN; its code to nearest is the low byte of the sum with ROUNDING_SHIFT, at least 1 for a
        # nonzero root
        for position in range(last - first):
            root = stash[slot, position]
            shifted = root * per_scale + ROUNDING_SHIFT
            shifted = max(shifted, ROUNDING_SHIFT + np.float32(1)) if root > 0 else shifted
            values[position] = np.uint8(float32_bits(shifted))
    scales[first // QUANT_BLOCK] = scale


def state_functions(fmt, signed, state_rounding):
    """(open, unit, read, write, finish, roles) of a state slot of format `fmt`."""
    if fmt == formats.ABSENT:
        return open_absent, unit_of_none, read_absent, write_absent, finish_nothing, 0
    if fmt == formats.PLAIN:
        return open_plain, unit_of_none, read_plain, write_nearest, finish_nothing, 1
    if fmt == formats.BF16:
        write = write_bf16_stochastic if state_rounding == "stochastic" else write_nearest
        return open_bf16, unit_of_none, read_bf16, write, finish_nothing, 1
    if signed:
        return open_signed, unit_signed, read_signed, write_stash, finish_signed, 2
    return open_unsigned, unit_unsigned, read_unsigned, write_root, finish_unsigned, 2


# ---- the shared walks; the names in capitals are each kernel's constants ----

# Bound by make_kernel in each kernel's own copy of the templates below (never compiled as they are)
UPDATE = OPTIONS = SLOTS = ROUNDING = WALK = NUMBERS_OF_BLOCK = BLOCK_NUMBERS = LAUNCH = LAUNCH_LENGTH = None
OPEN0 = OPEN1 = OPEN2 = UNIT0 = UNIT1 = UNIT2 = READ0 = READ1 = READ2 = WRITE0 = WRITE1 = WRITE2 = None
FINISH0 = FINISH1 = FINISH2 = ROW0 = ROW1 = ROW2 = MASTER_ROW = GROUP = WHOLE_GROUPS = STASH = STOCHASTIC_CODES = None


def walk_block(numbers, table, tensor, start, count, like, param, master, grad, inv_scale, clip, stream):
    """Open the present states of the `count` elements of a block (`start` in its tensor; param,
    master and grad: arrays from the block's first element), then, group by group (8-bit blocks,
    where a state is 8-bit; else the whole block), load param, grad and the states (decoded), apply
    the rule, store them back (encoded: 8-bit states once their group is done). Made per kernel
    (make_kernel) with its constants: UPDATE, OPTIONS, SLOTS (the rule's number of slots),
    ROUNDING, each slot's functions (OPEN0, UNIT0, READ0, WRITE0, FINISH0, ...; formats absent from
    the rule or the options: placeholders) and table rows (ROW0, ...), GROUP, WHOLE_GROUPS and STASH."""
    values0, scales0 = OPEN0(table, FIRST_STATE_ROW + ROW0, tensor, start, count, like, param)
    values1, scales1 = OPEN1(table, FIRST_STATE_ROW + ROW1, tensor, start, count, like, param)
    values2, scales2 = OPEN2(table, FIRST_STATE_ROW + ROW2, tensor, start, count, like, param)
    stash = np.empty((MAX_STATES, STASH), np.float32)  # an 8-bit group's new values, until encoded
    streams = (state_stream(stream, 0), state_stream(stream, 1), state_stream(stream, 2))
    for first in range(0, count, GROUP):
        # A bucket of 8-bit states holds whole groups (a code-holding param has rows of whole
        # blocks, tables.fits_kernel, and a block is a multiple of QUANT_BLOCK): its groups have a
        # constant length, with which LLVM unrolls the group's loops, without their remainders
        last = first + GROUP if WHOLE_GROUPS else min(first + GROUP, count)
        unit0 = UNIT0(scales0, first // QUANT_BLOCK)
        unit1 = UNIT1(scales1, first // QUANT_BLOCK)
        unit2 = UNIT2(scales2, first // QUANT_BLOCK)
        # the group's elements as arrays from 0: indices known to be non-negative (no wraparound
        # check per access), so that the loops vectorize
        param_of, grad_of, master_of = param[first:last], grad[first:last], master[first:last]
        values0_of, values1_of, values2_of = values0[first:last], values1[first:last], values2[first:last]
        largest0 = largest1 = largest2 = np.uint32(0)  # each 8-bit state's largest magnitude (its bits)
        for index in range(last - first):
            element = start + first + index  # in the tensor: the random streams' position
            if ROUNDING == MASTER:
                p = to_compute(master_of[index], param)
            elif ROUNDING == REMAINDER:
                p = join_master(param_of[index], master_of[index])
            else:
                p = widen(param_of, index)
            g = widen(grad_of, index) * inv_scale * clip  # unscale, then clip: unscale_ then clip_grad_norm_
            s0 = READ0(values0_of, index, unit0, g)
            s1 = READ1(values1_of, index, unit1, g)
            s2 = READ2(values2_of, index, unit2, g)
            # (param, *states), padded so that every slot index below exists
            updated = UPDATE(p, g, *(s0, s1, s2)[:SLOTS], numbers, OPTIONS) + (g, g, g)
            if ROUNDING == MASTER:  # the bf16 param rounded as beside a remainder: the same params
                master_of[index] = np.float32(updated[0])
                param_of[index] = split_master(np.float32(updated[0]))[0]
            elif ROUNDING == REMAINDER:
                param_of[index], master_of[index] = split_master(np.float32(updated[0]))
            elif ROUNDING == STOCHASTIC:
                store_stochastic(param_of, index, updated[0], random_bits16(stream, element))
            else:
                store_nearest(param_of, index, updated[0])
            largest0 = WRITE0(values0_of, index, updated[1], stash, 0, index, streams[0], element, largest0)
            largest1 = WRITE1(values1_of, index, updated[2], stash, 1, index, streams[1], element, largest1)
            largest2 = WRITE2(values2_of, index, updated[3], stash, 2, index, streams[2], element, largest2)
        FINISH0(values0_of, scales0, stash, 0, first, last, streams[0], start, largest0, STOCHASTIC_CODES)
        FINISH1(values1_of, scales1, stash, 1, first, last, streams[1], start, largest1, STOCHASTIC_CODES)
        FINISH2(values2_of, scales2, stash, 2, first, last, streams[2], start, largest2, STOCHASTIC_CODES)


@njit(inline="always", error_model="numpy")
def join_master(high, remainder):
    """The fp32 master a bf16 param (its bits) and its int16 remainder stand for."""
    bits = ((np.int64(high) << 16) + np.int64(remainder)) & 0xFFFFFFFF
    return bits_float32(np.uint32(bits))


@njit(inline="always", error_model="numpy")
def split_master(value):
    """An fp32 master as (bf16 param bits, int16 remainder): rounded to nearest, ties away from
    zero, so that the remainder fits 16 bits (fusedopt.rounding.split_master)."""
    bits = np.int64(float32_bits(value))
    high = (bits + 0x8000) >> 16
    remainder = np.int16(bits - (high << 16))
    return np.uint16(0x7FC0 if value != value else high & 0xFFFF), remainder


@njit(inline="always", error_model="numpy")  # the prange must sit in the parallel kernel itself
def run_blocks(walk, block_numbers, rounding, master_row, table, blocks, block, like, master_like, steps, numbers,
               launch, flags):
    """One parallel pass over the blocks (owner, start) of `blocks`: per block, the tensor's
    param, grad and master arrays from the table, the rule's numbers, and the walk over its
    elements."""
    if numbers[SKIP] != 0:  # AMP found an inf or NaN: nothing is written, the step does not count
        return
    counts_steps, reads_extra = flags[COUNTS_STEPS] != 0, flags[READS_EXTRA] != 0
    if counts_steps:  # torch.optim's step += 1, in the counts' own dtype, before the update reads them
        for tensor in range(steps.shape[0]):
            steps[tensor] += 1
    seed, group_step = flags[SEED], flags[COUNT]
    inv_scale, clip = to_compute(numbers[INV_SCALE], like), to_compute(numbers[CLIP], like)
    lr, device_lr = numbers[LR], numbers[DEVICE_LR] != 0
    for block_index in prange(blocks.shape[1]):
        tensor = blocks[0, block_index]
        start = blocks[1, block_index]
        count = min(block, table[NUMEL_ROW, tensor] - start)
        # arrays of the block's elements alone: indices from 0 let the loops vectorize
        offset = start * like.itemsize
        param = tensor_array(table[PARAM_ROW, tensor] + offset, count, like)
        grad = tensor_array(table[GRAD_ROW, tensor] + offset, count, like)
        if rounding == MASTER or rounding == REMAINDER:
            master = tensor_array(table[master_row, tensor] + start * master_like.itemsize, count, master_like)
        else:
            master = tensor_array(table[PARAM_ROW, tensor], 0, master_like)
        step = np.float64(steps[tensor]) if counts_steps else 0.0
        extra = table[EXTRA_ROW, tensor] if reads_extra else 0
        block_values = block_numbers(lr, step, extra, launch, device_lr, like)
        stream = rounding_stream(seed, group_step, tensor)
        walk(block_values, table, tensor, start, count, like, param, master, grad, inv_scale, clip, stream)


def numbers_of_block(lr, step, extra, launch, device_lr, like):
    """The rule's block numbers from the launch's: `launch` holds the fields of the rule's Launch
    NamedTuple in order, which it takes back. Made per kernel with its constants BLOCK_NUMBERS,
    LAUNCH and LAUNCH_LENGTH. (The NamedTuple is made inside the parallel loop: numba's parallel
    lowering cannot take one into it.)"""
    return BLOCK_NUMBERS(lr, step, extra, LAUNCH(*to_fixed_tuple(launch, LAUNCH_LENGTH)), device_lr, like)


def rule_kernel(table, blocks, block, like, master_like, steps, numbers, launch, flags):
    """A rule's kernel, made per (rule, options, storage) (make_kernel) with its constants: WALK,
    NUMBERS_OF_BLOCK, ROUNDING and MASTER_ROW."""
    run_blocks(WALK, NUMBERS_OF_BLOCK, ROUNDING, MASTER_ROW, table, blocks, block, like, master_like, steps, numbers,
               launch, flags)


# ---- each rule's kernels, made from its spec ----

def with_names(function, names, name=None):
    """`function` with `names` bound among its globals (the same code otherwise), named `name`."""
    bound = python_types.FunctionType(function.__code__, {**function.__globals__, **names},
                                      name or function.__name__, function.__defaults__, function.__closure__)
    bound.__qualname__ = name or function.__qualname__
    return bound


def source_digest(spec):
    """A digest of every source file a kernel of `spec` is made from: this file, the table layout,
    the state formats, and the files of the rule's functions."""
    return files_digest([__file__, tables.__file__, formats.__file__, inspect.getsourcefile(spec.update),
                         inspect.getsourcefile(spec.block_numbers)])


def files_digest(paths):
    """A digest of the contents of the files at `paths` (each once, in any order)."""
    digest = hashlib.sha256()
    for path in sorted(set(paths)):
        with open(path, "rb") as file:
            digest.update(file.read())
    return digest.hexdigest()[:16]


def kernel_name(spec, options, storage):
    """The kernel's name, which its cache entry carries: rule, options, storage, source digest."""
    flags = "_".join(name for name, value in zip(options._fields, options) if value) or "plain"
    states = "_".join(storage.states)
    return f"{spec.name}_{flags}_{states}_{storage.state_rounding}_{storage.param_rounding}_{source_digest(spec)}"


_kernels = {}  # (the rule's update function, options, storage) -> its kernel


def kernel_for(spec, options, storage):
    """The kernel of `spec` under `options` for a bucket stored as `storage` (fusedopt.formats.Storage),
    made once (numba compiles it per param dtype at its first call, or loads it from its cache)."""
    key = (spec.update, options, storage)
    kernel = _kernels.get(key)
    if kernel is None:
        kernel = _kernels[key] = make_kernel(spec, options, storage)
    return kernel


def make_kernel(spec, options, storage):
    """The rule's two functions compiled with numba's arithmetic, in its own copies of the walks
    with this kernel's constants (each state slot's functions for its format), the kernel named by
    kernel_name (its cache entry's name)."""
    if len(spec.states) > MAX_STATES:
        raise ValueError(f"{spec.name}: the CPU kernels take at most {MAX_STATES} state slots")
    update, block_numbers = (njit(error_model="numpy")(with_names(function, NUMBA_ARITHMETIC))
                             for function in (spec.update, spec.block_numbers))
    slots = list(zip(storage.states, (slot.signed for slot in spec.states)))
    slots += [(formats.ABSENT, False)] * (MAX_STATES - len(slots))
    constants, row = {}, 0
    for index, (fmt, signed) in enumerate(slots):
        opener, unit, read, write, finish, roles = state_functions(fmt, signed, storage.state_rounding)
        constants.update({f"OPEN{index}": opener, f"UNIT{index}": unit, f"READ{index}": read, f"WRITE{index}": write,
                          f"FINISH{index}": finish, f"ROW{index}": row})
        row += roles
    quantized = formats.Q8 in storage.states
    rounding = ROUNDINGS[storage.param_rounding]
    walk = njit(inline="always", error_model="numpy")(with_names(walk_block, dict(
        constants, UPDATE=update, OPTIONS=options, SLOTS=len(spec.states), ROUNDING=rounding,
        GROUP=QUANT_BLOCK if quantized else 1 << 62, WHOLE_GROUPS=quantized, STASH=QUANT_BLOCK if quantized else 1,
        STOCHASTIC_CODES=storage.state_rounding == "stochastic")))
    numbers = njit(error_model="numpy")(with_names(numbers_of_block, dict(
        BLOCK_NUMBERS=block_numbers, LAUNCH=spec.Launch, LAUNCH_LENGTH=len(spec.Launch._fields))))
    kernel = with_names(rule_kernel, dict(WALK=walk, NUMBERS_OF_BLOCK=numbers, ROUNDING=rounding,
                                          MASTER_ROW=FIRST_STATE_ROW + row), kernel_name(spec, options, storage))
    return njit(**KERNEL_OPTIONS)(kernel)
