"""Does training still work with optimizer states stored in low precision? Each candidate format
of bench/state_codecs.py against fp32 states, for every rule of the registry, on two CPU tasks:
an MLP on scikit-learn's digits and a small character-level transformer on a generated text.

The simulation: the optimizer (torch.optim's class, or fusedopt's plain-torch reference where
torch.optim has not the rule) steps in fp32 on the decoded states; after every step each state is
encoded and decoded again in place, so the next step reads exactly what a kernel would decode from
the stored codes. fusedopt's own formats (`fusedopt-bf16`, `fusedopt-8bit`, and their `-sr`
stochastic roundings) run fusedopt's class on its numba CPU kernels instead, which store the
states themselves: what a user gets. Also: the bf16 second-moment stall at beta2 = 0.999
(``--stall``) and the CPU time of each codec's encode and decode (``--codec-time``, plain torch:
a proxy for the kernels).

    python -m bench.state_accuracy --quick          # a smoke run (~1 minute)
    python -m bench.state_accuracy                  # the study (digits, transformer, stall, codec time)
    python -m bench.state_accuracy --tasks digits --formats fp32,bf16,softsign+log --rules adam
"""
import argparse
import concurrent.futures
import json
import math
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

if __package__ in (None, ""):  # run as a file: bench/ is a folder of the repository
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import state_codecs  # noqa: E402
from fusedopt.registry import RULES  # noqa: E402

DIGITS_ACCURACY_BAND = 0.5  # test accuracy points, mean over seeds
TRANSFORMER_LOSS_BAND = 0.01  # relative, mean loss of the last steps
TAIL_STEPS = 50  # the transformer's loss is averaged over the last TAIL_STEPS steps


# ---- the rules: each registry rule's benchmark variants that keep state ----


@dataclass(frozen=True)
class Variant:
    name: str
    info: object  # the registry's RuleInfo
    options: dict

    def slots(self):
        """(state key, signed) of each state tensor under the options, from the rule's spec."""
        signed = {slot.name: slot.signed for slot in self.info.optimizer.spec.states}
        return [(key, signed[key]) for key in self.info.state_keys(**self.options)]

    def build(self, params, policy=None):
        """The run's optimizer: the oracle (torch.optim's class, or fusedopt's reference) whose
        states the policy rounds after each step; or, for one of fusedopt's own formats, fusedopt's
        class on the numba CPU kernels, which store the states themselves."""
        own = FUSEDOPT_FORMATS.get(getattr(policy, "name", None))
        if own is not None:
            return self.info.optimizer(params, backend="numba", **self.options, **own)
        return self.info.oracle_class(params, **self.options)


# fusedopt's state formats as it stores them (fusedopt/formats.py), run through its own kernels
FUSEDOPT_FORMATS = {"fusedopt-bf16": dict(state_precision="bf16"),
                    "fusedopt-bf16-sr": dict(state_precision="bf16", state_rounding="stochastic"),
                    "fusedopt-8bit": dict(state_precision="8bit"),
                    "fusedopt-8bit-sr": dict(state_precision="8bit", state_rounding="stochastic")}


def policies():
    """Every format the study can run, by name: the plain-torch candidates (bench/state_codecs.py)
    and fusedopt's own, whose runs round nothing after the step (the kernels stored the states)."""
    return {**state_codecs.candidate_policies(),
            **{name: state_codecs.StatePolicy(name, state_codecs.FP32, state_codecs.FP32) for name in FUSEDOPT_FORMATS}}


def fusedopt_state_bytes(variant, options, shapes):
    """Bytes of the states fusedopt stores for params of `shapes` under `options`, from the
    formats it gives each state (fusedopt.formats)."""
    from fusedopt import formats

    optimizer = variant.info.optimizer([nn.Parameter(torch.zeros(1))], **variant.options, **options)
    group = optimizer.param_groups[0]
    per_element = {formats.PLAIN: 4, formats.BF16: 2, formats.Q8: 1 + 4 / formats.QUANT_BLOCK}
    total = 0
    for shape in shapes:
        param = torch.empty(shape, device="meta")
        total += math.prod(shape) * sum(per_element[optimizer._state_format(group, param, key)]
                                        for key in optimizer._state_keys(group))
    return total


LR_SOURCES = ("benchmark", "default_lr")
STORAGE_OPTIONS = {"state_precision", "state_rounding", "master_weights", "stochastic_rounding"}


def rule_variants(lr_source="benchmark"):
    """Each registry rule's benchmark variants (their options: torch.optim's default lr and the
    like) that keep state; and the variant with the rule's `stateful` options added where that
    adds state tensors (Adam's amsgrad, RMSprop centered with momentum). `lr_source` "default_lr":
    the registry's `default_lr` instead (larger: SGD's 1e-3 barely trains in a few epochs)."""
    if lr_source not in LR_SOURCES:
        raise ValueError(f"lr_source {lr_source!r} is not one of {LR_SOURCES}")
    variants = {}
    for info in RULES.values():
        for benchmark in info.benchmarks:
            if set(benchmark.options) & STORAGE_OPTIONS:  # a benchmark of fusedopt's own formats: a format here
                continue
            options = dict(benchmark.options, **({"lr": info.default_lr} if lr_source == "default_lr" else {}))
            keys = info.state_keys(**options)
            if keys:
                variants[benchmark.name] = Variant(benchmark.name, info, options)
            richer = {**options, **info.stateful}
            if set(info.state_keys(**richer)) > set(keys) and keys:
                name = benchmark.name + "".join(f"+{k}={v}" for k, v in info.stateful.items())
                variants[name] = Variant(name, info, richer)
    return variants


def apply_policy(optimizer, params, slots, policy, generator):
    """Every state of every param stored in its format and read back, in place."""
    with torch.no_grad():
        for p in params:
            state = optimizer.state[p]
            keys = [key for key, _ in slots]
            for key, signed in slots:
                fmt = policy.format_for(p, signed, key, keys)
                if fmt is not state_codecs.FP32:
                    state[key].copy_(state_codecs.roundtrip(fmt, state[key], generator))


# ---- task 1: an MLP on scikit-learn's digits ----


@dataclass(frozen=True)
class Digits:
    epochs: int = 20
    batch: int = 64
    hidden: int = 256
    name: str = "digits"

    def data(self):
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        x, y = load_digits(return_X_y=True)
        x_train, x_test, y_train, y_test = train_test_split(x / 16.0, y, test_size=0.25, random_state=0, stratify=y)
        as_tensors = (torch.tensor(x_train, dtype=torch.float32), torch.tensor(y_train),
                      torch.tensor(x_test, dtype=torch.float32), torch.tensor(y_test))
        return as_tensors

    def run(self, variant, policy, seed):
        x_train, y_train, x_test, y_test = self.data()
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(64, self.hidden), nn.ReLU(), nn.Linear(self.hidden, self.hidden), nn.ReLU(),
                              nn.Linear(self.hidden, 10))
        params = list(model.parameters())
        optimizer, slots = variant.build(params, policy), variant.slots()
        order, rounding = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(10_000 + seed)
        losses, epoch_losses = [], []
        for _ in range(self.epochs):
            epoch = []
            for batch in torch.randperm(len(x_train), generator=order).split(self.batch):
                loss = F.cross_entropy(model(x_train[batch]), y_train[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                apply_policy(optimizer, params, slots, policy, rounding)
                epoch.append(loss.item())
            losses += epoch
            epoch_losses.append(statistics.fmean(epoch))
            if not math.isfinite(epoch_losses[-1]):
                break
        with torch.no_grad():
            accuracy = (model(x_test).argmax(1) == y_test).float().mean().item() * 100
        return dict(losses=losses, epoch_losses=epoch_losses, last_epoch_loss=epoch_losses[-1], test_accuracy=accuracy,
                    finite=all(map(math.isfinite, losses)))


# ---- task 2: a character-level transformer on a generated text ----

NAMES = ("ada", "bob", "cyd", "dee", "eli", "fay", "gus", "hal", "ivy", "jon", "kim", "lou")
NOUNS = ("apple", "stone", "river", "lamp", "cat", "book", "coin", "tree", "cloud", "ship", "key", "door")
ADJECTIVES = ("red", "old", "quiet", "small", "bright", "heavy", "green", "cold", "round", "sharp")
VERBS = ("find", "carry", "paint", "open", "hold", "drop", "watch", "count", "push", "hide")


def generated_corpus(characters=200_000, seed=0):
    """A text made from a few sentence patterns, deterministic for a seed: spelling, agreement
    and small sums for a character model to learn, with no file to ship."""
    rng = random.Random(seed)
    parts, size = [], 0
    while size < characters:
        pattern, name, other = rng.randrange(5), rng.choice(NAMES), rng.choice(NAMES)
        noun, adjective, verb = rng.choice(NOUNS), rng.choice(ADJECTIVES), rng.choice(VERBS)
        a, b = rng.randrange(10), rng.randrange(10)
        sentence = (f"{name} {verb}s the {adjective} {noun}.",
                    f"the {noun} of {name} is {adjective}.",
                    f"{a} plus {b} is {a + b}.",
                    f"{name} has {a + b} {noun}s and gives {b} to {other}, so {name} has {a} left.",
                    f"if {name} can {verb} the {noun}, {other} will {verb} it too.")[pattern]
        parts.append(sentence + ("\n" if rng.random() < 0.2 else " "))
        size += len(parts[-1])
    return "".join(parts)


class CausalBlock(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.fc1, self.fc2 = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x):
        batch, length, width = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(batch, length, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attended.transpose(1, 2).reshape(batch, length, width))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class CharTransformer(nn.Module):
    def __init__(self, vocab, width, layers, heads, context):
        super().__init__()
        self.embed, self.position = nn.Embedding(vocab, width), nn.Parameter(torch.randn(context, width) * 0.02)
        self.blocks = nn.Sequential(*[CausalBlock(width, heads) for _ in range(layers)])
        self.norm, self.head = nn.LayerNorm(width), nn.Linear(width, vocab, bias=False)

    def forward(self, tokens):
        return self.head(self.norm(self.blocks(self.embed(tokens) + self.position[: tokens.shape[1]])))


@dataclass(frozen=True)
class CharText:
    steps: int = 250
    batch: int = 16
    context: int = 64
    width: int = 128  # rows of 128: whole 64-element blocks, so that "8bit" states hold codes
    layers: int = 2
    heads: int = 4
    tail: int = TAIL_STEPS
    name: str = "transformer"

    def run(self, variant, policy, seed):
        text = generated_corpus()
        alphabet = sorted(set(text))
        data = torch.tensor([alphabet.index(c) for c in text])
        torch.manual_seed(seed)
        model = CharTransformer(len(alphabet), self.width, self.layers, self.heads, self.context)
        params = list(model.parameters())
        optimizer, slots = variant.build(params, policy), variant.slots()
        order, rounding = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(10_000 + seed)
        losses = []
        for _ in range(self.steps):
            starts = torch.randint(0, len(data) - self.context - 1, (self.batch,), generator=order)
            window = torch.stack([data[s: s + self.context + 1] for s in starts.tolist()])
            logits = model(window[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), window[:, 1:].reshape(-1))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            apply_policy(optimizer, params, slots, policy, rounding)
            losses.append(loss.item())
            if not math.isfinite(losses[-1]):
                break
        tail = losses[-self.tail:]
        return dict(losses=losses, tail_loss=statistics.fmean(tail), finite=all(map(math.isfinite, losses)))


TASKS = {"digits": Digits, "transformer": CharText}
QUICK = {"digits": dict(epochs=2), "transformer": dict(steps=20, tail=10, width=64, context=32, batch=16)}
# the formats each task runs unless --formats names them: every candidate on digits, the leading
# ones on the slower transformer, a few for --quick
DEFAULT_FORMATS = {"digits": None,
                   "transformer": ("fp32", "bf16", "bf16-sr", "softsign+sqrt", "dynamic+udynamic", "softsign+sqrt-nz",
                                   "softsign+log", "softsign+log sr", "softsign+log centered-bf16")}
QUICK_FORMATS = ("fp32", "bf16", "softsign+sqrt", "softsign+log")


# ---- running the grid ----


def _one_run(job):
    task, variant_name, policy_name, seed, lr_source = job
    started = time.perf_counter()
    result = task.run(rule_variants(lr_source)[variant_name], policies()[policy_name], seed)
    return dict(task=task.name, variant=variant_name, format=policy_name, seed=seed,
                seconds=time.perf_counter() - started, **result)


def _worker_init():
    torch.set_num_threads(1)  # one run per core: small models gain nothing from intra-op threads


def run_grid(tasks, variants, formats, seeds, jobs=1, progress=True, lr_source="benchmark"):
    """Every task x rule variant x format x seed; a list of run records. A format with overrides
    runs only on the rules they apply to (elsewhere it is its base format, run already)."""
    known, rules = policies(), rule_variants(lr_source)
    grid = [(task, v, f, s, lr_source) for task in tasks for v in variants for f in formats for s in seeds
            if not known[f].overrides or known[f].overridden([key for key, _ in rules[v].slots()])]
    records = []
    if jobs <= 1:
        for index, job in enumerate(grid):
            records.append(_one_run(job))
            if progress:
                _progress(index + 1, len(grid), records[-1])
        return records
    with concurrent.futures.ProcessPoolExecutor(jobs, initializer=_worker_init) as pool:
        for index, record in enumerate(pool.map(_one_run, grid)):
            records.append(record)
            if progress:
                _progress(index + 1, len(grid), record)
    return records


def _progress(done, total, r):
    metric = (f"acc {r['test_accuracy']:.1f}" if "test_accuracy" in r else f"tail {r['tail_loss']:.4f}")
    print(f"[{done}/{total}] {r['task']} {r['variant']} {r['format']} seed {r['seed']}: {metric}"
          f"{'' if r['finite'] else ' NON-FINITE'} ({r['seconds']:.1f} s)", file=sys.stderr, flush=True)


def summarize(records):
    """Per task x variant x format: the seed means, their comparison with fp32 states, and a
    verdict. Digits: mean test accuracy no more than DIGITS_ACCURACY_BAND points below fp32's and
    the mean last-epoch train loss not above the largest fp32 seed's; transformer: the mean loss of
    the last steps no more than TRANSFORMER_LOSS_BAND above fp32's (relative)."""
    groups = {}
    for r in records:
        groups.setdefault((r["task"], r["variant"], r["format"]), []).append(r)
    rows = []
    for (task, variant, fmt), runs in groups.items():
        base = groups.get((task, variant, "fp32"))
        row = dict(task=task, variant=variant, format=fmt, seeds=len(runs),
                   non_finite=sum(not r["finite"] for r in runs))
        if task == "digits":
            row.update(accuracy=statistics.fmean(r["test_accuracy"] for r in runs),
                       loss=statistics.fmean(r["last_epoch_loss"] for r in runs),
                       losses=[r["last_epoch_loss"] for r in runs])
            if base:
                row["accuracy_delta"] = row["accuracy"] - statistics.fmean(r["test_accuracy"] for r in base)
                row["fp32_loss_spread"] = [min(r["last_epoch_loss"] for r in base),
                                           max(r["last_epoch_loss"] for r in base)]
                row["passed"] = bool(row["non_finite"] == 0 and row["accuracy_delta"] >= -DIGITS_ACCURACY_BAND
                                     and row["loss"] <= row["fp32_loss_spread"][1])
        else:
            row.update(loss=statistics.fmean(r["tail_loss"] for r in runs), losses=[r["tail_loss"] for r in runs])
            if base:
                base_loss = statistics.fmean(r["tail_loss"] for r in base)
                row["loss_ratio"] = row["loss"] / base_loss
                row["passed"] = bool(row["non_finite"] == 0 and row["loss_ratio"] <= 1 + TRANSFORMER_LOSS_BAND)
        rows.append(row)
    return rows


def markdown_table(rows, task, variants, formats):
    """One row per format, one column per rule variant: the comparison with fp32 and the verdict."""
    cells = {(r["variant"], r["format"]): r for r in rows if r["task"] == task}
    head = "| format | " + " | ".join(variants) + " |"
    lines = [head, "|" + "---|" * (len(variants) + 1)]
    for fmt in formats:
        out = []
        for v in variants:
            r = cells.get((v, fmt))
            if r is None:
                out.append("")
                continue
            if task == "digits":
                text = f"{r['accuracy']:.2f}"
                if fmt != "fp32":
                    text += f" ({r['accuracy_delta']:+.2f}) L{r['loss']:.3f}"
                else:
                    text += f" L{r['fp32_loss_spread'][0]:.3f}-{r['fp32_loss_spread'][1]:.3f}"
            else:
                text = f"{r['loss']:.4f}" + ("" if fmt == "fp32" else f" ({100 * (r['loss_ratio'] - 1):+.2f}%)")
            if r["non_finite"]:
                text += f" **{r['non_finite']} NaN**"
            if fmt != "fp32":
                text += " ok" if r["passed"] else " **FAIL**"
            out.append(text)
        lines.append(f"| {fmt} | " + " | ".join(out) + " |")
    return "\n".join(lines)


# ---- the bf16 second-moment stall ----


def stall_formats():
    """The second-moment formats the stall demonstration follows, by name."""
    policies = state_codecs.candidate_policies()
    formats = {"fp32": state_codecs.FP32, "bf16": state_codecs.Bf16(), "bf16-sr": state_codecs.Bf16(True)}
    for policy in ("softsign+sqrt-nz", "softsign+sqrt-nz sr", "softsign+log", "softsign+log sr", "dynamic+udynamic",
                   "dynamic+udynamic sr"):
        formats[policies[policy].nonnegative.name] = policies[policy].nonnegative
    return formats


def stall_demo(steps=6000, drop_at=2000, elements=8192, beta2=0.999, seed=0, formats=None):
    """Adam's second moment v = beta2 v + (1 - beta2) g^2 on a stream of grads whose scale drops 10x
    at `drop_at` (so v should fall 100x), elements of scales spread over 3 decades, 256 to a row.
    Returns the geometric mean of v_stored / v_fp32 over the elements, per step, per format (names
    of `stall_formats()`; default all)."""
    generator = torch.Generator().manual_seed(seed)
    scales = 10 ** (-3 * torch.rand(elements // 256, 256, generator=generator))
    available = stall_formats()
    formats = {name: available[name] for name in (formats or available)}
    formats.setdefault("fp32", state_codecs.FP32)
    states = {name: torch.zeros_like(scales) for name in formats}
    rounding = torch.Generator().manual_seed(seed + 1)
    ratios = {name: [] for name in formats}
    for step in range(steps):
        g = torch.randn(scales.shape, generator=generator) * scales * (1.0 if step < drop_at else 0.1)
        for name, fmt in formats.items():
            v = states[name].mul_(beta2).add_(g * g, alpha=1 - beta2)
            if fmt is not state_codecs.FP32:
                v.copy_(state_codecs.roundtrip(fmt, v, rounding))
        reference = states["fp32"]
        for name in formats:
            ratio = states[name] / reference
            ratios[name].append(math.exp(ratio.clamp_min(1e-30).log().mean().item()))
    return dict(steps=steps, drop_at=drop_at, beta2=beta2, ratios=ratios)


# ---- codec time (plain torch on the CPU: a proxy for the kernels) ----


def codec_times(elements=1 << 20, repeats=15, seed=0):
    """Median seconds to encode and decode one fp32 state of `elements` (a [rows, 1024] tensor), for
    each distinct format of the candidates, measured interleaved (round-robin), with an fp32 copy
    as the yardstick."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(elements // 1024, 1024, generator=generator) * torch.rand(elements // 1024, 1024, generator=generator) ** 4
    values = {True: x, False: x * x}
    formats = {}
    for policy in state_codecs.candidate_policies().values():
        for signed, fmt in ((True, policy.signed), (False, policy.nonnegative)):
            formats.setdefault(fmt.name, (fmt, signed))
    times = {name: {"encode": [], "decode": []} for name in formats}
    copy = []
    rounding = torch.Generator().manual_seed(seed + 1)
    for _ in range(repeats):
        started = time.perf_counter()
        x.clone()
        copy.append(time.perf_counter() - started)
        for name, (fmt, signed) in formats.items():
            started = time.perf_counter()
            encoded = fmt.encode(values[signed], rounding)
            middle = time.perf_counter()
            fmt.decode(encoded, x.shape)
            times[name]["encode"].append(middle - started)
            times[name]["decode"].append(time.perf_counter() - middle)
    return dict(elements=elements, threads=torch.get_num_threads(), copy=statistics.median(copy),
                formats={name: {k: statistics.median(v) for k, v in t.items()} for name, t in times.items()})


# ---- bytes per param ----


def bytes_table(formats, shapes):
    """State bytes per param of each rule variant x format over `shapes`, from the encoded tensors."""
    count = sum(math.prod(s) for s in shapes)
    candidates = state_codecs.candidate_policies()
    return {v.name: {f: (fusedopt_state_bytes(v, FUSEDOPT_FORMATS[f], shapes) if f in FUSEDOPT_FORMATS
                         else state_codecs.state_bytes(candidates[f], shapes, v.slots())) / count
                     for f in formats}
            for v in rule_variants().values()}


# ---- plots ----


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _smooth(values, width):
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= width:
            total -= values[i - width]
        out.append(total / min(i + 1, width))
    return out


def plot_losses(records, task, variants, formats, path, smooth=20):
    """One panel per rule variant: each format's train loss (mean over seeds, running mean). The y
    axis spans fp32's curve (to twice its first loss), so a run that diverges leaves through the
    top; each panel's title names the formats with non-finite losses and on how many seeds."""
    plt = _pyplot()
    columns = min(3, len(variants))
    rows = math.ceil(len(variants) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(6 * columns, 3.6 * rows + 1.2), squeeze=False)
    colors = plt.get_cmap("tab20")
    lines = {}
    for ax, variant in zip(axes.flat, variants):
        ax.set_yscale("log")
        span, diverged = None, []
        for index, fmt in enumerate(formats):
            runs = [r for r in records if (r["task"], r["variant"], r["format"]) == (task, variant, fmt)]
            if not runs:
                continue
            losses = [r["losses"] for r in runs]
            length = max(map(len, losses))
            # a diverged run stops early: it stays at its last (non-finite) value for the mean
            mean = _smooth([statistics.fmean(run[min(i, len(run) - 1)] for run in losses) for i in range(length)], smooth)
            count = sum(not r["finite"] for r in runs)
            if count:
                diverged.append(f"{fmt} ({count}/{len(runs)})")
            lines[fmt], = ax.plot(mean, color=colors(index % 20), linewidth=2.0 if fmt == "fp32" else 1.0,
                                  linestyle="-" if index < 10 else "--")
            if fmt == "fp32":
                span = (0.7 * min(mean), 2 * mean[0])
        if span is not None and all(map(math.isfinite, span)):
            ax.set_ylim(*span)
        title = variant + ("\nnon-finite: " + ", ".join(diverged) if diverged else "")
        ax.set_title(title, fontsize=7 if diverged else 9, wrap=True)
        ax.set_xlabel("step", fontsize=8)
        ax.set_ylabel(f"train loss (mean of seeds, running mean of {smooth})", fontsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(variants):]:
        ax.set_visible(False)
    fig.legend(list(lines.values()), list(lines), loc="lower center", ncol=min(6, len(lines)), fontsize=7)
    fig.suptitle(f"{task}: train loss by state format", fontsize=10)
    height = fig.get_size_inches()[1]
    fig.tight_layout(rect=(0, (0.25 + 0.17 * math.ceil(len(lines) / 6)) / height, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_stall(stall, path):
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, ratios in stall["ratios"].items():
        ax.plot(ratios, label=name, linewidth=2.0 if name == "fp32" else 1.2)
    ax.axvline(stall["drop_at"], color="black", linestyle=":", linewidth=1)
    ax.set_yscale("log")
    ax.set_xlabel("step (grad scale drops 10x at the dotted line)")
    ax.set_ylabel("v stored / v fp32 (geometric mean)")
    ax.set_title(f"second moment at beta2 = {stall['beta2']}: round to nearest stalls", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- command line ----


def _choose(text, available, what):
    if not text or text == "all":
        return list(available)
    chosen = [name.strip() for name in text.split(",")]
    unknown = [name for name in chosen if name not in available]
    if unknown:
        raise SystemExit(f"unknown {what} {', '.join(unknown)}; choose from {', '.join(available)}")
    return chosen


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.state_accuracy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short runs, one seed (a smoke test)")
    parser.add_argument("--tasks", default="all", help=f"comma-separated: {', '.join(TASKS)}; or none")
    parser.add_argument("--rules", default="all", help="comma-separated rule variants (default: all)")
    parser.add_argument("--formats", default=None,
                        help="comma-separated candidate formats, or all (default: all on digits, the leading ones on "
                             "the transformer; with --quick: " + ",".join(QUICK_FORMATS) + ")")
    parser.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 (default 3; 1 with --quick)")
    parser.add_argument("--lr", choices=LR_SOURCES, default="benchmark",
                        help="each rule's lr: its registry benchmark variant's (torch.optim's default; the default) "
                             "or the registry's default_lr")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="worker processes")
    parser.add_argument("--no-stall", action="store_true", help="skip the bf16 stall demonstration")
    parser.add_argument("--no-codec-time", action="store_true", help="skip the codec timing")
    parser.add_argument("--out", default="bench/out/state_accuracy", help="folder for JSON, tables and plots")
    args = parser.parse_args(argv)

    variants = _choose(args.rules, rule_variants(args.lr), "rule variant")
    candidates = policies()
    task_names = [] if args.tasks == "none" else _choose(args.tasks, TASKS, "task")
    seeds = range(args.seeds if args.seeds is not None else (1 if args.quick else 3))
    tasks = [TASKS[name](**(QUICK[name] if args.quick else {})) for name in task_names]
    task_formats = {}
    for name in task_names:
        if args.formats is not None:
            chosen = _choose(args.formats, candidates, "format")
        elif args.quick:
            chosen = list(QUICK_FORMATS)
        else:
            chosen = list(DEFAULT_FORMATS[name] or candidates)
        task_formats[name] = ["fp32"] + [f for f in chosen if f != "fp32"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = dict(command=" ".join(["python -m bench.state_accuracy", *(argv if argv is not None else sys.argv[1:])]),
                  torch=torch.__version__, date=time.strftime("%Y-%m-%d %H:%M"),
                  load_average=os.getloadavg(), tasks={t.name: vars(t) for t in tasks},
                  variants={v: rule_variants(args.lr)[v].options for v in variants}, formats=task_formats, seeds=list(seeds))
    report = [f"# Optimizer state formats: accuracy against fp32 states\n\n`{result['command']}` "
              f"({result['date']}, torch {result['torch']}, load {result['load_average'][0]:.1f})\n",
              "Rules (the registry's options, lr from its " + args.lr + "): "
              + "; ".join(f"{v} {result['variants'][v]}" for v in variants) + "\n"]

    started = time.perf_counter()
    records = []
    for task in tasks:
        records += run_grid([task], variants, task_formats[task.name], seeds, args.jobs, lr_source=args.lr)
    rows = summarize(records)
    result.update(records=records, rows=rows, seconds=time.perf_counter() - started)
    for task in tasks:
        what = ("test accuracy % (its difference from fp32 states') and L the last epoch's train loss; fp32: "
                "L its range over seeds" if task.name == "digits" else
                f"mean train loss of the last {task.tail} steps (its difference from fp32 states')")
        report.append(f"## {task.name}: {what}; means over {len(seeds)} seed(s)\n")
        report.append(markdown_table(rows, task.name, variants, task_formats[task.name]) + "\n")
        plot_losses(records, task.name, variants, task_formats[task.name], out / f"loss_{task.name}.png",
                    smooth=20 if task.name == "transformer" else 5)
    failed = [r for r in rows if r["format"] != "fp32" and not r.get("passed", True)]
    report.append(f"Failed: {len(failed)} of {sum(r['format'] != 'fp32' for r in rows)} (task, rule, format) cells; "
                  f"with non-finite losses: {', '.join(sorted({r['format'] for r in rows if r['non_finite']})) or 'none'}\n")

    if not args.no_stall:
        stall = stall_demo(**(dict(steps=1200, drop_at=400, elements=2048) if args.quick else {}))
        result["stall"] = stall
        plot_stall(stall, out / "stall_v.png")
        report.append(f"## v at beta2 = {stall['beta2']} after the grad scale drops 10x (v should fall 100x): "
                      "geometric mean of v_stored / v_fp32\n")
        report.append("| format | at the drop | end |\n|---|---|---|")
        for name, ratios in stall["ratios"].items():
            report.append(f"| {name} | {ratios[stall['drop_at'] - 1]:.3f} | {ratios[-1]:.3f} |")
        report.append("")

    if not args.no_codec_time:
        timing = codec_times(elements=1 << 16 if args.quick else 1 << 22, repeats=3 if args.quick else 15)
        result["codec_time"] = timing
        report.append(f"## Encode + decode of one {timing['elements']:,}-element fp32 state, plain torch on this CPU "
                      f"({timing['threads']} threads; a proxy, not the kernels): median ms; fp32 copy "
                      f"{1e3 * timing['copy']:.2f} ms\n")
        report.append("| format | encode | decode |\n|---|---|---|")
        for name, t in timing["formats"].items():
            report.append(f"| {name} | {1e3 * t['encode']:.2f} | {1e3 * t['decode']:.2f} |")
        report.append("")

    from bench.cases import gpt2_shapes

    shapes = gpt2_shapes()
    table = bytes_table(list(candidates), shapes)
    result["state_bytes_gpt2"] = table
    report.append("## State bytes per param, GPT-2 small's shapes (1-D params keep fp32 states under blockwise "
                  "formats), from the encoded tensors\n")
    report.append("| format | " + " | ".join(table) + " |\n|" + "---|" * (len(table) + 1))
    for fmt in candidates:
        report.append(f"| {fmt} | " + " | ".join(f"{table[v][fmt]:.3f}" for v in table) + " |")

    (out / "state_accuracy.json").write_text(json.dumps(result, indent=1))
    (out / "state_accuracy.md").write_text("\n".join(report) + "\n")
    print("\n".join(report))
    print(f"\n{out}/: state_accuracy.json, state_accuracy.md, loss_*.png, stall_v.png "
          f"({result['seconds']:.0f} s of runs)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
