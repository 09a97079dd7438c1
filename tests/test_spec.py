"""Specification of a rule's spec (fusedopt.spec): its equations, written once and compiled by every
kernel backend, run as plain Python on float64 numbers give the float64 reference's step for
every rule and option set; a spec whose update does not take and give back its state slots by
name is refused when it is made; and the CPU kernels' on-disk cache never serves a kernel made
from a rule's code (or the grad-norm reduction's) as it was before an edit."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from fusedopt import spec as rule_spec
from fusedopt.registry import RULES as REGISTRY

GRID = [pytest.param(rule, options, id="-".join([rule, *map(str, options.items())]))
        for rule, info in REGISTRY.items() for options in info.option_grid]


def plain_step(spec, group, options, lr, step, params, grads, states):
    """One step of the rule's own functions on plain Python floats, element by element; `states`
    holds a list per slot (a placeholder where the slot is absent). Returns (params, states)."""
    numbers = spec.launch_numbers(group, False)
    block = spec.block_numbers(lr, float(step), 0, numbers, False, None)
    results = [spec.update(p, g, *(state[i] for state in states), block, options)
               for i, (p, g) in enumerate(zip(params, grads))]
    return [r[0] for r in results], [[r[1 + slot] for r in results] for slot in range(len(states))]


@pytest.mark.parametrize("rule, options", GRID)
def test_the_rules_equations_give_the_float64_reference_step(rule, options):
    """From the state the reference reached after a first step (momentum buffers started), three
    more steps of the spec's functions on floats equal the reference's (fusedopt.reference)."""
    info = REGISTRY[rule]
    generator = torch.Generator().manual_seed(0)
    param = torch.randn(23, generator=generator, dtype=torch.float64).requires_grad_()
    optimizer = info.optimizer([param], backend="torch", **{"lr": info.default_lr, **options})
    group = optimizer.param_groups[0]
    spec = optimizer.spec
    spec_options = spec.options(group)
    present = spec.present(spec_options)
    for step in range(4):
        grad = torch.randn(23, generator=generator, dtype=torch.float64)
        param.grad = grad
        if step == 0:  # the first step makes the state (SGD's buffer from the grad, Adagrad's sum, ...)
            optimizer.step()
            continue
        state = optimizer.state[param]
        before = [param.tolist(), [state[slot.name].tolist() if here else grad.tolist()
                                   for slot, here in zip(spec.states, present)]]
        optimizer.step()
        count = float(state["step"]) if "step" in state else 0.0
        params, states = plain_step(spec, group, spec_options, group["lr"], count, before[0], grad.tolist(),
                                    before[1])
        torch.testing.assert_close(torch.tensor(params, dtype=torch.float64), param.detach(), rtol=1e-12, atol=1e-14)
        for slot, here, values in zip(spec.states, present, states):
            if here:
                torch.testing.assert_close(torch.tensor(values, dtype=torch.float64), state[slot.name],
                                           rtol=1e-12, atol=1e-14, msg=lambda m: f"{slot.name}: {m}")


def test_every_rule_names_its_states_and_options_consistently():
    """Each slot that exists under an option names one of the rule's Options; the state a class
    keeps is its spec's, in slot order."""
    for info in REGISTRY.values():
        spec = info.optimizer.spec
        for options in spec.option_variants():
            assert spec.state_names(options) == [s.name for s, p in zip(spec.states, spec.present(options)) if p]
        assert set(info.state_keys(**info.stateful)) <= {slot.name for slot in spec.states}


def _spec_with(update):
    sgd = REGISTRY["sgd"].optimizer.spec
    return rule_spec.RuleSpec("test", states=sgd.states, Options=sgd.Options, options=sgd.options,
                              Launch=sgd.Launch, launch_numbers=sgd.launch_numbers, Block=sgd.Block,
                              block_numbers=sgd.block_numbers, update=update)


def test_an_update_that_gives_its_states_back_in_another_order_is_refused():
    def swapped(param, grad, momentum_buffer, b, options):
        return momentum_buffer, param

    with pytest.raises(ValueError, match="returns"):
        _spec_with(swapped)


def test_an_update_whose_arguments_are_not_its_state_slots_is_refused():
    def misnamed(param, grad, buffer, b, options):
        return param, buffer

    with pytest.raises(ValueError, match="arguments"):
        _spec_with(misnamed)


def test_a_slot_present_under_an_option_the_rule_has_not_is_refused():
    sgd = REGISTRY["sgd"].optimizer.spec
    with pytest.raises(ValueError, match="present_when"):
        rule_spec.RuleSpec("test", states=(rule_spec.StateSlot("momentum_buffer", True, "nesterov"),),
                           Options=sgd.Options, options=sgd.options, Launch=sgd.Launch,
                           launch_numbers=sgd.launch_numbers, Block=sgd.Block, block_numbers=sgd.block_numbers,
                           update=sgd.update)


# ---- the CPU kernels' cache and a rule edited between runs ----

RULE_MODULE = '''
from typing import NamedTuple

from fusedopt.optimizer import FusedOptimizer
from fusedopt.spec import NoOptions, RuleSpec, StateSlot, to_compute


class Launch(NamedTuple):
    decay: float


class Block(NamedTuple):
    lr: float
    decay: float


def block_numbers(lr, step, extra, n, DEVICE_LR, COMPUTE):
    return Block(lr=to_compute(lr, COMPUTE), decay=to_compute(n.decay, COMPUTE))


def update(param, grad, average, b, options):
    average = average * b.decay + grad
    param = param - b.lr * average * FACTOR
    return param, average


SPEC = RuleSpec("edited", states=(StateSlot("average", signed=True),), Options=NoOptions,
                options=lambda group: NoOptions(), Launch=Launch,
                launch_numbers=lambda group, lr_on_device: Launch(decay=group["decay"]), Block=Block,
                block_numbers=block_numbers, update=update)


class Edited(FusedOptimizer):
    spec = SPEC
    has_step = False

    def __init__(self, params, lr=0.5, decay=0.5, backend="numba"):
        super().__init__(params, dict(lr=lr, decay=decay), backend)

    def hyperparameters(self, group):
        return {}
'''
STEP_IT = '''
import torch, edited_rule
p = torch.nn.Parameter(torch.ones(8))
optimizer = edited_rule.Edited([p])
p.grad = torch.ones(8)
optimizer.step()
assert optimizer._plans[0].buckets, "the numba kernel did not take the param"
print(p[0].item())
'''


def test_a_rule_edited_between_runs_is_compiled_afresh_not_loaded_stale(tmp_path):
    """numba's cache would serve a kernel whose rule functions live in another file as it was
    compiled, whatever changed there since: each kernel's name carries a digest of its sources."""
    module = tmp_path / "edited_rule.py"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
           "NUMBA_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("FUSEDOPT_BACKEND", None)
    results = []
    for factor in (1.0, 1.0, 3.0):  # the second run loads the first's kernel; the third has an edited rule
        module.write_text(textwrap.dedent(RULE_MODULE) + f"\nFACTOR = {factor}\n")
        run = subprocess.run([sys.executable, "-c", STEP_IT], env=env, capture_output=True, text=True, timeout=240)
        assert run.returncode == 0, run.stderr[-3000:]
        results.append(float(run.stdout.split()[-1]))
    assert results[0] == results[1] == 1 - 0.5 * 1.0 * 1.0
    assert results[2] == 1 - 0.5 * 1.0 * 3.0
    # one cache index per source digest: the second run loaded the first's kernel, the third made its own
    indexes = {name for _, _, names in os.walk(tmp_path / "cache") for name in names
               if name.startswith("kernels.edited_") and name.endswith(".nbi")}
    assert len(indexes) == 2, indexes


NORM_IT = '''
import numpy as np, torch
import fusedopt, fusedopt.cpu as cpu
from fusedopt.cpu import grad_norm
grads = [torch.full((5000,), 2.0), torch.full((3,), -1.0)]
table = cpu.CpuTensorTable(grads, grads, [])
assert cpu.grad_norm_ready(torch.float32)
print(fusedopt.__file__, table.grad_norm_partials(2.0, None, np.zeros(0, dtype=np.int64), 1)[0, 0])
'''


def test_the_grad_norm_kernel_edited_between_runs_is_compiled_afresh_not_loaded_stale(tmp_path):
    """The CPU grad-norm reduction is cached like the rule kernels: under a name carrying a digest
    of the files it is made from, so that a copy of fusedopt whose reduction was edited compiles
    its own kernel, while an unchanged one loads the cached kernel."""
    import shutil

    import fusedopt

    package = tmp_path / "src" / "fusedopt"
    shutil.copytree(os.path.dirname(fusedopt.__file__), package,
                    ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.egg-info"))
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "src"), "NUMBA_CACHE_DIR": str(tmp_path / "cache")}
    source = package / "cpu" / "grad_norm.py"
    results = []
    for edit in ("", "", "\n# an edit: the kernel's name changes\n"):
        source.write_text(source.read_text() + edit)
        run = subprocess.run([sys.executable, "-c", NORM_IT], env=env, capture_output=True, text=True, timeout=240,
                             cwd=tmp_path)
        assert run.returncode == 0, run.stderr[-3000:]
        path, value = run.stdout.split()
        assert path.startswith(str(package)), path
        results.append(float(value))
    assert results == [5000 * 4.0 + 3.0] * 3
    indexes = {name for _, _, names in os.walk(tmp_path / "cache") for name in names
               if name.startswith("grad_norm.grad_norm_") and name.endswith(".nbi")}
    assert len(indexes) == 2, indexes
