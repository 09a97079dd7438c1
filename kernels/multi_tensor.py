"""The Triton backend of the one multi-tensor mechanism: the tensor table's launch (one program per
block of every tensor in a bucket), the one update kernel every rule runs through, the shared
@triton.jit helpers, and each rule's equations (fusedopt.spec) compiled with Triton's arithmetic.
"""
import ast
import inspect
import os
import textwrap
import types

import triton
import triton.language as tl
import torch

from .. import formats, tables
from ..spec import ARITHMETIC
from ..tables import GroupStep, count_launch, launch_count  # noqa: F401 (the kernels' API)

# Whether triton.jit defines the kernels below for its interpreter (they then take CPU tensors).
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def interpreted_copy(function, made):
    """Triton's own @triton.jit `function` as the interpreter runs it, and in it the library
    functions it calls: triton defines its library when it is first imported, which torch.compile's
    machinery may do before the interpreter is turned on (fusedopt.backends); the interpreter
    cannot call the compiler's functions. (Functions passed, not called, such as a reduction's
    combine, the interpreter takes as they are.)"""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    if not isinstance(function, JITFunction):
        return function
    if function not in made:
        python = function.fn
        scope = dict(python.__globals__)
        made[function] = InterpretedFunction(types.FunctionType(python.__code__, scope, python.__name__,
                                                                python.__defaults__, python.__closure__))
        tree = ast.parse(textwrap.dedent(inspect.getsource(python)))
        called = {node.func.id for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)}
        for name in called & scope.keys():
            scope[name] = interpreted_copy(scope[name], made)
    return made[function]


# The library functions the kernels call, as the interpreter can run them where it is on
tl_max, tl_sum, tl_philox = tl.max, tl.sum, tl.philox
if INTERPRETED:
    _made = {}
    tl_max, tl_sum, tl_philox = (interpreted_copy(function, _made) for function in (tl.max, tl.sum, tl.philox))

# 8 warps over 2048 elements: 8 elements per thread, two 16-byte accesses per fp32 stream, which
# keeps Adam with AMSGrad (5 streams) well under the register limit on sm_80 and sm_90.
NUM_WARPS = 8


def block_size(dtype):
    return 1024 if dtype == torch.float64 else 2048


def kernel_dtype(dtype):
    """The Triton element type a kernel loads and stores for tensors of `dtype`."""
    return {
        torch.float32: tl.float32,
        torch.float16: tl.float16,
        torch.bfloat16: tl.bfloat16,
        torch.float64: tl.float64,
    }[dtype]


# ---- the arithmetic a rule's equations use (fusedopt.spec), in Triton ----

@triton.jit
def _sqrt(x):
    return tl.sqrt(x)


@triton.jit
def _exp2(x):
    return tl.exp2(x)


@triton.jit
def _lerp(start, end, weight):
    # torch's lerp, from the nearer end: exactly `end` at weight 1
    if weight < 0.5:
        result = start + weight * (end - start)
    else:
        result = end + (weight - 1) * (end - start)
    return result


@triton.jit
def _fma(a, b, c):
    # a * b + c, whatever a Triton makes of tl.fma (Triton 3.6's interpreter rounds the product):
    # fp32 operands in fp64, where their product is exact, so that a sum that cancels (centered
    # RMSprop's sq - gavg^2) is exact as with one rounding
    if a.dtype == tl.float64:
        return tl.fma(a, b, c)
    else:
        return (a.to(tl.float64) * b.to(tl.float64) + c.to(tl.float64)).to(a.dtype)


@triton.jit
def _maximum(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _sign(x):
    return tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, 0.0)).to(x.dtype)  # NaN: 0, as torch.sign


@triton.jit
def _to_compute(x, COMPUTE: tl.constexpr):
    # tl.full: also for a number the interpreter passes through as a Python float
    return tl.full((), x, COMPUTE)


# `tl` too: the interpreter patches the triton.language it finds among a function's globals
TRITON_ARITHMETIC = dict(tl=tl, sqrt=_sqrt, exp2=_exp2, lerp=_lerp, fma=_fma, maximum=_maximum, sign=_sign,
                         to_compute=_to_compute)
assert set(TRITON_ARITHMETIC) - {"tl"} == set(ARITHMETIC)

_rule_functions = {}  # a rule's update function -> (update, block_numbers) as @triton.jit functions


def with_arithmetic(function, arithmetic):
    """`function`, its arithmetic names (fusedopt.spec.ARITHMETIC) bound to `arithmetic`: the same
    code and module globals otherwise."""
    bound = types.FunctionType(function.__code__, {**function.__globals__, **arithmetic}, function.__name__,
                               function.__defaults__, function.__closure__)
    bound.__qualname__, bound.__module__, bound.__doc__ = function.__qualname__, function.__module__, function.__doc__
    return bound


def rule_functions(spec):
    """The rule's (update, block_numbers), compiled by Triton with its arithmetic, made once."""
    functions = _rule_functions.get(spec.update)
    if functions is None:
        functions = _rule_functions[spec.update] = tuple(
            triton.jit(with_arithmetic(function, TRITON_ARITHMETIC)) for function in (spec.update, spec.block_numbers))
    return functions


PARAM_ROUNDINGS = {name: code for code, name in enumerate(formats.PARAM_ROUNDINGS)}  # the kernel's PARAM_ROUNDING


def state_formats(spec, storage):
    """The kernel's STATES: each slot's format code (ABSENT, PLAIN_STATE, BF16_STATE, Q8_SIGNED,
    Q8_UNSIGNED) from the bucket's storage and the slot's sign."""
    codes = {formats.ABSENT: 0, formats.PLAIN: 1, formats.BF16: 2}
    return tuple(codes[fmt] if fmt in codes else 3 if slot.signed else 4
                 for fmt, slot in zip(storage.states, spec.states))


class TensorTable(tables.TensorTable):
    """A bucket's tensor table (fusedopt.tables), launched by the Triton kernels: on CUDA tensors,
    and on CPU tensors through the Triton interpreter."""

    walks_cpu_tensors = INTERPRETED

    def block_size(self, dtype):
        return block_size(dtype)

    def __init__(self, params, grads, states, extra=None):
        super().__init__(params, grads, states, extra)
        # 0 and 1 on the device, for absent grad-scaling factors (made here, not during a capture)
        self.neutral = torch.tensor([0.0, 1.0]).to(self.device, non_blocking=True)

    @classmethod
    def ready(cls, spec, options, storage, dtype):
        return True  # compiled at the first launch, by Triton's own cache

    def scaling_arguments(self, scaling):
        """The kernel arguments (found_inf, grad_scale, clip_coef, SCALED_GRADS) for `scaling`: the
        absent factors point at a neutral 0 / 1 / 1 kept on this device."""
        if scaling is None or all(value is None for value in scaling):
            return self.tensor_table, self.tensor_table, self.tensor_table, False
        found_inf, grad_scale, clip_coef = (
            self.neutral[default] if value is None else value.reshape(1)
            for value, default in zip(scaling, (0, 1, 1))
        )
        return found_inf, grad_scale, clip_coef, True

    def lr_arguments(self, lr, group_step):
        """(lr, (schedule, group_step, schedule_length, rounding_seed), constexprs LR_TENSOR,
        SCHEDULED). A tensor lr on this device is read by the kernel from memory (no host sync, and
        a captured CUDA graph sees in-place changes); anything else goes as a number. `group_step`
        (a GroupStep or None) brings the schedule that scales it and the seed of stochastic
        rounding."""
        lr_tensor = self.lr_in_memory(lr)
        lr = lr if lr_tensor else float(lr)
        group_step = group_step or GroupStep(self.tensor_table)
        factors = group_step.factors
        arguments = (self.tensor_table if factors is None else factors, group_step.count,
                     1 if factors is None else factors.numel(),
                     self.tensor_table if group_step.rounding_seed is None else group_step.rounding_seed)
        return lr, arguments, dict(LR_TENSOR=lr_tensor, SCHEDULED=factors is not None)

    def step(self, spec, numbers, options, storage, *, lr, steps=None, fresh=False, scaling=None, group_step=None):
        """fusedopt.tables.TensorTable.step: one launch of the update kernel."""
        found_inf, grad_scale, clip_coef, scaled = self.scaling_arguments(scaling)
        lr, schedule_arguments, lr_flags = self.lr_arguments(lr, group_step)
        update, block_numbers = rule_functions(spec)
        self.launch(
            update_kernel,
            self.tensor_table if steps is None else steps, found_inf, grad_scale, clip_coef, *schedule_arguments,
            lr, numbers._make(map(float, numbers)),
            UPDATE=update, BLOCK_NUMBERS=block_numbers, OPTIONS=options, STATES=state_formats(spec, storage),
            STEPS=spec.steps, EXTRA=fresh, SCALED_GRADS=scaled, PARAM_ROUNDING=PARAM_ROUNDINGS[storage.param_rounding],
            STOCHASTIC_STATES=storage.state_rounding == "stochastic", **lr_flags,
        )

    def launch(self, kernel, *arguments, **constexprs):
        """One launch of `kernel` over every block of every tensor in the table."""
        if self.num_blocks == 0:
            return
        count_launch()
        # Numbers go in as floats, so an int hyperparameter (weight_decay=0) compiles no variant;
        # tensors (step counts, grad scaling) go in as pointers, tuples as they are.
        arguments = [value if torch.is_tensor(value) or isinstance(value, tuple) else float(value)
                     for value in arguments]
        arguments = (self.tensor_table, self.block_table, self.num_tensors, self.num_blocks, *arguments)
        options = dict(constexprs, DTYPE=kernel_dtype(self.dtype), ALIGNED=self.aligned, BLOCK=self.block,
                       num_warps=NUM_WARPS)
        if self.device.type == "cuda" and self.device.index != torch.cuda.current_device():
            with torch.cuda.device(self.device):
                kernel[(self.num_blocks,)](*arguments, **options)
        else:
            kernel[(self.num_blocks,)](*arguments, **options)


# ---- device-side helpers shared by every rule kernel ----

# The rows of the tensor table (fusedopt.tables), as the kernels read them
NUMEL_ROW = tl.constexpr(tables.NUMEL_ROW)
EXTRA_ROW = tl.constexpr(tables.EXTRA_ROW)
FIRST_ADDRESS_ROW = tl.constexpr(tables.FIRST_ADDRESS_ROW)
# How a param is stored (fusedopt.formats.Storage.param_rounding), and each state (STATE_FORMATS)
NEAREST, STOCHASTIC, MASTER, REMAINDER = (tl.constexpr(code) for code in PARAM_ROUNDINGS.values())
ABSENT, PLAIN_STATE, BF16_STATE, Q8_SIGNED, Q8_UNSIGNED = (tl.constexpr(code) for code in range(5))
QUANT_BLOCK = tl.constexpr(formats.QUANT_BLOCK)
SIGNED_CODES = tl.constexpr(float(formats.SIGNED_CODES))
UNSIGNED_CODES = tl.constexpr(float(formats.UNSIGNED_CODES))
ROUNDING_SHIFT = tl.constexpr(1.5 * 2**23)  # added to a float below 2^22, rounds it to an integer
PTX_PRODUCTS = tl.constexpr(not INTERPRETED and torch.version.hip is None)  # the codec's products (product)


@triton.jit
def locate_block(tensor_table, block_table, num_tensors, num_blocks, BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    """This program's tensor, its element offsets, the tensor's size, whether the block is full, and
    its first element."""
    block = tl.program_id(0)
    tensor = tl.load(block_table + block)
    start = tl.load(block_table + num_blocks + block)
    numel = tl.load(tensor_table + NUMEL_ROW * num_tensors + tensor)
    if ALIGNED:
        start = tl.multiple_of(start, BLOCK)
    offsets = start + tl.arange(0, BLOCK)
    return tensor, offsets, numel, start + BLOCK <= numel, start


@triton.jit
def grad_scaling(found_inf_ptr, grad_scale_ptr, clip_coef_ptr):
    """(skip, inv_scale, clip_factor): GradScaler's skip flag, its 1/scale (rounded to fp32 from a
    double reciprocal, as GradScaler.unscale_ computes it), and the clip factor."""
    skip = tl.load(found_inf_ptr) != 0
    inv_scale = (1.0 / tl.load(grad_scale_ptr).to(tl.float64)).to(tl.float32)
    return skip, inv_scale, tl.load(clip_coef_ptr)


@triton.jit
def scale_grad(grad, inv_scale, clip_factor, SCALED_GRADS: tl.constexpr):
    """Unscale, then clip, in the order of `unscale_` then `clip_grad_norm_`."""
    if SCALED_GRADS:
        grad = grad * inv_scale.to(grad.dtype) * clip_factor.to(grad.dtype)
    return grad


@triton.jit
def device_lr(lr, schedule, group_step, schedule_length, LR_TENSOR: tl.constexpr, SCHEDULED: tl.constexpr):
    """The lr read from memory, as fp64: a tensor lr, and/or (SCHEDULED) the base lr times the
    schedule's factor at the group's step count, table[min(count, length) - 1] (the last factor
    is held)."""
    if SCHEDULED:
        # counts and length as floats (exact to 2^24 steps): the launcher passes numbers as floats
        index = tl.maximum(tl.minimum(tl.load(group_step), schedule_length) - 1, 0).to(tl.int64)
        factor = tl.load(schedule + index).to(tl.float64)
        if LR_TENSOR:
            return tl.load(lr).to(tl.float64) * factor
        else:
            return lr * factor
    else:
        return tl.load(lr).to(tl.float64)


@triton.jit
def tensor_step(steps_ptr, tensor):
    """The step count of `tensor` (already incremented for this step), as fp64."""
    return tl.load(steps_ptr + tensor).to(tl.float64)


@triton.jit
def tensor_extra(tensor_table, num_tensors, tensor):
    """The per-tensor integer of EXTRA_ROW."""
    return tl.load(tensor_table + EXTRA_ROW * num_tensors + tensor)


@triton.jit
def tensor_pointer(tensor_table, num_tensors, tensor, role, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """Typed pointer to the first element of `tensor` for a role (0 param, 1 grad, 2.. states)."""
    address = tl.load(tensor_table + (FIRST_ADDRESS_ROW + role) * num_tensors + tensor)
    pointer = address.to(tl.pointer_type(DTYPE))
    if ALIGNED:
        pointer = tl.multiple_of(pointer, 16)
    return pointer


@triton.jit
def load_block(pointer, offsets, numel, FULL: tl.constexpr):
    """Load a block and widen it to the compute type (fp64 for fp64, else fp32)."""
    if FULL:
        values = tl.load(pointer + offsets)
    else:
        values = tl.load(pointer + offsets, mask=offsets < numel, other=0.0)
    return values.to(tl.float64 if values.dtype == tl.float64 else tl.float32)


@triton.jit
def round_to_bfloat16(values):
    """fp32 -> bf16 rounding to nearest even, written out so that the interpreter (which
    truncates) and the GPU round alike."""
    bits = values.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    rounded = tl.where(values != values, 0x7FC0, rounded)  # NaN stays NaN (carry could flip it)
    return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def stochastic_round_to_bfloat16(values, random_bits):
    """fp32 -> bf16 rounding up in magnitude with probability (dropped bits) / 2^16: unbiased,
    E[rounded] = value. `random_bits` are uniform uint32; their low 16 bits are used."""
    bits = values.to(tl.uint32, bitcast=True)
    rounded = (bits + (random_bits & 0xFFFF)) >> 16
    rounded = tl.where(values != values, 0x7FC0, rounded)  # NaN stays NaN
    return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def load_param(param_ptr, master_ptr, offsets, numel, ROUNDING: tl.constexpr, FULL: tl.constexpr):
    """The param the update starts from: its fp32 master copy (MASTER), the master its bf16 param
    and 16-bit remainder stand for (REMAINDER), else the param."""
    if ROUNDING == MASTER:
        return load_block(master_ptr, offsets, numel, FULL)
    elif ROUNDING == REMAINDER:
        if FULL:
            high = tl.load(param_ptr + offsets).to(tl.uint16, bitcast=True)
            low = tl.load(master_ptr + offsets)
        else:
            high = tl.load(param_ptr + offsets, mask=offsets < numel, other=0.0).to(tl.uint16, bitcast=True)
            low = tl.load(master_ptr + offsets, mask=offsets < numel, other=0)
        bits = (high.to(tl.uint32) << 16) + low.to(tl.int32).to(tl.uint32)
        return bits.to(tl.float32, bitcast=True)
    else:
        return load_block(param_ptr, offsets, numel, FULL)


@triton.jit
def store_param(param_ptr, master_ptr, offsets, numel, values, random_bits, ROUNDING: tl.constexpr,
                FULL: tl.constexpr):
    """Store the updated param: (STOCHASTIC, bf16) rounded stochastically with `random_bits` (which
    depend only on the seed, the element, the tensor and the group's step count: reproducible,
    replayable); beside its fp32 master (MASTER, REMAINDER) as the bf16 param rounded to nearest
    with ties away from zero, and the master: the fp32 copy, or the 16-bit remainder that gives it
    back exactly (the same params either way); else rounded to nearest."""
    if ROUNDING == STOCHASTIC:
        store_values(param_ptr, offsets, numel, stochastic_round_to_bfloat16(values, random_bits), FULL)
    elif ROUNDING == MASTER or ROUNDING == REMAINDER:
        bits = values.to(tl.uint32, bitcast=True)
        high = (bits + 0x8000) >> 16
        if ROUNDING == MASTER:
            store_block(master_ptr, offsets, numel, values, FULL)
        else:
            remainder = (bits - (high << 16)).to(tl.uint16).to(tl.int16, bitcast=True)
            store_values(master_ptr, offsets, numel, remainder, FULL)
        high = tl.where(values != values, 0x7FC0, high)  # NaN stays NaN (carry could flip it)
        store_values(param_ptr, offsets, numel, high.to(tl.uint16).to(tl.bfloat16, bitcast=True), FULL)
    else:
        store_block(param_ptr, offsets, numel, values, FULL)


@triton.jit
def store_values(pointer, offsets, numel, values, FULL: tl.constexpr):
    """Store a block of values of the tensor's own type."""
    if FULL:
        tl.store(pointer + offsets, values)
    else:
        tl.store(pointer + offsets, values, mask=offsets < numel)


# ---- states in their formats (fusedopt.formats): decoded on load, encoded on store ----

@triton.jit
def product(a, b):
    """a * b (fp32), rounded as the codec rounds it: never fused with the add or subtract that
    follows (the GPU compilers make fmas of them, rounding once where the codec rounds twice), nor
    its denormals flushed. On NVIDIA GPUs mul.rn.f32, which ptxas never contracts; elsewhere (the
    interpreter's numpy multiply fuses nothing) the plain multiply."""
    if PTX_PRODUCTS:
        return tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.float32, is_pure=True,
                                         pack=1)
    else:
        return a * b


@triton.jit
def load_state(values_ptr, scales_ptr, offsets, start, numel, FORMAT: tl.constexpr, FULL: tl.constexpr,
               BLOCK: tl.constexpr):
    """A state's block in the math dtype: as stored (PLAIN, BF16: widened), or decoded from 8-bit
    codes and their blocks' scales: code x scale / 127 (signed), (code x scale / 255)^2 (the
    non-negative, stored as square roots)."""
    if FORMAT == Q8_SIGNED or FORMAT == Q8_UNSIGNED:
        if FULL:
            codes = tl.load(values_ptr + offsets)
        else:
            codes = tl.load(values_ptr + offsets, mask=offsets < numel, other=0)
        groups = start // QUANT_BLOCK + tl.arange(0, BLOCK // QUANT_BLOCK)
        scales = tl.load(scales_ptr + groups, mask=groups * QUANT_BLOCK < numel, other=0.0)
        # correctly rounded (`/` on a GPU is approximate), and products never fused into the
        # rule's arithmetic: the codec's values, bit for bit
        top = tl.full(scales.shape, SIGNED_CODES if FORMAT == Q8_SIGNED else UNSIGNED_CODES, tl.float32)
        units = tl.div_rn(scales, top)
        values = tl.reshape(product(tl.reshape(codes.to(tl.float32), (BLOCK // QUANT_BLOCK, QUANT_BLOCK)),
                                    units[:, None]), (BLOCK,))
        if FORMAT == Q8_UNSIGNED:
            values = product(values, values)
        return values
    else:
        return load_block(values_ptr, offsets, numel, FULL)


@triton.jit
def store_state(values_ptr, scales_ptr, offsets, start, numel, values, random_bits, FORMAT: tl.constexpr,
                STOCHASTIC_STATES: tl.constexpr, FULL: tl.constexpr, BLOCK: tl.constexpr):
    """Store a state's block in its format: rounded to nearest (or, STOCHASTIC_STATES, stochastically
    with `random_bits`) in its own dtype or bf16; or as 8-bit codes with each block's new scale,
    computed here (fusedopt.formats' codec, the same operations in the same order)."""
    if FORMAT == Q8_SIGNED or FORMAT == Q8_UNSIGNED:
        grouped = tl.reshape(values, (BLOCK // QUANT_BLOCK, QUANT_BLOCK))
        if FORMAT == Q8_UNSIGNED:
            grouped = tl.sqrt_rn(tl.maximum(grouped, 0.0, propagate_nan=tl.PropagateNan.ALL))
        largest = tl_max(tl.abs(grouped), axis=1)
        has_nan = tl_max((grouped != grouped).to(tl.int32), axis=1) > 0  # tl.max may drop a NaN
        scales = tl.where(has_nan, float("nan"), largest)
        safe = tl.where(scales > 0, scales, 1.0)
        # one correctly rounded division per block (`/` on a GPU is approximate), then a multiply
        # rounded before the rounding to a code adds to it
        top = tl.full(safe.shape, SIGNED_CODES if FORMAT == Q8_SIGNED else UNSIGNED_CODES, tl.float32)
        scaled = product(grouped, tl.div_rn(top, safe)[:, None])
        if STOCHASTIC_STATES:
            fraction = tl.reshape((random_bits & 0xFFFF).to(tl.float32) * (1.0 / 65536),
                                  (BLOCK // QUANT_BLOCK, QUANT_BLOCK))
            codes = tl.floor(scaled + fraction)
        else:
            codes = (scaled + ROUNDING_SHIFT) - ROUNDING_SHIFT  # to nearest, ties to even (|scaled| < 2^22)
        # clamped keeping NaNs (those of a block whose scale is NaN or inf), which then take code 0
        if FORMAT == Q8_SIGNED:
            codes = tl.minimum(tl.maximum(codes, -SIGNED_CODES, propagate_nan=tl.PropagateNan.ALL), SIGNED_CODES,
                               propagate_nan=tl.PropagateNan.ALL)
        else:
            codes = tl.minimum(tl.maximum(codes, 0.0, propagate_nan=tl.PropagateNan.ALL), UNSIGNED_CODES,
                               propagate_nan=tl.PropagateNan.ALL)
            codes = tl.where((grouped > 0) & (codes == 0), 1.0, codes)  # a nonzero value never reads as zero
        codes = tl.where(codes == codes, codes, 0.0)
        codes = tl.reshape(codes, (BLOCK,)).to(values_ptr.dtype.element_ty)
        store_values(values_ptr, offsets, numel, codes, FULL)
        groups = start // QUANT_BLOCK + tl.arange(0, BLOCK // QUANT_BLOCK)
        tl.store(scales_ptr + groups, scales, mask=groups * QUANT_BLOCK < numel)
    elif STOCHASTIC_STATES and FORMAT == BF16_STATE:
        store_values(values_ptr, offsets, numel, stochastic_round_to_bfloat16(values, random_bits), FULL)
    else:
        store_block(values_ptr, offsets, numel, values, FULL)


@triton.jit
def store_block(pointer, offsets, numel, values, FULL: tl.constexpr):
    """Round a block to the tensor's own dtype (to nearest even) and store it."""
    if pointer.dtype.element_ty == tl.bfloat16:
        values = round_to_bfloat16(values)
    else:
        values = values.to(pointer.dtype.element_ty)
    if FULL:
        tl.store(pointer + offsets, values)
    else:
        tl.store(pointer + offsets, values, mask=offsets < numel)


# ---- the one update kernel ----

@triton.jit
def update_block(param_ptr, master_ptr, grad_ptr, value_ptrs, scale_ptrs, offsets, start, numel, block_numbers,
                 inv_scale, clip_factor, random_streams, UPDATE: tl.constexpr, OPTIONS: tl.constexpr,
                 STATES: tl.constexpr, SCALED_GRADS: tl.constexpr, PARAM_ROUNDING: tl.constexpr,
                 STOCHASTIC_STATES: tl.constexpr, FULL: tl.constexpr, BLOCK: tl.constexpr):
    """Load one block of param, grad and the present states (decoded), apply the rule, store them
    back (encoded)."""
    param = load_param(param_ptr, master_ptr, offsets, numel, PARAM_ROUNDING, FULL)
    grad = scale_grad(load_block(grad_ptr, offsets, numel, FULL), inv_scale, clip_factor, SCALED_GRADS)
    states = ()
    for slot in tl.static_range(len(STATES)):
        if STATES[slot] == ABSENT:
            states = states + (grad,)  # a state the launch has not: the rule does not read it
        else:
            states = states + (load_state(value_ptrs[slot], scale_ptrs[slot], offsets, start, numel, STATES[slot],
                                          FULL, BLOCK),)
    updated = UPDATE(param, grad, *states, block_numbers, OPTIONS)  # (param, *states)
    store_param(param_ptr, master_ptr, offsets, numel, updated[0], random_streams[0], PARAM_ROUNDING, FULL)
    for slot in tl.static_range(len(STATES)):
        if STATES[slot] != ABSENT:
            store_state(value_ptrs[slot], scale_ptrs[slot], offsets, start, numel, updated[1 + slot],
                        random_streams[1 + slot], STATES[slot], STOCHASTIC_STATES, FULL, BLOCK)


@triton.jit
def state_pointer(tensor_table, num_tensors, tensor, role, FORMAT: tl.constexpr, DTYPE: tl.constexpr,
                  ALIGNED: tl.constexpr):
    """Typed pointer to a state of FORMAT, beside params of DTYPE (plain states are DTYPE)."""
    if FORMAT == BF16_STATE:
        return tensor_pointer(tensor_table, num_tensors, tensor, role, tl.bfloat16, ALIGNED)
    elif FORMAT == Q8_SIGNED:
        return tensor_pointer(tensor_table, num_tensors, tensor, role, tl.int8, ALIGNED)
    elif FORMAT == Q8_UNSIGNED:
        return tensor_pointer(tensor_table, num_tensors, tensor, role, tl.uint8, ALIGNED)
    else:
        return tensor_pointer(tensor_table, num_tensors, tensor, role, DTYPE, ALIGNED)


@triton.jit(do_not_specialize=["num_tensors", "num_blocks"])
def update_kernel(
    tensor_table,  # int64 [roles + 2, num_tensors]: sizes, extras, addresses (param, grad, states, master)
    block_table,  # int64 [2, num_blocks]: owning tensor and first element of each block
    num_tensors, num_blocks,
    steps,  # [num_tensors] step counts, already incremented for this step (STEPS)
    found_inf, grad_scale, clip_coef,  # one-element tensors, read when SCALED_GRADS
    schedule, group_step, schedule_length,  # the lr schedule's factors (SCHEDULED), the group's step count
    rounding_seed,  # int64 seed of stochastic rounding (of the param or the states)
    lr,  # a number, or a one-element tensor (LR_TENSOR)
    numbers,  # the rule's numbers for this launch (its RuleSpec.Launch)
    UPDATE: tl.constexpr,  # the rule's update (RuleSpec.update, compiled: rule_functions)
    BLOCK_NUMBERS: tl.constexpr,  # the rule's per-block numbers (RuleSpec.block_numbers, compiled)
    OPTIONS: tl.constexpr,  # the rule's compile-time options (its RuleSpec.Options)
    STATES: tl.constexpr,  # each state slot's format (ABSENT where the options keep none; STATE_FORMATS)
    STEPS: tl.constexpr,  # read each tensor's step count
    EXTRA: tl.constexpr,  # read each tensor's integer of EXTRA_ROW
    SCALED_GRADS: tl.constexpr,  # skip on found_inf; grads unscaled and clipped in registers
    LR_TENSOR: tl.constexpr,  # lr points at a one-element tensor
    SCHEDULED: tl.constexpr,  # the lr is multiplied by the schedule's factor at this step
    PARAM_ROUNDING: tl.constexpr,  # NEAREST, STOCHASTIC (bf16), MASTER (an fp32 copy), REMAINDER (16 bits)
    STOCHASTIC_STATES: tl.constexpr,  # bf16 and 8-bit states are rounded stochastically
    DTYPE: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
):
    tensor, offsets, numel, full, start = locate_block(tensor_table, block_table, num_tensors, num_blocks, BLOCK,
                                                       ALIGNED)
    skip, inv_scale, clip_factor = False, 1.0, 1.0
    if SCALED_GRADS:
        skip, inv_scale, clip_factor = grad_scaling(found_inf, grad_scale, clip_coef)
    if not skip:
        param_ptr = tensor_pointer(tensor_table, num_tensors, tensor, 0, DTYPE, ALIGNED)
        grad_ptr = tensor_pointer(tensor_table, num_tensors, tensor, 1, DTYPE, ALIGNED)
        value_ptrs = ()
        scale_ptrs = ()
        role = 2  # the present states' roles follow param and grad, in slot order: values, then any scales
        for slot in tl.static_range(len(STATES)):
            if STATES[slot] == ABSENT:
                value_ptrs = value_ptrs + (param_ptr,)  # not dereferenced
                scale_ptrs = scale_ptrs + (param_ptr,)
            else:
                value_ptrs = value_ptrs + (state_pointer(tensor_table, num_tensors, tensor, role, STATES[slot],
                                                         DTYPE, ALIGNED),)
                role += 1
                if STATES[slot] == Q8_SIGNED or STATES[slot] == Q8_UNSIGNED:
                    scale_ptrs = scale_ptrs + (tensor_pointer(tensor_table, num_tensors, tensor, role, tl.float32,
                                                              ALIGNED),)
                    role += 1
                else:
                    scale_ptrs = scale_ptrs + (param_ptr,)  # not dereferenced
        master_ptr = param_ptr
        if PARAM_ROUNDING == MASTER:
            master_ptr = tensor_pointer(tensor_table, num_tensors, tensor, role, tl.float32, ALIGNED)
        elif PARAM_ROUNDING == REMAINDER:
            master_ptr = tensor_pointer(tensor_table, num_tensors, tensor, role, tl.int16, ALIGNED)
        COMPUTE: tl.constexpr = tl.float64 if DTYPE == tl.float64 else tl.float32
        step = 0.0
        if STEPS:
            step = tensor_step(steps, tensor)
        extra = 0
        if EXTRA:
            extra = tensor_extra(tensor_table, num_tensors, tensor)
        if LR_TENSOR or SCHEDULED:  # read here, so that a captured graph sees the lr change
            block_numbers = BLOCK_NUMBERS(device_lr(lr, schedule, group_step, schedule_length, LR_TENSOR, SCHEDULED),
                                          step, extra, numbers, True, COMPUTE)
        else:  # a number lr is passed on as it came: the interpreter would round a copy of it to fp32
            block_numbers = BLOCK_NUMBERS(lr, step, extra, numbers, False, COMPUTE)
        random_streams = (offsets, offsets, offsets, offsets)  # not read unless something rounds stochastically
        if PARAM_ROUNDING == STOCHASTIC or STOCHASTIC_STATES:
            # random bits that depend only on the seed, the element, the tensor and the group's step
            # count: reproducible, and fresh at every replay of a captured graph; one stream for the
            # param, one for each state slot
            random_streams = tl_philox(tl.load(rounding_seed), offsets.to(tl.int32), tensor.to(tl.int32),
                                       tl.load(group_step).to(tl.int32), 0)
        if full:
            update_block(param_ptr, master_ptr, grad_ptr, value_ptrs, scale_ptrs, offsets, start, numel,
                         block_numbers, inv_scale, clip_factor, random_streams, UPDATE, OPTIONS, STATES,
                         SCALED_GRADS, PARAM_ROUNDING, STOCHASTIC_STATES, True, BLOCK)
        else:
            update_block(param_ptr, master_ptr, grad_ptr, value_ptrs, scale_ptrs, offsets, start, numel,
                         block_numbers, inv_scale, clip_factor, random_streams, UPDATE, OPTIONS, STATES,
                         SCALED_GRADS, PARAM_ROUNDING, STOCHASTIC_STATES, False, BLOCK)
