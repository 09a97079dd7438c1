"""Command line: ``python -m bench [step|epilogue|batch|all] [options]``; see ``--help``."""

import argparse
import json
import os
import sys
import time

import torch

from fusedopt.backends import BACKENDS, backend_name, resolve_backend

from . import batch as batch_mod
from . import cases, report
from . import epilogue as epilogue_mod
from . import step as step_mod
from .env import cache_bytes, describe, resolve_device
from .timing import copy_bandwidth

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")


def build_parser():
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Optimizer step time against torch.optim's implementations, the AMP + clipping + AdamW "
                    "epilogue against torch's composition, and batch-size throughput, on CUDA when present, else "
                    "the CPU. The markdown report (a summary table first) on stdout; JSON, markdown and PNG plots "
                    "in --out.")
    p.add_argument("command", nargs="?", default="all", choices=["step", "epilogue", "batch", "all"],
                   help="step: optimizer step benchmark; epilogue: GradScaler unscale + grad-norm clip + AdamW "
                        "step, fusedopt against torch's composition; batch: batch-size sweep; all: the three "
                        "(default)")
    p.add_argument("--quick", action="store_true",
                   help="small sizes, few repeats, no torch.compile rows, the fp32 parameter sets: all three "
                        "benchmarks in under a minute on a 2-core CPU")
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
    p.add_argument("--models", default="mlp,transformer", help="batch sweep models: mlp,transformer")
    p.add_argument("--batch-sizes", default="auto",
                   help="comma list (default: powers of two 1-4096 on CUDA, powers of four 1-1024 on CPU)")
    p.add_argument("--epoch-samples", type=int, default=50_000, help="data-set size for epoch time")
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


def write_json(path, data):
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, default=str)
        f.write("\n")
    os.replace(path + ".tmp", path)


def write_text(path, text):
    with open(path, "w", encoding="utf-8") as f:
        f.write(text.rstrip() + "\n")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
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
    os.makedirs(args.out, exist_ok=True)
    env = describe(device)
    env["command"] = "python -m bench " + " ".join(argv)
    repeats = args.repeats or ((7 if cuda else 3) if args.quick else (15 if cuda else 5))
    window_s = (0.01 if cuda else 0.05) / (5 if args.quick else 1)
    common = {"size": size_name, "scale": scale, "quick": args.quick, "repeats": repeats, "fusedopt_backend": backend,
              "fusedopt_runs": backend_name(backend, device)}

    def deadline(fraction):
        return None if args.time_budget is None else started + args.time_budget * fraction

    # ---- plan
    sets = cases.choose("large,gpt2,many-small" if args.sets == "auto" and args.quick else args.sets.replace(
        "auto", "all"), cases.param_sets(scale), "parameter set")
    step_cfg = step_rows = epilogue_cfg = epilogue_rows = batch_cfg = None
    if do["step"]:
        names = {s.name for s in sets}
        compile_sets = {"auto": {"gpt2"} if cuda else {"large"}, "none": set(), "all": names}.get(
            args.compile_sets, {s.strip() for s in args.compile_sets.split(",")})
        if compile_sets - names:
            raise SystemExit(f"--compile-sets names sets not in this run: {', '.join(sorted(compile_sets - names))}")
        step_cfg = step_mod.StepConfig(device=device, sets=sets, rules=rules, impls=impls, compile_sets=compile_sets,
                                       quick=args.quick, repeats=repeats, window_s=window_s,
                                       host_repeats=10 if args.quick else 20, warmup=2 if cuda else 1,
                                       fusedopt_backend=backend, cache_bytes=cache_bytes(device) if cuda else None)
        step_rows = step_mod.planned_rows(step_cfg)
    if do["epilogue"]:
        epilogue_cfg = epilogue_mod.EpilogueConfig(device=device, sets=sets, repeats=repeats, window_s=window_s,
                                                   warmup=2 if cuda else 1, fusedopt_backend=backend)
        epilogue_rows = epilogue_mod.planned_rows(epilogue_cfg)
    if do["batch"]:
        models = cases.choose(args.models, {m: m for m in batch_mod.MODELS}, "model")
        batch_sizes = (batch_mod.default_batch_sizes(device, args.quick) if args.batch_sizes == "auto"
                       else sorted({int(b) for b in args.batch_sizes.split(",")}))
        batch_cfg = batch_mod.BatchConfig(
            device=device, models=models, preset=batch_mod.preset_for_scale(scale), rules=rules,
            batch_sizes=batch_sizes, epoch_samples=args.epoch_samples,
            repeats=args.repeats or ((5 if cuda else 3) if args.quick else (7 if cuda else 5)),
            window_s=(0.02 if cuda else 0.03) / (2 if args.quick else 1),
            with_fusedopt="fusedopt" in impls, fusedopt_backend=backend)
    progress = make_progress(
        (sum(r["status"] == "pending" for r in step_rows) if step_rows else 0) + len(epilogue_rows or ())
        + (len(batch_cfg.models) * len(rules) * (1 + batch_cfg.with_fusedopt) * len(batch_cfg.batch_sizes)
           if batch_cfg else 0), args.no_progress)
    paths, results = {}, {}

    def saver(name):
        paths[name] = os.path.join(args.out, f"{name}.json")
        return lambda *_: write_json(paths[name], results[name])

    copy = None
    if do["step"] or do["epilogue"]:
        copy = copy_bandwidth(device, (512 if cuda else 64) * 2**20 // (2 if args.quick else 1),
                              repeats=repeats, window_s=window_s)

    # ---- step benchmark, all but the compiled rows
    if do["step"]:
        results["step"] = {"benchmark": "step", "complete": False, "env": env,
                           "config": {**common, "rules": [r.name for r in rules], "impls": impls,
                                      "sets": [s.name for s in sets], "compile_sets": sorted(step_cfg.compile_sets),
                                      "window_s": window_s, "host_repeats": step_cfg.host_repeats},
                           "copy": copy, "param_sets": [s.summary() for s in sets], "rows": step_rows, "notes": {}}
        step_cfg.deadline = deadline(0.5 if do["batch"] else (0.7 if do["epilogue"] else 0.8))
        step_mod.run(step_cfg, step_rows, phase="main", progress=progress, on_progress=saver("step"))
        # once more after the rows: the yardstick is the better of the two (clocks, neighbours)
        again = copy_bandwidth(device, copy["buffer_bytes"], repeats=repeats, window_s=window_s)
        measured = [copy["bytes_per_s"], again["bytes_per_s"]]
        if again["bytes_per_s"] > copy["bytes_per_s"]:
            copy.update(again)
        copy["measurements_bytes_per_s"] = measured
        step_mod.set_copy_fractions(step_rows, copy["bytes_per_s"])

    # ---- epilogue: unscale + clip + update, fusedopt against torch's composition
    if do["epilogue"]:
        results["epilogue"] = {
            "benchmark": "epilogue", "complete": False, "env": env,
            "config": {**common, "rule": epilogue_mod.RULE.name, "impls": list(epilogue_mod.IMPLS),
                       "sets": [s.name for s in sets], "max_norm": epilogue_mod.MAX_NORM,
                       "grad_scale": epilogue_mod.GRAD_SCALE, "window_s": window_s},
            "copy": copy, "param_sets": [s.summary() for s in sets], "rows": epilogue_rows}
        epilogue_cfg.deadline = deadline(0.6 if do["batch"] else 0.95)
        epilogue_mod.run(epilogue_cfg, epilogue_rows, progress=progress, on_progress=saver("epilogue"))
        step_mod.set_copy_fractions(epilogue_rows, copy["bytes_per_s"])
        results["epilogue"].update(targets=report.epilogue_targets(results["epilogue"]), complete=True)

    # ---- batch sweep
    if do["batch"]:
        results["batch"] = {
            "benchmark": "batch", "complete": False, "env": env,
            "config": {"preset": batch_cfg.preset, "quick": args.quick, "models": batch_cfg.models,
                       "rules": [r.name for r in rules], "batch_sizes": batch_cfg.batch_sizes,
                       "epoch_samples": batch_cfg.epoch_samples, "repeats": batch_cfg.repeats,
                       "window_s": batch_cfg.window_s, "with_fusedopt": batch_cfg.with_fusedopt,
                       "fusedopt_backend": backend, "fusedopt_runs": common["fusedopt_runs"]},
            "models": [batch_mod.model_summary(m, batch_mod.MODEL_PRESETS[batch_cfg.preset][m], device)
                       for m in batch_cfg.models], "rows": [], "selections": []}
        save_batch = saver("batch")

        def on_batch(rows, selections):
            results["batch"].update(rows=rows, selections=selections)
            save_batch()

        batch_cfg.deadline = deadline(0.85 if do["step"] or do["epilogue"] else 0.95)
        rows, selections = batch_mod.run(batch_cfg, progress, on_progress=on_batch)
        results["batch"].update(rows=rows, selections=selections, complete=True)
        results["batch"]["targets"] = report.batch_targets(results["batch"])

    # ---- compiled step rows last: the slowest to produce and the least needed
    if do["step"]:
        if any(r["status"] == "pending" for r in step_rows):
            t0 = time.monotonic()
            try:  # inductor's one-time start-up, kept out of the first row's compile time
                torch.compile(lambda x: x * 2 + 1)(torch.ones(8, device=device))
                results["step"]["notes"]["torch.compile start-up (once per process, not in rows)"] = \
                    f"{time.monotonic() - t0:.1f} s"
            except Exception as exc:
                results["step"]["notes"]["torch.compile start-up failed"] = step_mod.short(exc)
            step_cfg.deadline = deadline(0.97)
            step_mod.run(step_cfg, step_rows, phase="compiled", progress=progress)
            step_mod.set_copy_fractions(step_rows, copy["bytes_per_s"])
        step_mod.add_speedups(step_rows)
        results["step"].update(targets=report.step_targets(results["step"]), complete=True)
    progress.close()

    # ---- outputs: JSON, plots, then the markdown that names them
    for name in results:
        write_json(paths[name], results[name])
    plots, plot_error = [], None
    if not args.no_plots:
        try:
            from . import plots as plots_mod

            plots += plots_mod.plot_step(results["step"], args.out) if do["step"] else []
            plots += plots_mod.plot_batch(results["batch"], args.out) if do["batch"] else []
        except ImportError as exc:
            plot_error = f"{exc}; pip install matplotlib"
        except Exception as exc:  # the tables and JSON are written already: report, don't lose them
            import traceback

            traceback.print_exc()
            plot_error = f"plotting failed: {step_mod.short(exc)}"
    sections = {}  # benchmark -> (title, markdown sections)
    if do["step"]:
        summary = report.summary_markdown(results["step"], results.get("epilogue"))
        sections["step"] = ("optimizer step time", (
            ["## Summary: fusedopt against the fastest torch implementation\n\n" + summary] if summary else [])
            + ["## Optimizer step time\n\n" + report.step_markdown(results["step"])])
    if do["epilogue"]:
        sections["epilogue"] = ("optimizer epilogue", ["## Optimizer epilogue: AMP unscale + grad-norm clip + AdamW"
                                                       "\n\n" + report.epilogue_markdown(results["epilogue"])])
    if do["batch"]:
        sections["batch"] = ("batch-size throughput",
                             ["## Batch-size throughput\n\n" + report.batch_markdown(results["batch"])])
    for name, (title, body) in sections.items():
        paths[f"{name}.md"] = os.path.join(args.out, f"{name}.md")
        write_text(paths[f"{name}.md"], report.header(env, f"fusedopt: {title}") + "\n\n" + "\n\n".join(body))
    targets = [t for result in results.values() for t in result.get("targets", [])]
    paths["report.md"] = os.path.join(args.out, "report.md")
    full = "\n\n".join([report.header(env, "fusedopt benchmarks")] + [s for _, body in sections.values() for s in body]
                        + ([report.targets_markdown(targets)] if targets else [])
                        + [report.files_markdown(args.out, list(paths.values()) + plots, plot_error)])
    write_text(paths["report.md"], full)
    print(full)
    print(f"\nwrote {args.out} in {time.monotonic() - started:.0f} s", file=sys.stderr)

    # fusedopt failures, and failures of torch's plain implementations, are errors of the run
    failed = [r for r in step_rows or [] if r["status"] == "failed" and r["impl"] in cases.IMPLS[:3]]
    failed += [r for r in epilogue_rows or [] if r["status"] == "failed"]
    failed += [r for r in results.get("batch", {}).get("rows", []) if r["status"] == "failed"]
    for r in failed[:20]:
        where = r.get("param_set") or f"{r.get('model')} batch {r.get('batch_size')}"
        print(f"FAILED {where} {r['rule']} {r['impl']}: {r['reason']}", file=sys.stderr)
    return 1 if failed or plot_error and "failed" in plot_error else 0
