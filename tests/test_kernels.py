"""Specification of the Triton backend: each fused multi-tensor kernel follows torch.optim's
single-tensor trajectory (params, every state tensor, state['step']) for every rule and option,
on awkward tensor sets, with one launch per (group, device, dtype) bucket per step.

On a machine without CUDA the kernels run on CPU tensors through the Triton interpreter
(conftest.py switches it on); with CUDA the same tests also run on the GPU. Tolerances per
dtype and device, with their reasons: `helpers.tolerance`.
"""
import importlib
import inspect
import math

import pytest
import torch
from torch import nn

import fusedopt
from fusedopt.registry import RULES as REGISTRY
from helpers import (
    GRID,
    RICH,
    RULES,
    STATEFUL,
    ReferenceOptimizer,
    assert_close,
    assert_matches_reference,
    assert_optimizers_match,
    assign_grads,
    case_id,
    clone_params,
    fused_optimizer,
    hyperparameter_rounding,
    launches_during,
    make_grads,
    make_params,
    randn,
    run_beside_torch,
    tolerance,
    torch_optimizer,
)

# Past RAdam's switch to the rectified update (step 5 at beta2 = 0.999) and the early bias corrections.
STEPS = 8

def fp32_tolerance(device, rule, options):
    rtol, atol = tolerance(torch.float32, device, rule, options)
    return dict(rtol=rtol, atol=atol)


# ---- trajectories against torch.optim and against the float64 reference ----


@pytest.mark.parametrize("case", GRID, ids=case_id)
def test_fp32_trajectory_matches_torch_optim(case, device):
    """All shapes (0-dim, 1, 7, 1023, 4097, 2-D, transposed, unaligned, complex64) in one group,
    STEPS steps; params, every state and state['step'] compared with torch.optim every 5 steps."""
    rule, options = case
    generator = torch.Generator().manual_seed(0)
    params = make_params(torch.float32, device, generator)
    rtol, atol = tolerance(torch.float32, device, rule, options)
    run_beside_torch(rule, params, options, steps=STEPS, generator=generator, rtol=rtol, atol=atol)


@pytest.mark.parametrize("case", RICH, ids=case_id)
def test_fp64_trajectory_matches_torch_optim(case, device):
    """fp64 params (and complex128) are updated by an fp64 kernel: torch's fp64 trajectory."""
    rule, options = case
    generator = torch.Generator().manual_seed(1)
    params = make_params(torch.float64, device, generator)
    rtol, atol = tolerance(torch.float64, device, rule, options)
    run_beside_torch(rule, params, options, steps=STEPS, generator=generator, rtol=rtol, atol=atol)


@pytest.mark.parametrize("case", RICH, ids=case_id)
def test_aligned_bucket_trajectory_matches_torch_optim(case, device):
    """Without the unaligned and transposed params every pointer is 16-byte aligned, so the
    bucket takes the kernels' aligned (vectorised) path; torch's trajectory all the same."""
    rule, options = case
    generator = torch.Generator().manual_seed(18)
    params = make_params(torch.float32, device, generator, odd_layouts=False)
    fused, _, fused_params, _ = run_beside_torch(rule, params, options, steps=10, generator=generator,
                                                 **fp32_tolerance(device, rule, options))
    tensors = fused_params + [p.grad for p in fused_params]
    tensors += [value for p in fused_params for key, value in fused.state[p].items() if key != "step"]
    assert all(t.data_ptr() % 16 == 0 for t in tensors)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", RICH, ids=case_id)
def test_low_precision_trajectory_matches_rounded_float64_reference(case, dtype, device):
    """16-bit params and states: fp32 math, each result rounded to nearest in the param's dtype,
    i.e. the float64 reference rounded to that dtype after every step, within 2 ulp relative and
    4 ulp absolute. torch.optim itself computes in 16-bit, so it is not the oracle here."""
    rule, options = case
    generator = torch.Generator().manual_seed(2)
    params = make_params(dtype, device, generator)
    fused_params = clone_params(params)
    fused = fused_optimizer(rule, fused_params, **options)
    oracle = ReferenceOptimizer(rule, params, options, storage_dtype=dtype)
    rtol, atol = tolerance(dtype, device, rule, options)
    for step in range(1, STEPS + 1):
        grads = make_grads(params, generator)
        assign_grads(fused_params, grads)
        fused.step()
        oracle.step(grads)
        if step % 5 == 0:
            assert_matches_reference(fused, oracle, fused_params, rtol=rtol, atol=atol,
                                     where=f"{case_id(case)} {dtype} step {step}")


@pytest.mark.parametrize("rule", RULES)
def test_fp32_trajectory_matches_float64_reference(rule, device):
    """The kernels against the independent float64 oracle (fusedopt.reference), rounded to fp32
    after each step, with the rule's richest options."""
    options = dict(RICH[[r for r, _ in RICH].index(rule)][1])
    generator = torch.Generator().manual_seed(3)
    params = make_params(torch.float32, device, generator)
    fused_params = clone_params(params)
    fused = fused_optimizer(rule, fused_params, **options)
    oracle = ReferenceOptimizer(rule, params, options, storage_dtype=torch.float32)
    rtol, atol = tolerance(torch.float32, device, rule, options)
    for step in range(1, STEPS + 1):
        grads = make_grads(params, generator)
        assign_grads(fused_params, grads)
        fused.step()
        oracle.step(grads)
    assert_matches_reference(fused, oracle, fused_params, rtol=rtol, atol=atol, where=f"{rule} step {STEPS}")


# ---- one launch per bucket ----


def tiny_params(count, dtype, device, generator):
    """`count` small tensors (1 to 7 elements, and some 0-dim)."""
    shapes = [() if i % 50 == 0 else ((i % 7) + 1,) for i in range(count)]
    return [randn(shape, dtype, device, generator).requires_grad_() for shape in shapes]


@pytest.mark.parametrize("rule", RULES)
def test_hundreds_of_tensors_take_one_launch_per_step(rule, device):
    options = STATEFUL[rule]
    generator = torch.Generator().manual_seed(4)
    params = tiny_params(200, torch.float32, device, generator)
    launches = []

    def count(step, fused, expected, fused_params, torch_params):
        launches.append(fusedopt.kernels.launch_count())

    fused, _, _, _ = run_beside_torch(rule, params, options, steps=2, generator=generator, check_every=1,
                                      before_step=count, **fp32_tolerance(device, rule, options))
    assert fusedopt.kernels.launch_count() - launches[-1] == 1
    assert launches[1] - launches[0] == 1


@pytest.mark.parametrize("rule", RULES)
def test_each_param_group_takes_one_launch_per_step(rule, device):
    """Three groups with different hyperparameters: three launches per step, each group with
    its own hyperparameters (torch's trajectory)."""
    generator = torch.Generator().manual_seed(5)
    base = STATEFUL[rule]
    # another lr, and the rule's values that torch reads at every step (the registry's)
    variants = [{"lr": 0.1}, *REGISTRY[rule].changed_by_hand]
    params = [make_params(torch.float32, device, generator, shapes=[(7,), (3, 5)], odd_layouts=False,
                          complex_params=False) for _ in variants]
    fused_lists = [clone_params(group) for group in params]
    torch_lists = [clone_params(group) for group in params]
    fused = fused_optimizer(rule, [dict(params=ps, **v) for ps, v in zip(fused_lists, variants)], **base)
    expected = torch_optimizer(rule, [dict(params=ps, **v) for ps, v in zip(torch_lists, variants)], **base)
    for step in range(1, 6):
        for group, fused_group, torch_group in zip(params, fused_lists, torch_lists):
            grads = make_grads(group, generator)
            assign_grads(fused_group, grads)
            assign_grads(torch_group, grads)
        assert launches_during(fused.step) == len(variants)
        expected.step()
    assert_optimizers_match(fused, expected, sum(fused_lists, []), sum(torch_lists, []), where=f"{rule} groups",
                            **fp32_tolerance(device, rule, dict(base, betas=(0.5, 0.9), alpha=0.5)))


@pytest.mark.parametrize("rule", RULES)
def test_each_dtype_in_a_group_takes_one_launch_per_step(rule, device):
    """fp32 (with complex64, which joins the fp32 bucket as its real view), bf16 and fp16 params
    in one group: three launches per step, each bucket with its own arithmetic."""
    options = STATEFUL[rule]
    generator = torch.Generator().manual_seed(6)
    shapes = [(5,), (2, 3)]
    by_dtype = {dtype: make_params(dtype, device, generator, shapes=shapes, odd_layouts=False)
                for dtype in (torch.float32, torch.bfloat16, torch.float16)}
    fused_by_dtype = {dtype: clone_params(ps) for dtype, ps in by_dtype.items()}
    # Interleave the dtypes in the param list: the buckets must not depend on the order.
    fused_params = [p for trio in zip(*fused_by_dtype.values()) for p in trio]
    fused_params += fused_by_dtype[torch.float32][len(shapes):]  # the complex64 params
    fused = fused_optimizer(rule, fused_params, **options)
    oracles = {dtype: ReferenceOptimizer(rule, ps, options, storage_dtype=dtype) for dtype, ps in by_dtype.items()}
    for step in range(1, 4):
        grads = {dtype: make_grads(ps, generator) for dtype, ps in by_dtype.items()}
        for dtype in by_dtype:
            assign_grads(fused_by_dtype[dtype], grads[dtype])
            oracles[dtype].step(grads[dtype])
        assert launches_during(fused.step) == 3
    for dtype, oracle in oracles.items():
        rtol, atol = tolerance(dtype, device, rule, options)
        assert_matches_reference(fused, oracle, fused_by_dtype[dtype], rtol=rtol, atol=atol, where=f"{rule} {dtype}")


def test_complex_params_share_the_real_bucket(device):
    generator = torch.Generator().manual_seed(7)
    params = make_params(torch.float32, device, generator, shapes=[(4,)], odd_layouts=False)
    assert any(p.is_complex() for p in params)
    fused_params = clone_params(params)
    fused = fused_optimizer("adam", fused_params)
    assign_grads(fused_params, make_grads(params, generator))
    assert launches_during(fused.step) == 1


# ---- grads that come and go, move, or are re-allocated; params whose data is replaced ----

# Which params have no grad at which steps: a few skipped early, one joining late, one skipped
# in the middle of a run of full steps, and an irregular pattern.
NONE_PATTERNS = {
    "late_joiner": lambda step, index: index == 1 and step <= 4,
    "skipped_middle": lambda step, index: (index in (0, 2) and step in (4, 5)) or (index == 3 and step == 9),
    "irregular": lambda step, index: (step * 7 + index * 3) % 5 == 0,
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("pattern", NONE_PATTERNS)
@pytest.mark.parametrize("rule", RULES)
def test_params_without_grad_are_skipped_and_their_steps_lag(rule, pattern, dtype, device):
    """A param whose grad is None is left alone (params, states, step count); later steps, with
    per-tensor step counts that now differ inside one bucket, follow torch at the dtype's
    tolerance (the bias corrections of lagging tensors are as exact as those of the others)."""
    options = STATEFUL[rule]
    generator = torch.Generator().manual_seed(8)
    params = make_params(dtype, device, generator, shapes=[(7,), (1023,), (3, 5), ()],
                         odd_layouts=False, complex_params=False)
    skip = NONE_PATTERNS[pattern]

    def drop_grads(step, fused, expected, fused_params, torch_params):
        for index, (p, q) in enumerate(zip(fused_params, torch_params)):
            if skip(step, index):
                p.grad = None
                q.grad = None

    rtol, atol = tolerance(dtype, device, rule, options)
    fused, _, fused_params, _ = run_beside_torch(rule, params, options, steps=12, generator=generator,
                                                 check_every=1, before_step=drop_grads, rtol=rtol, atol=atol)
    if fused.state[fused_params[0]].get("step") is not None:
        counts = {int(fused.state[p]["step"]) for p in fused_params if fused.state[p]}
        assert len(counts) > 1, "the pattern should leave the params with different step counts"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("rule", ["adam", "adamw"])
def test_lagging_tensors_get_exact_adam_bias_corrections(rule, dtype, device):
    """With a constant gradient g, bias-corrected Adam moves a param by exactly
    lr * |g| / (|g| + eps) per step, whatever its own step count. Two tensors share a bucket, one
    without grads for its first 3 steps: every step of both must be that exact displacement,
    to the dtype's rounding (1e-6 in fp32, where torch.optim and the kernels without lagging
    tensors are within 2e-7)."""
    lr, eps = 0.01, 1e-8
    first = torch.zeros(5, dtype=dtype, device=device, requires_grad=True)
    lagging = torch.zeros(5, dtype=dtype, device=device, requires_grad=True)
    fused = fused_optimizer(rule, [first, lagging], lr=lr, eps=eps, weight_decay=0)
    rtol = {torch.float32: 1e-6, torch.float64: 1e-12}[dtype]
    if torch.device(device).type == "cuda":
        rtol += hyperparameter_rounding(rule, {})
    for step in range(1, 9):
        with torch.no_grad():  # start each step from 0 (in place): the displacement is exact
            first.zero_()
            lagging.zero_()
        first.grad = torch.full_like(first, 0.5)
        lagging.grad = None if step <= 3 else torch.full_like(lagging, -2.0)
        fused.step()
        for name, param, grad in (("first", first, 0.5), ("lagging", lagging, -2.0)):
            if name == "lagging" and step <= 3:
                assert not param.detach().any()
                continue
            exact = torch.full_like(param, -lr * math.copysign(abs(grad) / (abs(grad) + eps), grad))
            assert_close(param.detach(), exact, rtol=rtol, atol=0, name=f"{name} param, step {step}")
    assert fused.state[first]["step"].item() == 8 and fused.state[lagging]["step"].item() == 5


@pytest.mark.parametrize("rule", RULES)
def test_grads_reallocated_by_zero_grad_set_to_none_are_read(rule, device):
    """zero_grad(set_to_none=True) then new grads each step, last step's grads kept alive (and
    overwritten with NaN) so that the new ones live at new addresses: each step reads the new."""
    options = STATEFUL[rule]
    generator = torch.Generator().manual_seed(9)
    params = make_params(torch.float32, device, generator, shapes=[(7,), (2049,)], complex_params=False)
    used = []

    def reallocate(step, fused, expected, fused_params, torch_params):
        grads = [p.grad.clone() for p in fused_params]
        fused.zero_grad(set_to_none=True)
        assert all(p.grad is None for p in fused_params)
        for p, g in zip(fused_params, grads):
            p.grad = g
        if used:
            assert all(new.data_ptr() != old.data_ptr() for new, old in zip(grads, used[-1]))
            for old in used[-1]:
                old.fill_(float("nan"))
        used.append(grads)

    run_beside_torch(rule, params, options, steps=6, generator=generator, check_every=1, before_step=reallocate,
                     **fp32_tolerance(device, rule, options))


@pytest.mark.parametrize("rule", RULES)
def test_grad_replaced_by_a_new_tensor_at_another_address_is_read(rule, device):
    """One param's grad object is swapped for a new tensor at a different address (the old one
    still alive, holding other values) between steps, once as a strided view of a bigger buffer."""
    options = STATEFUL[rule]
    generator = torch.Generator().manual_seed(10)
    params = make_params(torch.float32, device, generator, shapes=[(7,), (33, 17)], odd_layouts=False,
                         complex_params=False)
    kept = []

    def swap(step, fused, expected, fused_params, torch_params):
        p = fused_params[step % 2]
        old = p.grad
        if step % 3 == 0:  # the new grad is a view into a larger buffer, at an unaligned address
            new = torch.empty(old.numel() + 1, dtype=old.dtype, device=old.device)[1:].view(old.shape)
        else:
            new = torch.empty_like(old)
        new.copy_(old)
        old.fill_(float("nan"))  # reading the stale grad would show
        kept.append(old)
        p.grad = new
        assert new.data_ptr() != old.data_ptr()

    run_beside_torch(rule, params, options, steps=7, generator=generator, check_every=1, before_step=swap,
                     **fp32_tolerance(device, rule, options))


@pytest.mark.parametrize("rule", RULES)
def test_params_whose_data_is_replaced_are_updated_in_their_new_storage(rule, device):
    """`p.data = new_tensor` between steps (same values, new storage; once a transposed layout):
    the update lands in the new storage and the state carries on, as in torch."""
    options = STATEFUL[rule]
    generator = torch.Generator().manual_seed(11)
    params = make_params(torch.float32, device, generator, shapes=[(7,), (6, 5)], odd_layouts=False,
                         complex_params=False)
    kept = []

    def replace(step, fused, expected, fused_params, torch_params):
        if step not in (3, 6):
            return
        for p, q in zip(fused_params, torch_params):
            if step == 6 and p.dim() == 2:
                new_p = p.data.t().contiguous().t()  # same values, column-major
                new_q = q.data.t().contiguous().t()
            else:
                new_p, new_q = p.data.clone(), q.data.clone()
            kept.append(p.data)
            p.data, q.data = new_p, new_q

    run_beside_torch(rule, params, options, steps=9, generator=generator, check_every=1, before_step=replace,
                     **fp32_tolerance(device, rule, options))


# ---- non-finite grads ----


@pytest.mark.parametrize("case", RICH, ids=case_id)
def test_nan_and_inf_in_grads_propagate_like_torch(case, device):
    """NaN, +Inf and -Inf at some grad positions on step 2: the same params and state elements
    become NaN/Inf as in torch.optim, the others are unaffected."""
    rule, options = case
    generator = torch.Generator().manual_seed(12)
    params = make_params(torch.float32, device, generator, shapes=[(7,), (33, 17), ()], odd_layouts=False,
                         complex_params=False)

    def poison(step, fused, expected, fused_params, torch_params):
        if step != 2:
            return
        for p, q in zip(fused_params, torch_params):
            for grad in (p.grad, q.grad):
                flat = grad.view(-1)
                flat[0] = float("nan")
                if flat.numel() > 3:
                    flat[1] = float("inf")
                    flat[3] = float("-inf")

    fused, _, fused_params, _ = run_beside_torch(rule, params, options, steps=5, generator=generator,
                                                 check_every=1, before_step=poison,
                                                 **fp32_tolerance(device, rule, options))
    # the poison reached a param or a state (a sign of NaN is 0: Lion's params stay finite)
    assert any(t.isnan().any() for p in fused_params for t in (p, *fused.state[p].values()))
    assert all(p.isfinite().view(-1)[4:].all() for p in fused_params if p.numel() > 4)


def torch_fuses_addcmul(device):
    """Whether torch's addcmul(x, y, y, value=-1) on `device` rounds once (an FMA), as torch's CPU
    and CUDA builds compile it: x - y^2 is then the rounding error of x = y^2, not 0."""
    y = torch.tensor([0.1, 1.7, 3.3], device=device)
    return bool(torch.addcmul(y * y, y, y, value=-1).ne(0).any())


@pytest.mark.parametrize("backend", ["triton", "numba"])
def test_centered_rmsprop_variance_is_rounded_once_like_torch(backend, device):
    """Centered RMSprop's sq - gavg^2 with one rounding, as torch.optim's addcmul computes it:
    with alpha = 0 it is the rounding error of g^2 (NaN under the root where negative, as in
    torch), and where g^2 overflows it is inf - inf: NaN unfused, inf in torch (the param stays)."""
    if backend == "numba" and device != "cpu":
        pytest.skip("the numba kernels take CPU tensors")
    if not torch_fuses_addcmul(device):
        pytest.skip("this torch build rounds addcmul twice")
    values = [1.0, 2.0, -3.0, 0.5, 1.5]
    grads = [[0.3, -1.7, 0.1, 1e38, 0.7], [0.5, 0.2, -2.2, 1.0, -0.9]]
    for alpha in (0.0, 0.99):
        fused_param, torch_param = (torch.tensor(values, device=device, requires_grad=True) for _ in range(2))
        fused = fusedopt.RMSprop([fused_param], lr=0.01, alpha=alpha, centered=True, backend=backend)
        expected = torch.optim.RMSprop([torch_param], lr=0.01, alpha=alpha, centered=True, foreach=False)
        for grad in grads:
            fused_param.grad, torch_param.grad = torch.tensor(grad, device=device), torch.tensor(grad, device=device)
            fused.step()
            expected.step()
        assert_close(fused_param.detach(), torch_param.detach(), rtol=1e-6, atol=0, name=f"alpha={alpha}")


# ---- learning-rate changes and schedules ----


@pytest.mark.parametrize("rule", RULES)
def test_lr_changed_by_hand_between_steps_matches_torch(rule, device):
    options = STATEFUL[rule]
    generator = torch.Generator().manual_seed(13)
    params = make_params(torch.float32, device, generator, shapes=[(7,), (3, 5)], odd_layouts=False)
    rates = [0.05, 0.01, 0.2, 0.0, 0.03, 0.1, 0.001, 0.05]

    def set_lr(step, fused, expected, fused_params, torch_params):
        for optimizer in (fused, expected):
            for group in optimizer.param_groups:
                group["lr"] = rates[step - 1]

    run_beside_torch(rule, params, options, steps=len(rates), generator=generator, check_every=1,
                     before_step=set_lr, **fp32_tolerance(device, rule, options))


SCHEDULERS = {
    "StepLR": lambda optimizer: torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5),
    "LambdaLR": lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1 / (1 + epoch)),
}


@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.parametrize("rule", ["sgd", "adam", "rmsprop"])
def test_lr_scheduler_gives_torchs_trajectory(rule, scheduler, device):
    options = STATEFUL[rule]
    generator = torch.Generator().manual_seed(14)
    params = make_params(torch.float32, device, generator, shapes=[(7,), (3, 5)], odd_layouts=False)
    fused_params, torch_params = clone_params(params), clone_params(params)
    fused = fused_optimizer(rule, fused_params, **options)
    expected = torch_optimizer(rule, torch_params, **options)
    schedules = [SCHEDULERS[scheduler](fused), SCHEDULERS[scheduler](expected)]
    for step in range(1, 11):
        grads = make_grads(params, generator)
        assign_grads(fused_params, grads)
        assign_grads(torch_params, grads)
        fused.step()
        expected.step()
        for schedule in schedules:
            schedule.step()
        assert fused.param_groups[0]["lr"] == expected.param_groups[0]["lr"]
        assert_optimizers_match(fused, expected, fused_params, torch_params, where=f"{rule} {scheduler} step {step}",
                                **fp32_tolerance(device, rule, options))


# The one update kernel: hyperparameters that change during training (the lr, schedules, step
# counts, AMP and clip factors, each rule's numbers) are runtime arguments, so that no value of
# theirs compiles a new kernel; compile-time arguments are the rule itself (its update, its
# per-block numbers, its flags, which of its states exist), whether grads are scaled and the lr
# is a tensor or scheduled (all read from memory), how states and bf16 params are stored and
# rounded, element type, alignment, block.
RUNTIME_ARGUMENTS = ["steps", "found_inf", "grad_scale", "clip_coef", "schedule", "group_step", "schedule_length",
                     "rounding_seed", "lr", "numbers"]
CONSTEXPR_ARGUMENTS = {"UPDATE", "BLOCK_NUMBERS", "OPTIONS", "STATES", "STEPS", "EXTRA", "SCALED_GRADS", "LR_TENSOR",
                       "SCHEDULED", "PARAM_ROUNDING", "STOCHASTIC_STATES", "DTYPE", "ALIGNED", "BLOCK"}
DEVICE_SCALARS = {"steps", "found_inf", "grad_scale", "clip_coef", "lr", "schedule", "group_step", "rounding_seed"}


def update_kernel():
    return importlib.import_module("fusedopt.kernels.multi_tensor").update_kernel


def constexpr_names(kernel):
    """Names of a kernel's tl.constexpr parameters, from its Python signature (the interpreter's
    InterpretedFunction has no `constexprs`), checked against the JITFunction's own list."""
    import triton.language as tl

    function = kernel.fn
    signature = inspect.signature(function)
    names = {name for name, parameter in signature.parameters.items()
             if parameter.annotation is tl.constexpr or "constexpr" in str(parameter.annotation)}
    if hasattr(kernel, "constexprs"):
        assert {kernel.arg_names[index] for index in kernel.constexprs} == names
    return names


def test_hyperparameters_are_runtime_kernel_arguments():
    kernel = update_kernel()
    missing = [name for name in RUNTIME_ARGUMENTS if name not in kernel.arg_names]
    assert not missing, f"update_kernel has no argument {missing}"
    assert not constexpr_names(kernel) & set(RUNTIME_ARGUMENTS)


def test_only_the_rule_flags_dtype_alignment_and_block_are_constexpr():
    assert constexpr_names(update_kernel()) == CONSTEXPR_ARGUMENTS


def test_sizes_and_step_counts_are_not_specialised():
    """Integer arguments that change with the bucket would compile a kernel per value class
    (== 1, multiple of 16) if Triton specialised them; step counts are read from memory."""
    kernel = update_kernel()
    listed = getattr(kernel, "do_not_specialize", None)
    if listed is None:
        listed = kernel.kwargs.get("do_not_specialize", [])
    names = {kernel.arg_names[item] if isinstance(item, int) else item for item in listed}
    assert {"num_tensors", "num_blocks"} <= names


@pytest.mark.parametrize("rule", RULES)
def test_hyperparameters_reach_the_kernel_as_floats(rule, device, monkeypatch):
    """The rule's numbers launched with the kernel are Python floats whatever the user passed (an
    int 0 weight decay), so one compiled kernel serves every value; its flags are booleans; a
    tensor lr on the params' device goes in as a pointer, read by the kernel (no host sync); each
    state's storage format is a compile-time code."""
    kernel = update_kernel()
    seen = []
    original = kernel.run

    def spy(*args, **kwargs):
        # (tensor_table, block_table, num_tensors, num_blocks, *runtime arguments), constexprs
        seen.append((args[4:], kwargs))
        return original(*args, **kwargs)

    monkeypatch.setattr(kernel, "run", spy)
    generator = torch.Generator().manual_seed(15)
    params = make_params(torch.float32, device, generator, shapes=[(7,)], odd_layouts=False, complex_params=False)
    options = dict(STATEFUL[rule], lr=torch.tensor(0.01), weight_decay=0)
    fused = fused_optimizer(rule, params, **options)
    for _ in range(2):
        assign_grads(params, make_grads(params, generator))
        fused.step()
    assert seen
    names = kernel.arg_names[4:]
    for arguments, constexprs in seen:
        kinds = {name: type(value).__name__ for name, value in zip(names, arguments)}
        kinds.pop("numbers")
        numbers = arguments[names.index("numbers")]
        # device scalars (step counts, AMP and clip factors, a tensor lr) are pointers; the rest floats
        assert all(kind == ("Tensor" if name in DEVICE_SCALARS else "float") for name, kind in kinds.items()), kinds
        # the rule's launch numbers: its Launch NamedTuple, every field a float
        assert type(numbers) is fused.spec.Launch and all(type(value) is float for value in numbers)
        assert all(type(flag) is bool for flag in constexprs["OPTIONS"])
        # each state slot's storage format: a small int code (absent, plain, bf16, signed or unsigned 8-bit)
        assert all(type(code) is int and 0 <= code <= 4 for code in constexprs["STATES"])
        assert all(code == 1 for code in constexprs["STATES"] if code)  # fp32 states by default


# ---- closures and a model ----


@pytest.mark.parametrize("rule", RULES)
def test_step_returns_the_closures_loss(rule, device):
    generator = torch.Generator().manual_seed(16)
    weight = randn((4,), torch.float32, device, generator).requires_grad_()
    target = randn((4,), torch.float32, device, generator)
    expected_weight = weight.detach().clone().requires_grad_()
    fused = fused_optimizer(rule, [weight], **STATEFUL[rule])
    expected = torch_optimizer(rule, [expected_weight], **STATEFUL[rule])
    for _ in range(3):
        def closure(w=weight):
            fused.zero_grad()
            loss = ((w - target) ** 2).sum()
            loss.backward()
            return loss

        def expected_closure(w=expected_weight):
            expected.zero_grad()
            loss = ((w - target) ** 2).sum()
            loss.backward()
            return loss

        loss = fused.step(closure)
        expected_loss = expected.step(expected_closure)
        assert torch.is_tensor(loss) and loss.requires_grad
        close = fp32_tolerance(device, rule, STATEFUL[rule])
        assert_close(loss.detach(), expected_loss.detach(), name="loss", **close)
        assert_close(weight.detach(), expected_weight.detach(), name="weight", **close)


def test_step_without_closure_returns_none(device):
    params = [torch.ones(3, device=device, requires_grad=True)]
    fused = fused_optimizer("adam", params)
    params[0].grad = torch.full_like(params[0], 0.5)
    assert fused.step() is None


@pytest.mark.parametrize("rule", RULES)
def test_mlp_training_matches_torch_optim(rule, device):
    """A small MLP trained STEPS steps on a fixed regression batch: the same params as torch.optim."""
    generator = torch.Generator().manual_seed(17)
    torch.manual_seed(17)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 2)).to(device)
    twin = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 2)).to(device)
    twin.load_state_dict(model.state_dict())
    inputs = randn((64, 8), torch.float32, device, generator)
    targets = randn((64, 2), torch.float32, device, generator)
    options = dict(STATEFUL[rule], weight_decay=0.01)
    fused = fused_optimizer(rule, model.parameters(), **options)
    expected = torch_optimizer(rule, twin.parameters(), **options)
    for step in range(1, STEPS + 1):
        for net, optimizer in ((model, fused), (twin, expected)):
            optimizer.zero_grad()
            loss = nn.functional.mse_loss(net(inputs), targets)
            loss.backward()
            optimizer.step()
    # The grads depend on the params here: the kernels' ~1e-7 per-step differences come back
    # through backprop sums that cancel (grads of 1e-3 shift by 4e-6 relative), and RMSprop's
    # normalised steps pass that on (measured: 2.4e-5 relative on its momentum buffer after 20
    # steps). Hence 10x the fp32 tolerance of fixed-grad trajectories.
    close = fp32_tolerance(device, rule, options)
    assert_optimizers_match(fused, expected, list(model.parameters()), list(twin.parameters()), where=f"{rule} mlp",
                            rtol=10 * close["rtol"], atol=10 * close["atol"])
    final = nn.functional.mse_loss(model(inputs), targets).item()
    assert math.isfinite(final)


@pytest.mark.parametrize("rule", ["adam", "adagrad"])
def test_step_count_edited_in_place_is_used_at_the_next_step(rule, device):
    """The bias correction (Adam) or decayed lr (Adagrad) follows state['step'] changed in place."""
    generator = torch.Generator().manual_seed(21)
    params = make_params(torch.float32, device, generator, shapes=[(7,), (33,)], odd_layouts=False,
                         complex_params=False)
    twins = [p.detach().clone().requires_grad_() for p in params]
    options = dict(STATEFUL[rule], lr=0.1)
    fused = fused_optimizer(rule, params, **options)
    expected = torch_optimizer(rule, twins, **options)
    for step in range(3):
        grads = make_grads(params, generator)
        assign_grads(params, grads)
        assign_grads(twins, [g.clone() for g in grads])
        fused.step()
        expected.step()
        if step == 0:
            fused.state[params[1]]["step"].fill_(10)
            expected.state[twins[1]]["step"].fill_(10)
    assert_optimizers_match(fused, expected, params, twins, where=f"{rule} step edited",
                            **fp32_tolerance(device, rule, options))
