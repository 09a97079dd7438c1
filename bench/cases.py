"""What the benchmarks time: the rules (fusedopt.registry's benchmark variants), the
implementations compared, the parameter sets, and the one list of step cases built from them.

Full size (the CUDA default) is what the targets are stated for: one 64M-element tensor, the 148
shapes of GPT-2 small (124M params, generated here), 2,000 tensors of 4,096 elements, and the
GPT-2 shapes in bf16. Smaller presets shrink the tensors (and below ``small`` the tensor count).
"""

import gc
import inspect
import math
from dataclasses import dataclass

import torch

from fusedopt.backends import backend_name
from fusedopt.registry import RULES as REGISTRY

IMPLS = ("fusedopt", "torch-forloop", "torch-foreach", "torch-fused", "torch-compiled")
TORCH_IMPLS = IMPLS[1:]
LABELS = {"fusedopt": "fusedopt", "torch-forloop": "torch for-loop", "torch-foreach": "torch foreach",
          "torch-fused": "torch fused", "torch-compiled": "torch compile"}
SIZES = {"tiny": 1 / 128, "small": 1 / 32, "medium": 1 / 8, "full": 1.0}  # of the full param count


class Unsupported(Exception):
    """torch.optim has no such implementation for this rule, device or dtype."""


@dataclass(frozen=True)
class Rule:
    """One benchmark variant of a registry rule: `name` on the command line and in the JSON."""
    name: str
    label: str
    info: object  # the registry's RuleInfo
    options: dict

    def bytes_per_param(self, dtype=torch.float32, shapes=None):
        """Bytes a step moves per param: of a large matrix, or averaged over `shapes` (the formats
        of low-precision states follow each param's shape)."""
        key = self.name, dtype, shapes
        if key not in _BYTES:  # the registry builds an optimizer to find the states
            if shapes is None:
                _BYTES[key] = self.info.bytes_per_param(dtype, **self.options)
            else:
                per_shape = {shape: self.info.bytes_per_param(dtype, shape, **self.options) for shape in set(shapes)}
                total = sum(math.prod(shape) * per_shape[shape] for shape in shapes)
                _BYTES[key] = total / sum(math.prod(shape) for shape in shapes)
        return _BYTES[key]

    @property
    def stores_low_precision(self):
        """States in bf16 or 8 bits, or bf16 params with remainders: fusedopt's alone."""
        return any(key in self.options for key in ("state_precision", "master_weights"))


_BYTES = {}


RULES = {b.name: Rule(b.name, b.label, info, b.options) for info in REGISTRY.values() for b in info.benchmarks}


def choose(text, available, what):
    """``"a,b"`` -> [available[a], available[b]]; ``"all"`` or empty -> all of them."""
    if not text or text == "all":
        return list(available.values())
    unknown = [k.strip() for k in text.split(",") if k.strip() not in available]
    if unknown:
        raise SystemExit(f"unknown {what} {', '.join(unknown)}; choose from {', '.join(available)}")
    return [available[k.strip()] for k in text.split(",")]


def build(impl, rule, params, fusedopt_backend="auto"):
    """(optimizer, step) for one implementation of `rule` over `params`; Unsupported where
    torch.optim lacks it (RMSprop and RAdam have no `fused`; a rule torch.optim has not, none)."""
    torch_class = rule.info.torch_optimizer
    if impl == "fusedopt":
        optimizer = rule.info.optimizer(params, **rule.options, backend=fusedopt_backend)
    elif torch_class is None:
        raise Unsupported(f"torch.optim has no {rule.info.optimizer.__name__}")
    elif rule.stores_low_precision:
        raise Unsupported("torch.optim keeps its states in the param's dtype")
    elif impl == "torch-compiled":  # torch's default implementation, traced by torch.compile
        torch._dynamo.reset()  # a fresh cache per case: honest compile time, no recompile limit
        optimizer = torch_class(params, **rule.options)
        return optimizer, torch.compile(optimizer.step)
    elif impl == "torch-fused" and "fused" not in inspect.signature(torch_class.__init__).parameters:
        raise Unsupported(f"torch.optim.{torch_class.__name__} has no fused implementation")
    else:
        flag = {"torch-forloop": {"foreach": False}, "torch-foreach": {"foreach": True},
                "torch-fused": {"fused": True}}[impl]
        try:
            optimizer = torch_class(params, **rule.options, **flag)
        except (RuntimeError, ValueError, TypeError) as exc:
            raise Unsupported(f"torch.optim.{torch_class.__name__}({flag}): {exc}") from exc
    return optimizer, optimizer.step


def release(device):
    """Free the last set's tensors on a GPU before the next allocates its own (one gc pass costs
    ~0.2 s with torch loaded; CPU sets are small enough to wait for the collector)."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def resident_bytes(optimizer):
    """Bytes held by the params, their grads and the optimizer state."""
    tensors = {id(t): t for group in optimizer.param_groups for p in group["params"] for t in (p, p.grad)
               if t is not None}
    tensors.update((id(t), t) for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t))
    return sum(t.numel() * t.element_size() for t in tensors.values())


def resolve_size(text, device, quick):
    """``--size`` -> (preset name or "custom", scale). auto: full on CUDA, small on CPU; with
    --quick medium on CUDA, tiny on CPU."""
    if text in (None, "", "auto"):
        text = ("medium" if quick else "full") if device.type == "cuda" else ("tiny" if quick else "small")
    if text in SIZES:
        return text, SIZES[text]
    try:
        scale = float(text)
    except ValueError:
        raise SystemExit(f"--size must be auto, {', '.join(SIZES)} or a fraction of full size") from None
    if not 0 < scale <= 4:
        raise SystemExit("--size as a number must be in (0, 4]")
    return "custom", scale


@dataclass(frozen=True)
class ParamSet:
    name: str
    shapes: tuple
    dtype: torch.dtype
    description: str

    @property
    def n_params(self):
        return sum(math.prod(s) for s in self.shapes)

    def summary(self):
        return {"name": self.name, "description": self.description, "dtype": str(self.dtype)[6:],
                "n_params": self.n_params, "n_tensors": len(self.shapes),
                "largest_tensor": max(math.prod(s) for s in self.shapes)}

    def make(self, device, seed=0):
        """(values, grads), drawn once per set; `attach` turns them into params."""
        gen = torch.Generator(device=device).manual_seed(seed)
        values = [torch.randn(s, generator=gen, device=device, dtype=self.dtype) for s in self.shapes]
        grads = [torch.randn(s, generator=gen, device=device, dtype=self.dtype).mul_(1e-2) for s in self.shapes]
        return values, grads


def attach(values, grads):
    """Fresh leaf params copied from `values`, sharing the (never modified) `grads`."""
    params = [v.clone().requires_grad_(True) for v in values]
    for p, g in zip(params, grads):
        p.grad = g
    return params


def gpt2_shapes(scale=1.0, n_layer=12):
    """GPT-2 small's parameter shapes (vocab 50257, context 1024, width 768: 148 tensors, 124.4M
    params at full size), widths scaled by sqrt(scale)."""
    r = math.sqrt(scale)
    d = max(32, int(round(768 * r / 16)) * 16)
    vocab, ctx = max(64, int(round(50257 * r))), max(16, int(round(1024 * r)))
    layer = [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    return tuple([(vocab, d), (ctx, d)] + layer * n_layer + [(d,), (d,)])


LARGE_ROW = 4096


def param_sets(scale=1.0):
    # one matrix of rows of LARGE_ROW elements: rows that hold whole 8-bit blocks, so that its
    # 8-bit rows hold codes (a 1-D param's states would be bf16, fusedopt.formats)
    rows = max(4, int(round((1 << 26) * scale / LARGE_ROW)))
    gpt2 = gpt2_shapes(scale)
    n_gpt2 = sum(math.prod(s) for s in gpt2)
    n_small = 2000 if scale >= SIZES["small"] else (500 if scale >= SIZES["tiny"] else 100)
    sets = [ParamSet("large", ((rows, LARGE_ROW),), torch.float32,
                     f"one {rows:,} x {LARGE_ROW:,} tensor ({rows * LARGE_ROW:,} elements)"),
            ParamSet("gpt2", gpt2, torch.float32, f"GPT-2 small shapes: {len(gpt2)} tensors, {n_gpt2 / 1e6:.1f}M params"),
            ParamSet("many-small", ((4096,),) * n_small, torch.float32, f"{n_small:,} tensors of 4,096 elements"),
            ParamSet("gpt2-bf16", gpt2, torch.bfloat16,
                     f"GPT-2 small shapes in bf16: {len(gpt2)} tensors, {n_gpt2 / 1e6:.1f}M params")]
    return {s.name: s for s in sets}


def step_cases(sets, rules, impls, bytes_per_param=None):
    """The rows of a benchmark, in table order: every parameter set x rule x implementation, with
    the bytes each must move (`bytes_per_param(impl, dtype)`; default the rule's update)."""
    rows = []
    for s in sets:
        for r in rules:
            for i in impls:
                bpp = bytes_per_param(i, s.dtype) if bytes_per_param else r.bytes_per_param(s.dtype, s.shapes)
                rows.append({"param_set": s.name, "rule": r.name, "rule_label": r.label, "impl": i,
                             "impl_label": LABELS.get(i, i), "dtype": str(s.dtype)[6:], "n_params": s.n_params,
                             "n_tensors": len(s.shapes), "bytes_per_param": bpp, "bytes_per_step": bpp * s.n_params,
                             "status": "pending", "reason": None})
    return rows


def fusedopt_info(backend, device):
    """What a fusedopt row records: the backend asked for, what ran (fusedopt.backends'
    backend_name) and the label tables show."""
    runs = backend_name(backend, device)
    return {"backend": backend, "runs": runs, "impl_label": f"fusedopt ({runs})"}
