"""The shared base class: params with grads -> lazily created state (torch.optim's keys) ->
buckets keyed by (device, dtype) -> one backend call per bucket.
"""
import collections
import contextlib
import functools
import itertools
import operator

import torch
from torch.optim import Optimizer
from torch.optim import optimizer as torch_optimizer

from . import arguments, compiled, distributed, epilogue, formats, reference
from .backends import resolve_backend, runs_on_kernels
from .device_schedule import DeviceSchedule, advance_group_step
from .plan import GroupPlan, grad_of
from .rounding import (check_rounding_seed, follow_written_param, keeps_master, master_from,
                       master_key, param_rounding, rounded_reference_step)
from .state import counted, plain
from .steps import STEP_NOT_A_TENSOR, as_float, as_step_tensor, scalar_step_tensor
from .tables import GroupStep, step_buffer


def check_implementation_flags(defaults):
    """torch's implementation switches: accepted, but those we cannot honour raise clearly."""
    if defaults.get("fused") and defaults.get("foreach"):
        raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
    if defaults.get("fused") and defaults.get("differentiable"):
        raise RuntimeError("`fused` does not support `differentiable`")
    if defaults.get("differentiable"):
        raise NotImplementedError("fusedopt does not support differentiable=True; use torch.optim for it")


def _closure_loss(closure):
    """torch.optim's step(closure): the closure re-evaluates the loss with grad enabled."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


_NOT_RECORDED = contextlib.nullcontext()


def _with_step_hooks(step, of_subclass=False):
    """torch.optim's step wrapper (Optimizer.profile_hook_step: the step pre- and post-hooks,
    the profiler's record and its entry point `_optimizer_step_code`), the record made only while
    a profiler runs: out of a profile it is a third of torch's own fused SGD step on one small
    tensor. Marked `hooked`, so that torch.optim does not wrap it again. One frame, so that a
    compiled region breaks once in it (at the disabled step), as in torch's. A subclass's own
    step (`of_subclass`) runs the hooks, and the step it calls through super() does not again."""

    @functools.wraps(step, updated=())  # not step's __dict__: dynamo's mark that step is not traced
    def wrapper(*args, **kwargs):
        optimizer = args[0]
        if optimizer._hooks_running:
            return step(*args, **kwargs)
        recorded = not torch.compiler.is_compiling() and torch.autograd._profiler_enabled()
        with (torch.autograd.profiler.record_function(f"Optimizer.step#{type(optimizer).__name__}.step") if recorded
              else _NOT_RECORDED):
            for pre_hook in itertools.chain(torch_optimizer._global_optimizer_pre_hooks.values(),
                                            optimizer._optimizer_step_pre_hooks.values()):
                result = pre_hook(optimizer, args, kwargs)
                if result is not None:
                    if not (isinstance(result, tuple) and len(result) == 2):
                        raise RuntimeError(
                            f"{step} must return None or a tuple of (new_args, new_kwargs), but got {result}.")
                    args, kwargs = result
            if of_subclass:
                optimizer._hooks_running = True
                try:
                    out = step(*args, **kwargs)
                finally:
                    del optimizer._hooks_running
            else:
                out = step(*args, **kwargs)
            optimizer._optimizer_step_code()
            for post_hook in itertools.chain(optimizer._optimizer_step_post_hooks.values(),
                                             torch_optimizer._global_optimizer_post_hooks.values()):
                post_hook(optimizer, args, kwargs)
            return out

    wrapper.hooked = True
    return wrapper


def _capturable_devices():
    try:
        from torch.optim.optimizer import _get_capturable_supported_devices

        return tuple(_get_capturable_supported_devices())
    except ImportError:
        return ("cuda", "xpu", "hpu", "privateuseone", "xla")


CAPTURABLE_DEVICES = _capturable_devices()
STORAGE_OPTIONS = ("state_precision", "state_rounding")  # fusedopt's group options of how states are stored


def _fused_param_check():
    """torch.optim's check of each param of a `fused=True` group (floating point, on a device
    torch has fused kernels for, CUDA aside with `cuda_unsupported`), raising its RuntimeError."""
    try:
        from torch.optim.optimizer import _device_dtype_check_for_fused

        return _device_dtype_check_for_fused
    except ImportError:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        def check(param, cuda_unsupported=False):
            devices = [device for device in _get_fused_kernels_supported_devices()
                       if not (cuda_unsupported and device == "cuda")]
            if not (param.device.type in devices and torch.is_floating_point(param)):
                raise RuntimeError("`fused=True` requires all the params to be floating point Tensors of "
                                   f"supported devices: {devices} but {param.dtype} and {param.device.type}")

        return check


torch_fused_check = _fused_param_check()

# torch's error for an in-place update of a tensor made under torch.inference_mode(), outside it
INFERENCE_TENSOR_UPDATE = ("Inplace update to inference tensor outside InferenceMode is not allowed.You can make a "
                           "clone to get a normal tensor before doing inplace update.See "
                           "https://github.com/pytorch/rfcs/pull/17 for more details.")


class FusedOptimizer(Optimizer):
    """Base of fusedopt's optimizers. A subclass gives its defaults and argument checks, its rule
    as `spec` (a fusedopt.spec.RuleSpec: state slots, numbers and equations, which every kernel
    backend compiles), and its plain-torch implementation, `reference_step`.

    The extension API, what a rule's class defines or overrides (everything else with a leading
    underscore is the shared machinery):

    - ``spec``, ``has_step``: the rule, and whether its state has torch's ``step`` count;
    - ``hyperparameters(group)``: the keyword arguments of its reference function (fusedopt.reference),
      which ``reference_step(group, params, grads, targets=None)`` calls with
      ``reference_hyperparameters(group)`` (the same, the lr scheduled);
    - ``init_state(param, group)``: torch's lazy state (zeros per state slot, and the step count);
    - ``check_grad(grad)``, ``check_fused_param(param, grad)``, ``check_state(state, group, grad,
      param)``: torch.optim's refusals of a grad, of a param under fused=True, of a state;
    - ``lerped_state_keys(group)``, ``coupled_weight_decay(group)``: what torch lerps towards the
      grad, and the decay it adds to it (for torch's dtype errors);
    - ``prepare_fresh_buffers(group, params, states)``, ``buffers_started(states, skipped)``: for a
      rule whose kernel reads a per-tensor flag (spec.extra; SGD's first momentum step).
    """

    spec = None  # the rule (fusedopt.spec.RuleSpec)
    has_step = True  # state['step'] exists (all rules but SGD and Lion)
    _hooks_running = False  # True while a subclass's own step runs, whose hooks have run (_with_step_hooks)
    _planned_in_inference_mode = False  # whether a plan in _plans was made under torch.inference_mode()

    def __init_subclass__(cls, **kwargs):
        """A subclass's own step runs the step hooks once, as fusedopt's classes do; its signature
        and docstring show the arguments every class takes (fusedopt.arguments.document)."""
        super().__init_subclass__(**kwargs)
        step = cls.__dict__.get("step")
        if callable(step) and not getattr(step, "hooked", False):
            cls.step = _with_step_hooks(step, of_subclass=True)
        arguments.document(cls)

    def __init__(self, params, defaults, backend=None, **shared):
        """`defaults`: the rule's param-group defaults; `shared`: the arguments every class takes
        (fusedopt.arguments.SHARED_ARGUMENTS, by name; a class's **shared), `backend` among them
        (also positional, for subclasses that pass it so)."""
        if backend is not None:
            shared["backend"] = backend
        shared = self._shared_arguments = arguments.with_defaults(shared, type(self).__name__)
        backend, max_grad_norm, unscale_in_step = shared["backend"], shared["max_grad_norm"], shared["unscale_in_step"]
        stochastic_rounding, master_weights = shared["stochastic_rounding"], shared["master_weights"]
        rounding_seed, schedule, schedule_steps = shared["rounding_seed"], shared["schedule"], shared["schedule_steps"]
        state_precision, state_rounding = shared["state_precision"], shared["state_rounding"]
        check_implementation_flags(defaults)
        # per group, in param_groups (checkpoints carry them); the defaults only where they are not
        # torch's layout, so that a group stays torch.optim's otherwise
        if formats.check_precision(state_precision) != "fp32":
            defaults["state_precision"] = state_precision
        if formats.check_state_rounding(state_rounding) != "nearest":
            defaults["state_rounding"] = state_rounding
        self.param_rounding = param_rounding(stochastic_rounding, master_weights)
        self.rounding_seed = check_rounding_seed(rounding_seed)
        self.backend = resolve_backend(backend)
        self.max_grad_norm = None if max_grad_norm is None else epilogue.check_max_grad_norm(max_grad_norm)
        if not isinstance(unscale_in_step, bool):
            raise TypeError(f"unscale_in_step must be True or False, got {unscale_in_step!r}")
        self.unscale_in_step = unscale_in_step
        self.last_grad_norm = None  # the total grad norm of the last step that clipped by max_grad_norm
        self._plans = {}
        self._pending_clip = None  # left by clip_grad_norm_ for the next step (an epilogue.PendingClip)
        self._device_schedule = None  # a DeviceSchedule, or None
        self._graph_handle = compiled.register(self)  # what a compiled graph's fusedopt::step names
        self._in_graph = False  # while a compiled region's step runs (_stepping_in_graph)
        super().__init__(params, defaults)
        self.state = counted(self.state)
        self.set_schedule(schedule, schedule_steps)

    @property
    def _step_supports_amp_scaling(self):
        """Whether torch.amp.GradScaler hands over `grad_scale` and `found_inf` (the kernels then
        unscale the grads and skip a step with an inf or NaN) instead of unscaling the grads
        itself: with ``unscale_in_step`` (the default), as torch's fused optimizers do. False with
        ``unscale_in_step=False``, for training loops that insist on unscaling first (Lightning's
        and accelerate's gradient clipping under fp16 AMP), and always with DTensor params: there
        GradScaler and ShardedGradScaler unscale and check as they do for torch.optim, and
        ShardedGradScaler agrees on the inf check over the ranks, so every rank skips the same
        steps and keeps the same scale."""
        return self.unscale_in_step and not self._holds_dtensors

    def add_param_group(self, param_group):
        if isinstance(param_group, dict):
            formats.check_precision(param_group.get("state_precision", "fp32"))
            formats.check_state_rounding(param_group.get("state_rounding", "nearest"))
        super().add_param_group(param_group)
        self._holds_dtensors = (getattr(self, "_holds_dtensors", False)
                                or any(map(distributed.is_dtensor, self.param_groups[-1]["params"])))

    # ---- a learning-rate schedule evaluated by the kernels ----
    def set_schedule(self, schedule, schedule_steps=None):
        """Have the kernels scale each group's lr by `schedule` (a fusedopt.schedules.Schedule),
        read at the group's step count on the device: the same lrs as driving the schedule with
        ScheduledLR from the host, but with nothing on the host, so a captured CUDA graph replays
        a whole scheduled run. The count (``group["group_step"]``, saved in state_dict) moves on
        at every step(), skipped AMP steps included, as a host scheduler stepped every iteration
        would. The factors are tabulated once, up to the schedule's end, where the last one is held;
        a schedule without an end (inverse sqrt, exponential decay) needs ``schedule_steps``, the
        number of steps to tabulate. None removes the schedule."""
        self._device_schedule = None if schedule is None else DeviceSchedule(schedule, schedule_steps,
                                                                             self.param_groups)
        self._device_scalars = {}

    @property
    def schedule(self):
        """The fusedopt.schedules.Schedule the kernels read (set_schedule), or None."""
        return None if self._device_schedule is None else self._device_schedule.schedule

    def _advance_group_step(self, group, devices):
        """Count this step() in the group's counter; the GroupStep (what the kernels read at the
        count: the schedule's factors, the rounding seed) for each of `devices`, the devices of the
        group's kernel buckets."""
        count = advance_group_step(group, devices[0] if devices else None)
        if not devices:
            return {}
        steps = {}
        for device in devices:
            if device not in self._device_scalars:
                factors = None if self.schedule is None else self._device_schedule.on_device(device)
                self._device_scalars[device] = factors, torch.tensor(self.rounding_seed, dtype=torch.int64,
                                                                     device=device)
            factors, seed = self._device_scalars[device]
            steps[device] = GroupStep(count.to(device).reshape(1), factors, seed)
        return steps

    def _scheduled_factor(self, group):
        """The schedule's factor at the group's current step, on the host (the plain-torch path)."""
        return 1.0 if self.schedule is None else self._device_schedule.factor(group)

    def current_lr(self, group_index=0):
        """The lr the last step used in a group, as a tensor: base lr times the schedule's factor
        (no host sync: the factor is read on the device)."""
        group = self.param_groups[group_index]
        if self.schedule is None or "group_step" not in group:
            return torch.as_tensor(group["lr"])
        return self._device_schedule.current_lr(group)

    # ---- what each rule provides ----
    def _structure(self, group):
        """The group's compile-time options of the rule (spec.Options), which also decide which
        state tensors exist: a plan is made again when they change."""
        return self.spec.options(group)

    def _state_keys(self, group):
        """Names of the state tensors the kernel reads and writes, in role (slot) order."""
        return self.spec.state_names(self.spec.options(group))

    def init_state(self, param, group):
        """torch's lazy state: a step counter (rules that count steps) and zeros for each state
        tensor, in the format the group's state_precision gives it (like the param by default)."""
        state = self.state[param]
        if self.has_step:
            state["step"] = scalar_step_tensor(param.device if group.get("capturable") else None)
        for key in self._state_keys(group):
            self.new_state(param, group, key)

    def _storage_options(self, group):
        """The group's (state_precision, state_rounding), checked: a value put in the group by hand
        or by a checkpoint that is not one of theirs raises ValueError, as the constructor does.
        A plan is made again when they change, which converts the states (_store_in_group_format)."""
        return (formats.check_precision(group.get("state_precision", "fp32")),
                formats.check_state_rounding(group.get("state_rounding", "nearest")))

    def _state_format(self, group, param, key):
        """The format (fusedopt.formats) state[key] of `param` takes under its group's
        state_precision."""
        return formats.state_format(group.get("state_precision", "fp32"), param,
                                    self.spec.may_code(self.spec.options(group), key))

    def new_state(self, param, group, key, fill=0.0):
        """Make state[key] of `param` in the format the group's state_precision gives it
        (fusedopt.formats), holding `fill`: for a rule's init_state."""
        state = self.state[param]
        fmt = self._state_format(group, param, key)
        for suffix, tensor in formats.zeros(param, fmt, self.spec.slot(key).signed).items():
            state[key + suffix] = tensor
        if fill != 0:
            if fmt == formats.PLAIN:
                state[key].fill_(complex(fill, fill) if param.is_complex() else fill)
            else:
                formats.encode(torch.full_like(param, fill, dtype=torch.float32), state, key)

    def hyperparameters(self, group):
        """The rule's keyword arguments for its reference function; a tensor lr stays a tensor."""
        raise NotImplementedError

    def reference_hyperparameters(self, group):
        """The same for the reference: a tensor lr stays a tensor, as torch.optim computes with it;
        a scheduled lr is the base lr times the schedule's factor, as a number."""
        lr = group["lr"] if self.schedule is None else as_float(group["lr"]) * self._scheduled_factor(group)
        return {**self.hyperparameters(group), "lr": lr}

    def reference_step(self, group, params, grads, targets=None):
        """Update `targets` (default: the params themselves) with the rule, from the state of
        `params`."""
        raise NotImplementedError

    def _rounded_reference_step(self, group, params, grads):
        """reference_step, with bf16 params updated through fp32 where param_rounding asks for it."""
        rounded_reference_step(self, group, params, grads)

    def prepare_fresh_buffers(self, group, params, states):
        """For a rule whose kernel reads a per-tensor integer (spec.extra): make the state its
        kernel needs and flag each param whose state starts at this step. SGD's momentum buffers
        start from the grad; by default nothing is made and nothing flagged."""
        return [False] * len(params)

    def _kernel_state(self, group, params, device):
        """The state a kernel bucket of `params` (each prepared by _prepare_param) walks, made where
        the kernel needs it: (the state tensors of each role, in slot order, then the fp32 master
        copies; the step counts, as one buffer on `device` of which each state["step"] becomes a
        view, so that the kernel reads them there and edits in place are seen; the flags of
        prepare_fresh_buffers, or None)."""
        masters = self._keeps_master(params[0])
        keys = self._state_keys(group)
        states = [self.state[p] for p in params] if (self.has_step or keys or masters) else [{} for _ in params]
        steps = fresh = None
        if self.has_step:
            steps = step_buffer([state["step"] for state in states], device)
            for index, state in enumerate(states):
                state["step"] = steps[index]
        if self.spec.extra:
            fresh = self.prepare_fresh_buffers(group, params, states)
        roles = [[state[key + suffix] for state in states] for key in keys
                 for suffix in ("", formats.SCALES) if suffix in formats.suffixes(states[0], key)]
        if masters:
            roles.append([state[master_key(self.param_rounding)] for state in states])
        return roles, steps, fresh

    def _storage(self, group, param):
        """How `param`'s states and the param itself are stored (a fusedopt.formats.Storage): the
        format of each state slot as its tensors are (absent where the options keep none), the
        rounding of states, and that of the param."""
        state = self.state.get(param, {})
        present = self.spec.present(self.spec.options(group))
        slots = tuple(formats.ABSENT if not here else formats.format_of(state, slot.name, param) if slot.name in state
                      else self._state_format(group, param, slot.name)  # a state the step will make
                      for slot, here in zip(self.spec.states, present))
        return formats.Storage(slots, group.get("state_rounding", "nearest"), self._rounding_of(param))

    def _rounding_of(self, param):
        """How `param` is stored after a step: "nearest", "stochastic", "master" (an fp32 copy) or
        "remainder" (the param and a 16-bit remainder): the last three for bf16 params only."""
        return self.param_rounding if param.dtype == torch.bfloat16 else "nearest"

    def buffers_started(self, states, skipped):
        """After a launch that had fresh buffers: it ran on them, or (skipped by AMP) it did not."""

    def check_grad(self, grad):
        if grad.is_sparse:
            raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")

    def lerped_state_keys(self, group):
        """The state tensors torch.optim moves towards the grad with lerp_, which needs both of one
        dtype."""
        return ()

    def coupled_weight_decay(self, group):
        """The weight decay torch.optim adds to the grad (g + wd * p) before the update: none
        where the param decays itself (decoupled_weight_decay)."""
        return 0 if group.get("decoupled_weight_decay") else group.get("weight_decay", 0)

    def check_state(self, state, group, grad, param):
        """torch.optim's errors for a state it could not step: a step count that is not a tensor;
        a state tensor the group's options need that was never made (an option such as amsgrad
        switched on after steps); a lerped state of another dtype than the grad it meets (a model
        cast by .half() or .double() after steps, a grad replaced through .data), which is the
        grad promoted to the param's dtype where weight decay is added to it."""
        if self.has_step and "step" in state and not torch.is_tensor(state["step"]):
            raise RuntimeError(STEP_NOT_A_TENSOR)
        for key in ("step", *self._state_keys(group)) if self.has_step else self._state_keys(group):
            if key not in state:
                raise KeyError(key)
        lerped = self.lerped_state_keys(group)
        if lerped:
            dtype = grad.dtype
            if self.coupled_weight_decay(group) != 0:
                dtype = torch.promote_types(dtype, param.dtype)
            for key in lerped:  # (a state in bf16 or 8 bits is decoded to the math dtype: no such error)
                if state[key].dtype != dtype and formats.format_of(state, key, param) == formats.PLAIN:
                    raise RuntimeError(f"expected dtype {state[key].dtype} for `end` but got dtype {dtype}")

    def _check_codes(self, state, group, param):
        """8-bit codes and scales (put in by the user, or given new storage) that do not fit the
        param raise before any launch: a kernel would read and write past them."""
        for key in self._state_keys(group):
            value = state.get(key)
            if torch.is_tensor(value) and value.dtype in formats.CODE_DTYPES:
                formats.check_codes_fit({name: state[name] for name in (key, key + formats.SCALES) if name in state},
                                        param, RuntimeError)

    def _check_not_inference(self, param, group):
        """torch.optim's error at a step outside torch.inference_mode() that would update a tensor
        made inside it (state made by a first step taken there): the param or a state tensor
        (state["step"] aside: the kernels' step counts are views of a buffer of fusedopt's own,
        and torch makes it with the other states)."""
        state = self.state.get(param, {})
        for tensor in (param, *(state.get(key) for key in self._state_keys(group))):
            if tensor is not None and tensor.is_inference():
                raise RuntimeError(INFERENCE_TENSOR_UPDATE)

    def check_fused_param(self, param, grad):
        """torch.optim's refusal, at step(), of a param of a fused=True group that its fused kernels
        do not take (complex, or on a device such as meta)."""
        torch_fused_check(param)

    def _check_capturable_device(self, param):
        """torch.optim's check under capturable=True: the param on a device whose work can be
        captured. The Triton interpreter, which runs the CUDA kernels on CPU tensors, takes it."""
        device = distributed.local_tensor(param).device
        if device.type not in CAPTURABLE_DEVICES and not (self.backend == "triton" and device.type == "cpu"):
            raise AssertionError("If capturable=True, params and state_steps must be on supported devices: "
                                 f"{list(CAPTURABLE_DEVICES)}.")

    def _prepare_param(self, param, grad, group):
        """Before a param is updated: its grad is accepted, and its state exists and is whole."""
        if group.get("fused"):  # where the user asked for fused=True, torch's refusals
            self.check_fused_param(param, grad)
        if group.get("capturable") and not self._in_graph:
            self._check_capturable_device(param)
        self.check_grad(grad)
        state = self.state.get(param)
        for key in self._state_keys(group) if state else ():
            if key in state and state[key] is None:
                del state[key]  # torch.optim's None momentum buffer (its old checkpoints): none yet
        if not state:
            self.init_state(param, group)
        else:
            self.check_state(state, group, grad, param)
            self._check_codes(state, group, param)
            self._store_in_group_format(group, param)
        if not torch.is_inference_mode_enabled():
            self._check_not_inference(param, group)
        self._prepare_master(param)

    def _prepare_master(self, param):
        """The master a bf16 param keeps under master_weights (True: an fp32 copy, "remainder": a
        16-bit remainder), made where it is missing: from the other kind, where a checkpoint of the
        other setting left one, else from the param. A master the optimizer does not keep (left
        by a checkpoint of another setting) leaves the state: stale after any step, it must not
        be taken up later. Where a param is no longer its fp32 copy rounded, the copy takes the
        param's value (checked where a param is prepared: when the params are planned, and at each
        step of a param the reference steps; not at every launch of the kernels)."""
        key = master_key(self.param_rounding) if self._keeps_master(param) else None
        state = self.state[param] if key is not None else self.state.get(param, {})  # (no empty entry, as in torch)
        other = [name for name in formats.MASTER_KEYS if name != key and name in state]
        if key == "master_param" and key in state:
            with torch.no_grad():
                follow_written_param(state[key], param)
        if key is not None and key not in state:
            with torch.inference_mode(False), torch.no_grad():  # fusedopt's own: never an inference tensor
                if other:  # the same master in the other form, bit for bit
                    state[key] = master_from(param, state, key)
                else:  # the master, or its remainder: 0 while the master is the param
                    state[key] = (param.detach().float().clone(memory_format=torch.preserve_format)
                                  if key == "master_param" else
                                  torch.zeros_like(param, dtype=torch.int16, memory_format=torch.preserve_format))
        for name in other:
            del state[name]

    def _keeps_master(self, param):
        """Whether `param` (bf16 under master_weights=True) has an fp32 master copy in its state."""
        return keeps_master(self.param_rounding, param)

    # ---- the shared step ----
    def _runs_on_kernels(self, param):
        """Whether the kernels update `param` (else the reference does)."""
        return runs_on_kernels(self.backend, param.device)

    @_with_step_hooks
    @torch.compiler.disable(recursive=False)
    def step(self, closure=None):
        """Perform a single optimization step; returns the closure's loss when one is given.

        Under torch.amp.GradScaler (which sets `grad_scale` and `found_inf` on the optimizer),
        grads are unscaled inside the kernels and a step with an inf or NaN grad changes
        nothing; a pending clip factor (clip_grad_norm_, or max_grad_norm) is applied there too.

        torch.compile never traces the update: the cached tables and the kernel launches are host
        state that a graph would freeze (an lr read at trace time, tensors replaced since). In a
        compiled region this frame runs eagerly (one graph break, as torch.optim's step has one,
        after which what the traced code wrote to groups, grads or a scaler has landed): it checks
        the plans and makes the first step's state, then _graph_step's graph holds one call of
        the operator fusedopt::step, which runs the update when the graph runs
        (fusedopt.compiled). The same numbers; no recompilation when the lr changes.
        """
        if not compiled.in_compiled_region():
            return self._step(closure)
        with self._stepping_in_graph():
            loss, plans, operator_takes_them = self._prepare_step(closure)
            if not (operator_takes_them and self._graph_step()):
                self._launch(plans)
        return loss

    def _step(self, closure=None):
        """The eager step (no compiled region is running: nothing traces it), with grad off as
        torch.no_grad() would turn it off, at a tenth of its cost."""
        loss = _closure_loss(closure)
        grad_was_enabled = torch.is_grad_enabled()
        torch._C._set_grad_enabled(False)
        try:
            self._step_plans(self._current_plans())
        finally:
            torch._C._set_grad_enabled(grad_was_enabled)
        return loss

    @torch.compiler.disable
    @torch.no_grad()
    def _prepare_step(self, closure):
        """The closure's loss, the plans of a compiled region's step, and whether fusedopt::step
        can take its tensors: plain real ones (not DTensors; inductor fails on an operator that
        writes complex tensors)."""
        loss = _closure_loss(closure)
        self._graph_groups = self.param_groups  # what _graph_step reads (see there)
        plans = self._current_plans()
        takes_them = not self._holds_dtensors and not any(
            map(torch.is_complex, itertools.chain.from_iterable(plan.params for _, _, plan in plans)))
        return loss, plans, takes_them

    def _graph_step(self):
        """Traced by dynamo: one call of fusedopt::step, and True. Run eagerly (where dynamo could
        not compile it): False, and the caller launches. It reads the groups by another name than
        `param_groups`, whose every value dynamo would guard on (a new lr: a recompile)."""
        if not torch.compiler.is_compiling():
            return False
        with torch.no_grad():
            torch.ops.fusedopt.step(self._graph_handle, *compiled.operands(self, self._graph_groups))
        return True

    @torch.compiler.disable
    @torch.no_grad()
    def _launch(self, plans):
        self._step_plans(plans)

    @contextlib.contextmanager
    def _stepping_in_graph(self):
        """While a compiled region's step is prepared and run: torch.optim skips its capturable
        device check when compiling, and dynamo itself sets capturable=True on groups the traced
        code wrote to."""
        self._in_graph = True
        try:
            yield
        finally:
            self._in_graph = False

    def _step_from_graph(self, params, grads, states, steps):
        """fusedopt::step's body: the eager step, with the values of the tensors the graph handed
        over (fusedopt.compiled.operands' lists)."""
        with torch.no_grad(), self._stepping_in_graph():
            live = compiled.operands(self, self.param_groups)
            copied = compiled.take_newer_values((params, grads, states, steps), live)
            self._step_plans(self._current_plans())
            compiled.give_values_back(copied, live[0] + live[2])

    def _step_plans(self, plans):
        """The step of every group with grads, by its (index, group, plan) from _current_plans."""
        clip_coef, clip_grad_scale = self._take_pending_clip(plans)
        grad_scale = getattr(self, "grad_scale", None)
        if grad_scale is None:  # clip_grad_norm_(grad_scaler=) took the place of unscale_()
            grad_scale = clip_grad_scale
        if self.max_grad_norm is not None and clip_coef is None and plans:
            self.last_grad_norm, _ = self._grad_norm(plans, 2.0, grad_scale)
            clip_coef = epilogue.clip_coefficient(self.last_grad_norm, self.max_grad_norm)
        scaling = epilogue.StepScaling(getattr(self, "found_inf", None), grad_scale, clip_coef)
        for index, group, plan in plans:
            group_steps = {}
            if self.schedule is not None or self.param_rounding == "stochastic" or \
                    group.get("state_rounding") == "stochastic":
                devices = list(dict.fromkeys(bucket.device for bucket in plan.buckets))
                group_steps = self._advance_group_step(group, devices)
            plan.launch(self, group, scaling, group_steps)
            if plan.rebuild_next_step:
                del self._plans[index]

    def _current_plans(self):
        """(index, group, plan) for each group with grads, each plan checked against the tensors
        held now (and planned again where they changed)."""
        plans = []
        if self._planned_in_inference_mode and not torch.is_inference_mode_enabled():
            # Out of inference mode, plans made in it are made again: their tables and step counts
            # are inference tensors, and torch.optim's refusal of the state made there is due.
            self._plans = {}
            self._planned_in_inference_mode = False
        listed = None  # how many groups list each param, counted when a group is planned
        for index, group in enumerate(self.param_groups):
            plan = self._plans.get(index)
            if plan is not None and plan.whole_group and plan.current_whole_group(self, group):
                plans.append((index, group, plan))
                continue
            params = group["params"]
            grads = list(map(grad_of, params))
            if any(map(operator.is_, grads, itertools.repeat(None))):
                params = [p for p, grad in zip(params, grads) if grad is not None]
                grads = [grad for grad in grads if grad is not None]
            if not params:
                continue
            plan = self._plans.get(index)
            if plan is None or not plan.current(self, group, params, grads):
                listed = listed or collections.Counter(id(p) for g in self.param_groups for p in set(g["params"]))
                in_other_groups = {id(p) for p in params if listed[id(p)] > 1}
                plan = self._plans[index] = GroupPlan(self, group, list(params), grads, in_other_groups)
                self._planned_in_inference_mode |= torch.is_inference_mode_enabled()
            plans.append((index, group, plan))
        return plans

    def _take_pending_clip(self, plans):
        """(clip factor, grad scale) that clip_grad_norm_ left for this step, where its grads are
        the ones stepped now; (None, None) where there is none or all its grads have been
        replaced. Raises RuntimeError (and keeps it) where the grads changed otherwise."""
        pending = self._pending_clip
        if pending is None:
            return None, None
        params = [p for _, _, plan in plans for p in plan.params]
        applies = pending.applies_to(params, [p.grad for p in params])
        self._pending_clip = None
        return (pending.clip_coef, pending.grad_scale) if applies else (None, None)

    def zero_grad(self, set_to_none=True):
        """torch.optim's zero_grad; it also drops the clip factor of a clip_grad_norm_ whose grads
        are being cleared (the common "non-finite norm: skip this batch")."""
        self._pending_clip = None
        super().zero_grad(set_to_none)

    @torch.compiler.disable(recursive=False)  # host state, like the step: a graph break of its own
    def clip_grad_norm_(self, max_norm, norm_type=2.0, error_if_nonfinite=False, foreach=None, *,
                        grad_scaler=None):
        """Clip the grads of all params by their total norm, like torch.nn.utils.clip_grad_norm_,
        but fused: one reduction launch per bucket reads each grad once, and the clip factor is
        applied inside the next step()'s update kernel. The grads themselves are left as they are.

        Returns the total norm (a tensor on the first grad's device, in the grads' dtype).
        With ``grad_scaler`` (a torch.amp.GradScaler whose scaled loss made the grads), the norm is
        that of the unscaled grads, and the same reduction does the scaler's inf/NaN check, so
        ``scaler.step(opt)`` neither unscales nor reads the grads again: call this in place of
        ``scaler.unscale_(opt)``. ``foreach`` is accepted for torch's signature and ignored.
        """
        if compiled.in_compiled_region():
            return self._clip_grad_norm_eagerly(max_norm, norm_type, error_if_nonfinite, grad_scaler)
        grad_was_enabled = torch.is_grad_enabled()  # as torch.no_grad() would, at a tenth of its cost
        torch._C._set_grad_enabled(False)
        try:
            return self._clip_grad_norm(max_norm, norm_type, error_if_nonfinite, grad_scaler)
        finally:
            torch._C._set_grad_enabled(grad_was_enabled)

    @torch.compiler.disable
    @torch.no_grad()
    def _clip_grad_norm_eagerly(self, max_norm, norm_type, error_if_nonfinite, grad_scaler):
        """clip_grad_norm_ called in a compiled region: run eagerly, nothing traced."""
        return self._clip_grad_norm(max_norm, norm_type, error_if_nonfinite, grad_scaler)

    def _clip_grad_norm(self, max_norm, norm_type, error_if_nonfinite, grad_scaler):
        norm_type = epilogue.check_norm_type(norm_type)
        plans = self._current_plans()
        if not plans:
            return torch.tensor(0.0)
        grad_scale = epilogue.scaler_scale(grad_scaler)
        total_norm, found_inf = self._grad_norm(plans, norm_type, grad_scale)
        if error_if_nonfinite:
            epilogue.check_finite_norm(total_norm, norm_type)
        params = [p for _, _, plan in plans for p in plan.params]
        grads = [p.grad for p in params]
        self._pending_clip = epilogue.PendingClip(epilogue.clip_coefficient(total_norm, max_norm), params, grads,
                                                  grad_scale)
        if grad_scale is not None:
            epilogue.hand_found_inf_to_scaler(grad_scaler, self, found_inf.to(grad_scale.device))
        return distributed.replicated_like(total_norm, grads)

    def _grad_norm(self, plans, norm_type, grad_scale=None):
        """(total norm of the grads divided by grad_scale, found_inf), global over the ranks for
        DTensor grads: one reduction launch per bucket, torch ops for the rest. The norm is on the
        first grad's device, in the grads' dtype (promoted), as torch's clip_grad_norm_ gives it."""
        first_grad = plans[0][2].params[0].grad
        device = distributed.local_tensor(first_grad).device
        if not epilogue.has_norm_sum(norm_type):
            grads = [p.grad for _, _, plan in plans for p in plan.params]
            return epilogue.torch_total_norm(grads, norm_type, grad_scale, device, epilogue.norm_dtype(grads))
        contributions, leftover, dtypes = [], [], set()
        for _, _, plan in plans:
            leftover += [p.grad for p in plan.reference_params]
            for bucket in plan.buckets:
                dtypes.add(bucket.table.dtype)  # the grads' (real) dtype: a kernel's grads are like its params
                if bucket.complex and norm_type != 2:
                    leftover += [p.grad for p in bucket.params]
                    continue
                contributions += bucket.grad_norm_partials(norm_type, grad_scale)
        if leftover:
            dtypes.add(epilogue.norm_dtype(leftover))
            contributions += epilogue.torch_norm_partials(leftover, norm_type, grad_scale)
        return epilogue.total_grad_norm(contributions, norm_type, device, epilogue.promoted(dtypes))

    def state_dict(self):
        state_dict = super().state_dict()
        state_dict["state"] = plain(state_dict["state"])
        return state_dict

    def load_state_dict(self, state_dict):
        """torch.optim's load_state_dict, except for fusedopt's own state tensors, which keep their
        dtype (torch casts every state tensor to its param's): fp32 master copies and 16-bit
        remainders, 8-bit codes and their scales, bf16 states beside params of another dtype.
        States saved in another format than the group asks for (a torch.optim checkpoint loaded
        into an optimizer with state_precision="8bit") are stored in the group's format; a group
        saved without fusedopt's storage options keeps this optimizer's. Codes or scales that do
        not fit their param raise ValueError, and nothing is loaded. A master of the other
        master_weights setting is converted, and one this optimizer keeps none of is dropped."""
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):  # torch.optim's checks, first
            raise ValueError("loaded state dict has a different number of parameter groups")
        if any(len(saved["params"]) != len(group["params"]) for saved, group in zip(saved_groups, self.param_groups)):
            raise ValueError("loaded state dict contains a parameter group that doesn't match the size of "
                             "optimizer's group")
        for saved in saved_groups:
            self._storage_options(saved)
        params = list(itertools.chain.from_iterable(group["params"] for group in self.param_groups))
        saved_ids = list(itertools.chain.from_iterable(group["params"] for group in state_dict["param_groups"]))
        kept = {}  # saved id -> {key: tensor} of the entries loaded as they are
        torch_layout = {}
        for saved_id, param in zip(saved_ids, params):
            values = state_dict["state"].get(saved_id)
            if not isinstance(values, dict):
                continue
            own = {key: value for key, value in values.items() if torch.is_tensor(value) and key != "step"
                   and formats.keeps_its_dtype(key, value, param)}
            formats.check_codes_fit(own, param)
            kept[saved_id] = own
            torch_layout[saved_id] = {key: value for key, value in values.items() if key not in own}
        storage = [{key: group[key] for key in STORAGE_OPTIONS if key in group} for group in self.param_groups]
        super().load_state_dict({**state_dict, "state": {**state_dict["state"], **torch_layout}})
        for group, options, saved in zip(self.param_groups, storage, state_dict["param_groups"]):
            for key, value in options.items():
                if key not in saved:
                    group[key] = value
        by_id = dict(zip(saved_ids, params))
        for saved_id, own in kept.items():
            param = by_id[saved_id]
            device = distributed.local_tensor(param).device
            for key, value in own.items():
                dtype = torch.float32 if key.endswith(formats.SCALES) else value.dtype  # scales are fp32
                self.state[param][key] = value.to(dtype, copy=True) if distributed.is_dtensor(value) else \
                    value.to(device=device, dtype=dtype, copy=True)
        for group in self.param_groups:
            for param in group["params"]:
                if param in self.state:
                    self._store_in_group_format(group, param)
                    self._prepare_master(param)

    def _store_in_group_format(self, group, param, rounding="nearest", random_key=None):
        """Each state of `param` stored in the format its group's state_precision asks for, where it
        is in another (a torch.optim checkpoint's, one the reference step made, or the 8-bit codes
        of a state_precision the group has since left): decoded and encoded again,
        rounded as `rounding` says, stochastic rounding keyed by random_key(key). A bf16 state
        stays bf16 (states the user made bf16 step as such, under any state_precision), and a
        sparse one (SGD's momentum buffer of a sparse grad) stays as torch.optim keeps it."""
        state = self.state.get(param, {})  # (a param without state gets no empty entry, as in torch)
        for key in self._state_keys(group):
            value = state.get(key)
            if not torch.is_tensor(value) or value.layout != torch.strided:
                continue
            stored, wanted = formats.format_of(state, key, param), self._state_format(group, param, key)
            if stored == wanted or stored == formats.BF16:
                continue
            values = formats.decode(state, key, torch.promote_types(param.dtype, torch.float32)) \
                if stored != formats.PLAIN else value
            for suffix in formats.suffixes(state, key):
                del state[key + suffix]
            self.new_state(param, group, key)
            formats.encode(values, state, key, rounding, None if random_key is None else random_key(key))

    def __repr__(self):
        """torch.optim's repr (each group's options), saying that this is fusedopt's, its settings
        of the arguments every class takes (backend, and those not at their default), and what
        updates each group's params: per device and dtype, the numba or Triton kernels or the
        plain-torch reference (as planned at the last step; before the first, as the backend
        will plan them)."""
        given = getattr(self, "_shared_arguments", {})
        settings = [f"backend={self.backend!r}"]
        for argument in arguments.SHARED_ARGUMENTS:  # as they are now where an attribute holds them
            value = getattr(self, argument.name, given.get(argument.name, argument.default))
            if argument.name not in ("backend", *STORAGE_OPTIONS) and not (  # storage options: in each group
                    value is argument.default or value == argument.default):
                settings.append(f"{argument.name}={value!r}")
        lines = [f"fusedopt.{type(self).__name__} ({', '.join(settings)}"]
        for index, group in enumerate(self.param_groups):
            lines.append(f"Parameter Group {index}")
            lines += [f"    {key}: {group[key]}" for key in sorted(group) if key != "params"]
            lines.append(self._runs_on(index, group))
        return "\n".join(lines + [")"])

    def _runs_on(self, index, group):
        """The repr's line of what updates a group's params."""
        plan = self._plans.get(index)
        counts = {}
        if plan is not None:
            for bucket in plan.buckets:
                what = "numba kernels" if bucket.table.cpu_kernels else "triton kernels"
                counts[what, bucket.device, bucket.table.dtype] = len(bucket.params)
            for param in plan.reference_params:
                key = "torch reference", distributed.local_tensor(param).device, param.dtype
                counts[key] = counts.get(key, 0) + 1
        else:
            from .backends import backend_name

            for param in group["params"]:
                device = distributed.local_tensor(param).device
                try:
                    what = {"torch": "torch reference"}.get(backend_name(self.backend, device), None)
                    what = what or f"{backend_name(self.backend, device)} kernels"
                except RuntimeError:  # the triton backend on the CPU without its interpreter
                    what = "triton kernels (unavailable here)"
                key = what, device, param.dtype
                counts[key] = counts.get(key, 0) + 1
        where = "; ".join(f"{what} ({device}, {str(dtype).replace('torch.', '')}): {count} "
                          f"param{'s' if count != 1 else ''}" for (what, device, dtype), count in counts.items())
        return f"    {'runs on' if plan is not None else 'will run on'}: {where or 'no params with grads yet'}"

    def invalidate_plans(self):
        """Forget the cached tensor tables; the next step rebuilds them. (Replaced params, grads
        and state are noticed without it; load_state_dict ends in __setstate__, which forgets.)"""
        self._plans = {}

    def __getstate__(self):
        return {**super().__getstate__(), "backend": self.backend, "max_grad_norm": self.max_grad_norm,
                "unscale_in_step": self.unscale_in_step, "_device_schedule": self._device_schedule,
                "param_rounding": self.param_rounding, "rounding_seed": self.rounding_seed,
                "_shared_arguments": getattr(self, "_shared_arguments", {})}

    def __setstate__(self, state):
        super().__setstate__(state)
        self.state = counted(self.state)
        self._plans = {}  # tables point at the tensors of the optimizer they were built for
        self._pending_clip = None
        self._graph_handle = compiled.register(self)
        self._in_graph = False
        self._holds_dtensors = any(distributed.is_dtensor(p) for group in self.param_groups for p in group["params"])
        self.__dict__.setdefault("backend", resolve_backend(None))
        self.__dict__.setdefault("max_grad_norm", None)
        self.__dict__.setdefault("unscale_in_step", True)
        self.__dict__.setdefault("last_grad_norm", None)
        self.__dict__.setdefault("_device_schedule", None)
        self.__dict__.setdefault("param_rounding", "nearest")
        self.__dict__.setdefault("rounding_seed", 0)
        self._device_scalars = {}
        for param_state in self.state.values():
            if "step" in param_state:
                param_state["step"] = as_step_tensor(param_state["step"])


def reference_states(optimizer, params, key):
    """The list of state[key] for params (None where missing)."""
    return [optimizer.state.get(p, {}).get(key) for p in params]


__all__ = ["FusedOptimizer", "reference", "reference_states", "as_float", "scalar_step_tensor"]
