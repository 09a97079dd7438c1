"""The one multi-tensor mechanism: device-side pointer tables and a block map, so that a single
launch updates a whole list of tensors, plus the small @triton.jit helpers every rule kernel uses.
"""
import os
from typing import NamedTuple, Optional

import triton
import triton.language as tl
import torch

# Whether triton.jit defines the kernels below for its interpreter (they then take CPU tensors).
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

# Rows of the per-tensor table (int64, one column per tensor).
NUMEL_ROW = 0  # elements in the tensor (real elements: a complex tensor counts twice)
EXTRA_ROW = 1  # one per-tensor integer a rule may need (SGD's fresh-buffer flag)
FIRST_ADDRESS_ROW = 2  # then one row of addresses per role: param, grad, each state

_launches = 0


def launch_count():
    """Total number of kernel launches (updates and grad-norm reductions) made in this process."""
    return _launches


def count_launch():
    global _launches
    _launches += 1


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


def real_view(tensor):
    """Complex tensors are updated as their real view, like torch.optim does."""
    return torch.view_as_real(tensor) if tensor.is_complex() else tensor


def is_dense(tensor):
    """True when the elements fill one gap-free span of memory (any dim order)."""
    if tensor.is_contiguous():
        return True
    expected = 1
    for size, stride in sorted(zip(tensor.shape, tensor.stride()), key=lambda d: d[1]):
        if size == 1:
            continue
        if stride != expected:
            return False
        expected *= size
    return True


def same_layout(reference, other, dtype=None):
    """`other` can be walked element by element alongside `reference`'s memory span (and holds
    `dtype`, default `reference`'s)."""
    return (
        other.shape == reference.shape
        and other.dtype == (reference.dtype if dtype is None else dtype)
        and other.device == reference.device
        and not other.is_sparse
        and (other.stride() == reference.stride() or (reference.is_contiguous() and other.is_contiguous()))
    )


def holds_its_values(tensor, cpu_kernels=None):
    """A tensor whose own memory holds its values as they read: not a wrapper subclass (a DTensor,
    a FakeTensor: its data pointer names no memory of its own, and its size may not be its
    shard's), nor a lazily conjugated or negated view, nor on a device the kernels cannot reach
    (the CPU: with `cpu_kernels`, the numba kernels; by default, the Triton interpreter)."""
    on_cpu = INTERPRETED if cpu_kernels is None else cpu_kernels
    return (
        type(tensor).__torch_dispatch__ is torch._C._disabled_torch_dispatch_impl
        and (tensor.device.type == "cuda" or (tensor.device.type == "cpu" and on_cpu))
        and not tensor.is_conj()
        and not tensor.is_neg()
    )


def fits_kernel(param, grad, states, master=None, *, cpu_kernels=None):
    """Whether (param, grad, states and an fp32 master copy) can go through a kernel: plain tensors
    holding their values, one dense span each, laid out alike (`cpu_kernels`: see holds_its_values)."""
    if not all(holds_its_values(t, cpu_kernels) for t in (param, grad, *states, *([] if master is None else [master]))):
        return False
    param = real_view(param)
    if param.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        return False
    if grad.is_sparse or not is_dense(param):
        return False
    if master is not None and not same_layout(param, master, torch.float32):
        return False
    return all(same_layout(param, real_view(t)) for t in (grad, *states))


def check_span(tensor, cpu_kernels=None):
    """Raise unless `tensor` holds its values and the dense span a kernel walks from its data
    pointer (numel elements) lies inside its own storage: the last line of defence against a
    kernel reading or writing memory that is not the tensor's."""
    if not holds_its_values(tensor, cpu_kernels) or not is_dense(tensor):
        raise RuntimeError(f"fusedopt: a {type(tensor).__name__} of shape {tuple(tensor.shape)} and strides "
                           f"{tensor.stride()} cannot be walked by a kernel as one span of its own memory")
    if tensor.numel() and tensor.untyped_storage().nbytes() < (
            tensor.storage_offset() + tensor.numel()) * tensor.element_size():
        raise RuntimeError(f"fusedopt: a tensor of shape {tuple(tensor.shape)} reaches past the end of its storage")


class UpdateRule(NamedTuple):
    """What an update rule gives the one update kernel (`update_kernel`):

    - `update`, a @triton.jit (param, grad, states, block_scalars, OPTIONS) -> (param, states):
      the rule's arithmetic on one block of elements (fp32, fp64 for fp64 tables), `states` a
      tuple in `state_slots` order;
    - `block_scalars`, a @triton.jit (lr, step, extra, scalars, OPTIONS, DEVICE_LR, COMPUTE) ->
      tuple: the numbers `update` needs, computed once per block from the lr (a number as it
      came, or read from memory when DEVICE_LR), the tensor's step count (fp64; with `steps`),
      its per-tensor integer (with `extra`) and the launch's `scalars`; COMPUTE is the math dtype;
    - `state_slots`: the names of the states it can keep, in table order (a launch says which
      are present; the fp32 master copy, if any, comes after them);
    - `steps`: whether it reads each tensor's step count; `extra`: its per-tensor integer."""

    update: object
    block_scalars: object
    state_slots: tuple
    steps: bool = False
    extra: bool = False


class GroupStep(NamedTuple):
    """What the kernels read at a param group's step count `count` (one fp32 element on the
    table's device: the step() calls so far, this one included): a learning-rate schedule's
    `factors` (fp64, the factor of each step from 0, the last one held past the end), and the
    seed of stochastic rounding (one int64 element); either may be None."""

    count: torch.Tensor
    factors: Optional[torch.Tensor] = None
    rounding_seed: Optional[torch.Tensor] = None


class TensorTable:
    """Pointer tables and block map for one bucket (same device and dtype) of tensors.

    Built once, uploaded in one copy, and reused while the tensors keep their storage; only
    the grad row is refreshed (one more copy) when a grad is re-allocated.
    """

    cpu_kernels = None  # whether CPU tensors are walked by the numba kernels (see holds_its_values)
    counts_steps = False  # whether step() adds the step to `steps` itself (else they come incremented)

    def block_size(self, dtype):
        """Elements per block (one program of the launch)."""
        return block_size(dtype)

    def __init__(self, params, grads, states, extra=None):
        """params, grads: lists of tensors; states: list of per-role lists (one per state
        tensor kind, each aligned with params); extra: optional per-tensor integers."""
        for tensor in (*params, *grads, *(t for role in states for t in role)):
            check_span(real_view(tensor), self.cpu_kernels)
        params = [real_view(p) for p in params]
        self.device = params[0].device
        self.dtype = params[0].dtype
        self.block = self.block_size(self.dtype)
        self.num_tensors = len(params)
        numels = [p.numel() for p in params]
        rows = [numels, list(extra) if extra is not None else [0] * len(params)]
        rows += [[t.data_ptr() for t in role] for role in (params, [real_view(g) for g in grads])]
        rows += [[real_view(t).data_ptr() for t in role] for role in states]
        self._host_table = torch.tensor(rows, dtype=torch.int64)
        grad_row = FIRST_ADDRESS_ROW + 1
        self.grad_row = self._host_table[grad_row]  # the grad addresses on the host, re-pointed in place
        self._other_addresses_aligned = all(
            address % 16 == 0 for row in rows[FIRST_ADDRESS_ROW:grad_row] + rows[grad_row + 1:] for address in row
        )
        self.aligned = self._other_addresses_aligned and all(a % 16 == 0 for a in rows[grad_row])

        starts, owners = [], []
        for index, numel in enumerate(numels):
            count = triton.cdiv(numel, self.block)
            starts.extend(range(0, count * self.block, self.block))
            owners.extend([index] * count)
        self.num_blocks = len(starts)
        self.host_block_table = torch.tensor([owners, starts], dtype=torch.int64)
        self.block_table = self.host_block_table.to(self.device, non_blocking=True)
        # 0 and 1 on the device, for absent grad-scaling factors (made here, not during a capture)
        self.neutral = torch.tensor([0.0, 1.0]).to(self.device, non_blocking=True)
        self.tensor_table = self._upload(self._host_table)

    def _upload(self, host_table):
        if self.device.type == "cuda":
            host_table = host_table.pin_memory()
        return host_table.to(self.device, non_blocking=True)

    def grads_moved(self):
        """`grad_row` was rewritten with new grad addresses (e.g. after zero_grad(set_to_none=True)):
        upload the table again."""
        self.tensor_table = self._upload(self._host_table)  # a new device copy on CUDA
        self.aligned = self._other_addresses_aligned and not bool((self.grad_row % 16).any())

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

    def lr_in_memory(self, lr):
        """Whether the kernel reads `lr` from memory: a tensor on this table's device."""
        return torch.is_tensor(lr) and lr.device == self.device

    def lr_arguments(self, lr, group_step, param_rounding):
        """(lr, (schedule, group_step, schedule_length, rounding_seed), constexprs LR_TENSOR,
        SCHEDULED, STOCHASTIC, MASTER). A tensor lr on this device is read by the kernel from
        memory (no host sync, and a captured CUDA graph sees in-place changes); anything else goes
        as a number. `group_step` (a GroupStep or None) brings the schedule that scales it and
        the seed of stochastic rounding; `param_rounding` is "nearest", "stochastic" or "master"
        (for bf16 tables; others always round to nearest)."""
        lr_tensor = self.lr_in_memory(lr)
        lr = lr if lr_tensor else float(lr)
        group_step = group_step or GroupStep(self.tensor_table)
        factors = group_step.factors
        rounding = param_rounding if self.dtype == torch.bfloat16 else "nearest"
        arguments = (self.tensor_table if factors is None else factors, group_step.count,
                     1 if factors is None else factors.numel(),
                     self.tensor_table if group_step.rounding_seed is None else group_step.rounding_seed)
        return lr, arguments, dict(LR_TENSOR=lr_tensor, SCHEDULED=factors is not None,
                                   STOCHASTIC=rounding == "stochastic", MASTER=rounding == "master")

    def step(self, *, rule, lr, scalars, options, present, steps=None, scaling=None, group_step=None,
             param_rounding="nearest"):
        """One launch of the update kernel applying `rule` (an UpdateRule) to every tensor of the
        table: `scalars`, the rule's numbers for this launch; `options`, its constexpr flags;
        `present`, which of its state slots the table holds (their roles follow param and grad,
        in slot order); `steps`, each tensor's step count (rules that read steps), already
        incremented, unless the table's `counts_steps` says its launch adds the step itself;
        `scaling` (found_inf, grad_scale, clip_coef: fusedopt.epilogue.StepScaling, on the table's
        device) skips the step or unscales and clips the grads; `lr` may be a one-element tensor
        on the table's device; `group_step` (a GroupStep) brings a schedule and a rounding seed;
        `param_rounding` is "nearest", "stochastic" or "master"."""
        found_inf, grad_scale, clip_coef, scaled = self.scaling_arguments(scaling)
        lr, schedule_arguments, lr_flags = self.lr_arguments(lr, group_step, param_rounding)
        self.launch(
            update_kernel,
            self.tensor_table if steps is None else steps, found_inf, grad_scale, clip_coef, *schedule_arguments,
            lr, tuple(float(value) for value in scalars),
            UPDATE=rule.update, BLOCK_SCALARS=rule.block_scalars, OPTIONS=tuple(options), STATES=tuple(present),
            STEPS=rule.steps, EXTRA=rule.extra, SCALED_GRADS=scaled, **lr_flags,
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

@triton.jit
def locate_block(tensor_table, block_table, num_blocks, BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    """This program's tensor, its element offsets, the tensor's size, and whether the block is full."""
    block = tl.program_id(0)
    tensor = tl.load(block_table + block)
    start = tl.load(block_table + num_blocks + block)
    numel = tl.load(tensor_table + tensor)  # NUMEL_ROW
    if ALIGNED:
        start = tl.multiple_of(start, BLOCK)
    offsets = start + tl.arange(0, BLOCK)
    return tensor, offsets, numel, start + BLOCK <= numel


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
    return tl.load(tensor_table + num_tensors + tensor)


@triton.jit
def tensor_pointer(tensor_table, num_tensors, tensor, role, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """Typed pointer to the first element of `tensor` for a role (0 param, 1 grad, 2.. states)."""
    address = tl.load(tensor_table + (2 + role) * num_tensors + tensor)  # FIRST_ADDRESS_ROW + role
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
def load_param(param_ptr, master_ptr, offsets, numel, MASTER: tl.constexpr, FULL: tl.constexpr):
    """The param the update starts from: its fp32 master copy (MASTER), else the param."""
    if MASTER:
        return load_block(master_ptr, offsets, numel, FULL)
    else:
        return load_block(param_ptr, offsets, numel, FULL)


@triton.jit
def store_param(param_ptr, master_ptr, offsets, numel, values, rounding_seed, tensor, group_step,
                MASTER: tl.constexpr, STOCHASTIC: tl.constexpr, FULL: tl.constexpr):
    """Store the updated param: into the fp32 master copy too (MASTER), and into the param rounded
    to nearest, or (STOCHASTIC, bf16) stochastically with random bits that depend only on the
    seed, the element, the tensor and the group's step count: reproducible, replayable."""
    if MASTER:
        store_block(master_ptr, offsets, numel, values, FULL)
    if STOCHASTIC:
        random_bits, _, _, _ = tl.philox(tl.load(rounding_seed), offsets.to(tl.int32), tensor.to(tl.int32),
                                         tl.load(group_step).to(tl.int32), 0)
        rounded = stochastic_round_to_bfloat16(values, random_bits)
        if FULL:
            tl.store(param_ptr + offsets, rounded)
        else:
            tl.store(param_ptr + offsets, rounded, mask=offsets < numel)
    else:
        store_block(param_ptr, offsets, numel, values, FULL)


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
def update_block(param_ptr, master_ptr, grad_ptr, state_ptrs, offsets, numel, block_scalars, inv_scale, clip_factor,
                 rounding_seed, tensor, group_step, UPDATE: tl.constexpr, OPTIONS: tl.constexpr, STATES: tl.constexpr,
                 SCALED_GRADS: tl.constexpr, MASTER: tl.constexpr, STOCHASTIC: tl.constexpr, FULL: tl.constexpr):
    """Load one block of param, grad and the present states, apply the rule, store them back."""
    param = load_param(param_ptr, master_ptr, offsets, numel, MASTER, FULL)
    grad = scale_grad(load_block(grad_ptr, offsets, numel, FULL), inv_scale, clip_factor, SCALED_GRADS)
    states = ()
    for slot in tl.static_range(len(STATES)):
        if STATES[slot]:
            states = states + (load_block(state_ptrs[slot], offsets, numel, FULL),)
        else:
            states = states + (grad,)  # a state the launch has not: the rule does not read it
    param, states = UPDATE(param, grad, states, block_scalars, OPTIONS)
    store_param(param_ptr, master_ptr, offsets, numel, param, rounding_seed, tensor, group_step, MASTER, STOCHASTIC,
                FULL)
    for slot in tl.static_range(len(STATES)):
        if STATES[slot]:
            store_block(state_ptrs[slot], offsets, numel, states[slot], FULL)


@triton.jit(do_not_specialize=["num_tensors", "num_blocks"])
def update_kernel(
    tensor_table,  # int64 [roles + 2, num_tensors]: sizes, extras, addresses (param, grad, states, master)
    block_table,  # int64 [2, num_blocks]: owning tensor and first element of each block
    num_tensors, num_blocks,
    steps,  # [num_tensors] step counts, already incremented for this step (STEPS)
    found_inf, grad_scale, clip_coef,  # one-element tensors, read when SCALED_GRADS
    schedule, group_step, schedule_length,  # the lr schedule's factors (SCHEDULED), the group's step count
    rounding_seed,  # int64 seed of stochastic rounding (STOCHASTIC)
    lr,  # a number, or a one-element tensor (LR_TENSOR)
    scalars,  # the rule's numbers for this launch (a tuple)
    UPDATE: tl.constexpr,  # the rule's per-element update (UpdateRule.update)
    BLOCK_SCALARS: tl.constexpr,  # the rule's per-block numbers (UpdateRule.block_scalars)
    OPTIONS: tl.constexpr,  # the rule's flags (a tuple)
    STATES: tl.constexpr,  # which of the rule's state slots the table holds (a tuple of bools)
    STEPS: tl.constexpr,  # read each tensor's step count
    EXTRA: tl.constexpr,  # read each tensor's integer of EXTRA_ROW
    SCALED_GRADS: tl.constexpr,  # skip on found_inf; grads unscaled and clipped in registers
    LR_TENSOR: tl.constexpr,  # lr points at a one-element tensor
    SCHEDULED: tl.constexpr,  # the lr is multiplied by the schedule's factor at this step
    STOCHASTIC: tl.constexpr,  # bf16 params are rounded stochastically
    MASTER: tl.constexpr,  # an fp32 master copy of the param is the role after the states
    DTYPE: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
):
    tensor, offsets, numel, full = locate_block(tensor_table, block_table, num_blocks, BLOCK, ALIGNED)
    skip, inv_scale, clip_factor = False, 1.0, 1.0
    if SCALED_GRADS:
        skip, inv_scale, clip_factor = grad_scaling(found_inf, grad_scale, clip_coef)
    if not skip:
        param_ptr = tensor_pointer(tensor_table, num_tensors, tensor, 0, DTYPE, ALIGNED)
        grad_ptr = tensor_pointer(tensor_table, num_tensors, tensor, 1, DTYPE, ALIGNED)
        state_ptrs = ()
        role = 2  # the present states' roles follow param and grad, in slot order
        for slot in tl.static_range(len(STATES)):
            if STATES[slot]:
                state_ptrs = state_ptrs + (tensor_pointer(tensor_table, num_tensors, tensor, role, DTYPE, ALIGNED),)
                role += 1
            else:
                state_ptrs = state_ptrs + (param_ptr,)  # not dereferenced
        master_ptr = param_ptr
        if MASTER:
            master_ptr = tensor_pointer(tensor_table, num_tensors, tensor, role, tl.float32, ALIGNED)
        COMPUTE: tl.constexpr = tl.float64 if DTYPE == tl.float64 else tl.float32
        step = 0.0
        if STEPS:
            step = tensor_step(steps, tensor)
        extra = 0
        if EXTRA:
            extra = tensor_extra(tensor_table, num_tensors, tensor)
        if LR_TENSOR or SCHEDULED:  # read here, so that a captured graph sees the lr change
            block_scalars = BLOCK_SCALARS(device_lr(lr, schedule, group_step, schedule_length, LR_TENSOR, SCHEDULED),
                                          step, extra, scalars, OPTIONS, True, COMPUTE)
        else:  # a number lr is passed on as it came: the interpreter would round a copy of it to fp32
            block_scalars = BLOCK_SCALARS(lr, step, extra, scalars, OPTIONS, False, COMPUTE)
        if full:
            update_block(param_ptr, master_ptr, grad_ptr, state_ptrs, offsets, numel, block_scalars, inv_scale,
                         clip_factor, rounding_seed, tensor, group_step, UPDATE, OPTIONS, STATES, SCALED_GRADS, MASTER,
                         STOCHASTIC, True)
        else:
            update_block(param_ptr, master_ptr, grad_ptr, state_ptrs, offsets, numel, block_scalars, inv_scale,
                         clip_factor, rounding_seed, tensor, group_step, UPDATE, OPTIONS, STATES, SCALED_GRADS, MASTER,
                         STOCHASTIC, False)
