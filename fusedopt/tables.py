"""The host side of the tensor tables every kernel backend walks: which tensors fit a kernel, the
per-tensor table of sizes and addresses, the block map, the step-count buffer, and the launch
count. Imports neither Triton nor numba: each backend subclasses TensorTable with its launch."""
from typing import NamedTuple, Optional

import torch

from .formats import CODE_DTYPES, QUANT_BLOCK

# Rows of the per-tensor table (int64, one column per tensor).
NUMEL_ROW = 0  # elements in the tensor (real elements: a complex tensor counts twice)
EXTRA_ROW = 1  # one per-tensor integer a rule may read (RuleSpec.extra: SGD's fresh-buffer flag)
FIRST_ADDRESS_ROW = 2  # then one row of addresses per role: param, grad, each present state, master
PARAM_ROW, GRAD_ROW, FIRST_STATE_ROW = FIRST_ADDRESS_ROW, FIRST_ADDRESS_ROW + 1, FIRST_ADDRESS_ROW + 2

# The dtypes a kernel walks (complex params as their real views), and those states may have besides
# their param's (fusedopt.formats: bf16 states, 8-bit codes)
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
STATE_DTYPES = (torch.bfloat16, *CODE_DTYPES)

_launches = 0


def launch_count():
    """Total number of kernel launches (updates and grad-norm reductions) made in this process."""
    return _launches


def count_launch():
    global _launches
    _launches += 1


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


def holds_its_values(tensor, cpu_tensors):
    """A tensor whose own memory holds its values as they read: not a wrapper subclass (a DTensor,
    a FakeTensor: its data pointer names no memory of its own, and its size may not be its
    shard's), nor a lazily conjugated or negated view, nor on a device the kernels cannot reach
    (the CPU, unless the backend walks CPU tensors: `cpu_tensors`)."""
    return (
        type(tensor).__torch_dispatch__ is torch._C._disabled_torch_dispatch_impl
        and (tensor.device.type == "cuda" or (tensor.device.type == "cpu" and cpu_tensors))
        and not tensor.is_conj()
        and not tensor.is_neg()
    )


def fits_kernel(param, grad, states, master=None, *, cpu_tensors):
    """Whether (param, grad, states and a master) can go through a kernel: plain tensors holding
    their values, one dense span each, laid out alike (`cpu_tensors`: see holds_its_values).
    `states`: (values, scales) pairs: values in the param's dtype, bf16 or 8-bit codes, laid out as
    the param; scales (of 8-bit codes, else None), fp32, one per QUANT_BLOCK elements of a
    contiguous param. `master`: an fp32 copy or an int16 remainder, laid out as the param."""
    tensors = (param, grad, *(t for pair in states for t in pair if t is not None),
               *([] if master is None else [master]))
    if not all(holds_its_values(t, cpu_tensors) for t in tensors):
        return False
    param = real_view(param)
    if param.dtype not in KERNEL_DTYPES:
        return False
    if grad.is_sparse or not is_dense(param):
        return False
    if master is not None and (master.dtype not in (torch.float32, torch.int16)
                               or not same_layout(param, master, master.dtype)):
        return False
    for values, scales in states:
        values = real_view(values)
        if values.dtype not in (param.dtype, *STATE_DTYPES) or not same_layout(param, values, values.dtype):
            return False
        if (values.dtype in CODE_DTYPES) != (scales is not None):
            return False
        if scales is not None and not (param.is_contiguous() and values.is_contiguous() and scales.is_contiguous()
                                       and scales.dtype == torch.float32 and scales.device == param.device
                                       and scales.numel() * QUANT_BLOCK == param.numel()):
            return False
    return same_layout(param, real_view(grad))


def check_span(tensor, cpu_tensors):
    """Raise unless `tensor` holds its values and the dense span a kernel walks from its data
    pointer (numel elements) lies inside its own storage: the last line of defence against a
    kernel reading or writing memory that is not the tensor's."""
    if not holds_its_values(tensor, cpu_tensors) or not is_dense(tensor):
        raise RuntimeError(f"fusedopt: a {type(tensor).__name__} of shape {tuple(tensor.shape)} and strides "
                           f"{tensor.stride()} cannot be walked by a kernel as one span of its own memory")
    if tensor.numel() and tensor.untyped_storage().nbytes() < (
            tensor.storage_offset() + tensor.numel()) * tensor.element_size():
        raise RuntimeError(f"fusedopt: a tensor of shape {tuple(tensor.shape)} reaches past the end of its storage")


def step_buffer(steps, device):
    """One 1-D tensor on `device` holding the step counts (fp32, as torch's fused steps)."""
    dtype = steps[0].dtype if steps[0].is_floating_point() else torch.float32
    if any(step.device != steps[0].device for step in steps):
        steps = [step.to(device) for step in steps]
    return torch.stack([step.reshape(()) for step in steps]).to(device=device, dtype=dtype)


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
    the grad row is refreshed (one more copy) when a grad is re-allocated. A kernel backend
    subclasses it with its launch (`step`)."""

    walks_cpu_tensors = False  # whether the backend's kernels take CPU tensors (see holds_its_values)
    cpu_kernels = False  # the numba CPU kernels' table (host arrays; CPU norms)
    counts_steps = False  # whether step() adds the step to `steps` itself (else they come incremented)

    @classmethod
    def fits(cls, param, grad, states, master=None):
        """fits_kernel, for this backend's kernels."""
        return fits_kernel(param, grad, states, master, cpu_tensors=cls.walks_cpu_tensors)

    def block_size(self, dtype):
        """Elements per block (one program of the launch)."""
        raise NotImplementedError

    def __init__(self, params, grads, states, extra=None):
        """params, grads: lists of tensors; states: list of per-role lists (one per state
        tensor kind, each aligned with params, the master copies last); extra: optional
        per-tensor integers."""
        for tensor in (*params, *grads, *(t for role in states for t in role)):
            check_span(real_view(tensor), self.walks_cpu_tensors)
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
        self.grad_row = self._host_table[GRAD_ROW]  # the grad addresses on the host, re-pointed in place
        self._other_addresses_aligned = all(
            address % 16 == 0 for row in rows[FIRST_ADDRESS_ROW:GRAD_ROW] + rows[GRAD_ROW + 1:] for address in row
        )
        self.aligned = self._other_addresses_aligned and all(a % 16 == 0 for a in rows[GRAD_ROW])

        starts, owners = [], []
        for index, numel in enumerate(numels):
            count = -(-numel // self.block)
            starts.extend(range(0, count * self.block, self.block))
            owners.extend([index] * count)
        self.num_blocks = len(starts)
        self.host_block_table = torch.tensor([owners, starts], dtype=torch.int64)
        self.block_table = self.host_block_table.to(self.device, non_blocking=True)
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

    def lr_in_memory(self, lr):
        """Whether the kernel reads `lr` from memory: a tensor on this table's device."""
        return torch.is_tensor(lr) and lr.device == self.device

    def step(self, spec, numbers, options, storage, *, lr, steps=None, fresh=False, scaling=None, group_step=None):
        """One launch applying the rule `spec` (a fusedopt.spec.RuleSpec) to every tensor of the
        table, whose roles are param, grad, the states present under `options` (slot order: each
        state's values, and the scales of 8-bit ones) and the params' masters (fp32 copies or
        16-bit remainders), all stored as `storage` (fusedopt.formats.Storage) says: `numbers`,
        the rule's launch numbers (spec.Launch); `steps`, each tensor's step count (rules with step
        counts), already incremented unless the table's `counts_steps` says its launch adds the
        step itself; `fresh`, whether the per-tensor integers are to be read (spec.extra);
        `scaling` (found_inf, grad_scale, clip_coef: fusedopt.epilogue.StepScaling, on the table's
        device) skips the step or unscales and clips the grads; `lr` may be a one-element tensor on
        the table's device; `group_step` (a GroupStep) brings a schedule and a rounding seed."""
        raise NotImplementedError

    @classmethod
    def ready(cls, spec, options, storage, dtype):
        """Whether this backend's kernel of the rule under `options`, for `storage` and params of
        `dtype`, can run (compiling it now where the backend compiles ahead)."""
        return True
