"""Specification of bad input: invalid arguments, params and gradients fail as in torch.optim
(the same exception type, computed by calling torch.optim with the same input), switches fusedopt
cannot honour raise NotImplementedError, and sparse gradients behave as in torch."""
import functools
import inspect
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.testing import assert_close

import fusedopt
from helpers import BY_CLASS, NAMES, oracle_class

# torch.optim.Adagrad builds sparse tensors without invariant checks; its warning says nothing here.
pytestmark = pytest.mark.filterwarnings("ignore:Sparse invariant checks")

TOL = dict(rtol=1e-5, atol=1e-6)
# The classes that take sparse grads (through the reference, as torch does), and those that refuse them
SPARSE = [name for name, info in BY_CLASS.items() if info.sparse_options]
DENSE_ONLY = [name for name in NAMES if name not in SPARSE]
# The classes that take capturable=True
CAPTURABLE = [name for name in NAMES if "capturable" in inspect.signature(getattr(fusedopt, name)).parameters]


def make_params(seed=0, shapes=((4, 3), (5,)), device="cpu"):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator).to(device).requires_grad_() for shape in shapes]


def torch_like(name):
    """The torch.optim class of the rule `name`, or where torch.optim has none, its base class
    (what a bad list of params or groups meets first in every optimizer)."""
    twin = BY_CLASS[name].twin
    return twin or (lambda params, **options: torch.optim.Optimizer(params, dict(lr=1e-3, **options)))


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


def _id(name, options):
    text = ",".join(f"{key}={value}" for key, value in options.items())
    return f"{name}-{text}".replace(" ", "").replace("\n", "")


INVALID_CASES = [pytest.param(name, case, id=_id(name, case.options))
                 for name, info in BY_CLASS.items() for case in info.error_inputs]


@pytest.mark.parametrize("name, case", INVALID_CASES)
def test_invalid_constructor_argument_raises_torch_exception(name, case, backend, device):
    """The registry's bad input raises its exception type with a message that says what is wrong,
    as torch.optim does (checked against torch.optim's own class where it has the rule)."""
    if BY_CLASS[name].twin is not None:
        assert torch_exception(lambda: BY_CLASS[name].twin(make_params(), **case.options)) is case.error
    with pytest.raises(case.error, match=case.match):
        getattr(fusedopt, name)(make_params(), backend=backend, **case.options)


@pytest.mark.parametrize("name", NAMES)
def test_a_mistyped_keyword_names_the_class_as_torch_does(name):
    """Python's TypeError for a keyword the class does not take names the class (not the shared base
    class that takes the arguments every class shares), word for word as torch.optim's class."""
    def message(cls):
        with pytest.raises(TypeError) as info:
            cls(make_params(), lrr=0.1)
        return str(info.value)

    assert message(getattr(fusedopt, name)) == f"{name}.__init__() got an unexpected keyword argument 'lrr'"
    if BY_CLASS[name].twin is not None:
        assert message(getattr(fusedopt, name)) == message(BY_CLASS[name].twin)


UNSUPPORTED_SWITCHES = [
    pytest.param(name, switch, id=f"{name}-{switch}")
    for name in NAMES
    for switch in ("differentiable",)
    if switch in inspect.signature(getattr(fusedopt, name)).parameters
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
        lambda: torch_like(name)(make_bad()),
        lambda: getattr(fusedopt, name)(make_bad(), backend=backend),
    )


@pytest.mark.parametrize("name", NAMES)
def test_add_param_group_with_a_param_already_present_raises_like_torch(name, backend, device):
    def add_again(optimizer):
        optimizer.add_param_group({"params": [optimizer.param_groups[0]["params"][0]], "lr": 0.5})

    assert_raises_like_torch(
        lambda: add_again(torch_like(name)(make_params())),
        lambda: add_again(getattr(fusedopt, name)(make_params(), backend=backend)),
    )


@pytest.mark.parametrize("name", NAMES)
def test_add_param_group_with_a_non_leaf_raises_like_torch(name, backend, device):
    def add_non_leaf(optimizer):
        optimizer.add_param_group({"params": _non_leaf()})

    assert_raises_like_torch(
        lambda: add_non_leaf(torch_like(name)(make_params())),
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


def assert_raises_as_torch_does(expected, name, run, backend):
    """run(torch.optim's class of the rule) raises `expected`, and run(fusedopt's) the same type;
    for a rule torch.optim has not, fusedopt's raises `expected`."""
    twin = BY_CLASS[name].twin
    ours = functools.partial(getattr(fusedopt, name), backend=backend)
    if twin is None:
        with pytest.raises(expected):
            run(ours)
        return
    assert torch_exception(lambda: run(functools.partial(twin, foreach=False))) is expected
    assert_raises_like_torch(lambda: run(functools.partial(twin, foreach=False)), lambda: run(ours))


def _step_sparse_after(dense_steps, device, optimizer_class):
    params = make_params(seed=1, shapes=((6, 3),), device=device)
    optimizer = optimizer_class(params)
    generator = torch.Generator().manual_seed(1)
    for _ in range(dense_steps):
        params[0].grad = dense_grad((6, 3), generator, device)
        optimizer.step()
    params[0].grad = sparse_grad((6, 3), generator, device)
    optimizer.step()


@pytest.mark.parametrize("name", CAPTURABLE)
@pytest.mark.parametrize("backend", ["torch", "numba"])
def test_capturable_with_cpu_params_raises_assertion_error_like_torch(name, backend):
    """torch.optim takes capturable=True, then refuses CPU params at step() (CUDA graphs capture
    device work); the Triton interpreter, which runs the CUDA kernels on CPU tensors, takes them."""
    def step(optimizer_class):
        param = torch.nn.Parameter(torch.ones(3))
        optimizer = optimizer_class([param], lr=0.1, capturable=True)
        param.grad = torch.ones(3)
        optimizer.step()

    assert_raises_as_torch_does(AssertionError, name, step, backend)


@pytest.mark.parametrize("name", DENSE_ONLY)
@pytest.mark.parametrize("dense_steps", [0, 2])
def test_sparse_grad_raises_runtime_error_like_torch(name, dense_steps, backend, device):
    """At the first step, or after dense steps."""
    assert_raises_as_torch_does(RuntimeError, name, functools.partial(_step_sparse_after, dense_steps, device),
                                backend)


@pytest.mark.parametrize("name", [name for name in DENSE_ONLY if BY_CLASS[name].twin is not None])
def test_sparse_grad_refusal_says_what_torch_says(name):
    messages = []
    for optimizer_class in (BY_CLASS[name].twin, getattr(fusedopt, name)):
        with pytest.raises(RuntimeError) as info:
            _step_sparse_after(0, "cpu", optimizer_class)
        messages.append(str(info.value))
    assert messages[1] == messages[0]


SPARSE_OPTIONS = [pytest.param(name, options, id="-".join([name, *options]))
                  for name in SPARSE for options in BY_CLASS[name].sparse_options]


def _compare_with_torch(name, options, backend, device, grad_makers, steps=4, seed=3):
    shapes = [(6, 3)] * len(grad_makers)
    ours_params, theirs_params = make_params(seed, shapes, device), make_params(seed, shapes, device)
    ours = getattr(fusedopt, name)(ours_params, backend=backend, **options)
    theirs = oracle_class(name)(theirs_params, **options)
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
        optimizer = library.SGD(params, lr=0.1, momentum=0.9, nesterov=True, **extra)
        generator = torch.Generator().manual_seed(5)
        params[0].grad = dense_grad((6, 3), generator, device)
        optimizer.step()
        params[0].grad = sparse_grad((6, 3), generator, device)
        optimizer.step()

    assert_raises_like_torch(lambda: run(torch.optim), lambda: run(fusedopt, backend=backend))


@pytest.mark.parametrize("name", SPARSE)
def test_sparse_grad_with_weight_decay_raises_like_torch(name, backend, device):
    def step_sparse(optimizer_class):
        params = make_params(seed=4, shapes=((6, 3),), device=device)
        optimizer = optimizer_class(params, lr=0.1, weight_decay=0.1)
        params[0].grad = sparse_grad((6, 3), torch.Generator().manual_seed(4), device)
        optimizer.step()

    assert_raises_as_torch_does(RuntimeError, name, step_sparse, backend)


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


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the kernels are compiled, not interpreted")
def test_the_interpreter_turned_on_after_triton_was_imported_runs_every_kernel():
    """fusedopt's import loads triton (through torch.compile's machinery) before the interpreter is
    on: the library functions the kernels call (reductions of 8-bit blocks and of grad norms,
    Philox bits) still run, and the results are those of a process started with it on."""
    code = """
        import torch
        import fusedopt

        generator = torch.Generator().manual_seed(0)
        for options in (dict(state_precision="8bit"), dict(state_precision="8bit", state_rounding="stochastic"),
                        dict(max_grad_norm=1.0)):
            params = [torch.nn.Parameter(torch.randn(128, 64, generator=generator))]
            optimizer = fusedopt.AdamW(params, backend="triton", **options)
            for _ in range(2):
                params[0].grad = torch.randn(128, 64, generator=generator)
                optimizer.step()
            print(params[0].detach().double().sum().item())
    """
    lines = [run_python(code, env).stdout.split() for env in ({}, {"TRITON_INTERPRET": "1"})]
    assert len(lines[0]) == 3 and lines[0] == lines[1], lines


def test_triton_backend_on_cpu_tensors_with_the_interpreter_off_raises_runtime_error():
    result = run_python(STEP_EACH_CLASS_ON_CPU, {"TRITON_INTERPRET": "0"})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == len(NAMES), result.stdout
    for name, line in zip(NAMES, lines):
        assert line.startswith(f"{name} RuntimeError "), line
        assert "TRITON_INTERPRET" in line, line
