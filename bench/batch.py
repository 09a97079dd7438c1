"""Batch-size throughput: full training iterations (forward, backward, step) at each batch size.

For each model and rule, fusedopt runs against the fastest torch.optim implementation for that
model's parameters (for-loop, foreach or fused, timed interleaved on the step alone). Per batch
size: time per update, samples/s, time per epoch of a fixed-size data set, and the optimizer
step's share of the iteration. Data are synthetic and live on the device.
"""

import math
import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from . import cases
from .step import short
from .timing import time_interleaved, time_split

# model sizes per size preset (cases.SIZES); the CPU presets stay small enough for a short run
MODEL_PRESETS = {
    "tiny": {"mlp": dict(in_dim=256, width=256, depth=3, classes=10),
             "transformer": dict(vocab=256, d=64, heads=2, layers=1, seq=16)},
    "small": {"mlp": dict(in_dim=784, width=512, depth=3, classes=10),
              "transformer": dict(vocab=512, d=64, heads=2, layers=2, seq=16)},
    "medium": {"mlp": dict(in_dim=784, width=1024, depth=4, classes=10),
               "transformer": dict(vocab=1024, d=128, heads=4, layers=2, seq=32)},
    "full": {"mlp": dict(in_dim=784, width=2048, depth=4, classes=10),
             "transformer": dict(vocab=2048, d=256, heads=4, layers=2, seq=64)},
}
MODELS = ("mlp", "transformer")
CANDIDATES = ("torch-forloop", "torch-foreach", "torch-fused")


def preset_for_scale(scale):
    """The largest model preset at or below a parameter-set scale."""
    fitting = [name for name, value in cases.SIZES.items() if value <= scale * 1.0001]
    return max(fitting, key=cases.SIZES.get) if fitting else "tiny"


def default_batch_sizes(device, quick):
    if quick:
        return [1, 16, 128] if device.type == "cpu" else [1, 32, 1024, 4096]
    return [2**k for k in range(13)] if device.type == "cuda" else [4**k for k in range(6)]


class TinyTransformer(nn.Module):
    """Token embedding, pre-norm transformer encoder blocks, LM head."""

    def __init__(self, vocab, d, heads, layers, seq):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(seq, d) * 0.02)
        layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, tokens):
        return self.head(self.norm(self.blocks(self.embed(tokens) + self.pos)))


def build_model(name, c, device, seed=0):
    torch.manual_seed(seed)
    if name == "transformer":
        return TinyTransformer(**c).to(device)
    hidden = [m for _ in range(c["depth"] - 2) for m in (nn.Linear(c["width"], c["width"]), nn.ReLU())]
    return nn.Sequential(nn.Linear(c["in_dim"], c["width"]), nn.ReLU(), *hidden,
                         nn.Linear(c["width"], c["classes"])).to(device)


def make_batch(name, c, batch_size, device, seed=1):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    if name == "mlp":
        x = torch.randn(batch_size, c["in_dim"], generator=gen)
        y = torch.randint(c["classes"], (batch_size,), generator=gen)
    else:
        x = torch.randint(c["vocab"], (batch_size, c["seq"]), generator=gen)
        y = torch.randint(c["vocab"], (batch_size, c["seq"]), generator=gen)
    return x.to(device), y.to(device)


@dataclass
class BatchConfig:
    device: torch.device
    models: list  # names
    preset: str
    rules: list
    batch_sizes: list
    epoch_samples: int = 50_000
    repeats: int = 5
    window_s: float = 0.03
    with_fusedopt: bool = True
    fusedopt_backend: str = "auto"
    deadline: float = None


def model_summary(name, config, device):
    params = list(build_model(name, config, device).parameters())
    return {"name": name, "config": config, "n_params": sum(p.numel() for p in params), "n_tensors": len(params)}


def choose_best_torch(model_name, config, rule, cfg):
    """The torch implementation whose step alone is fastest on the model's params."""
    candidates, steps = {}, {}
    for impl in CANDIDATES:
        params = list(build_model(model_name, config, cfg.device).parameters())
        for p in params:
            p.grad = torch.randn_like(p) * 1e-2
        try:
            steps[impl] = cases.build(impl, rule, params)[1]
            steps[impl]()
        except Exception as exc:  # torch fused missing for this rule or device: not a candidate
            steps.pop(impl, None)
            candidates[impl] = short(exc)
    if not steps:
        raise RuntimeError(f"no torch implementation of {rule.name} runs here: {candidates}")
    timings = time_interleaved(steps, cfg.device, repeats=3, window_s=cfg.window_s, warmup=1)
    candidates.update((impl, t.median_s * 1e3) for impl, t in timings.items())
    return min(timings, key=lambda impl: timings[impl].median_s), {i: candidates[i] for i in CANDIDATES}


def run_sweep(model_name, config, rule, impl, cfg, progress):
    model = build_model(model_name, config, cfg.device)
    try:
        optimizer, step = cases.build(impl, rule, list(model.parameters()), cfg.fusedopt_backend)
        failure = None
    except Exception as exc:
        failure = short(exc)
    rows = []
    for bs in cfg.batch_sizes:
        progress.set_postfix_str(f"{model_name} {rule.name} {impl} batch {bs}", refresh=False)
        row = {"model": model_name, "rule": rule.name, "rule_label": rule.label, "impl": impl,
               "impl_label": cases.LABELS[impl], "role": "fusedopt" if impl == "fusedopt" else "best-torch",
               "batch_size": bs, "status": "pending", "reason": None}
        if impl == "fusedopt":
            row.update(cases.fusedopt_info(cfg.fusedopt_backend, cfg.device))
        if failure is not None:
            row.update(status="failed", reason=failure)
        elif cfg.deadline is not None and time.monotonic() > cfg.deadline:
            row.update(status="skipped", reason="time budget (--time-budget) used up")
        else:
            try:
                x, y = make_batch(model_name, config, bs, cfg.device)

                def forward_backward(x=x, y=y):
                    optimizer.zero_grad()
                    out = model(x)
                    F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1)).backward()

                timing, share = time_split(forward_backward, step, cfg.device, repeats=cfg.repeats,
                                           window_s=cfg.window_s)
                med, updates = timing.median_s, math.ceil(cfg.epoch_samples / bs)
                row.update(status="ok", update_ms=med * 1e3, q20_ms=timing.q20_s * 1e3, q80_ms=timing.q80_s * 1e3,
                           samples_per_s=bs / med, epoch_s=updates * med, updates_per_epoch=updates,
                           step_share=share, step_ms=share * med * 1e3, iterations_per_window=timing.calls_per_window)
            except Exception as exc:
                row.update(status="failed", reason=short(exc))
                if cfg.device.type == "cuda":
                    torch.cuda.empty_cache()
        rows.append(row)
        progress.update(1)
    return rows


def add_gains(rows):
    """`gain` on fusedopt rows: best torch's time per update over fusedopt's, same model/rule/batch."""
    torch_rows = {(r["model"], r["rule"], r["batch_size"]): r for r in rows
                  if r["role"] == "best-torch" and r["status"] == "ok"}
    for row in rows:
        other = torch_rows.get((row["model"], row["rule"], row["batch_size"]))
        if row["role"] == "fusedopt" and row["status"] == "ok" and other is not None:
            row.update(gain=other["update_ms"] / row["update_ms"], torch_impl=other["impl"])


def run(cfg, progress, on_progress=None):
    """All rows of the sweep: (rows, selections)."""
    rows, selections = [], []
    for model_name in cfg.models:
        config = MODEL_PRESETS[cfg.preset][model_name]
        for rule in cfg.rules:
            progress.set_postfix_str(f"{model_name} {rule.name} choosing torch impl", refresh=False)
            best, candidates = choose_best_torch(model_name, config, rule, cfg)
            selections.append({"model": model_name, "rule": rule.name, "best_torch": best,
                               "candidate_step_ms": candidates})
            for impl in (["fusedopt"] if cfg.with_fusedopt else []) + [best]:
                rows += run_sweep(model_name, config, rule, impl, cfg, progress)
        cases.release(cfg.device)
        if on_progress is not None:
            on_progress(rows, selections)
    add_gains(rows)
    return rows, selections
