"""torch.compile around the training loop: compiling the code around opt.step() never changes a
number, never recompiles for a new learning rate, and costs no more graph breaks than
torch.optim in the same pattern. Three patterns, every rule, every backend; torch.optim measured
in the same pattern beside each:

- (a) a compiled model, an eager step;
- (b) a compiled `opt.step(); sched.step()` with a tensor lr and an LRScheduler;
- (c) a whole training step compiled (forward, backward, step, scheduler, zero_grad).
"""
import functools

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

import fusedopt
from helpers import OPTIMIZERS, RULES, STATEFUL, regression_batches, regression_model, skip_where_compared_with_itself

BACKENDS = ["torch", "triton", "numba"]
STEPS = 6  # the LinearLR below changes the lr at each of the first 4
LR = 0.01


def make_optimizer(rule, params, backend, tensor_lr):
    fused, reference = OPTIMIZERS[rule]
    lr = torch.tensor(LR) if tensor_lr else LR
    options = dict(STATEFUL[rule], lr=lr, weight_decay=0.1)
    if backend is None:
        return reference(params, **options)
    return fused(params, backend=backend, **options)


class Run:
    """One training run in a pattern: the final params, the graph breaks dynamo counted, and the
    frames it compiled after each step (constant from the first step on: no recompilation)."""

    def __init__(self, rule, backend, pattern, tensor_lr=False, compiler="aot_eager"):
        torch._dynamo.reset()
        counters.clear()
        model = regression_model()
        optimizer = make_optimizer(rule, model.parameters(), backend, tensor_lr)
        scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.25, total_iters=4)
        counter = CompileCounterWithBackend(compiler)
        loss_of = lambda x, y: torch.nn.functional.mse_loss(model(x), y)

        def step():
            optimizer.step()
            scheduler.step()

        def train_step(x, y):
            loss_of(x, y).backward()
            step()
            optimizer.zero_grad()

        if pattern == "a":
            loss_of = torch.compile(loss_of, backend=counter)
        elif pattern == "b":
            step = torch.compile(step, backend=counter)
        elif pattern == "c":
            train_step = torch.compile(train_step, backend=counter)
        self.frames = []
        for x, y in regression_batches(STEPS):
            train_step(x, y)
            self.frames.append(counter.frame_count)
        self.breaks = sum(counters["graph_break"].values())
        self.params = [p.detach().clone() for p in model.parameters()]
        torch._dynamo.reset()


@functools.lru_cache(maxsize=None)
def eager_torch_params(rule, tensor_lr):
    return Run(rule, None, "eager", tensor_lr).params


@functools.lru_cache(maxsize=None)
def torch_run(rule, pattern, tensor_lr):
    return Run(rule, None, pattern, tensor_lr)


def assert_same_numbers(params, expected, where):
    for index, (p, q) in enumerate(zip(params, expected)):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=lambda m: f"{where}, param {index}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pattern", ["a", "b", "c"])
@pytest.mark.parametrize("rule", RULES)
def test_compiled_training_keeps_the_numbers_breaks_and_compiles_of_torch_optim(rule, pattern, backend):
    skip_where_compared_with_itself(rule, backend)
    tensor_lr = pattern == "b"  # the pattern torch documents for compiling the step
    ours, theirs = Run(rule, backend, pattern, tensor_lr), torch_run(rule, pattern, tensor_lr)
    assert_same_numbers(ours.params, eager_torch_params(rule, tensor_lr), f"{rule} pattern {pattern}")
    assert ours.breaks <= theirs.breaks, f"{ours.breaks} graph breaks, torch.optim {theirs.breaks}"
    # no recompilation when the lr changes: nothing is compiled after the second step (the first
    # makes state where a rule makes it lazily in its update, as torch.optim's SGD does), and no
    # more frames than torch.optim compiles
    assert ours.frames[1:] == [ours.frames[1]] * (STEPS - 1), f"frames compiled after each step: {ours.frames}"
    assert ours.frames[-1] <= theirs.frames[-1], f"{ours.frames[-1]} frames, torch.optim {theirs.frames[-1]}"


@pytest.mark.parametrize("backend", ["torch", "numba"])
def test_whole_adamw_step_under_inductor_with_a_linear_warmup_matches_eager(backend):
    """A whole training step compiled by inductor, AdamW with weight decay and LinearLR: the params
    of eager torch.optim.AdamW to fp32 rounding (the lr was once baked into the graph: 2e-3 off)."""
    ours = Run("adamw", backend, "c", compiler="inductor")
    assert_same_numbers(ours.params, eager_torch_params("adamw", False), "adamw under inductor")
    assert ours.frames == [ours.frames[0]] * STEPS


def graph_calls(graph_module):
    """The functions a dynamo graph calls, grad-mode switches (no_grad) left out."""
    return [node.target for node in graph_module.graph.nodes
            if node.op == "call_function" and node.target is not torch._C._set_grad_enabled]


@pytest.mark.parametrize("backend", ["torch", "numba"])
def test_a_compiled_step_is_one_call_of_the_fusedopt_operator(backend):
    """dynamo does not trace into the update: the graph of a compiled `opt.step()` holds one call
    of fusedopt::step and nothing else, so no graph can freeze the lr or a table address."""
    params = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))]
    optimizer = fusedopt.Adam(params, lr=0.5, backend=backend)
    for p in params:
        p.grad = torch.ones_like(p)
    explanation = torch._dynamo.explain(optimizer.step)()
    assert explanation.graph_count == 1
    assert graph_calls(explanation.graphs[0]) == [torch.ops.fusedopt.step]
    torch.testing.assert_close(params[0].detach(), torch.full((3,), 0.5))  # Adam's first step: lr
    assert optimizer.state[params[1]]["step"] == 1


def stepped_with_the_same_writes(make, compiler=None):
    """Params after three steps of a step function that, before opt.step(), sets the lr of the
    group and halves the grads in place (writes a compiled region makes, which must land before
    the update reads them)."""
    model = regression_model()
    optimizer = make(model.parameters())

    def step(lr):
        for group in optimizer.param_groups:
            group["lr"] = lr
        for p in model.parameters():
            p.grad.mul_(0.5)
        optimizer.step()

    if compiler is not None:
        torch._dynamo.reset()
        step = torch.compile(step, backend=compiler)
    for index, (x, y) in enumerate(regression_batches(3)):
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        step(LR * (index + 1))
    torch._dynamo.reset()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
@pytest.mark.parametrize("backend", ["torch", "numba"])
@pytest.mark.parametrize("rule", ["adamw"])  # the operator's path is the same for every rule
def test_writes_the_compiled_region_makes_before_the_step_are_what_it_updates_with(rule, backend, compiler):
    """A new lr set and grads halved in place inside the compiled region, just before opt.step():
    the update uses both, as torch.optim does eagerly (under aot_eager the operator is handed
    functional copies of the grads; their values are what it steps with)."""
    fused, reference = OPTIMIZERS[rule]
    options = dict(STATEFUL[rule], lr=LR, weight_decay=0.1)
    expected = stepped_with_the_same_writes(lambda params: reference(params, **options))
    ours = stepped_with_the_same_writes(lambda params: fused(params, backend=backend, **options), compiler)
    assert_same_numbers(ours, expected, f"{rule} on {backend} under {compiler}")


def test_under_inductor_the_operator_updates_the_users_tensors_in_place(monkeypatch):
    """inductor hands fusedopt::step the tensors themselves (no copy to step and copy back); under
    aot_eager, which does not update in place, it hands copies."""
    handed_copies = []
    take_newer_values = fusedopt.compiled.take_newer_values

    def spy(given, live):
        copied = take_newer_values(given, live)
        handed_copies.append(len(copied))
        return copied

    monkeypatch.setattr(fusedopt.compiled, "take_newer_values", spy)
    for compiler, copies in (("inductor", 0), ("aot_eager", None)):
        handed_copies.clear()
        Run("adamw", "numba", "b", tensor_lr=True, compiler=compiler)
        assert len(handed_copies) == STEPS
        if copies is None:
            assert all(handed_copies), handed_copies
        else:
            assert handed_copies == [copies] * STEPS


def test_a_copied_optimizer_compiles_a_step_of_its_own_tensors():
    """The graph names its optimizer by a handle; a deep copy has its own, so a compiled step of the
    copy updates the copy's params and leaves the original's."""
    import copy

    params = [torch.nn.Parameter(torch.ones(3))]
    original = fusedopt.SGD(params, lr=0.5, momentum=0.9, backend="numba")
    params[0].grad = torch.ones(3)
    original.step()
    duplicate = copy.deepcopy(original)
    copied_param = duplicate.param_groups[0]["params"][0]
    copied_param.grad = torch.ones(3)
    torch._dynamo.reset()
    torch.compile(duplicate.step, backend="aot_eager")()
    torch._dynamo.reset()
    torch.testing.assert_close(params[0].detach(), torch.full((3,), 0.5))
    torch.testing.assert_close(copied_param.detach(), torch.full((3,), 0.5 - 0.5 * 1.9))


@pytest.mark.parametrize("dtype", [torch.complex64, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("backend", ["torch", "numba"])
def test_a_compiled_step_of_every_param_dtype_under_inductor_matches_the_eager_step(dtype, backend):
    """Complex params (which inductor cannot hand to an operator that writes them: those steps are
    eager, at the graph break), fp64 and bf16: the compiled step gives the eager step's numbers."""
    results = []
    for compiler in (None, "inductor"):
        torch.manual_seed(0)
        params = [torch.randn(7, dtype=dtype, requires_grad=True), torch.randn(3, 5, dtype=dtype, requires_grad=True)]
        optimizer = fusedopt.AdamW(params, lr=0.1, backend=backend)
        step = optimizer.step if compiler is None else torch.compile(optimizer.step, backend=compiler)
        torch._dynamo.reset()
        generator = torch.Generator().manual_seed(1)
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, dtype=dtype, generator=generator)
            step()
        torch._dynamo.reset()
        results.append([p.detach().clone() for p in params])
    for ours, eager in zip(*reversed(results)):
        torch.testing.assert_close(ours, eager, rtol=0, atol=0)


@pytest.mark.parametrize("storage", [dict(state_precision="bf16"), dict(state_precision="8bit"),
                                     dict(state_precision="8bit", state_rounding="stochastic"),
                                     dict(state_precision="8bit", master_weights="remainder")],
                         ids=["bf16", "8bit", "8bit-stochastic", "8bit-remainder"])
@pytest.mark.parametrize("backend", ["torch", "numba"])
def test_a_compiled_step_with_low_precision_states_matches_the_eager_step(storage, backend):
    """States in bf16 or 8 bits (codes and scales), bf16 params with remainders: the compiled step
    writes what the eager one writes, bit for bit."""
    dtype = torch.bfloat16 if "master_weights" in storage else torch.float32
    results = []
    for compiler in (None, "inductor"):
        torch.manual_seed(0)
        params = [torch.randn(64, 128, dtype=dtype, requires_grad=True), torch.randn(5000, requires_grad=True)]
        optimizer = fusedopt.AdamW(params, lr=0.1, backend=backend, **storage)
        step = optimizer.step if compiler is None else torch.compile(optimizer.step, backend=compiler)
        torch._dynamo.reset()
        generator = torch.Generator().manual_seed(1)
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=generator).to(p.dtype)
            step()
        torch._dynamo.reset()
        results.append([p.detach().clone() for p in params] +
                       [value.clone() for p in params for value in optimizer.state[p].values()])
    expected = torch.bfloat16 if storage["state_precision"] == "bf16" else torch.int8
    assert optimizer.state[params[0]]["exp_avg"].dtype == expected, "scenario setting"
    for ours, eager in zip(*reversed(results)):
        torch.testing.assert_close(ours, eager, rtol=0, atol=0)


def reduce_overhead_run(make, compiled):
    """Params after 4 steps of a whole training step on CUDA, compiled with mode="reduce-overhead"
    (CUDA graphs) or eager, and the number of graphs inductor did not capture."""
    torch._dynamo.reset()
    counters.clear()
    model = regression_model().cuda()
    optimizer = make(model.parameters())

    def train_step(x, y):
        torch.nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()

    if compiled:
        train_step = torch.compile(train_step, mode="reduce-overhead")
    for x, y in regression_batches(4):
        train_step(x.cuda(), y.cuda())
    torch.cuda.synchronize()
    skips = counters["inductor"]["cudagraph_skips"]
    torch._dynamo.reset()
    return [p.detach().cpu() for p in model.parameters()], skips


cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


@cuda_only
@pytest.mark.parametrize("capturable", [False, True])
def test_reduce_overhead_training_step_on_cuda_matches_eager_torch_optim(capturable):
    options = dict(lr=LR, weight_decay=0.1, capturable=capturable)
    expected, _ = reduce_overhead_run(lambda params: torch.optim.AdamW(params, **options), compiled=False)
    ours, _ = reduce_overhead_run(lambda params: fusedopt.AdamW(params, **options), compiled=True)
    assert_same_numbers(ours, expected, f"AdamW(capturable={capturable}) under reduce-overhead")


@pytest.mark.skipif(not hasattr(torch.Tag, "cudagraph_unsafe"), reason="a torch without the cudagraph_unsafe tag")
def test_inductor_never_captures_the_operator_in_a_cuda_graph():
    """A replay of a CUDA graph holding fusedopt::step would skip the step's host work (the table
    checks, the state it makes, the grads held now) and write through the addresses it captured:
    the operator carries the tag that inductor's capture checks (whole graph, or partitions) read."""
    is_cudagraph_unsafe_fx_node = getattr(pytest.importorskip("torch._inductor.utils"), "is_cudagraph_unsafe_fx_node",
                                          None)
    if is_cudagraph_unsafe_fx_node is None:
        pytest.skip("this torch's inductor reads the tag elsewhere")
    graph = torch.fx.Graph()
    node = graph.call_function(torch.ops.fusedopt.step.default, (0, [], [], [], []))
    assert torch.Tag.cudagraph_unsafe in torch.ops.fusedopt.step.default.tags
    assert is_cudagraph_unsafe_fx_node(node)


def test_copies_the_graph_hands_over_are_paired_with_the_users_tensors_or_refused():
    """take_newer_values pairs each copy with the tensor it stands for, by position; where the
    lists do not match (unreachable behind dynamo's guards) copies are refused, never dropped."""
    param, state, grad = torch.zeros(3), torch.zeros(3), torch.ones(3)
    live = ([param], [grad], [state], [])
    param_copy = torch.full((3,), 2.0)
    copied = fusedopt.compiled.take_newer_values(([param_copy], [grad], [state], []), live)
    assert [(copy is param_copy, tensor is param) for copy, tensor in copied] == [(True, True)]
    assert torch.equal(param, param_copy)
    param.add_(1.0)
    fusedopt.compiled.give_values_back(copied, [param, state])
    assert torch.equal(param_copy, torch.full((3,), 3.0))
    assert fusedopt.compiled.take_newer_values(([param], [grad], [], []), live) == []
    with pytest.raises(RuntimeError, match="copies of tensors the optimizer no longer steps"):
        fusedopt.compiled.take_newer_values(([param_copy], [grad], [], []), live)


@pytest.mark.parametrize("backend", ["torch", "numba"])
def test_clip_grad_norm_in_a_compiled_step_runs_eagerly_with_torchs_numbers(backend):
    """opt.clip_grad_norm_ inside a compiled training step is a graph break of its own that runs
    eagerly (no graph holds the reduction or the clip factor): torch's clip then step, eagerly,
    to fp32 rounding, and the norm it returns."""
    def run(make, clip, compiled):
        model = regression_model()
        optimizer = make(model.parameters())
        norms = []

        def train_step(x, y):
            torch.nn.functional.mse_loss(model(x), y).backward()
            norms.append(clip(optimizer, model))
            optimizer.step()
            optimizer.zero_grad()

        if compiled:
            torch._dynamo.reset()
            train_step = torch.compile(train_step, backend="aot_eager")
        for x, y in regression_batches(3):
            train_step(x, y)
        torch._dynamo.reset()
        return [p.detach().clone() for p in model.parameters()], torch.stack(norms)

    ours = run(lambda params: fusedopt.AdamW(params, lr=LR, backend=backend),
               lambda optimizer, model: optimizer.clip_grad_norm_(0.05), compiled=True)
    theirs = run(lambda params: torch.optim.AdamW(params, lr=LR),
                 lambda optimizer, model: torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05), compiled=False)
    assert_same_numbers(ours[0], theirs[0], f"clipped adamw on {backend}")
    torch.testing.assert_close(ours[1], theirs[1], rtol=1e-5, atol=0)
