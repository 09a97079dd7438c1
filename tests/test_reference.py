"""Specification of fusedopt.reference: each rule follows torch.optim's single-tensor trajectory.
Params and every state are compared with torch.optim (foreach=False) after each step."""

import itertools
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from fusedopt import reference

STEPS = 20
# 0-dim, one element, odd lengths around block sizes, 2-D; the non-contiguous param is added below.
SHAPES = [(), (1,), (7,), (1023,), (4097,), (33, 17)]
DTYPES = [torch.float32, torch.float64, torch.complex64]
EXACT = dict(rtol=0, atol=0)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tensors here are small: intra-op threads only add contention on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# The reference driven the way torch.optim drives its functional code: per-param state dicts.


def _zeros(p):
    return torch.zeros_like(p, memory_format=torch.preserve_format)


def _sgd_state(p, options):
    return {}  # the momentum buffer appears after the first step


def _sgd_step(params, grads, states, options):
    buffers = [state.get("momentum_buffer") for state in states]
    buffers = reference.sgd(params, grads, buffers, **options)
    if options["momentum"] != 0:
        for state, buf in zip(states, buffers):
            state["momentum_buffer"] = buf


def _adam_state(p, options):
    state = {"step": torch.tensor(0.0), "exp_avg": _zeros(p), "exp_avg_sq": _zeros(p)}
    if options["amsgrad"]:
        state["max_exp_avg_sq"] = _zeros(p)
    return state


def _adam_step(params, grads, states, options):
    options = dict(options)
    beta1, beta2 = options.pop("betas")
    reference.adam(
        params,
        grads,
        [state["exp_avg"] for state in states],
        [state["exp_avg_sq"] for state in states],
        [state.get("max_exp_avg_sq") for state in states],
        [state["step"] for state in states],
        beta1=beta1,
        beta2=beta2,
        **options,
    )


def _adamw_step(params, grads, states, options):
    _adam_step(params, grads, states, dict(options, decoupled_weight_decay=True))


def _adagrad_state(p, options):
    value = options["initial_accumulator_value"]
    if p.is_complex():
        value = complex(value, value)
    return {
        "step": torch.tensor(0.0),
        "sum": torch.full_like(p, value, memory_format=torch.preserve_format),
    }


def _adagrad_step(params, grads, states, options):
    options = {k: v for k, v in options.items() if k != "initial_accumulator_value"}
    reference.adagrad(
        params,
        grads,
        [state["sum"] for state in states],
        [state["step"] for state in states],
        **options,
    )


def _rmsprop_state(p, options):
    state = {"step": torch.tensor(0.0), "square_avg": _zeros(p)}
    if options["momentum"] > 0:
        state["momentum_buffer"] = _zeros(p)
    if options["centered"]:
        state["grad_avg"] = _zeros(p)
    return state


def _rmsprop_step(params, grads, states, options):
    reference.rmsprop(
        params,
        grads,
        [state["square_avg"] for state in states],
        [state.get("momentum_buffer") for state in states],
        [state.get("grad_avg") for state in states],
        [state["step"] for state in states],
        **options,
    )


def _radam_state(p, options):
    return {"step": torch.tensor(0.0), "exp_avg": _zeros(p), "exp_avg_sq": _zeros(p)}


def _radam_step(params, grads, states, options):
    beta1, beta2 = options["betas"]
    options = {k: v for k, v in options.items() if k != "betas"}
    reference.radam(
        params,
        grads,
        [state["exp_avg"] for state in states],
        [state["exp_avg_sq"] for state in states],
        [state["step"] for state in states],
        beta1=beta1,
        beta2=beta2,
        **options,
    )


RULES = {
    # name: (torch.optim class, reference state init, reference step)
    "sgd": (torch.optim.SGD, _sgd_state, _sgd_step),
    "adam": (torch.optim.Adam, _adam_state, _adam_step),
    "adamw": (torch.optim.AdamW, _adam_state, _adamw_step),
    "adagrad": (torch.optim.Adagrad, _adagrad_state, _adagrad_step),
    "rmsprop": (torch.optim.RMSprop, _rmsprop_state, _rmsprop_step),
    "radam": (torch.optim.RAdam, _radam_state, _radam_step),
}

# Every option set names all of torch's hyperparameters, so both sides read the same values.
# Weight decay is a power of two here: weight_decay * param is then exact in fp32 and fp64 alike,
# so an effective gradient that cancels to zero does so in both (Adagrad and RMSprop divide it
# by about eps, which would magnify the last-bit difference in the 16-bit tests).
FULL_OPTIONS = {
    "sgd": dict(
        lr=0.1, weight_decay=0.125, momentum=0.9, dampening=0.0, nesterov=True, maximize=True
    ),
    "adam": dict(
        lr=0.01,
        betas=(0.9, 0.99),
        eps=1e-8,
        weight_decay=0.125,
        decoupled_weight_decay=False,
        amsgrad=True,
        maximize=True,
    ),
    "adamw": dict(
        lr=0.01, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.125, amsgrad=True, maximize=True
    ),
    "adagrad": dict(
        lr=0.1,
        lr_decay=0.05,
        weight_decay=0.125,
        eps=1e-10,
        initial_accumulator_value=0.3,
        maximize=True,
    ),
    "rmsprop": dict(
        lr=0.01, alpha=0.9, eps=1e-8, weight_decay=0.125, momentum=0.9, centered=True, maximize=True
    ),
    "radam": dict(
        lr=0.01, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.125, decoupled_weight_decay=False, maximize=True
    ),
}


class ReferenceOptimizer:
    """Keeps one state dict per param, with torch.optim's keys and initial values."""

    def __init__(self, rule, params, options):
        _, init_state, self.step_fn = RULES[rule]
        self.params = params
        self.options = options
        self.states = [init_state(p, options) for p in params]

    def step(self, grads):
        self.step_fn(self.params, grads, self.states, self.options)


def make_torch_optimizer(rule, params, options):
    return RULES[rule][0](params, foreach=False, **options)


# Inputs


def make_params(dtype, generator, shapes=SHAPES):
    params = [torch.randn(shape, dtype=dtype, generator=generator) for shape in shapes]
    params.append(torch.randn(33, 17, dtype=dtype, generator=generator).t())  # non-contiguous
    return params


def make_grads(params, generator):
    """A fresh random gradient per param, laid out like the param (as autograd lays it out)."""
    grads = []
    for p in params:
        values = torch.randn(p.shape, dtype=p.dtype, generator=generator)
        grads.append(torch.empty_like(p, memory_format=torch.preserve_format).copy_(values))
    return grads


def clone_all(tensors, dtype=None):
    """Independent copies with the same strides (torch.optim and the reference must not share)."""
    return [torch.empty_like(t, dtype=dtype or t.dtype).copy_(t) for t in tensors]


def assert_same_states(ours, theirs, **tolerance):
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        assert ours[key].dtype == value.dtype, key
        assert ours[key].stride() == value.stride(), key
        assert_close(ours[key], value, **tolerance, msg=lambda m: f"state {key!r}: {m}")


def assert_trajectories_match(rule, options, dtype, tolerance=EXACT, steps=STEPS, seed=0):
    generator = torch.Generator().manual_seed(seed)
    ours = make_params(dtype, generator)
    theirs = clone_all(ours)
    reference_optimizer = ReferenceOptimizer(rule, ours, options)
    torch_optimizer = make_torch_optimizer(rule, theirs, options)
    for step in range(steps):
        grads = make_grads(ours, generator)
        for p, g in zip(theirs, grads):
            p.grad = g.clone()
        torch_optimizer.step()
        reference_optimizer.step(grads)
        for i, (p_ours, p_theirs) in enumerate(zip(ours, theirs)):
            where = f"step {step + 1}, param {i} {tuple(p_ours.shape)}"
            assert_close(p_ours, p_theirs, **tolerance, msg=lambda m: f"{where}: {m}")
            theirs_state = torch_optimizer.state[p_theirs]
            assert_same_states(reference_optimizer.states[i], theirs_state, **tolerance)


def option_id(options):
    return ",".join(f"{k}={v}" for k, v in options.items() if k != "lr")


# The option grids: each flag on and off, with nonzero weight decay and maximize throughout.


def sgd_options():
    grid = itertools.product([0.0, 0.9], [0.0, 0.3], [False, True], [0.0, 0.1], [False, True])
    for momentum, dampening, nesterov, weight_decay, maximize in grid:
        if momentum == 0 and (dampening != 0 or nesterov):
            continue  # dampening and nesterov act only through the momentum buffer
        if nesterov and dampening != 0:
            continue  # torch.optim.SGD rejects this combination
        yield dict(
            lr=0.1,
            momentum=momentum,
            dampening=dampening,
            nesterov=nesterov,
            weight_decay=weight_decay,
            maximize=maximize,
        )


def adam_options():
    grid = itertools.product([False, True], [0.0, 0.1], [False, True], [False, True])
    for amsgrad, weight_decay, decoupled_weight_decay, maximize in grid:
        yield dict(
            lr=0.01,
            betas=(0.9, 0.99),
            eps=1e-8,
            amsgrad=amsgrad,
            weight_decay=weight_decay,
            decoupled_weight_decay=decoupled_weight_decay,
            maximize=maximize,
        )


def adagrad_options():
    grid = itertools.product([0.0, 0.05], [0.0, 0.1], [0.0, 0.3], [False, True])
    for lr_decay, weight_decay, initial_accumulator_value, maximize in grid:
        yield dict(
            lr=0.1,
            lr_decay=lr_decay,
            eps=1e-10,
            weight_decay=weight_decay,
            initial_accumulator_value=initial_accumulator_value,
            maximize=maximize,
        )


def rmsprop_options():
    grid = itertools.product([0.0, 0.9], [False, True], [0.0, 0.1], [False, True])
    for momentum, centered, weight_decay, maximize in grid:
        yield dict(
            lr=0.01,
            alpha=0.9,
            eps=1e-8,
            momentum=momentum,
            centered=centered,
            weight_decay=weight_decay,
            maximize=maximize,
        )


dtypes = pytest.mark.parametrize("dtype", DTYPES, ids=str)


# Trajectories against torch.optim, fp32 / fp64 / complex64, every shape in one param group.


@dtypes
@pytest.mark.parametrize("options", list(sgd_options()), ids=option_id)
def test_sgd_follows_torch_sgd(options, dtype):
    assert_trajectories_match("sgd", options, dtype)


@dtypes
@pytest.mark.parametrize("options", list(adam_options()), ids=option_id)
def test_adam_follows_torch_adam(options, dtype):
    assert_trajectories_match("adam", options, dtype)


@dtypes
@pytest.mark.parametrize("amsgrad", [False, True])
def test_adam_with_decoupled_weight_decay_follows_torch_adamw(amsgrad, dtype):
    options = dict(
        lr=0.01, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1, amsgrad=amsgrad, maximize=False
    )
    assert_trajectories_match("adamw", options, dtype)


@dtypes
@pytest.mark.parametrize("options", list(adagrad_options()), ids=option_id)
def test_adagrad_follows_torch_adagrad(options, dtype):
    assert_trajectories_match("adagrad", options, dtype)


@dtypes
@pytest.mark.parametrize("options", list(rmsprop_options()), ids=option_id)
def test_rmsprop_follows_torch_rmsprop(options, dtype):
    assert_trajectories_match("rmsprop", options, dtype)


@pytest.mark.parametrize("rule", list(RULES))
@pytest.mark.parametrize("lr_shape", [(), (1,)], ids=["0-dim", "1-element"])
def test_tensor_lr_follows_torch(rule, lr_shape):
    options = dict(FULL_OPTIONS[rule], lr=torch.full(lr_shape, FULL_OPTIONS[rule]["lr"]))
    assert_trajectories_match(rule, options, torch.float32)


# In-place updates: the tensors torch.optim's state_dict holds are the ones that change.


@pytest.mark.parametrize("rule", list(RULES))
def test_param_and_states_are_updated_in_place(rule):
    generator = torch.Generator().manual_seed(1)
    params = make_params(torch.bfloat16, generator) + make_params(torch.float32, generator)
    optimizer = ReferenceOptimizer(rule, params, FULL_OPTIONS[rule])
    optimizer.step(make_grads(params, generator))
    tensors = params + [t for state in optimizer.states for t in state.values()]
    before = [(t, t.data_ptr(), t.stride(), t.clone()) for t in tensors]

    optimizer.step(make_grads(params, generator))

    tensors_after = params + [t for state in optimizer.states for t in state.values()]
    assert len(tensors_after) == len(before)
    for (tensor, data_ptr, stride, _), after in zip(before, tensors_after):
        assert after is tensor
        assert (tensor.data_ptr(), tensor.stride()) == (data_ptr, stride)
    for param, _, _, old_value in before[: len(params)]:
        assert not torch.equal(param, old_value)


@pytest.mark.parametrize("rule", list(RULES))
def test_grads_are_never_written(rule):
    generator = torch.Generator().manual_seed(2)
    params = make_params(torch.float32, generator) + make_params(torch.bfloat16, generator)
    params += make_params(torch.complex64, generator)
    optimizer = ReferenceOptimizer(rule, params, FULL_OPTIONS[rule])  # maximize and weight decay on
    for _ in range(3):
        grads = make_grads(params, generator)
        copies = [g.clone() for g in grads]
        optimizer.step(grads)
        for g, copy in zip(grads, copies):
            assert torch.equal(g, copy)


def test_sgd_first_momentum_buffer_is_a_copy_of_the_grad():
    param, grad = torch.ones(5), torch.full((5,), 2.0)
    buf = reference.sgd_update(
        param,
        grad,
        None,
        lr=0.1,
        weight_decay=0.0,
        momentum=0.9,
        dampening=0.5,
        nesterov=False,
        maximize=False,
    )
    assert torch.equal(buf, grad)  # no dampening on the first step
    assert buf.data_ptr() != grad.data_ptr()


def test_sgd_without_momentum_keeps_no_buffer():
    buffers = reference.sgd(
        [torch.ones(3), torch.ones(())],
        [torch.ones(3), torch.ones(())],
        [],
        lr=0.1,
        weight_decay=0.0,
        momentum=0.0,
        dampening=0.0,
        nesterov=False,
        maximize=False,
    )
    assert buffers == [None, None]


def test_state_steps_count_up_in_place():
    param, grad, step = torch.ones(4), torch.ones(4), torch.tensor(0.0)
    for expected in (1.0, 2.0, 3.0):
        reference.adagrad(
            [param],
            [grad],
            [torch.zeros(4)],
            [step],
            lr=0.1,
            lr_decay=0.0,
            weight_decay=0.0,
            eps=1e-10,
            maximize=False,
        )
        assert step.item() == expected


# 16-bit params: math in fp32, one rounding back to the param dtype per step.


LOW_PRECISION = pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)


@LOW_PRECISION
@pytest.mark.parametrize("rule", list(RULES))
def test_low_precision_step_is_the_float64_step_rounded_once(rule, dtype):
    generator = torch.Generator().manual_seed(3)
    shapes = [(), (7,), (1023,)]
    ours = [p.to(dtype) for p in make_params(torch.float32, generator, shapes)]
    theirs = clone_all(ours, torch.float64)
    options = FULL_OPTIONS[rule]
    reference_optimizer = ReferenceOptimizer(rule, ours, options)
    torch_optimizer = make_torch_optimizer(rule, theirs, options)
    tolerance = dict(rtol=torch.finfo(dtype).eps, atol=1e-6)  # one ulp of the param dtype
    for _ in range(STEPS):
        # start float64 from exactly our current state, so only one step's error is measured
        for p_ours, p_theirs, state in zip(ours, theirs, reference_optimizer.states):
            p_theirs.copy_(p_ours)
            for key, value in torch_optimizer.state[p_theirs].items():
                value.copy_(state[key])
        grads = make_grads(ours, generator)
        for p, g in zip(theirs, grads):
            p.grad = g.double()
        torch_optimizer.step()
        reference_optimizer.step(grads)
        for p_ours, p_theirs, state in zip(ours, theirs, reference_optimizer.states):
            assert p_ours.dtype == dtype
            assert_close(p_ours.double(), p_theirs, **tolerance)
            for key, value in torch_optimizer.state[p_theirs].items():
                if key == "step":
                    assert_close(state[key], value, **EXACT)
                else:
                    assert state[key].dtype == dtype
                    assert_close(state[key].double(), value, **tolerance)


@pytest.mark.parametrize("rule", list(RULES))
def test_bfloat16_trajectory_stays_close_to_float64_math(rule):
    # bf16 states round every step, so the two trajectories drift apart: a loose check of the
    # whole run, where the test above is the tight check of each step
    generator = torch.Generator().manual_seed(4)
    # params near 0.05, where a bf16 ulp is far below one step's change
    ours = [(0.05 * p).bfloat16() for p in make_params(torch.float32, generator)]
    theirs = clone_all(ours, torch.float64)
    reference_optimizer = ReferenceOptimizer(rule, ours, FULL_OPTIONS[rule])
    torch_optimizer = make_torch_optimizer(rule, theirs, FULL_OPTIONS[rule])
    for _ in range(STEPS):
        grads = make_grads(ours, generator)
        for p, g in zip(theirs, grads):
            p.grad = g.double()
        torch_optimizer.step()
        reference_optimizer.step(grads)
    for p_ours, p_theirs in zip(ours, theirs):
        assert_close(p_ours.double(), p_theirs, rtol=0.05, atol=0.05)


# Sparse gradients (nn.Embedding(sparse=True) style: rows named by index, repeats allowed).


def make_sparse_grad(param, generator, nnz=6):
    rows = torch.randint(0, param.shape[0], (1, nnz), generator=generator)
    rows[0, 1] = rows[0, 0]  # a repeated row: coalescing must sum it before the update
    values = torch.randn((nnz,) + param.shape[1:], dtype=param.dtype, generator=generator)
    return torch.sparse_coo_tensor(rows, values, param.shape, check_invariants=False)


def assert_sparse_trajectories_match(rule, options, dtype, steps=STEPS):
    generator = torch.Generator().manual_seed(5)
    ours = [torch.randn(shape, dtype=dtype, generator=generator) for shape in [(10, 3), (12,)]]
    theirs = clone_all(ours)
    reference_optimizer = ReferenceOptimizer(rule, ours, options)
    torch_optimizer = make_torch_optimizer(rule, theirs, options)
    for _ in range(steps):
        grads = [make_sparse_grad(p, generator) for p in ours]
        for p, g in zip(theirs, grads):
            p.grad = g.clone()
        torch_optimizer.step()
        reference_optimizer.step(grads)
        for p_ours, p_theirs, state in zip(ours, theirs, reference_optimizer.states):
            assert_close(p_ours, p_theirs, **EXACT)
            theirs_state = torch_optimizer.state[p_theirs]
            assert state.keys() == theirs_state.keys()
            for key, value in theirs_state.items():
                assert state[key].layout == value.layout, key
                assert_close(state[key].to_dense(), value.to_dense(), **EXACT)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize(
    "options", [o for o in sgd_options() if o["weight_decay"] == 0], ids=option_id
)
def test_sgd_with_sparse_grads_follows_torch_sgd(options, dtype):
    assert_sparse_trajectories_match("sgd", options, dtype)


@pytest.mark.filterwarnings("ignore:Sparse invariant checks")  # raised inside torch.optim
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize(
    "options", [o for o in adagrad_options() if o["weight_decay"] == 0], ids=option_id
)
def test_adagrad_with_sparse_grads_follows_torch_adagrad(options, dtype):
    assert_sparse_trajectories_match("adagrad", options, dtype)


@pytest.mark.parametrize("rule", ["sgd", "adagrad"])
def test_sparse_grad_with_weight_decay_raises_like_torch(rule):
    options = dict(FULL_OPTIONS[rule], maximize=False)
    param = torch.randn(10, 3)
    grad = make_sparse_grad(param, torch.Generator().manual_seed(6))
    torch_param = param.clone()
    torch_param.grad = grad.clone()
    with pytest.raises(RuntimeError) as torch_error:
        make_torch_optimizer(rule, [torch_param], options).step()
    with pytest.raises(RuntimeError) as our_error:
        ReferenceOptimizer(rule, [param], options).step([grad])
    assert str(our_error.value) == str(torch_error.value)


# Packaging: the reference is the path that works where Triton is absent.


def test_reference_runs_without_triton():
    path = Path(reference.__file__)
    script = (
        "import importlib.util, sys, torch\n"
        "sys.modules['triton'] = None\n"  # any import of triton now raises ImportError
        f"spec = importlib.util.spec_from_file_location('reference', {str(path)!r})\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n"
        "p = torch.ones(3)\n"
        "module.sgd([p], [torch.ones(3)], [None], lr=0.5, weight_decay=0.0, momentum=0.0,"
        " dampening=0.0, nesterov=False, maximize=False)\n"
        "assert p.tolist() == [0.5, 0.5, 0.5], p\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True)
