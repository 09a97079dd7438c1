"""What happens to the grads between backward() and the update: AMP's unscaling and inf check
(torch.amp.GradScaler), and clipping by the global grad norm, done inside the update kernels.

The grads themselves are never rewritten: the update kernels multiply them, in registers, by
1/grad_scale and by the clip factor, and skip the step where found_inf is set.
"""
import math
import operator
import weakref

import torch

from . import distributed

# torch.nn.utils.clip_grad_norm_'s guard against dividing by a zero norm.
CLIP_EPSILON = 1e-6


class StepScaling:
    """The device scalars of one step, the one type for them from step() to the kernels:
    GradScaler's `found_inf` (the step is skipped where it is nonzero) and `grad_scale` (grads
    are multiplied by 1/grad_scale), and the clip factor (then by it), each a one-element or 0-dim
    tensor, or None for no such factor. Copies for other devices are made once per step, without
    a sync."""

    def __init__(self, found_inf=None, grad_scale=None, clip_coef=None):
        self.found_inf = found_inf
        self.grad_scale = grad_scale
        self.clip_coef = clip_coef
        self._on_device = {}

    def is_neutral(self):
        """No AMP and no clipping: the grads are stepped as they are."""
        return self.found_inf is None and self.grad_scale is None and self.clip_coef is None

    def to(self, device):
        if self.is_neutral():
            return self
        if device not in self._on_device:
            moved = [None if t is None else t.to(device, non_blocking=True)
                     for t in (self.found_inf, self.grad_scale, self.clip_coef)]
            self._on_device[device] = self if all(
                t is None or m is t for t, m in zip((self.found_inf, self.grad_scale, self.clip_coef), moved)
            ) else StepScaling(*moved)
        return self._on_device[device]

    def __iter__(self):
        """(found_inf, grad_scale, clip_coef): what a kernel reads, as the tables take it."""
        return iter((self.found_inf, self.grad_scale, self.clip_coef))

    def skipped(self):
        """Whether AMP skips this step. Reads found_inf on the host: only the rare paths that
        must know (the plain-torch path, SGD's first momentum step) ask."""
        return self.found_inf is not None and bool(self.found_inf.item())

    def scale_grads(self, grads):
        """The grads as `unscale_` then `clip_grad_norm_` would leave them (new tensors), or None
        when the step is skipped; the grads themselves when there is nothing to apply."""
        if self.skipped():
            return None
        # 0-dim factors, which a DTensor takes as scalars; unscaled grads in fp32 at least
        if self.grad_scale is not None:
            inv_scale = self.grad_scale.double().reciprocal().float().reshape(())
            grads = [grad.to(torch.promote_types(grad.dtype, torch.float32)) * inv_scale.to(grad.device)
                     for grad in grads]
        if self.clip_coef is not None:
            grads = [grad * self.clip_coef.to(grad.device, grad.dtype).reshape(()) for grad in grads]
        return grads



class PendingClip:
    """The clip factor clip_grad_norm_ computed, kept for the next step, with what it was computed
    from: the params with grads, their grads (the same objects, at the same version and address,
    or the factor does not apply) and the grad scale the norm was unscaled by."""

    def __init__(self, clip_coef, params, grads, grad_scale):
        self.clip_coef = clip_coef
        self.grad_scale = grad_scale
        self.params = params
        self.grads = grads
        self.versions, self.addresses = grad_marks(grads)

    def applies_to(self, params, grads):
        """True where the step's grads are exactly the clipped ones (a param left without a grad
        is not stepped); False where every one is new since (torch clipped grads that are gone);
        RuntimeError where some are new and some clipped, or a clipped grad changed in place:
        torch's result cannot be had then, and nothing is written."""
        if len(params) == len(self.params) and all(map(operator.is_, params, self.params)) and all(
                map(operator.is_, grads, self.grads)):
            if grad_marks(grads) == (self.versions, self.addresses):
                return True
            raise RuntimeError(CLIPPED_GRADS_CHANGED)
        clipped = {id(p): index for index, p in enumerate(self.params)}
        kinds = set()
        for param, grad in zip(params, grads):
            index = clipped.get(id(param))
            if index is None or grad is not self.grads[index]:
                kinds.add("new")
            elif grad_marks([grad]) != ([self.versions[index]], [self.addresses[index]]):
                raise RuntimeError(CLIPPED_GRADS_CHANGED)
            else:
                kinds.add("clipped")
        if kinds == {"new"}:
            return False
        if kinds == {"clipped"}:
            return True
        raise RuntimeError("clip_grad_norm_() computed its clip factor from grads of which some have been replaced "
                           "since: it cannot apply to the new ones. Call clip_grad_norm_() again right before step(), "
                           "or zero_grad() to drop the clip.")


CLIPPED_GRADS_CHANGED = ("clip_grad_norm_() computed its clip factor from grads that have been changed in place since "
                         "(accumulated into, rescaled or given new storage): torch would have clipped only their "
                         "earlier values. Call clip_grad_norm_() again after changing the grads, or zero_grad() to "
                         "drop the clip.")


def grad_marks(grads):
    """(version counters, addresses) of the grads' own (local) tensors: an in-place change moves
    the first, new storage the second."""
    if distributed.dtensor_class() is not None:  # else no grad is a DTensor
        grads = list(map(distributed.local_tensor, grads))
    versions = list(map(_version_of, grads))
    try:
        return versions, list(map(torch.Tensor.data_ptr, grads))
    except RuntimeError:  # a sparse grad, which has no data pointer
        return versions, [tensor.data_ptr() if tensor.layout == torch.strided else None for tensor in grads]


_version_of = operator.attrgetter("_version")


def check_max_grad_norm(max_norm):
    if isinstance(max_norm, bool) or not isinstance(max_norm, (int, float)) or math.isnan(max_norm) or max_norm < 0:
        raise ValueError(f"Invalid max_grad_norm: {max_norm!r} (expected a number >= 0)")
    return float(max_norm)


def check_norm_type(norm_type):
    if torch.is_tensor(norm_type):
        norm_type = norm_type.item()
    if isinstance(norm_type, bool) or not isinstance(norm_type, (int, float)) or math.isnan(norm_type):
        raise ValueError(f"Invalid norm_type: {norm_type!r} (expected a number or inf)")
    return float(norm_type)


def has_norm_sum(norm_type):
    """Whether the norm is a sum over the elements (p > 0) or a max (inf), which the reduction kernel
    and the per-rank partials compute; other orders take torch's norm of per-tensor norms."""
    return norm_type > 0


def norm_dtype(grads):
    """The dtype of the total norm, as torch's clip_grad_norm_ gives it: the grads' (real) dtype."""
    return promoted({grad.real.dtype if grad.is_complex() else grad.dtype for grad in grads})


def promoted(dtypes):
    """The dtype that `dtypes` (a non-empty set) promote to."""
    dtypes = set(dtypes)
    dtype = dtypes.pop()
    for other in dtypes:
        dtype = torch.promote_types(dtype, other)
    return dtype


def unscaled(grads, grad_scale):
    """The grads as GradScaler.unscale_ leaves them (new tensors); sparse grads as their values."""
    values = [grad.coalesce()._values() if grad.is_sparse else grad for grad in grads]
    if grad_scale is None:
        return values
    inv_scale = grad_scale.double().reciprocal().float()
    return [value * inv_scale.to(value.device) for value in values]


def torch_norm_partials(grads, norm_type, grad_scale=None):
    """[(sum |g|^p or max |g|, non-finite count, norm group)] of `grads` divided by grad_scale, in
    fp32 (fp64 for fp64), with torch ops on the local shards, one entry per norm group (the mesh
    dims the partial is reduced over, distributed.norm_group): for grads on the plain-torch path,
    sparse grads, complex grads for norms other than 2."""
    by_group = {}
    for grad in distributed.without_partial_sums(grads):
        by_group.setdefault(distributed.norm_group(grad), []).append(distributed.local_tensor(grad))
    return [(*local_norm_partials(values, norm_type, grad_scale), group) for group, values in by_group.items()]


def local_norm_partials(grads, norm_type, grad_scale):
    values = [v for v in unscaled(grads, grad_scale) if v.numel()]
    values = [torch.view_as_real(v) if v.is_complex() and norm_type == 2 else v for v in values]
    accumulate = torch.float64 if any(v.dtype in (torch.float64, torch.complex128) for v in grads) else torch.float32
    if not values:  # empty shards
        zero = torch.zeros((), dtype=accumulate, device=grads[0].device)
        return zero, zero
    norms = torch.stack([torch.linalg.vector_norm(v, norm_type, dtype=accumulate) if not v.is_complex()
                         else torch.linalg.vector_norm(v, norm_type).to(accumulate) for v in values])
    partial = norms.max() if norm_type == math.inf else norms.pow(norm_type).sum()
    nonfinite = sum((~torch.isfinite(v)).sum().to(accumulate) for v in values)
    return partial, nonfinite


def torch_total_norm(grads, norm_type, grad_scale, device, dtype):
    """(total norm, found_inf) as torch's clip_grad_norm_ computes it, per-tensor norms first:
    for the norms the kernel has no sum for (p <= 0, -inf); global values for DTensor grads."""
    values = unscaled(grads, grad_scale)
    norms = [distributed.full_value(torch.linalg.vector_norm(v, norm_type)).to(device) for v in values]
    nonfinite = sum(distributed.full_value((~torch.isfinite(v)).sum()).to(device) for v in values)
    total = torch.linalg.vector_norm(torch.stack(norms), norm_type)
    return total.to(dtype), (nonfinite > 0).to(torch.float32)


def total_grad_norm(contributions, norm_type, device, dtype):
    """Combine (partial, non-finite count, norm group) triples into (total norm, found_inf) on
    `device`: summed (maxed) per norm group, reduced over the ranks of each group's sharded mesh
    dims, then over the groups. A partial and its count are tensors, or Python floats (the numba
    CPU reduction's, summed in fp64), which where all are and nothing is sharded are combined on
    the host."""
    if device.type == "cpu" and all(group is None and not torch.is_tensor(partial)
                                    for partial, _, group in contributions):
        return host_total_norm(contributions, norm_type, dtype)
    # fp64 where a grad is (a partial of fp64 grads), else fp32: the same dtype on every rank
    accumulate = torch.float64 if dtype == torch.float64 or any(
        torch.is_tensor(p) and p.dtype == torch.float64 for p, _, _ in contributions) else torch.float32
    by_group = {}
    for partial, nonfinite, group in contributions:
        partial, nonfinite = (torch.as_tensor(partial, dtype=accumulate, device=device),
                              torch.as_tensor(nonfinite, dtype=accumulate, device=device))
        if group in by_group:
            earlier, earlier_nonfinite = by_group[group]
            partial = torch.maximum(earlier, partial) if norm_type == math.inf else earlier + partial
            nonfinite = earlier_nonfinite + nonfinite
        by_group[group] = partial, nonfinite
    # the same collectives in the same order on every rank, whichever path each grad took there
    reduced = [distributed.reduce_over_shards(*by_group[group], group, norm_type)
               for group in sorted(by_group, key=distributed.norm_group_order)]
    partials = torch.stack([partial for partial, _ in reduced])
    nonfinite = torch.stack([count for _, count in reduced]).sum()
    if norm_type == math.inf:
        total = partials.max()
    elif norm_type == 2:
        total = partials.sum().sqrt()
    else:
        total = partials.sum().pow(1.0 / norm_type)
    return total.to(dtype), (nonfinite > 0).to(torch.float32)


def host_total_norm(contributions, norm_type, dtype):
    """total_grad_norm of Python-float partials (no norm groups), computed on the host in fp64:
    (total norm in `dtype`, found_inf), CPU tensors."""
    partials = [partial for partial, _, _ in contributions]
    if norm_type == math.inf:
        total = math.nan if any(map(math.isnan, partials)) else max(partials)
    elif norm_type == 2:
        total = math.sqrt(sum(partials))
    else:
        total = sum(partials) ** (1.0 / norm_type)
    found_inf = 1.0 if any(count > 0 for _, count, _ in contributions) else 0.0
    try:
        norm = torch.full((), total, dtype=dtype)
    except RuntimeError:  # past float32's range (torch.full refuses it): the cast rounds it, to inf
        norm = torch.full((), total, dtype=torch.float64).to(dtype)
        total = float(norm)
    global _host_norm
    _host_norm = weakref.ref(norm), norm._version, total
    return norm, torch.full((), found_inf, dtype=torch.float32)


# The last norm host_total_norm made (weakly), its version and its value as a Python float:
# clip_coefficient, called on it right after, reads the value from here, not from the tensor.
_host_norm = None


def host_norm_value(total_norm):
    """The Python float `total_norm` was made from, where host_total_norm made it and it is
    unchanged since; else None (a norm computed by torch ops or a kernel is never read back)."""
    made = _host_norm
    if made is None or made[0]() is not total_norm or made[1] != total_norm._version:
        return None
    return made[2]


def clip_coefficient(total_norm, max_norm):
    """clip_grad_norm_'s factor, min(1, max_norm / (norm + 1e-6)), in the norm's dtype (fp32 at
    least, as the kernels load it); max_norm may be a number or a tensor, as in torch."""
    if torch.is_tensor(max_norm):
        max_norm = max_norm.to(total_norm.device)
    elif total_norm.dtype in HOST_FLOATS:
        value = host_norm_value(total_norm)
        if value is not None:
            return host_clip_coefficient(value, total_norm.dtype, max_norm)
    coef = torch.clamp(max_norm / (total_norm + CLIP_EPSILON), max=1.0)
    return coef if coef.dtype == torch.float64 else coef.float()


HOST_FLOATS = {torch.float32: "float32", torch.float64: "float64"}


def host_clip_coefficient(value, dtype, max_norm):
    """clip_coefficient of a norm made on the host (its value a Python float, its dtype fp32 or
    fp64) and a number, computed with numpy scalars the way torch computes it (number / tensor is
    the tensor's reciprocal times the number, each rounded in the norm's dtype): the same bits,
    without four torch ops."""
    import numpy as np

    real = getattr(np, HOST_FLOATS[dtype])
    coef = real(1) / (real(value) + real(CLIP_EPSILON)) * real(max_norm)
    return torch.full((), coef if not coef > 1 else 1.0, dtype=dtype)


def check_finite_norm(total_norm, norm_type):
    """clip_grad_norm_(error_if_nonfinite=True): this reads the norm on the host."""
    if torch.logical_or(total_norm.isnan(), total_norm.isinf()):
        raise RuntimeError(
            f"The total norm of order {norm_type} for gradients from `parameters` is non-finite, so it cannot be "
            "clipped. To disable this error and scale the gradients by the non-finite norm anyway, set "
            "`error_if_nonfinite=False`"
        )


def scaler_scale(grad_scaler):
    """The scale of an enabled GradScaler that has scaled a loss, else None."""
    if grad_scaler is None or not grad_scaler.is_enabled():
        return None
    return getattr(grad_scaler, "_scale", None)


def hand_found_inf_to_scaler(grad_scaler, optimizer, found_inf):
    """Record the inf check done by the norm reduction in the GradScaler's per-optimizer state, as
    its own unscale_() would, so that scaler.step() consumes it instead of reading every grad
    again; the optimizer unscales in its kernels (the grad scale kept with the pending clip)."""
    from torch.amp.grad_scaler import OptState

    state = grad_scaler._per_optimizer_states[id(optimizer)]
    if state["stage"] is not OptState.READY:
        raise RuntimeError("clip_grad_norm_(grad_scaler=...) must come before the scaler's unscale_() and step() "
                           "in an iteration")
    state["found_inf_per_device"] = {found_inf.device: found_inf}
    state["stage"] = OptState.UNSCALED
