"""Command line: ``python -m bench [step|epilogue|batch|all] [options]``; see ``--help``."""

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field

import torch

from fusedopt.backends import BACKENDS, backend_name, resolve_backend

from . import batch as batch_mod
from . import cases, noise, report
from . import epilogue as epilogue_mod
from . import step as step_mod
from .env import cache_bytes, describe, resolve_device
from .timing import copy_bandwidth

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")


def build_parser():
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Optimizer step time against torch.optim's implementations, the AMP + clipping + AdamW "
                    "epilogue against torch's composition, and what a batch size costs and learns on real data, on "
                    "CUDA when present, else the CPU. The markdown report (a summary table first) on stdout; JSON, "
                    "markdown and PNG plots in --out.")
    p.add_argument("command", nargs="?", default="all", choices=["step", "epilogue", "batch", "all"],
                   help="step: optimizer step benchmark; epilogue: GradScaler unscale + grad-norm clip + AdamW "
                        "step, fusedopt against torch's composition; batch: batch-size sweep (time per update and "
                        "per epoch, loss and test accuracy); all: the three (default)")
    p.add_argument("--quick", action="store_true",
                   help="small sizes, few repeats, no torch.compile rows, the fp32 parameter sets, a short "
                        "batch sweep: all three benchmarks in about a minute on a 2-core CPU; indicative only")
    p.add_argument("--size", default="auto",
                   help="tiny, small, medium, full or a fraction of full size (default: full on CUDA, small on "
                        "CPU; with --quick medium on CUDA, tiny on CPU)")
    p.add_argument("--out", default=DEFAULT_OUT, help="results folder (default: bench/out)")
    p.add_argument("--device", default="auto", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--rules", default="all", help=f"comma list of {','.join(cases.RULES)} (default: all)")
    p.add_argument("--impls", default="all", help=f"comma list of {','.join(cases.IMPLS)}")
    p.add_argument("--sets", default="auto", help="step and epilogue parameter sets: comma list of large,gpt2,"
                   "many-small,gpt2-bf16, or all (default: all; with --quick all but gpt2-bf16, whose CPU kernels "
                   "take the longest to compile on a first run)")
    p.add_argument("--compile-sets", default="auto",
                   help="parameter sets that get torch.compile rows: comma list, all or none (default: gpt2 on "
                        "CUDA, large on CPU; none with --quick)")
    p.add_argument("--tasks", default="auto", help=f"batch sweep tasks, comma list of {','.join(batch_mod.TASKS)} "
                   "(default: both; with --quick digits)")
    p.add_argument("--batch-rules", default="auto",
                   help="batch sweep rules (default: each registry rule's last benchmark variant; with --quick the "
                        "first two of those)")
    p.add_argument("--batch-sizes", default="auto",
                   help="comma list; `all` is the training set's size (default: powers of 4 from 1, and all; with "
                        "--quick 4, 32, 256 and all)")
    p.add_argument("--epochs", type=int, default=None,
                   help="batch sweep: epochs each run trains (default 4; --quick 2)")
    p.add_argument("--updates", type=int, default=None,
                   help="batch sweep: the fixed number of updates for the second snapshot (default 100; --quick 50)")
    p.add_argument("--ref-batch", type=int, default=32,
                   help="batch sweep: lr(B) = the registry rule's default_lr x B / this (default 32)")
    p.add_argument("--lr-scaling", default="linear", choices=tuple(batch_mod.LR_SCALINGS),
                   help="batch sweep: lr x B / ref-batch (linear, the default) or x sqrt(B / ref-batch)")
    p.add_argument("--threads", default="auto",
                   help="batch sweep CPU thread counts, comma list (default: torch's count and 1)")
    p.add_argument("--seed", type=int, default=0, help="batch sweep: initial weights and data order")
    p.add_argument("--max-train", type=int, default=None, help="batch sweep: use at most this many training samples")
    p.add_argument("--repeats", type=int, default=None, help="timing windows per row")
    p.add_argument("--fusedopt-backend", default=None, choices=BACKENDS,
                   help="fusedopt's backend= (default: $FUSEDOPT_BACKEND, else auto); the report names what ran")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds; cases that would start after it are reported as skipped")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


class _NoProgress:
    def update(self, n=1):
        pass

    def set_postfix_str(self, *args, **kwargs):
        pass

    def close(self):
        pass


def make_progress(total, disable):
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoProgress()
    return _NoProgress() if disable else tqdm(total=total, desc="bench", unit="case", file=sys.stderr,
                                              dynamic_ncols=True)


def status(text):
    """A progress line on stderr before the progress bar starts (imports, kernel compilation)."""
    print(f"bench: {text}", file=sys.stderr, flush=True)


def write_json(path, data):
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, default=str)
        f.write("\n")
    os.replace(path + ".tmp", path)


def write_text(path, text):
    with open(path, "w", encoding="utf-8") as f:
        f.write(text.rstrip() + "\n")


@dataclass
class Run:
    """What one invocation measures: the parsed arguments and everything resolved from them, the
    results as they fill in, and the files written."""
    args: argparse.Namespace
    argv: list
    device: torch.device
    rules: list
    impls: list
    backend: str
    sets: list
    do: dict
    env: dict
    repeats: int
    window_s: float
    common: dict
    started: float
    results: dict = field(default_factory=dict)
    paths: dict = field(default_factory=dict)
    plans: dict = field(default_factory=dict)  # benchmark -> config
    rows: dict = field(default_factory=dict)  # benchmark -> planned rows
    copy: dict = None

    @property
    def cuda(self):
        return self.device.type == "cuda"

    def deadline(self, fraction):
        return None if self.args.time_budget is None else self.started + self.args.time_budget * fraction

    def saver(self, name):
        self.paths[name] = os.path.join(self.args.out, f"{name}.json")
        return lambda *_: write_json(self.paths[name], self.results[name])


def parse(argv):
    """The Run for `argv`, or an exit status when the arguments cannot run here."""
    args = build_parser().parse_args(argv)
    started = time.monotonic()
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    size_name, scale = cases.resolve_size(args.size, device, args.quick)
    rules = cases.choose(args.rules.replace("-", "_"), cases.RULES, "rule")
    impls = cases.choose(args.impls, {i: i for i in cases.IMPLS}, "implementation")
    backend = resolve_backend(args.fusedopt_backend)
    try:
        backend_name(backend, device)
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    do = {name: args.command in (name, "all") for name in ("step", "epilogue", "batch")}
    sets = cases.choose("large,gpt2,many-small" if args.sets == "auto" and args.quick else args.sets.replace(
        "auto", "all"), cases.param_sets(scale), "parameter set")
    env = describe(device)
    env.update(command="python -m bench " + " ".join(argv), quick=args.quick)
    repeats = args.repeats or ((7 if cuda else 3) if args.quick else (15 if cuda else 5))
    return Run(args=args, argv=argv, device=device, rules=rules, impls=impls, backend=backend, sets=sets, do=do,
               env=env, repeats=repeats, window_s=(0.01 if cuda else 0.05) / (5 if args.quick else 1),
               common={"size": size_name, "scale": scale, "quick": args.quick, "repeats": repeats,
                       "fusedopt_backend": backend, "fusedopt_runs": backend_name(backend, device)},
               started=started)


# ---------------------------------------------------------------- plans

def plan_step(run):
    args, names = run.args, {s.name for s in run.sets}
    compile_sets = {"auto": {"gpt2"} if run.cuda else {"large"}, "none": set(), "all": names}.get(
        args.compile_sets, {s.strip() for s in args.compile_sets.split(",")})
    if compile_sets - names:
        raise SystemExit(f"--compile-sets names sets not in this run: {', '.join(sorted(compile_sets - names))}")
    cfg = step_mod.StepConfig(device=run.device, sets=run.sets, rules=run.rules, impls=run.impls,
                              compile_sets=compile_sets, quick=args.quick, repeats=run.repeats, window_s=run.window_s,
                              host_repeats=10 if args.quick else 20, warmup=2 if run.cuda else 1,
                              fusedopt_backend=run.backend, cache_bytes=cache_bytes(run.device) if run.cuda else None)
    run.plans["step"], run.rows["step"] = cfg, step_mod.planned_rows(cfg)


def plan_epilogue(run):
    cfg = epilogue_mod.EpilogueConfig(device=run.device, sets=run.sets, repeats=run.repeats, window_s=run.window_s,
                                      warmup=2 if run.cuda else 1, fusedopt_backend=run.backend)
    run.plans["epilogue"], run.rows["epilogue"] = cfg, epilogue_mod.planned_rows(cfg)


def batch_rules(text, quick):
    """--batch-rules: auto takes each registry rule's last benchmark variant (the one with state,
    where a rule has several) that torch.optim has a twin for (the sweep races it), the first two
    of them with --quick; all, every variant with a twin; a rule without one is refused."""
    if text != "auto":
        raced = {name: rule for name, rule in cases.RULES.items() if rule.info.twin is not None}
        if text == "all":
            return list(raced.values())
        chosen = cases.choose(text.replace("-", "_"), cases.RULES, "rule")
        alone = [rule.name for rule in chosen if rule.name not in raced]
        if alone:
            raise SystemExit(f"--batch-rules {', '.join(alone)}: the batch sweep races torch.optim's implementations, "
                             f"and torch.optim has no {', '.join(alone)}; choose from {', '.join(raced)}")
        return chosen
    last = {}
    for rule in cases.RULES.values():
        if rule.info.twin is not None:
            last[rule.info.name] = rule
    chosen = list(last.values())
    return chosen[:2] if quick else chosen


def plan_batch(run):
    args = run.args
    names = cases.choose(("digits" if args.quick else "all") if args.tasks == "auto" else args.tasks,
                         {t: t for t in batch_mod.TASKS}, "task")
    preset = batch_mod.preset_for_scale(run.common["scale"])
    status(f"loading the batch sweep's data ({', '.join(names)})")
    loaded = {n: batch_mod.tasks.load(n, preset, args.max_train).to(run.device) for n in names}
    spec = None if args.batch_sizes == "auto" else args.batch_sizes.split(",")
    threads = None if args.threads == "auto" else sorted({int(t) for t in args.threads.split(",")}, reverse=True)
    run.plans["batch"] = batch_mod.BatchConfig(
        device=run.device, tasks=names, preset=preset, rules=batch_rules(args.batch_rules, args.quick),
        batch_sizes={n: batch_mod.resolve_batch_sizes(spec, t.n_train, args.quick) for n, t in loaded.items()},
        loaded=loaded, epochs=args.epochs or (2 if args.quick else 4),
        updates=args.updates or (50 if args.quick else 100),
        ref_batch=args.ref_batch, lr_scaling=args.lr_scaling, threads=threads if run.device.type == "cpu" else None,
        repeats=args.repeats or ((5 if run.cuda else 3) if args.quick else (7 if run.cuda else 5)),
        window_s=(0.02 if run.cuda else 0.03) / (2 if args.quick else 1), with_fusedopt="fusedopt" in run.impls,
        fusedopt_backend=run.backend, seed=args.seed)


def case_count(run):
    batch = run.plans.get("batch")
    return (sum(r["status"] == "pending" for r in run.rows.get("step", ()))
            + len(run.rows.get("epilogue", ()))
            + (len(batch.rules) * sum(len(s) for s in batch.batch_sizes.values()) if batch else 0))


# ---------------------------------------------------------------- running each benchmark

def measure_copy(run):
    run.copy = copy_bandwidth(run.device, (512 if run.cuda else 64) * 2**20 // (2 if run.args.quick else 1),
                              repeats=run.repeats, window_s=run.window_s)


def run_step(run, progress):
    """All step rows but the compiled ones, then the copy measured again (the yardstick is the
    better of the two: clocks, neighbours)."""
    cfg, rows = run.plans["step"], run.rows["step"]
    run.results["step"] = {"benchmark": "step", "complete": False, "env": run.env,
                           "config": {**run.common, "rules": [r.name for r in run.rules], "impls": run.impls,
                                      "sets": [s.name for s in run.sets], "compile_sets": sorted(cfg.compile_sets),
                                      "window_s": run.window_s, "host_repeats": cfg.host_repeats},
                           "copy": run.copy, "param_sets": [s.summary() for s in run.sets], "rows": rows, "notes": {}}
    cfg.deadline = run.deadline(0.5 if run.do["batch"] else (0.7 if run.do["epilogue"] else 0.8))
    step_mod.run(cfg, rows, phase="main", progress=progress, on_progress=run.saver("step"))
    again = copy_bandwidth(run.device, run.copy["buffer_bytes"], repeats=run.repeats, window_s=run.window_s)
    measured = [run.copy["bytes_per_s"], again["bytes_per_s"]]
    if again["bytes_per_s"] > run.copy["bytes_per_s"]:
        run.copy.update(again)
    run.copy["measurements_bytes_per_s"] = measured
    step_mod.set_copy_fractions(rows, run.copy["bytes_per_s"])


def run_epilogue(run, progress):
    cfg, rows = run.plans["epilogue"], run.rows["epilogue"]
    run.results["epilogue"] = {
        "benchmark": "epilogue", "complete": False, "env": run.env,
        "config": {**run.common, "rule": epilogue_mod.RULE.name, "impls": list(epilogue_mod.IMPLS),
                   "sets": [s.name for s in run.sets], "max_norm": epilogue_mod.MAX_NORM,
                   "grad_scale": epilogue_mod.GRAD_SCALE, "window_s": run.window_s},
        "copy": run.copy, "param_sets": [s.summary() for s in run.sets], "rows": rows}
    cfg.deadline = run.deadline(0.6 if run.do["batch"] else 0.95)
    epilogue_mod.run(cfg, rows, progress=progress, on_progress=run.saver("epilogue"))
    step_mod.set_copy_fractions(rows, run.copy["bytes_per_s"])
    result = run.results["epilogue"]
    result["floors"] = epilogue_mod.mark_floors(rows)
    result.update(targets=report.epilogue_targets(result), complete=True)


def run_batch(run, progress):
    cfg = run.plans["batch"]
    result = run.results["batch"] = {
        "benchmark": "batch", "complete": False, "env": run.env,
        "config": {"preset": cfg.preset, "quick": run.args.quick, "tasks": cfg.tasks,
                   "rules": [r.name for r in cfg.rules],
                   "batch_sizes": cfg.batch_sizes, "epochs": cfg.epochs, "updates": cfg.updates,
                   "ref_batch": cfg.ref_batch, "lr_scaling": cfg.lr_scaling, "warmup_fraction": cfg.warmup_fraction,
                   "threads": cfg.threads or batch_mod.default_threads(cfg.device), "seed": cfg.seed,
                   "repeats": cfg.repeats, "window_s": cfg.window_s, "with_fusedopt": cfg.with_fusedopt,
                   "fusedopt_backend": run.backend, "fusedopt_runs": run.common["fusedopt_runs"]},
        "models": [batch_mod.model_summary(cfg.loaded[t], run.device) for t in cfg.tasks], "rows": [],
        "selections": []}
    save = run.saver("batch")

    def on_batch(rows, selections):
        result.update(rows=rows, selections=selections)
        save()

    cfg.deadline = run.deadline(0.85 if run.do["step"] or run.do["epilogue"] else 0.95)
    rows, selections, floors = batch_mod.run(cfg, progress, on_progress=on_batch)
    result.update(rows=rows, selections=selections, floors=floors, complete=True)
    result["targets"] = report.batch_targets(result)


def run_step_compiled(run, progress):
    """The compiled step rows last (the slowest to produce and the least needed), then the
    speed-ups, floors and targets."""
    cfg, rows, result = run.plans["step"], run.rows["step"], run.results["step"]
    if any(r["status"] == "pending" for r in rows):
        t0 = time.monotonic()
        try:  # inductor's one-time start-up, kept out of the first row's compile time
            torch.compile(lambda x: x * 2 + 1)(torch.ones(8, device=run.device))
            result["notes"]["torch.compile start-up (once per process, not in rows)"] = f"{time.monotonic() - t0:.1f} s"
        except Exception as exc:
            result["notes"]["torch.compile start-up failed"] = step_mod.short(exc)
        cfg.deadline = run.deadline(0.97)
        step_mod.run(cfg, rows, phase="compiled", progress=progress)
        step_mod.set_copy_fractions(rows, run.copy["bytes_per_s"])
    result["floors"] = step_mod.mark_floors(rows)
    step_mod.add_speedups(rows)
    result.update(targets=report.step_targets(result), complete=True)


# ---------------------------------------------------------------- reporting

def write_plots(run):
    """(PNG paths, why there are none or None)."""
    if run.args.no_plots:
        return [], None
    try:
        from . import plots as plots_mod

        return ((plots_mod.plot_step(run.results["step"], run.args.out) if run.do["step"] else [])
                + (plots_mod.plot_batch(run.results["batch"], run.args.out) if run.do["batch"] else [])), None
    except ImportError as exc:
        return [], f"{exc}; pip install matplotlib"
    except Exception as exc:  # the tables and JSON are written already: report, don't lose them
        import traceback

        traceback.print_exc()
        return [], f"plotting failed: {step_mod.short(exc)}"


def sections(run):
    """benchmark -> (title, markdown sections)."""
    out = {}
    if run.do["step"]:
        summary = report.summary_markdown(run.results["step"], run.results.get("epilogue"))
        out["step"] = ("optimizer step time", (
            ["## Summary: fusedopt against the fastest torch implementation\n\n" + summary] if summary else [])
            + ["## Optimizer step time\n\n" + report.step_markdown(run.results["step"])])
    if run.do["epilogue"]:
        out["epilogue"] = ("optimizer epilogue", ["## Optimizer epilogue: AMP unscale + grad-norm clip + AdamW\n\n"
                                                  + report.epilogue_markdown(run.results["epilogue"])])
    if run.do["batch"]:
        out["batch"] = ("batch size: cost and learning",
                        ["## Batch size: time per update, time per epoch, what the model learns\n\n"
                         + report.batch_markdown(run.results["batch"])])
    return out


def write_report(run):
    """JSON, plots, one markdown file per benchmark and report.md (printed); the report's text."""
    run.env["load_1min_end"] = noise.load_now()
    for name in run.results:
        write_json(run.paths[name], run.results[name])
    plots, plot_error = write_plots(run)
    parts = sections(run)
    for name, (title, body) in parts.items():
        run.paths[f"{name}.md"] = os.path.join(run.args.out, f"{name}.md")
        write_text(run.paths[f"{name}.md"], report.header(run.env, f"fusedopt: {title}") + "\n\n" + "\n\n".join(body))
    targets = [t for result in run.results.values() for t in result.get("targets", [])]
    run.paths["report.md"] = os.path.join(run.args.out, "report.md")
    full = "\n\n".join([report.header(run.env, "fusedopt benchmarks")] + [s for _, body in parts.values() for s in body]
                        + ([report.targets_markdown(targets, run.args.quick)] if targets else [])
                        + [report.files_markdown(run.args.out, list(run.paths.values()) + plots, plot_error)])
    write_text(run.paths["report.md"], full)
    return full, plot_error


def failures(run):
    """fusedopt failures, and failures of torch's plain implementations, are errors of the run."""
    failed = [r for r in run.rows.get("step", ()) if r["status"] == "failed" and r["impl"] in cases.IMPLS[:3]]
    failed += [r for r in run.rows.get("epilogue", ()) if r["status"] == "failed"]
    failed += [r for r in run.results.get("batch", {}).get("rows", []) if r["status"] == "failed"]
    for r in failed[:20]:
        where = r.get("param_set") or f"{r.get('task')} batch {r.get('batch_size')}"
        print(f"FAILED {where} {r['rule']} {r['impl']}: {r['reason']}", file=sys.stderr)
    return failed


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    run = parse(argv)
    if isinstance(run, int):
        return run
    os.makedirs(run.args.out, exist_ok=True)
    for name, plan in (("step", plan_step), ("epilogue", plan_epilogue), ("batch", plan_batch)):
        if run.do[name]:
            plan(run)
    status(f"{case_count(run)} cases on {run.env['device_name']}" + (" (--quick: indicative only)" if run.args.quick
                                                                      else "") + f"; results in {run.args.out}")
    progress = make_progress(case_count(run), run.args.no_progress)
    if run.do["step"] or run.do["epilogue"]:
        measure_copy(run)
    for name, measure in (("step", run_step), ("epilogue", run_epilogue), ("batch", run_batch)):
        if run.do[name]:
            measure(run, progress)
    if run.do["step"]:
        run_step_compiled(run, progress)
    progress.close()
    text, plot_error = write_report(run)
    print(text)
    print(f"\nwrote {run.args.out} in {time.monotonic() - run.started:.0f} s", file=sys.stderr)
    return 1 if failures(run) or plot_error and "failed" in plot_error else 0
