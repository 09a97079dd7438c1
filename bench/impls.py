"""The implementations compared: fusedopt, and torch.optim's for-loop, foreach, fused and compiled.

``build(impl, rule, params, ...)`` returns the optimizer and the zero-argument callable that
performs one step, so every implementation is timed through the same code.
"""

import inspect

import torch

from .rules import RULES

IMPLS = ("fusedopt", "torch-forloop", "torch-foreach", "torch-fused", "torch-compiled")
TORCH_IMPLS = IMPLS[1:]
LABELS = {
    "fusedopt": "fusedopt",
    "torch-forloop": "torch for-loop",
    "torch-foreach": "torch foreach",
    "torch-fused": "torch fused",
    "torch-compiled": "torch compile",
}


class Unsupported(Exception):
    """torch.optim has no such implementation for this rule, device or dtype."""


class FusedoptUnavailable(RuntimeError):
    pass


def parse_impls(text):
    if not text or text == "all":
        return list(IMPLS)
    chosen = []
    for item in text.split(","):
        key = item.strip()
        if not key.startswith("torch-") and key != "fusedopt":
            key = "torch-" + key  # "fused" -> "torch-fused"
        if key not in IMPLS:
            raise SystemExit(f"unknown implementation {item!r}; choose from {', '.join(IMPLS)}")
        chosen.append(key)
    return chosen


def load_fusedopt():
    """Import fusedopt and check that it has every optimizer class; fail with what to do."""
    hint = ("install it with `pip install -e .` from the repository root, or benchmark torch.optim "
            "alone with --impls " + ",".join(TORCH_IMPLS))
    try:
        import fusedopt
    except Exception as exc:
        raise FusedoptUnavailable(f"cannot import fusedopt ({type(exc).__name__}: {exc}); {hint}") from exc
    missing = sorted({r.class_name for r in RULES.values() if not hasattr(fusedopt, r.class_name)})
    if missing:
        raise FusedoptUnavailable(f"fusedopt has no {', '.join(missing)}; {hint}")
    return fusedopt


def fusedopt_launch_counter():
    """``fusedopt.kernels.launch_count`` when it can be imported, else None."""
    try:
        from fusedopt.kernels import launch_count
    except Exception:
        return None
    return launch_count


def default_fusedopt_backend(device):
    return "triton" if device.type == "cuda" else "torch"


def build(impl, rule, params, *, fusedopt_backend="auto"):
    """(optimizer, step) for one implementation of ``rule`` over ``params``.

    Raises Unsupported where torch.optim lacks the implementation (RMSprop has no ``fused``).
    """
    if impl == "fusedopt":
        fusedopt = load_fusedopt()
        optimizer = getattr(fusedopt, rule.class_name)(params, **rule.options, backend=fusedopt_backend)
        return optimizer, optimizer.step
    cls = getattr(torch.optim, rule.class_name)
    if impl == "torch-forloop":
        optimizer = cls(params, **rule.options, foreach=False)
    elif impl == "torch-foreach":
        optimizer = cls(params, **rule.options, foreach=True)
    elif impl == "torch-fused":
        if "fused" not in inspect.signature(cls.__init__).parameters:
            raise Unsupported(f"torch.optim.{rule.class_name} has no fused implementation")
        try:
            optimizer = cls(params, **rule.options, fused=True)
        except (RuntimeError, ValueError, TypeError) as exc:
            raise Unsupported(f"torch.optim.{rule.class_name}(fused=True): {exc}") from exc
    elif impl == "torch-compiled":
        # torch's default implementation choice, traced and compiled by torch.compile (inductor)
        torch._dynamo.reset()  # a fresh cache per case: honest compile time, no recompile limit
        optimizer = cls(params, **rule.options)
        return optimizer, torch.compile(optimizer.step)
    else:
        raise ValueError(f"unknown implementation {impl!r}")
    return optimizer, optimizer.step


def resident_bytes(optimizer):
    """Bytes held by the parameters, their gradients and the optimizer state."""
    seen = set()
    total = 0

    def add(t):
        nonlocal total
        if isinstance(t, torch.Tensor) and id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()

    for group in optimizer.param_groups:
        for p in group["params"]:
            add(p)
            add(p.grad)
    for state in optimizer.state.values():
        for value in state.values():
            add(value)
    return total
