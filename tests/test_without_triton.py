"""fusedopt where Triton is not installed: the import, the reference (torch) backend and the numba
CPU kernels (`auto`, `numba`) work for every rule and give its oracle's numbers (torch.optim's);
backend="triton" raises RuntimeError before touching a param; the reference module needs nothing
of Triton.

The checks share one Python process in which `import triton` raises ImportError (each process
imports torch: seconds), started without FUSEDOPT_BACKEND and with the interpreter asked for.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fusedopt import reference

CHECKS = r"""
import importlib.util, json, sys, traceback
sys.modules["triton"] = None  # `import triton` now raises ImportError
import torch


def import_and_the_torch_and_cpu_kernel_backends():
    import warnings

    import fusedopt
    from fusedopt.registry import RULES

    warnings.simplefilter("error")  # the numba kernels are there: no fallback warning
    for info in RULES.values():
        for backend in ["torch", "auto", "numba", None]:
            values = torch.randn(7, generator=torch.Generator().manual_seed(0))
            ours, theirs = values.clone().requires_grad_(), values.clone().requires_grad_()
            optimizer = info.optimizer([ours], lr=0.1, backend=backend, **info.stateful)
            oracle = info.oracle([theirs], lr=0.1, **info.stateful)
            for step in range(3):
                grad = torch.randn(7, generator=torch.Generator().manual_seed(step + 1))
                ours.grad, theirs.grad = grad.clone(), grad.clone()
                optimizer.step()
                oracle.step()
            assert not torch.equal(ours.detach(), values), (info.name, backend)
            torch.testing.assert_close(ours.detach(), theirs.detach())
            buckets = optimizer._plans[0].buckets
            on_cpu_kernels = len(buckets) == 1 and buckets[0].table.cpu_kernels
            assert on_cpu_kernels == (backend != "torch"), (info.name, backend)
    assert sys.modules["triton"] is None
    return "ok"


def the_triton_backend():
    import fusedopt
    from fusedopt.registry import RULES

    outcomes = []
    for info in RULES.values():
        p = torch.randn(5, generator=torch.Generator().manual_seed(0)).requires_grad_()
        before = p.detach().clone()
        p.grad = torch.randn(5, generator=torch.Generator().manual_seed(1))
        try:
            info.optimizer([p], lr=0.1, backend="triton").step()
        except RuntimeError as error:
            outcomes.append([info.optimizer.__name__, "RuntimeError", str(error), torch.equal(p.detach(), before)])
        else:
            outcomes.append([info.optimizer.__name__, "stepped", "", torch.equal(p.detach(), before)])
    return outcomes


def the_reference_module_alone(path):
    spec = importlib.util.spec_from_file_location("reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    p = torch.ones(3)
    module.sgd([p], [torch.ones(3)], [None], lr=0.5, weight_decay=0.0, momentum=0.0, dampening=0.0,
               nesterov=False, maximize=False)
    return p.tolist()


for check, arguments in [(import_and_the_torch_and_cpu_kernel_backends, ()), (the_triton_backend, ()),
                         (the_reference_module_alone, (sys.argv[1],))]:
    try:
        record = {"ok": True, "value": check(*arguments)}
    except BaseException:
        record = {"ok": False, "error": traceback.format_exc()}
    print(json.dumps({"check": check.__name__, **record}))
"""


@pytest.fixture(scope="module")
def checks():
    """{check name: its value}, or the test fails with the check's traceback."""
    env = {key: value for key, value in os.environ.items() if key != "FUSEDOPT_BACKEND"}
    env["TRITON_INTERPRET"] = "1"
    result = subprocess.run([sys.executable, "-c", CHECKS, str(Path(reference.__file__))], env=env,
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    records = {record["check"]: record for record in map(json.loads, result.stdout.splitlines())}

    def value(name):
        record = records[name]
        if not record["ok"]:
            pytest.fail(f"{name} raised:\n{record['error']}", pytrace=False)
        return record["value"]

    return value


def test_import_the_reference_and_the_cpu_kernels_work_for_every_rule(checks):
    assert checks("import_and_the_torch_and_cpu_kernel_backends") == "ok"


def test_the_triton_backend_raises_runtime_error_naming_triton_and_leaves_params_alone(checks):
    from fusedopt.registry import RULES

    outcomes = checks("the_triton_backend")
    assert [name for name, *_ in outcomes] == [info.optimizer.__name__ for info in RULES.values()]
    for name, outcome, message, unchanged in outcomes:
        assert outcome == "RuntimeError", name
        assert "triton" in message.lower(), (name, message)
        assert unchanged, f"{name}: params changed before the error"


def test_the_reference_module_runs_alone(checks):
    assert checks("the_reference_module_alone") == [0.5, 0.5, 0.5]
