"""Specification of the plain-torch path (fusedopt.reference, driven by each rule's class with
backend="torch"): every rule follows torch.optim's single-tensor trajectory exactly, under every
combination of its options. Params and every state are compared with torch.optim (foreach=False)
after each step."""


import pytest
import torch
from torch.testing import assert_close

from fusedopt import reference
from fusedopt.registry import RULES as REGISTRY
from helpers import RULES, assign_grads, clone_params, make_grads, make_params, reference_optimizer, torch_optimizer

STEPS = 20
EXACT = dict(rtol=0, atol=0)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tensors here are small: intra-op threads only add contention on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def richest(rule):
    """The rule's richest options, with a power-of-two weight decay: weight_decay * param is then
    exact in fp32 and fp64 alike, so an effective gradient that cancels to zero does so in both
    (Adagrad and RMSprop divide it by about eps, which would magnify the last-bit difference in
    the 16-bit tests)."""
    return dict(REGISTRY[rule].richest[0], weight_decay=0.125)


def assert_same_states(ours, theirs, **tolerance):
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        assert ours[key].dtype == value.dtype, key
        assert ours[key].stride() == value.stride(), key
        assert_close(ours[key], value, **tolerance, msg=lambda m: f"state {key!r}: {m}")


def assert_trajectories_match(rule, options, dtype, tolerance=EXACT, steps=STEPS, seed=0, oracle=None):
    """fp32/fp64 params of every shape and layout (and complex ones, as real views) in one group,
    beside torch.optim (or `oracle(params)`)."""
    generator = torch.Generator().manual_seed(seed)
    ours = make_params(dtype, "cpu", generator)
    theirs = clone_params(ours)
    ours_optimizer = reference_optimizer(rule, ours, **options)
    torch_optimizer_ = (oracle or (lambda params: torch_optimizer(rule, params, **options)))(theirs)
    for step in range(steps):
        grads = make_grads(ours, generator)
        assign_grads(ours, grads)
        assign_grads(theirs, grads)
        torch_optimizer_.step()
        ours_optimizer.step()
        for i, (p_ours, p_theirs) in enumerate(zip(ours, theirs)):
            where = f"step {step + 1}, param {i} {tuple(p_ours.shape)}"
            assert_close(p_ours, p_theirs, **tolerance, msg=lambda m: f"{where}: {m}")
            assert_same_states(ours_optimizer.state[p_ours], torch_optimizer_.state[p_theirs], **tolerance)


def option_id(options):
    return ",".join(f"{k}={v}" for k, v in options.items()) or "defaults"


# The rules torch.optim has (for the others, this reference is the oracle)
TWINNED = [rule for rule in RULES if REGISTRY[rule].twin is not None]
EVERY_COMBINATION = [(rule, options) for rule in TWINNED for options in REGISTRY[rule].every_combination()]


# Trajectories against torch.optim, fp32 / fp64 (with complex params), every shape in one group.


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("case", EVERY_COMBINATION, ids=lambda case: f"{case[0]}-{option_id(case[1])}")
def test_reference_follows_torch_optim_exactly(case, dtype):
    rule, options = case
    assert_trajectories_match(rule, options, dtype)


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("lr_shape", [(), (1,)], ids=["0-dim", "1-element"])
def test_tensor_lr_follows_torch(rule, lr_shape):
    """torch.optim with the same tensor lr, or for a rule torch.optim has not, the lr as a number."""
    options = dict(richest(rule), lr=torch.full(lr_shape, REGISTRY[rule].default_lr))
    number_lr = dict(options, lr=REGISTRY[rule].default_lr)
    oracle = None if REGISTRY[rule].twin else (lambda params: reference_optimizer(rule, params, **number_lr))
    assert_trajectories_match(rule, options, torch.float32, oracle=oracle)


# In-place updates: the tensors torch.optim's state_dict holds are the ones that change.


def state_tensors(optimizer, params):
    return [t for p in params for t in optimizer.state[p].values()]


@pytest.mark.parametrize("rule", RULES)
def test_param_and_states_are_updated_in_place(rule):
    generator = torch.Generator().manual_seed(1)
    params = make_params(torch.bfloat16, "cpu", generator) + make_params(torch.float32, "cpu", generator)
    optimizer = reference_optimizer(rule, params, **richest(rule))
    assign_grads(params, make_grads(params, generator))
    optimizer.step()
    tensors = params + state_tensors(optimizer, params)
    before = [(t, t.data_ptr(), t.stride(), t.detach().clone()) for t in tensors]

    assign_grads(params, make_grads(params, generator))
    optimizer.step()

    tensors_after = params + state_tensors(optimizer, params)
    assert len(tensors_after) == len(before)
    for (tensor, data_ptr, stride, _), after in zip(before, tensors_after):
        assert after is tensor
        assert (tensor.data_ptr(), tensor.stride()) == (data_ptr, stride)
    for param, _, _, old_value in before[: len(params)]:
        if param.dtype == torch.float32:  # a bf16 param may move by less than half an ulp
            assert not torch.equal(param.detach(), old_value)


@pytest.mark.parametrize("rule", RULES)
def test_grads_are_never_written(rule):
    generator = torch.Generator().manual_seed(2)
    params = make_params(torch.float32, "cpu", generator) + make_params(torch.bfloat16, "cpu", generator)
    optimizer = reference_optimizer(rule, params, **richest(rule))  # maximize and weight decay on
    for _ in range(3):
        assign_grads(params, make_grads(params, generator))
        copies = [p.grad.clone() for p in params]
        optimizer.step()
        for p, copy in zip(params, copies):
            assert torch.equal(p.grad, copy)


def test_sgd_first_momentum_buffer_is_a_copy_of_the_grad():
    param, grad = torch.ones(5), torch.full((5,), 2.0)
    buf = reference.sgd_update(param, grad, None, lr=0.1, weight_decay=0.0, momentum=0.9, dampening=0.5,
                               nesterov=False, maximize=False)
    assert torch.equal(buf, grad)  # no dampening on the first step
    assert buf.data_ptr() != grad.data_ptr()


def test_sgd_without_momentum_keeps_no_buffer():
    buffers = reference.sgd([torch.ones(3), torch.ones(())], [torch.ones(3), torch.ones(())], [], lr=0.1,
                            weight_decay=0.0, momentum=0.0, dampening=0.0, nesterov=False, maximize=False)
    assert buffers == [None, None]


def test_state_steps_count_up_in_place():
    param, grad, step = torch.ones(4), torch.ones(4), torch.tensor(0.0)
    for expected in (1.0, 2.0, 3.0):
        reference.adagrad([param], [grad], [torch.zeros(4)], [step], lr=0.1, lr_decay=0.0, weight_decay=0.0,
                          eps=1e-10, maximize=False)
        assert step.item() == expected


# 16-bit params: math in fp32, one rounding back to the param dtype per step.


def step_with_the_same_grads(ours_optimizer, torch_optimizer_, ours, theirs, generator):
    """One step of each: fresh grads for our params, the same in float64 for torch's twins."""
    grads = make_grads(ours, generator)
    assign_grads(ours, grads)
    assign_grads(theirs, [g.double() for g in grads])
    torch_optimizer_.step()
    ours_optimizer.step()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("rule", RULES)
def test_low_precision_step_is_the_float64_step_rounded_once(rule, dtype):
    generator = torch.Generator().manual_seed(3)
    ours = make_params(dtype, "cpu", generator, [(), (7,), (1023,)], odd_layouts=False)
    theirs = clone_params(ours, torch.float64)
    ours_optimizer = reference_optimizer(rule, ours, **richest(rule))
    torch_optimizer_ = torch_optimizer(rule, theirs, **richest(rule))
    tolerance = dict(rtol=torch.finfo(dtype).eps, atol=1e-6)  # one ulp of the param dtype
    with torch.no_grad():
        for _ in range(STEPS):
            # start float64 from exactly our current state, so only one step's error is measured
            for p_ours, p_theirs in zip(ours, theirs):
                p_theirs.copy_(p_ours)
                for key, value in torch_optimizer_.state[p_theirs].items():
                    value.copy_(ours_optimizer.state[p_ours][key])
            step_with_the_same_grads(ours_optimizer, torch_optimizer_, ours, theirs, generator)
            for p_ours, p_theirs in zip(ours, theirs):
                assert p_ours.dtype == dtype
                assert_close(p_ours.double(), p_theirs, **tolerance)
                state = ours_optimizer.state[p_ours]
                for key, value in torch_optimizer_.state[p_theirs].items():
                    if key == "step":
                        assert_close(state[key], value, **EXACT)
                    else:
                        assert state[key].dtype == dtype
                        assert_close(state[key].double(), value, **tolerance)


@pytest.mark.parametrize("rule", RULES)
def test_bfloat16_trajectory_stays_close_to_float64_math(rule):
    # bf16 states round every step, so the two trajectories drift apart: a loose check of the
    # whole run, where the test above is the tight check of each step
    generator = torch.Generator().manual_seed(4)
    # params near 0.05, where a bf16 ulp is far below one step's change
    ours = [(0.05 * p.detach()).bfloat16().requires_grad_()
            for p in make_params(torch.float32, "cpu", generator, complex_params=False)]
    theirs = clone_params(ours, torch.float64)
    ours_optimizer = reference_optimizer(rule, ours, **richest(rule))
    torch_optimizer_ = torch_optimizer(rule, theirs, **richest(rule))
    for _ in range(STEPS):
        step_with_the_same_grads(ours_optimizer, torch_optimizer_, ours, theirs, generator)
    for p_ours, p_theirs in zip(ours, theirs):
        assert_close(p_ours.detach().double(), p_theirs.detach(), rtol=0.05, atol=0.05)


# Sparse gradients (nn.Embedding(sparse=True) style: rows named by index, repeats allowed).


def make_sparse_grad(param, generator, nnz=6):
    rows = torch.randint(0, param.shape[0], (1, nnz), generator=generator)
    rows[0, 1] = rows[0, 0]  # a repeated row: coalescing must sum it before the update
    values = torch.randn((nnz,) + param.shape[1:], dtype=param.dtype, generator=generator)
    return torch.sparse_coo_tensor(rows, values, param.shape, check_invariants=False)


def assert_sparse_trajectories_match(rule, options, dtype, steps=STEPS):
    generator = torch.Generator().manual_seed(5)
    ours = [torch.randn(shape, dtype=dtype, generator=generator).requires_grad_() for shape in [(10, 3), (12,)]]
    theirs = clone_params(ours)
    ours_optimizer = reference_optimizer(rule, ours, **options)
    torch_optimizer_ = torch_optimizer(rule, theirs, **options)
    for _ in range(steps):
        for p_ours, p_theirs in zip(ours, theirs):
            p_ours.grad = make_sparse_grad(p_ours, generator)
            p_theirs.grad = p_ours.grad.clone()
        torch_optimizer_.step()
        ours_optimizer.step()
        for p_ours, p_theirs in zip(ours, theirs):
            assert_close(p_ours, p_theirs, **EXACT)
            state, theirs_state = ours_optimizer.state[p_ours], torch_optimizer_.state[p_theirs]
            assert state.keys() == theirs_state.keys()
            for key, value in theirs_state.items():
                assert state[key].layout == value.layout, key
                assert_close(state[key].to_dense(), value.to_dense(), **EXACT)


def without_weight_decay(rule):
    return [options for options in REGISTRY[rule].every_combination() if options["weight_decay"] == 0]


# The rules that take sparse grads (the registry's)
SPARSE_RULES = [rule for rule, info in REGISTRY.items() if info.sparse_options]


@pytest.mark.filterwarnings("ignore:Sparse invariant checks")  # raised inside torch.optim.Adagrad
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("rule, options", [pytest.param(rule, options, id=f"{rule}-{option_id(options)}")
                                           for rule in SPARSE_RULES for options in without_weight_decay(rule)])
def test_sparse_grads_follow_torch(rule, options, dtype):
    assert_sparse_trajectories_match(rule, options, dtype)


@pytest.mark.parametrize("rule", SPARSE_RULES)
def test_sparse_grad_with_weight_decay_raises_like_torch(rule):
    options = dict(richest(rule), maximize=False)
    param = torch.randn(10, 3, requires_grad=True)
    param.grad = make_sparse_grad(param, torch.Generator().manual_seed(6))
    torch_param = param.detach().clone().requires_grad_()
    torch_param.grad = param.grad.clone()
    with pytest.raises(RuntimeError) as torch_error:
        torch_optimizer(rule, [torch_param], **options).step()
    with pytest.raises(RuntimeError) as our_error:
        reference_optimizer(rule, [param], **options).step()
    assert str(our_error.value) == str(torch_error.value)
