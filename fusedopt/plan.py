"""How a param group is stepped: kernel buckets (one tensor table per (device, dtype)) and the
params left to the reference; and the check, before every launch, that each tensor a table
names is still exactly the one the user holds.

The check (`KernelBucket.current`) is what makes a cached table of raw addresses safe. A table
is used only while every tensor it names (param, grad, each state, the fp32 master, the step
count) is the one the optimizer finds now, at the same address, with the same type, dtype,
device, shape and strides; otherwise the group is planned again, and whatever no longer fits a
kernel goes to the reference. It costs, per step, one comparison of each address list and one
layout comparison in C++ over the bucket's tensors; whether any state dict changed is a single
counter (fusedopt.state). Where one bucket holds every param of a group (the common case), the
compiled check reads the grads from the params itself.

The launches run before the reference's per-tensor steps, so what they touch must not meet what
any other param's step touches where either writes it (grads that alias params, states or step
counts, overlapping params, a param listed in two groups): such params go to the reference, which
steps them one after another as torch does, and a grad that moves into memory the group's step
writes sends the group to be planned again.
"""
import bisect
import itertools
import operator

import torch

from . import distributed, epilogue, formats
from .backends import load_kernels, table_class
from .rounding import master_key
from .state import is_counted, state_changes

_data_ptr = torch.Tensor.data_ptr
grad_of = operator.attrgetter("grad")
# Param types whose .grad is the autograd grad itself (read by the compiled check in C++)
PLAIN_PARAM_TYPES = (torch.Tensor, torch.nn.Parameter)


def _tensor_guards():
    """torch's C++ layout check (dynamo's TensorGuards), if it behaves here as LayoutGuard needs."""
    try:
        from torch._C._dynamo.guards import TensorGuards

        def guard(*tensors):
            return TensorGuards(*tensors, dynamic_dims_sizes=None, dynamic_dims_strides=None)

        a, b, c = torch.zeros(2, 3), torch.zeros(6), torch.zeros(6, dtype=torch.complex64)
        checks = guard(a, b, c)
        same = checks.check(torch.zeros(2, 3), torch.ones(6), torch.ones(6, dtype=torch.complex64))
        changed = [(a.t(), b, c), (a, b.double(), c), (a, b[:5], c), (a, torch.nn.Parameter(b), c),
                   (a.reshape(3, 2), b, c), (a, torch.zeros(12)[::2], c), (a, b, c.conj()), (a, b, b)]
        if same and not any(checks.check(*tensors) for tensors in changed):
            return guard
    except Exception:  # absent or changed in this torch: the Python comparison below
        pass
    return None


_TENSOR_GUARDS = _tensor_guards()


def layout_of(tensor):
    strided = tensor.layout == torch.strided
    return (type(tensor), tensor.layout, tensor.dtype, tensor.device, tensor.shape,
            tensor.stride() if strided else None, tensor.is_conj(), tensor.is_neg())


class LayoutGuard:
    """The type, dtype, device, shape and strides of a list of tensors when a table was built;
    ``check(*tensors)`` is True while the tensors given now have exactly those."""

    def __init__(self, tensors):
        if _TENSOR_GUARDS is not None:
            self.check = _TENSOR_GUARDS(*tensors).check
        else:
            layouts = list(map(layout_of, tensors))
            self.check = lambda *now: list(map(layout_of, now)) == layouts


SAME, CHANGED, MOVED, NO_GRAD = 0, 1, 2, 3  # what a table check finds (as table_check.cpp's)


class PythonTableCheck:
    """Whether tensors are still those a table was built on: `fixed` ones at the same address, and
    `grads` with the same layout, which may move, but not into `written` memory (sorted disjoint
    [start, end) byte spans: what the kernel writes; p.grad = p.detach() would alias it).
    check(fixed, grads, grad_row) is SAME, MOVED (only grads at new addresses, which it wrote into
    `grad_row`, an int64 host tensor) or CHANGED. The compiled TableCheck (fusedopt.native)
    answers alike, faster."""

    def __init__(self, fixed, grads, written):
        self.addresses = list(map(_data_ptr, fixed))
        self.grad_addresses = list(map(_data_ptr, grads))
        self.grad_bytes = torch.tensor([g.numel() * g.element_size() for g in grads], dtype=torch.int64)
        self.written_starts = torch.tensor([start for start, _ in written] or [0], dtype=torch.int64)
        self.written_ends = torch.tensor([end for _, end in written] or [0], dtype=torch.int64)
        self.layouts = LayoutGuard(fixed + grads)

    def check(self, fixed, grads, grad_row):
        # addresses first: the layout check then finds the tensors in cache
        if (len(grads) != len(self.grad_addresses) or list(map(_data_ptr, fixed)) != self.addresses
                or not self.layouts.check(*fixed, *grads)):
            return CHANGED
        grad_addresses = list(map(_data_ptr, grads))
        if grad_addresses == self.grad_addresses:
            return SAME
        starts = torch.tensor(grad_addresses, dtype=torch.int64)
        if self._into_written_memory(starts):
            return CHANGED
        grad_row.copy_(starts)
        self.grad_addresses = grad_addresses
        return MOVED

    def check_grads_of(self, fixed, params, grad_row):
        """check(), with each grad read from its param (params[i].grad); NO_GRAD where a param has
        none."""
        grads = list(map(grad_of, params))
        if any(map(operator.is_, grads, itertools.repeat(None))):
            return NO_GRAD
        return self.check(fixed, grads, grad_row)

    def _into_written_memory(self, grad_starts):
        """Whether a grad span [start, start + bytes) overlaps written memory: the written span
        starting last before the grad's end must end before the grad's start."""
        grad_ends = grad_starts + self.grad_bytes
        last = torch.searchsorted(self.written_starts, grad_ends) - 1
        overlap = (last >= 0) & (self.written_ends[last.clamp(min=0)] > grad_starts) & (self.grad_bytes > 0)
        return bool(overlap.any())


def table_check(fixed, grads, written):
    """The compiled table check where it has been built (python -m fusedopt.native), else Python's."""
    from . import native

    compiled = native.table_check_class()
    if compiled is None:
        return PythonTableCheck(fixed, grads, written)
    return compiled(fixed, grads, [start for start, _ in written], [end for _, end in written])


def state_values(state, params):
    """Every value of every param's state dict, in order, in one flat list."""
    return list(itertools.chain.from_iterable(map(dict.values, map(state.get, params))))


def overlapping(spans):
    """Indices of the spans (start, end, writable, owner) that share memory with another span where
    either is written (grads may share memory among themselves): their owners go to the reference,
    which updates one tensor after another, as torch does."""
    owners = set()
    cluster, cluster_end = [], None
    for start, end, writable, owner in sorted(spans) + [(None, None, False, None)]:
        if cluster and (start is None or start >= cluster_end):
            if len(cluster) > 1 and any(w for w, _ in cluster):
                owners.update(o for _, o in cluster)
            cluster = []
        if start is None:
            break
        cluster_end = end if not cluster else max(cluster_end, end)
        cluster.append((writable, owner))
    return owners


def memory_span(tensor, writable, owner):
    """(start, end, writable, owner): the bytes from `tensor`'s first element to past its last,
    all it can reach whatever its strides (a kernel's dense tensors: numel elements)."""
    start = tensor.data_ptr()
    if tensor.numel() == 0:
        return start, start, writable, owner
    reach = 1 + sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride()))
    return start, start + reach * tensor.element_size(), writable, owner


def disjoint(spans):
    """[start, end) spans merged where they overlap or touch, sorted."""
    merged = []
    for start, end in sorted(span for span in spans if span[1] > span[0]):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [tuple(span) for span in merged]


def into(spans, start, end):
    """Whether [start, end) overlaps one of the disjoint sorted `spans`."""
    index = bisect.bisect_left(spans, (end,)) - 1
    return end > start and index >= 0 and spans[index][1] > start


PLAIN_TYPES = frozenset({float, int, bool, str, type(None)})


def group_values(group):
    """A param group's values but its params, as compared between steps: a tuple of plain numbers,
    strings, None, and tuples of them (lists as tuples); None where a value is anything else (a
    tensor is read at every launch, and only plain values compare by value alone)."""
    values = []
    for key, value in group.items():
        if key == "params":
            continue
        if type(value) in (tuple, list):
            if not all(type(item) in PLAIN_TYPES for item in value):
                return None
            value = tuple(value)
        elif type(value) not in PLAIN_TYPES:
            return None
        values.append(value)
    return tuple(values)


def launch_key(bucket, optimizer, values, scaling, group_step):
    """What a repeatable bucket's launch is computed from, so that the last launch runs again as
    it was while it stays the same: the group's values (group_values) and how the bucket's states
    and params are stored. None where the launch depends on more: AMP or clipping factors, a
    device schedule or stochastic rounding, or a group value that is not plain."""
    if values is None or not bucket.repeatable or group_step is not None or not scaling.is_neutral():
        return None
    return values, bucket.storage


class KernelBucket:
    """The tensors of one group on one (device, dtype), updated by one kernel launch per step.

    DTensor params take part through their local shards: the table names the shards of param,
    grad, states and master, and the shards are looked up again at every step."""

    def __init__(self, optimizer, group, params, grads, indices, table_class, storage):
        """`table_class`: the TensorTable of the kernel backend (fusedopt.backends.table_class);
        `storage`: how every member's states and param are stored (a fusedopt.formats.Storage)."""
        self.params = params
        self.device = distributed.local_tensor(params[0]).device
        self.indices = indices  # positions in the group's list of params with grads; None: all
        self.complex = any(p.is_complex() for p in params)
        self.sharded = any(map(distributed.is_dtensor, params))
        self.options = optimizer._structure(group)  # the rule's compile-time options (the plan's structure)
        self.storage = storage
        roles, self.steps, fresh = optimizer._kernel_state(group, params, self.device)
        # No state entries where the rule keeps none (SGD without momentum), as in torch.
        self.keeps_state = bool(roles) or self.steps is not None
        step_views = [] if self.steps is None else [optimizer.state[p]["step"] for p in params]
        self.fresh_states = [optimizer.state[p] for p, flag in zip(params, fresh or ()) if flag]
        # What the table names: param and each role (fixed while the table lives), the grads
        # (re-pointed when they move), and the step views (the step buffer's).
        self.fixed = params + [tensor for role in roles for tensor in role]
        self.step_views = step_views
        self.checked = self.fixed + step_views
        local = distributed.local_tensor
        extra = None if fresh is None else list(map(int, fresh))
        self.table = table_class(list(map(local, params)), list(map(local, grads)),
                                 [list(map(local, role)) for role in roles], extra)
        self._local_fixed, self._local_grads = list(map(local, self.fixed)), list(map(local, grads))
        self.tensor_check = None  # made by watch(), once the group's written memory is known
        self.norm_groups = list(dict.fromkeys(map(distributed.norm_group, grads)))
        self.block_norm_group = None
        if len(self.norm_groups) > 1:  # which group each block's norm partial is reduced over
            group_of_tensor = torch.tensor([self.norm_groups.index(distributed.norm_group(g)) for g in grads])
            self.block_norm_group = group_of_tensor[self.table.host_block_table[0]].to(self.device)
        self._block_groups = None  # the numba reduction's: block_norm_group as an int64 array
        # Whether the state dicts still hold the tensors the table names: one counter while
        # they count their changes (fusedopt.state), else every value compared at each step.
        self.state = optimizer.state
        self.state_values = state_values(optimizer.state, params) if self.keeps_state else None
        self.seen_changes = state_changes()
        self.counted = self.keeps_state and is_counted(optimizer.state, params)
        # On the numba kernels (host arrays of arguments: the same numbers give the same launch;
        # a Triton launch is one call anyway), the last launch can be run again as it was while
        # what it was computed from stays the same (launch_key; the rule's launch numbers are a
        # function of the group's values): not at SGD's first momentum step.
        self.repeatable = self.table.cpu_kernels and not self.fresh_states
        self.last_launch = None  # launch_key of the last launch, where it can be repeated

    def written_spans(self):
        """The memory its launch writes: params, states, masters and step counts."""
        spans = [memory_span(t, True, None)[:2] for t in self._local_fixed]
        if self.steps is not None:
            spans.append(memory_span(self.steps, True, None)[:2])
        return spans

    def watch(self, written):
        """Check before each launch that the tensors are the table's; `written`: the memory the
        group's step writes (disjoint sorted spans), which a grad that moves must not reach
        (p.grad = p.detach(), a state or another bucket's param as a grad): the group is then
        planned again, and the planner sends such params to the reference."""
        self.tensor_check = table_check(self._local_fixed + self.step_views, self._local_grads, written)
        del self._local_fixed, self._local_grads

    def current(self, optimizer, grads):
        """True while the table names exactly the tensors held now (the grad row is re-pointed if
        only the grads moved); False when the group must be planned again."""
        if self.keeps_state and not self._state_current(optimizer):
            return False
        checked = self.checked
        if self.sharded:
            checked = list(map(distributed.local_tensor, self.fixed)) + self.step_views
            grads = distributed.local_grads(self.params, grads)
            if grads is None:
                return False
        found = self.tensor_check.check(checked, grads, self.table.grad_row)
        if found == MOVED:
            self.table.grads_moved()
        return found != CHANGED

    def current_grads_of_params(self, optimizer):
        """current(), with the grads read from the bucket's params by the table check itself:
        SAME or MOVED (current), CHANGED, or NO_GRAD (a param has no grad). For unsharded buckets."""
        if self.keeps_state and not self._state_current(optimizer):
            return CHANGED
        found = self.tensor_check.check_grads_of(self.checked, self.params, self.table.grad_row)
        if found == MOVED:
            self.table.grads_moved()
        return found

    def _state_current(self, optimizer):
        state = optimizer.state
        if state is self.state and self.counted and state_changes() == self.seen_changes:
            return True
        changes = state_changes()
        try:
            values = state_values(state, self.params)
        except TypeError:  # a param's state is gone
            return False
        if len(values) != len(self.state_values) or not all(map(operator.is_, values, self.state_values)):
            return False
        self.state, self.seen_changes, self.counted = state, changes, is_counted(state, self.params)
        return True

    def launch(self, optimizer, group, scaling, group_step, values):
        """One launch (the last one again, where launch_key says it is the same); `values`, the
        group's (group_values)."""
        key = launch_key(self, optimizer, values, scaling, group_step)
        if key is not None and key == self.last_launch:
            self.table.relaunch()
            return
        self.last_launch = None
        self._launch(optimizer, group, scaling, group_step)
        self.last_launch = key

    def _launch(self, optimizer, group, scaling, group_step):
        """The rule's numbers from the group, handed with its spec to the table: one launch."""
        scaling = scaling.to(self.device)
        if self.steps is not None and not self.table.counts_steps:
            self.steps += 1
            if scaling.found_inf is not None:
                self.steps -= scaling.found_inf  # a skipped step does not count
        spec, lr = optimizer.spec, group["lr"]
        self.table.step(spec, spec.launch_numbers(group, self.table.lr_in_memory(lr)), self.options, self.storage,
                        lr=lr, steps=self.steps, fresh=bool(self.fresh_states), scaling=scaling, group_step=group_step)
        if self.fresh_states:  # the first step of these momentum buffers: did it run?
            optimizer.buffers_started(self.fresh_states, skipped=scaling.skipped())

    def grad_norm_partials(self, norm_type, grad_scale):
        """[(partial, non-finite count, norm group)] of this bucket's grads: one reduction launch,
        the block partials summed (maxed) per norm group. On the numba CPU kernels' buckets the
        two numbers are Python floats (summed in fp64), where a compiled reduction has run."""
        if self.table.cpu_kernels:
            return self._cpu_grad_norm_partials(norm_type, grad_scale)
        if self.table.num_blocks == 0:  # only empty shards here
            zero = torch.zeros((), dtype=torch.float64 if self.table.dtype == torch.float64 else torch.float32,
                               device=self.device)
            return [(zero, zero, group) for group in self.norm_groups]
        scale = None if grad_scale is None else grad_scale.to(self.device, non_blocking=True).reshape(1)
        partials = load_kernels().grad_norm_partials(self.table, norm_type, scale)
        if self.block_norm_group is None:
            partial = partials[0].max() if norm_type == float("inf") else partials[0].sum()
            return [(partial, partials[1].sum(), self.norm_groups[0])]
        count = len(self.norm_groups)
        reduce = "amax" if norm_type == float("inf") else "sum"
        by_group = torch.zeros(2, count, dtype=partials.dtype, device=self.device)
        by_group[0].scatter_reduce_(0, self.block_norm_group, partials[0], reduce, include_self=False)
        by_group[1].index_add_(0, self.block_norm_group, partials[1])
        return [(by_group[0, i], by_group[1, i], group) for i, group in enumerate(self.norm_groups)]

    def _cpu_grad_norm_partials(self, norm_type, grad_scale):
        import numpy as np

        from . import cpu

        if not cpu.grad_norm_ready(self.table.dtype):  # torch's per-tensor norms
            return epilogue.torch_norm_partials([p.grad for p in self.params], norm_type, grad_scale)
        if self._block_groups is None:
            self._block_groups = (np.zeros(0, dtype=np.int64) if self.block_norm_group is None
                                  else self.block_norm_group.numpy())
        partials = self.table.grad_norm_partials(norm_type, grad_scale, self._block_groups, len(self.norm_groups))
        return [(float(partials[0, i]), float(partials[1, i]), group) for i, group in enumerate(self.norm_groups)]


class GroupPlan:
    """How one param group is stepped: its kernel buckets and the tensors left to the reference.

    Valid while the same params have grads, the group's structure stays, and every bucket's table
    names the tensors held now (KernelBucket.current)."""

    def __init__(self, optimizer, group, params, grads, in_other_groups=frozenset()):
        """`in_other_groups`: ids of params listed in other groups too (torch steps them once per
        group, one after the other: the reference)."""
        self.params = params
        self.structure = optimizer._structure(group)
        self.storage_options = optimizer._storage_options(group)
        self.values = group_values(group)  # those the structure was found from (checked each step)
        self.buckets = []
        self.reference_params = []
        self.rebuild_next_step = False
        for p, grad in zip(params, grads):
            optimizer._prepare_param(p, grad, group)
        on_kernels = [optimizer._runs_on_kernels(p) for p in params]
        # A param listed twice is stepped twice, one after the other, as torch does: the reference.
        counts = {}
        for p in params:
            counts[id(p)] = counts.get(id(p), 0) + 1
        candidates = [index for index, p in enumerate(params) if on_kernels[index] and counts[id(p)] == 1
                      and id(p) not in in_other_groups and self._fits(optimizer, group, p, grads[index])]
        candidates = self._without_shared_memory(optimizer, group, params, grads, candidates)
        by_bucket = {}
        for index in candidates:
            local = distributed.local_tensor(params[index])
            dtype = torch.view_as_real(local).dtype if local.is_complex() else local.dtype
            step = optimizer.state[params[index]].get("step") if optimizer.has_step else None
            by_bucket.setdefault((local.device, dtype, None if step is None else step.dtype,
                                  optimizer._storage(group, params[index])), []).append(index)
        table_classes = {key: self._table_class(optimizer, key[0], key[1], key[3]) for key in by_bucket}
        # a rule whose CPU kernel did not compile for a dtype: the reference takes those params
        by_bucket = {key: indices for key, indices in by_bucket.items() if table_classes[key] is not None}
        on_bucket = {index for indices in by_bucket.values() for index in indices}
        self.reference_params = [p for index, p in enumerate(params) if index not in on_bucket]
        for key, indices in by_bucket.items():
            members = [params[i] for i in indices]
            if len(indices) == len(params):
                indices = None  # the common case: one bucket takes the group's grads as they are
            bucket = KernelBucket(optimizer, group, members, [p.grad for p in members], indices, table_classes[key],
                                  storage=key[3])
            self.rebuild_next_step |= bool(bucket.fresh_states)
            self.buckets.append(bucket)
        # The reference params' memory as planned: their updates and the kernels' must not meet
        # (the reference runs after the launches; torch steps one param after another).
        kernel_written = [span for bucket in self.buckets for span in bucket.written_spans()]
        self.kernel_written = disjoint(kernel_written)
        self.reference_written = self._reference_written(optimizer, group) if self.buckets else []
        written = disjoint(kernel_written + self.reference_written)
        for bucket in self.buckets:
            bucket.watch(written)
        # The common case, checked without a Python list of grads (current_whole_group): one
        # bucket of plain tensors holding every param of the group.
        self.whole_group = (len(self.buckets) == 1 and not self.reference_params and self.buckets[0].indices is None
                            and not self.buckets[0].sharded and len(params) == len(group["params"])
                            and all(type(p) in PLAIN_PARAM_TYPES for p in params))

    def _table_class(self, optimizer, device, dtype, storage):
        """The tensor table of a (device, dtype, storage) bucket (fusedopt.backends.table_class),
        once the backend's kernel of the rule is ready for them (the numba kernels compile it
        now); None where it is not."""
        tables = table_class(optimizer.backend, device)
        return tables if tables.ready(optimizer.spec, self.structure, storage, dtype) else None

    @staticmethod
    def _state_tensors(optimizer, group, param):
        """The state tensors a kernel would walk beside `param`: each role's (values, and the scales
        of 8-bit codes, else None), and its master (fp32 copy or remainder)."""
        state = optimizer.state.get(param, {})
        tensors = [(state[key], state.get(key + formats.SCALES) if formats.format_of(state, key, param) == formats.Q8
                    else None) for key in optimizer._state_keys(group) if key in state]
        master = state.get(master_key(optimizer.param_rounding)) if optimizer._keeps_master(param) else None
        return tensors, master

    @classmethod
    def _written_tensors(cls, optimizer, group, param):
        """What a step of `param` writes, as strided local tensors: the param, its states (and their
        scales), master and step count."""
        states, master = cls._state_tensors(optimizer, group, param)
        step = optimizer.state.get(param, {}).get("step") if optimizer.has_step else None
        tensors = [param, *(t for pair in states for t in pair if t is not None), *([] if master is None else [master]),
                   *([step] if torch.is_tensor(step) else [])]
        return [t for t in map(distributed.local_tensor, tensors) if t.layout == torch.strided]

    def _reference_written(self, optimizer, group):
        return [memory_span(tensor, True, None)[:2] for p in self.reference_params
                for tensor in self._written_tensors(optimizer, group, p)]

    def _fits(self, optimizer, group, param, grad):
        """Whether param, grad, states and master can be walked by a kernel: their local shards,
        for a DTensor param, whose grad and states must then be split as the param is."""
        states, master = self._state_tensors(optimizer, group, param)
        others = (grad, *(values for values, _ in states), *([] if master is None else [master]))
        if not all(distributed.same_sharding(param, t) for t in others):
            return False
        if not all(distributed.same_row_sharding(param, scales) for _, scales in states if scales is not None):
            return False
        step = optimizer.state[param].get("step") if optimizer.has_step else None
        if step is not None and step.dtype not in (torch.float32, torch.float64):
            return False  # counted in its own dtype, as torch does (a bf16 count stops at 256)
        local = distributed.local_tensor
        return table_class(optimizer.backend, local(param).device).fits(
            local(param), local(grad), [(local(values), None if scales is None else local(scales))
                                        for values, scales in states], None if master is None else local(master))

    def _without_shared_memory(self, optimizer, group, params, grads, candidates):
        """The candidates whose memory (param, states, master, step count written; grad read)
        meets no other param's where either writes it, the reference-bound params' included:
        torch steps such params one after another, and so does the reference."""
        spans = []
        for index, param in enumerate(params):
            grad = distributed.local_tensor(grads[index])
            if grad.layout == torch.strided:
                spans.append(memory_span(grad, False, index))
            spans += [memory_span(tensor, True, index) for tensor in self._written_tensors(optimizer, group, param)]
        shared = overlapping([span for span in spans if span[1] > span[0]])
        return [index for index in candidates if index not in shared]

    def current(self, optimizer, group, params, grads):
        """True while this plan steps these params with these grads (see KernelBucket.current)."""
        if not self._planned_for(optimizer, group, params):
            return False
        if self.reference_params and self.buckets and not self._reference_current(optimizer, group):
            return False
        for bucket in self.buckets:
            bucket_grads = grads if bucket.indices is None else [grads[i] for i in bucket.indices]
            if not bucket.current(optimizer, bucket_grads):
                return False
        return True

    def current_whole_group(self, optimizer, group):
        """For a whole_group plan: True while it steps the group's params with their grads now;
        False when the group must be planned again; None where a param has no grad (current()
        then takes the params that have one)."""
        if not self._planned_for(optimizer, group, group["params"]):
            return False
        found = self.buckets[0].current_grads_of_params(optimizer)
        return None if found == NO_GRAD else found != CHANGED

    def _planned_for(self, optimizer, group, params):
        """Whether `params` are the very params this plan was made for, and the group's options
        still make the same state tensors, stored as they were (not asked again while the group's
        values are those it was last asked for); the values are kept for this step's launches."""
        if len(params) != len(self.params) or not all(map(operator.is_, params, self.params)):
            return False
        values = group_values(group)
        if values is None or values != self.values:
            if optimizer._structure(group) != self.structure or \
                    optimizer._storage_options(group) != self.storage_options:
                return False
            self.values = values
        return True

    def _reference_current(self, optimizer, group):
        """Whether the reference params' memory is where it was planned, and none of their grads
        reaches what the kernels write."""
        if self._reference_written(optimizer, group) != self.reference_written:
            return False
        local = distributed.local_tensor
        for p in self.reference_params:
            grad = local(p.grad)
            if grad.layout == torch.strided and into(self.kernel_written, *memory_span(grad, False, None)[:2]):
                return False
        return True

    def launch(self, optimizer, group, scaling, group_steps):
        for p in self.reference_params:  # per tensor anyway: state may have been cleared by hand
            optimizer._prepare_param(p, p.grad, group)
        for bucket in self.buckets:
            bucket.launch(optimizer, group, scaling, group_steps.get(bucket.device), self.values)
        if self.reference_params:
            grads = scaling.scale_grads([p.grad for p in self.reference_params])
            if grads is not None:  # None: AMP found an inf or NaN, the step is skipped
                optimizer._rounded_reference_step(group, self.reference_params, grads)
