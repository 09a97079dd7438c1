"""Parameter sets for the step benchmark, and the size presets that scale them to the device.

Full size (the CUDA default) is what the targets are stated for: one 64M-element tensor, the
148 tensor shapes of GPT-2 small (124M parameters, generated here, nothing downloaded), 2,000
tensors of 4,096 elements, and the GPT-2 shapes again in bf16. Smaller presets keep the tensor
counts and shrink the tensors (``tiny`` has 500 small tensors instead of 2,000, anything
smaller 100), so a CPU run takes a minute or two.
"""

import math
from dataclasses import dataclass

import torch

# fraction of the full-size parameter count
SIZES = {"tiny": 1 / 128, "small": 1 / 32, "medium": 1 / 8, "full": 1.0}


def resolve_size(text, device, quick):
    """``--size`` value -> (preset name or "custom", scale). auto: full on CUDA, small on CPU."""
    if text in (None, "", "auto"):
        if quick:
            name = "tiny" if device.type == "cpu" else "medium"
        else:
            name = "full" if device.type == "cuda" else "small"
        return name, SIZES[name]
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
    shapes: tuple  # tuple of shape tuples
    dtype: torch.dtype
    description: str

    @property
    def n_params(self):
        return sum(math.prod(s) for s in self.shapes)

    @property
    def n_tensors(self):
        return len(self.shapes)

    def summary(self):
        return {
            "name": self.name,
            "description": self.description,
            "dtype": str(self.dtype).replace("torch.", ""),
            "n_params": self.n_params,
            "n_tensors": self.n_tensors,
            "largest_tensor": max(math.prod(s) for s in self.shapes),
        }

    def make(self, device, seed=0):
        """(values, grads): tensors for this set, drawn once; ``attach`` turns them into params."""
        gen = torch.Generator(device=device).manual_seed(seed)
        values = [torch.randn(s, generator=gen, device=device, dtype=self.dtype) for s in self.shapes]
        grads = [torch.randn(s, generator=gen, device=device, dtype=self.dtype).mul_(1e-2)
                 for s in self.shapes]
        return values, grads


def attach(values, grads):
    """Fresh leaf parameters copied from ``values``, sharing the (never modified) ``grads``."""
    params = []
    for v, g in zip(values, grads):
        p = v.clone().requires_grad_(True)
        p.grad = g
        params.append(p)
    return params


def gpt2_shapes(scale=1.0, n_layer=12):
    """Parameter shapes of a GPT-2 small sized model, widths scaled by sqrt(scale).

    Full size: vocab 50257, context 1024, width 768, 12 layers -> 148 tensors, 124.4M params.
    """
    r = math.sqrt(scale)
    d = max(32, int(round(768 * r / 16)) * 16)
    vocab = max(64, int(round(50257 * r)))
    ctx = max(16, int(round(1024 * r)))
    shapes = [(vocab, d), (ctx, d)]  # token and position embeddings
    for _ in range(n_layer):
        shapes += [
            (d,), (d,),  # ln_1
            (d, 3 * d), (3 * d,),  # attn.c_attn
            (d, d), (d,),  # attn.c_proj
            (d,), (d,),  # ln_2
            (d, 4 * d), (4 * d,),  # mlp.c_fc
            (4 * d, d), (d,),  # mlp.c_proj
        ]
    shapes += [(d,), (d,)]  # ln_f
    return tuple(shapes)


def param_sets(scale=1.0):
    large = max(1 << 14, int(round((1 << 26) * scale)))
    gpt2 = gpt2_shapes(scale)
    n_gpt2 = sum(math.prod(s) for s in gpt2)
    # below the small preset fewer small tensors, so a quick CPU run stays quick
    n_small = 2000 if scale >= SIZES["small"] else (500 if scale >= SIZES["tiny"] else 100)
    sets = [
        ParamSet("large", ((large,),), torch.float32, f"one tensor of {large:,} elements"),
        ParamSet("gpt2", gpt2, torch.float32,
                 f"GPT-2 small shapes: {len(gpt2)} tensors, {n_gpt2 / 1e6:.1f}M params"),
        ParamSet("many-small", ((4096,),) * n_small, torch.float32, f"{n_small:,} tensors of 4,096 elements"),
        ParamSet("gpt2-bf16", gpt2, torch.bfloat16,
                 f"GPT-2 small shapes in bf16: {len(gpt2)} tensors, {n_gpt2 / 1e6:.1f}M params"),
    ]
    return {s.name: s for s in sets}


def parse_sets(text, scale):
    available = param_sets(scale)
    if not text or text == "all":
        return list(available.values())
    chosen = []
    for item in text.split(","):
        key = item.strip()
        if key not in available:
            raise SystemExit(f"unknown parameter set {key!r}; choose from {', '.join(available)}")
        chosen.append(available[key])
    return chosen
