"""The kernel path is never stale: whatever ordinary (or odd) training code does to params, grads
and optimizer state between steps, fusedopt reads and writes exactly the tensors the user holds
now, and gives torch.optim's result or torch.optim's exception. Every backend, torch.optim
(for-loop) as the oracle, every param and state compared."""
import warnings

import pytest
import torch

import fusedopt
from fusedopt import tables as host_tables
from fusedopt.kernels import multi_tensor

from fusedopt.registry import RULES as REGISTRY
from helpers import (DEFAULT_LR, OPTIMIZERS, RULES, assert_close, assert_optimizers_match, randn,
                     torch_fails_on_added_params)

# Options under which each rule keeps every state it can have.
RICH = {rule: dict(lr=DEFAULT_LR[rule], **REGISTRY[rule].richest[0]) for rule in RULES}
TOLERANCE = dict(rtol=1e-5, atol=1e-6)
BACKENDS = ["torch", "triton", "kernels"]  # on the CPU: the reference, Triton's and numba's kernels
BESIDE_THE_ORACLE = True  # the tests run each backend beside the rule's oracle


@pytest.fixture(autouse=True)
def every_table_check(table_check):
    """Every test runs with the Python table check and with the compiled one (fusedopt.native)."""
    return table_check


class Twins:
    """A fusedopt optimizer and its torch.optim twin on copies of the same params, driven alike."""

    def __init__(self, rule, backend, shapes, *, seed=0, options=None, device="cpu", dtype=torch.float32):
        self.generator = torch.Generator().manual_seed(seed)
        values = [randn(shape, dtype, device, self.generator) for shape in shapes]
        self.fused_params = [torch.nn.Parameter(v.clone()) for v in values]
        self.torch_params = [torch.nn.Parameter(v.clone()) for v in values]
        options = dict(RICH[rule] if options is None else options)
        fused_class, torch_class = OPTIMIZERS[rule]
        self.fused = fused_class(self.fused_params, backend=backend, **options)
        self.expected = torch_class(self.torch_params, foreach=False, **options)

    def pairs(self):
        return list(zip(self.fused_params, self.torch_params))

    def give_grads(self, scale=1.0):
        for p, q in self.pairs():
            grad = randn(p.shape, p.dtype, p.device, self.generator) * scale
            p.grad, q.grad = grad.clone(), grad.clone()

    def step(self, count=1):
        for _ in range(count):
            self.give_grads()
            self.fused.step()
            self.expected.step()

    def both(self, change):
        """Apply change(optimizer, params) to both sides."""
        change(self.fused, self.fused_params)
        change(self.expected, self.torch_params)

    def assert_match(self, where=""):
        assert_optimizers_match(self.fused, self.expected, self.fused_params, self.torch_params, where=where,
                                **TOLERANCE)


def raised(function):
    """The exception type `function` raises, or None."""
    try:
        function()
    except Exception as error:  # noqa: BLE001 - the type is what is compared
        return type(error)
    return None


def snapshot(optimizer, params):
    return [p.detach().clone() for p in params], [{k: v.clone() for k, v in optimizer.state[p].items()}
                                                  for p in params]


def assert_unchanged(optimizer, params, before, where):
    values, states = before
    for index, (p, value, state) in enumerate(zip(params, values, states)):
        assert torch.equal(p.detach(), value), f"{where}: param {index} was written"
        for key, tensor in state.items():
            assert torch.equal(optimizer.state[p][key], tensor), f"{where}: state[{key!r}] of param {index} was written"


# ---- grads ----

@pytest.mark.parametrize("rule", RULES)
def test_grad_at_the_same_address_with_other_strides_is_read_as_laid_out(rule, backend, device):
    """p.grad = p.grad.t(): the same memory, now read transposed (also what the allocator does
    when a grad computed as (x.t() @ dy).t() lands in a freed block)."""
    twins = Twins(rule, backend, [(9, 9), (5,)], device=device)
    twins.step(2)
    address = twins.fused_params[0].grad.data_ptr()
    fresh = [randn(p.shape, p.dtype, p.device, twins.generator) for p in twins.fused_params]

    def refill_and_transpose(optimizer, params):
        for p, grad in zip(params, fresh):
            p.grad.copy_(grad)  # the grads of the last step, kept
        params[0].grad = params[0].grad.t()

    twins.both(refill_and_transpose)
    assert twins.fused_params[0].grad.stride() == (1, 9) and twins.fused_params[0].grad.data_ptr() == address
    twins.fused.step()
    twins.expected.step()
    twins.assert_match(rule)


@pytest.mark.parametrize("rule", RULES)
def test_grad_dtype_changed_through_data_gives_torchs_result_or_error(rule, backend, device):
    twins = Twins(rule, backend, [(6,), (3, 4)], device=device)
    twins.step(2)
    twins.give_grads()

    def widen_grads(optimizer, params):
        for p in params:
            p.grad.data = p.grad.data.double()

    twins.both(widen_grads)
    expected_error = raised(twins.expected.step)
    assert raised(twins.fused.step) is expected_error
    if expected_error is None:
        twins.assert_match(rule)


# ---- optimizer state ----

@pytest.mark.parametrize("how", ["data", "set_"])
@pytest.mark.parametrize("rule", RULES)
def test_state_given_new_storage_is_updated_there_and_the_old_storage_is_not_written(rule, how, backend, device):
    twins = Twins(rule, backend, [(7,), (4, 5)], device=device)
    twins.step(2)
    old_storages = []

    def new_storage(optimizer, params):
        for p in params:
            for key, value in optimizer.state[p].items():
                new = torch.tensor(7.0, dtype=value.dtype) if key == "step" else (
                    randn(value.shape, value.dtype, value.device, torch.Generator().manual_seed(hash(key) % 1000)).abs())
                if optimizer is twins.fused:
                    old_storages.append((value.data, value.data.clone()))
                if how == "data":
                    value.data = new
                else:
                    value.set_(new)

    twins.both(new_storage)
    twins.step(2)
    twins.assert_match(f"{rule} state {how}")
    for index, (alias, before) in enumerate(old_storages):
        assert torch.equal(alias, before), f"old storage {index} was written after the state moved"


@pytest.mark.parametrize("rule", RULES)
def test_state_tensor_replaced_in_its_dict_is_the_one_updated(rule, backend, device):
    twins = Twins(rule, backend, [(7,), (4, 5)], device=device)
    twins.step(2)

    def replace(optimizer, params):
        for p in params:
            state = optimizer.state[p]
            for key in [k for k in state if k != "step"]:
                state[key] = state[key].clone() * 0.5 + 0.25

    twins.both(replace)
    twins.step(2)
    twins.assert_match(rule)


@pytest.mark.parametrize("rule", RULES)
def test_state_dict_replaced_by_a_plain_dict_is_the_one_updated(rule, backend, device):
    twins = Twins(rule, backend, [(7,), (4, 5)], device=device)
    twins.step(2)

    def replace(optimizer, params):
        for p in params:
            optimizer.state[p] = {key: value.clone() * (1 if key == "step" else 0.5)
                                  for key, value in optimizer.state[p].items()}

    twins.both(replace)
    twins.step(3)  # the plain dicts are checked entry by entry: mutate one more time in between
    twins.both(lambda optimizer, params: optimizer.state[params[0]].update(
        {key: value.clone() for key, value in optimizer.state[params[0]].items()}))
    twins.step(2)
    twins.assert_match(rule)


@pytest.mark.parametrize("rule", RULES)
def test_square_state_transposed_in_place_is_read_transposed(rule, backend, device):
    twins = Twins(rule, backend, [(6, 6)], device=device)
    twins.step(2)

    def transpose(optimizer, params):
        for key, value in optimizer.state[params[0]].items():
            if key != "step":
                value.t_()

    twins.both(transpose)
    twins.step(2)
    twins.assert_match(rule)


@pytest.mark.parametrize("rule", [rule for rule in RULES if OPTIMIZERS[rule][0].has_step])
def test_state_step_set_to_a_number_raises_runtime_error_like_torch(rule, backend, device):
    twins = Twins(rule, backend, [(5,)], device=device)
    twins.step(1)

    def number_step(optimizer, params):
        optimizer.state[params[0]]["step"] = 0

    twins.both(number_step)
    twins.give_grads()
    assert raised(twins.expected.step) is RuntimeError
    with pytest.raises(RuntimeError, match="singleton tensors"):
        twins.fused.step()


@pytest.mark.parametrize("rule, late", [pytest.param(rule, late, id=f"{rule}-{'-'.join(late)}")
                                        for rule, info in REGISTRY.items() for late in info.late_state_options])
def test_state_option_switched_on_after_steps_raises_key_error_like_torch(rule, late, backend, device):
    twins = Twins(rule, backend, [(5,), (2, 3)], options=dict(lr=0.01), device=device)
    twins.step(2)
    twins.both(lambda optimizer, params: optimizer.param_groups[0].update(late))
    twins.give_grads()
    assert raised(twins.expected.step) is KeyError
    before = snapshot(twins.fused, twins.fused_params)
    with pytest.raises(KeyError):
        twins.fused.step()
    assert_unchanged(twins.fused, twins.fused_params, before, f"{rule} {late}")


def test_sgd_momentum_switched_on_after_steps_starts_its_buffer_like_torch(backend, device):
    twins = Twins("sgd", backend, [(5,), (2, 3)], options=dict(lr=0.05), device=device)
    twins.step(2)
    twins.both(lambda optimizer, params: optimizer.param_groups[0].__setitem__("momentum", 0.9))
    twins.step(3)
    twins.assert_match("sgd momentum switched on")


# ---- params ----

@pytest.mark.parametrize("cast", ["half", "bfloat16", "double"])
@pytest.mark.parametrize("rule", RULES)
def test_model_cast_after_steps_gives_torchs_result_or_error(rule, cast, backend, device):
    """model.half() (or .bfloat16(), .double()) with live grads after steps: Adam, AdamW and
    centered RMSprop raise RuntimeError as torch does (their states stay fp32); the others step
    on as torch does."""
    torch.manual_seed(0)
    fused_model, torch_model = torch.nn.Linear(4, 3).to(device), torch.nn.Linear(4, 3).to(device)
    torch_model.load_state_dict(fused_model.state_dict())
    fused_class, torch_class = OPTIMIZERS[rule]
    fused = fused_class(fused_model.parameters(), backend=backend, **RICH[rule])
    expected = torch_class(torch_model.parameters(), foreach=False, **RICH[rule])
    x = torch.randn(5, 4, device=device)
    for model, optimizer in ((fused_model, fused), (torch_model, expected)):
        model(x).square().sum().backward()
        optimizer.step()
        model(x).square().sum().backward()  # live grads, cast with the model
        getattr(model, cast)()
    expected_error = raised(expected.step)
    assert raised(fused.step) is expected_error
    if expected_error is None:
        for model, optimizer in ((fused_model, fused), (torch_model, expected)):
            optimizer.zero_grad()
            model(x.to(model.weight.dtype)).square().sum().backward()
            optimizer.step()
        tolerance = TOLERANCE if cast == "double" else dict(rtol=2e-2, atol=2e-2)
        assert_optimizers_match(fused, expected, list(fused_model.parameters()), list(torch_model.parameters()),
                                where=f"{rule} {cast}", **tolerance)


@pytest.mark.parametrize("rule", RULES)
def test_param_pruned_through_a_view_at_the_same_address_raises_like_torch_and_writes_nothing_past_it(rule, backend, device):
    twins = Twins(rule, backend, [(5,), (3,)], device=device)
    twins.step(2)
    full = twins.fused_params[0].data  # the whole storage, to see that nothing past the view is written
    tail = full[2:].clone()

    def prune(optimizer, params):
        params[0].data = params[0].data[:2]

    twins.both(prune)
    twins.give_grads()  # grads of the new shape (2,) for the pruned param
    expected_error = raised(twins.expected.step)
    assert raised(twins.fused.step) is expected_error
    assert torch.equal(full[2:], tail), "a kernel wrote past the end of the pruned param"
    if expected_error is None:
        twins.assert_match(rule)


@pytest.mark.parametrize("rule", RULES)
def test_same_param_twice_in_a_group_is_stepped_twice_like_torch(rule, backend, device):
    generator = torch.Generator().manual_seed(0)
    value = randn((6,), torch.float32, device, generator)
    other = randn((3,), torch.float32, device, generator)
    fused_params = [torch.nn.Parameter(value.clone()), torch.nn.Parameter(other.clone())]
    torch_params = [torch.nn.Parameter(value.clone()), torch.nn.Parameter(other.clone())]
    fused_class, torch_class = OPTIMIZERS[rule]
    with warnings.catch_warnings(record=True) as fused_warnings:
        warnings.simplefilter("always")
        fused = fused_class([fused_params[0], fused_params[1], fused_params[0]], backend=backend, **RICH[rule])
    with warnings.catch_warnings(record=True) as torch_warnings:
        warnings.simplefilter("always")
        expected = torch_class([torch_params[0], torch_params[1], torch_params[0]], foreach=False, **RICH[rule])
    assert [str(w.message) for w in fused_warnings] == [str(w.message) for w in torch_warnings]
    for _ in range(3):
        for p, q in zip(fused_params, torch_params):
            grad = randn(p.shape, p.dtype, device, generator)
            p.grad, q.grad = grad.clone(), grad.clone()
        fused.step()
        expected.step()
    assert_optimizers_match(fused, expected, fused_params, torch_params, where=rule, **TOLERANCE)


@pytest.mark.parametrize("rule", RULES)
def test_params_sharing_memory_are_stepped_one_after_another_like_torch(rule, backend, device):
    generator = torch.Generator().manual_seed(0)
    base = randn((10,), torch.float32, device, generator)
    fused_base, torch_base = base.clone(), base.clone()
    fused_params = [torch.nn.Parameter(fused_base[:6]), torch.nn.Parameter(fused_base[4:]),
                    torch.nn.Parameter(randn((5,), torch.float32, device, generator))]
    torch_params = [torch.nn.Parameter(torch_base[:6]), torch.nn.Parameter(torch_base[4:]),
                    torch.nn.Parameter(fused_params[2].detach().clone())]
    fused_class, torch_class = OPTIMIZERS[rule]
    fused = fused_class(fused_params, backend=backend, **RICH[rule])
    expected = torch_class(torch_params, foreach=False, **RICH[rule])
    for _ in range(3):
        for p, q in zip(fused_params, torch_params):
            grad = randn(p.shape, p.dtype, device, generator)
            p.grad, q.grad = grad.clone(), grad.clone()
        fused.step()
        expected.step()
    assert_optimizers_match(fused, expected, fused_params, torch_params, where=rule, **TOLERANCE)
    assert_close(fused_base, torch_base, name="shared storage", **TOLERANCE)


@pytest.mark.parametrize("rule", RULES)
def test_grad_sharing_memory_with_its_param_gives_torchs_result(rule, backend, device):
    twins = Twins(rule, backend, [(6,), (3,)], device=device)
    twins.step(1)

    def alias(optimizer, params):
        params[0].grad = params[0].detach()

    twins.both(alias)
    twins.fused.step()
    twins.expected.step()
    twins.assert_match(rule)


def run_built_beside_torch(rule, make_params, give_grads, steps=4, *, backend, device, arrange=None):
    """Params from make_params(device) -> (params, tensors to compare) on each side, optional
    arrange(optimizer, params) once, then give_grads(optimizer, params, step) and a step, `steps`
    times; every param, state and compared tensor equal to torch.optim's."""
    fused_class, torch_class = OPTIMIZERS[rule]
    (fused_params, fused_memory), (torch_params, torch_memory) = make_params(device), make_params(device)
    fused = fused_class(fused_params, backend=backend, **RICH[rule])
    expected = torch_class(torch_params, foreach=False, **RICH[rule])
    if arrange is not None:
        arrange(fused, fused_params)
        arrange(expected, torch_params)
    for step in range(steps):
        for optimizer, params in ((fused, fused_params), (expected, torch_params)):
            give_grads(optimizer, params, step)
            optimizer.step()
    params = lambda optimizer: [p for group in optimizer.param_groups for p in dict.fromkeys(group["params"])]
    assert_optimizers_match(fused, expected, params(fused), params(expected), where=rule, **TOLERANCE)
    for mine, theirs in zip(fused_memory, torch_memory):
        assert_close(mine, theirs, name="shared memory", **TOLERANCE)


def seeded(step, shape, device, dtype=torch.float32):
    return randn(shape, dtype, device, torch.Generator().manual_seed(100 + step))


@pytest.mark.parametrize("rule", RULES)
def test_grad_moved_onto_another_buckets_param_is_read_after_its_update_like_torch(rule, backend, device):
    """[a fp32, d fp64, b fp32]: two buckets. From step 2, b's grad is a view of d's memory, at a
    new address with the old layout: torch updates d before it reads b's grad."""
    def make(device):
        return [torch.nn.Parameter(seeded(0, (8,), device)), torch.nn.Parameter(seeded(1, (4,), device, torch.float64)),
                torch.nn.Parameter(seeded(2, (8,), device))], []

    def give(optimizer, params, step):
        a, d, b = params
        a.grad, d.grad = seeded(10 + step, (8,), device), seeded(20 + step, (4,), device, torch.float64)
        b.grad = seeded(30 + step, (8,), device) if step < 2 else d.detach().view(torch.float32)

    run_built_beside_torch(rule, make, give, backend=backend, device=device)


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("alias", ["kernel grad is a reference param", "reference grad is a kernel param"])
def test_grads_sharing_memory_with_a_param_the_reference_steps_give_torchs_result(rule, alias, backend, device):
    """A's transposed grad sends A to the reference; B's grad is A (or A's grad is B's memory):
    torch updates A, then B, reading each grad when it gets there."""
    a_shape = (4, 3) if alias == "kernel grad is a reference param" else (3, 4)

    def make(device):
        return [torch.nn.Parameter(seeded(0, a_shape, device)), torch.nn.Parameter(seeded(1, (4, 3), device))], []

    def give(optimizer, params, step):
        a, b = params
        if alias == "kernel grad is a reference param":
            a.grad, b.grad = seeded(10 + step, (3, 4), device).t(), a.detach()
        else:
            a.grad, b.grad = b.detach().t(), seeded(10 + step, (4, 3), device)

    run_built_beside_torch(rule, make, give, backend=backend, device=device)


@pytest.mark.parametrize("rule", RULES)
def test_param_overlapping_a_param_the_reference_steps_gives_torchs_result(rule, backend, device):
    """buf[::2] (not dense: the reference) and buf[:n/2] (dense) share half their memory."""
    def make(device):
        buffer = seeded(0, (40,), device)
        return [torch.nn.Parameter(buffer[::2]), torch.nn.Parameter(buffer[:20])], [buffer]

    def give(optimizer, params, step):
        for index, p in enumerate(params):
            p.grad = seeded(10 * step + index, p.shape, device)

    run_built_beside_torch(rule, make, give, backend=backend, device=device)


@pytest.mark.parametrize("rule", RULES)
def test_param_listed_in_two_groups_is_stepped_once_per_group_like_torch(rule, backend, device):
    """torch.optim steps a param appended to a second group's list once per group (its step count
    twice)."""
    if reason := torch_fails_on_added_params(REGISTRY[rule].optimizer.__name__, device):
        pytest.skip(reason)
    def make(device):
        return [torch.nn.Parameter(seeded(0, (16,), device))], []

    def arrange(optimizer, params):
        optimizer.add_param_group({"params": [torch.nn.Parameter(seeded(1, (16,), device))]})
        optimizer.param_groups[1]["params"].append(params[0])

    def give(optimizer, params, step):
        for index, p in enumerate(dict.fromkeys(p for g in optimizer.param_groups for p in g["params"])):
            p.grad = seeded(10 * step + index, (16,), device)

    run_built_beside_torch(rule, make, give, backend=backend, device=device, arrange=arrange)


@pytest.mark.parametrize("rule", [rule for rule in RULES if REGISTRY[rule].optimizer.has_step])
@pytest.mark.parametrize("sharing", ["one step tensor for two params", "a step tensor as a grad"])
def test_step_counts_shared_with_other_tensors_count_like_torch(rule, sharing, backend, device):
    """torch.optim increments state['step'] in place, param after param: a step tensor two params
    share counts twice per step; a grad that is a later param's step count is read before it moves."""
    def make(device):
        return [torch.nn.Parameter(seeded(0, (), device)), torch.nn.Parameter(seeded(1, (), device))], []

    def arrange(optimizer, params):
        if sharing == "one step tensor for two params":
            for p in params:
                p.grad = torch.zeros_like(p)
            optimizer.step()  # the states exist; then the second param takes the first's count
            optimizer.state[params[1]]["step"] = optimizer.state[params[0]]["step"]

    def give(optimizer, params, step):
        params[0].grad = seeded(10 + step, (), device)
        params[1].grad = seeded(20 + step, (), device)
        if sharing == "a step tensor as a grad" and step >= 1:
            params[0].grad = optimizer.state[params[1]]["step"]

    run_built_beside_torch(rule, make, give, backend=backend, device=device, arrange=arrange)


@pytest.mark.parametrize("rule", [rule for rule in RULES if REGISTRY[rule].optimizer.has_step])
@pytest.mark.parametrize("step_dtypes", [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16),
                                         (torch.float32, torch.float64)])
def test_step_counts_of_other_dtypes_count_in_their_dtype_like_torch(rule, step_dtypes, backend, device):
    """A loaded or hand-set state['step'] of another dtype is counted in it, as torch does (a bf16
    count stops at 256)."""
    def make(device):
        return [torch.nn.Parameter(seeded(index, (5,), device)) for index in range(2)], []

    def arrange(optimizer, params):
        for p in params:
            p.grad = torch.zeros_like(p)
        optimizer.step()
        for p, dtype in zip(params, step_dtypes):
            optimizer.state[p]["step"] = torch.tensor(250.0, dtype=dtype)

    def give(optimizer, params, step):
        for index, p in enumerate(params):
            p.grad = seeded(10 * step + index, (5,), device)

    run_built_beside_torch(rule, make, give, steps=12, backend=backend, device=device, arrange=arrange)


# ---- what the kernels are handed ----

def test_wrapper_subclass_params_never_reach_a_kernel(backend, device, monkeypatch):
    """Params and grads that are wrapper subclasses (their data pointer names no memory of their
    own, as for DTensor) are stepped by the reference, as torch.optim steps them."""
    from torch.testing._internal.two_tensor import TwoTensor

    tables = []
    build = host_tables.TensorTable.__init__
    monkeypatch.setattr(host_tables.TensorTable, "__init__",
                        lambda self, params, grads, states, extra=None: (tables.append((params, grads, states)),
                                                                         build(self, params, grads, states, extra))[1])
    generator = torch.Generator().manual_seed(0)
    values = [randn((5,), torch.float32, device, generator) for _ in range(2)]

    def wrapped(v):
        return torch.nn.Parameter(TwoTensor(v.clone(), v.clone()))

    fused_params = [wrapped(values[0]), torch.nn.Parameter(values[1].clone())]
    torch_params = [wrapped(values[0]), torch.nn.Parameter(values[1].clone())]
    fused = fusedopt.Adam(fused_params, lr=0.1, backend=backend)
    expected = torch.optim.Adam(torch_params, lr=0.1, foreach=False)
    for _ in range(2):
        for p, q in zip(fused_params, torch_params):
            grad = randn((5,), torch.float32, device, generator)
            grad = TwoTensor(grad, grad.clone()) if isinstance(p, TwoTensor) else grad
            p.grad, q.grad = grad.clone(), grad.clone()
        fused.step()
        expected.step()
    for index, (p, q) in enumerate(zip(fused_params, torch_params)):
        for part in ("a", "b") if isinstance(q, TwoTensor) else (None,):
            actual, expected_value = (p.detach(), q.detach()) if part is None else (getattr(p, part), getattr(q, part))
            assert_close(actual.detach(), expected_value.detach(), name=f"param {index} {part or ''}", **TOLERANCE)
    for params, grads, states in tables:
        for tensor in (*params, *grads, *(t for role in states for t in role)):
            assert type(tensor) in (torch.Tensor, torch.nn.Parameter), f"a kernel was handed a {type(tensor)}"
            assert tensor.untyped_storage().nbytes() >= (tensor.storage_offset() + tensor.numel()) * \
                tensor.element_size(), "a kernel was handed a size its storage does not hold"


def test_a_table_refuses_a_tensor_that_is_not_its_own_memory():
    from torch.testing._internal.two_tensor import TwoTensor

    plain = torch.zeros(4)
    with pytest.raises(RuntimeError, match="cannot be walked"):
        multi_tensor.TensorTable([TwoTensor(plain, plain.clone())], [plain.clone()], [])
    with pytest.raises(RuntimeError, match="cannot be walked"):
        multi_tensor.TensorTable([plain], [torch._neg_view(plain.clone())], [])
    with pytest.raises(RuntimeError, match="cannot be walked"):
        multi_tensor.TensorTable([torch.zeros(8)[::2]], [torch.zeros(8)[::2]], [])


def test_conjugated_complex_param_raises_like_torch(backend, device):
    """A lazily conjugated param has no real view: torch.optim raises RuntimeError, and so does
    fusedopt (no kernel reads its memory as if it held the conjugated values)."""
    generator = torch.Generator().manual_seed(0)
    value = randn((4,), torch.complex64, device, generator)
    fused_params = [torch.nn.Parameter(value.clone().conj()), torch.nn.Parameter(value.clone())]
    torch_params = [torch.nn.Parameter(value.clone().conj()), torch.nn.Parameter(value.clone())]
    fused = fusedopt.Adam(fused_params, lr=0.1, backend=backend)
    expected = torch.optim.Adam(torch_params, lr=0.1, foreach=False)
    for p, q in zip(fused_params, torch_params):
        grad = randn((4,), torch.complex64, device, generator)
        p.grad, q.grad = grad.clone(), grad.clone()
    assert raised(expected.step) is RuntimeError
    assert raised(fused.step) is RuntimeError


# ---- clipping ----

def clip_both(twins, max_norm=0.5):
    norms = [twins.fused.clip_grad_norm_(max_norm),
             torch.nn.utils.clip_grad_norm_(twins.torch_params, max_norm, foreach=False)]
    return norms


@pytest.mark.parametrize("rule", RULES)
def test_zero_grad_drops_the_clip_of_a_skipped_batch(rule, backend, device):
    """clip; the norm is not finite; zero_grad() and skip the batch: the next step is not clipped
    by the stale factor (which was NaN)."""
    twins = Twins(rule, backend, [(7,), (3, 4)], device=device)
    twins.step(1)
    twins.give_grads()
    for p, q in twins.pairs():
        p.grad[0], q.grad[0] = float("inf"), float("inf")
    fused_norm, torch_norm = clip_both(twins)
    assert not torch.isfinite(fused_norm) and not torch.isfinite(torch_norm)
    twins.fused.zero_grad()
    twins.expected.zero_grad()
    twins.step(2)
    twins.assert_match(rule)


@pytest.mark.parametrize("rule", RULES)
def test_grads_accumulated_after_clipping_raise_and_leave_everything_unwritten(rule, backend, device):
    twins = Twins(rule, backend, [(7,), (3, 4)], device=device)
    twins.step(1)
    twins.give_grads(scale=10.0)
    twins.fused.clip_grad_norm_(0.5)
    for p in twins.fused_params:
        p.grad += 1.0  # a second backward accumulating into the clipped grads
    before = snapshot(twins.fused, twins.fused_params)
    with pytest.raises(RuntimeError, match="clip_grad_norm_"):
        twins.fused.step()
    assert_unchanged(twins.fused, twins.fused_params, before, rule)
    twins.fused.zero_grad()  # drops the clip; training goes on
    twins.expected.zero_grad()
    twins.step(2)
    assert all(torch.isfinite(p).all() for p in twins.fused_params)


@pytest.mark.parametrize("rule", RULES)
def test_grads_all_replaced_after_clipping_are_stepped_unclipped_like_torch(rule, backend, device):
    """torch clips the grads it is given in place: grads made afterwards (model.zero_grad() and a
    new backward) are stepped unclipped."""
    twins = Twins(rule, backend, [(7,), (3, 4)], device=device)
    twins.step(1)
    twins.give_grads(scale=10.0)
    clip_both(twins)
    twins.give_grads(scale=10.0)  # every grad a new tensor, as after model.zero_grad() + backward
    twins.fused.step()
    twins.expected.step()
    twins.assert_match(rule)


@pytest.mark.parametrize("rule", RULES)
def test_some_grads_replaced_after_clipping_raise(rule, backend, device):
    twins = Twins(rule, backend, [(7,), (3, 4)], device=device)
    twins.step(1)
    twins.give_grads(scale=10.0)
    twins.fused.clip_grad_norm_(0.5)
    twins.fused_params[0].grad = torch.ones_like(twins.fused_params[0])
    before = snapshot(twins.fused, twins.fused_params)
    with pytest.raises(RuntimeError, match="replaced"):
        twins.fused.step()
    assert_unchanged(twins.fused, twins.fused_params, before, rule)


@pytest.mark.parametrize("rule", RULES)
def test_a_grad_cleared_after_clipping_leaves_the_others_clipped_like_torch(rule, backend, device):
    twins = Twins(rule, backend, [(7,), (3, 4), (5,)], device=device)
    twins.step(1)
    twins.give_grads(scale=10.0)
    clip_both(twins)
    twins.fused_params[1].grad = None
    twins.torch_params[1].grad = None
    twins.fused.step()
    twins.expected.step()
    twins.assert_match(rule)


@pytest.mark.parametrize("rule", RULES)
def test_clip_then_step_in_every_iteration_matches_torch(rule, backend, device):
    twins = Twins(rule, backend, [(7,), (3, 4)], device=device)
    for _ in range(3):
        twins.give_grads(scale=10.0)
        fused_norm, torch_norm = clip_both(twins)
        assert_close(fused_norm, torch_norm, name="total norm", **TOLERANCE)
        twins.fused.step()
        twins.expected.step()
    twins.assert_match(rule)


# ---- the table is reused while nothing changed ----

def test_unchanged_tensors_keep_their_table(backend, device, monkeypatch):
    """The checks pass on an unchanged model: one table, built once, reused at every step."""
    if backend == "torch":
        pytest.skip("the torch backend builds no tables")
    builds = []
    build = host_tables.TensorTable.__init__
    monkeypatch.setattr(host_tables.TensorTable, "__init__",
                        lambda self, *args, **kwargs: (builds.append(1), build(self, *args, **kwargs))[1])
    twins = Twins("adam", backend, [(7,), (3, 4), (9, 9)], device=device)
    twins.step(5)  # new grad tensors at every step: the grad row is re-pointed
    for _ in range(2):  # grads kept and refilled in place
        for p, q in twins.pairs():
            grad = randn(p.shape, p.dtype, p.device, twins.generator)
            p.grad.copy_(grad)
            q.grad.copy_(grad)
        twins.fused.step()
        twins.expected.step()
    assert len(builds) == 1
    twins.assert_match("adam")


@pytest.mark.parametrize("layouts", ["TensorGuards", "Python layouts"])
def test_the_compiled_and_the_python_table_checks_agree(table_check, layouts, monkeypatch):
    """The same answer (SAME, MOVED, CHANGED) from both, for every kind of change; the Python check
    with torch's C++ layout check and with its own (where TensorGuards is absent)."""
    from fusedopt import native, plan

    if layouts == "Python layouts":
        monkeypatch.setattr(plan, "_TENSOR_GUARDS", None)

    check_class = native.table_check_class()
    if check_class is None:
        pytest.skip("compares the compiled check with the Python one")
    square = torch.zeros(4, 4)
    fixed = [torch.nn.Parameter(torch.zeros(3, 4)), square, torch.zeros(2, dtype=torch.complex64), torch.zeros(())]
    grads = [torch.zeros(3, 4), torch.zeros(4, 4)]
    written = sorted(plan.memory_span(t, True, None)[:2] for t in fixed)

    def both():
        return (plan.PythonTableCheck(fixed, grads, written),
                check_class(fixed, grads, [start for start, _ in written], [end for _, end in written]))

    def variants():
        yield "same", fixed, grads
        yield "grads moved", fixed, [torch.ones(3, 4), grads[1]]
        yield "grad moved into a param", fixed, [fixed[0].detach(), grads[1]]
        yield "grad moved into a state", fixed, [grads[0], square.detach()]
        yield "grad strides", fixed, [grads[0], grads[1].t()]
        yield "grad dtype", fixed, [grads[0].double(), grads[1]]
        yield "grad type", fixed, [torch.nn.Parameter(grads[0].clone()), grads[1]]
        yield "sparse grad", fixed, [grads[0].to_sparse(), grads[1]]
        yield "param moved", [torch.nn.Parameter(torch.zeros(3, 4))] + fixed[1:], grads
        yield "param as plain tensor", [fixed[0].detach()] + fixed[1:], grads
        yield "state transposed", [fixed[0], square.t()] + fixed[2:], grads
        yield "state pruned", [fixed[0], square.view(16)[:8].view(2, 4)] + fixed[2:], grads
        yield "state conjugated", fixed[:2] + [fixed[2].conj()] + fixed[3:], grads
        yield "state negated", fixed[:2] + [torch._neg_view(fixed[2])] + fixed[3:], grads
        yield "step as int32", fixed[:3] + [fixed[3].view(torch.int32)], grads
        yield "one tensor fewer", fixed[:3], grads
        yield "one grad fewer", fixed, grads[:1]

    for name, now_fixed, now_grads in variants():
        rows = [torch.zeros(len(grads), dtype=torch.int64) for _ in range(2)]
        found = [check.check(now_fixed, now_grads, row) for check, row in zip(both(), rows)]
        assert found[0] == found[1], name
        assert torch.equal(rows[0], rows[1]), name
    checks, rows = both(), [torch.zeros(2, dtype=torch.int64) for _ in range(2)]
    moved = [torch.ones(3, 4), grads[1]]
    assert [check.check(fixed, moved, row) for check, row in zip(checks, rows)] == [plan.MOVED] * 2
    assert rows[0].tolist() == rows[1].tolist() == [moved[0].data_ptr(), grads[1].data_ptr()]
    assert [check.check(fixed, moved, row) for check, row in zip(checks, rows)] == [plan.SAME] * 2


def test_the_checks_reading_grads_from_their_params_answer_as_with_the_grads_given(table_check):
    """check_grads_of(fixed, params) reads each params[i].grad itself: the same answer (and grad
    row) as check(fixed, grads) for every kind of grad change, on the compiled and the Python
    check; NO_GRAD where a param has none."""
    from fusedopt import native, plan

    fixed = [torch.nn.Parameter(torch.zeros(3, 4)), torch.zeros(4, 4)]
    grads = [torch.zeros(3, 4), torch.zeros(4, 4)]
    written = sorted(plan.memory_span(t, True, None)[:2] for t in fixed)
    check_class = native.table_check_class()
    makers = [lambda: plan.PythonTableCheck(fixed, grads, written)]
    if check_class is not None:
        makers.append(lambda: check_class(fixed, grads, [start for start, _ in written], [end for _, end in written]))
    variants = {
        "same": grads,
        "grads moved": [torch.ones(3, 4), grads[1]],
        "grad moved into a param": [fixed[0].detach(), grads[1]],
        "grad strides": [grads[0], grads[1].t()],
        "grad type": [torch.nn.Parameter(grads[0].clone()), grads[1]],
        "sparse grad": [grads[0].to_sparse(), grads[1]],
    }
    for make in makers:
        for name, now_grads in variants.items():
            params = [torch.nn.Parameter(torch.zeros(g.shape, dtype=g.dtype)) for g in now_grads]
            for p, g in zip(params, now_grads):
                p.grad = g
            rows = [torch.zeros(2, dtype=torch.int64) for _ in range(2)]
            expected = make().check(fixed, now_grads, rows[0])
            assert make().check_grads_of(fixed, params, rows[1]) == expected, name
            assert torch.equal(rows[0], rows[1]), name
        params = [torch.nn.Parameter(torch.zeros(3, 4)), torch.nn.Parameter(torch.zeros(4, 4))]
        params[0].grad = grads[0]
        assert make().check_grads_of(fixed, params, torch.zeros(2, dtype=torch.int64)) == plan.NO_GRAD
        assert make().check_grads_of(fixed, params[:1], torch.zeros(2, dtype=torch.int64)) == plan.CHANGED
