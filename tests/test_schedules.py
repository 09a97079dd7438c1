"""fusedopt.schedules: closed forms, torch and transformers equivalence, resume, plotting, CLI."""
import dataclasses
import io
import math
import os
import runpy
import pickle
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch.optim import lr_scheduler as torch_lr

from fusedopt import schedules as S
from helpers import NAMES, oracle_class
from fusedopt.schedules.__main__ import main as cli_main

REPO_ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------ helpers


def make_optimizer(lrs=(0.1,), cls=torch.optim.SGD, **kwargs):
    """An optimizer with one small parameter per param group, lrs as given."""
    torch.manual_seed(0)
    groups = [{"params": [torch.nn.Parameter(torch.randn(3))], "lr": lr} for lr in lrs]
    return cls(groups, **kwargs)


def run_lrs(optimizer, scheduler, steps):
    """The lrs of every group at steps 0..steps-1: read, then opt.step() and sched.step()."""
    history = []
    for _ in range(steps):
        history.append([group["lr"] for group in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    return history


def quiet(build):
    """Build torch schedulers without their deprecation chatter."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build()


def png_size(path):
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def assert_close_sequences(actual, expected, rel=1e-9, abs=1e-14):
    assert len(actual) == len(expected)
    for step, (got, want) in enumerate(zip(actual, expected)):
        assert got == pytest.approx(want, rel=rel, abs=abs), f"step {step}: {got} != {want}"


# ------------------------------------------------------- closed forms, written from the equations


def cosine_restarts_reference(t, period, mult, floor):
    start, length = 0, period
    while t >= start + length:
        start, length = start + length, length * mult
    return floor + (1 - floor) * (1 + math.cos(math.pi * (t - start) / length)) / 2


def one_cycle_linear_reference(t, total, pct, div, final_div):
    initial, final = 1 / div, 1 / div / final_div
    peak = pct * total - 1
    t = min(t, total - 1)
    if t <= peak:
        return initial + (1 - initial) * t / peak
    return 1 + (final - 1) * (t - peak) / (total - 1 - peak)


CLOSED_FORMS = {
    "linear_warmup": (
        S.linear_warmup(10, start=0.2),
        lambda t: 0.2 + 0.8 * t / 10 if t < 10 else 1.0,
        [0, 1, 5, 9, 10, 11, 1000],
    ),
    "exponential_warmup": (
        S.exponential_warmup(8, start=0.05),
        lambda t: 0.05 * (1 / 0.05) ** (t / 8) if t < 8 else 1.0,
        [0, 1, 4, 7, 8, 9, 500],
    ),
    "constant_warmup": (
        S.constant_warmup(5, factor=0.3),
        lambda t: 0.3 if t < 5 else 1.0,
        [0, 4, 5, 6, 100],
    ),
    "constant": (S.constant(0.7), lambda t: 0.7, [0, 1, 10**6]),
    "step_decay": (S.step_decay(7, gamma=0.5), lambda t: 0.5 ** (t // 7), [0, 6, 7, 13, 14, 70]),
    "multistep_decay": (
        S.multistep_decay([10, 3, 10], gamma=0.1),
        lambda t: 0.1 ** sum(m <= t for m in (3, 10, 10)),
        [0, 2, 3, 9, 10, 11, 100],
    ),
    "exponential_decay": (S.exponential_decay(0.9), lambda t: 0.9**t, [0, 1, 2, 50, 400]),
    "exponential_decay_floor": (
        S.exponential_decay(0.9, floor=0.2),
        lambda t: max(0.2, 0.9**t),
        [0, 10, 15, 16, 200],
    ),
    "linear_decay": (
        S.linear_decay(20, floor=0.1),
        lambda t: 0.1 + 0.9 * max(0.0, 1 - t / 20),
        [0, 1, 10, 19, 20, 21, 300],
    ),
    "polynomial_decay": (
        S.polynomial_decay(20, power=2.0, floor=0.05),
        lambda t: 0.05 + 0.95 * (1 - min(t, 20) / 20) ** 2,
        [0, 1, 10, 19, 20, 21, 300],
    ),
    "cosine_decay": (
        S.cosine_decay(30, floor=0.1),
        lambda t: 0.1 + 0.9 * (1 + math.cos(math.pi * min(t, 30) / 30)) / 2,
        [0, 1, 15, 29, 30, 31, 45, 60, 1000],
    ),
    "cosine_restarts": (
        S.cosine_restarts(10, period_mult=2, floor=0.05),
        lambda t: cosine_restarts_reference(t, 10, 2, 0.05),
        [0, 5, 9, 10, 11, 29, 30, 31, 69, 70, 150, 151],
    ),
    "cosine_restarts_constant_period": (
        S.cosine_restarts(6),
        lambda t: cosine_restarts_reference(t, 6, 1, 0.0),
        [0, 5, 6, 7, 12, 601],
    ),
    "inverse_sqrt_decay": (
        S.inverse_sqrt_decay(100),
        lambda t: math.sqrt(100 / (t + 100)),
        [0, 1, 100, 300, 10_000],
    ),
    "transformer_schedule": (
        S.transformer_schedule(512, warmup_steps=4000),
        lambda t: 512**-0.5 * min(t**-0.5, t * 4000**-1.5) if t else 0.0,
        [0, 1, 2000, 3999, 4000, 4001, 100_000],
    ),
    "one_cycle_linear": (
        S.one_cycle(100, pct_start=0.25, anneal="linear"),
        lambda t: one_cycle_linear_reference(t, 100, 0.25, 25.0, 1e4),
        [0, 1, 23, 24, 25, 60, 98, 99, 100, 250],
    ),
    "join": (
        S.join([S.linear_warmup(4), S.cosine_decay(10), S.constant(0.0)], boundaries=[4, 14]),
        lambda t: t / 4 if t < 4 else (1 + math.cos(math.pi * (t - 4) / 10)) / 2 if t < 14 else 0.0,
        [0, 3, 4, 5, 13, 14, 15, 99],
    ),
}


@pytest.mark.parametrize("name", list(CLOSED_FORMS))
def test_schedule_matches_its_closed_form_at_boundaries_and_beyond(name):
    schedule, formula, steps = CLOSED_FORMS[name]
    for step in steps:
        assert schedule(step) == pytest.approx(formula(step), rel=1e-12, abs=1e-15), step


def test_schedules_return_python_floats():
    assert all(type(schedule(3)) is float for schedule, _, _ in CLOSED_FORMS.values())


def test_join_counts_each_phase_from_its_boundary():
    schedule = S.join([S.constant(0.5), S.step_decay(2, gamma=0.1)], boundaries=[10])
    assert [schedule(step) for step in (9, 10, 11, 12)] == pytest.approx([0.5, 1.0, 1.0, 0.1])


def test_join_skips_a_phase_between_equal_boundaries():
    schedule = S.join([S.constant(0.1), S.constant(0.2), S.constant(0.3)], boundaries=[5, 5])
    assert (schedule(4), schedule(5)) == (0.1, 0.3)


def test_join_length_is_the_last_boundary_plus_the_last_phase():
    assert S.join([S.linear_warmup(5), S.cosine_decay(95)], boundaries=[5]).length == 100
    assert S.join([S.linear_warmup(5), S.inverse_sqrt_decay(5)], boundaries=[5]).length is None


def test_schedules_are_frozen_hashable_and_picklable():
    schedule = S.join([S.linear_warmup(5), S.multistep_decay([10, 20])], boundaries=[5])
    with pytest.raises(dataclasses.FrozenInstanceError):
        schedule.boundaries = (6,)
    assert pickle.loads(pickle.dumps(schedule)) == schedule
    assert hash(schedule) == hash(S.join([S.linear_warmup(5), S.multistep_decay([20, 10])], [5]))


@pytest.mark.parametrize("step", [-1, -0.5, float("nan")])
def test_negative_or_nan_step_raises_value_error_naming_step(step):
    with pytest.raises(ValueError, match="step"):
        S.cosine_decay(10)(step)


BAD_SCHEDULES = {
    "steps": lambda: S.linear_warmup(-1),
    "start": lambda: S.linear_warmup(10, start=1.5),
    "start ": lambda: S.exponential_warmup(10, start=0.0),
    "factor": lambda: S.constant_warmup(10, factor=-0.1),
    "step_size": lambda: S.step_decay(0),
    "milestones": lambda: S.multistep_decay([3, -1]),
    "gamma": lambda: S.exponential_decay(0.0),
    "floor": lambda: S.cosine_decay(10, floor=1.5),
    "power": lambda: S.polynomial_decay(10, power=0.0),
    "period": lambda: S.cosine_restarts(0),
    "period_mult": lambda: S.cosine_restarts(10, period_mult=0),
    "timescale": lambda: S.inverse_sqrt_decay(0),
    "d_model": lambda: S.transformer_schedule(0),
    "warmup_steps": lambda: S.transformer_schedule(512, warmup_steps=0),
    "anneal": lambda: S.one_cycle(100, anneal="cubic"),
    "pct_start": lambda: S.one_cycle(100, pct_start=1.5),
    "boundaries": lambda: S.join([S.constant(), S.constant()], boundaries=[]),
    "boundaries ": lambda: S.join([S.constant()] * 3, boundaries=[5, 3]),
    "boundaries  ": lambda: S.join([S.constant()] * 2, boundaries=[-1]),
    "schedules": lambda: S.join([], boundaries=[]),
}


@pytest.mark.parametrize("argument", list(BAD_SCHEDULES))
def test_bad_schedule_argument_raises_value_error_naming_it(argument):
    with pytest.raises(ValueError, match=argument.strip()):
        BAD_SCHEDULES[argument]()


BAD_HELPER_CALLS = {
    "warmup_steps": lambda opt: S.warmup_cosine(opt, warmup_steps=-1, total_steps=10),
    "total_steps": lambda opt: S.warmup_linear(opt, warmup_steps=0, total_steps=-5),
    "warmup_steps ": lambda opt: S.warmup_cosine(opt, warmup_steps=20, total_steps=10),
    "total_steps ": lambda opt: S.warmup_inverse_sqrt(opt, warmup_steps=20, total_steps=10),
    "min_lr": lambda opt: S.warmup_cosine(opt, warmup_steps=1, total_steps=10, min_lr=0.5),
    "min_lr ": lambda opt: S.warmup_linear(opt, warmup_steps=1, total_steps=10, min_lr=-1e-3),
    "d_model": lambda opt: S.transformer(opt, warmup_steps=10, d_model=-1),
    "schedule": lambda opt: S.ScheduledLR(opt, [S.constant(), S.constant()]),
    "last_epoch": lambda opt: S.ScheduledLR(opt, S.constant(), last_epoch=-5),
}


@pytest.mark.parametrize("argument", list(BAD_HELPER_CALLS))
def test_bad_helper_argument_raises_value_error_naming_it(argument):
    with pytest.raises(ValueError, match=argument.strip()):
        BAD_HELPER_CALLS[argument](make_optimizer(lrs=(0.1,)))


def test_min_lr_is_checked_against_every_param_group():
    optimizer = make_optimizer(lrs=(0.1, 0.001))
    with pytest.raises(ValueError, match="min_lr.*param group 1"):
        S.warmup_cosine(optimizer, warmup_steps=1, total_steps=10, min_lr=0.01)


def test_unknown_recipe_name_raises_value_error_naming_name():
    with pytest.raises(ValueError, match="name must be one of .*warmup_cosine"):
        S.from_name("warmup_cosin", warmup_steps=1, total_steps=10)


# --------------------------------------------------------- transformers' formulas, written out


def hf_cosine(step, warmup, total, num_cycles=0.5, min_lr_rate=0.0):
    if step < warmup:
        return float(step) / float(max(1, warmup))
    progress = float(step - warmup) / float(max(1, total - warmup))
    factor = 0.5 * (1.0 + math.cos(math.pi * float(num_cycles) * 2.0 * progress))
    return max(0.0, factor * (1 - min_lr_rate) + min_lr_rate)


def hf_linear(step, warmup, total):
    if step < warmup:
        return float(step) / float(max(1, warmup))
    return max(0.0, float(total - step) / float(max(1, total - warmup)))


def hf_constant(step, warmup):
    if step < warmup:
        return float(step) / float(max(1.0, warmup))
    return 1.0


def hf_inverse_sqrt(step, warmup, timescale=None):
    if timescale is None:
        timescale = warmup or 10_000
    if step < warmup:
        return float(step) / float(max(1, warmup))
    return 1.0 / math.sqrt((step + timescale - warmup) / timescale)


RUNS = [(0, 40), (1, 7), (10, 100), (25, 25), (30, 31), (100, 1000)]


@pytest.mark.parametrize("warmup, total", RUNS)
def test_warmup_cosine_equals_transformers_numbers(warmup, total):
    optimizer = make_optimizer(lrs=(1.0,))
    scheduler = S.warmup_cosine(optimizer, warmup_steps=warmup, total_steps=total)
    lrs = run_lrs(optimizer, scheduler, total + 1)
    assert [lr for (lr,) in lrs] == [hf_cosine(step, warmup, total) for step in range(total + 1)]


@pytest.mark.parametrize("warmup, total", RUNS)
def test_warmup_linear_equals_transformers_numbers(warmup, total):
    optimizer = make_optimizer(lrs=(1.0,))
    steps = total + 20  # transformers' linear decay stays at 0 past the end, and so does ours
    scheduler = S.warmup_linear(optimizer, warmup_steps=warmup, total_steps=total)
    lrs = run_lrs(optimizer, scheduler, steps)
    assert [lr for (lr,) in lrs] == [hf_linear(step, warmup, total) for step in range(steps)]


def test_warmup_cosine_equals_lambda_lr_with_transformers_lambda_at_any_lr():
    ours_opt, torch_opt = make_optimizer(lrs=(3e-4, 7e-3)), make_optimizer(lrs=(3e-4, 7e-3))
    ours = S.warmup_cosine(ours_opt, warmup_steps=50, total_steps=400)
    theirs = torch_lr.LambdaLR(torch_opt, lambda step: hf_cosine(step, 50, 400))
    assert run_lrs(ours_opt, ours, 401) == run_lrs(torch_opt, theirs, 401)


def test_warmup_cosine_with_min_lr_equals_transformers_min_lr_variant():
    optimizer = make_optimizer(lrs=(1.0,))
    scheduler = S.warmup_cosine(optimizer, warmup_steps=10, total_steps=90, min_lr=0.125)
    lrs = [lr for (lr,) in run_lrs(optimizer, scheduler, 91)]
    assert lrs == [hf_cosine(step, 10, 90, min_lr_rate=0.125) for step in range(91)]


@pytest.mark.parametrize("warmup", [0, 1, 10])
def test_warmup_constant_equals_transformers_numbers(warmup):
    optimizer = make_optimizer(lrs=(1.0,))
    lrs = run_lrs(optimizer, S.warmup_constant(optimizer, warmup_steps=warmup), 30)
    assert [lr for (lr,) in lrs] == [hf_constant(step, warmup) for step in range(30)]


@pytest.mark.parametrize("warmup, timescale", [(0, None), (10, None), (10, 50)])
def test_warmup_inverse_sqrt_equals_transformers_numbers(warmup, timescale):
    optimizer = make_optimizer(lrs=(1.0,))
    scheduler = S.warmup_inverse_sqrt(optimizer, warmup_steps=warmup, timescale=timescale)
    lrs = [lr for (lr,) in run_lrs(optimizer, scheduler, 200)]
    assert lrs == [hf_inverse_sqrt(step, warmup, timescale) for step in range(200)]


def test_warmup_cosine_scales_each_group_and_ends_at_min_lr():
    optimizer = make_optimizer(lrs=(0.1, 0.01))
    scheduler = S.warmup_cosine(optimizer, warmup_steps=5, total_steps=50, min_lr=1e-3)
    lrs = run_lrs(optimizer, scheduler, 60)
    for group, base in enumerate((0.1, 0.01)):
        floor = 1e-3 / base
        expected = [base * hf_cosine(step, 5, 50, min_lr_rate=floor) for step in range(51)]
        assert_close_sequences([row[group] for row in lrs[:51]], expected)
        assert [row[group] for row in lrs[50:]] == pytest.approx([1e-3] * 10)


def test_warmup_cosine_stays_at_min_lr_past_total_steps():
    optimizer = make_optimizer(lrs=(1.0,))
    scheduler = S.warmup_cosine(optimizer, warmup_steps=2, total_steps=10)
    assert [lr for (lr,) in run_lrs(optimizer, scheduler, 30)][10:] == [0.0] * 20


def test_transformer_helper_scales_the_paper_formula_by_the_base_lr():
    optimizer = make_optimizer(lrs=(2.0,))
    scheduler = S.transformer(optimizer, warmup_steps=40, d_model=64)
    lrs = [lr for (lr,) in run_lrs(optimizer, scheduler, 120)]
    expected = [2.0 * 64**-0.5 * min(t**-0.5, t * 40**-1.5) if t else 0.0 for t in range(120)]
    assert_close_sequences(lrs, expected, rel=1e-12)


# ---------------------------------------------------------------- equivalence with torch classes


def compare_with_torch(schedule, build_torch, steps, lrs=(0.5, 0.05)):
    ours_opt = make_optimizer(lrs=lrs)
    ours = run_lrs(ours_opt, S.ScheduledLR(ours_opt, schedule), steps)
    torch_opt = make_optimizer(lrs=lrs)
    theirs = run_lrs(torch_opt, quiet(lambda: build_torch(torch_opt)), steps)
    for group in range(len(lrs)):
        assert_close_sequences([r[group] for r in ours], [r[group] for r in theirs])


def test_linear_warmup_then_cosine_equals_sequential_linear_and_cosine_annealing():
    # eta_min is absolute in torch: the same floor factor for every group needs one base lr.
    compare_with_torch(
        S.join([S.linear_warmup(10, start=0.1), S.cosine_decay(50, floor=0.01)], boundaries=[10]),
        lambda opt: torch_lr.SequentialLR(
            opt,
            [
                torch_lr.LinearLR(opt, start_factor=0.1, total_iters=10),
                torch_lr.CosineAnnealingLR(opt, T_max=50, eta_min=0.005),
            ],
            milestones=[10],
        ),
        steps=61,
        lrs=(0.5,),
    )


def test_step_decay_equals_step_lr():
    compare_with_torch(
        S.step_decay(7, gamma=0.5), lambda opt: torch_lr.StepLR(opt, step_size=7, gamma=0.5), 60
    )


def test_exponential_decay_equals_exponential_lr():
    compare_with_torch(
        S.exponential_decay(0.95), lambda opt: torch_lr.ExponentialLR(opt, gamma=0.95), 80
    )


def test_multistep_decay_equals_multistep_lr():
    compare_with_torch(
        S.multistep_decay([5, 12, 12, 30], gamma=0.3),
        lambda opt: torch_lr.MultiStepLR(opt, milestones=[5, 12, 12, 30], gamma=0.3),
        50,
    )


def test_polynomial_decay_equals_polynomial_lr():
    compare_with_torch(
        S.polynomial_decay(40, power=1.7),
        lambda opt: torch_lr.PolynomialLR(opt, total_iters=40, power=1.7),
        60,
    )


def test_cosine_decay_equals_cosine_annealing_lr_up_to_t_max():
    compare_with_torch(
        S.cosine_decay(40, floor=0.02),
        lambda opt: torch_lr.CosineAnnealingLR(opt, T_max=40, eta_min=0.01),
        41,
        lrs=(0.5,),
    )


def test_cosine_restarts_equals_cosine_annealing_warm_restarts():
    compare_with_torch(
        S.cosine_restarts(5, period_mult=2, floor=0.02),
        lambda opt: torch_lr.CosineAnnealingWarmRestarts(opt, T_0=5, T_mult=2, eta_min=0.01),
        80,
        lrs=(0.5,),
    )


def test_linear_warmup_equals_linear_lr():
    compare_with_torch(
        S.linear_warmup(12, start=0.25),
        lambda opt: torch_lr.LinearLR(opt, start_factor=0.25, total_iters=12),
        30,
    )


def test_constant_warmup_equals_constant_lr():
    compare_with_torch(
        S.constant_warmup(6, factor=0.25),
        lambda opt: torch_lr.ConstantLR(opt, factor=0.25, total_iters=6),
        20,
    )


@pytest.mark.parametrize("anneal, three_phase", [("cos", False), ("linear", False), ("cos", True)])
def test_one_cycle_equals_one_cycle_lr(anneal, three_phase):
    compare_with_torch(
        S.one_cycle(100, pct_start=0.3, anneal=anneal, three_phase=three_phase),
        lambda opt: torch_lr.OneCycleLR(
            opt,
            max_lr=[0.5, 0.05],
            total_steps=100,
            pct_start=0.3,
            anneal_strategy=anneal,
            three_phase=three_phase,
            cycle_momentum=False,
        ),
        100,
    )


# ----------------------------------------------------------------------- the LRScheduler contract


def test_construction_sets_the_lrs_of_step_zero():
    optimizer = make_optimizer(lrs=(0.1, 0.2))
    scheduler = S.ScheduledLR(optimizer, S.constant_warmup(3, factor=0.5))
    assert [group["lr"] for group in optimizer.param_groups] == pytest.approx([0.05, 0.1])
    assert scheduler.get_last_lr() == pytest.approx([0.05, 0.1])
    assert scheduler.base_lrs == [0.1, 0.2]


def test_each_param_group_can_have_its_own_schedule():
    optimizer = make_optimizer(lrs=(0.1, 0.01))
    scheduler = S.ScheduledLR(optimizer, [S.cosine_decay(10), S.step_decay(3, gamma=0.5)])
    lrs = run_lrs(optimizer, scheduler, 12)
    cosine = S.cosine_decay(10)
    assert [row[0] for row in lrs] == pytest.approx([0.1 * cosine(t) for t in range(12)])
    assert [row[1] for row in lrs] == pytest.approx([0.01 * 0.5 ** (t // 3) for t in range(12)])


def test_any_callable_can_be_a_schedule():
    optimizer = make_optimizer(lrs=(0.5,))
    scheduler = S.ScheduledLR(optimizer, lambda step: 1 / (1 + step))
    assert [lr for (lr,) in run_lrs(optimizer, scheduler, 4)] == [0.5, 0.25, 0.5 / 3, 0.125]


def test_get_last_lr_follows_the_optimizer_lrs():
    optimizer = make_optimizer(lrs=(0.3, 0.03))
    scheduler = S.warmup_linear(optimizer, warmup_steps=3, total_steps=9)
    for _ in range(5):
        optimizer.step()
        scheduler.step()
        assert scheduler.get_last_lr() == [group["lr"] for group in optimizer.param_groups]


def test_step_with_an_epoch_jumps_to_that_step():
    optimizer = make_optimizer(lrs=(0.5,))
    scheduler = S.ScheduledLR(optimizer, S.cosine_decay(100))
    optimizer.step()
    with pytest.warns(UserWarning):
        scheduler.step(37)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.5 * S.cosine_decay(100)(37))


def test_last_epoch_resumes_at_the_next_step():
    optimizer = make_optimizer(lrs=(0.5,))
    optimizer.param_groups[0]["initial_lr"] = 0.5
    S.ScheduledLR(optimizer, S.exponential_decay(0.9), last_epoch=9)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.5 * 0.9**10)


def test_sgd_applies_the_scheduled_lr_at_every_step():
    parameter = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    optimizer = torch.optim.SGD([parameter], lr=0.2)
    scheduler = S.warmup_cosine(optimizer, warmup_steps=4, total_steps=20)
    for step in range(25):
        before = parameter.item()
        parameter.grad = torch.ones(1, dtype=torch.float64)
        optimizer.step()
        assert before - parameter.item() == pytest.approx(0.2 * hf_cosine(min(step, 20), 4, 20))
        scheduler.step()


def test_mixes_with_torch_sequential_lr_as_first_scheduler():
    optimizer = make_optimizer(lrs=(0.4,))
    scheduler = quiet(
        lambda: torch_lr.SequentialLR(
            optimizer,
            [S.ScheduledLR(optimizer, S.linear_warmup(5)), torch_lr.ExponentialLR(optimizer, 0.9)],
            milestones=[5],
        )
    )
    lrs = [lr for (lr,) in run_lrs(optimizer, scheduler, 15)]
    expected = [0.4 * t / 5 if t < 5 else 0.4 * 0.9 ** (t - 5) for t in range(15)]
    assert_close_sequences(lrs, expected)


def test_mixes_with_torch_sequential_lr_as_later_scheduler():
    optimizer = make_optimizer(lrs=(0.4,))
    scheduler = quiet(
        lambda: torch_lr.SequentialLR(
            optimizer,
            [
                torch_lr.ConstantLR(optimizer, factor=0.1, total_iters=5),
                S.ScheduledLR(optimizer, S.cosine_decay(10)),
            ],
            milestones=[5],
        )
    )
    lrs = [lr for (lr,) in run_lrs(optimizer, scheduler, 18)]
    expected = [0.04 if t < 5 else 0.4 * S.cosine_decay(10)(t - 5) for t in range(18)]
    assert_close_sequences(lrs, expected)


# ------------------------------------------------------------------------------------- resuming


def build_training(lrs=(1e-2, 1e-3)):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.Adam(
        [{"params": [model.weight], "lr": lrs[0]}, {"params": [model.bias], "lr": lrs[1]}]
    )
    scheduler = S.warmup_cosine(optimizer, warmup_steps=30, total_steps=180, min_lr=1e-4)
    return model, optimizer, scheduler


def train(model, optimizer, scheduler, steps, start):
    lrs = []
    for step in range(start, start + steps):
        generator = torch.Generator().manual_seed(step)
        x = torch.randn(8, 4, generator=generator)
        loss = model(x).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        lrs.append(scheduler.get_last_lr())
    return lrs


def test_resume_from_a_checkpoint_gives_the_uninterrupted_sequence():
    model, optimizer, scheduler = build_training()
    uninterrupted = train(model, optimizer, scheduler, 200, start=0)

    model, optimizer, scheduler = build_training()
    first = train(model, optimizer, scheduler, 100, start=0)
    buffer = io.BytesIO()
    states = {"model": model, "opt": optimizer, "sched": scheduler}
    torch.save({key: value.state_dict() for key, value in states.items()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)  # plain data only: no pickled schedules

    model, optimizer, scheduler = build_training()
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["opt"])
    scheduler.load_state_dict(checkpoint["sched"])
    resumed = train(model, optimizer, scheduler, 100, start=100)

    assert first + resumed == uninterrupted


def test_state_dict_holds_the_step_counter_but_no_schedules():
    optimizer = make_optimizer()
    scheduler = S.ScheduledLR(optimizer, S.cosine_decay(10))
    run_lrs(optimizer, scheduler, 4)
    state = scheduler.state_dict()
    assert state["last_epoch"] == 4
    assert "schedules" not in state and "optimizer" not in state


# ------------------------------------------------------------ fusedopt's optimizers, both backends


def triton_runnable():
    return os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()


def fusedopt_class(name):
    fusedopt = pytest.importorskip("fusedopt")
    if not hasattr(fusedopt, "Adam"):
        pytest.skip("fusedopt's optimizers are not importable")
    return getattr(fusedopt, name)


@pytest.mark.parametrize(
    "backend",
    [
        "torch",
        pytest.param(
            "triton",
            marks=pytest.mark.skipif(
                not triton_runnable(), reason="needs CUDA or TRITON_INTERPRET=1 for CPU tensors"
            ),
        ),
    ],
)
@pytest.mark.parametrize("name", NAMES)
class TestFusedoptOptimizers:
    def test_scheduled_run_matches_torch_optim_with_the_same_schedule(self, name, backend):
        cls = fusedopt_class(name)
        device = "cpu"
        if backend == "triton":
            pytest.importorskip("triton")
            if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
                device = "cuda"
        start = torch.linspace(-1, 1, 7, device=device)
        ours_param = torch.nn.Parameter(start.clone())
        torch_param = torch.nn.Parameter(start.clone())
        ours_opt = cls([ours_param], lr=0.05, backend=backend)
        torch_opt = oracle_class(name)([torch_param], lr=0.05)
        ours = S.warmup_cosine(ours_opt, warmup_steps=3, total_steps=10, min_lr=1e-3)
        theirs = S.warmup_cosine(torch_opt, warmup_steps=3, total_steps=10, min_lr=1e-3)
        for step in range(12):
            grad = torch.sin(start * (step + 1))
            ours_param.grad, torch_param.grad = grad.clone(), grad.clone()
            ours_opt.step()
            torch_opt.step()
            ours.step()
            theirs.step()
            assert ours.get_last_lr() == theirs.get_last_lr()
        torch.testing.assert_close(ours_param.detach(), torch_param.detach(), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------ plotting and CLI


def test_plot_writes_a_png_of_the_requested_size(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "lr.png"
    schedule = S.join([S.linear_warmup(50), S.cosine_decay(950)], boundaries=[50])
    schedule.plot(path=path, size=(321, 123))
    assert path.stat().st_size > 0
    assert png_size(path) == (321, 123)


def test_plot_draws_on_a_given_axes():
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    ax = Figure().subplots()
    assert S.cosine_decay(100).plot(ax=ax, base_lr=0.1) is ax
    line = ax.lines[0]
    assert len(line.get_xdata()) == 101 and max(line.get_ydata()) == pytest.approx(0.1)


def test_scheduler_plot_draws_every_group_without_stepping(tmp_path):
    pytest.importorskip("matplotlib")
    optimizer = make_optimizer(lrs=(0.1, 0.01))
    scheduler = S.warmup_linear(optimizer, warmup_steps=10, total_steps=100)
    ax = scheduler.plot(path=tmp_path / "groups.png")
    assert len(ax.lines) == 2 and scheduler.last_epoch == 0
    assert png_size(tmp_path / "groups.png") == (800, 500)


def test_plot_without_an_end_needs_total_steps():
    with pytest.raises(ValueError, match="total_steps"):
        S.exponential_decay(0.9).plot()


def test_plot_without_matplotlib_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"pip install fusedopt\[plot\]"):
        S.cosine_decay(10).plot(path=tmp_path / "never.png")


def test_cli_plot_writes_a_png_of_the_requested_size(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    path = tmp_path / "lr.png"
    argv = ["plot", "warmup_cosine", "--warmup-steps", "500", "--total-steps", "20000"]
    argv += ["--lr", "3e-4", "--min-lr", "1e-5", "--width", "640", "--height", "360"]
    argv += ["-o", str(path)]
    assert cli_main(argv) == 0
    assert path.stat().st_size > 0 and png_size(path) == (640, 360)
    assert str(path) in capsys.readouterr().out


def test_cli_unknown_name_raises_value_error_naming_the_argument(tmp_path):
    with pytest.raises(ValueError, match="name") as error:
        cli_main(["plot", "warmup_cosin", "--total-steps", "10", "-o", str(tmp_path / "x.png")])
    assert "warmup_cosin" in str(error.value) and all(name in str(error.value) for name in S.RECIPES)


def test_cli_bad_argument_raises_value_error_naming_it(tmp_path):
    with pytest.raises(ValueError, match="warmup_steps"):
        cli_main(
            ["plot", "warmup_linear", "--warmup-steps", "50", "--total-steps", "10"]
            + ["-o", str(tmp_path / "x.png")]
        )


def test_cli_program_exits_2_on_an_unknown_name(tmp_path, monkeypatch, capsys):
    """The program as `python -m fusedopt.schedules` runs it (its __main__ module), in this process."""
    argv = ["plot", "warmup_cosin", "--total-steps", "10", "-o", str(tmp_path / "x.png")]
    monkeypatch.setattr(sys, "argv", ["python -m fusedopt.schedules", *argv])
    monkeypatch.delitem(sys.modules, "fusedopt.schedules.__main__", raising=False)  # run afresh, as -m does
    with pytest.raises(SystemExit) as exited:
        runpy.run_module("fusedopt.schedules", run_name="__main__", alter_sys=True)
    assert exited.value.code == 2
    stderr = capsys.readouterr().err
    assert "warmup_cosin" in stderr and "warmup_cosine" in stderr
    assert not (tmp_path / "x.png").exists()


def test_cli_runs_as_a_module(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "lr.png"
    python_path = os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])
    command = [sys.executable, "-m", "fusedopt.schedules", "plot", "transformer"]
    command += ["--warmup-steps", "400", "--total-steps", "2000"]
    command += ["--width", "300", "--height", "200", "-o", str(path)]
    result = subprocess.run(
        command,
        cwd=tmp_path,
        env=dict(os.environ, PYTHONPATH=python_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert png_size(path) == (300, 200)
