"""The shared base class: params with grads -> lazily created state (torch.optim's keys) ->
buckets keyed by (device, dtype) -> one backend call per bucket.
"""
import itertools
import operator
import os
import sys

import torch
from torch.optim import Optimizer

from . import reference

BACKENDS = ("auto", "triton", "torch")


def resolve_backend(backend):
    """The constructor argument wins; else FUSEDOPT_BACKEND; else "auto"."""
    if backend is None:
        backend = os.environ.get("FUSEDOPT_BACKEND", "auto") or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"Invalid backend: {backend!r} (expected one of {', '.join(BACKENDS)})")
    return backend


def load_kernels():
    try:
        from . import kernels
    except ImportError as error:
        raise RuntimeError(
            "fusedopt's triton backend needs the `triton` package (pip install triton); "
            "use backend='torch' for the plain PyTorch implementation"
        ) from error
    return kernels


def kernels_run_on_cpu():
    """Whether the kernels can take CPU tensors: they were defined under the Triton interpreter.
    Without CUDA, asking for them on the CPU turns the interpreter on (unless TRITON_INTERPRET
    says otherwise), since compiled kernels could not run there anyway."""
    if "fusedopt.kernels" not in sys.modules and not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    return load_kernels().multi_tensor.INTERPRETED


def check_implementation_flags(defaults):
    """torch's implementation switches: accepted, but those we cannot honour raise clearly."""
    if defaults.get("fused") and defaults.get("foreach"):
        raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
    if defaults.get("fused") and defaults.get("differentiable"):
        raise RuntimeError("`fused` does not support `differentiable`")
    if defaults.get("differentiable"):
        raise NotImplementedError("fusedopt does not support differentiable=True; use torch.optim for it")
    if defaults.get("capturable"):
        raise NotImplementedError("fusedopt does not support capturable=True yet; use torch.optim for it")


_grad_of = operator.attrgetter("grad")


def as_float(value):
    return value.item() if torch.is_tensor(value) else float(value)


def as_step_tensor(step):
    """A loaded step in torch.optim's default layout: legacy numbers, and the device steps of
    fused or capturable checkpoints, become 0-dim CPU tensors (loading may synchronise)."""
    if not torch.is_tensor(step):
        return torch.tensor(float(step), dtype=scalar_step_tensor().dtype)
    if step.device.type != "cpu" or step.dim() != 0:
        return step.detach().to("cpu").reshape(())
    return step


def scalar_step_tensor():
    """torch.optim's layout of state['step'] (non-capturable): a 0-dim CPU tensor."""
    dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
    return torch.tensor(0.0, dtype=dtype)


class KernelBucket:
    """The tensors of one group on one (device, dtype), updated by one kernel launch per step."""

    def __init__(self, optimizer, group, params, grads, indices, kernels):
        self.params = params
        self.indices = indices  # positions in the group's list of params with grads; None: all
        self.grad_strides = [p.stride() for p in params]
        # No state entries where the rule keeps none (SGD without momentum), as in torch.
        keeps_state = optimizer.has_step or optimizer.state_keys(group)
        states = [optimizer.state[p] for p in params] if keeps_state else [{} for _ in params]
        self.fresh_buffers = False
        if optimizer.has_step:
            # Each step tensor becomes a view into one buffer, so the per-step increment is one op.
            values = [as_float(state["step"]) for state in states]
            self.steps = torch.tensor(values, dtype=states[0]["step"].dtype)
            for index, state in enumerate(states):
                state["step"] = self.steps[index]
            self.step = values[0]
            extra = [int(value - self.step) for value in values]
            self.step_offsets = torch.tensor(extra, dtype=self.steps.dtype)
            self.per_tensor_step = any(extra)
        else:
            fresh = optimizer.prepare_fresh_buffers(group, params, states)
            self.fresh_buffers = any(fresh)
            extra = [int(flag) for flag in fresh]
        roles = [[state[key] for state in states] for key in optimizer.state_keys(group)]
        self.table = kernels.TensorTable(params, grads, roles, extra)
        # The table holds raw addresses: remember which state tensors they belong to, so that
        # state replaced by hand (or cleared) is noticed before the kernel writes anywhere.
        self.state_values = state_values(optimizer.state, params) if keeps_state else None

    def state_unchanged(self, optimizer):
        """True while the optimizer's state for these params holds the very tensors the table
        was built on."""
        if self.state_values is None:
            return True
        try:
            values = state_values(optimizer.state, self.params)
        except TypeError:  # a param's state is gone
            return False
        if len(values) != len(self.state_values) or not all(map(operator.is_, values, self.state_values)):
            return False
        # step counts edited in place (one vectorised comparison)
        return not optimizer.has_step or torch.equal(self.steps, self.step_offsets + self.step)

    def refresh(self, grads):
        """Point the table at the current grads; False when the bucket must be rebuilt instead
        (a grad changed layout or became sparse)."""
        try:
            addresses = list(map(torch.Tensor.data_ptr, grads))
        except RuntimeError:  # a sparse grad has no data pointer
            return False
        if addresses != self.table.grad_addresses:
            if list(map(torch.Tensor.stride, grads)) != self.grad_strides and not all(
                map(fits_grad, self.params, grads)
            ):
                return False
            self.table.refresh_grads(addresses)
        return True

    def launch(self, optimizer, group):
        if optimizer.has_step:
            self.steps += 1
            self.step += 1
            optimizer.kernel_step(group, self.table, step=self.step, per_tensor_step=self.per_tensor_step)
        else:
            optimizer.kernel_step(group, self.table, fresh_buffers=self.fresh_buffers)


def state_values(state, params):
    """Every value of every param's state dict, in order, in one flat list."""
    return list(itertools.chain.from_iterable(map(dict.values, map(state.get, params))))


def fits_grad(param, grad):
    from .kernels.multi_tensor import real_view, same_layout

    return not grad.is_sparse and same_layout(real_view(param), real_view(grad))


class GroupPlan:
    """How one param group is stepped: its kernel buckets and the tensors left to the reference.

    Valid while the same params (same storages) have grads and the group's structure stays."""

    def __init__(self, optimizer, group, params, grads):
        self.params = params
        self.param_addresses = list(map(torch.Tensor.data_ptr, params))
        self.structure = optimizer.structure(group)
        self.buckets = []
        self.reference_params = []
        self.rebuild_next_step = False
        for p, grad in zip(params, grads):
            optimizer.prepare_param(p, grad, group)
        on_kernels = [optimizer.runs_on_kernels(p) for p in params]
        kernels = load_kernels() if any(on_kernels) else None
        by_bucket = {}
        for index, (p, grad) in enumerate(zip(params, grads)):
            state = optimizer.state.get(p, {})
            states = [state[key] for key in optimizer.state_keys(group) if key in state]
            if on_kernels[index] and kernels.fits_kernel(p, grad, states):
                dtype = torch.view_as_real(p).dtype if p.is_complex() else p.dtype
                by_bucket.setdefault((p.device, dtype), []).append(index)
            else:
                self.reference_params.append(p)
        for indices in by_bucket.values():
            members = [params[i] for i in indices]
            if len(indices) == len(params):
                indices = None  # the common case: one bucket takes the group's grads as they are
            bucket = KernelBucket(optimizer, group, members, [p.grad for p in members], indices, kernels)
            self.rebuild_next_step |= bucket.fresh_buffers
            self.buckets.append(bucket)

    def matches(self, optimizer, params, structure):
        return (
            len(params) == len(self.params)
            and all(map(operator.is_, params, self.params))
            and structure == self.structure
            and list(map(torch.Tensor.data_ptr, params)) == self.param_addresses
            and all(bucket.state_unchanged(optimizer) for bucket in self.buckets)
        )

    def step(self, optimizer, group, grads):
        """Returns False, having changed nothing, when the plan is stale and must be rebuilt."""
        for bucket in self.buckets:
            bucket_grads = grads if bucket.indices is None else [grads[i] for i in bucket.indices]
            if not bucket.refresh(bucket_grads):
                return False
        for bucket in self.buckets:
            bucket.launch(optimizer, group)
        if self.reference_params:
            for p in self.reference_params:  # per tensor anyway: state may have been cleared by hand
                optimizer.prepare_param(p, p.grad, group)
            optimizer.reference_step(group, self.reference_params)
        return True


class FusedOptimizer(Optimizer):
    """Base of fusedopt's optimizers. A subclass gives its defaults and state layout, and the two
    implementations of its rule: `reference_step` (plain torch) and `kernel_step` (Triton)."""

    has_step = True  # state['step'] exists (all rules but SGD)

    def __init__(self, params, defaults, backend=None):
        check_implementation_flags(defaults)
        self.backend = resolve_backend(backend)
        self._plans = {}
        super().__init__(params, defaults)

    # ---- what each rule provides ----
    def structure(self, group):
        """The group options that change which state tensors exist (a rebuild when they change)."""
        raise NotImplementedError

    def state_keys(self, group):
        """Names of the state tensors the kernel reads and writes, in role order."""
        raise NotImplementedError

    def init_state(self, param, group):
        """torch's lazy state: a step counter and zeros like the param for each state tensor."""
        state = self.state[param]
        state["step"] = scalar_step_tensor()
        for key in self.state_keys(group):
            state[key] = torch.zeros_like(param, memory_format=torch.preserve_format)

    def reference_step(self, group, params):
        raise NotImplementedError

    def kernel_step(self, group, table, **step_info):
        raise NotImplementedError

    def check_grad(self, grad):
        if grad.is_sparse:
            raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")

    def prepare_param(self, param, grad, group):
        """Before a param is updated: its grad is accepted, and its state exists."""
        self.check_grad(grad)
        if not self.state.get(param):
            self.init_state(param, group)

    # ---- the shared step ----
    def runs_on_kernels(self, param):
        """Whether the Triton kernels update `param` (else the reference does)."""
        if self.backend == "torch":
            return False
        if param.is_cuda:
            return True
        if self.backend == "auto":
            return False
        if not kernels_run_on_cpu():
            raise RuntimeError(
                "backend='triton' runs CPU tensors only through the Triton interpreter, which must be on "
                "(TRITON_INTERPRET=1) when fusedopt.kernels is first imported; these params are on the CPU"
            )
        return True

    @torch.no_grad()
    def step(self, closure=None):
        """Perform a single optimization step; returns the closure's loss when one is given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for index, group in enumerate(self.param_groups):
            params = group["params"]
            grads = list(map(_grad_of, params))
            if any(grad is None for grad in grads):
                params = [p for p, grad in zip(params, grads) if grad is not None]
                grads = [grad for grad in grads if grad is not None]
            if not params:
                continue
            plan = self._plans.get(index)
            structure = self.structure(group)
            if plan is None or not plan.matches(self, params, structure) or not plan.step(self, group, grads):
                plan = GroupPlan(self, group, list(params), grads)
                plan.step(self, group, grads)
            self._plans[index] = None if plan.rebuild_next_step else plan
        return loss

    def invalidate_plans(self):
        """Forget the cached tensor tables; the next step rebuilds them. (Replaced params, grads
        and state are noticed without it; load_state_dict ends in __setstate__, which forgets.)"""
        self._plans = {}

    def __getstate__(self):
        return {**super().__getstate__(), "backend": self.backend}

    def __setstate__(self, state):
        super().__setstate__(state)
        self._plans = {}  # tables point at the tensors of the optimizer they were built for
        self.__dict__.setdefault("backend", resolve_backend(None))
        for param_state in self.state.values():
            if "step" in param_state:
                param_state["step"] = as_step_tensor(param_state["step"])


def reference_states(optimizer, params, key):
    """The list of state[key] for params (None where missing)."""
    return [optimizer.state.get(p, {}).get(key) for p in params]


__all__ = ["FusedOptimizer", "reference", "reference_states", "as_float", "scalar_step_tensor"]
