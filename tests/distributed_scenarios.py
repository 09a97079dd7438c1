"""Multi-process scenarios for tests/test_distributed.py: fusedopt under FSDP2 (fully_shard), HSDP,
DDP, ZeroRedundancyOptimizer and torch.distributed.checkpoint, each run beside torch.optim (the
oracle) on CPU tensors over gloo.

Spawning is the cost (each process imports torch and triton), so one spawn runs many scenarios:

- `run_phase(phase, names, workdir)` (in the pytest process) starts the ranks of a phase
  (`PHASES`: world size 1 or 2) as ``python distributed_scenarios.py --rank R ...``, each
  bounded in time, and returns, for every scenario name, one record per rank:
  ``{"ok": True, "value": ...}`` (what the scenario measured: numbers, booleans, strings, lists
  of mismatch descriptions) or ``{"ok": False, "error": traceback}``.
- In a rank (`worker_main`), the scenarios run one after the other inside one process group.
  After each, the ranks agree through the store whether all of them passed; a scenario that
  raised on any rank gets the process group destroyed at once (so a peer blocked in a
  collective fails instead of hanging) and re-created for the next scenario.
- A scenario that hangs or kills a rank is reported as failed with the ranks' log tails, and the
  scenarios after it run in a fresh spawn.

Rendezvous goes through a FileStore in the spawn's directory (no listening port for it); gloo's
own sockets are on the loopback interface (127.0.0.1, ports chosen by the OS).

Phases run in order: "save1" (1 rank: checkpoints to load on 2 ranks), "world2" (2 ranks:
everything else, including saving checkpoints for 1 rank), "load1" (1 rank): one spawn each.
"""
import os

if __name__ == "__main__":  # a rank: the Triton interpreter must be on before triton is imported
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    import interpreter_speedup

    interpreter_speedup.speed_up()

import argparse
import contextlib
import datetime
import gc
import json
import math
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fusedopt.registry import RULES as REGISTRY
from fusedopt.rounding import split_master

# ---- the scenarios' setting ----

# The reference, Triton's kernels (what CUDA runs) and numba's (what CPU tensors run by default).
BACKENDS = ("torch", "triton", "numba")
# The kinds that test host plumbing every kernel backend shares (DDP, ZeRO, checkpoints: the same
# plans and tensor-table checks) run on the kernels only as numba's, much cheaper than Triton's
# interpreter; every FSDP2, HSDP, tensor-parallel, clip, AMP and bf16 kind runs on both.
PLUMBING_BACKENDS = ("torch", "numba")
RULES = tuple(REGISTRY)
CLASSES = {name: (info.optimizer, info.torch_optimizer) for name, info in REGISTRY.items()}
# Options that give each rule's every state tensor something to do (the registry's).
OPTIONS = {name: dict(info.api_options) for name, info in REGISTRY.items()}
NORM_TYPES = (2.0, 1.0, 3.5, math.inf)
MESHES = ("fsdp", "hsdp")
SCALERS = ("grad_scaler", "sharded_grad_scaler")
STEPS = 3
GLOBAL_BATCH = 8
# fp32 trajectories against torch.optim: a few ulp per step (see helpers.tolerance); state
# tolerances are taken relative to each state kind's RMS.
RTOL, ATOL = 1e-5, 1e-6

PHASES = {"save1": 1, "world2": 2, "load1": 1}  # phase -> world size, in the order they run

ATTEMPT_TIMEOUT_S = 420  # one spawn, start to end (world2 runs about 75 s alone, 140 s beside other tests)
STALL_TIMEOUT_S = 150    # no scenario finishing for this long: the spawn is stopped
COLLECTIVE_TIMEOUT_S = 60
STORE_TIMEOUT_S = 120

# ---- the registry ----


@dataclass
class Scenario:
    name: str
    kind: str
    phase: str
    function: object
    kwargs: dict
    needs: tuple = ()  # scenarios (of earlier phases) whose checkpoints this one loads
    runs_with: tuple = ()  # scenarios to run (before this one) whenever this one runs


SCENARIOS = {}


def register(kind, function, phase="world2", needs=(), runs_with=(), unnamed=None, **kwargs):
    """A scenario named after its kind and arguments (`unnamed`: arguments left out of the name)."""
    name = "-".join([kind, *(_label(key, value) for key, value in kwargs.items())])
    assert name not in SCENARIOS, name
    SCENARIOS[name] = Scenario(name, kind, phase, function, {**kwargs, **(unnamed or {})}, tuple(needs),
                               tuple(runs_with))
    return name


def _label(key, value):
    if isinstance(value, bool):
        return key if value else f"no_{key}"
    if isinstance(value, float):
        return "inf" if value == math.inf else f"{value:g}"
    return str(value)


def names(kind, **fixed):
    """The registered names of one kind of scenario whose arguments include `fixed`."""
    return [s.name for s in SCENARIOS.values()
            if s.kind == kind and all(s.kwargs.get(key) == value for key, value in fixed.items())]


def name_of(kind, **kwargs):
    found = [s.name for s in SCENARIOS.values() if s.kind == kind and s.kwargs == kwargs]
    assert len(found) == 1, (kind, kwargs, found)
    return found[0]


# ---- the world a scenario runs in (set in each rank by worker_main) ----


@dataclass
class World:
    rank: int = 0
    world_size: int = 1
    workdir: Path = Path(".")
    attempt: int = 1


WORLD = World()


def dist():
    import torch.distributed

    return torch.distributed


def mesh_of(kind="fsdp"):
    from torch.distributed.device_mesh import init_device_mesh

    if kind == "hsdp":
        return init_device_mesh("cpu", (1, WORLD.world_size), mesh_dim_names=("replicate", "shard"))
    return init_device_mesh("cpu", (WORLD.world_size,))


def is_dtensor(tensor):
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def full(tensor):
    """A DTensor's global value (a collective: every rank calls it in the same order)."""
    return tensor.full_tensor() if is_dtensor(tensor) else tensor


def full_values(tensors):
    """The global values of `tensors` (detached; a DTensor assembled from every rank's shard, one
    collective for all of them; others as they are). Every rank calls it with the same DTensors in
    the same order; a replicated part holds this rank's copy, as full_tensor() would."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    tensors = [t.detach() for t in tensors]
    sharded = [i for i, t in enumerate(tensors) if is_dtensor(t)]
    if not sharded:
        return tensors
    shards = [(tensors[i].to_local().cpu(), compute_local_shape_and_global_offset(
        tensors[i].shape, tensors[i].device_mesh, tensors[i].placements)[1]) for i in sharded]
    by_rank = [None] * WORLD.world_size
    dist().all_gather_object(by_rank, shards)
    by_rank.append(by_rank.pop(WORLD.rank))  # this rank's shards last: its copy of a replicated part wins
    for k, i in enumerate(sharded):
        whole = torch.empty(tensors[i].shape, dtype=tensors[i].dtype)
        for rank_shards in by_rank:
            local, offset = rank_shards[k]
            whole[tuple(slice(start, start + size) for start, size in zip(offset, local.shape))] = local
        tensors[i] = whole
    return tensors


def launch_count():
    from fusedopt import kernels

    return kernels.launch_count()


# ---- models, data and optimizers ----


def make_model(seed=0, dtype=torch.float32):
    """Odd sizes; sharded over 2 ranks by rows the weights split 4/3, 2/1 and 1/0: the last
    layer, Linear(3, 1), leaves rank 1 empty local shards."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3), nn.Tanh(), nn.Linear(3, 1)).to(dtype)


def shard(model, mesh):
    """fully_shard each Linear layer, then the root."""
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def fsdp_model(mesh, seed=0, dtype=torch.float32):
    return shard(make_model(seed, dtype), mesh)


def ddp_model(seed=0):
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(make_model(seed))


def batch(step, dtype=torch.float32):
    """This rank's rows of the global batch of `step` (the whole batch on 1 rank): data parallel
    runs average the grads over ranks, so the trajectory does not depend on the world size."""
    generator = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(GLOBAL_BATCH, 5, generator=generator)
    y = torch.randn(GLOBAL_BATCH, 1, generator=generator)
    rows = GLOBAL_BATCH // WORLD.world_size
    start = WORLD.rank * rows
    return x[start:start + rows].to(dtype), y[start:start + rows].to(dtype)


def loss_of(model, step, scale=1.0):
    dtype = next(model.parameters()).dtype
    x, y = batch(step, dtype)
    return F.mse_loss(model(x), y) * scale


def fused_optimizer(rule, params, backend, **extra):
    return CLASSES[rule][0](params, backend=backend, **{**OPTIONS[rule], **extra})


def torch_optimizer(rule, params, **extra):
    """The oracle: torch.optim's for-loop implementation, or where torch.optim has no such rule,
    fusedopt's reference (RuleInfo.oracle)."""
    return REGISTRY[rule].oracle(params, **{**OPTIONS[rule], **extra})


def train_step(model, optimizer, step, scale=1.0):
    loss_of(model, step, scale).backward()
    optimizer.step()
    optimizer.zero_grad()


# ---- comparisons (each returns a list of problems; [] when all agree) ----


def compare_tensor(actual, expected, name, rtol=RTOL, atol=ATOL):
    from helpers import describe_mismatch

    if actual.shape != expected.shape or actual.dtype != expected.dtype:
        return [f"{name}: {actual.dtype}{tuple(actual.shape)} != {expected.dtype}{tuple(expected.shape)}"]
    problem = describe_mismatch(actual, expected, rtol, atol)
    return [] if problem is None else [f"{name}: {problem}"]


def full_states(states):
    """{key: {state name: global value}} of {key: param state}, in a fixed order on every rank."""
    entries = [(key, name, value) for key, state in states.items() for name, value in sorted(state.items())]
    tensors = iter(full_values([value for _, _, value in entries if torch.is_tensor(value)]))
    result = {key: {} for key in states}
    for key, name, value in entries:
        result[key][name] = next(tensors) if torch.is_tensor(value) else value
    return result


def compare_states(actual, expected, rtol=RTOL, atol=ATOL, where=""):
    """Every param's state: the same names, equal step counts, tensors within tolerance (atol
    relative to the RMS of each state kind, as in helpers.assert_optimizers_match)."""
    from helpers import state_scale

    actual, expected = full_states(actual), full_states(expected)
    problems = []
    if set(actual) != set(expected):
        return [f"{where}states of {sorted(map(str, actual))} != {sorted(map(str, expected))}"]
    by_kind = {}
    for state in expected.values():
        for name, value in state.items():
            if name != "step" and torch.is_tensor(value):
                by_kind.setdefault(name, []).append(value)
    scales = {name: state_scale(values) for name, values in by_kind.items()}
    for key in expected:
        if set(actual[key]) != set(expected[key]):
            problems.append(f"{where}{key}: state keys {sorted(actual[key])} != {sorted(expected[key])}")
            continue
        for name, value in expected[key].items():
            label = f"{where}{key} state[{name!r}]"
            mine = actual[key][name]
            if name == "step":
                if not (torch.is_tensor(mine) and torch.is_tensor(value)):
                    problems.append(f"{label}: {mine!r} != {value!r}")
                elif mine.dtype != value.dtype or float(mine) != float(value):
                    problems.append(f"{label}: {float(mine)} ({mine.dtype}) != {float(value)} ({value.dtype})")
            elif torch.is_tensor(value):
                problems += compare_tensor(mine, value, label, rtol, atol * scales[name])
            elif mine != value:
                problems.append(f"{label}: {mine!r} != {value!r}")
    return problems


def named_states(model, optimizer):
    return {name: optimizer.state.get(p, {}) for name, p in model.named_parameters()}


def compare_runs(fused_model, fused, torch_model, expected, rtol=RTOL, atol=ATOL):
    """Params (global values) and every state tensor of the fusedopt run against torch.optim's."""
    problems = []
    names = [name for name, _ in fused_model.named_parameters()]
    theirs = dict(torch_model.named_parameters())
    values = full_values([p for _, p in fused_model.named_parameters()] + [theirs[name] for name in names])
    for name, mine, torch_value in zip(names, values[:len(names)], values[len(names):]):
        problems += compare_tensor(mine, torch_value, f"param {name}", rtol, atol)
    return problems + compare_states(named_states(fused_model, fused), named_states(torch_model, expected),
                                     rtol, atol)


def snapshot(model, optimizer):
    """Clones of every param's and state tensor's global value."""
    names = [name for name, _ in model.named_parameters()]
    params = dict(zip(names, (value.clone() for value in full_values([p for _, p in model.named_parameters()]))))
    states = {name: {key: v.clone() if torch.is_tensor(v) else v for key, v in state.items()}
              for name, state in full_states(named_states(model, optimizer)).items()}
    return params, states


def changes_since(before, model, optimizer):
    """What differs (bitwise) from `snapshot`: params, state tensors, step counts, state keys."""
    params, states = snapshot(model, optimizer)
    problems = [f"param {name} changed" for name in params if not torch.equal(params[name], before[0][name])]
    for name, state in states.items():
        old = before[1].get(name, {})
        if set(state) != set(old):
            problems.append(f"{name}: state keys {sorted(old)} became {sorted(state)}")
            continue
        problems += [f"{name} state[{key!r}] changed" for key, value in state.items()
                     if torch.is_tensor(value) and not torch.equal(value, old[key])]
    return problems


def dtensor_state_layout(model, optimizer):
    """Problems with the DTensor layout of the states: each state tensor (but the step count) a
    DTensor of its param's global shape, mesh and placements, with a local shard of its param's."""
    problems = []
    for name, p in model.named_parameters():
        if not is_dtensor(p):
            problems.append(f"param {name} is a {type(p).__name__}, not a DTensor")
            continue
        for key, value in optimizer.state.get(p, {}).items():
            if key == "step":
                continue
            label = f"{name} state[{key!r}]"
            if not is_dtensor(value):
                problems.append(f"{label} is a {type(value).__name__}, not a DTensor")
            elif value.placements != p.placements or value.device_mesh != p.device_mesh:
                problems.append(f"{label}: placements {value.placements} on {value.device_mesh}, param: "
                                f"{p.placements} on {p.device_mesh}")
            elif value.shape != p.shape or value.to_local().shape != p.to_local().shape:
                problems.append(f"{label}: shape {tuple(value.shape)} (local {tuple(value.to_local().shape)}), "
                                f"param {tuple(p.shape)} (local {tuple(p.to_local().shape)})")
    return problems


def placements_of(tensor):
    return [repr(placement) for placement in tensor.placements]


# ---- FSDP2: trajectories, launches, DTensor states ----


def params_of(model, rule, groups):
    """The model's params, or (groups) two param groups, the last layer alone with half the lr: on
    rank 1 of 2 that group holds only empty local shards."""
    params = list(model.parameters())
    if not groups:
        return params
    return [{"params": params[:4]}, {"params": params[4:], "lr": OPTIONS[rule]["lr"] / 2}]


def train_beside_torch(fused_model, fused, torch_model, expected):
    """STEPS steps of both optimizers on the same batches; the kernel launches of each fused step."""
    launches = []
    for step in range(STEPS):
        loss_of(fused_model, step).backward()
        loss_of(torch_model, step).backward()
        before = launch_count()
        fused.step()
        launches.append(launch_count() - before)
        expected.step()
        fused.zero_grad()
        expected.zero_grad()
    return launches


def fsdp2_trajectory(rule, backend, groups=False):
    """3 steps of fully_shard'ed models, fusedopt beside torch.optim; kernel launches per step()."""
    mesh = mesh_of()
    fused_model, torch_model = fsdp_model(mesh), fsdp_model(mesh)
    fused = fused_optimizer(rule, params_of(fused_model, rule, groups), backend)
    expected = torch_optimizer(rule, params_of(torch_model, rule, groups))
    launches = train_beside_torch(fused_model, fused, torch_model, expected)
    return dict(mismatches=compare_runs(fused_model, fused, torch_model, expected),
                state_layout=dtensor_state_layout(fused_model, fused), launches=launches,
                local_numels={name: p.to_local().numel() for name, p in fused_model.named_parameters()},
                supports_amp_scaling=fused._step_supports_amp_scaling)


# ---- clipping by the global grad norm ----

MAX_NORM = 0.25  # below every norm type's total norm here: every step is clipped


def torch_clip_grad_norm_(model, max_norm, norm_type):
    """torch.nn.utils.clip_grad_norm_ of the model's (DTensor) grads. For the inf norm torch cannot
    take an empty local shard (vector_norm has no identity for max), so there the same two torch
    functions run on the gathered global grads: get_total_norm, then clip_grads_with_norm_."""
    params = list(model.parameters())
    if norm_type != math.inf:
        return torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type, foreach=False)
    total = torch.nn.utils.get_total_norm([full(p.grad) for p in params], norm_type, foreach=False)
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total, foreach=False)
    return total


def fsdp2_clip(norm_type, mesh, backend, groups=False):
    """clip_grad_norm_ then step() (SGD with momentum: the update is proportional to the clipped
    grads) beside torch.nn.utils.clip_grad_norm_ then torch.optim's step()."""
    device_mesh = mesh_of(mesh)
    fused_model, torch_model = fsdp_model(device_mesh), fsdp_model(device_mesh)
    fused = fused_optimizer("sgd", params_of(fused_model, "sgd", groups), backend)
    expected = torch_optimizer("sgd", params_of(torch_model, "sgd", groups))
    record = dict(norms=[], torch_norms=[], norm_is_dtensor=[], norm_placements=[], norm_on_param_mesh=[],
                  norm_shapes=[], norm_dtypes=[], launches=[],
                  param_placements=placements_of(next(fused_model.parameters())))
    for step in range(STEPS):
        loss_of(fused_model, step).backward()
        loss_of(torch_model, step).backward()
        before = launch_count()
        norm = fused.clip_grad_norm_(MAX_NORM, norm_type)
        fused.step()
        record["launches"].append(launch_count() - before)
        torch_norm = torch_clip_grad_norm_(torch_model, MAX_NORM, norm_type)
        expected.step()
        fused.zero_grad()
        expected.zero_grad()
        record["norm_is_dtensor"].append(is_dtensor(norm))
        record["norm_placements"].append(placements_of(norm) if is_dtensor(norm) else None)
        record["norm_on_param_mesh"].append(is_dtensor(norm) and norm.device_mesh == device_mesh)
        record["norm_shapes"].append(list(norm.shape))
        record["norm_dtypes"].append(str(norm.dtype))
        record["norms"].append(full(norm).item())
        record["torch_norms"].append(full(torch_norm).item())
    record["mismatches"] = compare_runs(fused_model, fused, torch_model, expected)
    record["state_layout"] = dtensor_state_layout(fused_model, fused)
    return record


def tp_model(mesh, seed=0):
    """Tensor parallel: Linear(5, 8) split by output features (weight and bias Shard(0)),
    Linear(8, 4) by input features (weight Shard(1), bias replicated), Linear(4, 2) by output
    features again, its output gathered (even splits: a sharded activation has no uneven shape)."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 4), nn.Tanh(), nn.Linear(4, 2))
    plan = {"0": ColwiseParallel(), "2": RowwiseParallel(), "4": ColwiseParallel(output_layouts=Replicate())}
    return parallelize_module(model, mesh, plan)


def tp_trajectory(rule, backend):
    """Tensor parallel, the same whole batch on every rank, clipped by the global norm at every step."""
    mesh = mesh_of()
    fused_model, torch_model = tp_model(mesh), tp_model(mesh)
    fused = fused_optimizer(rule, fused_model.parameters(), backend)
    expected = torch_optimizer(rule, torch_model.parameters())
    record = dict(norms=[], torch_norms=[], launches=[],
                  placements=[placements_of(p) for p in fused_model.parameters()])
    for step in range(STEPS):
        generator = torch.Generator().manual_seed(1000 + step)
        x, y = torch.randn(GLOBAL_BATCH, 5, generator=generator), torch.randn(GLOBAL_BATCH, 2, generator=generator)
        F.mse_loss(fused_model(x), y).backward()
        F.mse_loss(torch_model(x), y).backward()
        before = launch_count()
        record["norms"].append(full(fused.clip_grad_norm_(MAX_NORM)).item())
        fused.step()
        record["launches"].append(launch_count() - before)
        record["torch_norms"].append(full(torch.nn.utils.clip_grad_norm_(list(torch_model.parameters()), MAX_NORM,
                                                                         foreach=False)).item())
        expected.step()
        fused.zero_grad()
        expected.zero_grad()
    record["mismatches"] = compare_runs(fused_model, fused, torch_model, expected)
    return record


def fsdp2_max_grad_norm(backend):
    """max_grad_norm=1.0 (the loss scaled so that every step is clipped) beside torch's
    clip_grad_norm_(1.0) before each step."""
    mesh = mesh_of()
    fused_model, torch_model = fsdp_model(mesh), fsdp_model(mesh)
    fused = fused_optimizer("sgd", fused_model.parameters(), backend, max_grad_norm=1.0)
    expected = torch_optimizer("sgd", torch_model.parameters())
    record = dict(norms=[], torch_norms=[], norm_types=[])
    for step in range(STEPS):
        loss_of(fused_model, step, scale=4.0).backward()
        loss_of(torch_model, step, scale=4.0).backward()
        fused.step()
        torch_norm = torch.nn.utils.clip_grad_norm_(torch_model.parameters(), 1.0, foreach=False)
        expected.step()
        fused.zero_grad()
        expected.zero_grad()
        norm = fused.last_grad_norm
        record["norm_types"].append(type(norm).__name__)
        record["norms"].append(float(norm) if torch.is_tensor(norm) and not is_dtensor(norm) else None)
        record["torch_norms"].append(full(torch_norm).item())
    record["mismatches"] = compare_runs(fused_model, fused, torch_model, expected)
    return record


# ---- AMP: GradScaler and ShardedGradScaler ----


def make_scaler(kind):
    # growth_interval=2: the scale grows within the 3 steps, so that its bookkeeping is compared too
    options = dict(init_scale=2.0**10, growth_interval=2)
    if kind == "sharded_grad_scaler":
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        # its process_group defaults to the world group of the time it was imported
        return ShardedGradScaler("cpu", process_group=dist().group.WORLD, **options)
    return torch.amp.GradScaler("cpu", **options)


def inject_inf(model):
    """An inf in the grad of the first weight, in the local shard of the last rank only."""
    if WORLD.rank == WORLD.world_size - 1:
        grad = next(model.parameters()).grad
        (grad.to_local() if is_dtensor(grad) else grad)[0, 0] = math.inf


def fsdp2_amp(rule, backend, scaler, flow="unscale", inf_step=None):
    """Mixed-precision-style iterations under a scaler, fusedopt beside torch.optim (each with
    its own scaler of the same kind and settings); an inf injected on one rank at `inf_step`.

    flow "unscale": scaler.scale(loss).backward(); scaler.step(opt); scaler.update().
    flow "clip": fusedopt: opt.clip_grad_norm_(1.0, grad_scaler=scaler) in place of
    scaler.unscale_(opt); torch: scaler.unscale_(opt); clip_grad_norm_(params, 1.0)."""
    mesh = mesh_of()
    fused_model, torch_model = fsdp_model(mesh), fsdp_model(mesh)
    fused = fused_optimizer(rule, fused_model.parameters(), backend)
    expected = torch_optimizer(rule, torch_model.parameters())
    fused_scaler, torch_scaler = make_scaler(scaler), make_scaler(scaler)
    record = dict(supports_amp_scaling=fused._step_supports_amp_scaling, scales=[], torch_scales=[],
                  norms=[], torch_norms=[], skipped_step_changes=None, steps_after_skip=None,
                  torch_steps_after_skip=None)
    for step in range(STEPS):
        runs = ((fused_model, fused, fused_scaler, "fused"), (torch_model, expected, torch_scaler, "torch"))
        for model, optimizer, grad_scaler, who in runs:
            grad_scaler.scale(loss_of(model, step, scale=3.0)).backward()
            if step == inf_step:
                inject_inf(model)
            if flow == "clip":
                if who == "fused":
                    norm = optimizer.clip_grad_norm_(1.0, grad_scaler=grad_scaler)
                else:
                    grad_scaler.unscale_(optimizer)
                    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=False)
                record["norms" if who == "fused" else "torch_norms"].append(full(norm).item())
            before = snapshot(model, optimizer) if step == inf_step else None
            grad_scaler.step(optimizer)
            grad_scaler.update()
            optimizer.zero_grad()
            record["scales" if who == "fused" else "torch_scales"].append(grad_scaler.get_scale())
            if before is not None:
                steps = [float(state["step"]) for state in named_states(model, optimizer).values() if "step" in state]
                if who == "fused":
                    record["skipped_step_changes"] = changes_since(before, model, optimizer)
                    record["steps_after_skip"] = steps
                else:
                    record["torch_skipped_step_changes"] = changes_since(before, model, optimizer)
                    record["torch_steps_after_skip"] = steps
    record["mismatches"] = compare_runs(fused_model, fused, torch_model, expected)
    return record


# ---- bf16 params: fp32 master weights, stochastic rounding ----

# The fused run keeps its states (exp_avg, momentum_buffer, ...) in bf16, the param's dtype, torch's
# fp32 run in fp32: each update carries the states' bf16 rounding, a few 2^-9 of itself. So an
# fp32 master follows the fp32 trajectory within BF16_PATH of the distance the tensor moved (its
# largest |fp32 param - start|); measured here: at most 2.7e-3 of it (AdamW), 1.2e-3 (centered
# RMSprop with momentum). A master that kept only bf16 precision would be off by up to half a
# bf16 spacing of the param (2^-9 of its size, ~1e-3 here), above that bound for most tensors.
BF16_PATH = 2.0**-7
BF16_STATE_RTOL = 2.0**-6  # bf16 states against fp32 ones: a few bf16 roundings
BF16_STATE_ATOL = 2.0**-6  # times each state kind's RMS


def fp32_twin(mesh, seed=0):
    """An fp32 model holding exactly the bf16 model's initial values."""
    return shard(make_model(seed, torch.bfloat16).float(), mesh)


def copy_grads_to_fp32(bf16_model, fp32_model):
    for p, q in zip(bf16_model.parameters(), fp32_model.parameters()):
        q.grad = p.grad.float()


def fsdp2_bf16_master(rule, backend):
    """A bf16 model (cast before fully_shard) with master_weights=True, beside torch.optim on an fp32
    copy given the same grads (the bf16 model's, upcast)."""
    mesh = mesh_of()
    bf16_model, fp32_model = fsdp_model(mesh, dtype=torch.bfloat16), fp32_twin(mesh)
    fused = fused_optimizer(rule, bf16_model.parameters(), backend, master_weights=True)
    expected = torch_optimizer(rule, fp32_model.parameters())
    start = {name: full(q.detach()).clone() for name, q in fp32_model.named_parameters()}
    for step in range(STEPS):
        loss_of(bf16_model, step).backward()
        copy_grads_to_fp32(bf16_model, fp32_model)
        fused.step()
        expected.step()
        fused.zero_grad()
        expected.zero_grad()
    record = dict(master_layout=[], param_is_rounded_master=[], master_vs_fp32=[], states_vs_fp32=[],
                  param_dtypes=[str(p.dtype) for p in bf16_model.parameters()])
    fp32_params = dict(fp32_model.named_parameters())
    for name, p in bf16_model.named_parameters():
        master = fused.state[p].get("master_param")
        if master is None:
            record["master_layout"].append(f"{name}: no state['master_param']")
            continue
        if not is_dtensor(master) or master.placements != p.placements or master.device_mesh != p.device_mesh:
            record["master_layout"].append(f"{name}: master is {type(master).__name__} "
                                           f"{getattr(master, 'placements', None)}, param {p.placements}")
        if master.dtype != torch.float32 or master.shape != p.shape:
            record["master_layout"].append(f"{name}: master {master.dtype}{tuple(master.shape)}")
        master_value, param_value = full(master), full(p.detach())
        if not torch.equal(split_master(master_value)[0], param_value):
            record["param_is_rounded_master"].append(f"{name}: param != master rounded to nearest bf16")
        fp32_value = full(fp32_params[name].detach())
        moved = (fp32_value - start[name]).abs().max().item()
        record["master_vs_fp32"] += compare_tensor(master_value, fp32_value, f"{name} master", 0.0,
                                                   BF16_PATH * moved)
    states = {name: {key: value for key, value in state.items() if key != "master_param"}
              for name, state in named_states(bf16_model, fused).items()}
    upcast = {name: {key: value.float() if key != "step" else value for key, value in state.items()}
              for name, state in states.items()}
    record["states_vs_fp32"] = compare_states(upcast, named_states(fp32_model, expected), BF16_STATE_RTOL,
                                              BF16_STATE_ATOL)
    return record


# Each stochastically rounded step errs by less than one bf16 spacing at the magnitudes the param
# passed through (at most max(|start|, |fp32 value|) here), in either direction; 3 steps, plus the
# bf16 states' share (BF16_PATH of the distance moved).
STOCHASTIC_SPACINGS = 3


def bf16_spacing(values):
    return torch.finfo(torch.bfloat16).eps * torch.exp2(torch.floor(torch.log2(values.abs().clamp_min(2.0**-100))))


def fsdp2_bf16_stochastic(rule, backend):
    """bf16 model with stochastic_rounding=True: twice with one rounding_seed, once with another;
    the first run's grads also drive torch.optim on an fp32 copy."""
    mesh = mesh_of()

    def run(seed, twin=None):
        model = fsdp_model(mesh, dtype=torch.bfloat16)
        optimizer = fused_optimizer(rule, model.parameters(), backend, stochastic_rounding=True, rounding_seed=seed)
        oracle = None if twin is None else torch_optimizer(rule, twin.parameters())
        for step in range(STEPS):
            loss_of(model, step).backward()
            if twin is not None:
                copy_grads_to_fp32(model, twin)
                oracle.step()
                oracle.zero_grad()
            optimizer.step()
            optimizer.zero_grad()
        return snapshot(model, optimizer)

    twin = fp32_twin(mesh)
    start = {name: full(q.detach()).clone() for name, q in twin.named_parameters()}
    first, again, other = run(7, twin), run(7), run(8)

    def tensors(values):
        params, states = values
        return [*params.values(), *(v for state in states.values() for k, v in state.items() if k != "step")]

    record = dict(all_finite=all(bool(t.float().isfinite().all()) for t in tensors(first)),
                  same_seed_identical=all(torch.equal(a, b) for a, b in zip(tensors(first), tensors(again))),
                  other_seed_differs=any(not torch.equal(a, b) for a, b in zip(first[0].values(), other[0].values())),
                  beyond_rounding=[], param_dtypes=[str(t.dtype) for t in first[0].values()])
    for name, q in twin.named_parameters():
        expected, actual = full(q.detach()), first[0][name].float()
        moved = (expected - start[name]).abs().max().item()
        bound = STOCHASTIC_SPACINGS * bf16_spacing(torch.maximum(start[name].abs(), expected.abs())) + BF16_PATH * moved
        excess = (actual - expected).abs() - bound
        if (excess > 0).any():
            worst = int(excess.flatten().argmax())
            record["beyond_rounding"].append(f"{name}: element {worst}: {actual.flatten()[worst].item()} vs fp32 "
                                             f"{expected.flatten()[worst].item()} (bound {bound.flatten()[worst].item()})")
    return record


# ---- states in bf16 and 8 bits, bf16 params with 16-bit remainders (fusedopt.formats) ----


def wide_model(seed=0, dtype=torch.float32):
    """Weights large enough for the state formats: (128, 100), whose rows are not whole 64-element
    blocks (bf16 states under "8bit"), and (37, 128), 8-bit, whose 37 rows split 19/18 over 2 ranks;
    the biases stay below the threshold (plain)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(100, 128), nn.Tanh(), nn.Linear(128, 37)).to(dtype)


def wide_loss(model, step):
    """This rank's rows of the global batch of `step`, as `batch` splits them."""
    generator = torch.Generator().manual_seed(2000 + step)
    x, y = torch.randn(GLOBAL_BATCH, 100, generator=generator), torch.randn(GLOBAL_BATCH, 37, generator=generator)
    rows = GLOBAL_BATCH // WORLD.world_size
    dtype = next(model.parameters()).dtype
    return F.mse_loss(model(x[WORLD.rank * rows:][:rows].to(dtype)), y[WORLD.rank * rows:][:rows].to(dtype))


def storage_layout(model, optimizer, precision):
    """Problems with the formats of the states: each slot's format that of its param's global
    shape, its values (codes) placed like the param, its scales a DTensor of (rows, blocks per
    row) sharded like the param's rows."""
    from fusedopt import formats

    problems = []
    for name, p in model.named_parameters():
        state = optimizer.state[p]
        for key in optimizer._state_keys(optimizer.param_groups[0]):
            fmt = formats.format_of(state, key, p)
            if fmt != formats.state_format(precision, p):
                problems.append(f"{name} state[{key!r}]: {fmt}, expected {formats.state_format(precision, p)}")
            for suffix in formats.suffixes(state, key):
                value = state[key + suffix]
                if not is_dtensor(value) or value.placements != p.placements:
                    problems.append(f"{name} state[{key + suffix!r}]: {type(value).__name__} "
                                    f"{getattr(value, 'placements', None)}, param {p.placements}")
                expected = p.shape if suffix == "" else (p.shape[0], p.shape[1] // formats.QUANT_BLOCK)
                if tuple(value.shape) != tuple(expected):
                    problems.append(f"{name} state[{key + suffix!r}]: shape {tuple(value.shape)} != {tuple(expected)}")
    return problems


def fsdp2_formats(rule, backend, precision, param_rounding="nearest"):
    """fusedopt with states in `precision` on fully_shard'ed models, beside the same optimizer on an
    unsharded copy given the same (gathered) grads: the blocks of a state lie within rows, the
    format follows the global shape, so sharded and unsharded runs agree bit for bit. With
    param_rounding="remainder", a bf16 model whose masters are 16-bit remainders beside the
    unsharded one with fp32 masters (master_weights=True)."""
    from fusedopt.rounding import join_master

    dtype = torch.bfloat16 if param_rounding == "remainder" else torch.float32
    sharded_model, whole_model = shard(wide_model(dtype=dtype), mesh_of()), wide_model(dtype=dtype)
    options = dict(state_precision=precision)
    sharded = fused_optimizer(rule, sharded_model.parameters(), backend, **options,
                              **({} if param_rounding == "nearest" else dict(master_weights="remainder")))
    whole = fused_optimizer(rule, whole_model.parameters(), backend, **options,
                            **({} if param_rounding == "nearest" else dict(master_weights=True)))
    launches = []
    for step in range(STEPS):
        wide_loss(sharded_model, step).backward()
        grads = full_values([p.grad for p in sharded_model.parameters()])
        for q, grad in zip(whole_model.parameters(), grads):
            q.grad = grad.clone()
        before = launch_count()
        sharded.step()
        launches.append(launch_count() - before)
        whole.step()
        sharded.zero_grad()
        whole.zero_grad()
    record = dict(layout=storage_layout(sharded_model, sharded, precision), launches=launches, differ=[],
                  storages=len({sharded._storage(sharded.param_groups[0], p) for p in sharded_model.parameters()}))
    params = full_values(list(sharded_model.parameters()))
    for (name, q), mine in zip(whole_model.named_parameters(), params):
        if not torch.equal(mine, q.detach()):
            record["differ"].append(f"param {name}")
    sharded_states = full_states(named_states(sharded_model, sharded))
    for name, q in whole_model.named_parameters():
        theirs, mine = whole.state[q], sharded_states[name]
        if param_rounding == "remainder":
            master = join_master(params[[n for n, _ in whole_model.named_parameters()].index(name)],
                                 mine.pop("master_remainder"))
            if not torch.equal(master.view(torch.int32), theirs["master_param"].view(torch.int32)):
                record["differ"].append(f"{name} master")
            theirs = {key: value for key, value in theirs.items() if key != "master_param"}
        if set(mine) != set(theirs):
            record["differ"].append(f"{name}: state keys {sorted(mine)} != {sorted(theirs)}")
            continue
        record["differ"] += [f"{name} state[{key!r}]" for key, value in theirs.items()
                             if not torch.equal(mine[key], value)]
    return record


def dcp_formats_save(tag, backend):
    """AdamW with 8-bit states on this world, 2 steps, dcp.save; the global values of every param
    and state (codes, scales) saved by rank 0 for the loading side."""
    model = shard(wide_model(), mesh_of())
    optimizer = fused_optimizer("adamw", model.parameters(), backend, state_precision="8bit")
    for step in range(2):
        wide_loss(model, step).backward()
        optimizer.step()
        optimizer.zero_grad()
    return save_for_reshard(model, optimizer, reshard_path(f"formats-{tag}", "adamw", backend))


def dcp_formats_load(tag, backend):
    """That checkpoint loaded on another world size into an optimizer with 8-bit states: codes and
    scales exactly as saved; then 2 steps beside the plain-torch reference loaded from the same
    checkpoint: within a code step."""
    from fusedopt import formats

    path = reshard_path(f"formats-{tag}", "adamw", backend)
    models = [shard(wide_model(seed=1), mesh_of()) for _ in range(2)]
    fused, reference = (fused_optimizer("adamw", model.parameters(), kind, state_precision="8bit")
                        for model, kind in zip(models, (backend, "torch")))
    for model, optimizer in zip(models, (fused, reference)):
        dcp_load(model, optimizer, path / "dcp")
    saved_params, saved_states = torch.load(path / "expected.pt", weights_only=True)
    loaded_params, loaded_states = snapshot(models[0], fused)
    loaded = [f"param {name} differs from the saved value" for name in saved_params
              if not torch.equal(loaded_params[name], saved_params[name])]
    loaded += compare_states(loaded_states, saved_states, rtol=0.0, atol=0.0)
    loaded += storage_layout(models[0], fused, "8bit")
    for step in range(2, 4):
        for model, optimizer in zip(models, (fused, reference)):
            wide_loss(model, step).backward()
            optimizer.step()
            optimizer.zero_grad()
    continued = []
    for (name, p), q in zip(models[0].named_parameters(), models[1].parameters()):
        for key in fused._state_keys(fused.param_groups[0]):
            mine, theirs = full_values([formats.decode(fused.state[p], key, torch.float32),
                                        formats.decode(reference.state[q], key, torch.float32)])
            step = 2 * theirs.abs().max() / formats.SIGNED_CODES  # a code that fell the other way
            continued += compare_tensor(mine, theirs, f"{name} state[{key!r}]", 0.0, float(step))
    params = full_values(list(models[0].parameters()) + list(models[1].parameters()))
    half = len(params) // 2
    for name, mine, theirs in zip([n for n, _ in models[0].named_parameters()], params[:half], params[half:]):
        continued += compare_tensor(mine, theirs, f"param {name}", 1e-4, 4 * OPTIONS["adamw"]["lr"])
    return dict(world_size=WORLD.world_size, loaded=loaded, continued=continued)


# ---- torch.distributed.checkpoint ----


def checkpoint_of(model, optimizer):
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    return {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}


def restore(model, optimizer, state):
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optim"])


def dcp_save(model, optimizer, path):
    import torch.distributed.checkpoint as dcp

    dcp.save(checkpoint_of(model, optimizer), checkpoint_id=str(path))


def dcp_load(model, optimizer, path):
    import torch.distributed.checkpoint as dcp

    state = checkpoint_of(model, optimizer)  # the templates (an optimizer without state gets one)
    dcp.load(state, checkpoint_id=str(path))
    restore(model, optimizer, state)


def checkpoint_dir(name):
    path = WORLD.workdir / "checkpoints" / f"{name}-attempt{WORLD.attempt}"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def optimizer_state_dict_format(fused_sd, torch_sd):
    """Problems where fusedopt's get_optimizer_state_dict differs from torch.optim's: state entries
    (fqn -> keys -> values) and param group entries (but foreach, which torch's oracle sets)."""
    problems = compare_states(fused_sd["state"], torch_sd["state"], where="state_dict ")
    if len(fused_sd["param_groups"]) != len(torch_sd["param_groups"]):
        return problems + ["param_groups: different counts"]
    for index, (mine, theirs) in enumerate(zip(fused_sd["param_groups"], torch_sd["param_groups"])):
        if set(mine) != set(theirs):
            problems.append(f"param_groups[{index}] keys: {sorted(mine)} != {sorted(theirs)}")
        for key in set(mine) & set(theirs) - {"foreach"}:
            if mine[key] != theirs[key]:
                problems.append(f"param_groups[{index}][{key!r}]: {mine[key]!r} != {theirs[key]!r}")
    return problems


def dcp_transfer(source, via, rule, backend):
    """A checkpoint of one optimizer after 2 steps loaded into the other kind (torch.optim <->
    fusedopt) on a model initialised differently, and 2 more steps, against torch.optim's 4
    uninterrupted steps. via "state_dict": get/set_optimizer_state_dict in memory; "dcp":
    dcp.save / dcp.load through files."""
    mesh = mesh_of()
    oracle_model = fsdp_model(mesh)
    oracle = torch_optimizer(rule, oracle_model.parameters())
    source_model = fsdp_model(mesh)
    target_model = fsdp_model(mesh, seed=1)
    if source == "torch":
        source_opt = torch_optimizer(rule, source_model.parameters())
        target_opt = fused_optimizer(rule, target_model.parameters(), backend)
    else:
        source_opt = fused_optimizer(rule, source_model.parameters(), backend)
        target_opt = torch_optimizer(rule, target_model.parameters())
    for step in range(2):
        train_step(oracle_model, oracle, step)
        train_step(source_model, source_opt, step)
    record = {}
    if source == "fused":
        record["state_dict_format"] = optimizer_state_dict_format(checkpoint_of(source_model, source_opt)["optim"],
                                                                  checkpoint_of(oracle_model, oracle)["optim"])
    if via == "state_dict":
        restore(target_model, target_opt, checkpoint_of(source_model, source_opt))
    else:
        path = checkpoint_dir(f"transfer-{source}-{rule}-{backend}")
        dcp_save(source_model, source_opt, path)
        dcp_load(target_model, target_opt, path)
    record["loaded"] = compare_runs(target_model, target_opt, oracle_model, oracle)
    for step in range(2, 4):
        train_step(oracle_model, oracle, step)
        train_step(target_model, target_opt, step)
    record["continued"] = compare_runs(target_model, target_opt, oracle_model, oracle)
    return record


def dcp_bf16_resume(rounding, backend):
    """AdamW on a bf16 model with master weights or stochastic rounding: 2 steps, dcp.save, dcp.load
    into a fresh optimizer (and a model initialised differently), 2 more steps, against the same
    4 steps uninterrupted: the master copies and the group step count (which keys the rounding
    bits) come back, so the resumed run is the uninterrupted one, bit for bit."""
    mesh = mesh_of()
    options = dict(master_weights=True) if rounding == "master" else dict(stochastic_rounding=True, rounding_seed=3)
    build = lambda seed=0: fsdp_model(mesh, seed=seed, dtype=torch.bfloat16)
    straight_model, saved_model, resumed_model = build(), build(), build(seed=1)
    straight, saved, resumed = (fused_optimizer("adamw", model.parameters(), backend, **options)
                                for model in (straight_model, saved_model, resumed_model))
    for step in range(2):
        train_step(straight_model, straight, step)
        train_step(saved_model, saved, step)
    path = checkpoint_dir(f"bf16-{rounding}-{backend}")
    dcp_save(saved_model, saved, path)
    dcp_load(resumed_model, resumed, path)
    group_step = lambda optimizer: [float(group["group_step"]) if "group_step" in group else None
                                    for group in optimizer.param_groups]
    record = dict(loaded=compare_runs(resumed_model, resumed, saved_model, saved, rtol=0.0, atol=0.0),
                  state_layout=dtensor_state_layout(resumed_model, resumed),
                  master_dtypes=sorted({str(state["master_param"].dtype) for state in resumed.state.values()
                                        if "master_param" in state}),
                  group_steps=[group_step(saved), group_step(resumed)])
    for step in range(2, 4):
        train_step(straight_model, straight, step)
        train_step(resumed_model, resumed, step)
    record["continued"] = compare_runs(resumed_model, resumed, straight_model, straight, rtol=0.0, atol=0.0)
    return record


def reshard_path(tag, rule, backend):
    return WORLD.workdir / "reshard" / f"{tag}-{rule}-{backend}"


def dcp_reshard_save(tag, rule, backend):
    """fusedopt on this world (fully_shard over all its ranks), 2 steps, dcp.save; also the global
    values of every param and state, saved by rank 0 for the loading side to compare with."""
    mesh = mesh_of()
    model = fsdp_model(mesh)
    optimizer = fused_optimizer(rule, model.parameters(), backend)
    for step in range(2):
        train_step(model, optimizer, step)
    return save_for_reshard(model, optimizer, reshard_path(tag, rule, backend))


def save_for_reshard(model, optimizer, path):
    """Save the model and optimizer with DCP under `path`, and (rank 0) the values a load on
    another mesh must find."""
    path.mkdir(parents=True, exist_ok=True)
    dcp_save(model, optimizer, path / "dcp")
    values = snapshot(model, optimizer)
    if WORLD.rank == 0:
        torch.save(values, path / "expected.pt")
    dist().barrier()
    return dict(world_size=WORLD.world_size)


def dcp_reshard_load(tag, rule, backend):
    """The checkpoint of dcp_reshard_save (saved by another world size) loaded into fusedopt and
    into torch.optim here; the loaded values against the saved ones, then 2 steps of both."""
    mesh = mesh_of()
    path = reshard_path(tag, rule, backend)
    fused_model, torch_model = fsdp_model(mesh, seed=1), fsdp_model(mesh, seed=1)
    fused = fused_optimizer(rule, fused_model.parameters(), backend)
    expected = torch_optimizer(rule, torch_model.parameters())
    dcp_load(fused_model, fused, path / "dcp")
    dcp_load(torch_model, expected, path / "dcp")
    saved_params, saved_states = torch.load(path / "expected.pt", weights_only=True)
    loaded_params, loaded_states = snapshot(fused_model, fused)
    loaded = [f"param {name} differs from the saved value" for name in saved_params
              if not torch.equal(loaded_params[name], saved_params[name])]
    loaded += compare_states(loaded_states, saved_states, rtol=0.0, atol=0.0)
    for step in range(2, 4):
        train_step(fused_model, fused, step)
        train_step(torch_model, expected, step)
    return dict(world_size=WORLD.world_size, loaded=loaded,
                continued=compare_runs(fused_model, fused, torch_model, expected))


# ---- DDP and ZeroRedundancyOptimizer ----


def ddp_trajectory(rule, backend):
    fused_model, torch_model = ddp_model(), ddp_model()
    fused = fused_optimizer(rule, fused_model.parameters(), backend)
    expected = torch_optimizer(rule, torch_model.parameters())
    launches = train_beside_torch(fused_model, fused, torch_model, expected)
    return dict(mismatches=compare_runs(fused_model, fused, torch_model, expected), launches=launches)


def zero_trajectory(rule, backend, bucket_view):
    """ZeroRedundancyOptimizer(optimizer_class=fusedopt.<rule>) beside the same with torch.optim's
    class, on DDP models: every param on every rank, and the consolidated state (on rank 0)."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    fused_model, torch_model = ddp_model(), ddp_model()
    fused = ZeroRedundancyOptimizer(fused_model.parameters(), optimizer_class=CLASSES[rule][0],
                                    parameters_as_bucket_view=bucket_view, backend=backend, **OPTIONS[rule])
    expected = ZeroRedundancyOptimizer(torch_model.parameters(), optimizer_class=REGISTRY[rule].oracle_class,
                                       parameters_as_bucket_view=bucket_view, foreach=False, **OPTIONS[rule])
    for step in range(STEPS):
        train_step(fused_model, fused, step)
        train_step(torch_model, expected, step)
    params = []
    theirs = dict(torch_model.named_parameters())
    for name, p in fused_model.named_parameters():
        params += compare_tensor(p.detach(), theirs[name].detach(), f"param {name}")
    fused.consolidate_state_dict(to=0)
    expected.consolidate_state_dict(to=0)
    states = None
    if WORLD.rank == 0:
        states = compare_states(fused.state_dict()["state"], expected.state_dict()["state"])
    return dict(params=params, consolidated_states=states)


# ---- the harness itself ----


def harness_fails_on_one_rank(case):
    """Raises on the last rank while the others wait in a collective for it."""
    if WORLD.rank == WORLD.world_size - 1:
        raise RuntimeError("deliberate failure on the last rank")
    started = time.monotonic()
    try:
        dist().all_reduce(torch.ones(1))
    except Exception as error:
        raise RuntimeError(f"the collective failed after {time.monotonic() - started:.1f} s") from error
    return "the collective completed"


def harness_collective(case):
    """An all-reduce in the process group (re-created after a failure)."""
    total = torch.ones(1)
    dist().all_reduce(total)
    return total.item()


# ---- what runs ----

def _register_all():
    failing = register("harness", harness_fails_on_one_rank, case="fails-on-one-rank")
    register("harness", harness_collective, runs_with=[failing], case="collective-after-a-failure")
    for backend in BACKENDS:
        plumbing = backend in PLUMBING_BACKENDS
        for rule in RULES:
            register("fsdp2-trajectory", fsdp2_trajectory, rule=rule, backend=backend)
            register("fsdp2-groups", fsdp2_trajectory, rule=rule, backend=backend, unnamed=dict(groups=True))
            register("tp", tp_trajectory, rule=rule, backend=backend)
            for scaler in SCALERS:
                register("amp", fsdp2_amp, rule=rule, backend=backend, scaler=scaler)
            register("amp-inf", fsdp2_amp, rule=rule, backend=backend, scaler="sharded_grad_scaler",
                     unnamed=dict(inf_step=1))
            register("bf16-master", fsdp2_bf16_master, rule=rule, backend=backend)
            register("bf16-stochastic", fsdp2_bf16_stochastic, rule=rule, backend=backend)
            if not plumbing:
                continue
            register("ddp", ddp_trajectory, rule=rule, backend=backend)
            for bucket_view in (False, True):
                register("zero", zero_trajectory, rule=rule, backend=backend, bucket_view=bucket_view)
            for source in ("torch", "fused"):
                for via in ("state_dict", "dcp"):
                    register("dcp-transfer", dcp_transfer, source=source, via=via, rule=rule, backend=backend)
            saved_on_1 = register("reshard-save", dcp_reshard_save, phase="save1", tag="1to2", rule=rule,
                                  backend=backend)
            register("reshard-load", dcp_reshard_load, needs=[saved_on_1], tag="1to2", rule=rule, backend=backend)
            saved_on_2 = register("reshard-save", dcp_reshard_save, tag="2to1", rule=rule, backend=backend)
            register("reshard-load", dcp_reshard_load, phase="load1", needs=[saved_on_2], tag="2to1", rule=rule,
                     backend=backend)
        for rule in ("sgd", "adamw"):
            for scaler in SCALERS:
                register("amp-clip", fsdp2_amp, rule=rule, backend=backend, scaler=scaler, unnamed=dict(flow="clip"))
            register("amp-clip-inf", fsdp2_amp, rule=rule, backend=backend, scaler="sharded_grad_scaler",
                     unnamed=dict(flow="clip", inf_step=1))
        for mesh in MESHES:
            for norm_type in NORM_TYPES:
                register("fsdp2-clip", fsdp2_clip, norm_type=norm_type, mesh=mesh, backend=backend)
        for norm_type in (2.0, math.inf):
            register("fsdp2-groups-clip", fsdp2_clip, norm_type=norm_type, backend=backend,
                     unnamed=dict(mesh="fsdp", groups=True))
        for rounding in ("master", "stochastic"):
            register("dcp-bf16", dcp_bf16_resume, rounding=rounding, backend=backend)
        register("fsdp2-max-grad-norm", fsdp2_max_grad_norm, backend=backend)
        for rule in ("adam", "sgd"):
            for precision in ("bf16", "8bit"):
                register("formats", fsdp2_formats, rule=rule, backend=backend, precision=precision)
        register("formats", fsdp2_formats, rule="adamw", backend=backend, precision="8bit",
                 param_rounding="remainder")
        if plumbing:
            saved_on_1 = register("formats-save", dcp_formats_save, phase="save1", tag="1to2", backend=backend)
            register("formats-load", dcp_formats_load, needs=[saved_on_1], tag="1to2", backend=backend)
            saved_on_2 = register("formats-save", dcp_formats_save, tag="2to1", backend=backend)
            register("formats-load", dcp_formats_load, phase="load1", needs=[saved_on_2], tag="2to1", backend=backend)


_register_all()

# ---- the pytest side: spawning the ranks of a phase ----


def run_phase(phase, scenario_names, workdir, **limits):
    """{name: [record of rank 0, record of rank 1, ...]} for `scenario_names` (all of `phase`): one
    spawn (each spawn imports torch, Triton and numba in every rank), more where failures stop one."""
    order = [name for name in SCENARIOS if name in set(scenario_names)]
    assert all(SCENARIOS[name].phase == phase for name in order)
    return _run_spawns(phase, PHASES[phase], order, Path(workdir), **limits)


def _run_spawns(label, world_size, order, workdir, *, attempt_timeout=ATTEMPT_TIMEOUT_S,
                stall_timeout=STALL_TIMEOUT_S, max_attempts=3):
    """Spawn the ranks for the scenarios `order`; after a spawn that did not finish them all, the
    scenario it was running is failed and the rest go to a new spawn."""
    results = {}
    remaining = order
    for attempt in range(1, max_attempts + 1):
        if not remaining:
            break
        run_dir = workdir / f"{label}-attempt{attempt}"
        run_dir.mkdir(parents=True)
        records, started, reason = _spawn(run_dir, world_size, remaining, workdir, attempt, attempt_timeout,
                                          stall_timeout)
        for name in remaining:
            if all(name in by_rank for by_rank in records):
                results[name] = [by_rank[name] for by_rank in records]
        remaining = [name for name in remaining if name not in results]
        if not remaining:
            break
        stuck = next((name for name in remaining if name in started), None)
        if stuck is not None or attempt == max_attempts:
            failed = [stuck] if stuck is not None else remaining
            message = f"scenario did not finish ({reason})\n{_log_tails(run_dir, world_size)}"
            for name in failed:
                results[name] = [{"ok": False, "error": message}] * world_size
            remaining = [name for name in remaining if name not in failed]
    for name in remaining:
        results[name] = [{"ok": False, "error": f"not run: {max_attempts} spawns failed before it"}] * world_size
    return results


def _loopback_env():
    env = dict(os.environ)
    env["TRITON_INTERPRET"] = "1"
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    env["OMP_NUM_THREADS"] = "1"
    if Path("/sys/class/net/lo").exists():
        env["GLOO_SOCKET_IFNAME"] = "lo"
    env.pop("MASTER_ADDR", None)
    env.pop("MASTER_PORT", None)
    return env


def _spawn(run_dir, world_size, scenario_names, workdir, attempt, attempt_timeout, stall_timeout):
    """Run the ranks once; ([{name: record} per rank], names some rank started, why it ended)."""
    (run_dir / "scenarios.json").write_text(json.dumps(scenario_names))
    env = _loopback_env()
    processes, logs = [], []
    reason = "the ranks exited"
    try:
        for rank in range(world_size):
            log = open(run_dir / f"rank{rank}.log", "w")
            logs.append(log)
            command = [sys.executable, str(Path(__file__).resolve()), "--rank", str(rank), "--world-size",
                       str(world_size), "--run-dir", str(run_dir), "--workdir", str(workdir), "--attempt", str(attempt)]
            processes.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                              cwd=str(run_dir), start_new_session=True))
        start = last_progress = time.monotonic()
        progress, first_exit = None, None
        while True:
            now = time.monotonic()
            codes = [process.poll() for process in processes]
            if all(code is not None for code in codes):
                if any(codes):
                    reason = f"exit codes {codes}"
                break
            if any(code not in (None, 0) for code in codes):
                first_exit = first_exit or now
                if now - first_exit > 20:  # the others are left waiting for it
                    reason = f"a rank died (exit codes {codes})"
                    break
            sizes = [(run_dir / f"rank{rank}.jsonl").stat().st_size if (run_dir / f"rank{rank}.jsonl").exists()
                     else 0 for rank in range(world_size)]
            if sizes != progress:
                progress, last_progress = sizes, now
            if now - start > attempt_timeout:
                reason = f"the spawn timed out after {attempt_timeout} s"
                break
            if now - last_progress > stall_timeout:
                reason = f"no progress for {stall_timeout} s"
                break
            time.sleep(0.05)
    finally:
        for process in processes:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)  # the rank's own session: it and nothing else
        for process in processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=30)
        for log in logs:
            log.close()
    records, started = [], set()
    for rank in range(world_size):
        by_name = {}
        path = run_dir / f"rank{rank}.jsonl"
        for line in path.read_text().splitlines() if path.exists() else []:
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if entry["event"] == "start":
                    started.add(entry["name"])
                else:
                    by_name[entry["name"]] = {key: entry[key] for key in ("ok", "value", "error")}
        records.append(by_name)
    return records, started, reason


def _log_tails(run_dir, world_size, chars=3000):
    tails = []
    for rank in range(world_size):
        path = run_dir / f"rank{rank}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        tails.append(f"--- rank {rank} log (last {chars} characters) ---\n{text[-chars:]}")
    return "\n".join(tails)


# ---- a rank ----


def _init_process_group(store, generation):
    distributed = dist()
    distributed.init_process_group("gloo", store=distributed.PrefixStore(f"pg{generation}", store), rank=WORLD.rank,
                                   world_size=WORLD.world_size,
                                   timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))


def _close_process_group():
    """Destroy the process groups and drop what still holds them (the failed scenario's meshes and
    models, in reference cycles), so that their sockets close."""
    distributed = dist()
    gc.collect()
    if distributed.is_initialized():
        distributed.destroy_process_group()
    gc.collect()


def _run_scenario(name):
    scenario = SCENARIOS[name]
    try:
        value = scenario.function(**scenario.kwargs)
        json.dumps(value)
        return True, value, None
    except BaseException:  # noqa: B036 - reported as this scenario's failure
        return False, None, f"rank {WORLD.rank}: {traceback.format_exc()}"


def worker_main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world-size", type=int, required=True)
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--attempt", type=int, default=1)
    args = parser.parse_args(argv)
    WORLD.rank, WORLD.world_size, WORLD.workdir, WORLD.attempt = args.rank, args.world_size, args.workdir, args.attempt
    torch.set_num_threads(1)
    distributed = dist()
    scenario_names = json.loads((args.run_dir / "scenarios.json").read_text())
    store = distributed.FileStore(str(args.run_dir / "store"), args.world_size)
    store.set_timeout(datetime.timedelta(seconds=STORE_TIMEOUT_S))
    generation = 0
    _init_process_group(store, generation)
    with open(args.run_dir / f"rank{args.rank}.jsonl", "a", buffering=1) as out:
        for name in scenario_names:
            out.write(json.dumps({"event": "start", "name": name}) + "\n")
            started = time.monotonic()
            ok, value, error = _run_scenario(name)
            if not ok:
                _close_process_group()  # a peer blocked in a collective fails now, not at its timeout
            store.set(f"status/{name}/{args.rank}", "1" if ok else "0")
            try:
                everyone_ok = all(store.get(f"status/{name}/{rank}") == b"1" for rank in range(args.world_size))
            except Exception:  # a peer never reported
                everyone_ok = False
            out.write(json.dumps({"event": "done", "name": name, "ok": ok, "value": value, "error": error,
                                  "seconds": round(time.monotonic() - started, 3)}) + "\n")
            if not everyone_ok:
                _close_process_group()
                generation += 1
                _init_process_group(store, generation)
    distributed.destroy_process_group()


if __name__ == "__main__":
    worker_main()
