"""Step benchmark: one optimizer step per parameter set, rule and implementation.

The implementations of one (set, rule) are built side by side on copies of the same values and
timed interleaved. Each row gets the median step time, the bandwidth it implies from the bytes
the rule must move, that as a fraction of the device-to-device copy measured in the same run,
and on CUDA launches and host time per step; memory on every device.
"""

import time
from dataclasses import dataclass, field

import torch

from . import cases, noise
from .env import synchronize
from .timing import count_device_launches, host_time, temporary_bytes, time_interleaved


@dataclass
class StepConfig:
    device: torch.device
    sets: list
    rules: list
    impls: list
    compile_sets: set  # parameter sets that get torch-compiled rows
    quick: bool = False
    repeats: int = 7
    window_s: float = 0.02
    host_repeats: int = 15
    warmup: int = 2
    fusedopt_backend: str = "auto"
    deadline: float = None  # time.monotonic() after which no new case starts
    cache_bytes: int = None  # GPU L2 size: rows whose tensors fit in it are flagged
    notes: dict = field(default_factory=dict)


def short(exc):
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()[0]
    return text if len(text) <= 240 else text[:237] + "..."


def planned_rows(cfg):
    """The case list (cases.step_cases) with what is known before running: skipped compiled rows,
    and which backend the fusedopt rows run on."""
    rows = cases.step_cases(cfg.sets, cfg.rules, cfg.impls)
    for row in rows:
        if row["impl"] == "fusedopt":
            row.update(cases.fusedopt_info(cfg.fusedopt_backend, cfg.device))
        elif row["impl"] == "torch-compiled" and (cfg.quick or row["param_set"] not in cfg.compile_sets):
            row.update(status="skipped", reason="--quick leaves out torch.compile rows" if cfg.quick else
                       "compiled only for " + (", ".join(sorted(cfg.compile_sets)) or "no set") + " (--compile-sets)")
    return rows


def build_all(rows, rule, values, grads, cfg):
    """{impl: step} for the rows that build and take a first step; the others marked."""
    steps = {}
    for row in rows:
        try:
            optimizer, step = cases.build(row["impl"], rule, cases.attach(values, grads), cfg.fusedopt_backend)
            for name in ("first_call_s", "second_call_s")[:1 + (row["impl"] == "torch-compiled")]:
                synchronize(cfg.device)
                t0 = time.perf_counter()
                step()  # state, JIT and compilation happen here (compiled: the guards fail once more)
                synchronize(cfg.device)
                row[name] = time.perf_counter() - t0
            steps[row["impl"]] = (optimizer, step)
        except cases.Unsupported as exc:
            row.update(status="unsupported", reason=str(exc))
        except Exception as exc:  # torch checks fused device/dtype support at the first step
            row.update(status="unsupported" if row["impl"] == "torch-fused" else "failed", reason=short(exc))
    return steps


def run_rule(rows, rule, values, grads, cfg, launch_counter):
    built = build_all(rows, rule, values, grads, cfg)
    if not built:
        return
    device = cfg.device
    try:
        timings = time_interleaved({impl: step for impl, (_, step) in built.items()}, device,
                                   repeats=cfg.repeats, window_s=cfg.window_s, warmup=cfg.warmup)
        for row in rows:
            if row["impl"] not in built:
                continue
            optimizer, step = built[row["impl"]]
            timing = timings[row["impl"]]
            row.update(status="ok", **timing.as_ms(), gbs=row["bytes_per_step"] / timing.median_s / 1e9)
            if "second_call_s" in row:
                row["compile_s"] = max(0.0, row["first_call_s"] + row["second_call_s"] - 2 * timing.median_s)
            if device.type == "cuda":  # on the CPU the step runs synchronously: host time is step time
                row["host_ms"] = host_time(step, device, cfg.host_repeats) * 1e3
                row["launches_per_step"] = count_device_launches(step, device)
                if row["impl"] == "fusedopt" and launch_counter is not None:
                    before = launch_counter()
                    for _ in range(3):
                        step()
                    synchronize(device)
                    row["triton_launches_per_step"] = (launch_counter() - before) / 3
                    if row["launches_per_step"] is None:
                        row["launches_per_step"] = row["triton_launches_per_step"]
            resident, temp = cases.resident_bytes(optimizer), temporary_bytes(step, device)
            if cfg.cache_bytes and resident <= cfg.cache_bytes:
                row.update(cache_resident=True, note="fits in L2")
            row["resident_mib"] = resident / 2**20
            if temp is not None:
                row.update(temp_mib=temp / 2**20, peak_mib=(resident + temp) / 2**20)
    except Exception as exc:
        for row in rows:
            if row["impl"] in built:
                row.update(status="failed", reason=short(exc))


def set_copy_fractions(rows, copy_bps):
    """Each row's bandwidth as a fraction of the copy's (the yardstick is final after the rows)."""
    for row in rows:
        if row["status"] == "ok":
            row["copy_fraction"] = row["bytes_per_step"] / (row["median_ms"] / 1e3) / copy_bps


def mark_floors(rows):
    """Timing floors per parameter set (noise.mark_floors: equal times for different bytes, or
    every row on a scheduler tick); the reasons, each naming its set."""
    groups = {}
    for r in rows:
        groups.setdefault(r["param_set"], []).append(r)
    return [reason for name, group in groups.items()
            for reason in noise.mark_floors([group], "bytes_per_step", prefix_note=f"{name}: ")]


def add_speedups(rows):
    """Per (set, rule): `speedup_vs` {torch impl: its time / fusedopt's} on the fusedopt row,
    `fusedopt_speedup` on each torch row, and `speedup_apart` there: whether the two 20-80%
    bands are apart (otherwise the ratio is inside the noise and the report shows none)."""
    fused = {(r["param_set"], r["rule"]): r for r in rows if r["impl"] == "fusedopt" and r["status"] == "ok"}
    for key, ref in fused.items():
        ref["speedup_vs"] = {}
        for row in rows:
            if (row["param_set"], row["rule"]) == key and row["impl"] != "fusedopt" and row["status"] == "ok":
                row["fusedopt_speedup"] = ref["speedup_vs"][row["impl"]] = row["median_ms"] / ref["median_ms"]
                row["speedup_apart"] = noise.apart(row, ref)


def run_groups(groups, measure, cfg, progress, on_progress=None, guess_s=0.0):
    """`measure(rows)` for each (label, rows) group, except groups that would start after
    cfg.deadline, judged by the time the one before took (`guess_s` for the first)."""
    last_s = guess_s
    for label, group in groups:
        progress.set_postfix_str(label, refresh=False)
        if cfg.deadline is not None and time.monotonic() + last_s > cfg.deadline:
            for row in group:
                row.update(status="skipped", reason="time budget (--time-budget) used up")
        else:
            t0 = time.monotonic()
            measure(group)
            cases.release(cfg.device)
            last_s = time.monotonic() - t0
            for row in group:
                row["bench_wall_s"] = last_s / len(group)
        progress.update(len(group))
        if on_progress is not None:
            on_progress()


def run(cfg, rows, *, phase, progress, on_progress=None):
    """Measure the pending rows of `phase` ("main": all but compiled; "compiled": those), one
    (set, rule) at a time."""
    launch_counter = None
    if cfg.device.type == "cuda" and "fusedopt" in cfg.impls:
        from fusedopt.kernels import launch_count as launch_counter
    todo = [r for r in rows if r["status"] == "pending" and (r["impl"] == "torch-compiled") == (phase == "compiled")]
    if phase == "compiled":  # under a time budget, the headline rule first
        todo.sort(key=lambda r: r["rule"] != "adam")
    sets = {s.name: s for s in cfg.sets}
    groups = {}
    for row in todo:
        groups.setdefault((row["param_set"], row["rule"]), []).append(row)

    def measure(group):
        run_rule(group, cases.RULES[group[0]["rule"]], *sets[group[0]["param_set"]].make(cfg.device), cfg,
                 launch_counter)

    # a compile can take a minute: without a case to judge by, assume half that
    run_groups([(" ".join(key), group) for key, group in groups.items()], measure, cfg, progress, on_progress,
               guess_s=30.0 if phase == "compiled" and cfg.device.type == "cuda" else 0.0)
