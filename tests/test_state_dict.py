"""Specification of checkpoints: fusedopt's state_dict() has torch.optim's layout, and a checkpoint
moves between torch.optim and fusedopt (both ways, through torch.save / torch.load) without
leaving the trajectory of an uninterrupted torch.optim run."""
import collections
import inspect
import copy
import io
import pickle

import pytest
import torch
from torch.testing import assert_close

import fusedopt
from fusedopt.optimizer import FusedOptimizer
from fusedopt.registry import RULES
from helpers import NAMES, TOL, as_params, assert_states_match, build, make_values, oracle_class, set_grads

# Checkpoints are host logic that every kernel backend shares: the reference and the device's
# fastest kernels, with Triton's too where a test is about the kernels' cached tensor tables.
BACKENDS = ["torch", "kernels"]
BESIDE_THE_ORACLE = True  # the tests run each backend beside the rule's oracle


# Option sets per class (the registry's): the plain rule, and its richest options, which add or
# change state tensors.
OPTIONS = [(info.optimizer.__name__, dict(lr=info.default_lr, **options)) for info in RULES.values()
           for options in ({}, *info.richest)]


def _case_id(name, options):
    extra = [f"{key}={value}" for key, value in options.items() if key != "lr"]
    return "-".join([name] + extra).replace(" ", "")


CASES = [pytest.param(name, options, id=_case_id(name, options)) for name, options in OPTIONS]
# The option set of each class with the most state tensors (the last of its cases).
RICHEST_CASES = [[case for case in CASES if case.values[0] == name][-1] for name in NAMES]
# The cases of the classes that count steps in state["step"] (not SGD, nor Lion)
STEP_CASES = [case for case in CASES if getattr(fusedopt, case.values[0]).has_step]
# torch supports fused=True (on the CPU too) for the classes that take it.
FUSED_CASES = [case for case in CASES if "fused" in inspect.signature(getattr(fusedopt, case.values[0])).parameters]


# ---- inputs and runs ----








def train(optimizer, params, start, steps, seed, frozen=()):
    launches = fusedopt.kernels.launch_count()
    for step in range(start, start + steps):
        set_grads(params, step, seed, frozen)
        optimizer.step()
    if isinstance(optimizer, FusedOptimizer):  # the backend asked for is the one that ran
        assert (fusedopt.kernels.launch_count() > launches) == (optimizer.backend != "torch")




def save(params, optimizer):
    buffer = io.BytesIO()
    torch.save({"params": [p.detach() for p in params], "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    return buffer


def resume(library, name, options, backend, buffer, **extra):
    """A fresh process: new params and a new optimizer (built with `options`), filled from the
    checkpoint."""
    checkpoint = torch.load(buffer)
    params = as_params(checkpoint["params"])
    optimizer = build(library, name, params, backend, **options, **extra)
    optimizer.load_state_dict(checkpoint["optimizer"])
    return params, optimizer


def uninterrupted_torch_run(name, options, steps, seed, device, **extra):
    params = as_params(make_values(seed, device))
    optimizer = oracle_class(name)(params, **options, **extra)
    train(optimizer, params, 0, steps, seed)
    return params, optimizer


def run_chain(name, options, backend, segments, seed, device):
    """Train through segments [(library, steps), ...], each resumed from the previous one's
    checkpoint; returns the last params and optimizer."""
    params = as_params(make_values(seed, device))
    buffer, done = None, 0
    for library, steps in segments:
        if buffer is None:
            optimizer = build(library, name, params, backend, **options)
        else:
            params, optimizer = resume(library, name, options, backend, buffer)
        train(optimizer, params, done, steps, seed)
        done += steps
        buffer = save(params, optimizer)
    return params, optimizer




def assert_params_match(actual, expected):
    for got, want in zip(actual, expected, strict=True):
        assert_close(got.detach(), want.detach(), **TOL)


# ---- checkpoints between torch.optim and fusedopt ----


@pytest.mark.parametrize("name, options", CASES)
def test_torch_checkpoint_continues_in_fusedopt_and_back_on_torch_trajectory(name, options, backend, device):
    segments = [(torch.optim, 3), (fusedopt, 4), (torch.optim, 3)]
    params, optimizer = run_chain(name, options, backend, segments, seed=1, device=device)
    want_params, want_optimizer = uninterrupted_torch_run(name, options, 10, seed=1, device=device)
    assert_params_match(params, want_params)
    assert_states_match(optimizer.state_dict()["state"], want_optimizer.state_dict()["state"], **TOL)


@pytest.mark.parametrize("name, options", CASES)
def test_fusedopt_checkpoint_continues_in_torch_and_back_on_torch_trajectory(name, options, backend, device):
    segments = [(fusedopt, 3), (torch.optim, 4), (fusedopt, 3)]
    params, optimizer = run_chain(name, options, backend, segments, seed=2, device=device)
    want_params, want_optimizer = uninterrupted_torch_run(name, options, 10, seed=2, device=device)
    assert_params_match(params, want_params)
    assert_states_match(optimizer.state_dict()["state"], want_optimizer.state_dict()["state"], **TOL)


@pytest.mark.parametrize("name, options", CASES)
def test_fusedopt_checkpoint_resumes_in_fusedopt_on_torch_trajectory(name, options, backend, device):
    segments = [(fusedopt, 4), (fusedopt, 4)]
    params, optimizer = run_chain(name, options, backend, segments, seed=3, device=device)
    want_params, want_optimizer = uninterrupted_torch_run(name, options, 8, seed=3, device=device)
    assert_params_match(params, want_params)
    assert_states_match(optimizer.state_dict()["state"], want_optimizer.state_dict()["state"], **TOL)


@pytest.mark.parametrize("name, options", FUSED_CASES)
def test_checkpoint_from_torch_fused_loads_into_fusedopt(name, options, backend, device):
    params = as_params(make_values(4, device))
    torch_fused = build(torch.optim, name, params, backend, **options, fused=True)
    train(torch_fused, params, 0, 3, seed=4)
    params, optimizer = resume(fusedopt, name, options, backend, save(params, torch_fused))
    train(optimizer, params, 3, 4, seed=4)
    want_params, want_optimizer = uninterrupted_torch_run(name, options, 7, seed=4, device=device, fused=True)
    assert_params_match(params, want_params)
    assert_states_match(optimizer.state_dict()["state"], want_optimizer.state_dict()["state"], **TOL)


@pytest.mark.parametrize("name, options", CASES)
def test_torch_checkpoint_with_different_step_counts_per_param_continues_in_fusedopt(name, options, backend, device):
    # Param 1 had no grad for the first two steps: its step count (and state) lags behind.
    params = as_params(make_values(13, device))
    torch_optimizer = oracle_class(name)(params, **options)
    train(torch_optimizer, params, 0, 2, seed=13, frozen={1})
    train(torch_optimizer, params, 2, 2, seed=13)
    params, optimizer = resume(fusedopt, name, options, backend, save(params, torch_optimizer))
    train(optimizer, params, 4, 4, seed=13)
    want_params = as_params(make_values(13, device))
    want_optimizer = oracle_class(name)(want_params, **options)
    train(want_optimizer, want_params, 0, 2, seed=13, frozen={1})
    train(want_optimizer, want_params, 2, 6, seed=13)
    assert_params_match(params, want_params)
    assert_states_match(optimizer.state_dict()["state"], want_optimizer.state_dict()["state"], **TOL)


@pytest.mark.parametrize("name, options", CASES)
def test_checkpoint_hyperparameters_override_those_of_the_constructor(name, options, backend, device):
    params = as_params(make_values(14, device))
    torch_optimizer = oracle_class(name)(params, **options)
    train(torch_optimizer, params, 0, 3, seed=14)
    # Built with the class defaults (other lr, no momentum/amsgrad/centered), then loaded.
    params, optimizer = resume(fusedopt, name, {}, backend, save(params, torch_optimizer))
    assert optimizer.param_groups[0]["lr"] == options["lr"]
    train(optimizer, params, 3, 4, seed=14)
    want_params, want_optimizer = uninterrupted_torch_run(name, options, 7, seed=14, device=device)
    assert_params_match(params, want_params)
    assert_states_match(optimizer.state_dict()["state"], want_optimizer.state_dict()["state"], **TOL)


@pytest.mark.parametrize("name, options", [case for case in RICHEST_CASES if case in STEP_CASES])
def test_legacy_checkpoint_with_number_steps_loads_like_torch(name, options, backend, device):
    # torch.optim before 1.12 saved state["step"] as a Python number; torch.optim still loads it.
    params = as_params(make_values(15, device))
    torch_optimizer = oracle_class(name)(params, **options)
    train(torch_optimizer, params, 0, 3, seed=15)
    legacy = copy.deepcopy(torch_optimizer.state_dict())
    for state in legacy["state"].values():
        state["step"] = int(state["step"])
    buffer = io.BytesIO()
    torch.save({"params": [p.detach() for p in params], "optimizer": legacy}, buffer)
    resumed = []
    for library in (fusedopt, torch.optim):
        buffer.seek(0)
        run_params, optimizer = resume(library, name, options, backend, buffer)
        train(optimizer, run_params, 3, 3, seed=15)
        resumed.append((run_params, optimizer))
    (params, optimizer), (want_params, want_optimizer) = resumed
    assert_params_match(params, want_params)
    assert_states_match(optimizer.state_dict()["state"], want_optimizer.state_dict()["state"], **TOL)


@pytest.mark.triton_tables
@pytest.mark.parametrize("name, options", CASES)
def test_loading_a_checkpoint_mid_training_replaces_the_state(name, options, backend, device):
    # The checkpoint: torch.optim after 4 steps of run 5.
    torch_params = as_params(make_values(5, device))
    torch_optimizer = oracle_class(name)(torch_params, **options)
    train(torch_optimizer, torch_params, 0, 4, seed=5)
    buffer = save(torch_params, torch_optimizer)
    # fusedopt trains its own run first (its tensor tables are built), then loads the checkpoint
    # into the same param tensors and optimizer.
    params = as_params(make_values(6, device))
    optimizer = build(fusedopt, name, params, backend, **options)
    train(optimizer, params, 0, 3, seed=6)
    checkpoint = torch.load(buffer)
    with torch.no_grad():
        for p, value in zip(params, checkpoint["params"]):
            p.copy_(value)
    replaced = [dict(state) for state in optimizer.state.values()]  # kept alive: see _replace_by_hand
    optimizer.load_state_dict(checkpoint["optimizer"])
    train(optimizer, params, 4, 4, seed=5)
    want_params, want_optimizer = uninterrupted_torch_run(name, options, 8, seed=5, device=device)
    del replaced
    assert_params_match(params, want_params)
    assert_states_match(optimizer.state_dict()["state"], want_optimizer.state_dict()["state"], **TOL)


@pytest.mark.triton_tables
@pytest.mark.parametrize("name, options", CASES)
def test_loading_its_own_earlier_state_dict_rewinds_training(name, options, backend, device):
    params = as_params(make_values(7, device))
    optimizer = build(fusedopt, name, params, backend, **options)
    train(optimizer, params, 0, 3, seed=7)
    saved_values = [p.detach().clone() for p in params]
    saved_state = copy.deepcopy(optimizer.state_dict())
    train(optimizer, params, 3, 3, seed=70)  # a detour, then back to the saved point
    with torch.no_grad():
        for p, value in zip(params, saved_values):
            p.copy_(value)
    replaced = [dict(state) for state in optimizer.state.values()]  # kept alive: see _replace_by_hand
    optimizer.load_state_dict(saved_state)
    train(optimizer, params, 3, 3, seed=7)
    want_params, want_optimizer = uninterrupted_torch_run(name, options, 6, seed=7, device=device)
    del replaced
    assert_params_match(params, want_params)
    assert_states_match(optimizer.state_dict()["state"], want_optimizer.state_dict()["state"], **TOL)


# ---- state replaced by hand, as torch.optim allows ----
# The replaced tensors are kept alive: a stale tensor table would then write into them (a wrong
# trajectory) rather than into freed memory.


def _replace_by_hand(name, options, backend, device, replace, seed):
    """Both libraries train 3 steps, get `replace(optimizer, params)` applied, train 3 more."""
    runs, kept = [], []
    for library in (fusedopt, torch.optim):
        params = as_params(make_values(seed, device))
        optimizer = build(library, name, params, backend, **options)
        train(optimizer, params, 0, 3, seed=seed)
        kept.append([dict(state) for state in optimizer.state.values()])
        replace(optimizer, params)
        train(optimizer, params, 3, 3, seed=seed)
        runs.append((params, optimizer))
    (params, optimizer), (want_params, want_optimizer) = runs
    assert_params_match(params, want_params)
    assert_states_match(optimizer.state_dict()["state"], want_optimizer.state_dict()["state"], **TOL)


@pytest.mark.triton_tables
@pytest.mark.parametrize("name, options", RICHEST_CASES)
def test_state_cleared_by_hand_restarts_like_torch(name, options, backend, device):
    _replace_by_hand(name, options, backend, device, lambda optimizer, params: optimizer.state.clear(), seed=16)


@pytest.mark.triton_tables
@pytest.mark.parametrize("name, options", RICHEST_CASES)
def test_state_mapping_replaced_by_hand_restarts_like_torch(name, options, backend, device):
    def replace(optimizer, params):
        optimizer.state = collections.defaultdict(dict)

    _replace_by_hand(name, options, backend, device, replace, seed=17)


@pytest.mark.triton_tables
@pytest.mark.parametrize("name, options", RICHEST_CASES)
def test_state_tensor_replaced_by_hand_is_used_like_torch(name, options, backend, device):
    def replace(optimizer, params):
        generator = torch.Generator().manual_seed(18)
        for p in params:
            state = optimizer.state[p]
            key = next(key for key in state if key != "step")
            state[key] = torch.rand(p.shape, generator=generator, dtype=p.dtype).to(p.device)

    _replace_by_hand(name, options, backend, device, replace, seed=18)


@pytest.mark.triton_tables
@pytest.mark.parametrize("name, options", [case for case in RICHEST_CASES if case in STEP_CASES])
def test_step_replaced_by_hand_is_used_like_torch(name, options, backend, device):
    def replace(optimizer, params):
        for index, p in enumerate(params):
            optimizer.state[p]["step"] = torch.tensor(10.0 + index)

    _replace_by_hand(name, options, backend, device, replace, seed=19)


# ---- the layout of state_dict() ----


def _layout_runs(name, options, backend, device):
    values = make_values(8, device, dtypes=(torch.float32, torch.float64))
    ours_params, theirs_params = as_params(values), as_params(values)
    ours = build(fusedopt, name, ours_params, backend, **options)
    theirs = oracle_class(name)(theirs_params, **options)
    train(ours, ours_params, 0, 3, seed=8)
    train(theirs, theirs_params, 0, 3, seed=8)
    return ours.state_dict(), theirs.state_dict()


@pytest.mark.parametrize("name, options", CASES)
def test_state_dict_state_has_torch_keys_shapes_dtypes_and_devices(name, options, backend, device):
    ours, theirs = _layout_runs(name, options, backend, device)
    assert ours.keys() == theirs.keys()
    assert ours["state"].keys() == theirs["state"].keys()
    for index, their_state in theirs["state"].items():
        assert ours["state"][index].keys() == their_state.keys(), f"param {index}"
        for key, theirs_value in their_state.items():
            value = ours["state"][index][key]
            assert torch.is_tensor(value) == torch.is_tensor(theirs_value), f"param {index} {key!r}"
            assert value.shape == theirs_value.shape, f"param {index} {key!r}"
            assert value.dtype == theirs_value.dtype, f"param {index} {key!r}"
            assert value.device == theirs_value.device, f"param {index} {key!r}"


@pytest.mark.parametrize("name, options", STEP_CASES)
def test_state_dict_step_is_a_0_dim_float32_cpu_tensor(name, options, backend, device):
    ours, _ = _layout_runs(name, options, backend, device)
    for index, state in ours["state"].items():
        step = state["step"]
        assert torch.is_tensor(step), f"param {index}"
        assert step.dim() == 0 and step.dtype == torch.float32 and step.device.type == "cpu", f"param {index}"
        assert float(step) == 3.0


@pytest.mark.parametrize("name, options", CASES)
def test_state_dict_param_groups_equal_torch(name, options, backend, device):
    ours, theirs = _layout_runs(name, options, backend, device)
    assert [group.keys() for group in ours["param_groups"]] == [group.keys() for group in theirs["param_groups"]]
    assert ours["param_groups"] == theirs["param_groups"]


@pytest.mark.parametrize("name, options", CASES)
def test_state_dict_values_equal_torch_after_the_same_steps(name, options, backend, device):
    ours, theirs = _layout_runs(name, options, backend, device)
    assert_states_match(ours["state"], theirs["state"], **TOL)


def test_adam_param_groups_name_decoupled_weight_decay(backend, device):
    ours = fusedopt.Adam(as_params(make_values(9, device)), backend=backend).state_dict()
    theirs = torch.optim.Adam(as_params(make_values(9, device))).state_dict()
    assert ours["param_groups"][0]["decoupled_weight_decay"] is False
    assert ours["param_groups"][0].keys() == theirs["param_groups"][0].keys()


@pytest.mark.parametrize("name, options", CASES)
def test_state_dict_before_any_step_equals_torch(name, options, backend, device):
    ours = build(fusedopt, name, as_params(make_values(10, device)), backend, **options).state_dict()
    theirs = oracle_class(name)(as_params(make_values(10, device)), **options).state_dict()
    assert ours["param_groups"] == theirs["param_groups"]
    assert_states_match(ours["state"], theirs["state"], rtol=0, atol=0)


# ---- copies of an optimizer ----


def _copy_keeps_training(name, options, backend, device, make_copy):
    params = as_params(make_values(11, device))
    optimizer = build(fusedopt, name, params, backend, **options)
    train(optimizer, params, 0, 3, seed=11)
    copied = make_copy(optimizer)
    copied_params = copied.param_groups[0]["params"]
    assert all(a is not b for a, b in zip(copied_params, params))
    train(copied, copied_params, 3, 3, seed=11)
    train(optimizer, params, 3, 3, seed=11)
    want_params, want_optimizer = uninterrupted_torch_run(name, options, 6, seed=11, device=device)
    for run_params, run in ((params, optimizer), (copied_params, copied)):
        assert_params_match(run_params, want_params)
        assert_states_match(run.state_dict()["state"], want_optimizer.state_dict()["state"], **TOL)


@pytest.mark.triton_tables
@pytest.mark.parametrize("name, options", CASES)
def test_deepcopy_of_optimizer_trains_independently_on_torch_trajectory(name, options, backend, device):
    _copy_keeps_training(name, options, backend, device, copy.deepcopy)


@pytest.mark.triton_tables
@pytest.mark.parametrize("name, options", CASES)
def test_pickled_optimizer_trains_independently_on_torch_trajectory(name, options, backend, device):
    _copy_keeps_training(name, options, backend, device, lambda optimizer: pickle.loads(pickle.dumps(optimizer)))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(
    "make_copy", [copy.deepcopy, lambda o: pickle.loads(pickle.dumps(o))], ids=["deepcopy", "pickle"])
def test_copy_of_optimizer_keeps_its_backend(name, make_copy, backend, device):
    optimizer = getattr(fusedopt, name)(as_params(make_values(12, device)), backend=backend)
    copied = make_copy(optimizer)
    assert type(copied) is type(optimizer)
    assert copied.backend == optimizer.backend == backend
    assert copied.defaults == optimizer.defaults
