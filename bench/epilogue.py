"""Epilogue benchmark: everything a mixed-precision training step does between backward() and
the next forward, for AdamW: AMP's unscale and inf/NaN check, clipping by the global grad 2-norm,
and the update.

Two implementations run side by side on the same parameter sets, device and values:

- ``torch-composition``, torch's best composition: ``scaler.unscale_(opt)`` (one foreach pass
  that unscales the grads in place and checks them for inf/NaN),
  ``torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)`` (a norm pass, then a pass
  scaling the grads in place), ``scaler.step(opt)`` with ``torch.optim.AdamW(fused=True)``
  (``foreach=True`` where torch has no fused kernel for the device or dtype), ``scaler.update()``;
- ``fusedopt``: ``opt.clip_grad_norm_(1.0, grad_scaler=scaler)`` (one reduction launch per bucket
  that also does the scaler's inf check), ``scaler.step(opt)`` (the update kernel unscales and
  clips in registers), ``scaler.update()``.

Each iteration starts with ``scaler.scale(loss)`` (a 0-dim stand-in for the loss) so that the
scaler holds a scale, as after a real backward. Per row: median time per iteration, the bytes each
implementation must move (``bytes_per_param``), the bandwidth that implies, as a fraction of a
device-to-device copy, and device launches per iteration (CUDA).
"""

import gc
import math
import statistics
import time
from dataclasses import dataclass

import torch

from . import impls as impl_mod
from .env import synchronize
from .paramsets import attach
from .rules import RULES
from .timing import Timing, count_device_launches, quantile

IMPLS = ("torch-composition", "fusedopt")
LABELS = {
    "torch-composition": "torch: unscale_ + clip_grad_norm_ + AdamW fused",
    "fusedopt": "fusedopt: clip_grad_norm_(grad_scaler=) + step",
}
RULE = RULES["adamw"]
MAX_NORM = 1.0
# GradScaler's default initial scale. The grads are drawn as N(0, 1e-2) and stored multiplied by
# it, as a backward of the scaled loss leaves them; the unscaled grads' norm is well above
# MAX_NORM, so the clip factor is < 1 and clipping really scales every grad.
GRAD_SCALE = 2.0**16
# update() would double the scale after 2,000 finite steps; the timing loop must not change the
# values it measures, so the scale stays put (update() runs the same kernel either way)
GROWTH_INTERVAL = 2**30


def bytes_per_param(impl, dtype=torch.float32):
    """Bytes one epilogue iteration must move per parameter (reads plus writes), for AdamW.

    Counted in elements of the param's dtype (grads and state share it), ``e`` bytes each:

    - the update (both implementations): read p, g, m, v and write p, m, v, i.e.
      ``rules.bytes_per_param("AdamW")``, 7e (28 B in fp32);
    - fusedopt adds one read of g by the norm reduction, which also does the inf check, since
      unscaling and clipping happen in the update's registers: 1e + 7e = 8e (32 B in fp32);
    - torch's composition adds ``unscale_`` reading and writing g (2e), the norm reading g (1e)
      and the clip reading and writing g (2e): 5e + 7e = 12e (48 B in fp32).

    Scalars (the scale, found_inf, the norm, the clip factor) are left out.
    """
    e = torch.empty((), dtype=dtype).element_size()
    update = RULE.bytes_per_param(dtype)
    if impl == "fusedopt":
        return 1 * e + update
    if impl == "torch-composition":
        unscale, norm, clip = 2 * e, 1 * e, 2 * e
        return unscale + norm + clip + update
    raise ValueError(f"unknown epilogue implementation {impl!r}; choose from {', '.join(IMPLS)}")


@dataclass
class EpilogueConfig:
    device: torch.device
    sets: list
    repeats: int = 7
    window_s: float = 0.02
    warmup: int = 2
    max_calls_per_window: int = 100
    fusedopt_backend: str = "auto"
    deadline: float = None  # time.monotonic() value after which remaining sets are skipped


def _short(exc):
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()[0]
    return text if len(text) <= 240 else text[:237] + "..."


def planned_rows(cfg):
    """One row per (parameter set, implementation), in table order."""
    rows = []
    for pset in cfg.sets:
        for impl in IMPLS:
            bpp = bytes_per_param(impl, pset.dtype)
            row = {
                "param_set": pset.name,
                "rule": RULE.name,
                "rule_label": RULE.label,
                "impl": impl,
                "impl_label": LABELS[impl],
                "dtype": str(pset.dtype).replace("torch.", ""),
                "n_params": pset.n_params,
                "n_tensors": pset.n_tensors,
                "bytes_per_param": bpp,
                "bytes_per_iter": bpp * pset.n_params,
                "max_norm": MAX_NORM,
                "grad_scale": GRAD_SCALE,
                "status": "pending",
                "reason": None,
            }
            if impl == "fusedopt":
                row["backend"] = cfg.fusedopt_backend
            rows.append(row)
    return rows


class Case:
    """One implementation's params (own copies of the values and the scaled grads), optimizer,
    GradScaler, and the zero-argument callable running one epilogue iteration."""

    def __init__(self, impl, values, scaled_grads, device, fusedopt_backend):
        self.impl = impl
        self.params = attach(values, [g.clone() for g in scaled_grads])
        self.grads = [p.grad for p in self.params]
        self.scaler = torch.amp.GradScaler(device.type, init_scale=GRAD_SCALE,
                                           growth_interval=GROWTH_INTERVAL)
        self.loss = torch.ones((), device=device)  # the "loss" scaler.scale() sees each iteration
        self.torch_update = None
        if impl == "fusedopt":
            fusedopt = impl_mod.load_fusedopt()
            self.optimizer = fusedopt.AdamW(self.params, **RULE.options, backend=fusedopt_backend)
            self.iteration = self._fusedopt_iteration
        else:
            try:
                self.optimizer = torch.optim.AdamW(self.params, **RULE.options, fused=True)
                self.torch_update = "fused"
            except (RuntimeError, ValueError, TypeError):  # no fused kernel for this device/dtype
                self.optimizer = torch.optim.AdamW(self.params, **RULE.options, foreach=True)
                self.torch_update = "foreach"
            self.iteration = self._torch_iteration

    def _torch_iteration(self):
        scaler = self.scaler
        scaler.scale(self.loss)
        scaler.unscale_(self.optimizer)  # grads /= scale in place, and the inf/NaN check
        torch.nn.utils.clip_grad_norm_(self.params, MAX_NORM, foreach=True)  # grads *= coef in place
        scaler.step(self.optimizer)
        scaler.update()

    def _fusedopt_iteration(self):
        scaler = self.scaler
        scaler.scale(self.loss)
        self.optimizer.clip_grad_norm_(MAX_NORM, grad_scaler=self.scaler)  # grads left as they are
        scaler.step(self.optimizer)
        scaler.update()

    def refill(self, scaled_grads):
        """Put the scaled grads back: torch's unscale_ and clip rewrite them in place."""
        torch._foreach_copy_(self.grads, scaled_grads)


def time_side_by_side(cases, setup, device, *, repeats, window_s, warmup, max_calls_per_window):
    """[Timing] of one call of each ``cases[i].iteration``, timing windows interleaved.

    Every call starts from ``setup(case)``, which is outside the timed span and followed by a
    synchronisation, so each call is timed from an idle device to the end of its own work (CUDA
    events on CUDA, ``time.perf_counter`` on the CPU). A window is ``calls`` such calls (sized
    from the previous window, like ``timing.time_calls``); the median is over the windows.
    """
    cuda = device.type == "cuda"
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def one_call(case):
        setup(case)
        synchronize(device)
        if cuda:
            start.record()
            case.iteration()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        case.iteration()
        return time.perf_counter() - t0

    for case in cases:
        for _ in range(warmup):
            setup(case)
            case.iteration()
    synchronize(device)
    last = [one_call(case) for case in cases]
    per_call = [[] for _ in cases]
    counts = [[] for _ in cases]
    for _ in range(repeats):
        for i, case in enumerate(cases):
            calls = max(1, min(max_calls_per_window, math.ceil(window_s / max(last[i], 1e-7))))
            last[i] = sum(one_call(case) for _ in range(calls)) / calls
            per_call[i].append(last[i])
            counts[i].append(calls)
    return [Timing(statistics.median(p), quantile(p, 0.2), quantile(p, 0.8), max(c), repeats)
            for p, c in zip(per_call, counts)]


def agreement(torch_case, fused_case, values):
    """How far apart the two implementations are after one iteration from the same params and
    grads. The params alone would not show a missed unscale or clip (Adam's first step is nearly
    invariant to the grads' scale); exp_avg = (1 - beta1) * grad does, so both are compared."""
    def max_abs_diff(xs, ys):  # one temporary at a time, one host read
        return torch.stack([(x.detach() - y.detach()).abs().max().float() for x, y in zip(xs, ys)]).max().item()

    m_torch = [torch_case.optimizer.state[p]["exp_avg"] for p in torch_case.params]
    m_fused = [fused_case.optimizer.state[p]["exp_avg"] for p in fused_case.params]
    m_size = torch.stack([m.abs().max().float() for m in m_torch]).max().item()
    return {"max_abs_param_diff": max_abs_diff(torch_case.params, fused_case.params),
            "max_abs_update": max_abs_diff(torch_case.params, values),
            "exp_avg_rel_diff": max_abs_diff(m_torch, m_fused) / max(m_size, 1e-30)}


def run_set(pset, rows, cfg, copy_bps):
    """Fill the rows of one parameter set: both implementations built, checked and timed."""
    device = cfg.device
    values, grads = pset.make(device)
    scaled = [g.mul_(GRAD_SCALE) for g in grads]  # what backward() of the scaled loss would leave
    by_impl = {row["impl"]: row for row in rows}
    cases = []
    try:
        for impl in IMPLS:
            row = by_impl[impl]
            try:
                case = Case(impl, values, scaled, device, cfg.fusedopt_backend)
                synchronize(device)
                t0 = time.perf_counter()
                case.iteration()  # creates the state; Triton JIT happens here
                synchronize(device)
                row["first_call_s"] = time.perf_counter() - t0
                if case.torch_update is not None:
                    row["torch_update"] = case.torch_update
                    row["impl_label"] = LABELS[impl].replace("fused", case.torch_update)
                cases.append(case)
            except Exception as exc:
                row.update(status="failed", reason=_short(exc))
        if len(cases) == len(IMPLS):
            by_impl["fusedopt"].update(agreement(*cases, values))
        if not cases:
            return
        # Fair, equal work: torch's unscale_ and clip_grad_norm_ rewrite the grads in place (each
        # iteration would shrink them by the scale), so before EVERY timed iteration both sides
        # get their grads re-filled from the saved scaled copy, outside the timed span; fusedopt,
        # which leaves its grads alone, pays the same untimed copy so both start from the same
        # device and cache state. Each iteration is timed from an idle device.
        timings = time_side_by_side(cases, lambda case: case.refill(scaled), device, repeats=cfg.repeats,
                                    window_s=cfg.window_s, warmup=cfg.warmup,
                                    max_calls_per_window=cfg.max_calls_per_window)
        for case, timing in zip(cases, timings):
            row = by_impl[case.impl]
            row.update(status="ok", **timing.as_ms())
            bps = row["bytes_per_iter"] / timing.median_s
            row["gbs"] = bps / 1e9
            row["copy_fraction"] = bps / copy_bps if copy_bps else None
            case.refill(scaled)
            row["launches_per_iter"] = count_device_launches(case.iteration, device)
    except Exception as exc:
        for row in rows:
            if row["status"] in ("pending", "ok"):
                row.update(status="failed", reason=_short(exc))


def add_ratios(rows):
    """``torch_over_fusedopt`` (torch's time / fusedopt's; > 1: fusedopt is faster) on both rows
    of every set where both ran."""
    ok = {(r["param_set"], r["impl"]): r for r in rows if r["status"] == "ok"}
    for row in rows:
        t, f = ok.get((row["param_set"], "torch-composition")), ok.get((row["param_set"], "fusedopt"))
        if t is not None and f is not None:
            row["torch_over_fusedopt"] = t["median_ms"] / f["median_ms"]


def set_copy_fractions(rows, copy_bps):
    for row in rows:
        if row["status"] == "ok":
            row["copy_fraction"] = row["bytes_per_iter"] / (row["median_ms"] / 1e3) / copy_bps


def run(cfg, rows, *, copy_bps, progress, on_progress=None):
    """Measure every pending row, one parameter set at a time."""
    for pset in cfg.sets:
        todo = [r for r in rows if r["param_set"] == pset.name and r["status"] == "pending"]
        if not todo:
            continue
        progress.set_postfix_str(f"epilogue {pset.name}", refresh=False)
        if cfg.deadline is not None and time.monotonic() > cfg.deadline:
            for row in todo:
                row.update(status="skipped", reason="time budget (--time-budget) used up")
        else:
            t0 = time.monotonic()
            run_set(pset, todo, cfg, copy_bps)
            gc.collect()  # the set's tensors, before the next set allocates its own
            if cfg.device.type == "cuda":
                torch.cuda.empty_cache()
            for row in todo:
                row["bench_wall_s"] = time.monotonic() - t0
        progress.update(len(todo))
        if on_progress is not None:
            on_progress()
    add_ratios(rows)
