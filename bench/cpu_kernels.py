"""The numba CPU kernels against torch on the CPU, each comparison side by side on copies of the
same values, interleaved, medians; then the targets, each with the numbers behind it.

- rules: each rule's step against torch's fastest CPU implementation (fused=True where torch has
  it, else foreach; fusedopt's plain-torch reference for a rule torch.optim has not), on sets of
  many small tensors, medium tensors and one large tensor;
- small models: the step inside a training loop (forward and backward between steps, so caches
  are as a real loop leaves them) of small MLPs (a few tensors, 10k-1M params: the shapes of an
  MLP on scikit-learn's digits, 301k params in 6 tensors, and a 10k one) on one thread, where a
  step's fixed cost (the Python between step() and the kernel, the kernel's start) shows;
- clip: opt.clip_grad_norm_ against torch.nn.utils.clip_grad_norm_(foreach=True), and clip + step
  (and max_grad_norm=) against torch's clip + AdamW(fused=True), on the benchmark's CPU parameter
  sets (bench.cases) and a ~50-tensor small transformer, the grads refilled (untimed) before each
  iteration, since torch's clip rewrites them;
- the first step's latency in a new process, with numba's cache cold and warm;
- formats: AdamW with its states in fp32, bf16 and 8-bit codes (to nearest, and stochastically
  rounded) on matrices whose states hold codes, and the target of 8-bit states no slower than fp32.

    python -m bench.cpu_kernels [--quick] [--sections rules,small,clip,first,formats] [--threads N]
"""
import argparse
import functools
import inspect
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch

import fusedopt
from fusedopt.registry import RULES as REGISTRY

from . import cases

SETS = {"2000 x 4K": [4096] * 2000, "150 x 50K": [50_000] * 150, "1 x 8M": [8_000_000]}
SECTIONS = ("rules", "small", "clip", "first", "formats")


def _fastest(twin):
    """torch's fastest CPU implementation of a rule: fused=True where the class takes it, else foreach."""
    return "fused" if "fused" in inspect.signature(twin).parameters else "foreach"


# Each benchmark variant of the registry: (fusedopt's class, torch's, options, torch's implementation);
# a rule torch.optim has not is timed against fusedopt's plain-torch reference.
RULES = {variant.name: (info.optimizer, info.twin or functools.partial(info.optimizer, backend="torch"),
                        variant.options, _fastest(info.twin) if info.twin else "reference")
         for info in REGISTRY.values() for variant in info.benchmarks}
TWINS = {variant.name: info.twin for info in REGISTRY.values() for variant in info.benchmarks}


def torch_options(rule):
    """The switch of torch's fastest implementation of `rule` ({} for the reference)."""
    flavour = RULES[rule][3]
    return {} if flavour == "reference" else {flavour: True}


def optimizers(rule, sizes):
    """(fusedopt on the CPU kernels, torch's fastest) on separate copies of the same params."""
    ours, theirs, options, _ = RULES[rule]
    generator = torch.Generator().manual_seed(0)
    params = [torch.randn(n, generator=generator) for n in sizes]
    made = []
    for factory, extra in ((ours, {"backend": "numba"}), (theirs, torch_options(rule))):
        copies = [p.clone().requires_grad_() for p in params]
        for p in copies:
            p.grad = torch.randn(p.shape, generator=generator) * 1e-3
        made.append(factory(copies, **{"lr": 1e-3, **options, **extra}))
    return made


def interleaved_ms(fns, repeats, setup=None, seed=0):
    """{name: median ms} of each function, timed once per round, in an order shuffled every round
    (what ran just before, and so what is in the caches, averages out); `setup(name)` runs
    untimed before each call."""
    order = random.Random(seed)
    times = {name: [] for name in fns}
    for _ in range(repeats):
        names = list(fns)
        order.shuffle(names)
        for name in names:
            if setup is not None:
                setup(name)
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def median_ms(fn_pairs, repeats):
    """[median ms] of each function, interleaved (the rules section's order: ours, then torch's)."""
    ms = interleaved_ms(dict(enumerate(fn_pairs)), repeats)
    return [ms[index] for index in range(len(fn_pairs))]


def target(name, required, ratio, why):
    return {"target": name, "required": f">= {required:.2f}x", "measured": f"{ratio:.2f}x", "met": ratio >= required,
            "why": why}


# ---- rules: each rule's step on the three sets ----

def rules_section(rules, repeats):
    print("| rule | set | fusedopt numba ms | torch ms (impl) | torch / fusedopt |")
    print("|---|---|---|---|---|")
    for rule in rules:
        for name, sizes in SETS.items():
            ours, theirs = optimizers(rule, sizes)
            ours.step(), theirs.step()  # compile, tables, state
            mine, torch_ms = median_ms([ours.step, theirs.step], repeats)
            print(f"| {rule} | {name} | {mine:.3f} | {torch_ms:.3f} ({RULES[rule][3]}) | {torch_ms / mine:.2f}x |",
                  flush=True)


# ---- small models: the step inside a training loop ----

# (input width, hidden widths, classes): Linear layers with ReLU between them
SMALL_MODELS = {"digits MLP 64-512-512-10": (64, (512, 512), 10), "MLP 64-96-32-10": (64, (96, 32), 10)}
SMALL_BATCH = 64


def small_model(widths):
    inputs, hidden, classes = widths
    sizes = [inputs, *hidden, classes]
    layers = []
    for index, (fan_in, fan_out) in enumerate(zip(sizes, sizes[1:])):
        layers += [torch.nn.Linear(fan_in, fan_out)] + ([torch.nn.ReLU()] if index < len(sizes) - 2 else [])
    return torch.nn.Sequential(*layers)


def small_section(rules, repeats, threads):
    """The step of each rule on each small model, timed inside a training loop: each
    implementation steps its own copy of the model after its own forward and backward of the same
    batch, the implementations in a shuffled order each iteration."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    targets = []
    try:
        print(f"step µs inside a training loop (batch {SMALL_BATCH}), {threads} thread(s)\n")
        print("| model | rule | fusedopt numba µs | torch fused µs | torch foreach µs | fastest torch / fusedopt |")
        print("|---|---|---|---|---|---|")
        for model_name, widths in SMALL_MODELS.items():
            generator = torch.Generator().manual_seed(0)
            x = torch.randn(SMALL_BATCH, widths[0], generator=generator)
            y = torch.randint(widths[2], (SMALL_BATCH,), generator=generator)
            n_params = sum(p.numel() for p in small_model(widths).parameters())
            for rule in rules:
                ours, _, options, _ = RULES[rule]
                options = {"lr": 1e-3, **options}
                makers = {"fusedopt": lambda params: ours(params, **options, backend="numba")}
                twin = TWINS[rule]
                for flavour in ("fused", "foreach"):
                    if twin is not None and (flavour != "fused" or _fastest(twin) == "fused"):
                        makers[flavour] = lambda params, flavour=flavour: twin(params, **options, **{flavour: True})
                runs = {}
                for name, make in makers.items():
                    torch.manual_seed(0)
                    model = small_model(widths)
                    runs[name] = (model, make(model.parameters()))

                def forward_backward(name):
                    model, optimizer = runs[name]
                    optimizer.zero_grad()
                    torch.nn.functional.cross_entropy(model(x), y).backward()

                fns = {name: optimizer.step for name, (_, optimizer) in runs.items()}
                interleaved_ms(fns, 3, setup=forward_backward)  # state, tables, kernels
                us = {name: ms * 1e3 for name, ms in interleaved_ms(fns, repeats, setup=forward_backward).items()}
                torch_us = {name: value for name, value in us.items() if name != "fusedopt"}
                cell = lambda name: f"{us[name]:.1f}" if name in us else "–"
                if torch_us:
                    best = min(torch_us, key=torch_us.get)
                    ratio = torch_us[best] / us["fusedopt"]
                    targets.append(target(f"small model, {rule}, {model_name} ({n_params / 1e3:.0f}k params): step "
                                          "faster than torch's fastest", 1.0, ratio,
                                          f"fusedopt {us['fusedopt']:.1f} µs, torch {best} {torch_us[best]:.1f} µs, "
                                          f"{threads} thread(s), in a training loop"))
                print(f"| {model_name} ({n_params / 1e3:.0f}k) | {rule} | {cell('fusedopt')} | {cell('fused')} | "
                      f"{cell('foreach')} | " + (f"{ratio:.2f}x |" if torch_us else "– |"), flush=True)
    finally:
        torch.set_num_threads(previous)
    return targets


# ---- clip: clip_grad_norm_, and clip + step ----

def transformer_shapes(vocab=512, d=128, layers=4, seq=64):
    """A small transformer's parameter shapes (embedding, positions, pre-norm encoder layers, final
    norm, head): 54 tensors, 0.93M params."""
    layer = [(3 * d, d), (3 * d,), (d, d), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,), (d,), (d,), (d,), (d,)]
    return tuple([(vocab, d), (seq, d)] + layer * layers + [(d,), (d,), (vocab, d), (vocab,)])


def clip_sets(scale):
    sets = [cases.ParamSet("transformer", transformer_shapes(), torch.float32, "small transformer")]
    return sets + list(cases.param_sets(scale).values())


CLIP_IMPLS = ("torch clip", "fusedopt clip", "torch clip + fused step", "fusedopt clip + step",
              "fusedopt max_grad_norm step")


def clip_cases(values, grads):
    """{name: (params, call)} of every implementation, each on its own params."""
    made = {}

    def fresh():
        return cases.attach(values, [g.clone() for g in grads])

    params = fresh()
    made["torch clip"] = (params, lambda p=params: torch.nn.utils.clip_grad_norm_(p, 1.0, foreach=True))
    params = fresh()
    optimizer = fusedopt.AdamW(params, lr=1e-3, backend="numba")
    made["fusedopt clip"] = (params, lambda o=optimizer: o.clip_grad_norm_(1.0))
    params = fresh()
    optimizer = torch.optim.AdamW(params, lr=1e-3, fused=True)
    made["torch clip + fused step"] = (
        params, lambda p=params, o=optimizer: (torch.nn.utils.clip_grad_norm_(p, 1.0, foreach=True), o.step()))
    params = fresh()
    optimizer = fusedopt.AdamW(params, lr=1e-3, backend="numba")
    made["fusedopt clip + step"] = (params, lambda o=optimizer: (o.clip_grad_norm_(1.0), o.step()))
    params = fresh()
    optimizer = fusedopt.AdamW(params, lr=1e-3, backend="numba", max_grad_norm=1.0)
    made["fusedopt max_grad_norm step"] = (params, optimizer.step)
    return made


def clip_section(sets, repeats):
    targets = []
    print("| set | " + " | ".join(f"{name} ms" for name in CLIP_IMPLS) + " | clip: torch / fusedopt | "
          "clip + step: torch / fusedopt (max_grad_norm) |")
    print("|---|" + "---|" * (len(CLIP_IMPLS) + 2))
    for pset in sets:
        values, grads = pset.make(torch.device("cpu"))
        made = clip_cases(values, grads)

        def refill(name):
            torch._foreach_copy_([p.grad for p in made[name][0]], grads)

        fns = {name: call for name, (_, call) in made.items()}
        interleaved_ms(fns, 2, setup=refill)  # state, tables, kernels
        ms = interleaved_ms(fns, repeats, setup=refill)
        clip = ms["torch clip"] / ms["fusedopt clip"]
        step = ms["torch clip + fused step"] / ms["fusedopt clip + step"]
        every_step = ms["torch clip + fused step"] / ms["fusedopt max_grad_norm step"]
        label = f"{pset.name} ({len(pset.shapes)} tensors, {pset.n_params / 1e6:.2f}M, {str(pset.dtype)[6:]})"
        print(f"| {label} | " + " | ".join(f"{ms[name]:.3f}" for name in CLIP_IMPLS)
              + f" | {clip:.2f}x | {step:.2f}x ({every_step:.2f}x) |", flush=True)
        targets += [
            target(f"clip, {label}: opt.clip_grad_norm_ no slower than torch's clip_grad_norm_(foreach=True)", 1.0,
                   clip, f"fusedopt {ms['fusedopt clip']:.3f} ms, torch {ms['torch clip']:.3f} ms"),
            target(f"clip + step, {label}: faster than torch's clip + AdamW(fused=True)", 1.2, step,
                   f"fusedopt {ms['fusedopt clip + step']:.3f} ms, torch {ms['torch clip + fused step']:.3f} ms"),
            target(f"max_grad_norm step, {label}: faster than torch's clip + AdamW(fused=True)", 1.2, every_step,
                   f"fusedopt {ms['fusedopt max_grad_norm step']:.3f} ms, torch {ms['torch clip + fused step']:.3f} ms")]
    return targets


# ---- the first step in a new process ----

FIRST_STEP = r"""
import time, torch, fusedopt
p = torch.randn(1000, requires_grad=True); p.grad = torch.randn(1000)
opt = getattr(fusedopt, "{cls}")([p], lr=1e-3, backend="numba")
start = time.perf_counter(); opt.step(); print(time.perf_counter() - start)
"""


def first_step_seconds(cls, cache_dir):
    env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir)
    out = subprocess.run([sys.executable, "-c", FIRST_STEP.format(cls=cls)], env=env, capture_output=True,
                         text=True, check=True)
    return float(out.stdout.split()[-1])


def first_section():
    cache = tempfile.mkdtemp(prefix="fusedopt-numba-cache-")
    try:
        print("first step in a new process (1,000 fp32 elements; compile or cache load included):")
        for cls in ("Adam", "SGD"):
            cold = first_step_seconds(cls, cache)
            warm = first_step_seconds(cls, cache)
            print(f"- {cls}: cold cache {cold:.2f} s, from the cache {warm:.2f} s")
    finally:
        shutil.rmtree(cache, ignore_errors=True)


# ---- formats: AdamW's step with its states in each storage format ----

# 2-D params, rows of whole 64-element blocks, so that "8bit" stores codes (fusedopt.formats)
FORMAT_SETS = {"1 x 1024x2048": [(1024, 2048)], "48 x 256x512": [(256, 512)] * 48, "1 x 4096x4096": [(4096, 4096)]}
QUICK_FORMAT_SETS = {"1 x 256x512": [(256, 512)], "8 x 64x128": [(64, 128)] * 8}
STATE_FORMATS = {"fp32": {}, "bf16": {"state_precision": "bf16"}, "8-bit": {"state_precision": "8bit"},
                 "8-bit stochastic": {"state_precision": "8bit", "state_rounding": "stochastic"}}


def formats_section(sets, repeats):
    print("| set | " + " | ".join(f"{name} ms" for name in STATE_FORMATS) + " | fp32 / 8-bit |")
    print("|---|" + "---|" * (len(STATE_FORMATS) + 1))
    targets = []
    for set_name, shapes in sets.items():
        generator = torch.Generator().manual_seed(0)
        values = [(torch.randn(shape, generator=generator), torch.randn(shape, generator=generator) * 1e-3)
                  for shape in shapes]
        steps = {}
        for name, options in STATE_FORMATS.items():
            params = [p.clone().requires_grad_() for p, _ in values]
            for param, (_, grad) in zip(params, values):
                param.grad = grad.clone()
            optimizer = fusedopt.AdamW(params, lr=1e-3, weight_decay=0.01, backend="numba", **options)
            optimizer.step()  # compile, tables, state
            stored = {optimizer.state[p]["exp_avg"].dtype for p in params}
            if options.get("state_precision") == "8bit" and stored != {torch.int8}:
                raise RuntimeError(f"{set_name}: 8-bit states were stored as {stored}, not codes")
            steps[name] = optimizer.step
        ms = interleaved_ms(steps, repeats)
        ratio = ms["fp32"] / ms["8-bit"]
        print(f"| {set_name} | " + " | ".join(f"{ms[name]:.3f}" for name in STATE_FORMATS) + f" | {ratio:.2f}x |",
              flush=True)
        targets.append(target(f"{set_name}: AdamW with 8-bit states no slower than with fp32 states", 1.0, ratio,
                              f"8-bit {ms['8-bit']:.3f} ms, fp32 {ms['fp32']:.3f} ms, {torch.get_num_threads()} "
                              f"thread(s)"))
    return targets


def targets_table(targets):
    lines = ["| target | required | measured | result | measurements |", "|---|---|---|---|---|"]
    lines += [f"| {t['target']} | {t['required']} | {t['measured']} | {'met' if t['met'] else '**missed**'} | "
              f"{t['why']} |" for t in targets]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="fewer repeats, and the clip and formats sections on smaller parameter sets")
    parser.add_argument("--rules", default=",".join(RULES))
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)}")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch's (and so numba's) threads for the rules and clip sections (default: as set)")
    parser.add_argument("--small-threads", type=int, default=1, help="threads for the small-model section (1)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per comparison")
    args = parser.parse_args(argv)
    sections = [s.strip() for s in args.sections.split(",")]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise SystemExit(f"unknown sections {', '.join(sorted(unknown))}; choose from {', '.join(SECTIONS)}")
    rules = args.rules.split(",")
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (11 if args.quick else 31)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, load average "
          f"{load:.1f} at the start; fusedopt backend {fusedopt.backends.backend_name('numba', 'cpu')}; median of "
          f"{repeats}, interleaved\n")
    targets = []
    if "rules" in sections:
        rules_section(rules, repeats)
        print()
    if "small" in sections:
        targets += small_section(rules, repeats * 5, args.small_threads)  # µs steps: more rounds
        print()
    if "clip" in sections:
        scale = cases.SIZES["tiny" if args.quick else "small"]
        targets += clip_section(clip_sets(scale), repeats)
        print()
    if "first" in sections:
        first_section()
        print()
    if "formats" in sections:
        targets += formats_section(QUICK_FORMAT_SETS if args.quick else FORMAT_SETS, repeats)
        print()
    if targets:
        print("## Targets\n\n" + targets_table(targets))
        missed = [t for t in targets if not t["met"]]
        print(f"\n{len(targets) - len(missed)} of {len(targets)} targets met" + (
            "; timings on a busy machine vary: compare rows of one run" if missed else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
