"""Batch-size throughput: full training iterations (forward, backward, step) at each batch size.

For each model and rule, fusedopt runs against the fastest torch.optim implementation for that
model's parameters (for-loop, foreach or fused, timed on the step alone). Reported per batch
size: time per update, samples/s, time per epoch of a fixed-size data set, and the optimizer
step's share of the iteration. Data are synthetic and live on the device; nothing is downloaded.
"""

import gc
import math
import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from . import impls as impl_mod
from .env import synchronize
from .timing import quantile, time_calls

# model sizes per preset (see paramsets.SIZES); CPU presets stay small enough for a minute's run
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


def preset_for_scale(scale):
    """Nearest model preset at or below a parameter-set scale."""
    from .paramsets import SIZES

    best = "tiny"
    for name, value in sorted(SIZES.items(), key=lambda kv: kv[1]):
        if value <= scale * 1.0001:
            best = name
    return best


def default_batch_sizes(device, quick):
    if quick:
        return [1, 16, 128] if device.type == "cpu" else [1, 32, 1024, 4096]
    if device.type == "cuda":
        return [2**k for k in range(13)]  # 1 .. 4096
    return [4**k for k in range(6)]  # 1 .. 1024 in steps of 4: a CPU run stays short


class TinyTransformer(nn.Module):
    """Token embedding, pre-norm transformer encoder blocks, LM head: a small transformer."""

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


def build_model(name, config, device, seed=0):
    torch.manual_seed(seed)
    if name == "mlp":
        c = config
        layers = [nn.Linear(c["in_dim"], c["width"]), nn.ReLU()]
        for _ in range(c["depth"] - 2):
            layers += [nn.Linear(c["width"], c["width"]), nn.ReLU()]
        layers.append(nn.Linear(c["width"], c["classes"]))
        model = nn.Sequential(*layers)
    elif name == "transformer":
        model = TinyTransformer(**config)
    else:
        raise ValueError(f"unknown model {name!r}")
    return model.to(device)


def make_batch(name, config, batch_size, device, seed=1):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    if name == "mlp":
        x = torch.randn(batch_size, config["in_dim"], generator=gen)
        y = torch.randint(config["classes"], (batch_size,), generator=gen)
    else:
        x = torch.randint(config["vocab"], (batch_size, config["seq"]), generator=gen)
        y = torch.randint(config["vocab"], (batch_size, config["seq"]), generator=gen)
    return x.to(device), y.to(device)


def loss_of(model, x, y):
    out = model(x)
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


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


def measure_iterations(model, optimizer, step, x, y, device, *, repeats, window_s, warmup=2):
    """(median s per update, 20% and 80% quantiles, step share of the iteration, iterations/window).

    Marks are taken at each iteration's start and just before ``step()``: CUDA events recorded
    on the stream, or perf_counter on the CPU, so the step's share needs no extra synchronisation.
    """
    cuda = device.type == "cuda"

    def iterate(marks):
        marks.append(mark())
        optimizer.zero_grad()
        loss_of(model, x, y).backward()
        marks.append(mark())
        step()

    def mark():
        if cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def window(calls):
        synchronize(device)
        marks = []
        for _ in range(calls):
            iterate(marks)
        marks.append(mark())
        if cuda:
            marks[-1].synchronize()
            stamps = [0.0] + [marks[0].elapsed_time(m) / 1e3 for m in marks[1:]]
        else:
            stamps = [m - marks[0] for m in marks]
        # stamps: start_0, pre_step_0, start_1, pre_step_1, ..., end
        starts, pre_steps = stamps[0:-1:2], stamps[1:-1:2]
        ends = starts[1:] + [stamps[-1]]
        total = stamps[-1] - stamps[0]
        step_time = sum(e - p for p, e in zip(pre_steps, ends))
        return total / calls, step_time / total if total > 0 else 0.0

    for _ in range(warmup):
        iterate([])
    single, _ = window(1)
    calls = max(1, min(100, math.ceil(window_s / max(single, 1e-7))))
    samples = [window(calls) for _ in range(repeats)]
    per_update = [s[0] for s in samples]
    return (statistics.median(per_update), quantile(per_update, 0.2), quantile(per_update, 0.8),
            statistics.median(s[1] for s in samples), calls)


def choose_best_torch(model_name, config, rule, cfg):
    """Time the step alone for each torch implementation on the model's parameters; fastest wins."""
    candidates = {}
    for impl in ("torch-forloop", "torch-foreach", "torch-fused"):
        model = build_model(model_name, config, cfg.device)
        for p in model.parameters():
            p.grad = torch.randn_like(p) * 1e-2
        try:
            optimizer, step = impl_mod.build(impl, rule, list(model.parameters()))
            step()
            timing = time_calls(step, cfg.device, repeats=3, window_s=cfg.window_s, warmup=2)
            candidates[impl] = timing.median_s * 1e3
        except Exception as exc:  # torch fused missing for this rule/device: not a candidate
            candidates[impl] = f"{type(exc).__name__}: {exc}".splitlines()[0][:160]
        finally:
            model = optimizer = step = None  # noqa: F841 (drop the references before the next build)
    timed = {k: v for k, v in candidates.items() if isinstance(v, float)}
    if not timed:
        raise RuntimeError(f"no torch implementation of {rule.name} runs here: {candidates}")
    return min(timed, key=timed.get), candidates


def model_summary(name, config, device):
    model = build_model(name, config, device)
    params = list(model.parameters())
    return {"name": name, "config": config, "n_params": sum(p.numel() for p in params),
            "n_tensors": len(params)}


def run(cfg, progress, on_progress=None):
    """All rows of the sweep; returns (rows, selections)."""
    rows, selections = [], []
    configs = MODEL_PRESETS[cfg.preset]
    for model_name in cfg.models:
        config = configs[model_name]
        for rule in cfg.rules:
            progress.set_postfix_str(f"{model_name} {rule.name} choosing torch impl", refresh=False)
            best, candidates = choose_best_torch(model_name, config, rule, cfg)
            selections.append({"model": model_name, "rule": rule.name, "best_torch": best,
                               "candidate_step_ms": candidates})
            impls = (["fusedopt"] if cfg.with_fusedopt else []) + [best]
            for impl in impls:
                rows += run_sweep(model_name, config, rule, impl, cfg, progress)
        _release(cfg.device)
        if on_progress is not None:
            on_progress(rows, selections)
    add_gains(rows)
    return rows, selections


def _release(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_sweep(model_name, config, rule, impl, cfg, progress):
    rows = []
    model = build_model(model_name, config, cfg.device)
    optimizer = step = None
    failure = None
    try:
        optimizer, step = impl_mod.build(impl, rule, list(model.parameters()),
                                         fusedopt_backend=cfg.fusedopt_backend)
    except Exception as exc:
        failure = f"{type(exc).__name__}: {exc}".splitlines()[0][:240]
    for bs in cfg.batch_sizes:
        progress.set_postfix_str(f"{model_name} {rule.name} {impl} batch {bs}", refresh=False)
        row = {"model": model_name, "rule": rule.name, "rule_label": rule.label, "impl": impl,
               "impl_label": impl_mod.LABELS[impl], "role": "fusedopt" if impl == "fusedopt" else "best-torch",
               "batch_size": bs, "status": "pending", "reason": None}
        if failure is not None:
            row.update(status="failed", reason=failure)
        elif cfg.deadline is not None and time.monotonic() > cfg.deadline:
            row.update(status="skipped", reason="time budget (--time-budget) used up")
        else:
            try:
                x, y = make_batch(model_name, config, bs, cfg.device)
                med, q20, q80, share, calls = measure_iterations(
                    model, optimizer, step, x, y, cfg.device, repeats=cfg.repeats, window_s=cfg.window_s)
                updates_per_epoch = math.ceil(cfg.epoch_samples / bs)
                row.update(status="ok", update_ms=med * 1e3, q20_ms=q20 * 1e3, q80_ms=q80 * 1e3,
                           samples_per_s=bs / med, epoch_s=updates_per_epoch * med,
                           updates_per_epoch=updates_per_epoch, step_share=share,
                           step_ms=share * med * 1e3, iterations_per_window=calls)
            except Exception as exc:
                row.update(status="failed", reason=f"{type(exc).__name__}: {exc}".splitlines()[0][:240])
                if cfg.device.type == "cuda":
                    torch.cuda.empty_cache()
            finally:
                x = y = None
        rows.append(row)
        progress.update(1)
    del model, optimizer, step
    return rows


def add_gains(rows):
    """``gain`` on fusedopt rows: best torch time per update over fusedopt's, same model/rule/batch."""
    torch_rows = {(r["model"], r["rule"], r["batch_size"]): r for r in rows
                  if r["role"] == "best-torch" and r["status"] == "ok"}
    for row in rows:
        other = torch_rows.get((row["model"], row["rule"], row["batch_size"]))
        if row["role"] == "fusedopt" and row["status"] == "ok" and other is not None:
            row["gain"] = other["update_ms"] / row["update_ms"]
            row["torch_impl"] = other["impl"]
