"""Shared test utilities: builders of parameter sets and gradients, runners that drive a fusedopt
optimizer beside its oracle (torch.optim, or for a rule torch.optim lacks, fusedopt's reference) or
beside the float64 reference, and one verbose allclose."""
import functools
import inspect

import pytest
import torch
from torch.testing import assert_close as torch_assert_close

import fusedopt
from fusedopt.registry import RULES as REGISTRY

# ---- the update rules under test (fusedopt.registry) ----

RULES = list(REGISTRY)
# Each rule's fusedopt class and its oracle class: torch.optim's, or where torch.optim has not the
# rule, fusedopt's class on its plain-torch reference path.
OPTIMIZERS = {name: (info.optimizer, info.oracle_class) for name, info in REGISTRY.items()}
# Learning rates large enough that a few steps move the params well away from their start.
DEFAULT_LR = {name: info.default_lr for name, info in REGISTRY.items()}
# Every rule and option, pruned to combinations that change the arithmetic.
GRID = [(name, options) for name, info in REGISTRY.items() for options in info.option_grid]
# Per rule the configurations with most options on: the fp64 and 16-bit runs.
RICH = [(name, options) for name, info in REGISTRY.items() for options in info.richest]
# Options under which every rule keeps state (SGD with momentum), for the scenario tests.
STATEFUL = {name: info.stateful for name, info in REGISTRY.items()}


def fused_optimizer(rule, params, backend="triton", **options):
    """A fusedopt optimizer of `rule` on `backend`: by default the Triton kernels (interpreted on
    CPU tensors)."""
    options.setdefault("lr", DEFAULT_LR[rule])
    return OPTIMIZERS[rule][0](params, backend=backend, **options)


def reference_optimizer(rule, params, **options):
    """A fusedopt optimizer of `rule` on its plain-torch path (fusedopt.reference)."""
    options.setdefault("lr", DEFAULT_LR[rule])
    return OPTIMIZERS[rule][0](params, backend="torch", **options)


def torch_optimizer(rule, params, **options):
    """The oracle of `rule`, the trajectory to match: torch.optim's single-tensor (for-loop)
    implementation, or where torch.optim has no such rule, fusedopt's plain-torch reference
    (RuleInfo.oracle)."""
    options.setdefault("lr", DEFAULT_LR[rule])
    return REGISTRY[rule].oracle(params, **options)


# ---- parameter sets ----

# 0-dim, one element, odd sizes, one past two 2048-element blocks, and 2-D.
SHAPES = [(), (1,), (7,), (1023,), (4097,), (33, 17)]


def randn(shape, dtype, device, generator):
    """Seeded normal values, drawn on the CPU in float64 so every device and dtype sees the same
    numbers (rounded to `dtype`); never zeros."""
    values = torch.randn(shape, generator=generator, dtype=torch.float64)
    if dtype.is_complex:
        values = torch.complex(values, torch.randn(shape, generator=generator, dtype=torch.float64))
    return values.to(device=device, dtype=dtype)


def make_params(dtype, device, generator, shapes=SHAPES, *, odd_layouts=True, complex_params=True):
    """Leaf params of `shapes`, plus (odd_layouts) a transposed, non-contiguous 2-D param and a
    param that starts one element past an aligned address (not 16-byte aligned), plus
    (complex_params, for fp32 and fp64) two complex params, updated as their real views in the
    same bucket."""
    params = [randn(shape, dtype, device, generator).requires_grad_() for shape in shapes]
    if odd_layouts:
        params.append(randn((17, 33), dtype, device, generator).t().requires_grad_())
        base = randn((1 + 1030,), dtype, device, generator)
        unaligned = base[1:].requires_grad_()
        assert unaligned.data_ptr() % 16 != 0
        params.append(unaligned)
    if complex_params and dtype in (torch.float32, torch.float64):
        complex_dtype = torch.complex64 if dtype == torch.float32 else torch.complex128
        params += [randn(shape, complex_dtype, device, generator).requires_grad_() for shape in [(5,), (3, 4)]]
    return params


def clone_params(params, dtype=None):
    """Independent leaf copies with the same values, shapes and strides (optionally converted);
    a param whose data pointer is unaligned keeps that misalignment."""
    copies = []
    for p in params:
        target = dtype if dtype is not None else p.dtype
        if p.is_complex() and dtype is not None:
            target = torch.complex128 if dtype == torch.float64 else p.dtype
        if p.data_ptr() % 16 != 0 and p.dim() == 1:
            base = torch.empty(p.numel() + 1, dtype=target, device=p.device)
            copy = base[1:]
            copy.copy_(p.detach())
        else:
            copy = torch.empty_like(p, dtype=target).copy_(p.detach())
        copies.append(copy.requires_grad_())
    return copies


def random_like(tensor, generator, scale=1.0):
    """Seeded random values in the layout (strides) of `tensor`."""
    values = randn(tensor.shape, tensor.dtype, "cpu", generator) * scale
    return torch.empty_like(tensor, memory_format=torch.preserve_format).copy_(values)


def make_grads(params, generator, scale=1.0):
    """One fresh gradient per param, laid out like the param (as autograd lays them out)."""
    return [random_like(p.detach(), generator, scale) for p in params]


def assign_grads(params, grads):
    """Give each param its own copy of the grad (None stays None)."""
    for p, g in zip(params, grads):
        p.grad = None if g is None else g.clone(memory_format=torch.preserve_format)


# ---- comparison ----


def describe_mismatch(actual, expected, rtol, atol):
    """A short account of where and how much `actual` differs from `expected`, or None when
    every element is within tolerance (NaNs in the same places, infinities equal)."""
    a = torch.view_as_real(actual) if actual.is_complex() else actual
    e = torch.view_as_real(expected) if expected.is_complex() else expected
    a, e = a.detach().cpu().double(), e.detach().cpu().double()
    finite = a.isfinite() & e.isfinite()
    diff = torch.where(finite, (a - e).abs(), torch.zeros_like(a))
    nan_mismatch = a.isnan() != e.isnan()
    inf_mismatch = (a.isinf() | e.isinf()) & (a != e) & ~(a.isnan() | e.isnan())
    bad = (diff > atol + rtol * e.abs()) & finite | nan_mismatch | inf_mismatch
    if not bad.any():
        return None
    worst = int(diff.flatten().argmax())
    relative = diff / e.abs().clamp_min(1e-300)
    first = bad.flatten().nonzero().flatten()[:5].tolist()
    return (
        f"{int(bad.sum())} of {bad.numel()} elements differ (rtol={rtol:g}, atol={atol:g}); "
        f"max abs diff {diff.max().item():.3e} at flat index {worst} "
        f"(actual {a.flatten()[worst].item():.9g}, expected {e.flatten()[worst].item():.9g}); "
        f"max rel diff {relative.max().item():.3e}; NaN placement differs at {int(nan_mismatch.sum())}, "
        f"infinities differ at {int(inf_mismatch.sum())} elements; first bad flat indices {first} "
        f"(actual {a.flatten()[first].tolist()}, expected {e.flatten()[first].tolist()})"
    )


def assert_close(actual, expected, *, rtol, atol, name=""):
    """Elementwise |actual - expected| <= atol + rtol |expected|, NaNs in the same places, infs
    equal; dtype, shape and device must match. Fails with the worst element and the counts."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.device == expected.device, f"{name}: device {actual.device} != {expected.device}"
    problem = describe_mismatch(actual, expected, rtol, atol)
    assert problem is None, f"{name}: {problem}"


def state_scale(tensors):
    """The typical magnitude of a kind of state (its RMS over all params' tensors of that key,
    at least 1e-12): absolute tolerances on states are taken relative to it, so that a state of
    size 1e-3 (exp_avg_sq) is held to the same relative standard as a param of size 1."""
    values = [torch.view_as_real(t) if t.is_complex() else t for t in tensors]
    values = torch.cat([t.detach().double().flatten().cpu() for t in values])
    values = values[values.isfinite()]
    if values.numel() == 0:
        return 1.0
    return max(values.square().mean().sqrt().item(), 1e-12)


def state_scales(optimizer, params):
    """state_scale of each state key of `optimizer` over `params`."""
    by_key = {}
    for p in params:
        for key, value in optimizer.state[p].items():
            if key != "step" and torch.is_tensor(value):
                by_key.setdefault(key, []).append(value)
    return {key: state_scale(values) for key, values in by_key.items()}


def assert_optimizers_match(fused, expected, fused_params, expected_params, *, rtol, atol, where=""):
    """Params, every state tensor, and every state['step'] value of `fused` equal those of
    `expected` (same keys, shapes, dtypes). State tolerances scale with each state kind's RMS."""
    scales = state_scales(expected, expected_params)
    for index, (p, q) in enumerate(zip(fused_params, expected_params)):
        assert_close(p.detach(), q.detach(), rtol=rtol, atol=atol, name=f"{where} param {index}")
        state, expected_state = fused.state[p], expected.state[q]
        assert set(state) == set(expected_state), f"{where} param {index}: state keys {set(state)} != {set(expected_state)}"
        for key, value in expected_state.items():
            name = f"{where} param {index} state[{key!r}]"
            if key == "step":
                assert state[key].dtype == value.dtype, f"{name}: dtype {state[key].dtype} != {value.dtype}"
                assert state[key].shape == value.shape, f"{name}: shape {state[key].shape} != {value.shape}"
                assert state[key].device == value.device, f"{name}: device {state[key].device} != {value.device}"
                assert state[key].item() == value.item(), f"{name}: {state[key].item()} != {value.item()}"
            else:
                assert_close(state[key], value, rtol=rtol, atol=atol * scales[key], name=name)


# ---- trajectories ----


def case_id(case):
    """A test id for a (rule, options) case."""
    rule, options = case
    return "-".join([rule] + [f"{key}={value}" for key, value in options.items()])


def launches_during(fn):
    """How many kernel launches (Triton's or numba's) fn() made."""
    from fusedopt.tables import launch_count

    before = launch_count()
    fn()
    return launch_count() - before


def run_beside_torch(rule, params, options, *, steps, generator, check_every=5, rtol, atol,
                     grad_scale=1.0, before_step=None, backend="triton", expected=None):
    """Step a fusedopt optimizer (on `backend`) and torch.optim (for-loop; or `expected(params)`)
    on copies of `params` with the same fresh random grads for `steps` steps, comparing params and
    all state every `check_every` steps and at the end. `before_step(step, fused, expected,
    fused_params, torch_params)` may change grads, params or groups before a step. Returns both
    optimizers and param lists."""
    fused_params = clone_params(params)
    torch_params = clone_params(params)
    fused = fused_optimizer(rule, fused_params, backend, **options)
    expected = (expected or (lambda ps: torch_optimizer(rule, ps, **options)))(torch_params)
    for step in range(1, steps + 1):
        grads = make_grads(params, generator, grad_scale)
        assign_grads(fused_params, grads)
        assign_grads(torch_params, grads)
        if before_step is not None:
            before_step(step, fused, expected, fused_params, torch_params)
        fused.step()
        expected.step()
        if step % check_every == 0 or step == steps:
            assert_optimizers_match(fused, expected, fused_params, torch_params, rtol=rtol, atol=atol,
                                    where=f"{rule} {options} step {step}")
    return fused, expected, fused_params, torch_params


class ReferenceOptimizer:
    """The float64 oracle: the rule's fusedopt optimizer on its plain-torch path
    (`fusedopt.reference`'s functions) over float64 (complex128) copies of the params, with
    torch.optim's state layout. With `storage_dtype`, params and states are rounded to that dtype
    after each step, as a kernel that computes in higher precision and stores in the param's
    dtype leaves them."""

    def __init__(self, rule, params, options, storage_dtype=None):
        self.rule = rule
        self.options = dict(options)
        self.options.setdefault("lr", DEFAULT_LR[rule])
        self.params = clone_params(params, torch.float64)
        self.storage_dtype = storage_dtype
        self.optimizer = OPTIMIZERS[rule][0](self.params, backend="torch", **self.options)

    @property
    def state(self):
        return self.optimizer.state

    @torch.no_grad()
    def step(self, grads):
        """One step of the rule on the params with a grad (grads in any dtype; None skips)."""
        for p, g in zip(self.params, grads):
            p.grad = None if g is None else g.to(p.dtype)
        self.optimizer.step()
        if self.storage_dtype is not None:
            for p in (p for p, g in zip(self.params, grads) if g is not None):
                for t in [p, *(v for k, v in self.state[p].items() if k != "step")]:
                    t.copy_(round_to(t, self.storage_dtype))


def round_to(tensor, dtype):
    """`tensor` rounded to nearest in `dtype` (complex tensors: in the complex type of that
    precision), returned in its own dtype."""
    if tensor.is_complex():
        dtype = {torch.float32: torch.complex64, torch.float64: torch.complex128}[dtype]
    return tensor.to(dtype).to(tensor.dtype)


def hyperparameter_rounding(rule, options):
    """Relative error that rounding beta-like hyperparameters to fp32 puts into (1 - beta): the
    GPU kernels take them as fp32 arguments. At least 2^-24 (the rounding of lr itself)."""
    signature = inspect.signature(OPTIMIZERS[rule][0].__init__).parameters
    values = {**{name: parameter.default for name, parameter in signature.items()}, **options}
    betas = [*values.get("betas", ()), *(values.get(name, 0) for name in ("alpha", "momentum", "dampening"))]
    return 2.0**-24 * max([1.0] + [1 / (1 - beta) for beta in betas])


def tolerance(dtype, device, rule, options):
    """(rtol, atol) for a kernel trajectory of up to 20 steps against torch.optim (fp32/fp64) or
    the float64 reference rounded to the param dtype after each step.

    fp32: rtol 1e-5, atol 1e-6. The kernels compute in fp32 like torch, in another order (m +
        (1 - b1)(g - m) for lerp, fused multiply-adds on the GPU): a few ulp (6e-8) per step,
        well under 100 ulp after 20 steps of contracting averages (measured <= 2e-7 absolute on
        params of size ~1). atol covers elements crossing zero.
    fp64: rtol 1e-9, atol 1e-10 where hyperparameters reach the kernel in double precision (the
        interpreter passes Python floats through; measured <= 2e-13).
    bf16/fp16: rtol 2 ulp, atol 4 ulp of the dtype: fp32 and fp64 math round to different
        neighbours now and then, and such a one-ulp flip lingers in the averages.
    CUDA: lr, betas, alpha, ... reach the kernels as fp32 arguments, so 1 - beta carries a
        relative error up to 2^-24 / (1 - beta) (6e-5 at beta2 = 0.999): rtol grows by that,
        and atol becomes at least 4e-6 as the shifted updates add up over 20 steps (emulated in
        fp64 with fp32-rounded hyperparameters: up to 1.0e-6, RMSprop with momentum).

    The comparisons take atol for params as is and, for state tensors, relative to the RMS of
    that kind of state (exp_avg_sq is ~1e-3)."""
    if dtype == torch.float32:
        rtol, atol = 1e-5, 1e-6
    elif dtype == torch.float64:
        rtol, atol = 1e-9, 1e-10
    else:
        ulp = torch.finfo(dtype).eps
        rtol, atol = 2 * ulp, 4 * ulp
    if torch.device(device).type == "cuda":
        rtol += hyperparameter_rounding(rule, options)
        atol = max(atol, 4e-6)
    return rtol, atol


def assert_matches_reference(fused, oracle, fused_params, *, rtol, atol, where=""):
    """Params and every state tensor of `fused` equal the float64 oracle's (converted to the
    oracle's precision for the comparison); state tolerances scale with each state kind's RMS,
    and the params' with their RMS where it exceeds 1 (an element near zero that is the
    difference of terms of that size carries their rounding, e.g. SGD on grads of size 100)."""
    scales = state_scales(oracle, oracle.params)
    param_scale = max(1.0, state_scale(oracle.params))
    for index, (p, q) in enumerate(zip(fused_params, oracle.params)):
        actual = p.detach().to(q.dtype)
        assert_close(actual, q.detach(), rtol=rtol, atol=atol * param_scale, name=f"{where} param {index}")
        for key, value in oracle.state[q].items():
            name = f"{where} param {index} state[{key!r}]"
            if key == "step":
                assert fused.state[p][key].item() == value.item(), name
            else:
                actual = fused.state[p][key].to(value.dtype)
                assert_close(actual, value, rtol=rtol, atol=atol * scales[key], name=name)


# ---- CUDA graphs ----


def fill_static_grads(params, twins, generator):
    """Fresh grads copied into the params' existing grads (a captured graph reads those storages)
    and given to the twins."""
    grads = make_grads(params, generator)
    for p, g in zip(params, grads):
        p.grad.copy_(g)
    assign_grads(twins, [g.clone() for g in grads])


def capture_cuda_graph(warm_up_step, step):
    """Two warm-up calls on a side stream (tables built, kernels compiled), then `step` captured
    in a CUDA graph, which is returned for replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            warm_up_step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph


# ---- side-by-side runs with torch.optim on a few small params (API and checkpoint tests) ----

NAMES = [info.optimizer.__name__ for info in REGISTRY.values()]  # the classes, by name
BY_CLASS = {info.optimizer.__name__: info for info in REGISTRY.values()}  # the registry, by class name
TOL = dict(rtol=1e-5, atol=1e-6)
SMALL_SHAPES = [(4, 3), (5,), ()]


def make_values(seed, device="cpu", shapes=SMALL_SHAPES, dtypes=(torch.float32,)):
    """Seeded initial values of small params, the dtypes taken in turn."""
    generator = torch.Generator().manual_seed(seed)
    values = [torch.randn(shape, generator=generator, dtype=dtypes[i % len(dtypes)]) for i, shape in enumerate(shapes)]
    return [v.to(device) for v in values]


def as_params(values):
    return [v.clone().requires_grad_() for v in values]


def set_grads(params, step, seed, frozen=()):
    """The gradient of step `step`: fresh noise plus a term in the param, so that a different
    trajectory also gives different gradients. Params whose index is in `frozen` get none."""
    generator = torch.Generator().manual_seed(seed * 1000 + step)
    for index, p in enumerate(params):
        noise = torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device)
        p.grad = None if index in frozen else noise + 0.5 * p.detach()


def oracle_class(name):
    """What fusedopt's class `name` is compared with: torch.optim's class of the same name, or
    where torch.optim has none, fusedopt's on its plain-torch reference path."""
    return OPTIMIZERS[BY_CLASS[name].name][1]


def rule_of(params):
    """The registry name of the rule a test's parameters name (`rule`, a class `name`, or a
    `case` of (rule, options)), or None."""
    if "rule" in params:
        return params["rule"]
    if "name" in params and params["name"] in BY_CLASS:
        return BY_CLASS[params["name"]].name
    case = params.get("case")
    return case[0] if isinstance(case, tuple) and case and case[0] in REGISTRY else None


def skip_where_compared_with_itself(rule, backend):
    """A run on the reference backend beside the oracle of a rule torch.optim has not compares
    the reference with itself: nothing to test."""
    if backend == "torch" and rule is not None and REGISTRY[rule].twin is None:
        pytest.skip("torch.optim has not this rule: its oracle is the reference backend itself")


def build(library, name, params, backend=None, **options):
    """fusedopt's optimizer class `name` on `backend`, or (library torch.optim) its oracle_class."""
    if library is fusedopt:
        return getattr(fusedopt, name)(params, backend=backend, **options)
    return oracle_class(name)(params, **options)


@functools.cache
def torch_fails_on_added_params(name, device="cpu"):
    """Why the oracle class of `name` (torch.optim's) cannot step a param added after its construction
    (add_param_group), or None where it can: torch 2.11's Adagrad makes its state in its
    constructor alone, and fails inside its own step (KeyError: 'sum') for such a param."""
    first, added = torch.zeros(2, device=device, requires_grad=True), torch.zeros(2, device=device, requires_grad=True)
    optimizer = oracle_class(name)([first])
    optimizer.add_param_group({"params": [added]})
    first.grad, added.grad = torch.ones_like(first), torch.ones_like(added)
    try:
        optimizer.step()
    except Exception as error:  # noqa: BLE001 - whatever torch raises, the test cannot compare
        return (f"torch {torch.__version__}'s {name} fails to step a param added after its construction "
                f"({type(error).__name__}: {error}), so there is nothing to compare with")
    return None


def assert_states_match(actual, expected, **tolerance):
    """Two state_dict()["state"] mappings: same params, keys, shapes, step values and tensors."""
    tolerance = tolerance or TOL
    assert actual.keys() == expected.keys()
    for index, want_state in expected.items():
        got_state = actual[index]
        assert got_state.keys() == want_state.keys(), f"param {index}"
        for key, want in want_state.items():
            got = got_state[key]
            if key == "step":
                assert torch.is_tensor(got), f"param {index}: step is {type(got)}"
                assert float(got) == float(want), f"param {index}: step {float(got)} != {float(want)}"
            else:
                assert got.shape == want.shape, f"param {index} {key!r}"
                torch_assert_close(got, want, **tolerance, msg=lambda m: f"param {index} {key!r}: {m}")


# ---- a small regression model for training-loop tests (compile patterns, AMP, Lightning) ----


def regression_model():
    """A seeded 8-16-1 tanh MLP."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))


def regression_batches(count):
    """`count` seeded (input, target) batches of 4 for regression_model."""
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 8, generator=generator), torch.randn(4, 1, generator=generator)) for _ in range(count)]
