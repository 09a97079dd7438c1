"""Specification of the torch.optim.Optimizer API: fusedopt's optimizers are drop-in replacements,
stepped side by side with torch.optim on the same inputs (closures, params without grads, several
param groups, add_param_group, learning rates changed by hand or by lr_scheduler, complex params,
zero_grad, nn.Module training) and compared after every run."""
import inspect

import pytest
import torch
from torch.optim import lr_scheduler
from torch.optim import optimizer as optimizer_module
from torch.testing import assert_close

import fusedopt
from helpers import (BY_CLASS, SMALL_SHAPES, NAMES, TOL, as_params, assert_states_match, build, make_values,
                     set_grads, torch_fails_on_added_params)

# The API is host logic that every kernel backend shares: the reference and the device's fastest
# kernels, with Triton's too where a test is about the kernels' cached tensor tables (conftest).
BACKENDS = ["torch", "kernels"]
BESIDE_THE_ORACLE = True  # the tests run each backend beside the rule's oracle

# One option set per class that uses every state tensor of the rule (the registry's api_options).
OPTIONS = {name: dict(info.api_options) for name, info in BY_CLASS.items()}


# ---- inputs and side-by-side runs ----










def kernel_launches():
    return fusedopt.kernels.launch_count()


class Twins:
    """The same params (copies) optimized by fusedopt and by torch.optim."""

    def __init__(self, name, backend, values, make_groups=None, make_params=None, **options):
        """values: the initial params (copied for each side), or make_params() makes each side's."""
        self.backend = backend
        make_params = make_params or (lambda: as_params(values))
        self.ours_params, self.theirs_params = make_params(), make_params()
        groups = make_groups or (lambda params: params)
        self.ours = build(fusedopt, name, groups(self.ours_params), backend, **options)
        self.theirs = build(torch.optim, name, groups(self.theirs_params), **options)

    def each(self):
        yield self.ours, self.ours_params
        yield self.theirs, self.theirs_params

    def train(self, start, steps, seed, frozen=()):
        for optimizer, params in self.each():
            launches = kernel_launches()
            for step in range(start, start + steps):
                set_grads(params, step, seed, frozen)
                optimizer.step()
            if optimizer is self.ours:  # the backend asked for is the one that ran
                assert (kernel_launches() > launches) == (self.backend != "torch")

    def assert_match(self):
        for got, want in zip(self.ours_params, self.theirs_params, strict=True):
            assert_close(got.detach(), want.detach(), **TOL)
        assert_states_match(self.ours.state_dict()["state"], self.theirs.state_dict()["state"])
        ours_groups, theirs_groups = self.ours.state_dict()["param_groups"], self.theirs.state_dict()["param_groups"]
        assert ours_groups == theirs_groups




# ---- step() ----


@pytest.mark.parametrize("name", NAMES)
def test_step_returns_the_closure_loss(name, backend, device):
    generator = torch.Generator().manual_seed(1)
    targets = [torch.randn(shape, generator=generator).to(device) for shape in SMALL_SHAPES]
    twins = Twins(name, backend, make_values(1, device), **OPTIONS[name])
    for optimizer, params in twins.each():
        for _ in range(3):
            made = []

            def closure():
                optimizer.zero_grad()
                loss = sum(((p - t) ** 2 * (1 + i)).sum() for i, (p, t) in enumerate(zip(params, targets)))
                loss.backward()
                made.append(loss)
                return loss

            returned = optimizer.step(closure)
            assert len(made) == 1
            assert returned is made[0]
            assert returned.requires_grad  # the closure ran with grad enabled
    twins.assert_match()


@pytest.mark.parametrize("name", NAMES)
def test_step_without_closure_returns_none(name, backend, device):
    params = as_params(make_values(2, device))
    optimizer = build(fusedopt, name, params, backend, **OPTIONS[name])
    set_grads(params, 0, seed=2)
    assert optimizer.step() is None


@pytest.mark.triton_tables
@pytest.mark.parametrize("name", NAMES)
def test_params_without_grad_are_skipped_like_torch(name, backend, device):
    values = make_values(3, device)
    twins = Twins(name, backend, values, **OPTIONS[name])
    twins.train(0, 4, seed=3, frozen={1})
    assert torch.equal(twins.ours_params[1].detach(), values[1])
    ours_state = twins.ours.state_dict()["state"]
    theirs_state = twins.theirs.state_dict()["state"]
    assert (1 in ours_state) == (1 in theirs_state)  # only Adagrad creates state up front
    twins.assert_match()


@pytest.mark.triton_tables
@pytest.mark.parametrize("name", NAMES)
def test_param_without_grad_for_some_steps_continues_like_torch(name, backend, device):
    # Params fall behind by different step counts, then all step together.
    twins = Twins(name, backend, make_values(4, device), **OPTIONS[name])
    twins.train(0, 2, seed=4, frozen={1})
    twins.train(2, 1, seed=4, frozen={0, 2})
    twins.train(3, 3, seed=4)
    twins.assert_match()


@pytest.mark.parametrize("name", NAMES)
def test_step_with_no_grads_changes_nothing(name, backend, device):
    values = make_values(5, device)
    twins = Twins(name, backend, values, **OPTIONS[name])
    for optimizer, params in twins.each():
        optimizer.step()
        for p, value in zip(params, values):
            assert torch.equal(p.detach(), value)
    twins.assert_match()


@pytest.mark.parametrize("name", NAMES)
def test_step_hooks_run_once_per_step(name, backend, device):
    params = as_params(make_values(6, device))
    optimizer = build(fusedopt, name, params, backend, **OPTIONS[name])
    calls = []
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: calls.append("pre"))
    optimizer.register_step_post_hook(lambda opt, args, kwargs: calls.append("post"))
    for step in range(2):
        set_grads(params, step, seed=6)
        optimizer.step()
    assert calls == ["pre", "post", "pre", "post"]


def _hook_log(optimizer_class, steps=2, **kwargs):
    """What the step hooks saw over `steps` steps of a 2-tensor optimizer: global and own hooks,
    a pre-hook that replaces the closure, a subclass whose step calls super().step()."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(3, 2)) for _ in range(2)]
    optimizer = optimizer_class(params, lr=0.1, **kwargs)
    log = []
    handles = [optimizer_module.register_optimizer_step_pre_hook(lambda opt, a, k: log.append("global pre")),
               optimizer_module.register_optimizer_step_post_hook(lambda opt, a, k: log.append("global post"))]
    try:
        optimizer.register_step_pre_hook(lambda opt, a, k: log.append(("pre", len(a), sorted(k))))

        def replace_closure(opt, args, kwargs):
            return (opt,), {"closure": lambda: log.append("replaced closure") or torch.tensor(2.0)}

        optimizer.register_step_pre_hook(replace_closure)
        optimizer.register_step_post_hook(lambda opt, a, k: log.append(("post", len(a), sorted(k))))
        for _ in range(steps):
            for p in params:
                p.grad = torch.ones_like(p)
            log.append(("loss", float(optimizer.step(lambda: torch.tensor(1.0)))))
    finally:
        for handle in handles:
            handle.remove()
    return log, [p.detach() for p in params]


def test_step_hooks_see_and_replace_what_torch_optims_hooks_do():
    theirs, their_params = _hook_log(torch.optim.SGD, momentum=0.9)
    ours, our_params = _hook_log(fusedopt.SGD, momentum=0.9)
    assert ours == theirs
    assert "replaced closure" in ours
    for mine, their in zip(our_params, their_params):
        assert_close(mine, their)


def test_a_subclass_step_runs_the_hooks_as_torch_optims_subclass_does():
    def subclass(base):
        class Sub(base):
            def step(self, closure=None):
                return super().step(closure)
        return Sub

    # torch.optim's hooks run once where the base class's step is not yet wrapped (no instance of
    # it made in this process), twice after: fusedopt's run once, whatever was made before
    fusedopt.Adam([torch.nn.Parameter(torch.zeros(1))])
    ours = _hook_log(subclass(fusedopt.Adam))[0]
    assert ours == _hook_log(subclass(fusedopt.Adam))[0]
    assert [entry for entry in ours if entry in ("global pre", "global post")] == ["global pre", "global post"] * 2
    assert ours.count("replaced closure") == 2


def test_a_pre_hook_returning_something_else_raises_runtime_error_like_torch():
    for optimizer_class in (torch.optim.SGD, fusedopt.SGD):
        p = torch.nn.Parameter(torch.randn(4))
        p.grad = torch.ones(4)
        optimizer = optimizer_class([p], lr=0.1)
        optimizer.register_step_pre_hook(lambda opt, a, k: 3)
        with pytest.raises(RuntimeError, match="must return None or a tuple"):
            optimizer.step()


@pytest.mark.parametrize("name", NAMES)
def test_the_profiler_records_the_step_under_torch_optims_name(name):
    p = torch.nn.Parameter(torch.randn(16))
    p.grad = torch.ones(16)
    optimizer = getattr(fusedopt, name)([p], lr=0.1)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        optimizer.step()
    assert f"Optimizer.step#{name}.step" in {event.name for event in profile.events()}


# ---- param groups ----

# A second group with other hyperparameters (and, where the rule has them, other state tensors).
SECOND_GROUP = {name: info.second_group for name, info in BY_CLASS.items()}


@pytest.mark.parametrize("name", NAMES)
def test_param_groups_with_different_hyperparameters_match_torch(name, backend, device):
    def groups(params):
        return [{"params": params[:2]}, {"params": params[2:], **SECOND_GROUP[name]}]

    twins = Twins(name, backend, make_values(7, device), make_groups=groups, **OPTIONS[name])
    twins.train(0, 5, seed=7)
    twins.assert_match()


@pytest.mark.triton_tables
@pytest.mark.parametrize("name", NAMES)
def test_add_param_group_mid_training_matches_torch(name, backend, device):
    if reason := torch_fails_on_added_params(name, device):
        pytest.skip(reason)
    values = make_values(8, device)
    twins = Twins(name, backend, values[:2], **OPTIONS[name])
    twins.train(0, 3, seed=8)
    new_values = make_values(80, device, shapes=[(3, 2), (6,)])
    for optimizer, params in twins.each():
        added = as_params(new_values)
        optimizer.add_param_group({"params": added, **SECOND_GROUP[name]})
        params.extend(added)
    twins.train(3, 4, seed=8)
    twins.assert_match()


# ---- learning rates and other hyperparameters changed between steps ----


@pytest.mark.parametrize("name", NAMES)
def test_lr_changed_by_hand_takes_effect_at_next_step(name, backend, device):
    twins = Twins(name, backend, make_values(9, device), **OPTIONS[name])
    for step, factor in enumerate([1.0, 0.5, 2.0, 0.0, 0.25, 3.0]):
        for optimizer, _ in twins.each():
            optimizer.param_groups[0]["lr"] = OPTIONS[name]["lr"] * factor
        twins.train(step, 1, seed=9)
    twins.assert_match()


@pytest.mark.triton_tables
@pytest.mark.parametrize("name", NAMES)
def test_tensor_lr_changed_in_place_takes_effect_at_next_step(name, backend, device):
    options = dict(OPTIONS[name], lr=torch.tensor(OPTIONS[name]["lr"]))
    twins = Twins(name, backend, make_values(10, device), **options)
    for step, factor in enumerate([1.0, 0.5, 2.0, 0.25]):
        for optimizer, _ in twins.each():
            optimizer.param_groups[0]["lr"].fill_(OPTIONS[name]["lr"] * factor)
        twins.train(step, 1, seed=10)
    twins.assert_match()


# Other hyperparameters changed by hand (those torch reads at every step without new state).
CHANGED_BY_HAND = {name: info.changed_by_hand for name, info in BY_CLASS.items()}


@pytest.mark.parametrize("name", NAMES)
def test_other_hyperparameters_changed_by_hand_take_effect_at_next_step(name, backend, device):
    twins = Twins(name, backend, make_values(11, device), **OPTIONS[name])
    twins.train(0, 2, seed=11)
    for step, change in enumerate(CHANGED_BY_HAND[name], start=2):
        for optimizer, _ in twins.each():
            optimizer.param_groups[0].update(change)
        twins.train(step, 2, seed=11)
    twins.assert_match()


SCHEDULER_STEPS = 8
# Options for the scheduler runs: those above, which give SGD and RMSprop a momentum for cycling
# schedulers to cycle (Adam and AdamW cycle beta1).
SCHEDULED_OPTIONS = OPTIONS


def _cycles_momentum(optimizer):
    return "momentum" in optimizer.defaults or "betas" in optimizer.defaults


SCHEDULERS = {
    "StepLR": lambda o: lr_scheduler.StepLR(o, step_size=2, gamma=0.5),
    "MultiStepLR": lambda o: lr_scheduler.MultiStepLR(o, milestones=[2, 5], gamma=0.3),
    "ExponentialLR": lambda o: lr_scheduler.ExponentialLR(o, gamma=0.8),
    "CosineAnnealingLR": lambda o: lr_scheduler.CosineAnnealingLR(o, T_max=5, eta_min=1e-3),
    "OneCycleLR": lambda o: lr_scheduler.OneCycleLR(
        o, max_lr=0.05, total_steps=SCHEDULER_STEPS, cycle_momentum=_cycles_momentum(o)),
    "ReduceLROnPlateau": lambda o: lr_scheduler.ReduceLROnPlateau(o, factor=0.5, patience=0),
    "LambdaLR": lambda o: lr_scheduler.LambdaLR(o, lambda step: 1.0 / (1 + step)),
    "MultiplicativeLR": lambda o: lr_scheduler.MultiplicativeLR(o, lambda step: 0.9),
    "LinearLR": lambda o: lr_scheduler.LinearLR(o, start_factor=0.2, total_iters=4),
    "ConstantLR": lambda o: lr_scheduler.ConstantLR(o, factor=0.5, total_iters=3),
    "PolynomialLR": lambda o: lr_scheduler.PolynomialLR(o, total_iters=6, power=2.0),
    "CosineAnnealingWarmRestarts": lambda o: lr_scheduler.CosineAnnealingWarmRestarts(o, T_0=3),
    "CyclicLR": lambda o: lr_scheduler.CyclicLR(
        o, base_lr=0.001, max_lr=0.05, step_size_up=2, cycle_momentum=_cycles_momentum(o)),
    "SequentialLR": lambda o: lr_scheduler.SequentialLR(
        o, [lr_scheduler.LinearLR(o, start_factor=0.5, total_iters=3), lr_scheduler.ExponentialLR(o, gamma=0.7)],
        milestones=[3]),
    "ChainedScheduler": lambda o: lr_scheduler.ChainedScheduler(
        [lr_scheduler.ConstantLR(o, factor=0.5, total_iters=2), lr_scheduler.ExponentialLR(o, gamma=0.9)]),
}
# A metric that improves, then stalls: ReduceLROnPlateau cuts the learning rate while it stalls.
PLATEAU_METRIC = [1.0, 0.8, 0.8, 0.8, 0.7, 0.7, 0.7, 0.7]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("scheduler_name", SCHEDULERS)
def test_lr_scheduler_matches_torch(name, scheduler_name, backend, device):
    twins = Twins(name, backend, make_values(12, device), **SCHEDULED_OPTIONS[name])
    histories = []
    for optimizer, params in twins.each():
        scheduler = SCHEDULERS[scheduler_name](optimizer)
        history = []
        for step in range(SCHEDULER_STEPS):
            set_grads(params, step, seed=12)
            optimizer.step()
            if scheduler_name == "ReduceLROnPlateau":
                scheduler.step(PLATEAU_METRIC[step])
            else:
                scheduler.step()
            group = optimizer.param_groups[0]
            history.append((group["lr"], group.get("momentum"), group.get("betas")))
        histories.append(history)
    assert histories[0] == histories[1]
    assert len({entry[0] for entry in histories[1]}) > 1, "the schedule never changed the learning rate"
    twins.assert_match()


# ---- complex params ----


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
def test_complex_params_match_torch(name, dtype, backend, device):
    twins = Twins(name, backend, make_values(13, device, dtypes=(dtype,)), **OPTIONS[name])
    twins.train(0, 5, seed=13)
    twins.assert_match()


@pytest.mark.triton_tables
@pytest.mark.parametrize("name", NAMES)
def test_complex_and_real_params_in_one_group_match_torch(name, backend, device):
    values = make_values(14, device, shapes=[(4, 3), (5,)], dtypes=(torch.complex64,))
    values += make_values(15, device, shapes=[(6,)])
    twins = Twins(name, backend, values, **OPTIONS[name])
    twins.train(0, 5, seed=14)
    twins.assert_match()


# ---- layouts and dtypes ----


@pytest.mark.triton_tables
@pytest.mark.parametrize("name", NAMES)
def test_float32_and_float64_params_in_one_group_match_torch(name, backend, device):
    values = make_values(26, device, shapes=[(4, 3), (5,)])
    values += make_values(27, device, shapes=[(6,), (2, 2)], dtypes=(torch.float64,))
    twins = Twins(name, backend, values, **OPTIONS[name])
    twins.train(0, 4, seed=26)
    twins.assert_match()


def strided_params(device):
    """A transposed param (dense, not contiguous), a sliced one (not dense) and a plain one."""
    generator = torch.Generator().manual_seed(28)
    return [torch.randn(5, 4, generator=generator).to(device).t().requires_grad_(),
            torch.randn(6, 8, generator=generator).to(device)[:, ::2].requires_grad_(),
            torch.randn(7, generator=generator).to(device).requires_grad_()]


@pytest.mark.triton_tables
@pytest.mark.parametrize("name", NAMES)
def test_non_contiguous_params_and_grads_match_torch(name, backend, device):
    twins = Twins(name, backend, None, make_params=lambda: strided_params(device), **OPTIONS[name])
    assert not twins.ours_params[0].is_contiguous() and twins.ours_params[1].stride() == (8, 2)
    for optimizer, params in twins.each():
        for step in range(4):
            generator = torch.Generator().manual_seed(280 + step)
            for p in params:
                grad = torch.randn(p.shape, generator=generator).to(device)
                # Grads alternate between contiguous ones and transposed copies.
                p.grad = grad if step % 2 == 0 or p.dim() < 2 else grad.t().contiguous().t()
            optimizer.step()
    twins.assert_match()


@pytest.mark.parametrize("name", NAMES)
def test_named_parameters_match_torch(name, backend, device):
    torch.manual_seed(29)
    model = torch.nn.Linear(3, 2).to(device)
    twin = torch.nn.Linear(3, 2).to(device)
    twin.load_state_dict(model.state_dict())
    ours = build(fusedopt, name, model.named_parameters(), backend, **OPTIONS[name])
    theirs = build(torch.optim, name, twin.named_parameters(), **OPTIONS[name])
    inputs = torch.randn(4, 3, generator=torch.Generator().manual_seed(29)).to(device)
    for module, optimizer in ((model, ours), (twin, theirs)):
        for _ in range(3):
            optimizer.zero_grad()
            module(inputs).square().sum().backward()
            optimizer.step()
    assert ours.state_dict()["param_groups"] == theirs.state_dict()["param_groups"]
    for got, want in zip(model.parameters(), twin.parameters()):
        assert_close(got.detach(), want.detach(), **TOL)


# ---- zero_grad and autograd ----


@pytest.mark.triton_tables
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad_between_steps_matches_torch(name, set_to_none, backend, device):
    generator = torch.Generator().manual_seed(16)
    targets = [torch.randn(shape, generator=generator).to(device) for shape in SMALL_SHAPES]
    twins = Twins(name, backend, make_values(16, device), **OPTIONS[name])
    for optimizer, params in twins.each():
        for step in range(6):
            optimizer.zero_grad(set_to_none=set_to_none)
            if step % 3 != 2:  # every third step: no backward (no grads, or zero grads)
                loss = sum(((p - t) ** 2).sum() * (1 + step) for p, t in zip(params, targets))
                loss.backward()
            optimizer.step()
        for p in params:
            assert (p.grad is None) == (set_to_none and step % 3 == 2)
    twins.assert_match()


@pytest.mark.parametrize("name", NAMES)
def test_mlp_training_loop_matches_torch(name, backend, device):
    torch.manual_seed(17)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).to(device)
    twin_model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).to(device)
    twin_model.load_state_dict(model.state_dict())
    generator = torch.Generator().manual_seed(18)
    inputs = torch.randn(16, 4, generator=generator).to(device)
    targets = torch.randn(16, 1, generator=generator).to(device)
    options = dict(OPTIONS[name], lr=OPTIONS[name]["lr"] / 5)
    runs = [(model, build(fusedopt, name, model.parameters(), backend, **options)),
            (twin_model, build(torch.optim, name, twin_model.parameters(), **options))]
    losses = []
    for module, optimizer in runs:
        history = []
        for _ in range(30):
            optimizer.zero_grad()
            loss = torch.nn.functional.mse_loss(module(inputs), targets)
            loss.backward()
            optimizer.step()
            history.append(loss.item())
        losses.append(history)
    assert_close(torch.tensor(losses[0]), torch.tensor(losses[1]), rtol=1e-4, atol=1e-6)
    for got, want in zip(model.parameters(), twin_model.parameters(), strict=True):
        assert_close(got.detach(), want.detach(), rtol=1e-4, atol=1e-5)


# ---- the class interface ----


@pytest.mark.parametrize("name", NAMES)
def test_optimizer_is_a_torch_optimizer(name, backend, device):
    optimizer = build(fusedopt, name, as_params(make_values(19, device)), backend)
    assert isinstance(optimizer, torch.optim.Optimizer)


@pytest.mark.parametrize("name", NAMES)
def test_defaults_equal_torch_defaults(name, backend, device):
    """torch.optim's defaults, or for a rule torch.optim lacks, those the registry states."""
    ours = build(fusedopt, name, as_params(make_values(20, device)), backend)
    info = BY_CLASS[name]
    expected = info.twin(as_params(make_values(20, device))).defaults if info.twin else info.defaults
    assert ours.defaults == expected
    assert list(ours.defaults) == list(expected)


@pytest.mark.parametrize("name", NAMES)
def test_defaults_with_every_option_equal_torch_defaults(name, backend, device):
    ours = build(fusedopt, name, as_params(make_values(21, device)), backend, maximize=True, **OPTIONS[name])
    theirs = build(torch.optim, name, as_params(make_values(21, device)), maximize=True, **OPTIONS[name])
    assert ours.defaults == theirs.defaults


def _switch_cases():
    cases = []
    for name in NAMES:
        has_fused = "fused" in inspect.signature(getattr(fusedopt, name)).parameters
        for foreach in (None, False, True):
            for fused in ((None, False, True) if has_fused else (None,)):
                if foreach and fused:
                    continue
                switches = {"foreach": foreach} | ({"fused": fused} if has_fused else {})
                cases.append(pytest.param(name, switches, id=f"{name}-foreach={foreach}-fused={fused}"))
    return cases


@pytest.mark.parametrize("name, switches", _switch_cases())
def test_foreach_and_fused_arguments_are_accepted(name, switches, backend, device):
    options = dict(OPTIONS[name], **switches)
    twins = Twins(name, backend, make_values(22, device), **options)
    for key, value in switches.items():
        assert twins.ours.defaults[key] == value
        assert twins.ours.param_groups[0][key] == value
    twins.train(0, 3, seed=22)
    twins.assert_match()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("value", ["torch", "triton", "auto"])
def test_backend_defaults_to_environment_variable(name, value, monkeypatch):
    monkeypatch.setenv("FUSEDOPT_BACKEND", value)
    assert build(fusedopt, name, as_params(make_values(23))).backend == value


@pytest.mark.parametrize("name", NAMES)
def test_backend_default_without_environment_variable_is_auto(name, monkeypatch):
    monkeypatch.delenv("FUSEDOPT_BACKEND", raising=False)
    assert build(fusedopt, name, as_params(make_values(24))).backend == "auto"


@pytest.mark.parametrize("name", NAMES)
def test_backend_argument_wins_over_environment_variable(name, backend, device, monkeypatch):
    monkeypatch.setenv("FUSEDOPT_BACKEND", "torch" if backend == "triton" else "triton")
    assert build(fusedopt, name, as_params(make_values(25, device)), backend).backend == backend


# ---- the public surface: signatures, docstrings, repr ----


def _signature(name):
    return inspect.signature(getattr(fusedopt, name)).parameters


@pytest.mark.parametrize("name", NAMES)
def test_the_signature_lists_every_argument_the_class_takes(name):
    """No **options: the rule's own arguments (torch.optim's, in its order where it has the rule),
    then every argument all classes share, keyword only, with their defaults."""
    from fusedopt.arguments import SHARED_ARGUMENTS

    parameters = _signature(name)
    assert not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    shared = [(p.name, p.default, p.kind) for p in parameters.values() if p.name in {a.name for a in SHARED_ARGUMENTS}]
    assert shared == [(a.name, a.default, inspect.Parameter.KEYWORD_ONLY) for a in SHARED_ARGUMENTS]
    twin = BY_CLASS[name].twin
    if twin is not None:  # the arguments both take, in torch's order, with torch's defaults
        theirs = inspect.signature(twin).parameters
        own = [p for p in parameters if p in theirs]
        assert own == [p for p in theirs if p in parameters] and len(own) >= 5
        assert {p: parameters[p].default for p in own} == {p: theirs[p].default for p in own}
    for argument in SHARED_ARGUMENTS:  # each taken, under its name
        getattr(fusedopt, name)([torch.nn.Parameter(torch.zeros(2))], **{argument.name: argument.default})


@pytest.mark.parametrize("name", NAMES)
def test_the_docstring_documents_every_argument_of_the_signature(name):
    doc = getattr(fusedopt, name).__doc__
    items = {line.strip().split(" (")[0] for line in doc.splitlines() if " (" in line}
    assert set(_signature(name)) <= items, set(_signature(name)) - items
    assert not any(line.strip().startswith("{") and line.strip().endswith("}") for line in doc.splitlines())
    assert '"numba" (the same as "auto", naming the CPU kernels)' in " ".join(doc.split())  # the README's backends


def test_a_subclass_taking_the_shared_arguments_shows_them_and_names_itself_in_errors():
    """The mechanism every class uses: a subclass whose __init__ passes **shared on shows the shared
    arguments in its signature, and a mistyped keyword's TypeError names it."""
    class WarmAdam(fusedopt.Adam):
        """Adam with a larger default lr.

        Args:
            {params}
            lr (float): learning rate (default: 1e-2)
            {shared_arguments}
        """

        def __init__(self, params, lr=1e-2, **shared):
            super().__init__(params, lr, **shared)

    parameters = inspect.signature(WarmAdam).parameters
    assert list(parameters)[:2] == ["params", "lr"] and "max_grad_norm" in parameters and "backend" in parameters
    assert "max_grad_norm (float, optional)" in WarmAdam.__doc__
    with pytest.raises(TypeError, match=r"^WarmAdam\.__init__\(\) got an unexpected keyword argument 'amsgradd'$"):
        WarmAdam([torch.nn.Parameter(torch.zeros(2))], amsgradd=True)
    assert WarmAdam([torch.nn.Parameter(torch.zeros(2))], max_grad_norm=1.0).max_grad_norm == 1.0


@pytest.mark.parametrize("name", NAMES)
def test_repr_says_fusedopt_and_what_updates_each_group(name):
    """torch.optim's repr (every group option, in its order), prefixed by fusedopt and the settings
    that differ from the defaults, with what updates each group's params: before the first step as
    the backend will plan them, then as planned (a param the kernels cannot walk: the reference)."""
    pytest.importorskip("numba")
    dense = torch.nn.Parameter(torch.randn(6))
    strided = torch.randn(4, 6)[:, ::2].requires_grad_()  # not one dense span: the reference
    wide = torch.nn.Parameter(torch.randn(3, dtype=torch.float64))
    optimizer = getattr(fusedopt, name)([{"params": [dense, strided]}, {"params": [wide]}], max_grad_norm=2.0)
    text = repr(optimizer)
    assert text.startswith(f"fusedopt.{name} (backend='auto', max_grad_norm=2.0\n")
    assert "will run on: numba kernels (cpu, float32): 2 params" in text
    assert "will run on: numba kernels (cpu, float64): 1 param" in text
    theirs = BY_CLASS[name].twin
    if theirs is not None:  # every line of torch's repr, in its order
        group_lines = repr(theirs([dense, strided])).splitlines()[1:-1]
        assert [line for line in text.splitlines()[1:] if line in group_lines][:len(group_lines)] == group_lines
    for p in (dense, strided, wide):
        p.grad = torch.ones_like(p)
    optimizer.step()
    text = repr(optimizer)
    assert "runs on: numba kernels (cpu, float32): 1 param; torch reference (cpu, float32): 1 param" in text
    assert "runs on: numba kernels (cpu, float64): 1 param" in text and text.endswith("\n)")
    assert repr(getattr(fusedopt, name)([dense], backend="torch")).splitlines()[-2] == (
        "    will run on: torch reference (cpu, float32): 1 param")
