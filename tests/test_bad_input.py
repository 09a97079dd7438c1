"""Specification of bad input: invalid arguments, params and gradients fail as in torch.optim
(the same exception type, computed by calling torch.optim with the same input), switches fusedopt
cannot honour raise NotImplementedError, and sparse gradients behave as in torch."""
import inspect
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.testing import assert_close

import fusedopt
from fusedopt.registry import RULES

# torch.optim.Adagrad builds sparse tensors without invariant checks; its warning says nothing here.
pytestmark = pytest.mark.filterwarnings("ignore:Sparse invariant checks")

NAMES = [info.optimizer.__name__ for info in RULES.values()]
TOL = dict(rtol=1e-5, atol=1e-6)


def make_params(seed=0, shapes=((4, 3), (5,)), device="cpu"):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator).to(device).requires_grad_() for shape in shapes]


def torch_exception(build):
    """The exception type torch.optim raises for this input (the test is meaningless without one)."""
    try:
        build()
    except Exception as error:  # noqa: BLE001 - whatever torch raises is the expectation
        return type(error)
    pytest.fail("torch.optim accepts this input")


def assert_raises_like_torch(build_theirs, build_ours):
    expected = torch_exception(build_theirs)
    with pytest.raises(Exception) as info:
        build_ours()
    assert info.type is expected, (
        f"fusedopt raised {info.type.__name__}: {info.value}; torch raises {expected.__name__}")
    assert str(info.value), "the error message is empty"


# ---- constructor arguments ----

TENSOR_PAIR = torch.tensor([0.1, 0.2])
SHARED_INVALID = [
    dict(lr=-1e-3),
    dict(lr=torch.tensor(-1e-3)),
    dict(lr=TENSOR_PAIR),
    dict(weight_decay=-0.1),
    dict(lr="0.1"),
    dict(lr=None),
    dict(unknown_option=1),
]
INVALID = {
    "SGD": SHARED_INVALID + [
        dict(momentum=-0.5),
        dict(nesterov=True),
        dict(nesterov=True, momentum=0.9, dampening=0.1),
        dict(fused=True, foreach=True),
        dict(fused=True, differentiable=True),
        dict(amsgrad=True),
    ],
    "Adam": SHARED_INVALID + [
        dict(eps=-1e-8),
        dict(lr=float("nan")),
        dict(betas=(-0.1, 0.999)),
        dict(betas=(1.0, 0.999)),
        dict(betas=(0.9, 1.0)),
        dict(betas=(0.9, -0.5)),
        dict(betas=(0, 0.999)),
        dict(betas=(0.9, 0)),
        dict(betas=(0.9,)),
        dict(betas=0.9),
        dict(betas=(torch.tensor(0.9), 0.999)),
        dict(betas=(torch.tensor([0.9, 0.9]), torch.tensor(0.999))),
        dict(betas=(torch.tensor(0.9), torch.tensor([0.99, 0.99]))),
        dict(lr=torch.tensor(1e-3), foreach=True),
        dict(betas=(torch.tensor(0.9), torch.tensor(0.999)), foreach=True),
        dict(fused=True, foreach=True),
        dict(fused=True, differentiable=True),
        dict(momentum=0.9),
    ],
    "Adagrad": SHARED_INVALID + [
        dict(lr_decay=-0.1),
        dict(initial_accumulator_value=-0.1),
        dict(eps=-1e-10),
        dict(lr=float("nan")),
        dict(fused=True, foreach=True),
        dict(fused=True, differentiable=True),
    ],
    "RMSprop": SHARED_INVALID + [
        dict(eps=-1e-8),
        dict(momentum=-0.1),
        dict(alpha=-0.1),
        dict(lr=float("nan")),
        dict(fused=True),
    ],
}
INVALID["AdamW"] = [options for options in INVALID["Adam"] if "momentum" not in options] + [
    dict(decoupled_weight_decay=False),
]
INVALID["RAdam"] = SHARED_INVALID + [
    dict(eps=-1e-8),
    dict(lr=float("nan")),
    dict(betas=(-0.1, 0.999)),
    dict(betas=(1.0, 0.999)),
    dict(betas=(0.9, 1.0)),
    dict(betas=(0.9,)),
    dict(betas=0.9),
    dict(fused=True),
    dict(amsgrad=True),
]


def _id(name, options):
    text = ",".join(f"{key}={value}" for key, value in options.items())
    return f"{name}-{text}".replace(" ", "").replace("\n", "")


INVALID_CASES = [pytest.param(name, options, id=_id(name, options)) for name in NAMES for options in INVALID[name]]


@pytest.mark.parametrize("name, options", INVALID_CASES)
def test_invalid_constructor_argument_raises_torch_exception_type(name, options, backend, device):
    assert_raises_like_torch(
        lambda: getattr(torch.optim, name)(make_params(), **options),
        lambda: getattr(fusedopt, name)(make_params(), backend=backend, **options),
    )


UNSUPPORTED_SWITCHES = [
    pytest.param(name, switch, id=f"{name}-{switch}")
    for name in NAMES
    for switch in ("differentiable",)
    if switch in inspect.signature(getattr(torch.optim, name)).parameters
]


@pytest.mark.parametrize("name, switch", UNSUPPORTED_SWITCHES)
def test_unsupported_switch_raises_not_implemented_error(name, switch, backend, device):
    with pytest.raises(NotImplementedError) as info:
        getattr(fusedopt, name)(make_params(), backend=backend, **{switch: True})
    assert str(info.value)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("value", ["bogus", "TRITON", "", "cuda", 1])
def test_invalid_backend_argument_raises_value_error(name, value):
    with pytest.raises(ValueError) as info:
        getattr(fusedopt, name)(make_params(), backend=value)
    assert str(info.value)


@pytest.mark.parametrize("name", NAMES)
def test_invalid_backend_environment_variable_raises_value_error(name, monkeypatch):
    monkeypatch.setenv("FUSEDOPT_BACKEND", "bogus")
    with pytest.raises(ValueError) as info:
        getattr(fusedopt, name)(make_params())
    assert str(info.value)


# ---- params ----


def _non_leaf():
    return [torch.randn(3, requires_grad=True) * 2]


def _duplicated_across_groups():
    p, q = make_params()
    return [{"params": [p, q]}, {"params": [p]}]


BAD_PARAMS = {
    "empty-list": lambda: [],
    "empty-generator": lambda: iter(()),
    "non-leaf": _non_leaf,
    "bare-tensor": lambda: make_params()[0],
    "not-a-tensor": lambda: [1.0, 2.0],
    "duplicated-across-groups": _duplicated_across_groups,
    "group-without-params": lambda: [{"lr": 0.1}],
    "group-set": lambda: [{"params": set(make_params())}],
}


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("make_bad", BAD_PARAMS.values(), ids=BAD_PARAMS.keys())
def test_bad_params_raise_torch_exception_type(name, make_bad, backend, device):
    assert_raises_like_torch(
        lambda: getattr(torch.optim, name)(make_bad()),
        lambda: getattr(fusedopt, name)(make_bad(), backend=backend),
    )


@pytest.mark.parametrize("name", NAMES)
def test_add_param_group_with_a_param_already_present_raises_like_torch(name, backend, device):
    def add_again(optimizer):
        optimizer.add_param_group({"params": [optimizer.param_groups[0]["params"][0]], "lr": 0.5})

    assert_raises_like_torch(
        lambda: add_again(getattr(torch.optim, name)(make_params())),
        lambda: add_again(getattr(fusedopt, name)(make_params(), backend=backend)),
    )


@pytest.mark.parametrize("name", NAMES)
def test_add_param_group_with_a_non_leaf_raises_like_torch(name, backend, device):
    def add_non_leaf(optimizer):
        optimizer.add_param_group({"params": _non_leaf()})

    assert_raises_like_torch(
        lambda: add_non_leaf(getattr(torch.optim, name)(make_params())),
        lambda: add_non_leaf(getattr(fusedopt, name)(make_params(), backend=backend)),
    )


# ---- sparse gradients ----


def sparse_grad(shape, generator, device, step=0):
    """Rows 0, 2 (twice, uncoalesced) and the last one of a (rows, cols) gradient."""
    rows = torch.tensor([[0, 2, 2, shape[0] - 1]])
    values = torch.randn(4, shape[1], generator=generator)
    return torch.sparse_coo_tensor(rows, values, shape, check_invariants=True).to(device)


def dense_grad(shape, generator, device, step=0):
    return torch.randn(shape, generator=generator).to(device)


def run_with_grads(optimizer, params, grad_makers, steps, seed):
    """Steps with fresh grads; grad_makers[i](shape, generator, device, step) makes the grad of
    params[i]."""
    generator = torch.Generator().manual_seed(seed)
    for step in range(steps):
        for p, make in zip(params, grad_makers):
            p.grad = make(p.shape, generator, p.device, step)
        optimizer.step()


def _step_sparse_after(dense_steps, name, device, library, **extra):
    params = make_params(seed=1, shapes=((6, 3),), device=device)
    optimizer = getattr(library, name)(params, **extra)
    generator = torch.Generator().manual_seed(1)
    for _ in range(dense_steps):
        params[0].grad = dense_grad((6, 3), generator, device)
        optimizer.step()
    params[0].grad = sparse_grad((6, 3), generator, device)
    optimizer.step()


@pytest.mark.parametrize("name", ["Adam", "AdamW", "RMSprop", "RAdam"])
@pytest.mark.parametrize("backend", ["torch", "numba"])
def test_capturable_with_cpu_params_raises_assertion_error_like_torch(name, backend):
    """torch.optim takes capturable=True, then refuses CPU params at step() (CUDA graphs capture
    device work); the Triton interpreter, which runs the CUDA kernels on CPU tensors, takes them."""
    def step(library, **extra):
        param = torch.nn.Parameter(torch.ones(3))
        optimizer = getattr(library, name)([param], lr=0.1, capturable=True, **extra)
        param.grad = torch.ones(3)
        optimizer.step()

    assert torch_exception(lambda: step(torch.optim, foreach=False)) is AssertionError
    assert_raises_like_torch(lambda: step(torch.optim, foreach=False), lambda: step(fusedopt, backend=backend))


@pytest.mark.parametrize("name", ["Adam", "AdamW", "RMSprop"])
def test_sparse_grad_at_first_step_raises_runtime_error_like_torch(name, backend, device):
    assert torch_exception(lambda: _step_sparse_after(0, name, device, torch.optim)) is RuntimeError
    assert_raises_like_torch(lambda: _step_sparse_after(0, name, device, torch.optim),
                             lambda: _step_sparse_after(0, name, device, fusedopt, backend=backend))


@pytest.mark.parametrize("name", ["Adam", "AdamW", "RMSprop"])
def test_sparse_grad_after_dense_steps_raises_runtime_error_like_torch(name, backend, device):
    assert torch_exception(lambda: _step_sparse_after(2, name, device, torch.optim)) is RuntimeError
    assert_raises_like_torch(lambda: _step_sparse_after(2, name, device, torch.optim),
                             lambda: _step_sparse_after(2, name, device, fusedopt, backend=backend))


SPARSE_OPTIONS = [
    pytest.param("SGD", dict(lr=0.1), id="SGD"),
    pytest.param("SGD", dict(lr=0.1, momentum=0.9, dampening=0.2), id="SGD-momentum"),
    pytest.param("SGD", dict(lr=0.1, momentum=0.9, nesterov=True, maximize=True), id="SGD-nesterov-maximize"),
    pytest.param("Adagrad", dict(lr=0.1), id="Adagrad"),
    pytest.param("Adagrad", dict(lr=0.1, lr_decay=0.1, initial_accumulator_value=0.2, maximize=True),
                 id="Adagrad-lr_decay-initial_accumulator_value-maximize"),
]


def _compare_with_torch(name, options, backend, device, grad_makers, steps=4, seed=3):
    shapes = [(6, 3)] * len(grad_makers)
    ours_params, theirs_params = make_params(seed, shapes, device), make_params(seed, shapes, device)
    ours = getattr(fusedopt, name)(ours_params, backend=backend, **options)
    theirs = getattr(torch.optim, name)(theirs_params, **options)
    run_with_grads(ours, ours_params, grad_makers, steps, seed)
    run_with_grads(theirs, theirs_params, grad_makers, steps, seed)
    for got, want in zip(ours_params, theirs_params):
        assert_close(got.detach(), want.detach(), **TOL)
    for got, want in zip(ours_params, theirs_params):
        ours_state, theirs_state = ours.state[got], theirs.state[want]
        assert ours_state.keys() == theirs_state.keys()
        for key, value in theirs_state.items():
            mine = ours_state[key]
            assert mine.is_sparse == value.is_sparse, key
            if key == "step":
                assert float(mine) == float(value)
            else:
                assert_close(mine.to_dense(), value.to_dense(), **TOL)


@pytest.mark.parametrize("name, options", SPARSE_OPTIONS)
def test_sparse_grads_give_torch_results(name, options, backend, device):
    _compare_with_torch(name, options, backend, device, [sparse_grad])


@pytest.mark.parametrize("name, options", SPARSE_OPTIONS)
def test_sparse_and_dense_grads_in_one_group_give_torch_results(name, options, backend, device):
    _compare_with_torch(name, options, backend, device, [dense_grad, sparse_grad, dense_grad])


@pytest.mark.parametrize("name, options", [case for case in SPARSE_OPTIONS if "nesterov" not in case.id])
def test_grad_turning_sparse_between_steps_gives_torch_results(name, options, backend, device):
    def dense_then_sparse(shape, generator, device, step):
        return (dense_grad if step < 2 else sparse_grad)(shape, generator, device)

    _compare_with_torch(name, options, backend, device, [dense_then_sparse, dense_grad], steps=4)


def test_nesterov_grad_turning_sparse_after_a_dense_buffer_raises_like_torch(backend, device):
    # torch adds the dense momentum buffer to the sparse grad, which torch cannot do.
    def run(library, **extra):
        params = make_params(seed=5, shapes=((6, 3),), device=device)
        optimizer = getattr(library, "SGD")(params, lr=0.1, momentum=0.9, nesterov=True, **extra)
        generator = torch.Generator().manual_seed(5)
        params[0].grad = dense_grad((6, 3), generator, device)
        optimizer.step()
        params[0].grad = sparse_grad((6, 3), generator, device)
        optimizer.step()

    assert_raises_like_torch(lambda: run(torch.optim), lambda: run(fusedopt, backend=backend))


@pytest.mark.parametrize("name", ["SGD", "Adagrad"])
def test_sparse_grad_with_weight_decay_raises_like_torch(name, backend, device):
    def step_sparse(library, **extra):
        params = make_params(seed=4, shapes=((6, 3),), device=device)
        optimizer = getattr(library, name)(params, lr=0.1, weight_decay=0.1, **extra)
        params[0].grad = sparse_grad((6, 3), torch.Generator().manual_seed(4), device)
        optimizer.step()

    assert_raises_like_torch(lambda: step_sparse(torch.optim), lambda: step_sparse(fusedopt, backend=backend))


# ---- the triton backend where it cannot run ----


def run_python(code, env_changes):
    env = {key: value for key, value in os.environ.items() if key not in ("TRITON_INTERPRET", "FUSEDOPT_BACKEND")}
    env.update(env_changes)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          timeout=120)


STEP_EACH_CLASS_ON_CPU = """
    import torch
    import fusedopt

    for name in %r:
        p = torch.randn(5, generator=torch.Generator().manual_seed(0)).requires_grad_()
        before = p.detach().clone()
        p.grad = torch.randn(5, generator=torch.Generator().manual_seed(1))
        optimizer = getattr(fusedopt, name)([p], lr=0.1, backend="triton")
        try:
            optimizer.step()
        except RuntimeError as error:
            assert str(error), name
            assert torch.equal(p.detach(), before), name + ": params changed before the error"
            print(name, "RuntimeError", str(error).replace(chr(10), " "))
        else:
            print(name, "stepped")
""" % (NAMES,)


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the kernels are compiled, not interpreted")
def test_triton_backend_on_cpu_without_cuda_turns_the_interpreter_on():
    code = STEP_EACH_CLASS_ON_CPU + "\n    print(fusedopt.kernels.launch_count())\n"
    result = run_python(code, {})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[:-1] == [f"{name} stepped" for name in NAMES], result.stdout
    assert int(lines[-1]) == len(NAMES)


def test_triton_backend_on_cpu_tensors_with_the_interpreter_off_raises_runtime_error():
    result = run_python(STEP_EACH_CLASS_ON_CPU, {"TRITON_INTERPRET": "0"})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == len(NAMES), result.stdout
    for name, line in zip(NAMES, lines):
        assert line.startswith(f"{name} RuntimeError "), line
        assert "TRITON_INTERPRET" in line, line
