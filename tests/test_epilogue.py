"""Specification of the step epilogue: AMP (torch.amp.GradScaler's unscaling and inf/NaN skip done
inside the update), clipping by the total grad norm (clip_grad_norm_, with or without a
GradScaler, and the max_grad_norm option), their launch counts, params on the plain-torch path
beside kernel params, 16-bit and fp64 params, and checkpoints taken after AMP steps.

The expected results are torch's own recipe on copies of the params: scaler.unscale_(opt),
torch.nn.utils.clip_grad_norm_, scaler.step(opt), scaler.update(), with torch.optim's for-loop
optimizers. Scaled grads are made without a loss: scaler.scale() once per iteration (it sets up
the scale), then each grad times scaler.get_scale().
"""
import copy
import io
import math
import os

import pytest
import torch
from torch import nn

import fusedopt
from fusedopt.registry import RULES as REGISTRY
from helpers import (
    DEFAULT_LR,
    OPTIMIZERS,
    RULES,
    STATEFUL,
    ReferenceOptimizer,
    assert_close,
    assert_matches_reference,
    assert_optimizers_match,
    assign_grads,
    clone_params,
    launches_during,
    make_grads,
    make_params,
    randn,
    tolerance,
    torch_optimizer,
)
from test_kernels import fp32_tolerance

BACKENDS = ["torch", "triton", "kernels"]  # on the CPU: the reference, Triton's and numba's kernels
BESIDE_THE_ORACLE = True  # the tests run each backend beside the rule's oracle

# Options under which every rule keeps state that the grads feed (SGD: with dampening too).
STATEFUL = {**STATEFUL, "sgd": {"momentum": 0.9, "dampening": 0.3}}
# A scale that is not a power of two: 1/scale is rounded to fp32 as GradScaler.unscale_ rounds it.
INIT_SCALE = 3.0 * 2**10
# Three clean iterations in a row double the scale; an inf or NaN halves it.
GROWTH_INTERVAL = 3
SHAPES = [(7,), (33, 17), (4097,), ()]


@pytest.fixture
def kernel_device(device):
    """A device the kernels run on: CUDA, or the CPU under the Triton interpreter."""
    if torch.device(device).type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the triton backend needs CUDA or TRITON_INTERPRET=1 for CPU tensors")
    return device


def fused_with(rule, params, backend, **options):
    """fusedopt's optimizer of `rule` on `backend` ("triton": kernels, "torch": per-tensor code)."""
    options.setdefault("lr", DEFAULT_LR[rule])
    return OPTIMIZERS[rule][0](params, backend=backend, **options)


def new_scaler(device, init_scale=INIT_SCALE):
    return torch.amp.GradScaler(torch.device(device).type, init_scale=init_scale, growth_interval=GROWTH_INTERVAL)


def give_scaled_grads(scaler, params, grads):
    """The grads a loss scaled by `scaler` would give each param (None stays None)."""
    scaler.scale(torch.ones((), device=params[0].device))
    scale = scaler.get_scale()
    for p, g in zip(params, grads):
        p.grad = None if g is None else g * scale


def poison(grads, step, schedule):
    """Put schedule[step] (inf or NaN), where there is one, into an element of the first grad."""
    if step in schedule:
        grads[0].view(-1)[min(3, grads[0].numel() - 1)] = schedule[step]


def torch_amp_step(optimizer, params, scaler, max_norm=None, norm_type=2.0):
    """torch's recipe for one iteration; returns clip_grad_norm_'s total norm (None unclipped)."""
    norm = None
    if max_norm is not None:
        scaler.unscale_(optimizer)
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type)
    scaler.step(optimizer)
    scaler.update()
    return norm


def fused_amp_step(optimizer, scaler, max_norm=None, norm_type=2.0):
    """fusedopt's iteration: clip_grad_norm_(grad_scaler=...) in place of unscale_ and clipping."""
    norm = None
    if max_norm is not None:
        norm = optimizer.clip_grad_norm_(max_norm, norm_type, grad_scaler=scaler)
    scaler.step(optimizer)
    scaler.update()
    return norm


def snapshot(optimizer, params):
    """Copies of the params and of every state value, step counts included."""
    return [(p.detach().clone(), {key: value.clone() for key, value in optimizer.state[p].items()}) for p in params]


def assert_bit_identical(optimizer, params, before, where=""):
    for index, (p, (value, state)) in enumerate(zip(params, before)):
        assert torch.equal(p.detach(), value), f"{where} param {index} changed"
        assert set(optimizer.state[p]) == set(state), f"{where} param {index}: state keys changed"
        for key, saved in state.items():
            assert torch.equal(optimizer.state[p][key], saved), f"{where} param {index} state[{key!r}] changed"


def scaled_params(dtype, device, generator, shapes=SHAPES, **layout):
    """Params for AMP runs: GradScaler cannot unscale complex grads on the CPU, so none here."""
    return make_params(dtype, device, generator, shapes=shapes, complex_params=False, **layout)


def run_amp_beside_torch(rule, params, options, backend, generator, *, steps, schedule, max_norms=None,
                         init_scale=INIT_SCALE, tol=None):
    """fusedopt under a GradScaler (clip_grad_norm_(grad_scaler=...) when max_norms) beside torch's
    recipe on copies of `params`, with the same fresh grads, poisoned by `schedule`; params, every
    state, the returned norms and the scaler's scale compared after every step."""
    fused_params, torch_params = clone_params(params), clone_params(params)
    fused = fused_with(rule, fused_params, backend, **options)
    expected = torch_optimizer(rule, torch_params, **options)
    device = params[0].device
    fused_scaler, torch_scaler = new_scaler(device, init_scale), new_scaler(device, init_scale)
    tol = tol or fp32_tolerance(device, rule, options)
    for step in range(1, steps + 1):
        grads = make_grads(params, generator)
        poison(grads, step, schedule)
        give_scaled_grads(fused_scaler, fused_params, grads)
        give_scaled_grads(torch_scaler, torch_params, grads)
        max_norm = None if max_norms is None else max_norms[(step - 1) % len(max_norms)]
        norm = fused_amp_step(fused, fused_scaler, max_norm)
        expected_norm = torch_amp_step(expected, torch_params, torch_scaler, max_norm)
        where = f"{rule} {options} step {step}"
        if max_norm is not None:
            assert_close(norm, expected_norm, rtol=tol["rtol"], atol=0, name=f"{where} total norm")
        assert fused_scaler.get_scale() == torch_scaler.get_scale(), where
        assert_optimizers_match(fused, expected, fused_params, torch_params, where=where, **tol)


# ---- AMP: GradScaler hands grad_scale and found_inf to step() ----


@pytest.mark.parametrize("rule", RULES)
def test_amp_steps_match_torch_unscale_and_step(rule, backend, device):
    """Six scaler.step() iterations, an inf at step 3 and a NaN at step 5 (skipped, the scale
    halved) and growth after three clean steps: torch's params, states, step counts and scale."""
    generator = torch.Generator().manual_seed(100)
    params = scaled_params(torch.float32, device, generator)
    run_amp_beside_torch(rule, params, STATEFUL[rule], backend, generator, steps=6,
                         schedule={3: math.inf, 5: math.nan})


@pytest.mark.parametrize("rule", RULES)
def test_amp_leaves_the_scaled_grads_in_place(rule, backend, device):
    """The kernels unscale in registers: after scaler.step(), clean or skipped, each p.grad is the
    same tensor holding the same scaled values."""
    generator = torch.Generator().manual_seed(101)
    params = scaled_params(torch.float32, device, generator, shapes=[(7,), (33, 17)])
    optimizer = fused_with(rule, params, backend, **STATEFUL[rule])
    scaler = new_scaler(device)
    for step in range(1, 4):
        grads = make_grads(params, generator)
        poison(grads, step, {2: math.inf})
        give_scaled_grads(scaler, params, grads)
        given = [(p.grad, p.grad.clone()) for p in params]
        scaler.step(optimizer)
        scaler.update()
        for index, (p, (tensor, values)) in enumerate(zip(params, given)):
            assert p.grad is tensor, f"step {step} param {index}: grad replaced"
            torch.testing.assert_close(p.grad, values, rtol=0, atol=0, equal_nan=True,
                                       msg=f"step {step} param {index}: grad rewritten")


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan], ids=["inf", "-inf", "nan"])
@pytest.mark.parametrize("rule", RULES)
def test_amp_skipped_step_changes_nothing(rule, bad, backend, device):
    """After two clean steps, a step whose scaled grads hold an inf or NaN leaves params and every
    state tensor bit-identical, does not count in state['step'], and halves the scale."""
    generator = torch.Generator().manual_seed(102)
    params = scaled_params(torch.float32, device, generator)
    optimizer = fused_with(rule, params, backend, **STATEFUL[rule])
    scaler = new_scaler(device)
    for _ in range(2):
        give_scaled_grads(scaler, params, make_grads(params, generator))
        scaler.step(optimizer)
        scaler.update()
    before = snapshot(optimizer, params)
    grads = make_grads(params, generator)
    poison(grads, 3, {3: bad})
    give_scaled_grads(scaler, params, grads)
    scaler.step(optimizer)
    scaler.update()
    assert_bit_identical(optimizer, params, before, where=f"{rule} skipped step")
    assert scaler.get_scale() == INIT_SCALE / 2


@pytest.mark.parametrize("rule", RULES)
def test_amp_after_explicit_unscale_matches_torch(rule, backend, device):
    """scaler.unscale_(opt) before scaler.step(opt) (grads unscaled in place by the scaler, the
    optimizer then gets found_inf without a grad_scale): torch's trajectory, skip included."""
    generator = torch.Generator().manual_seed(103)
    params = scaled_params(torch.float32, device, generator)
    options = STATEFUL[rule]
    fused_params, torch_params = clone_params(params), clone_params(params)
    fused = fused_with(rule, fused_params, backend, **options)
    expected = torch_optimizer(rule, torch_params, **options)
    scalers = [new_scaler(device), new_scaler(device)]
    for step in range(1, 5):
        grads = make_grads(params, generator)
        poison(grads, step, {3: math.inf})
        for optimizer, ps, scaler in zip((fused, expected), (fused_params, torch_params), scalers):
            give_scaled_grads(scaler, ps, grads)
            scaler.unscale_(optimizer)
            scaler.step(optimizer)
            scaler.update()
        assert scalers[0].get_scale() == scalers[1].get_scale()
        assert_optimizers_match(fused, expected, fused_params, torch_params, where=f"{rule} step {step}",
                                **fp32_tolerance(device, rule, options))


@pytest.mark.parametrize("rule", RULES)
def test_amp_skipped_first_step_then_training_matches_torch(rule, backend, device):
    """The very first step is skipped (its state, if any, was never filled); three clean steps
    later params and states are torch's, whose first real step came second."""
    generator = torch.Generator().manual_seed(104)
    params = scaled_params(torch.float32, device, generator)
    options = STATEFUL[rule]
    fused_params, torch_params = clone_params(params), clone_params(params)
    fused = fused_with(rule, fused_params, backend, **options)
    expected = torch_optimizer(rule, torch_params, **options)
    scalers = [new_scaler(device), new_scaler(device)]
    for step in range(1, 5):
        grads = make_grads(params, generator)
        poison(grads, step, {1: math.nan})
        give_scaled_grads(scalers[0], fused_params, grads)
        give_scaled_grads(scalers[1], torch_params, grads)
        fused_amp_step(fused, scalers[0])
        torch_amp_step(expected, torch_params, scalers[1])
    assert_optimizers_match(fused, expected, fused_params, torch_params, where=f"{rule} after a skipped first step",
                            **fp32_tolerance(device, rule, options))


# ---- clip_grad_norm_ ----


def run_clip_beside_torch(rule, params, options, backend, generator, *, steps, max_norms, norm_type=2.0):
    """clip_grad_norm_ then step() beside torch.nn.utils.clip_grad_norm_ then torch.optim's step,
    on copies of `params` with the same fresh grads: the returned norm (value, dtype, device)
    and params and states after every step."""
    fused_params, torch_params = clone_params(params), clone_params(params)
    fused = fused_with(rule, fused_params, backend, **options)
    expected = torch_optimizer(rule, torch_params, **options)
    tol = fp32_tolerance(params[0].device, rule, options)
    for step in range(1, steps + 1):
        grads = make_grads(params, generator)
        assign_grads(fused_params, grads)
        assign_grads(torch_params, grads)
        max_norm = max_norms[(step - 1) % len(max_norms)]
        norm = fused.clip_grad_norm_(max_norm, norm_type)
        expected_norm = torch.nn.utils.clip_grad_norm_(torch_params, max_norm, norm_type)
        where = f"{rule} norm_type={norm_type} step {step}"
        assert_close(norm, expected_norm, rtol=tol["rtol"], atol=0, name=f"{where} total norm")
        fused.step()
        expected.step()
        assert_optimizers_match(fused, expected, fused_params, torch_params, where=where, **tol)


@pytest.mark.parametrize("rule", RULES)
def test_clip_grad_norm_then_step_matches_torch(rule, backend, device):
    """Every shape and layout (complex included) in one group; max_norm below the norm (clipped)
    and far above it (factor 1): torch's norm and trajectory."""
    generator = torch.Generator().manual_seed(110)
    params = make_params(torch.float32, device, generator, shapes=SHAPES)
    run_clip_beside_torch(rule, params, STATEFUL[rule], backend, generator, steps=4, max_norms=[1.0, 1e9, 5.0])


NORM_TYPES = [2.0, 1.0, 3.5, math.inf, 0.5, 0.0, -math.inf, -1.0]


@pytest.mark.parametrize("norm_type", NORM_TYPES, ids=lambda value: f"p={value}")
def test_clip_grad_norm_types_match_torch(norm_type, backend, device):
    """Each norm type, p > 0 through the reduction kernel (complex grads through torch for p != 2),
    p <= 0 through the torch fallback: the norm torch.nn.utils.clip_grad_norm_ returns, and SGD
    with momentum (linear in the clipped grads) on torch's trajectory."""
    generator = torch.Generator().manual_seed(111)
    params = make_params(torch.float32, device, generator, shapes=SHAPES)
    run_clip_beside_torch("sgd", params, STATEFUL["sgd"], backend, generator, steps=3, max_norms=[1.0, 1e9, 3.0],
                          norm_type=norm_type)


@pytest.mark.parametrize("rule", RULES)
def test_clip_grad_norm_spans_every_group_and_skips_params_without_grads(rule, backend, device):
    """Two groups with their own lr, one param without a grad: the total norm is over every grad
    of every group, as clip_grad_norm_ over all params, and each group steps with its own lr."""
    generator = torch.Generator().manual_seed(112)
    first = make_params(torch.float32, device, generator, shapes=[(7,), (33, 17)], odd_layouts=False,
                        complex_params=False)
    second = make_params(torch.float32, device, generator, shapes=[(4097,), (5,)], odd_layouts=False,
                         complex_params=False)
    options = STATEFUL[rule]
    fused_groups = [clone_params(first), clone_params(second)]
    torch_groups = [clone_params(first), clone_params(second)]
    fused = fused_with(rule, [{"params": fused_groups[0]}, {"params": fused_groups[1], "lr": 0.003}], backend,
                       **options)
    expected = torch_optimizer(rule, [{"params": torch_groups[0]}, {"params": torch_groups[1], "lr": 0.003}],
                               **options)
    fused_params, torch_params = sum(fused_groups, []), sum(torch_groups, [])
    tol = fp32_tolerance(device, rule, options)
    for step in range(1, 4):
        grads = make_grads(first + second, generator)
        grads[3 if step == 2 else 1] = None
        assign_grads(fused_params, grads)
        assign_grads(torch_params, grads)
        norm = fused.clip_grad_norm_(2.0)
        expected_norm = torch.nn.utils.clip_grad_norm_(torch_params, 2.0)
        assert_close(norm, expected_norm, rtol=tol["rtol"], atol=0, name=f"{rule} step {step} total norm")
        fused.step()
        expected.step()
        assert_optimizers_match(fused, expected, fused_params, torch_params, where=f"{rule} step {step}", **tol)


@pytest.mark.parametrize("rule", RULES)
def test_clip_applies_to_the_next_step_only_and_leaves_the_grads(rule, backend, device):
    """clip_grad_norm_ leaves p.grad as it was (the factor is applied inside the next step), and
    the step after that one, without a new clip_grad_norm_, is not clipped."""
    generator = torch.Generator().manual_seed(113)
    params = make_params(torch.float32, device, generator, shapes=[(7,), (33, 17)], complex_params=False)
    options = STATEFUL[rule]
    fused_params, torch_params = clone_params(params), clone_params(params)
    fused = fused_with(rule, fused_params, backend, **options)
    expected = torch_optimizer(rule, torch_params, **options)
    tol = fp32_tolerance(device, rule, options)
    for step, clip in enumerate([True, False, False], start=1):
        grads = make_grads(params, generator)
        assign_grads(fused_params, grads)
        assign_grads(torch_params, grads)
        if clip:
            fused.clip_grad_norm_(0.5)
            torch.nn.utils.clip_grad_norm_(torch_params, 0.5)
            for index, (p, g) in enumerate(zip(fused_params, grads)):
                assert torch.equal(p.grad, g), f"param {index}: clip_grad_norm_ rewrote the grad"
        fused.step()
        expected.step()
        for index, (p, g) in enumerate(zip(fused_params, grads)):
            assert torch.equal(p.grad, g), f"step {step} param {index}: step() rewrote the grad"
        assert_optimizers_match(fused, expected, fused_params, torch_params, where=f"{rule} step {step}", **tol)


@pytest.mark.parametrize("bad", [math.inf, math.nan], ids=["inf", "nan"])
@pytest.mark.parametrize("norm_type", [2.0, math.inf, 3.5], ids=lambda value: f"p={value}")
def test_clip_error_if_nonfinite_raises_like_torch(norm_type, bad, backend, device):
    """error_if_nonfinite=True with a non-finite grad raises RuntimeError, as torch does."""
    generator = torch.Generator().manual_seed(114)
    params = make_params(torch.float32, device, generator, shapes=[(7,), (4097,)], odd_layouts=False,
                         complex_params=False)
    grads = make_grads(params, generator)
    grads[1][2500] = bad
    torch_params = clone_params(params)
    assign_grads(torch_params, grads)
    with pytest.raises(RuntimeError):
        torch.nn.utils.clip_grad_norm_(torch_params, 1.0, norm_type, error_if_nonfinite=True)
    fused = fused_with("sgd", params, backend, momentum=0.9)
    assign_grads(params, grads)
    with pytest.raises(RuntimeError):
        fused.clip_grad_norm_(1.0, norm_type, error_if_nonfinite=True)


@pytest.mark.parametrize("bad", [math.inf, math.nan], ids=["inf", "nan"])
def test_nonfinite_norm_without_error_clips_like_torch(bad, backend, device):
    """A non-finite grad without error_if_nonfinite: the norm is inf or NaN, and the step that
    follows puts NaN in the same params and buffer elements as torch's clip then step."""
    generator = torch.Generator().manual_seed(115)
    params = make_params(torch.float32, device, generator, shapes=[(7,), (4097,)], odd_layouts=False,
                         complex_params=False)
    fused_params, torch_params = clone_params(params), clone_params(params)
    fused = fused_with("sgd", fused_params, backend, momentum=0.9)
    expected = torch_optimizer("sgd", torch_params, momentum=0.9)
    for step in range(1, 3):
        grads = make_grads(params, generator)
        if step == 2:
            grads[1][2500] = bad
        assign_grads(fused_params, grads)
        assign_grads(torch_params, grads)
        norm = fused.clip_grad_norm_(1.0)
        expected_norm = torch.nn.utils.clip_grad_norm_(torch_params, 1.0)
        assert_close(norm, expected_norm, rtol=1e-5, atol=0, name=f"step {step} total norm")
        fused.step()
        expected.step()
    assert any(p.isnan().any() for p in torch_params)
    assert_optimizers_match(fused, expected, fused_params, torch_params, where=f"{bad} grad",
                            **fp32_tolerance(device, "sgd", {"momentum": 0.9}))


@pytest.mark.parametrize("rule", RULES)
def test_clip_with_grad_scaler_matches_unscale_then_clip(rule, backend, device):
    """clip_grad_norm_(grad_scaler=...) in place of scaler.unscale_: the norm of the unscaled grads
    (inf on the step with an inf), the same skip and backoff, and torch's trajectory."""
    generator = torch.Generator().manual_seed(116)
    params = scaled_params(torch.float32, device, generator)
    run_amp_beside_torch(rule, params, STATEFUL[rule], backend, generator, steps=6,
                         schedule={3: math.inf, 5: math.nan}, max_norms=[1.0, 1e9, 5.0])


def test_clip_with_grad_scaler_hands_its_inf_check_to_the_scaler(backend, device):
    """After clip_grad_norm_(grad_scaler=...) the scaler takes the reduction's inf check: its
    step() does not check the grads again (NaN grads put in between go unseen: no backoff)."""
    generator = torch.Generator().manual_seed(117)
    params = scaled_params(torch.float32, device, generator, shapes=[(7,), (33, 17)])
    optimizer = fused_with("adam", params, backend)
    scaler = new_scaler(device)
    give_scaled_grads(scaler, params, make_grads(params, generator))
    optimizer.clip_grad_norm_(1.0, grad_scaler=scaler)
    for p in params:
        p.grad = torch.full_like(p, math.nan)
    scaler.step(optimizer)
    scaler.update()
    assert scaler.get_scale() == INIT_SCALE


@pytest.mark.parametrize("rule", ["sgd", "adam"])
def test_clip_with_grad_scaler_after_unscale_raises(rule, backend, device):
    """clip_grad_norm_(grad_scaler=...) after scaler.unscale_(opt) in the same iteration raises."""
    generator = torch.Generator().manual_seed(118)
    params = scaled_params(torch.float32, device, generator, shapes=[(7,)])
    optimizer = fused_with(rule, params, backend)
    scaler = new_scaler(device)
    give_scaled_grads(scaler, params, make_grads(params, generator))
    scaler.unscale_(optimizer)
    with pytest.raises(RuntimeError):
        optimizer.clip_grad_norm_(1.0, grad_scaler=scaler)


def test_clip_with_grad_scaler_at_a_grown_scale_matches_torch(backend, device):
    """A scale of 2^64 (GradScaler doubles it every growth_interval clean steps, so long runs
    whose grads never overflow get there) leaves the scaled grads finite (~1e19 to 1e20): the
    norm of the unscaled grads, and the step, are torch's."""
    generator = torch.Generator().manual_seed(119)
    params = scaled_params(torch.float32, device, generator, shapes=[(7,), (33, 17)], odd_layouts=False)
    run_amp_beside_torch("sgd", params, STATEFUL["sgd"], backend, generator, steps=2, schedule={},
                         max_norms=[1.0], init_scale=2.0**64)


# ---- the max_grad_norm option ----


@pytest.mark.parametrize("rule", RULES)
def test_max_grad_norm_matches_clip_then_step(rule, backend, device):
    """max_grad_norm clips every step by the 2-norm, last_grad_norm holding that step's norm:
    torch's clip_grad_norm_ then step, clipped or not."""
    generator = torch.Generator().manual_seed(120)
    params = make_params(torch.float32, device, generator, shapes=SHAPES)
    options = STATEFUL[rule]
    fused_params, torch_params = clone_params(params), clone_params(params)
    fused = fused_with(rule, fused_params, backend, max_grad_norm=5.0, **options)
    expected = torch_optimizer(rule, torch_params, **options)
    tol = fp32_tolerance(device, rule, options)
    for step in range(1, 4):
        scale = 1e-3 if step == 2 else 1.0  # step 2: a norm under max_grad_norm
        grads = make_grads(params, generator, scale)
        assign_grads(fused_params, grads)
        assign_grads(torch_params, grads)
        expected_norm = torch.nn.utils.clip_grad_norm_(torch_params, 5.0)
        fused.step()
        expected.step()
        assert_close(fused.last_grad_norm, expected_norm, rtol=tol["rtol"], atol=0, name=f"step {step} norm")
        assert_optimizers_match(fused, expected, fused_params, torch_params, where=f"{rule} step {step}", **tol)


@pytest.mark.parametrize("rule", RULES)
def test_max_grad_norm_under_amp_matches_unscale_clip_step(rule, backend, device):
    """max_grad_norm under scaler.step(): the norm of the unscaled grads, torch's unscale_, clip,
    step and update, an inf step skipped."""
    generator = torch.Generator().manual_seed(121)
    params = scaled_params(torch.float32, device, generator)
    options = STATEFUL[rule]
    fused_params, torch_params = clone_params(params), clone_params(params)
    fused = fused_with(rule, fused_params, backend, max_grad_norm=2.0, **options)
    expected = torch_optimizer(rule, torch_params, **options)
    scalers = [new_scaler(device), new_scaler(device)]
    tol = fp32_tolerance(device, rule, options)
    for step in range(1, 5):
        grads = make_grads(params, generator)
        poison(grads, step, {2: math.inf})
        give_scaled_grads(scalers[0], fused_params, grads)
        give_scaled_grads(scalers[1], torch_params, grads)
        fused_amp_step(fused, scalers[0])
        expected_norm = torch_amp_step(expected, torch_params, scalers[1], 2.0)
        assert_close(fused.last_grad_norm, expected_norm, rtol=tol["rtol"], atol=0, name=f"step {step} norm")
        assert scalers[0].get_scale() == scalers[1].get_scale()
        assert_optimizers_match(fused, expected, fused_params, torch_params, where=f"{rule} step {step}", **tol)


@pytest.mark.parametrize("value", [-1.0, math.nan, "1.0"], ids=["negative", "nan", "string"])
@pytest.mark.parametrize("rule", RULES)
def test_invalid_max_grad_norm_raises_value_error(rule, value):
    params = [torch.ones(3, requires_grad=True)]
    with pytest.raises(ValueError):
        OPTIMIZERS[rule][0](params, max_grad_norm=value)


# ---- launches ----


@pytest.mark.parametrize("dtypes", [(torch.float32,), (torch.float32, torch.bfloat16)], ids=["fp32", "fp32+bf16"])
@pytest.mark.parametrize("rule", RULES)
def test_clipped_scaled_iteration_takes_two_launches_per_bucket(rule, dtypes, kernel_device):
    """clip_grad_norm_(grad_scaler=...) then scaler.step(): one reduction and one update launch per
    (device, dtype) bucket of five tensors, and the step is taken."""
    device = kernel_device
    generator = torch.Generator().manual_seed(130)
    shapes = [(7,), (33, 17), (4097,), (3,), ()]
    params = [p for dtype in dtypes for p in make_params(dtype, device, generator, shapes=shapes, odd_layouts=False,
                                                           complex_params=False)]
    optimizer = fused_with(rule, params, "triton", **STATEFUL[rule])
    scaler = new_scaler(device, 2.0**8)
    for step in range(3):
        give_scaled_grads(scaler, params, make_grads(params, generator))
        before = [p.detach().clone() for p in params]
        assert launches_during(lambda: fused_amp_step(optimizer, scaler, 1.0)) == 2 * len(dtypes)
        assert any(not torch.equal(p.detach(), b) for p, b in zip(params, before))


@pytest.mark.parametrize("rule", RULES)
def test_max_grad_norm_scaled_step_takes_two_launches_per_bucket(rule, kernel_device):
    """max_grad_norm under scaler.step(): the norm reduction and the update, two launches for a
    bucket of five tensors."""
    device = kernel_device
    generator = torch.Generator().manual_seed(131)
    params = make_params(torch.float32, device, generator, shapes=[(7,), (33, 17), (4097,), (3,), ()],
                         odd_layouts=False, complex_params=False)
    optimizer = fused_with(rule, params, "triton", max_grad_norm=1.0, **STATEFUL[rule])
    scaler = new_scaler(device)
    for step in range(2):
        give_scaled_grads(scaler, params, make_grads(params, generator))
        assert launches_during(lambda: fused_amp_step(optimizer, scaler)) == 2


# ---- params on the plain-torch path beside kernel params ----


def clip_like_torch(params, max_norm):
    """torch.nn.utils.clip_grad_norm_'s 2-norm clipping, written out so that it also takes sparse
    grads (their coalesced values), which torch's own function cannot."""
    grads = [p.grad for p in params if p.grad is not None]
    norms = [torch.linalg.vector_norm(g.coalesce().values() if g.is_sparse else g) for g in grads]
    total = torch.linalg.vector_norm(torch.stack(norms))
    coefficient = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in grads:
        g.mul_(coefficient)
    return total


@pytest.mark.filterwarnings("ignore:Sparse invariant checks")  # raised inside torch.optim.Adagrad
@pytest.mark.parametrize("rule", RULES)
def test_torch_path_params_beside_kernel_params_are_unscaled_and_clipped(rule, kernel_device):
    """A grad laid out unlike its param (column-major for a row-major param) and, for SGD and
    Adagrad, an nn.Embedding(sparse=True) weight take the plain-torch path beside kernel params:
    the total norm, the inf check (an inf in either kind of grad) and the unscaling cover them."""
    device = kernel_device
    generator = torch.Generator().manual_seed(140)
    options = STATEFUL[rule]
    dense = make_params(torch.float32, device, generator, shapes=[(7,), (4097,), (33, 17)], odd_layouts=False,
                        complex_params=False)
    sparse = bool(REGISTRY[rule].sparse_options)
    embeddings = [nn.Embedding(9, 5, sparse=True).to(device) for _ in range(2)] if sparse else []
    table = randn((9, 5), torch.float32, device, generator)
    for embedding in embeddings:
        with torch.no_grad():
            embedding.weight.copy_(table)
    fused_params = clone_params(dense) + [e.weight for e in embeddings[:1]]
    torch_params = clone_params(dense) + [e.weight for e in embeddings[1:]]
    fused = fused_with(rule, fused_params, "triton", **options)
    expected = torch_optimizer(rule, torch_params, **options)
    scalers = [new_scaler(device), new_scaler(device)]
    indices = torch.tensor([0, 3, 3, 8, 5], device=device)
    for step in range(1, 6):
        grads = make_grads(dense, generator)
        column_major = torch.empty((17, 33), device=device).t().copy_(grads[2])
        weights = randn((5, 5), torch.float32, device, generator)
        if step == 3:
            column_major[4, 2] = math.inf
        if step == 5 and sparse:
            weights[1, 1] = math.inf
        elif step == 5:
            grads[0][1] = math.inf
        for optimizer, ps, scaler, index in zip((fused, expected), (fused_params, torch_params), scalers, (0, 1)):
            give_scaled_grads(scaler, ps, grads)
            ps[2].grad = column_major * scaler.get_scale()
            if sparse:
                embeddings[index].weight.grad = None
                (embeddings[index](indices) * weights).sum().mul(scaler.get_scale()).backward()
        assert fused_params[2].grad.stride() != fused_params[2].stride()
        assert not fusedopt.kernels.TensorTable.fits(fused_params[2], fused_params[2].grad, [])
        if sparse:
            assert fused_params[3].grad.is_sparse
        norm = fused_amp_step(fused, scalers[0], 1.0)
        scalers[1].unscale_(expected)
        expected_norm = clip_like_torch(torch_params, 1.0)
        scalers[1].step(expected)
        scalers[1].update()
        where = f"{rule} step {step}"
        assert_close(norm, expected_norm, rtol=1e-5, atol=0, name=f"{where} total norm")
        assert scalers[0].get_scale() == scalers[1].get_scale(), where
        for index, (p, q) in enumerate(zip(fused_params, torch_params)):
            assert_close(p.detach(), q.detach(), name=f"{where} param {index}", **fp32_tolerance(device, rule, options))
            for key, value in expected.state[q].items():
                mine = fused.state[p][key]
                if key == "step":
                    assert mine.item() == value.item(), f"{where} param {index} step"
                else:
                    assert_close(mine.to_dense(), value.to_dense(), name=f"{where} param {index} state[{key!r}]",
                                 **fp32_tolerance(device, rule, options))
    assert scalers[1].get_scale() == INIT_SCALE / 4


# ---- 16-bit and fp64 params ----


@pytest.mark.parametrize("rule", RULES)
def test_fp64_clip_and_amp_match_torch(rule, backend, device):
    """fp64 params under a power-of-two scale (exact unscaling), clip_grad_norm_(grad_scaler=...):
    torch's fp64 unscale_, clip and step at fp64 tolerance."""
    generator = torch.Generator().manual_seed(150)
    params = scaled_params(torch.float64, device, generator)
    options = STATEFUL[rule]
    rtol, atol = tolerance(torch.float64, device, rule, options)
    run_amp_beside_torch(rule, params, options, backend, generator, steps=4, schedule={3: math.inf},
                         max_norms=[1.0, 1e9], init_scale=2.0**12, tol=dict(rtol=rtol, atol=atol))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("rule", RULES)
def test_low_precision_clip_and_amp_match_rounded_reference(rule, dtype, backend, device):
    """16-bit params and grads, clip_grad_norm_(grad_scaler=...) then scaler.step(): the norm is
    the exact norm rounded to the grads' dtype, and params and states follow the float64
    reference (rounded to the dtype after each step) fed the unscaled grads times torch's clip
    factor for 16-bit grads, min(1, max_norm / (norm + 1e-6)) in the dtype; an inf step skipped."""
    generator = torch.Generator().manual_seed(151)
    params = scaled_params(dtype, device, generator)
    options = STATEFUL[rule]
    fused_params = clone_params(params)
    fused = fused_with(rule, fused_params, backend, **options)
    oracle = ReferenceOptimizer(rule, params, options, storage_dtype=dtype)
    scaler = new_scaler(device, 2.0**8)
    rtol, atol = tolerance(dtype, device, rule, options)
    for step, max_norm in enumerate([40.0, 1e4, 60.0, 20.0], start=1):
        grads = make_grads(params, generator)
        poison(grads, step, {2: math.inf})
        give_scaled_grads(scaler, fused_params, grads)
        norm = fused_amp_step(fused, scaler, max_norm)
        exact = torch.linalg.vector_norm(torch.cat([g.double().flatten() for g in grads]))
        assert_close(norm, exact.to(dtype), rtol=torch.finfo(dtype).eps, atol=0, name=f"step {step} total norm")
        if step != 2:
            coefficient = torch.clamp(max_norm / (exact.to(dtype) + 1e-6), max=1.0).double()
            oracle.step([g.double() * coefficient for g in grads])
        assert_matches_reference(fused, oracle, fused_params, rtol=rtol, atol=atol, where=f"{rule} {dtype} step {step}")
    assert scaler.get_scale() == 2.0**7


def test_fp16_grads_with_a_norm_past_the_fp16_square_range_clip_like_torch(backend, device):
    """fp16 grads whose 2-norms (about 770 and 280) are finite in fp16 but whose squares are not,
    one of them laid out unlike its param (the plain-torch path, also under the triton backend):
    clip_grad_norm_ returns torch's finite norm, and SGD (whose fp16 arithmetic torch.optim does
    without underflow here) steps by torch's clipped grads."""
    rule = "sgd"
    generator = torch.Generator().manual_seed(152)
    params = make_params(torch.float16, device, generator, shapes=[(4097,), (33, 17)], odd_layouts=False)
    fused_params, torch_params = clone_params(params), clone_params(params)
    fused = fused_with(rule, fused_params, backend, **STATEFUL[rule])
    expected = torch_optimizer(rule, torch_params, **STATEFUL[rule])
    grads = make_grads(params, generator, scale=12.0)
    grads[1] = torch.empty((17, 33), dtype=torch.float16, device=device).t().copy_(grads[1])
    assign_grads(fused_params, grads)
    assign_grads(torch_params, grads)
    norm = fused.clip_grad_norm_(1.0)
    expected_norm = torch.nn.utils.clip_grad_norm_(torch_params, 1.0)
    assert expected_norm.isfinite()
    assert_close(norm, expected_norm, rtol=2 * torch.finfo(torch.float16).eps, atol=0, name="total norm")
    fused.step()
    expected.step()
    rtol, atol = tolerance(torch.float16, device, rule, STATEFUL[rule])
    assert_optimizers_match(fused, expected, fused_params, torch_params, where="sgd fp16", rtol=rtol, atol=atol)


# ---- checkpoints after AMP steps ----


def through_bytes(state_dict):
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("rule", RULES)
def test_state_dict_after_amp_steps_moves_between_torch_and_fusedopt(rule, backend, device):
    """Three AMP iterations (one skipped) on both, then torch.optim loads fusedopt's checkpoint and
    fusedopt loads torch's: three more iterations (one skipped) of each stay on the trajectory
    of the uninterrupted torch run."""
    generator = torch.Generator().manual_seed(160)
    params = scaled_params(torch.float32, device, generator, shapes=[(7,), (33, 17), ()])
    options = STATEFUL[rule]
    fused_params, torch_params = clone_params(params), clone_params(params)
    fused = fused_with(rule, fused_params, backend, **options)
    expected = torch_optimizer(rule, torch_params, **options)
    scalers = [new_scaler(device), new_scaler(device)]
    runs = [(fused, fused_params, scalers[0]), (expected, torch_params, scalers[1])]
    for step in range(1, 7):
        if step == 4:
            into_torch_params, into_fused_params = clone_params(fused_params), clone_params(torch_params)
            into_torch = torch_optimizer(rule, into_torch_params, **options)
            into_torch.load_state_dict(through_bytes(fused.state_dict()))
            into_fused = fused_with(rule, into_fused_params, backend, **options)
            into_fused.load_state_dict(through_bytes(expected.state_dict()))
            runs = [(expected, torch_params, scalers[1])]
            for optimizer, ps in ((into_torch, into_torch_params), (into_fused, into_fused_params)):
                scaler = new_scaler(device)
                scaler.load_state_dict(copy.deepcopy(scalers[1].state_dict()))
                runs.append((optimizer, ps, scaler))
        grads = make_grads(params, generator)
        poison(grads, step, {2: math.inf, 5: math.nan})
        for optimizer, ps, scaler in runs:
            give_scaled_grads(scaler, ps, grads)
            scaler.step(optimizer)
            scaler.update()
    tol = fp32_tolerance(device, rule, options)
    assert_optimizers_match(into_torch, expected, into_torch_params, torch_params, where=f"{rule} torch <- fusedopt",
                            **tol)
    assert_optimizers_match(into_fused, expected, into_fused_params, torch_params, where=f"{rule} fusedopt <- torch",
                            **tol)


@pytest.mark.parametrize("rule", RULES)
def test_state_dict_after_a_skipped_first_step_loads_into_torch(rule, backend, device):
    """A checkpoint taken after an AMP-skipped first step (no update has run) holds nothing
    torch.optim would read as history: loaded into torch.optim, the next steps are those of an
    uninterrupted torch run."""
    generator = torch.Generator().manual_seed(161)
    params = scaled_params(torch.float32, device, generator, shapes=[(7,), (33, 17)])
    options = STATEFUL[rule]
    fused_params, torch_params = clone_params(params), clone_params(params)
    fused = fused_with(rule, fused_params, backend, **options)
    expected = torch_optimizer(rule, torch_params, **options)
    scalers = [new_scaler(device), new_scaler(device)]
    grads = make_grads(params, generator)
    poison(grads, 1, {1: math.inf})
    give_scaled_grads(scalers[0], fused_params, grads)
    give_scaled_grads(scalers[1], torch_params, grads)
    fused_amp_step(fused, scalers[0])
    torch_amp_step(expected, torch_params, scalers[1])
    loaded_params = clone_params(fused_params)
    loaded = torch_optimizer(rule, loaded_params, **options)
    loaded.load_state_dict(through_bytes(fused.state_dict()))
    for step in range(2, 4):
        grads = make_grads(params, generator)
        assign_grads(loaded_params, grads)
        assign_grads(torch_params, grads)
        loaded.step()
        expected.step()
    assert_optimizers_match(loaded, expected, loaded_params, torch_params, where=f"{rule} loaded after a skip",
                            **fp32_tolerance(device, rule, options))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_clip_factor_computed_on_the_host_has_torchs_bits(dtype):
    """The clip factor of a CPU norm and a number, computed with numpy scalars, is bit for bit
    torch's min(1, max_norm / (norm + 1e-6)) in the norm's dtype, over ordinary and extreme norms."""
    from fusedopt import epilogue

    generator = torch.Generator().manual_seed(140)
    norms = torch.cat([torch.rand(200, generator=generator, dtype=torch.float64) * 10.0 ** torch.randint(
        -8, 9, (200,), generator=generator), torch.tensor([0.0, 1e-6, 1.0, 1e300, math.inf, math.nan],
                                                          dtype=torch.float64)]).to(dtype)
    for max_norm in (1.0, 0.5, 3, 0.0, 1e-3, 7.25):
        for norm in norms:
            expected = torch.clamp(max_norm / (norm + epilogue.CLIP_EPSILON), max=1.0)
            coef = epilogue.host_clip_coefficient(norm.item(), dtype, max_norm)
            assert coef.dtype == dtype and (torch.equal(coef, expected) or (coef.isnan() and expected.isnan())), \
                (max_norm, norm.item(), coef.item(), expected.item())


@pytest.mark.parametrize("max_grad_norm", [False, True], ids=["clip_grad_norm_", "max_grad_norm"])
def test_a_norm_past_float32s_range_is_inf_as_torchs(max_grad_norm):
    """fp32 grads whose norm (summed in fp64 by the numba reduction) is past float32's range: the
    norm is inf, as torch's, and the step is torch's clip + step (the grads scaled to zero)."""
    pytest.importorskip("numba")
    params = [torch.zeros(1000, requires_grad=True), torch.zeros(7, requires_grad=True)]
    twins = [p.detach().clone().requires_grad_() for p in params]
    for p, twin in zip(params, twins):
        p.grad = torch.full(p.shape, 1e38)
        twin.grad = p.grad.clone()
    fused = fusedopt.AdamW(params, lr=0.1, backend="numba", max_grad_norm=1.0 if max_grad_norm else None)
    expected = torch.optim.AdamW(twins, lr=0.1)
    expected_norm = torch.nn.utils.clip_grad_norm_(twins, 1.0)
    norm = None if max_grad_norm else fused.clip_grad_norm_(1.0)
    fused.step()
    norm = fused.last_grad_norm if max_grad_norm else norm
    expected.step()
    assert norm.dtype == expected_norm.dtype and torch.isinf(norm) and torch.isinf(expected_norm)
    for p, twin in zip(params, twins):
        torch.testing.assert_close(p, twin, rtol=0, atol=0)
