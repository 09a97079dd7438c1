"""Corners of torch.optim's behaviour, each held to the installed torch.optim as the oracle, on
every backend: fused=True on params torch's fused kernels refuse, a grad's dtype changed through
.data, a first step taken inside torch.inference_mode(), the sign of zero, and centered RMSprop's
variance where it cancels. Where torch steps, fusedopt takes the same step; where torch raises,
fusedopt raises the same exception type, having written nothing."""
import contextlib
import inspect

import pytest
import torch

import fusedopt
from helpers import DEFAULT_LR, GRID, NAMES, OPTIMIZERS, TOL, as_params, assert_close, build, case_id, make_values

# The reference, the device's fastest kernels, and Triton's (conftest: on CUDA, "kernels" is Triton).
BACKENDS = ["torch", "kernels", "triton"]
BESIDE_THE_ORACLE = True  # the tests run each backend beside the rule's oracle


def seeded(seed, shape, device, dtype=torch.float32):
    """Normal values drawn in fp64 (fp64 values use all their bits), rounded to `dtype`."""
    values = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return values.to(device=device, dtype=dtype)


def step_or_error(optimizer):
    """optimizer.step()'s exception, or None where it stepped."""
    try:
        optimizer.step()
    except Exception as error:  # noqa: BLE001 - any exception torch raises is the expectation
        return error
    return None


def step_like_torch(ours, theirs, ours_params, theirs_params, steps, give_grads, context=None,
                    compare=None):
    """Step torch.optim (`theirs`), then fusedopt (`ours`), `steps` times: before each step,
    give_grads(step, params) gives each side its grads, and the step runs in context(step) (default:
    none). Where torch raises, fusedopt must raise the same type and leave its params as they were,
    and the run ends (returns torch's exception); else compare(ours, theirs, ours_params,
    theirs_params) (default: params and states to fp32 rounding). Returns None where every step ran."""
    compare = compare or assert_same_step
    for step in range(steps):
        give_grads(step, ours_params)
        give_grads(step, theirs_params)
        before = [p.detach().clone() for p in ours_params]
        with (context(step) if context else contextlib.nullcontext()):
            expected = step_or_error(theirs)
            got = step_or_error(ours)
        if expected is not None:
            assert type(got) is type(expected), f"step {step}: torch raised {expected!r}, fusedopt {got!r}"
            for index, (p, was) in enumerate(zip(ours_params, before)):
                assert torch.allclose(p.detach(), was, rtol=0, atol=0, equal_nan=True), \
                    f"step {step}: param {index} written before the {type(got).__name__}"
            return expected
        assert got is None, f"step {step}: torch stepped, fusedopt raised {got!r}"
        compare(ours, theirs, ours_params, theirs_params, where=f"step {step}")
    return None


def assert_same_step(ours, theirs, ours_params, theirs_params, where="", **tolerance):
    """Params, and each state tensor (same keys, dtypes; step counts equal) to fp32 rounding."""
    tolerance = tolerance or TOL
    for index, (p, q) in enumerate(zip(ours_params, theirs_params)):
        assert_close(p.detach(), q.detach(), **tolerance, name=f"{where} param {index}")
        state, expected = ours.state.get(p, {}), theirs.state.get(q, {})
        assert set(state) == set(expected), f"{where} param {index}: state keys {set(state)} != {set(expected)}"
        for key, want in expected.items():
            got = state[key]
            assert got.dtype == want.dtype, f"{where} param {index} {key}: dtype {got.dtype} != {want.dtype}"
            if key == "step":
                assert float(got) == float(want), f"{where} param {index}: step {float(got)} != {float(want)}"
            else:
                assert_close(got.to(want.device), want, **tolerance, name=f"{where} param {index} {key}")


# ---- fused=True on params torch's fused kernels refuse ----

FUSED_NAMES = [name for name in NAMES if "fused" in inspect.signature(getattr(fusedopt, name)).parameters]

# Params of a fused=True group that torch.optim's step refuses: alone, or after a param it takes.
REFUSED = {
    "complex": lambda device: [seeded(1, (3, 2), device, torch.complex64)],
    "meta": lambda device: [torch.empty(3, 2, device="meta")],
    "float, then complex": lambda device: [seeded(2, (4,), device), seeded(3, (3,), device, torch.complex64)],
    "float, then meta": lambda device: [seeded(4, (4,), device), torch.empty(3, device="meta")],
}


@pytest.mark.parametrize("params", REFUSED)
@pytest.mark.parametrize("name", FUSED_NAMES)
def test_fused_true_refuses_the_params_torch_refuses(name, params, backend, device):
    """torch.optim's step raises RuntimeError for complex params and params on a device without
    fused kernels (meta) when fused=True: its check's, where the first param is refused; where
    only a later one is, SGD's and Adagrad's kernels raise (NotImplementedError, a RuntimeError
    too, or Adagrad's "`fused` does not support ... complex param"). fusedopt refuses every such
    param with torch's check, before writing anything."""
    values = REFUSED[params](device)
    ours_params, theirs_params = ([v.clone().requires_grad_() for v in values] for _ in range(2))
    for p in ours_params + theirs_params:
        p.grad = torch.ones_like(p)
    options = dict(lr=0.1, fused=True, **({"momentum": 0.9} if name == "SGD" else {}))
    theirs = build(torch.optim, name, theirs_params, **options)
    ours = build(fusedopt, name, ours_params, backend, **options)
    expected = step_or_error(theirs)
    assert isinstance(expected, RuntimeError), f"torch.optim stepped or raised otherwise: {expected!r}"
    with pytest.raises(RuntimeError, match="`fused=True` requires all the params to be floating point") as got:
        ours.step()
    if str(expected).startswith("`fused=True` requires"):
        assert str(got.value) == str(expected)
    for index, (p, q, value) in enumerate(zip(ours_params, theirs_params, values)):
        if p.device.type != "meta":
            assert torch.equal(p.detach(), value), f"param {index} was written"
        assert set(ours.state.get(p, {})) == set(theirs.state.get(q, {})), f"param {index}: other state than torch's"


@pytest.mark.parametrize("name", FUSED_NAMES)
def test_fused_true_refuses_sparse_grads_as_torch_does(name, backend, device):
    """A sparse grad in a fused=True group: torch.optim raises RuntimeError (SGD's and Adagrad's
    fused kernels take none; Adam and AdamW take none at all), where without fused=True SGD and
    Adagrad step it. fusedopt raises the same, before writing anything."""
    values = make_values(9, device, shapes=[(4, 3)])
    ours_params, theirs_params = as_params(values), as_params(values)
    theirs = build(torch.optim, name, theirs_params, lr=0.1, fused=True)
    ours = build(fusedopt, name, ours_params, backend, lr=0.1, fused=True)

    def give_grads(step, params):
        params[0].grad = seeded(step, (4, 3), device).relu().to_sparse()

    expected = step_like_torch(ours, theirs, ours_params, theirs_params, 1, give_grads)
    assert isinstance(expected, RuntimeError), f"torch.optim did not refuse the sparse grad: {expected!r}"


@pytest.mark.parametrize("name", FUSED_NAMES)
def test_fused_true_steps_the_params_torch_takes(name, backend, device):
    """fp32, fp64, fp16 and bf16 params: where torch's fused kernels take them (the CPU's, and
    CUDA's but for torch 2.11's Adagrad, which runs on the CPU alone), fusedopt's fused=True group
    steps like torch.optim's fused=True; where they do not, it refuses them as torch does."""
    dtypes = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
    values = make_values(5, device, shapes=[(4, 3), (5,), (2, 2), (3,)], dtypes=dtypes)
    ours_params, theirs_params = as_params(values), as_params(values)
    options = dict(lr=0.05, fused=True, **({"momentum": 0.9} if name == "SGD" else {}))
    ours = build(fusedopt, name, ours_params, backend, **options)
    theirs = build(torch.optim, name, theirs_params, **options)

    def give_grads(step, params):
        for index, p in enumerate(params):
            p.grad = seeded(10 * step + index, p.shape, device, p.dtype)

    def compare(ours, theirs, ours_params, theirs_params, where):
        for index, (p, q) in enumerate(zip(ours_params, theirs_params)):
            # torch's fused kernels compute 16-bit params in fp32 too, but round states between steps
            tolerance = TOL if p.dtype in (torch.float32, torch.float64) else dict(rtol=1e-2, atol=1e-2)
            assert_close(p.detach(), q.detach(), **tolerance, name=f"{where} param {index}")

    refused = step_like_torch(ours, theirs, ours_params, theirs_params, 3, give_grads, compare=compare)
    assert refused is None or device != "cpu", f"torch's fused kernels refused CPU params: {refused!r}"


# ---- a grad's dtype changed through .data ----


def grad_dtype_tolerance(optimizer, params, lr):
    """fp32 rounding, except where a state torch keeps is 16-bit (SGD's momentum buffer started
    from a 16-bit grad): torch rounds each of its in-place ops to 16 bits, fusedopt rounds its fp32
    result once (math in fp32), so they differ by a few ulps of the state, and the params by lr
    times that."""
    half_states = [v for p in params for v in optimizer.state.get(p, {}).values()
                   if torch.is_tensor(v) and v.dtype in (torch.float16, torch.bfloat16)]
    if not half_states:
        return TOL, TOL
    ulps = 8 * max(torch.finfo(v.dtype).eps * float(v.abs().max()) for v in half_states)
    return dict(rtol=1e-2, atol=ulps), dict(rtol=1e-5, atol=1e-6 + lr * ulps)


# The grad's new dtype, and the step from which it has it.
GRAD_CHANGES = [(torch.float16, "first step"), (torch.float16, "second step"), (torch.bfloat16, "second step"),
                (torch.float64, "second step")]


@pytest.mark.parametrize("dtype, when", GRAD_CHANGES, ids=lambda value: str(value).replace("torch.", ""))
@pytest.mark.parametrize("case", GRID, ids=case_id)
def test_grad_dtype_changed_through_data_steps_or_raises_like_torch(case, dtype, when, backend, device):
    """p.grad.data = a tensor of another dtype on an fp32 param. An fp16 or bf16 grad: torch.optim
    steps where its update promotes the grad (weight decay added to it: Adam, RAdam, RMSprop with
    coupled weight_decay > 0) or never lerps a state towards it (SGD, Adagrad, plain RMSprop), and
    raises RuntimeError where an fp32 state is lerped towards it (Adam, AdamW, RAdam, centered
    RMSprop otherwise). An fp64 grad stays fp64 when promoted: raises wherever a state is lerped."""
    rule, options = case
    name = OPTIMIZERS[rule][0].__name__
    options = dict(options, lr=0.01)
    values = make_values(6, device, shapes=[(4, 3), (5,)])
    ours_params, theirs_params = as_params(values), as_params(values)
    ours = build(fusedopt, name, ours_params, backend, **options)
    theirs = build(torch.optim, name, theirs_params, foreach=False, **options)
    changed_from = 0 if when == "first step" else 1

    def give_grads(step, params):
        for index, p in enumerate(params):
            p.grad = seeded(10 * step + index, p.shape, device)
        if step >= changed_from:
            params[0].grad.data = params[0].grad.to(dtype)

    def compare(ours, theirs, ours_params, theirs_params, where):
        states, params = grad_dtype_tolerance(theirs, theirs_params, options["lr"])
        for index, (p, q) in enumerate(zip(ours_params, theirs_params)):
            assert_close(p.detach(), q.detach(), **params, name=f"{where} param {index}")
            for key, want in theirs.state[q].items():
                got = ours.state[p][key]
                assert got.dtype == want.dtype, f"{where} param {index} {key}: {got.dtype} != {want.dtype}"
                if key != "step":
                    assert_close(got.to(want.device), want, **states, name=f"{where} param {index} {key}")

    step_like_torch(ours, theirs, ours_params, theirs_params, 3, give_grads, compare=compare)


# ---- the first step inside torch.inference_mode() ----

# Which steps run under torch.inference_mode(): the state is made by the first step.
INFERENCE_STEPS = {"first inside": (True, False, False), "first two inside": (True, True, False),
                   "second inside": (False, True, False)}


@pytest.mark.parametrize("steps", INFERENCE_STEPS)
@pytest.mark.parametrize("case", GRID, ids=case_id)
def test_steps_inside_inference_mode_then_outside_like_torch(case, steps, backend, device):
    """State made by a step inside torch.inference_mode() is made of inference tensors, which
    torch.optim's next step outside it cannot update in place: RuntimeError (SGD with momentum,
    Adam, AdamW, RMSprop, RAdam), before anything is written. Adagrad, whose state torch makes at
    construction, and SGD without momentum, which keeps none, step."""
    rule, options = case
    name = OPTIMIZERS[rule][0].__name__
    options = dict(options, lr=DEFAULT_LR[rule])
    inside = INFERENCE_STEPS[steps]
    values = make_values(7, device)
    ours_params, theirs_params = as_params(values), as_params(values)
    ours = build(fusedopt, name, ours_params, backend, **options)
    theirs = build(torch.optim, name, theirs_params, foreach=False, **options)

    def give_grads(step, params):
        for index, p in enumerate(params):
            p.grad = seeded(10 * step + index, p.shape, device)

    def context(step):
        return torch.inference_mode() if inside[step] else contextlib.nullcontext()

    step_like_torch(ours, theirs, ours_params, theirs_params, len(inside), give_grads, context)


@pytest.mark.parametrize("case", [(rule, options) for rule, options in GRID if options == {}], ids=case_id)
def test_optimizer_built_inside_inference_mode_steps_outside_like_torch(case, backend, device):
    """An optimizer constructed inside torch.inference_mode(), stepped outside it: Adagrad's state,
    which torch makes at construction, is then made of inference tensors, and torch.optim raises
    RuntimeError at the first step; the other rules make their state at that step, and step."""
    rule, options = case
    name = OPTIMIZERS[rule][0].__name__
    values = make_values(10, device)
    ours_params, theirs_params = as_params(values), as_params(values)
    with torch.inference_mode():
        ours = build(fusedopt, name, ours_params, backend, lr=DEFAULT_LR[rule])
        theirs = build(torch.optim, name, theirs_params, foreach=False, lr=DEFAULT_LR[rule])

    def give_grads(step, params):
        for index, p in enumerate(params):
            p.grad = seeded(10 * step + index, p.shape, device)

    step_like_torch(ours, theirs, ours_params, theirs_params, 2, give_grads)


def test_device_schedule_counts_steps_taken_inside_and_outside_inference_mode(backend, device):
    """fusedopt's own step count for a schedule (group["group_step"]) is no state of torch's: made
    by a step inside torch.inference_mode(), it still counts the steps outside it. The lrs are
    those of torch.optim.SGD driven by the same schedule from the host."""
    schedule = fusedopt.schedules.linear_warmup(4)
    values = make_values(8, device)
    ours_params, theirs_params = as_params(values), as_params(values)
    ours = fusedopt.SGD(ours_params, lr=0.1, schedule=schedule, backend=backend)
    theirs = torch.optim.SGD(theirs_params, lr=0.1)
    scheduler = fusedopt.schedules.ScheduledLR(theirs, schedule)

    def give_grads(step, params):
        for index, p in enumerate(params):
            p.grad = seeded(10 * step + index, p.shape, device)

    def context(step):
        return torch.inference_mode() if step == 0 else contextlib.nullcontext()

    def compare(ours, theirs, ours_params, theirs_params, where):
        scheduler.step()
        assert_same_step(ours, theirs, ours_params, theirs_params, where)

    assert step_like_torch(ours, theirs, ours_params, theirs_params, 4, give_grads, context, compare) is None
    assert float(ours.param_groups[0]["group_step"]) == 4


# ---- the sign of zero ----

# Every sign of zero for a param and the grads of three steps: 16 elements.
SIGNS = torch.tensor([[(-1.0) ** (i >> bit & 1) for bit in range(4)] for i in range(16)]) * 0.0


@pytest.mark.parametrize("case", GRID, ids=case_id)
def test_signed_zeros_step_to_the_signs_torch_gives(case, backend, device):
    """Params and grads that are +0 or -0 (every combination over three steps): each param and
    state element ends with torch.optim's value and sign of zero (x - y and x + -y agree on it;
    0 * buf + g, a momentum buffer's first value, does not where g is -0)."""
    rule, options = case
    name = OPTIMIZERS[rule][0].__name__
    options = dict(options, lr=DEFAULT_LR[rule])
    values = [SIGNS[:, 0].clone().to(device)]
    ours_params, theirs_params = as_params(values), as_params(values)
    ours = build(fusedopt, name, ours_params, backend, **options)
    theirs = build(torch.optim, name, theirs_params, foreach=False, **options)

    def give_grads(step, params):
        params[0].grad = SIGNS[:, 1 + step].clone().to(device)

    def same_bits(got, want, name):
        assert torch.equal(got, want) and torch.equal(got.signbit(), want.signbit()), \
            f"{name}: {got.tolist()} != {want.tolist()}"

    def compare(ours, theirs, ours_params, theirs_params, where):
        same_bits(ours_params[0].detach(), theirs_params[0].detach(), f"{where} param")
        for key, want in theirs.state[theirs_params[0]].items():
            if key != "step":
                same_bits(ours.state[ours_params[0]][key].to(want.device), want, f"{where} {key}")

    assert step_like_torch(ours, theirs, ours_params, theirs_params, 3, give_grads, compare=compare) is None


# ---- centered RMSprop: sq - grad_avg^2 where it cancels ----


def torch_rounds_addcmul_once(device, dtype):
    """Whether torch's addcmul(x, y, y, value=-1) on `device` rounds once (an FMA), as its CPU and
    CUDA builds compile it: x - y^2 is then the rounding error of x = y^2, not 0."""
    y = torch.tensor([0.1, 1.7, 3.3], device=device, dtype=dtype)
    return bool(torch.addcmul(y * y, y, y, value=-1).ne(0).any())


def triton_fma_rounds_once(device):
    """Whether tl.fma rounds fp64 once where the Triton kernels run: on a GPU, and in Triton 3.9's
    interpreter, not in 3.6's (a product and a sum, each rounded): (1 + 2^-30)^2 - (1 + 2^-29)
    is 2^-60, not 0."""
    import triton
    import triton.language as tl

    @triton.jit
    def fma_kernel(x_pointer, y_pointer):
        x = tl.load(x_pointer)
        tl.store(y_pointer, tl.fma(x, x, -1.0 - 2.0 ** -29))

    x = torch.tensor([1 + 2.0 ** -30], dtype=torch.float64, device=device)
    y = torch.empty_like(x)
    fma_kernel[(1,)](x, y)
    return float(y) == 2.0 ** -60


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=lambda dtype: str(dtype)[6:])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.8])
def test_centered_rmsprop_nans_fall_where_torchs_do(alpha, momentum, dtype, backend, device):
    """Centered RMSprop at alpha = 0: grad_avg is the grad and square_avg its rounded square, so
    sq - grad_avg^2 is that rounding error, negative (a NaN under the root) for about half the
    elements; the NaNs must fall where torch.optim's do, and the other values match. alpha = 0.3
    and 0.8 take the two ends of torch's lerp. 4x3 params, grads from a normal distribution. The
    Triton kernels compute it in fp64 for fp32 params (exact, whatever a Triton's fma), with tl.fma
    for fp64 params: where that rounds twice (Triton 3.6's interpreter), fp64 is skipped."""
    if not torch_rounds_addcmul_once(device, dtype):
        pytest.skip("this torch build rounds addcmul twice")
    if dtype == torch.float64 and backend == "triton" and not triton_fma_rounds_once(device):
        import triton

        pytest.skip(f"Triton {triton.__version__}'s interpreter rounds tl.fma's product: fp64 sq - grad_avg^2 "
                    "is rounded twice there (once on a GPU and in newer interpreters)")
    options = dict(lr=0.01, alpha=alpha, momentum=momentum, centered=True)
    nans = 0
    for seed in range(6):
        values = [seeded(100 + seed, (4, 3), device, dtype)]
        ours_params, theirs_params = as_params(values), as_params(values)
        ours = fusedopt.RMSprop(ours_params, backend=backend, **options)
        theirs = torch.optim.RMSprop(theirs_params, foreach=False, **options)

        def give_grads(step, params):
            params[0].grad = seeded(10 * seed + step, (4, 3), device, dtype)

        assert step_like_torch(ours, theirs, ours_params, theirs_params, 3, give_grads) is None
        nans += int(theirs_params[0].isnan().sum())
    if alpha == 0:
        assert nans > 0, "no NaN: the case does not test what it says"
