"""Epilogue benchmark: what a mixed-precision AdamW step does between backward() and the next
forward (AMP's unscale and inf check, clipping to the global grad 2-norm, the update), two ways:

- ``torch-composition``: ``scaler.unscale_(opt)``, ``clip_grad_norm_(params, 1.0, foreach=True)``,
  ``scaler.step(opt)`` with ``AdamW(fused=True)`` (foreach where there is no fused kernel),
  ``scaler.update()``: each pass rewrites the grads in place;
- ``fusedopt``: ``opt.clip_grad_norm_(1.0, grad_scaler=scaler)`` (one reduction, which also does
  the inf check), ``scaler.step(opt)`` (the update unscales and clips in registers), ``update()``.

Each iteration starts with ``scaler.scale(loss)`` so that the scaler holds a scale, as after a
real backward. The two are checked against each other after one iteration, then timed interleaved.
"""

import time
from dataclasses import dataclass

import torch

from . import cases, noise
from .env import synchronize
from .step import run_groups, short
from .timing import count_device_launches, time_interleaved

IMPLS = ("torch-composition", "fusedopt")
LABELS = {"torch-composition": "torch, AdamW fused", "fusedopt": "fusedopt"}
RULE = cases.RULES["adamw"]
MAX_NORM = 1.0
# GradScaler's default initial scale. The grads are drawn as N(0, 1e-2) and stored multiplied by
# it, as a backward of the scaled loss leaves them; the unscaled grads' norm is well above
# MAX_NORM, so the clip factor is < 1 and clipping really scales every grad.
GRAD_SCALE = 2.0**16
# update() would double the scale after 2,000 finite steps; the timing loop must not change the
# values it measures, so the scale stays put (update() runs the same kernel either way)
GROWTH_INTERVAL = 2**30


def bytes_per_param(impl, dtype=torch.float32):
    """Bytes one AdamW epilogue iteration must move per param, reads plus writes, in elements of
    the param's dtype (e bytes): the update reads p, g, m, v and writes p, m, v (7e, 28 B in
    fp32) in both; fusedopt adds the norm's read of g, which also does the inf check (8e, 32 B);
    torch adds unscale_ reading and writing g, the norm reading g, and the clip reading and
    writing g (12e, 48 B). Scalars (scale, found_inf, norm, clip factor) are left out."""
    e = torch.empty((), dtype=dtype).element_size()
    extra = {"fusedopt": 1, "torch-composition": 2 + 1 + 2}
    if impl not in extra:
        raise ValueError(f"unknown epilogue implementation {impl!r}; choose from {', '.join(IMPLS)}")
    return extra[impl] * e + RULE.bytes_per_param(dtype)


@dataclass
class EpilogueConfig:
    device: torch.device
    sets: list
    repeats: int = 7
    window_s: float = 0.02
    warmup: int = 2
    max_calls_per_window: int = 100
    fusedopt_backend: str = "auto"
    deadline: float = None  # time.monotonic() after which no new set starts


def planned_rows(cfg):
    """One row per (parameter set, implementation), in table order (cases.step_cases with the
    epilogue's implementations and bytes)."""
    rows = cases.step_cases(cfg.sets, [RULE], IMPLS, bytes_per_param)
    for row in rows:
        row.update(impl_label=LABELS[row["impl"]], max_norm=MAX_NORM, grad_scale=GRAD_SCALE)
        if row["impl"] == "fusedopt":
            row.update(cases.fusedopt_info(cfg.fusedopt_backend, cfg.device))
    return rows


class Case:
    """One implementation's params (own copies of the values and scaled grads), optimizer,
    GradScaler, and `iteration`, one epilogue."""

    def __init__(self, impl, values, scaled_grads, device, fusedopt_backend):
        self.impl = impl
        self.params = cases.attach(values, [g.clone() for g in scaled_grads])
        self.grads = [p.grad for p in self.params]
        self.scaler = torch.amp.GradScaler(device.type, init_scale=GRAD_SCALE, growth_interval=GROWTH_INTERVAL)
        self.loss = torch.ones((), device=device)  # what scaler.scale() sees each iteration
        self.torch_update = None
        if impl == "fusedopt":
            self.optimizer = RULE.info.optimizer(self.params, **RULE.options, backend=fusedopt_backend)
            return
        try:
            self.optimizer, self.torch_update = torch.optim.AdamW(self.params, **RULE.options, fused=True), "fused"
        except (RuntimeError, ValueError, TypeError):  # no fused kernel for this device/dtype
            self.optimizer, self.torch_update = torch.optim.AdamW(self.params, **RULE.options, foreach=True), "foreach"

    def iteration(self):
        self.scaler.scale(self.loss)
        if self.impl == "fusedopt":
            self.optimizer.clip_grad_norm_(MAX_NORM, grad_scaler=self.scaler)  # grads left as they are
        else:
            self.scaler.unscale_(self.optimizer)  # grads /= scale in place, and the inf/NaN check
            torch.nn.utils.clip_grad_norm_(self.params, MAX_NORM, foreach=True)  # grads *= coef in place
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def refill(self, scaled_grads):
        """Put the scaled grads back: torch's unscale_ and clip rewrite them in place."""
        torch._foreach_copy_(self.grads, scaled_grads)


def agreement(torch_case, fused_case, values):
    """How far apart the two are after one iteration from the same params and grads. The params
    alone would not show a missed unscale or clip (Adam's first step hardly depends on the
    grads' scale); exp_avg = (1 - beta1) * grad does, so both are compared."""
    def max_abs_diff(xs, ys):
        return torch.stack([(x.detach() - y.detach()).abs().max().float() for x, y in zip(xs, ys)]).max().item()

    m_torch = [torch_case.optimizer.state[p]["exp_avg"] for p in torch_case.params]
    m_fused = [fused_case.optimizer.state[p]["exp_avg"] for p in fused_case.params]
    m_size = torch.stack([m.abs().max().float() for m in m_torch]).max().item()
    return {"max_abs_param_diff": max_abs_diff(torch_case.params, fused_case.params),
            "max_abs_update": max_abs_diff(torch_case.params, values),
            "exp_avg_rel_diff": max_abs_diff(m_torch, m_fused) / max(m_size, 1e-30)}


def run_set(pset, rows, cfg):
    """Both implementations of one parameter set built, compared after one iteration, timed."""
    device = cfg.device
    values, grads = pset.make(device)
    scaled = [g.mul_(GRAD_SCALE) for g in grads]  # what backward() of the scaled loss would leave
    by_impl = {row["impl"]: row for row in rows}
    built = {}
    for impl in IMPLS:
        try:
            case = Case(impl, values, scaled, device, cfg.fusedopt_backend)
            synchronize(device)
            t0 = time.perf_counter()
            case.iteration()  # creates the state; JIT compilation happens here
            synchronize(device)
            by_impl[impl]["first_call_s"] = time.perf_counter() - t0
            if case.torch_update is not None:
                by_impl[impl].update(torch_update=case.torch_update,
                                     impl_label=LABELS[impl].replace("fused", case.torch_update))
                if case.torch_update != "fused":
                    by_impl[impl]["note"] = "no fused AdamW here"
            built[impl] = case
        except Exception as exc:
            by_impl[impl].update(status="failed", reason=short(exc))
    if len(built) == len(IMPLS):
        f = by_impl["fusedopt"]
        f.update(agreement(built["torch-composition"], built["fusedopt"], values))
        f["note"] = (f"after one iteration, params differ from torch's by <= {f['max_abs_param_diff']:.1e} "
                     f"(update {f['max_abs_update']:.1e}), exp_avg by {f['exp_avg_rel_diff']:.1e} relative")
    try:
        # torch's unscale_ and clip rewrite the grads in place, so before every timed iteration
        # both sides get the scaled grads back, outside the timed span (fusedopt, which leaves
        # them alone, pays the same untimed copy, so both start from the same cache state)
        timings = time_interleaved({impl: case.iteration for impl, case in built.items()}, device,
                                   repeats=cfg.repeats, window_s=cfg.window_s, warmup=cfg.warmup,
                                   setup=lambda impl: built[impl].refill(scaled), max_calls=cfg.max_calls_per_window)
        for impl, case in built.items():
            row, timing = by_impl[impl], timings[impl]
            row.update(status="ok", **timing.as_ms(), gbs=row["bytes_per_step"] / timing.median_s / 1e9)
            case.refill(scaled)
            row["launches_per_step"] = count_device_launches(case.iteration, device)
    except Exception as exc:
        for impl in built:
            by_impl[impl].update(status="failed", reason=short(exc))


def add_ratios(rows):
    """`torch_over_fusedopt` (torch's time / fusedopt's; above 1 fusedopt is faster) on both rows
    of every set where both ran."""
    ok = {(r["param_set"], r["impl"]): r for r in rows if r["status"] == "ok"}
    for row in rows:
        t, f = ok.get((row["param_set"], "torch-composition")), ok.get((row["param_set"], "fusedopt"))
        if t is not None and f is not None:
            row["torch_over_fusedopt"] = t["median_ms"] / f["median_ms"]
            if row is t:
                row["fusedopt_speedup"] = row["torch_over_fusedopt"]
                row["speedup_apart"] = noise.apart(t, f)


def mark_floors(rows):
    """Timing floors over all sets (their bytes differ): noise.mark_floors' reasons."""
    return noise.mark_floors([rows], "bytes_per_step", prefix_note="epilogue: ")


def run(cfg, rows, *, progress, on_progress=None):
    """Measure every pending row, one parameter set at a time."""
    groups = [(f"epilogue {pset.name}", [r for r in rows if r["param_set"] == pset.name and r["status"] == "pending"])
              for pset in cfg.sets]
    sets = {s.name: s for s in cfg.sets}
    run_groups([g for g in groups if g[1]], lambda group: run_set(sets[group[0]["param_set"]], group, cfg), cfg,
               progress, on_progress)
    add_ratios(rows)
