"""Specification of the numba CPU backend (fusedopt.cpu): each rule's multi-tensor CPU kernel follows
torch.optim's trajectory and the float64 reference for every option set of the registry, on
awkward tensor sets and every param dtype, with the fused epilogue equal to its unfused
composition, tables that are never stale, and results that do not depend on the thread count.

Each kernel is compiled once per (rule, dtype) with options as runtime numbers; numba's on-disk
cache makes later runs load them in well under a second.
"""
import os
import subprocess
import sys
import warnings

import pytest
import torch

import fusedopt
from fusedopt import backends, schedules
from fusedopt.registry import RULES as REGISTRY
from fusedopt.rounding import split_master
from helpers import (
    GRID,
    RICH,
    RULES,
    STATEFUL,
    ReferenceOptimizer,
    assert_matches_reference,
    assert_optimizers_match,
    assign_grads,
    case_id,
    clone_params,
    launches_during,
    make_grads,
    make_params,
    randn,
    run_beside_torch,
    tolerance,
    torch_optimizer,
    DEFAULT_LR,
    OPTIMIZERS,
)

# where the subprocesses import fusedopt from
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytest.importorskip("numba")

STEPS = 10


def cpu_optimizer(rule, params, **options):
    """A fusedopt optimizer of `rule` on the numba CPU kernels."""
    options.setdefault("lr", DEFAULT_LR[rule])
    return OPTIMIZERS[rule][0](params, backend="numba", **options)


def on_cpu_kernels(optimizer):
    """Every param of the optimizer is in a numba CPU bucket (none left to the reference)."""
    plans = list(optimizer._plans.values())
    return plans and all(not plan.reference_params and all(b.table.cpu_kernels for b in plan.buckets) for plan in plans)


def run_beside(rule, params, options, expected_factory, *, steps=STEPS, **checks):
    """helpers.run_beside_torch on the numba CPU kernels, against `expected_factory(params)`."""
    return run_beside_torch(rule, params, options, steps=steps, backend="numba", expected=expected_factory,
                            **checks)


# ---- trajectories ----


# fp32 over the whole option grid; fp64 (its own precision) over each rule's richest options
TRAJECTORY_CASES = ([pytest.param(torch.float32, case, id=f"fp32-{case_id(case)}") for case in GRID]
                    + [pytest.param(torch.float64, case, id=f"fp64-{case_id(case)}") for case in RICH])


@pytest.mark.parametrize("dtype, case", TRAJECTORY_CASES)
def test_trajectory_matches_torch_optim(dtype, case):
    """0-dim, odd sizes, 2-D, transposed, unaligned and complex params in one group."""
    rule, options = case
    generator = torch.Generator().manual_seed(0 if dtype == torch.float32 else 1)
    params = make_params(dtype, "cpu", generator)
    rtol, atol = tolerance(dtype, "cpu", rule, options)
    fused, _, _, _ = run_beside(rule, params, options, lambda ps: torch_optimizer(rule, ps, **options),
                                generator=generator, rtol=rtol, atol=atol)
    assert on_cpu_kernels(fused)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", RICH, ids=case_id)
def test_low_precision_trajectory_matches_rounded_float64_reference(case, dtype):
    """fp32 math, each result rounded to nearest in the param's dtype."""
    rule, options = case
    generator = torch.Generator().manual_seed(2)
    params = make_params(dtype, "cpu", generator)
    fused_params = clone_params(params)
    fused = cpu_optimizer(rule, fused_params, **options)
    oracle = ReferenceOptimizer(rule, params, options, storage_dtype=dtype)
    rtol, atol = tolerance(dtype, "cpu", rule, options)
    for step in range(1, STEPS + 1):
        grads = make_grads(params, generator)
        assign_grads(fused_params, grads)
        fused.step()
        oracle.step(grads)
    assert on_cpu_kernels(fused)
    assert_matches_reference(fused, oracle, fused_params, rtol=rtol, atol=atol, where=f"{case_id(case)} {dtype}")


@pytest.mark.parametrize("rule", RULES)
def test_fp32_trajectory_matches_float64_reference(rule):
    options = dict(RICH[[r for r, _ in RICH].index(rule)][1])
    generator = torch.Generator().manual_seed(3)
    params = make_params(torch.float32, "cpu", generator)
    fused_params = clone_params(params)
    fused = cpu_optimizer(rule, fused_params, **options)
    oracle = ReferenceOptimizer(rule, params, options, storage_dtype=torch.float32)
    rtol, atol = tolerance(torch.float32, "cpu", rule, options)
    for _ in range(STEPS):
        grads = make_grads(params, generator)
        assign_grads(fused_params, grads)
        fused.step()
        oracle.step(grads)
    assert_matches_reference(fused, oracle, fused_params, rtol=rtol, atol=atol, where=rule)


@pytest.mark.parametrize("case", RICH, ids=case_id)
def test_large_buckets_walk_larger_blocks_with_the_same_results(case, monkeypatch):
    """A bucket large enough for blocks of 65536 (fewer blocks, each a longer loop; odd sizes, so
    that blocks end inside tensors) steps exactly as with blocks of 4096."""
    import fusedopt.cpu

    rule, options = case
    sizes = (70_001, 4_097, 131_072, 3)
    results = []
    for blocks_per_thread in (10**9, 0):  # no growth: blocks of 4096; then the largest, 65536
        monkeypatch.setattr(fusedopt.cpu, "BLOCKS_PER_THREAD", blocks_per_thread)
        generator = torch.Generator().manual_seed(0)
        params = [torch.randn(n, generator=generator).requires_grad_() for n in sizes]
        optimizer = cpu_optimizer(rule, params, **options)
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=generator)
            optimizer.step()
        assert on_cpu_kernels(optimizer)
        results.append(([p.detach() for p in params], optimizer._plans[0].buckets[0].table.block))
    (small_blocks, small), (large_blocks, large) = results
    assert (small, large) == (4096, 65536)
    assert all(torch.equal(a, b) for a, b in zip(small_blocks, large_blocks))


@pytest.mark.parametrize("rule", RULES)
def test_many_tensors_with_empty_ones_take_one_launch_per_step(rule):
    """300 tensors of 0 to 9000 elements, every tenth empty: one launch per step, torch's values."""
    options = STATEFUL[rule]
    generator = torch.Generator().manual_seed(4)
    shapes = [(0,) if i % 10 == 0 else ((i * 37) % 9000 + 1,) for i in range(300)]
    params = [randn(shape, torch.float32, "cpu", generator).requires_grad_() for shape in shapes]
    rtol, atol = tolerance(torch.float32, "cpu", rule, options)
    counts = []

    def count(step, fused, expected, fused_params, expected_params):
        counts.append(fusedopt.kernels.launch_count())

    fused, _, _, _ = run_beside(rule, params, options, lambda ps: torch_optimizer(rule, ps, **options), steps=3,
                                generator=generator, rtol=rtol, atol=atol, before_step=count)
    assert counts[2] - counts[1] == 1
    assert on_cpu_kernels(fused)


def test_auto_runs_the_cpu_kernels_and_names_them():
    assert backends.backend_name("auto", "cpu") == "numba"
    assert backends.backend_name("torch", "cpu") == "torch"
    params = [torch.randn(5, requires_grad=True)]
    params[0].grad = torch.randn(5)
    optimizer = fusedopt.Adam(params, backend="auto")
    assert launches_during(optimizer.step) == 1
    assert on_cpu_kernels(optimizer)


# ---- 16-bit storage: the conversions are torch's, bit for bit ----


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_16_bit_loads_and_stores_round_as_torch(dtype):
    """SGD with lr 1: p - g in fp32 (every 16-bit value, against neighbours, subnormals, overflow,
    infinities and NaN), rounded to nearest even: torch's (p.float() - g.float()).to(dtype)."""
    every = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    generator = torch.Generator().manual_seed(5)
    other = every[torch.randperm(every.numel(), generator=generator)]
    p = every.clone().requires_grad_()
    p.grad = other.clone()
    fusedopt.SGD([p], lr=1.0, backend="numba").step()
    expected = (every.float() - other.float()).to(dtype)
    same = (p.detach().view(torch.int16) == expected.view(torch.int16)) | (p.detach().isnan() & expected.isnan())
    assert bool(same.all()), f"{int((~same).sum())} of {same.numel()} elements differ"


# ---- the epilogue against its unfused composition ----


@pytest.mark.parametrize("rule", RULES)
def test_grad_scaler_sequence_equals_unscale_then_step(rule):
    """Scaled grads, one with an inf at step 3 (skipped: nothing changes, the step does not count)."""
    options = STATEFUL[rule]
    generator = torch.Generator().manual_seed(6)
    # (torch's unscale_ takes no complex grads)
    params = make_params(torch.float32, "cpu", generator, odd_layouts=False, complex_params=False)
    fused_params, torch_params = clone_params(params), clone_params(params)
    fused = cpu_optimizer(rule, fused_params, **options)
    expected = torch_optimizer(rule, torch_params, **options)
    scalers = [torch.amp.GradScaler("cpu", init_scale=1024.0) for _ in range(2)]
    for step in range(1, 6):
        grads = [g * 1024.0 for g in make_grads(params, generator)]
        if step == 3:
            grads[1].view(-1)[0] = float("inf")
        assign_grads(fused_params, grads)
        assign_grads(torch_params, grads)
        for scaler in scalers:
            scaler.scale(torch.ones(()))  # as scaler.scale(loss) would: the scale tensor exists
        scalers[0].step(fused)
        scalers[1].unscale_(expected)
        scalers[1].step(expected)
        for scaler in scalers:
            scaler.update()
    rtol, atol = tolerance(torch.float32, "cpu", rule, options)
    assert_optimizers_match(fused, expected, fused_params, torch_params, rtol=rtol, atol=atol, where=rule)


def float64_norm(grads, norm_type, inv_scale=1.0):
    """The norm of the grads, each element unscaled in its math dtype (fp32, fp64 for fp64) as the
    kernels unscale it, then computed in float64 (complex grads as their real views)."""
    values = []
    for grad in grads:
        real = torch.view_as_real(grad) if grad.is_complex() else grad
        compute = torch.float64 if real.dtype == torch.float64 else torch.float32
        values.append((real.to(compute) * torch.tensor(inv_scale, dtype=compute)).double().flatten())
    return torch.linalg.vector_norm(torch.cat(values), norm_type)


@pytest.mark.parametrize("norm_type", [2.0, float("inf"), 1.5, 1.0])
def test_clip_grad_norm_equals_torch_clip_then_step(norm_type):
    """The CPU reduction's norm is the float64 norm rounded once (torch's, from per-tensor fp32
    norms, is a few ulps off it), and the clipped steps follow torch's clip by that norm then its
    step."""
    generator = torch.Generator().manual_seed(7)
    params = make_params(torch.float32, "cpu", generator, odd_layouts=False, complex_params=False)
    fused_params, torch_params = clone_params(params), clone_params(params)
    fused = fusedopt.AdamW(fused_params, lr=0.02, backend="numba")
    expected = torch.optim.AdamW(torch_params, lr=0.02, foreach=False)
    for _ in range(4):
        grads = make_grads(params, generator, scale=10.0)
        assign_grads(fused_params, grads)
        assign_grads(torch_params, grads)
        norm = fused.clip_grad_norm_(1.0, norm_type)
        torch.testing.assert_close(norm, float64_norm(grads, norm_type).float(), rtol=1.2e-7, atol=0)
        torch_norm = torch.nn.utils.get_total_norm([p.grad for p in torch_params], norm_type, foreach=False)
        torch.testing.assert_close(norm, torch_norm, rtol=2e-6, atol=0)
        # torch's clip by the same norm (its own is further from the float64 norm, by up to 1e-6)
        torch.nn.utils.clip_grads_with_norm_(torch_params, 1.0, norm, foreach=False)
        fused.step()
        expected.step()
    assert on_cpu_kernels(fused)
    assert_optimizers_match(fused, expected, fused_params, torch_params, rtol=1e-5, atol=1e-6, where="clip")


# the total norm in each dtype: rounded once from float64 (a sum in another order may round the
# other way, by an ulp of the dtype)
NORM_RTOL = {torch.float32: 2.4e-7, torch.float64: 1e-14, torch.bfloat16: 8e-3, torch.float16: 1e-3}


@pytest.mark.parametrize("norm_type", [2.0, 1.0, 3.5, float("inf")], ids=lambda p: f"p={p}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_cpu_bucket_norm_is_the_float64_norm_of_the_unscaled_grads(dtype, norm_type):
    """One reduction over blocks of odd sizes in every dtype (complex fp32 and fp64 grads for the
    2-norm), with and without a grad scale: the float64 norm, in the grads' dtype."""
    generator = torch.Generator().manual_seed(8)
    params = make_params(dtype, "cpu", generator, shapes=[(7,), (33, 17), (4097,), (3,), (), (70_001,)],
                         complex_params=norm_type == 2.0)
    grads = make_grads(params, generator, scale=3.0)
    for scale in (None, 3.0 * 2**10):
        copies = clone_params(params)
        assign_grads(copies, [g if scale is None else g * scale for g in grads])
        optimizer = fusedopt.Adam(copies, backend="numba")
        if scale is None:
            norm = optimizer.clip_grad_norm_(1.0, norm_type)
            expected = float64_norm(grads, norm_type)
        else:
            scaler = torch.amp.GradScaler("cpu", init_scale=scale)
            scaler.scale(torch.ones(()))
            norm = optimizer.clip_grad_norm_(1.0, norm_type, grad_scaler=scaler)
            inv_scale = torch.tensor(scale, dtype=torch.float64).reciprocal().float().item()
            expected = float64_norm([g * scale for g in grads], norm_type, inv_scale)
        assert on_cpu_kernels(optimizer) and norm.dtype == dtype
        torch.testing.assert_close(norm.double(), expected.to(dtype).double(), rtol=NORM_RTOL[dtype], atol=0)


@pytest.mark.parametrize("bad", [float("inf"), float("nan")], ids=["inf", "nan"])
@pytest.mark.parametrize("norm_type", [2.0, 1.0, 3.5, float("inf")], ids=lambda p: f"p={p}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_cpu_bucket_norm_of_nonfinite_grads_is_torchs(dtype, norm_type, bad):
    """An inf or NaN in one element of a block of a large grad: the norm is torch's (inf, or NaN),
    and the reduction's count of non-finite grads tells a GradScaler to skip the step."""
    generator = torch.Generator().manual_seed(9)
    params = make_params(dtype, "cpu", generator, shapes=[(5,), (70_001,)], odd_layouts=False, complex_params=False)
    grads = make_grads(params, generator)
    grads[1][50_000] = bad
    fused_params, torch_params = clone_params(params), clone_params(params)
    assign_grads(fused_params, grads)
    assign_grads(torch_params, grads)
    optimizer = fusedopt.Adam(fused_params, backend="numba")
    scaler = torch.amp.GradScaler("cpu", init_scale=1.0)
    scaler.scale(torch.ones(()))
    norm = optimizer.clip_grad_norm_(1.0, norm_type, grad_scaler=scaler)
    expected = torch.nn.utils.clip_grad_norm_(torch_params, 1.0, norm_type)
    assert torch.equal(norm.isnan(), expected.isnan()) and torch.equal(norm.isinf(), expected.isinf())
    before = [p.detach().clone() for p in fused_params]
    scaler.step(optimizer)
    assert scaler._found_inf_per_device(optimizer)[torch.device("cpu")].item() == 1.0
    assert all(torch.equal(p.detach(), b) for p, b in zip(fused_params, before)), "the step was not skipped"


@pytest.mark.parametrize("rule", RULES)
def test_tensor_lr_changed_in_place_is_read_at_each_step(rule):
    generator = torch.Generator().manual_seed(9)
    params = make_params(torch.float32, "cpu", generator, odd_layouts=False)
    options = dict(STATEFUL[rule], weight_decay=0.1)
    if "decoupled_weight_decay" in REGISTRY[rule].option_values:
        options["decoupled_weight_decay"] = True
    lr = torch.tensor(DEFAULT_LR[rule])
    lr_values = [DEFAULT_LR[rule] * factor for factor in (1.0, 0.5, 0.25, 2.0)]

    def change_lr(step, fused, expected, fused_params, expected_params):
        lr.fill_(lr_values[step - 1])
        for group in expected.param_groups:
            group["lr"] = lr_values[step - 1]

    rtol, atol = tolerance(torch.float32, "cpu", rule, options)
    run_beside(rule, params, dict(options, lr=lr), lambda ps: torch_optimizer(rule, ps, **options), steps=4,
               generator=generator, rtol=rtol, atol=atol, before_step=change_lr)


def _change_group(step, group, lr_tensor):
    """The group value changed before `step`: each one a user may write between two steps (a
    repeated launch must see every one of them)."""
    if step == 2:
        group["lr"] *= 0.5
    elif step == 3 and "weight_decay" in group:
        group["weight_decay"] = 0.05
    elif step == 4:
        for key, value in (("betas", (0.8, 0.99)), ("alpha", 0.9), ("lr_decay", 0.01), ("momentum", 0.5)):
            if key in group and (key != "momentum" or group[key]):
                group[key] = value
    elif step == 5:
        group["maximize"] = not group["maximize"]
    elif step == 6:
        group["note"] = torch.ones(3)  # a value the step does not read, and not a plain number
    elif step == 7:
        lr_tensor.fill_(group["lr"])
        group["lr"] = lr_tensor
    elif step in (8, 9):
        group["lr"].mul_(0.5)
    elif step == 10:
        group["lr"] = float(group["lr"]) * 2
        del group["note"]


@pytest.mark.parametrize("rule, options", RICH, ids=map(case_id, RICH))
def test_every_change_to_a_group_between_steps_is_stepped_with(rule, options):
    """The numba buckets run the last launch again while the group's values are the same: an lr
    (a number, then a tensor changed in place, then a number again), weight decay, betas and the
    like, maximize, and a value the step ignores, changed between steps, give torch's steps."""
    generator = torch.Generator().manual_seed(13)
    params = make_params(torch.float32, "cpu", generator, odd_layouts=False)
    lr_tensors = [torch.zeros(()), torch.zeros(())]

    def change(step, fused, expected, fused_params, expected_params):
        for optimizer, lr_tensor in zip((fused, expected), lr_tensors):
            _change_group(step, optimizer.param_groups[0], lr_tensor)

    rtol, atol = tolerance(torch.float32, "cpu", rule, options)
    fused, _, _, _ = run_beside(rule, params, options, lambda ps: torch_optimizer(rule, ps, **options), steps=11,
                                generator=generator, rtol=rtol, atol=atol, before_step=change, check_every=1)
    assert on_cpu_kernels(fused)


def test_a_subclass_setting_group_values_in_its_step_is_stepped_with_them():
    """The kernels' numbers come from the group's values (the rule's spec): a subclass that sets
    them in its own step() is stepped with the values of each step, never with a repeated launch's."""
    class DecayingAdam(fusedopt.Adam):
        def step(self, closure=None):
            self.steps_taken = getattr(self, "steps_taken", 0) + 1
            for group in self.param_groups:
                group["lr"] = 1.0 / self.steps_taken
            return super().step(closure)

    p = torch.nn.Parameter(torch.zeros(64))
    optimizer = DecayingAdam([p], lr=1.0, backend="numba")
    for _ in range(3):
        p.grad = torch.ones(64)
        optimizer.step()
    # Adam's first steps on a constant grad move by the lr: 1 + 1/2 + 1/3
    torch.testing.assert_close(p.detach(), torch.full((64,), -(1 + 1 / 2 + 1 / 3)))


@pytest.mark.parametrize("rule", ["adamw", "sgd"])
def test_device_schedule_equals_host_schedule(rule):
    generator = torch.Generator().manual_seed(10)
    params = make_params(torch.float32, "cpu", generator, odd_layouts=False)
    schedule = schedules.join([schedules.linear_warmup(3), schedules.cosine_decay(5, floor=0.1)], boundaries=[3])
    fused_params, host_params = clone_params(params), clone_params(params)
    options = dict(STATEFUL[rule], lr=0.05)
    fused = OPTIMIZERS[rule][0](fused_params, backend="numba", schedule=schedule, schedule_steps=10, **options)
    host = OPTIMIZERS[rule][0](host_params, backend="torch", **options)
    scheduler = schedules.ScheduledLR(host, schedule)
    for _ in range(10):
        grads = make_grads(params, generator)
        assign_grads(fused_params, grads)
        assign_grads(host_params, grads)
        fused.step()
        host.step()
        scheduler.step()
    assert on_cpu_kernels(fused)
    assert_optimizers_match(fused, host, fused_params, host_params, rtol=1e-5, atol=1e-6, where="schedule")


@pytest.mark.parametrize("rule", RULES)
def test_master_weights_equal_the_plain_torch_path(rule):
    """bf16 params with fp32 masters (the update on the master, the param its rounding to nearest, ties away from zero,
    states in bf16): what the plain-torch path computes."""
    generator = torch.Generator().manual_seed(11)
    params = make_params(torch.bfloat16, "cpu", generator, odd_layouts=False)
    options = dict(STATEFUL[rule], lr=DEFAULT_LR[rule], master_weights=True)
    rtol, atol = tolerance(torch.bfloat16, "cpu", rule, options)
    fused, _, fused_params, _ = run_beside(
        rule, params, options, lambda ps: OPTIMIZERS[rule][0](ps, backend="torch", **options), steps=5,
        generator=generator, rtol=rtol, atol=atol)
    assert on_cpu_kernels(fused)
    for p in fused_params:
        assert torch.equal(p.detach(), split_master(fused.state[p]["master_param"])[0])


def stochastic_run(seed, threads=None):
    p = torch.ones(100_003, dtype=torch.bfloat16, requires_grad=True)
    optimizer = fusedopt.SGD([p], lr=1e-3, backend="numba", stochastic_rounding=True, rounding_seed=seed)
    results = []
    for _ in range(3):
        p.grad = torch.ones_like(p)
        optimizer.step()
        results.append(p.detach().clone())
    return results


def test_stochastic_rounding_is_unbiased_and_reproducible():
    """1 - 1e-3 lies between the bf16 neighbours 0.99609375 and 1: rounded to nearest, every element
    would stay at 1; stochastically, the mean is 0.999. The same seed gives the same bits, another
    seed others, and every step draws fresh ones."""
    first, again, other = stochastic_run(0), stochastic_run(0), stochastic_run(1)
    assert abs(first[0].double().mean().item() - 0.999) < 1e-4
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], other[0])
    changes = [(b != a).float().mean().item() for a, b in zip(first, first[1:])]
    assert all(change > 0.1 for change in changes)


# ---- never stale ----


def test_replaced_grads_params_and_state_stay_correct():
    generator = torch.Generator().manual_seed(12)
    params = make_params(torch.float32, "cpu", generator, odd_layouts=False)
    options = {"amsgrad": True, "weight_decay": 0.1}

    def change(step, fused, expected, fused_params, expected_params):
        if step == 3:  # new storage for a param
            for ps in (fused_params, expected_params):
                ps[2].data = ps[2].data.clone() * 0.5
        if step == 5:  # a state replaced by a new tensor
            for optimizer, ps in ((fused, fused_params), (expected, expected_params)):
                optimizer.state[ps[1]]["exp_avg"] = optimizer.state[ps[1]]["exp_avg"].clone() * 2
        if step == 7:  # a state's storage swapped in place
            for optimizer, ps in ((fused, fused_params), (expected, expected_params)):
                state = optimizer.state[ps[3]]["exp_avg_sq"]
                state.set_(state.clone())

    rtol, atol = tolerance(torch.float32, "cpu", "adam", options)
    fused, _, _, _ = run_beside("adam", params, options, lambda ps: torch_optimizer("adam", ps, **options),
                                generator=generator, rtol=rtol, atol=atol, before_step=change)
    assert on_cpu_kernels(fused)


def test_strided_param_goes_to_the_reference():
    base = torch.randn(10, 10)
    strided = base[:, ::2].clone().t()[::2].requires_grad_()  # not one dense span
    dense = torch.randn(7, requires_grad=True)
    strided.grad, dense.grad = torch.randn_like(strided), torch.randn_like(dense)
    copies = [strided.detach().clone().requires_grad_(), dense.detach().clone().requires_grad_()]
    copies[0].grad, copies[1].grad = strided.grad.clone(), dense.grad.clone()
    fused = fusedopt.Adam([strided, dense], lr=0.1, backend="numba")
    expected = torch.optim.Adam(copies, lr=0.1, foreach=False)
    fused.step()
    expected.step()
    plan = fused._plans[0]
    assert plan.reference_params == [strided]
    assert plan.buckets and plan.buckets[0].params == [dense]
    torch.testing.assert_close(strided, copies[0])
    torch.testing.assert_close(dense, copies[1])


# ---- threads ----


def stepped_at(threads):
    """The params after 3 steps of three numba buckets (odd sizes, bf16 with stochastic rounding)
    with torch (and so numba) at `threads` threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        generator = torch.Generator().manual_seed(13)
        params = [torch.randn(n, generator=generator, dtype=dtype).requires_grad_()
                  for n in (5, 4096 * 5 + 3, 100_000) for dtype in (torch.float32, torch.bfloat16)]
        optimizers = [fusedopt.AdamW(params[:2], lr=0.01, backend="numba", stochastic_rounding=True),
                      fusedopt.RMSprop(params[2:4], lr=0.01, centered=True, momentum=0.9, backend="numba"),
                      fusedopt.SGD(params[4:], lr=0.01, momentum=0.9, nesterov=True, backend="numba",
                                   stochastic_rounding=True)]
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=generator).to(p.dtype)
            for optimizer in optimizers:
                optimizer.step()
        return [p.detach() for p in params]
    finally:
        torch.set_num_threads(before)


def test_results_are_bitwise_the_same_at_1_and_2_threads():
    one, two = stepped_at(1), stepped_at(2)
    assert all(torch.equal(a, b) for a, b in zip(one, two))


FIRST_LAUNCH_SCRIPT = r"""
import numba, torch, fusedopt
torch.set_num_threads(1)
torch.get_num_threads()  # torch's OpenMP pool starts before numba's
param = torch.randn(100_000, requires_grad=True)
param.grad = torch.randn_like(param)
fusedopt.SGD([param], lr=0.1, backend="numba").step()
print(torch.get_num_threads(), numba.get_num_threads())
"""


def test_the_first_launch_keeps_torchs_thread_count_and_runs_at_it():
    """numba's OpenMP layer, started by the first launch, sets the OpenMP thread count it shares
    with torch: torch's own count (the user's torch.set_num_threads) is put back."""
    result = subprocess.run([sys.executable, "-c", FIRST_LAUNCH_SCRIPT], capture_output=True, text=True,
                            timeout=120, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["1", "1"]


CONCURRENT_SCRIPT = r"""
import threading, torch, fusedopt
def run(seed, results, barrier=None):
    generator = torch.Generator().manual_seed(seed)
    params = [torch.randn(n, generator=generator).requires_grad_() for n in (7, 50_000)]
    optimizer = fusedopt.Adam(params, lr=0.01, backend="numba")
    for _ in range(10):
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator)
        if barrier is not None:
            barrier.wait()
        optimizer.step()
    results[seed] = [p.detach() for p in params]
alone, together, barrier = {}, {}, threading.Barrier(2)
for seed in (0, 1):
    run(seed, alone)
threads = [threading.Thread(target=run, args=(seed, together, barrier)) for seed in (0, 1)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
assert all(torch.equal(a, b) for seed in (0, 1) for a, b in zip(alone[seed], together[seed]))
"""


def test_two_threads_stepping_at_once_get_their_own_results_on_any_threading_layer():
    """numba's workqueue layer (taken where neither OpenMP nor TBB loads) aborts the process when
    two threads run parallel code at once: the launches take turns."""
    env = {**os.environ, "NUMBA_THREADING_LAYER": "workqueue"}
    subprocess.run([sys.executable, "-c", CONCURRENT_SCRIPT], check=True, env=env, timeout=120, cwd=REPO_ROOT)


# ---- compiling ahead ----


def test_compiling_ahead_runs_every_kernel_side_by_side_and_succeeds(capsys):
    """python -m fusedopt.cpu (which tests/run.sh and bench/run.sh run, ignoring its exit status)
    compiles or loads every kernel on every dtype, one process per kernel where there are cores
    (its main, run here: the kernel processes it spawns import it afresh)."""
    from fusedopt.cpu import precompile

    assert precompile.main() == 0, capsys.readouterr().err[-3000:]
    out = capsys.readouterr().out.splitlines()
    kernels = [kernel for name in precompile.rule_specs() for kernel in precompile.kernels_of(name)]
    progress = [line for line in out if line.startswith("[")]
    # one line per kernel as it is done, the grad-norm reduction among them, then the total
    assert len(progress) == len(kernels) + 1 and progress[-1].startswith(f"[{len(kernels) + 1}/{len(kernels) + 1}]")
    assert any("grad-norm reduction" in line for line in progress) and any("adam (amsgrad)" in line for line in progress)
    assert "numba CPU kernels ready" in out[-1]


FIRST_USE = """
import torch, fusedopt
p = torch.nn.Parameter(torch.randn(10)); p.grad = torch.randn(10)
optimizer = fusedopt.SGD([p], lr=0.1, backend="numba")
for _ in range(3):
    optimizer.clip_grad_norm_(1.0)
    optimizer.step()
q = torch.nn.Parameter(torch.randn(4096)); q.grad = torch.randn(4096)
fusedopt.SGD([q], lr=0.1, momentum=0.9, state_precision="bf16", backend="numba").step()
"""


def test_a_first_compilation_says_so_in_one_line_and_nothing_else_prints(tmp_path):
    """A kernel's first compilation (numba's cache cold) prints one line on stderr: what, that it
    is once, how long, and how to compile ahead where `python -m fusedopt.cpu` compiles it (not
    kernels of bf16 or 8-bit states); a run that loads the kernels prints nothing."""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("FUSEDOPT_BACKEND", None)
    cold, warm = (subprocess.run([sys.executable, "-c", FIRST_USE], env=env, capture_output=True, text=True,
                                 timeout=300, cwd=REPO_ROOT) for _ in range(2))
    assert cold.returncode == 0 and warm.returncode == 0, cold.stderr[-3000:] + warm.stderr[-3000:]
    lines = cold.stderr.splitlines()
    assert [line.split(" at its first use")[0] for line in lines] == [
        "fusedopt: compiling the CPU kernel of sgd for float32 params",
        "fusedopt: compiling the CPU grad-norm reduction for float32 grads",
        "fusedopt: compiling the CPU kernel of sgd (momentum_buffer in bf16) for float32 params"], cold.stderr
    assert all("once" in line and line.endswith(" s") for line in lines)
    assert ["python -m fusedopt.cpu" in line for line in lines] == [True, True, False]
    assert cold.stdout == warm.stdout == warm.stderr == ""


# ---- without numba ----


def test_missing_numba_warns_once_and_uses_the_reference(monkeypatch):
    from fusedopt import cpu

    monkeypatch.setattr(cpu, "_kernels", None)
    monkeypatch.setitem(sys.modules, "numba", None)  # `import numba` raises ImportError
    params = [torch.randn(6, requires_grad=True)]
    copies = [params[0].detach().clone().requires_grad_()]
    params[0].grad, copies[0].grad = torch.ones(6), torch.ones(6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fused = fusedopt.Adam(params, lr=0.1)
        fused.step()
        fused.step()
    messages = [str(w.message) for w in caught if "numba" in str(w.message)]
    assert len(messages) == 1 and "reference" in messages[0]
    assert not fused._plans[0].buckets
    expected = torch.optim.Adam(copies, lr=0.1, foreach=False)
    expected.step()
    expected.step()
    torch.testing.assert_close(params[0], copies[0])
