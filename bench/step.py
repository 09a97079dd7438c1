"""Step benchmark: time of one optimizer step, per parameter set, rule and implementation.

Each row reports the median step time, the bandwidth it implies from the bytes the rule must
move, that as a fraction of a device-to-device copy measured in the same run, device launches
per step, host time per step, memory, and how much faster fusedopt is than each torch variant.
"""

import gc
import time
from dataclasses import dataclass, field

import torch

from . import impls as impl_mod
from .env import synchronize
from .paramsets import attach
from .timing import (count_device_launches, host_time, temporary_bytes, time_calls)


@dataclass
class StepConfig:
    device: torch.device
    sets: list
    rules: list
    impls: list
    compile_sets: set  # parameter-set names that get torch-compiled rows
    quick: bool = False
    repeats: int = 7
    window_s: float = 0.02
    host_repeats: int = 15
    warmup: int = 2
    fusedopt_backend: str = "auto"
    deadline: float = None  # time.monotonic() value after which remaining cases are skipped
    cache_bytes: int = None  # GPU L2 size: rows whose tensors fit in it are flagged
    notes: dict = field(default_factory=dict)


def _mib(n):
    return None if n is None else n / 2**20


def _short(exc):
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()[0]
    return text if len(text) <= 240 else text[:237] + "..."


def _release(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def planned_rows(cfg):
    """Every (set, rule, impl) row, in table order, with its status decided where it can be."""
    rows = []
    for pset in cfg.sets:
        for rule in cfg.rules:
            for impl in cfg.impls:
                row = {
                    "param_set": pset.name,
                    "rule": rule.name,
                    "rule_label": rule.label,
                    "impl": impl,
                    "impl_label": impl_mod.LABELS[impl],
                    "dtype": str(pset.dtype).replace("torch.", ""),
                    "n_params": pset.n_params,
                    "n_tensors": pset.n_tensors,
                    "bytes_per_param": rule.bytes_per_param(pset.dtype),
                    "bytes_per_step": rule.bytes_per_param(pset.dtype) * pset.n_params,
                    "status": "pending",
                    "reason": None,
                }
                if impl == "fusedopt":
                    row["backend"] = cfg.fusedopt_backend
                if impl == "torch-compiled":
                    if cfg.quick:
                        row.update(status="skipped", reason="--quick leaves out torch.compile rows")
                    elif pset.name not in cfg.compile_sets:
                        row.update(status="skipped",
                                   reason="compiled only for " + (", ".join(sorted(cfg.compile_sets)) or "no set")
                                   + " (--compile-sets)")
                rows.append(row)
    return rows


def run_case(row, rule, values, grads, cfg, copy_bps, launch_counter):
    """Fill ``row`` with the measurements of one implementation on one parameter set."""
    device, impl = cfg.device, row["impl"]
    params = attach(values, grads)
    optimizer = step = None
    try:
        try:
            optimizer, step = impl_mod.build(impl, rule, params, fusedopt_backend=cfg.fusedopt_backend)
            synchronize(device)
            t0 = time.perf_counter()
            step()  # creates the state; Triton JIT or torch.compile happen here
            synchronize(device)
            row["first_call_s"] = time.perf_counter() - t0
        except impl_mod.Unsupported as exc:
            row.update(status="unsupported", reason=str(exc))
            return row
        except Exception as exc:
            if impl == "torch-fused":  # torch checks device/dtype support at the first step
                row.update(status="unsupported", reason=_short(exc))
                return row
            raise
        if impl == "torch-compiled":
            t0 = time.perf_counter()
            step()  # state now exists: the guards fail once and dynamo recompiles
            synchronize(device)
            second = time.perf_counter() - t0
        timing = time_calls(step, device, repeats=cfg.repeats, window_s=cfg.window_s, warmup=cfg.warmup)
        row.update(status="ok", **timing.as_ms())
        if impl == "torch-compiled":
            row["compile_s"] = max(0.0, row["first_call_s"] + second - 2 * timing.median_s)
        if device.type == "cuda":
            row["host_ms"] = host_time(step, device, cfg.host_repeats) * 1e3
        else:  # a CPU step runs synchronously: the host time is the step time
            row["host_ms"], row["host_is_step"] = row["median_ms"], True
        bps = row["bytes_per_step"] / timing.median_s
        row["gbs"] = bps / 1e9
        row["copy_fraction"] = bps / copy_bps if copy_bps else None
        row["launches_per_step"] = count_device_launches(step, device)
        row["launch_source"] = "profiler" if row["launches_per_step"] is not None else None
        if impl == "fusedopt" and launch_counter is not None:
            before = launch_counter()
            for _ in range(3):
                step()
            synchronize(device)
            row["triton_launches_per_step"] = (launch_counter() - before) / 3
            if row["launches_per_step"] is None and device.type == "cuda":
                row["launches_per_step"] = row["triton_launches_per_step"]
                row["launch_source"] = "fusedopt.kernels.launch_count"
        resident = impl_mod.resident_bytes(optimizer)
        temp = temporary_bytes(step, device)
        if cfg.cache_bytes:
            row["cache_resident"] = resident <= cfg.cache_bytes
        row["resident_mib"] = _mib(resident)
        row["temp_mib"] = _mib(temp)
        row["peak_mib"] = _mib(resident + temp) if temp is not None else None
    except Exception as exc:
        row.update(status="failed", reason=_short(exc))
    finally:
        # no gc pass per case (it costs ~0.2 s with torch loaded); one per parameter set
        del optimizer, step, params
    return row


def set_copy_fractions(rows, copy_bps):
    for row in rows:
        if row["status"] == "ok":
            row["copy_fraction"] = row["bytes_per_step"] / (row["median_ms"] / 1e3) / copy_bps


def add_speedups(rows):
    """``fusedopt_speedup`` on every row: its time over fusedopt's for the same set and rule."""
    fused = {(r["param_set"], r["rule"]): r for r in rows if r["impl"] == "fusedopt" and r["status"] == "ok"}
    for row in rows:
        ref = fused.get((row["param_set"], row["rule"]))
        if ref is None or row["status"] != "ok":
            continue
        if row["impl"] == "fusedopt":
            row["speedup_vs"] = {
                other["impl"]: other["median_ms"] / ref["median_ms"]
                for other in rows
                if (other["param_set"], other["rule"]) == (row["param_set"], row["rule"])
                and other["impl"] != "fusedopt" and other["status"] == "ok"
            }
        else:
            row["fusedopt_speedup"] = row["median_ms"] / ref["median_ms"]


def run(cfg, rows, *, phase, copy_bps, progress, on_progress=None):
    """Measure the pending rows of ``phase`` ("main": all but compiled, "compiled": those)."""
    launch_counter = impl_mod.fusedopt_launch_counter() if "fusedopt" in cfg.impls else None
    rules = {r.name: r for r in cfg.rules}
    for pset in cfg.sets:
        todo = [r for r in rows if r["param_set"] == pset.name and r["status"] == "pending"
                and (r["impl"] == "torch-compiled") == (phase == "compiled")]
        if not todo:
            continue
        if phase == "compiled":  # under a time budget, the headline rule first
            todo.sort(key=lambda r: r["rule"] != "adam")
        values = grads = None
        # a compile can take a minute: without a previous case to judge by, assume half that
        last_case_s = 30.0 if phase == "compiled" and cfg.device.type == "cuda" else 0.0
        for row in todo:
            progress.set_postfix_str(f"{pset.name} {row['rule']} {row['impl']}", refresh=False)
            # skip a case that would not finish in the budget, judged by the one before it
            if cfg.deadline is not None and time.monotonic() + last_case_s > cfg.deadline:
                row.update(status="skipped", reason="time budget (--time-budget) used up")
            else:
                t0 = time.monotonic()
                if values is None:
                    values, grads = pset.make(cfg.device)
                run_case(row, rules[row["rule"]], values, grads, cfg, copy_bps, launch_counter)
                last_case_s = time.monotonic() - t0
                row["bench_wall_s"] = last_case_s
            progress.update(1)
        del values, grads
        _release(cfg.device)
        if on_progress is not None:
            on_progress()
