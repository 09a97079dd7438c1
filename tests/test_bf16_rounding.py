"""bf16 params without fp32 copies in the model: stochastic rounding of the updated param
(unbiased, reproducible from the seed and the step) and fp32 master weights in the optimizer state
(the bf16 param is the master rounded to nearest), on every backend."""
import pytest
import torch

import fusedopt
from fusedopt.registry import RULES as REGISTRY
from fusedopt.rounding import split_master
from helpers import assign_grads, make_grads, make_params

from conftest import kernels_runnable

RULES = {name: (info.optimizer, info.stateful) for name, info in REGISTRY.items()}
ULP_AT_ONE = 2.0**-7  # bf16 spacing in [1, 2)
BACKENDS = ["torch", "triton", "kernels"]  # on the CPU: the reference, Triton's and numba's kernels


@pytest.fixture
def rounding_backend(backend, device):
    if backend == "triton" and not kernels_runnable(device):
        pytest.skip("the kernels need CUDA or TRITON_INTERPRET=1")
    return backend


@pytest.mark.parametrize("fraction", [0.25, 0.5, 0.875])
def test_stochastic_rounding_is_unbiased(fraction, rounding_backend, device):
    """An SGD step of a fraction of an ulp, from 1.0: each element moves up by one ulp with that
    probability (never to anything else), so the mean is the exact update, and nearest rounding
    would have moved none (fraction < 1/2) or all of them."""
    numel = 40_000
    param = torch.ones(numel, dtype=torch.bfloat16, device=device, requires_grad=True)
    optimizer = fusedopt.SGD([param], lr=1.0, stochastic_rounding=True, backend=rounding_backend)
    param.grad = torch.full_like(param, -fraction * ULP_AT_ONE)
    optimizer.step()
    values = param.detach().float()
    assert set(values.unique().tolist()) <= {1.0, 1.0 + ULP_AT_ONE}
    moved = (values > 1.0).float().mean().item()
    sigma = (fraction * (1 - fraction) / numel) ** 0.5
    assert abs(moved - fraction) < 5 * sigma


def test_stochastic_rounding_is_unbiased_over_many_steps(rounding_backend, device):
    """Many steps each below half an ulp: nearest rounding never moves the param, stochastic
    rounding follows the exact fp32 trajectory on average."""
    param = torch.ones(4096, dtype=torch.bfloat16, device=device, requires_grad=True)
    optimizer = fusedopt.SGD([param], lr=1.0, stochastic_rounding=True, backend=rounding_backend)
    for _ in range(20):
        param.grad = torch.full_like(param, -0.1 * ULP_AT_ONE)
        optimizer.step()
    expected = 1.0 + 20 * 0.1 * ULP_AT_ONE
    assert param.detach().float().mean().item() == pytest.approx(expected, abs=0.02 * ULP_AT_ONE * 20 ** 0.5)


def test_each_step_draws_fresh_random_bits(rounding_backend, device):
    """Steps of 0.3 ulp from 1.0: at each step an element rounds up with probability 0.3, whatever
    the steps before drew, so after k steps a fraction 1 - 0.7^k has moved. Bits drawn alike at
    every step would move the same 30% each time."""
    numel = 20_000
    param = torch.ones(numel, dtype=torch.bfloat16, device=device, requires_grad=True)
    optimizer = fusedopt.SGD([param], lr=1.0, stochastic_rounding=True, backend=rounding_backend)
    for step in range(1, 5):
        param.grad = torch.full_like(param, -0.3 * ULP_AT_ONE)
        optimizer.step()
        moved = (param.detach().float() > 1.0).float().mean().item()
        expected = 1 - 0.7**step
        assert abs(moved - expected) < 5 * (expected * (1 - expected) / numel) ** 0.5, (step, moved, expected)


@pytest.mark.parametrize("rule", list(RULES))
def test_stochastic_rounding_is_reproducible_from_seed_and_step(rule, rounding_backend, device):
    optimizer_class, options = RULES[rule]

    def run(seed):
        generator = torch.Generator().manual_seed(1)
        params = make_params(torch.bfloat16, device, generator, shapes=[(7,), (4097,)], odd_layouts=False)
        optimizer = optimizer_class(params, lr=0.01, stochastic_rounding=True, rounding_seed=seed,
                                    backend=rounding_backend, **options)
        for _ in range(3):
            assign_grads(params, make_grads(params, generator))
            optimizer.step()
        return [p.detach().clone() for p in params]

    first, again, other = run(5), run(5), run(6)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert any(not torch.equal(a, b) for a, b in zip(first, other))


@pytest.mark.parametrize("rule", list(RULES))
def test_master_weights_follow_the_fp32_trajectory(rule, rounding_backend, device):
    """With master_weights=True the fp32 master copy takes the same steps as an fp32 param would
    (given the same bf16 grads and bf16 states), and the bf16 param is that master rounded to
    nearest, ties away from zero (as beside a remainder); updates far below a bf16 ulp accumulate in the master."""
    optimizer_class, options = RULES[rule]
    generator = torch.Generator().manual_seed(2)
    params = make_params(torch.bfloat16, device, generator, shapes=[(7,), (33, 17), (4097,)], odd_layouts=False)
    optimizer = optimizer_class(params, lr=1e-4, master_weights=True, backend=rounding_backend, **options)
    start = [p.detach().float() for p in params]
    for _ in range(4):
        assign_grads(params, make_grads(params, generator))
        optimizer.step()
    for p, p0 in zip(params, start):
        master = optimizer.state[p]["master_param"]
        assert master.dtype == torch.float32 and master.shape == p.shape
        assert torch.equal(split_master(master)[0], p.detach())
        assert (master - p0).abs().max() > 0  # moved, though most steps are below a bf16 ulp


def test_master_weights_are_saved_in_state_dict_and_loaded(rounding_backend, device):
    generator = torch.Generator().manual_seed(4)
    params = make_params(torch.bfloat16, device, generator, shapes=[(7,)], odd_layouts=False)
    optimizer = fusedopt.AdamW(params, lr=1e-3, master_weights=True, backend=rounding_backend)
    assign_grads(params, make_grads(params, generator))
    optimizer.step()
    saved = optimizer.state_dict()
    assert saved["state"][0]["master_param"].dtype == torch.float32
    clone = fusedopt.AdamW(params, lr=1e-3, master_weights=True, backend=rounding_backend)
    clone.load_state_dict(saved)
    assert torch.equal(clone.state[params[0]]["master_param"], optimizer.state[params[0]]["master_param"])


def test_other_dtypes_round_to_nearest_as_before(rounding_backend, device):
    """The options concern bf16 params: an fp32 param takes the plain update and gets no master."""
    generator = torch.Generator().manual_seed(5)
    params = make_params(torch.float32, device, generator, shapes=[(7,)], odd_layouts=False, complex_params=False)
    twins = [p.detach().clone().requires_grad_() for p in params]
    rounded = fusedopt.Adam(params, lr=0.01, master_weights=True, backend=rounding_backend)
    plain = fusedopt.Adam(twins, lr=0.01, backend=rounding_backend)
    grads = make_grads(params, generator)
    assign_grads(params, grads)
    assign_grads(twins, [g.clone() for g in grads])
    rounded.step()
    plain.step()
    assert torch.equal(params[0], twins[0])
    assert "master_param" not in rounded.state[params[0]]


def test_stochastic_rounding_and_master_weights_are_exclusive():
    with pytest.raises(ValueError, match="alternatives"):
        fusedopt.Adam([torch.zeros(3, requires_grad=True)], stochastic_rounding=True, master_weights=True)


@pytest.mark.parametrize("seed", [-1, 2.5, "7", True])
def test_bad_rounding_seed_raises_value_error(seed):
    with pytest.raises(ValueError):
        fusedopt.SGD([torch.zeros(3, requires_grad=True)], lr=0.1, stochastic_rounding=True, rounding_seed=seed)


@pytest.mark.parametrize("rounding", [dict(master_weights=True), dict(master_weights="remainder"),
                                      dict(stochastic_rounding=True)])
def test_sgds_first_momentum_buffer_of_a_bf16_param_is_bf16_on_the_reference_too(rounding):
    """The step of a bf16 param through fp32 (its master, or a copy rounded back) makes SGD's first
    buffer from fp32 values: it is kept in the param's dtype, as torch.optim and the kernels keep it."""
    param = torch.nn.Parameter(torch.randn(64, 128).bfloat16())
    optimizer = fusedopt.SGD([param], lr=0.05, momentum=0.9, weight_decay=0.1, backend="torch", **rounding)
    param.grad = torch.randn(64, 128).bfloat16()
    optimizer.step()
    assert optimizer.state[param]["momentum_buffer"].dtype == torch.bfloat16
