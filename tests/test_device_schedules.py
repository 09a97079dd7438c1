"""Schedules evaluated by the kernels (`schedule=`): the same run as driving the schedule from the
host with ScheduledLR, for every rule and backend, with the count saved in checkpoints, advanced by
skipped AMP steps, and a captured CUDA graph replaying a whole scheduled run where CUDA exists."""
import copy
import math

import pytest
import torch

import fusedopt
from fusedopt import schedules
from fusedopt.kernels import launch_count
from fusedopt.registry import RULES as REGISTRY
from helpers import assign_grads, capture_cuda_graph, fill_static_grads, make_grads, make_params

from conftest import kernels_runnable

RULES = {name: (info.optimizer, info.richest[0]) for name, info in REGISTRY.items()}
SHAPES = [(7,), (33, 17), (4097,)]
# 3 warmup steps, then a cosine to 10% over 6 steps, held after: 12 steps see every part.
WARMUP_COSINE = schedules.join([schedules.linear_warmup(3), schedules.cosine_decay(6, floor=0.1)], [3])
STEPS = 12


def twin_runs(rule, backend, device, dtype=torch.float32, schedule=WARMUP_COSINE, seed=0, **extra):
    """(device-scheduled optimizer, its params, host-scheduled optimizer, its params, host scheduler)."""
    if backend == "triton" and not kernels_runnable(device):
        pytest.skip("the kernels need CUDA or TRITON_INTERPRET=1")
    optimizer_class, options = RULES[rule]
    generator = torch.Generator().manual_seed(seed)
    params = make_params(dtype, device, generator, shapes=SHAPES, odd_layouts=False, complex_params=False)
    twins = [p.detach().clone().requires_grad_() for p in params]
    scheduled = optimizer_class(params, lr=0.05, backend=backend, schedule=schedule, **options, **extra)
    driven = optimizer_class(twins, lr=0.05, backend=backend, **options)
    return scheduled, params, driven, twins, schedules.ScheduledLR(driven, schedule), generator


def step_both(scheduled, params, driven, twins, host_scheduler, generator):
    grads = make_grads(params, generator)
    assign_grads(params, grads)
    assign_grads(twins, [g.clone() for g in grads])
    scheduled.step()
    driven.step()
    host_scheduler.step()


def assert_same_run(params, twins, dtype):
    for p, twin in zip(params, twins):
        torch.testing.assert_close(p, twin, rtol=1e-12 if dtype == torch.float64 else 1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("rule", list(RULES))
def test_device_schedule_equals_host_driven_schedule(rule, dtype, backend, device):
    scheduled, params, driven, twins, host_scheduler, generator = twin_runs(rule, backend, device, dtype)
    for _ in range(STEPS):
        used_by_host = driven.param_groups[0]["lr"]
        step_both(scheduled, params, driven, twins, host_scheduler, generator)
        assert scheduled.current_lr().item() == pytest.approx(used_by_host, rel=1e-12)
    assert_same_run(params, twins, dtype)
    assert scheduled.param_groups[0]["lr"] == 0.05  # the base lr stays in the group


@pytest.mark.parametrize("rule", ["adam", "sgd"])
def test_schedule_changes_the_run(rule, backend, device):
    """Against an unscheduled run, the device schedule moves the params differently (the test
    above could not tell a schedule that is ignored from one that is applied otherwise)."""
    scheduled, params, _, _, _, generator = twin_runs(rule, backend, device)
    optimizer_class, options = RULES[rule]
    plain_params = [p.detach().clone().requires_grad_() for p in params]
    plain = optimizer_class(plain_params, lr=0.05, backend=backend, **options)
    for _ in range(4):
        grads = make_grads(params, generator)
        assign_grads(params, grads)
        assign_grads(plain_params, [g.clone() for g in grads])
        scheduled.step()
        plain.step()
    assert all((p - q).abs().max() > 1e-4 for p, q in zip(params, plain_params))


def test_schedule_without_end_needs_schedule_steps_and_holds_the_last_factor(backend, device):
    endless = schedules.join([schedules.linear_warmup(2), schedules.inverse_sqrt_decay(timescale=3)], [2])
    with pytest.raises(ValueError, match="schedule_steps"):
        fusedopt.Adam([torch.zeros(3, requires_grad=True)], schedule=endless)
    scheduled, params, driven, twins, host_scheduler, generator = twin_runs(
        "adam", backend, device, schedule=endless, schedule_steps=5)
    for step in range(8):
        step_both(scheduled, params, driven, twins, host_scheduler, generator)
        held = endless(min(step, 5))
        assert scheduled.current_lr().item() == pytest.approx(0.05 * held, rel=1e-12)
        if step == 5:
            assert_same_run(params, twins, torch.float32)


@pytest.mark.parametrize("bad, error", [("cosine", TypeError), (lambda t: 1.0, TypeError)])
def test_schedule_must_be_a_schedule(bad, error):
    with pytest.raises(error):
        fusedopt.SGD([torch.zeros(3, requires_grad=True)], lr=0.1, schedule=bad)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_bad_schedule_steps_raise_value_error(bad):
    with pytest.raises(ValueError):
        fusedopt.SGD([torch.zeros(3, requires_grad=True)], lr=0.1, schedule=WARMUP_COSINE, schedule_steps=bad)


def test_schedule_with_a_tensor_lr_raises_value_error():
    with pytest.raises(ValueError, match="tensor"):
        fusedopt.Adam([torch.zeros(3, requires_grad=True)], lr=torch.tensor(0.1), schedule=WARMUP_COSINE)


@pytest.mark.parametrize("rule", ["adam", "sgd"])
def test_schedule_position_is_saved_and_resumed(rule, backend, device):
    """The count travels in state_dict (param_groups): an optimizer rebuilt from a checkpoint at
    step 5 continues the schedule where the first one was."""
    scheduled, params, driven, twins, host_scheduler, generator = twin_runs(rule, backend, device)
    for _ in range(5):
        step_both(scheduled, params, driven, twins, host_scheduler, generator)
    checkpoint = copy.deepcopy(scheduled.state_dict())
    assert checkpoint["param_groups"][0]["group_step"].item() == 5
    optimizer_class, options = RULES[rule]
    resumed = optimizer_class(params, lr=0.05, backend=backend, schedule=WARMUP_COSINE, **options)
    resumed.load_state_dict(checkpoint)
    for _ in range(STEPS - 5):
        step_both(resumed, params, driven, twins, host_scheduler, generator)
    assert_same_run(params, twins, torch.float32)


def test_skipped_amp_steps_still_advance_the_schedule(device):
    """Like a host scheduler stepped every iteration: a step GradScaler skips (found_inf) leaves
    params alone but counts for the schedule."""
    if not kernels_runnable(device):
        pytest.skip("the kernels need CUDA or TRITON_INTERPRET=1")
    generator = torch.Generator().manual_seed(3)
    params = make_params(torch.float32, device, generator, shapes=SHAPES, odd_layouts=False, complex_params=False)
    optimizer = fusedopt.Adam(params, lr=0.05, backend="triton", schedule=WARMUP_COSINE)
    assign_grads(params, make_grads(params, generator))
    optimizer.found_inf = torch.ones((), device=device)
    before = [p.detach().clone() for p in params]
    optimizer.step()
    del optimizer.found_inf
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert optimizer.param_groups[0]["group_step"].item() == 1
    assert optimizer.current_lr().item() == pytest.approx(0.05 * WARMUP_COSINE(0))


def test_scheduled_step_is_still_one_launch_per_bucket(device):
    if not kernels_runnable(device):
        pytest.skip("the kernels need CUDA or TRITON_INTERPRET=1")
    generator = torch.Generator().manual_seed(4)
    params = make_params(torch.float32, device, generator, shapes=SHAPES * 2, odd_layouts=False,
                         complex_params=False)
    optimizer = fusedopt.Adam(params, lr=0.05, backend="triton", schedule=WARMUP_COSINE)
    for _ in range(2):
        assign_grads(params, make_grads(params, generator))
        before = launch_count()
        optimizer.step()
        assert launch_count() - before == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA")
@pytest.mark.parametrize("rule", list(RULES))
def test_captured_graph_replays_a_scheduled_run(rule):
    """One captured step, replayed for a whole warmup + decay run, gives the host-driven run."""
    scheduled, params, driven, twins, host_scheduler, generator = twin_runs(rule, "auto", "cuda")
    for p in params:
        p.grad = torch.zeros_like(p)

    def warm_up_step():
        fill_static_grads(params, twins, generator)
        scheduled.step()
        driven.step()
        host_scheduler.step()

    graph = capture_cuda_graph(warm_up_step, scheduled.step)
    for _ in range(STEPS - 2):
        fill_static_grads(params, twins, generator)
        graph.replay()
        driven.step()
        host_scheduler.step()
    torch.cuda.synchronize()
    assert math.isclose(scheduled.param_groups[0]["group_step"].item(), STEPS)
    assert_same_run(params, twins, torch.float32)
