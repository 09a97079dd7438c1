"""capturable=True and tensor learning rates: step counts on the params' device, a tensor lr read
by the kernel, nothing read back on the host, and (where CUDA exists) a captured CUDA graph that
replays a run, lr changes included, exactly as eager steps do."""
import copy
import inspect

import pytest
import torch

from fusedopt.registry import RULES as REGISTRY
from helpers import (assert_optimizers_match, assign_grads, capture_cuda_graph, fill_static_grads, make_grads,
                     make_params, tolerance)

from conftest import kernels_runnable

# The rules that take capturable=True (as their torch.optim class does).
CAPTURABLE = {name: info.optimizer for name, info in REGISTRY.items()
              if "capturable" in inspect.signature(info.optimizer.__init__).parameters}
ALL_RULES = {name: (info.optimizer, info.oracle, info.stateful) for name, info in REGISTRY.items()}
SHAPES = [(7,), (33, 17), (4097,)]


def fp32_tolerance(device, rule, options):
    rtol, atol = tolerance(torch.float32, device, rule, options)
    return dict(rtol=rtol, atol=atol)


def params_and_twins(device, seed, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    params = make_params(dtype, device, generator, shapes=SHAPES, odd_layouts=False, complex_params=False)
    twins = [p.detach().clone().requires_grad_() for p in params]
    return params, twins, generator


@pytest.fixture
def triton_device(device):
    if not kernels_runnable(device):
        pytest.skip("the kernels need CUDA or TRITON_INTERPRET=1")
    return device


@pytest.mark.parametrize("rule", list(CAPTURABLE))
def test_capturable_keeps_steps_on_the_params_device(rule, triton_device):
    params, _, generator = params_and_twins(triton_device, 1)
    optimizer = CAPTURABLE[rule](params, lr=0.01, capturable=True, backend="triton")
    assign_grads(params, make_grads(params, generator))
    optimizer.step()
    for p in params:
        step = optimizer.state[p]["step"]
        assert step.device == p.device and step.dtype == torch.float32 and step.dim() == 0
        assert step.item() == 1


@pytest.mark.parametrize("rule", list(ALL_RULES))
def test_tensor_lr_changed_in_place_matches_torch(rule, triton_device):
    """A tensor lr is read by the kernel each step: changing it in place takes effect at the next
    step, as torch.optim with the same tensor lr (for-loop implementation) does."""
    fused_class, oracle, options = ALL_RULES[rule]
    params, twins, generator = params_and_twins(triton_device, 2)
    lr, twin_lr = torch.tensor(0.02, device=triton_device), torch.tensor(0.02)
    fused = fused_class(params, lr=lr, backend="triton", **options)
    expected = oracle(twins, lr=twin_lr, **options)
    for step in range(4):
        grads = make_grads(params, generator)
        assign_grads(params, grads)
        assign_grads(twins, [g.clone() for g in grads])
        fused.step()
        expected.step()
        lr.mul_(0.5)
        twin_lr.mul_(0.5)
    assert_optimizers_match(fused, expected, params, twins, where=f"{rule} tensor lr",
                            **fp32_tolerance(triton_device, rule, options))


@pytest.mark.parametrize("rule", list(ALL_RULES))
def test_step_reads_nothing_back_on_the_host(rule, triton_device, monkeypatch):
    """Once the tables are built, a step with a tensor lr, GradScaler's scalars and a pending clip
    never calls Tensor.item (on CUDA that would be a synchronisation, and break a capture)."""
    fused_class, _, options = ALL_RULES[rule]
    params, _, generator = params_and_twins(triton_device, 3)
    optimizer = fused_class(params, lr=torch.tensor(0.01, device=triton_device), backend="triton", **options)
    assign_grads(params, make_grads(params, generator))
    optimizer.step()  # builds the tables and starts SGD's momentum buffers
    optimizer.grad_scale = torch.tensor(8.0, device=triton_device)
    optimizer.found_inf = torch.tensor(0.0, device=triton_device)
    before = [p.detach().clone() for p in params]

    def no_item(self):
        raise AssertionError("Tensor.item() called inside step()")

    monkeypatch.setattr(torch.Tensor, "item", no_item)
    assign_grads(params, make_grads(params, generator))
    optimizer.clip_grad_norm_(0.5)
    optimizer.step()
    monkeypatch.undo()
    assert any(not torch.equal(p, b) for p, b in zip(params, before))


@pytest.mark.parametrize("rule", list(CAPTURABLE))
def test_capturable_checkpoint_loads_into_torch_and_back(rule, triton_device):
    """fusedopt's device steps load into torch.optim (non-capturable on the CPU, capturable on
    CUDA), and torch's state loads back; both continue on the same trajectory."""
    params, twins, generator = params_and_twins(triton_device, 4)
    torch_capturable = triton_device == "cuda"
    fused = CAPTURABLE[rule](params, lr=0.01, capturable=True, backend="triton")
    for _ in range(2):
        assign_grads(params, make_grads(params, generator))
        fused.step()
    with torch.no_grad():
        for twin, p in zip(twins, params):
            twin.copy_(p)
    expected = REGISTRY[rule].oracle(twins, lr=0.01, capturable=torch_capturable)
    expected.load_state_dict(copy.deepcopy(fused.state_dict()))  # as through torch.save / torch.load
    for group in expected.param_groups:
        group["capturable"] = torch_capturable  # torch's capturable path takes no CPU tensors
    for _ in range(2):
        grads = make_grads(params, generator)
        assign_grads(params, grads)
        assign_grads(twins, [g.clone() for g in grads])
        fused.step()
        expected.step()
    assert_optimizers_match(fused, expected, params, twins, where=f"{rule} checkpoint to torch",
                            **fp32_tolerance(triton_device, rule, {}))
    fused.load_state_dict(copy.deepcopy(expected.state_dict()))
    grads = make_grads(params, generator)
    assign_grads(params, grads)
    assign_grads(twins, [g.clone() for g in grads])
    fused.step()
    expected.step()
    assert_optimizers_match(fused, expected, params, twins, where=f"{rule} checkpoint back",
                            **fp32_tolerance(triton_device, rule, {}))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA")
@pytest.mark.parametrize("rule", list(ALL_RULES))
def test_captured_step_replays_like_eager_steps(rule):
    """opt.step() captured once in a CUDA graph and replayed, with fresh grads copied into the
    static grads and the tensor lr changed in place between replays, gives the eager run."""
    fused_class, _, options = ALL_RULES[rule]
    if rule in CAPTURABLE:
        options = dict(options, capturable=True)
    params, twins, generator = params_and_twins("cuda", 5)
    lr, twin_lr = torch.tensor(0.02, device="cuda"), torch.tensor(0.02, device="cuda")
    graphed = fused_class(params, lr=lr, **options)
    eager = fused_class(twins, lr=twin_lr, **options)
    for p in params:
        p.grad = torch.zeros_like(p)

    def warm_up_step():
        fill_static_grads(params, twins, generator)
        graphed.step()
        eager.step()

    graph = capture_cuda_graph(warm_up_step, graphed.step)
    for _ in range(5):
        fill_static_grads(params, twins, generator)
        graph.replay()
        eager.step()
        lr.mul_(0.7)
        twin_lr.mul_(0.7)
    torch.cuda.synchronize()
    assert_optimizers_match(graphed, eager, params, twins, where=f"{rule} graph replay", rtol=1e-6, atol=1e-7)
