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
from helpers import OPTIMIZERS, RULES, STATEFUL, regression_batches, regression_model

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
    tensor_lr = pattern == "b"  # the pattern torch documents for compiling the step
    ours, theirs = Run(rule, backend, pattern, tensor_lr), torch_run(rule, pattern, tensor_lr)
    assert_same_numbers(ours.params, eager_torch_params(rule, tensor_lr), f"{rule} pattern {pattern}")
    assert ours.breaks <= theirs.breaks, f"{ours.breaks} graph breaks, torch.optim {theirs.breaks}"
    # no recompilation when the lr changes: nothing is compiled after the first step
    assert ours.frames == [ours.frames[0]] * STEPS, f"frames compiled after each step: {ours.frames}"
    assert ours.frames[0] <= theirs.frames[0], f"{ours.frames[0]} frames, torch.optim {theirs.frames[0]}"


@pytest.mark.parametrize("backend", ["torch", "numba"])
def test_whole_adamw_step_under_inductor_with_a_linear_warmup_matches_eager(backend):
    """A whole training step compiled by inductor, AdamW with weight decay and LinearLR: the params
    of eager torch.optim.AdamW to fp32 rounding (the lr was once baked into the graph: 2e-3 off)."""
    ours = Run("adamw", backend, "c", compiler="inductor")
    assert_same_numbers(ours.params, eager_torch_params("adamw", False), "adamw under inductor")
    assert ours.frames == [ours.frames[0]] * STEPS


def test_the_step_is_one_opaque_call_to_dynamo():
    """dynamo does not trace into step(): no graph holds the update, so none can freeze the lr
    or a table address (the step runs as it does eagerly, between the graphs)."""
    params = [torch.nn.Parameter(torch.ones(3))]
    optimizer = fusedopt.SGD(params, lr=0.5, backend="torch")
    params[0].grad = torch.ones(3)
    explanation = torch._dynamo.explain(optimizer.step)()
    assert explanation.graph_count == 0
    assert torch.equal(params[0].detach(), torch.full((3,), 0.5))
