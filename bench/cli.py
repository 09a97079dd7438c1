"""Command line: ``python -m bench [step|epilogue|batch|all] [options]``; see ``--help``."""

import argparse
import json
import os
import sys
import time

import torch

from . import batch as batch_mod
from . import epilogue as epilogue_mod
from . import impls as impl_mod
from . import report
from . import step as step_mod
from .env import cache_bytes, describe, resolve_device
from .paramsets import parse_sets, resolve_size
from .rules import parse_rules
from .timing import copy_bandwidth

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")


def build_parser():
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Optimizer step time against torch.optim's implementations, the AMP + clipping "
                    "+ AdamW epilogue against torch's composition, and batch-size throughput, on CUDA "
                    "when present, else the CPU. Markdown on stdout; JSON, markdown and PNG plots in --out.")
    p.add_argument("command", nargs="?", default="all", choices=["step", "epilogue", "batch", "all"],
                   help="step: optimizer step benchmark; epilogue: GradScaler unscale + grad-norm clip + "
                        "AdamW step, fusedopt against torch's composition; batch: batch-size sweep; "
                        "all: the three (default)")
    p.add_argument("--quick", action="store_true",
                   help="small sizes, few repeats, no torch.compile rows: under a minute on a CPU")
    p.add_argument("--size", default="auto",
                   help="tiny, small, medium, full or a fraction of full size (default: full on "
                        "CUDA, small on CPU; with --quick medium on CUDA, tiny on CPU)")
    p.add_argument("--out", default=DEFAULT_OUT, help="results folder (default: bench/out)")
    p.add_argument("--device", default="auto", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--rules", default="all",
                   help="comma list of sgd,sgd_momentum,adagrad,rmsprop,adam,adamw (default: all)")
    p.add_argument("--impls", default="all",
                   help="comma list of fusedopt,torch-forloop,torch-foreach,torch-fused,torch-compiled")
    p.add_argument("--sets", default="all",
                   help="step and epilogue parameter sets: large,gpt2,many-small,gpt2-bf16")
    p.add_argument("--compile-sets", default="auto",
                   help="parameter sets that get torch.compile rows: comma list, all or none "
                        "(default: gpt2 on CUDA, large on CPU; none with --quick)")
    p.add_argument("--models", default="mlp,transformer", help="batch sweep models: mlp,transformer")
    p.add_argument("--batch-sizes", default="auto",
                   help="comma list (default: powers of two 1-4096 on CUDA, powers of four "
                        "1-1024 on CPU)")
    p.add_argument("--epoch-samples", type=int, default=50_000, help="data-set size for epoch time")
    p.add_argument("--repeats", type=int, default=None, help="timing windows per row")
    p.add_argument("--fusedopt-backend", default="auto", choices=["auto", "triton", "torch"],
                   help="auto: triton on CUDA, the torch reference on CPU")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds; cases that would start after it are reported as skipped")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


class _NoProgress:
    def __init__(self, *args, **kwargs):
        pass

    def update(self, n=1):
        pass

    def set_postfix_str(self, *args, **kwargs):
        pass

    def close(self):
        pass


def make_progress(total, disable):
    if disable:
        return _NoProgress()
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoProgress()
    return tqdm(total=total, desc="bench", unit="case", file=sys.stderr, dynamic_ncols=True)


def write_json(path, data):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, default=str)
        f.write("\n")
    os.replace(tmp, path)


def write_text(path, text):
    with open(path, "w", encoding="utf-8") as f:
        f.write(text.rstrip() + "\n")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    started = time.monotonic()
    device = resolve_device(args.device)
    size_name, scale = resolve_size(args.size, device, args.quick)
    try:
        rules = parse_rules(args.rules)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    impls = impl_mod.parse_impls(args.impls)
    do_step = args.command in ("step", "all")
    do_epilogue = args.command in ("epilogue", "all")
    do_batch = args.command in ("batch", "all")
    cuda = device.type == "cuda"

    if "fusedopt" in impls or do_epilogue:  # the epilogue always compares fusedopt with torch
        try:
            impl_mod.load_fusedopt()
        except impl_mod.FusedoptUnavailable as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    backend = args.fusedopt_backend
    if backend == "auto":
        backend = impl_mod.default_fusedopt_backend(device)

    os.makedirs(args.out, exist_ok=True)
    env = describe(device)
    env["command"] = "python -m bench " + " ".join(argv)
    budget = args.time_budget

    def deadline(fraction):
        return None if budget is None else started + budget * fraction

    # ---- plan
    step_cfg = step_rows = step_result = None
    if do_step:
        sets = parse_sets(args.sets, scale)
        if args.compile_sets == "auto":
            compile_sets = {"gpt2"} if cuda else {"large"}
        elif args.compile_sets == "none":
            compile_sets = set()
        elif args.compile_sets == "all":
            compile_sets = {s.name for s in sets}
        else:
            compile_sets = {s.strip() for s in args.compile_sets.split(",")}
            unknown = compile_sets - {s.name for s in sets}
            if unknown:
                raise SystemExit(f"--compile-sets names sets not in this run: {', '.join(sorted(unknown))}")
        step_cfg = step_mod.StepConfig(
            device=device, sets=sets, rules=rules, impls=impls, compile_sets=compile_sets,
            quick=args.quick,
            repeats=args.repeats or ((7 if cuda else 3) if args.quick else (15 if cuda else 5)),
            window_s=(0.01 if cuda else 0.05) / (5 if args.quick else 1),
            host_repeats=10 if args.quick else 20,
            warmup=2 if cuda else 1,
            fusedopt_backend=backend,
        )
        if cuda:  # flag rows whose tensors fit in L2 (CPU caches are too fuzzy to say)
            step_cfg.cache_bytes = cache_bytes(device)
        step_rows = step_mod.planned_rows(step_cfg)
    epilogue_cfg = epilogue_rows = None
    if do_epilogue:
        epilogue_cfg = epilogue_mod.EpilogueConfig(
            device=device, sets=parse_sets(args.sets, scale),
            repeats=args.repeats or ((7 if cuda else 3) if args.quick else (15 if cuda else 5)),
            window_s=(0.01 if cuda else 0.05) / (5 if args.quick else 1),
            warmup=2 if cuda else 1, fusedopt_backend=backend,
        )
        epilogue_rows = epilogue_mod.planned_rows(epilogue_cfg)
    batch_cfg = None
    if do_batch:
        if args.batch_sizes == "auto":
            batch_sizes = batch_mod.default_batch_sizes(device, args.quick)
        else:
            batch_sizes = sorted({int(b) for b in args.batch_sizes.split(",")})
        models = [m.strip() for m in args.models.split(",") if m.strip()]
        for m in models:
            if m not in batch_mod.MODELS:
                raise SystemExit(f"unknown model {m!r}; choose from {', '.join(batch_mod.MODELS)}")
        batch_cfg = batch_mod.BatchConfig(
            device=device, models=models, preset=batch_mod.preset_for_scale(scale), rules=rules,
            batch_sizes=batch_sizes, epoch_samples=args.epoch_samples,
            repeats=args.repeats or ((5 if cuda else 3) if args.quick else (7 if cuda else 5)),
            window_s=(0.02 if cuda else 0.03) / (2 if args.quick else 1),
            with_fusedopt="fusedopt" in impls, fusedopt_backend=backend,
        )

    total = (sum(r["status"] == "pending" for r in step_rows) if do_step else 0) + (
        len(epilogue_rows) if do_epilogue else 0) + (
        len(batch_cfg.models) * len(rules) * (1 + batch_cfg.with_fusedopt) * len(batch_cfg.batch_sizes)
        if do_batch else 0)
    progress = make_progress(total, args.no_progress)

    # ---- step benchmark, all but the compiled rows
    paths = {}
    copy = None
    if do_step:
        copy = copy_bandwidth(device, (512 if cuda else 64) * 2**20 // (2 if args.quick else 1),
                              repeats=step_cfg.repeats, window_s=step_cfg.window_s)
        step_result = {
            "benchmark": "step", "complete": False, "env": env,
            "config": {"size": size_name, "scale": scale, "quick": args.quick,
                       "rules": [r.name for r in rules], "impls": impls,
                       "sets": [s.name for s in step_cfg.sets],
                       "compile_sets": sorted(step_cfg.compile_sets), "repeats": step_cfg.repeats,
                       "window_s": step_cfg.window_s, "host_repeats": step_cfg.host_repeats,
                       "fusedopt_backend": backend},
            "copy": copy, "param_sets": [s.summary() for s in step_cfg.sets], "rows": step_rows,
            "notes": {},
        }
        paths["step.json"] = os.path.join(args.out, "step.json")

        def save_step():
            write_json(paths["step.json"], step_result)

        step_cfg.deadline = deadline(0.5 if do_batch else (0.7 if do_epilogue else 0.8))
        step_mod.run(step_cfg, step_rows, phase="main", copy_bps=copy["bytes_per_s"],
                     progress=progress, on_progress=save_step)
        # once more after the rows: the yardstick is the better of the two (clocks, neighbours)
        again = copy_bandwidth(device, copy["buffer_bytes"], repeats=step_cfg.repeats,
                               window_s=step_cfg.window_s)
        copy["measurements_bytes_per_s"] = [copy["bytes_per_s"], again["bytes_per_s"]]
        if again["bytes_per_s"] > copy["bytes_per_s"]:
            copy.update(again, measurements_bytes_per_s=copy["measurements_bytes_per_s"])
        step_mod.set_copy_fractions(step_rows, copy["bytes_per_s"])

    # ---- epilogue: unscale + clip + update, fusedopt against torch's composition
    epilogue_result = None
    if do_epilogue:
        if copy is None:  # the step benchmark's yardstick when it ran, else measured here
            copy = copy_bandwidth(device, (512 if cuda else 64) * 2**20 // (2 if args.quick else 1),
                                  repeats=epilogue_cfg.repeats, window_s=epilogue_cfg.window_s)
        epilogue_result = {
            "benchmark": "epilogue", "complete": False, "env": env,
            "config": {"size": size_name, "scale": scale, "quick": args.quick, "rule": epilogue_mod.RULE.name,
                       "impls": list(epilogue_mod.IMPLS), "sets": [s.name for s in epilogue_cfg.sets],
                       "max_norm": epilogue_mod.MAX_NORM, "grad_scale": epilogue_mod.GRAD_SCALE,
                       "repeats": epilogue_cfg.repeats, "window_s": epilogue_cfg.window_s,
                       "fusedopt_backend": backend},
            "copy": copy, "param_sets": [s.summary() for s in epilogue_cfg.sets], "rows": epilogue_rows,
        }
        paths["epilogue.json"] = os.path.join(args.out, "epilogue.json")

        def save_epilogue():
            write_json(paths["epilogue.json"], epilogue_result)

        epilogue_cfg.deadline = deadline(0.6 if do_batch else 0.95)
        epilogue_mod.run(epilogue_cfg, epilogue_rows, copy_bps=copy["bytes_per_s"], progress=progress,
                         on_progress=save_epilogue)
        epilogue_mod.set_copy_fractions(epilogue_rows, copy["bytes_per_s"])
        epilogue_result["targets"] = report.epilogue_targets(epilogue_result)
        epilogue_result["complete"] = True

    # ---- batch sweep
    batch_result = None
    if do_batch:
        batch_result = {
            "benchmark": "batch", "complete": False, "env": env,
            "config": {"preset": batch_cfg.preset, "quick": args.quick, "models": batch_cfg.models,
                       "rules": [r.name for r in rules], "batch_sizes": batch_cfg.batch_sizes,
                       "epoch_samples": batch_cfg.epoch_samples, "repeats": batch_cfg.repeats,
                       "window_s": batch_cfg.window_s, "with_fusedopt": batch_cfg.with_fusedopt,
                       "fusedopt_backend": backend},
            "models": [batch_mod.model_summary(m, batch_mod.MODEL_PRESETS[batch_cfg.preset][m], device)
                       for m in batch_cfg.models],
            "rows": [], "selections": [],
        }
        paths["batch.json"] = os.path.join(args.out, "batch.json")

        def save_batch(rows, selections):
            batch_result["rows"], batch_result["selections"] = rows, selections
            write_json(paths["batch.json"], batch_result)

        batch_cfg.deadline = deadline(0.85 if do_step or do_epilogue else 0.95)
        rows, selections = batch_mod.run(batch_cfg, progress, on_progress=save_batch)
        batch_result.update(rows=rows, selections=selections, complete=True)

    # ---- compiled step rows last: the slowest to produce and the least needed
    if do_step:
        if any(r["status"] == "pending" for r in step_rows):
            t0 = time.monotonic()
            try:  # inductor's one-time start-up, kept out of the first row's compile time
                torch.compile(lambda x: x * 2 + 1)(torch.ones(8, device=device))
                step_result["notes"]["torch.compile start-up (once per process, not in rows)"] = \
                    f"{time.monotonic() - t0:.1f} s"
            except Exception as exc:
                step_result["notes"]["torch.compile start-up failed"] = f"{type(exc).__name__}: {exc}"[:200]
            step_cfg.deadline = deadline(0.97)
            step_mod.run(step_cfg, step_rows, phase="compiled", copy_bps=step_result["copy"]["bytes_per_s"],
                         progress=progress)
        step_mod.add_speedups(step_rows)
        step_result["targets"] = report.step_targets(step_result)
        step_result["complete"] = True
    progress.close()

    # ---- outputs
    sections, targets = [], []
    if do_step:
        write_json(paths["step.json"], step_result)
        step_md = report.step_markdown(step_result)
        write_text(os.path.join(args.out, "step.md"),
                   report.header(env, "fusedopt: optimizer step time") + "\n\n" + step_md)
        sections.append("## Optimizer step time\n\n" + step_md)
        targets += step_result["targets"]
    if do_epilogue:
        write_json(paths["epilogue.json"], epilogue_result)
        epilogue_md = report.epilogue_markdown(epilogue_result)
        write_text(os.path.join(args.out, "epilogue.md"),
                   report.header(env, "fusedopt: optimizer epilogue (AMP unscale + clip + AdamW)")
                   + "\n\n" + epilogue_md)
        sections.append("## Optimizer epilogue: AMP unscale + grad-norm clip + AdamW\n\n" + epilogue_md)
        targets += epilogue_result["targets"]
    if do_batch:
        batch_result["targets"] = report.batch_targets(batch_result)
        write_json(paths["batch.json"], batch_result)
        batch_md = report.batch_markdown(batch_result)
        write_text(os.path.join(args.out, "batch.md"),
                   report.header(env, "fusedopt: batch-size throughput") + "\n\n" + batch_md)
        sections.append("## Batch-size throughput\n\n" + batch_md)
        targets += batch_result["targets"]
    if targets:
        sections.append(report.targets_markdown(targets))
    full = report.header(env, "fusedopt benchmarks") + "\n\n" + "\n\n".join(sections)
    write_text(os.path.join(args.out, "report.md"), full)
    print(full)
    plot_failed = False
    if not args.no_plots:
        try:
            from . import plots

            if do_step:
                plots.plot_step(step_result, args.out)
            if do_batch:
                plots.plot_batch(batch_result, args.out)
        except ImportError as exc:
            print(f"warning: no plots ({exc}); pip install matplotlib", file=sys.stderr)
        except Exception as exc:  # the tables and JSON are written already: report, don't lose them
            import traceback

            traceback.print_exc()
            print(f"error: plotting failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            plot_failed = True
    print(f"\nwrote {args.out} in {time.monotonic() - started:.0f} s", file=sys.stderr)

    # fusedopt failures, and failures of torch's plain implementations, are errors of the run
    failed = [r for r in (step_rows or []) if r["status"] == "failed"
              and r["impl"] in ("fusedopt", "torch-forloop", "torch-foreach")]
    failed += [r for r in (epilogue_rows or []) if r["status"] == "failed"]
    failed += [r for r in (batch_result["rows"] if batch_result else []) if r["status"] == "failed"]
    for r in failed[:20]:
        where = (("epilogue " if "bytes_per_iter" in r else "") + r["param_set"] if r.get("param_set")
                 else f"{r.get('model')} batch {r.get('batch_size')}")
        print(f"FAILED {where} {r['rule']} {r['impl']}: {r['reason']}", file=sys.stderr)
    return 1 if failed or plot_failed else 0
