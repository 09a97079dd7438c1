"""Batch-size sweep on real data: what a batch size costs per update and per epoch, and what the
model learns with it, fusedopt against the fastest torch.optim implementation.

For each task (bench/tasks.py), rule and batch size B:
- time per update: forward, backward and step on a fixed batch, fusedopt and torch timed
  interleaved, median and 20-80% band over windows, and the step's share of it;
- training: from the same initial weights and data order, fusedopt and torch train a fixed number
  of epochs, their epochs interleaved and each timed (the measured time per epoch, never
  extrapolated); then train loss and test accuracy; fusedopt's run goes on to a fixed number of
  updates, where the same is recorded;
- on a CPU both at 1 thread and at all threads, so what parallel hardware buys at each batch size
  is measured.
The lr follows the linear scaling rule, lr(B) = lr_ref * B / ref_batch (lr_ref the registry
rule's default_lr, the lr at which its short runs move well away from the start), reached by a
linear warmup (fusedopt.schedules.warmup_constant); ``--lr-scaling sqrt`` takes sqrt(B / ref_batch).
"""

import dataclasses
import math
import time
from dataclasses import dataclass

import torch

from fusedopt import schedules

from . import cases, noise, tasks
from .env import synchronize
from .step import short
from .timing import time_interleaved, time_split_interleaved

CANDIDATES = ("torch-forloop", "torch-foreach", "torch-fused")
TASKS = tasks.TASKS


def preset_for_scale(scale):
    """The largest size preset at or below a parameter-set scale: the models' widths."""
    fitting = [name for name, value in cases.SIZES.items() if value <= scale * 1.0001]
    return max(fitting, key=cases.SIZES.get) if fitting else "tiny"


@dataclass
class BatchConfig:
    device: torch.device
    tasks: list  # names
    preset: str  # model widths (tasks.WIDTHS)
    rules: list
    batch_sizes: dict = None  # task name -> batch sizes (resolve_batch_sizes)
    loaded: dict = None  # task name -> tasks.Task, on the device
    epochs: int = 4  # training length for "after a fixed number of epochs"
    updates: int = 100  # fusedopt's run goes on to this many updates, for "after a fixed number of updates"
    ref_batch: int = 32  # the batch size at which the lr is the registry rule's default_lr
    lr_scaling: str = "linear"  # or "sqrt"
    warmup_fraction: float = 0.1  # of the updates in `epochs` epochs, at least one
    threads: list = None  # CPU thread counts; None: all threads and 1
    repeats: int = 5
    window_s: float = 0.03
    with_fusedopt: bool = True
    fusedopt_backend: str = "auto"
    seed: int = 0
    max_train: int = None  # a smaller training set (tests)
    deadline: float = None


def default_batch_sizes(quick, n_train):
    """Powers of 4 from 1 up to half the training set, and the whole set; quick: 4 x powers of 8
    (batch 1's epochs, thousands of updates each, are most of a sweep's time)."""
    first, step = (4, 8) if quick else (1, 4)
    return sorted({first * step**k for k in range(12) if first * step**k <= n_train / 2} | {n_train})


def resolve_batch_sizes(spec, n_train, quick):
    if spec is None:
        return default_batch_sizes(quick, n_train)
    sizes = {n_train if b == "all" else int(b) for b in spec}
    if any(b < 1 for b in sizes):
        raise SystemExit("--batch-sizes must be positive")
    return sorted({min(b, n_train) for b in sizes})


def default_threads(device):
    """All of torch's threads and 1 on a CPU (one entry where torch has one); [None] on a GPU."""
    if device.type != "cpu":
        return [None]
    return sorted({torch.get_num_threads(), 1}, reverse=True)


class threads_set:
    """torch's (and so fusedopt's CPU kernels') thread count for a block; None leaves it."""

    def __init__(self, n):
        self.n = n

    def __enter__(self):
        self.saved = torch.get_num_threads()
        if self.n is not None:
            torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        torch.set_num_threads(self.saved)


LR_SCALINGS = {"linear": 1.0, "sqrt": 0.5}  # lr(B) = lr_ref * (B / ref_batch) ** power


def scaled_lr(rule, batch_size, ref_batch, scaling="linear"):
    return rule.info.default_lr * (batch_size / ref_batch) ** LR_SCALINGS[scaling]


def with_lr(rule, lr):
    return dataclasses.replace(rule, options={**rule.options, "lr": lr})


def model_summary(task, device):
    params = list(task.build_model(device, 0).parameters())
    return {"name": task.name, "description": task.description, "config": task.config,
            "n_train": task.n_train, "n_test": len(task.x_test),
            "n_params": sum(p.numel() for p in params), "n_tensors": len(params)}


def choose_best_torch(task, rule, cfg):
    """The torch implementation whose step alone is fastest on the task model's params, timed
    interleaved: (name, {impl: median ms or why it did not run}, {impl: timing dict})."""
    why, steps = {}, {}
    for impl in CANDIDATES:
        params = list(task.build_model(cfg.device, cfg.seed).parameters())
        for p in params:
            p.grad = torch.randn_like(p) * 1e-2
        try:
            steps[impl] = cases.build(impl, rule, params)[1]
            steps[impl]()
        except Exception as exc:  # torch fused missing for this rule or device: not a candidate
            steps.pop(impl, None)
            why[impl] = short(exc)
    if not steps:
        raise RuntimeError(f"no torch implementation of {rule.name} runs here: {why}")
    timings = time_interleaved(steps, cfg.device, repeats=max(3, cfg.repeats), window_s=cfg.window_s, warmup=1)
    best = min(timings, key=lambda impl: timings[impl].median_s)
    return best, {i: (timings[i].median_s * 1e3 if i in timings else why[i]) for i in CANDIDATES}, \
        {i: t.as_ms() for i, t in timings.items()}


class Run:
    """One implementation training the task's model from the seed's initial weights."""

    def __init__(self, task, rule, impl, batch_size, cfg, warmup_steps):
        self.task, self.batch_size, self.cfg = task, batch_size, cfg
        self.model = task.build_model(cfg.device, cfg.seed)
        self.optimizer = cases.build(impl, rule, list(self.model.parameters()), cfg.fusedopt_backend)[0]
        self.schedule = schedules.warmup_constant(self.optimizer, warmup_steps=warmup_steps)
        self.step = self.optimizer.step  # the scheduler's wrapper, which tracks the optimizer's steps
        self.updates = self.samples = 0

    def forward_backward(self, x, y):
        self.optimizer.zero_grad()
        loss = tasks.loss_fn(self.model(x), y)
        loss.backward()
        return loss

    def update(self, x, y):
        self.forward_backward(x, y)
        self.step()
        self.schedule.step()
        self.updates += 1
        self.samples += len(x)

    def epoch(self, epoch, stop_at=None, on_stop=None):
        """One pass over the training set in the seed's order for this epoch; seconds it took,
        leaving out `on_stop()` (called once after update `stop_at`, outside the timed span)."""
        n = self.task.n_train
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.cfg.seed * 100_003 + epoch))
        order = order.to(self.cfg.device)
        synchronize(self.cfg.device)
        start, paused = time.perf_counter(), 0.0
        for first in range(0, n, self.batch_size):
            batch = order[first:first + self.batch_size]
            self.update(self.task.x_train[batch], self.task.y_train[batch])
            if self.updates == stop_at and on_stop is not None:
                synchronize(self.cfg.device)
                t0 = time.perf_counter()
                on_stop()
                paused += time.perf_counter() - t0
        synchronize(self.cfg.device)
        return time.perf_counter() - start - paused

    @torch.no_grad()
    def evaluate(self):
        t = self.task
        train_loss = tasks.loss_fn(self.model(t.x_train), t.y_train).item()
        out = self.model(t.x_test)
        return {"train_loss": train_loss, "test_loss": tasks.loss_fn(out, t.y_test).item(),
                "test_acc": tasks.accuracy(out, t.y_test)}


def time_updates(task, rule, impls, batch_size, threads, cfg):
    """{impl: (Timing, step share)} of one update on the first `batch_size` training samples."""
    x, y = task.x_train[:batch_size], task.y_train[:batch_size]
    runs = {impl: Run(task, rule, impl, batch_size, cfg, warmup_steps=0) for impl in impls}
    with threads_set(threads):
        return time_split_interleaved({impl: (lambda r=r: r.forward_backward(x, y), r.step)
                                       for impl, r in runs.items()}, cfg.device, repeats=cfg.repeats,
                                      window_s=cfg.window_s)


def train(task, rule, impls, batch_size, threads_list, cfg, progress):
    """Every (impl, threads) stream trains `cfg.epochs` epochs from the same start, epochs
    interleaved; the first stream goes on to `cfg.updates` updates. {(impl, threads): record}."""
    per_epoch = math.ceil(task.n_train / batch_size)
    warmup = max(1, math.ceil(cfg.warmup_fraction * cfg.epochs * per_epoch))
    streams = [(impl, t) for t in threads_list for impl in impls]
    runs = {s: Run(task, rule, s[0], batch_size, cfg, warmup) for s in streams}
    first = streams[0]
    at_updates = {}

    def snapshot():
        at_updates.update(runs[first].evaluate(), updates=runs[first].updates, samples=runs[first].samples)

    epoch_s = {s: [] for s in streams}
    for epoch in range(cfg.epochs):
        progress.set_postfix_str(f"{task.name} {rule.name} batch {batch_size}: epoch {epoch + 1}/{cfg.epochs} "
                                 f"x {len(streams)}", refresh=True)
        for s in streams[epoch % len(streams):] + streams[:epoch % len(streams)]:
            with threads_set(s[1]):
                stop = cfg.updates if s == first else None
                epoch_s[s].append(runs[s].epoch(epoch, stop, snapshot))
    records = {s: {"epoch_s": epoch_s[s], **runs[s].evaluate()} for s in streams}
    epoch = cfg.epochs
    progress.set_postfix_str(f"{task.name} {rule.name} batch {batch_size}: to {cfg.updates} updates", refresh=True)
    with threads_set(first[1]):
        while runs[first].updates < cfg.updates:
            runs[first].epoch(epoch, cfg.updates, snapshot)
            epoch += 1
    records[first]["at_updates"] = at_updates
    return records, per_epoch, warmup


def sweep(task, rule, best, cfg, progress):
    """The rows of one task and rule: one per batch size, implementation and thread count."""
    impls = (["fusedopt"] if cfg.with_fusedopt else []) + [best]
    threads_list = cfg.threads or default_threads(cfg.device)
    rows = []
    for bs in cfg.batch_sizes[task.name]:
        progress.set_postfix_str(f"{task.name} {rule.name} batch {bs}", refresh=False)
        lr = scaled_lr(rule, bs, cfg.ref_batch, cfg.lr_scaling)
        base = {"task": task.name, "rule": rule.name, "rule_label": rule.label, "batch_size": bs, "lr": lr,
                "status": "pending", "reason": None}
        group = []
        for t in threads_list:
            for impl in impls:
                row = {**base, "impl": impl, "impl_label": cases.LABELS[impl], "threads": t,
                       "role": "fusedopt" if impl == "fusedopt" else "best-torch"}
                if impl == "fusedopt":
                    row.update(cases.fusedopt_info(cfg.fusedopt_backend, cfg.device))
                group.append(row)
        if cfg.deadline is not None and time.monotonic() > cfg.deadline:
            for row in group:
                row.update(status="skipped", reason="time budget (--time-budget) used up")
        else:
            try:
                measure(task, with_lr(rule, lr), impls, bs, threads_list, cfg, group, progress)
            except Exception as exc:
                for row in group:
                    row.update(status="failed", reason=short(exc))
            cases.release(cfg.device)
        rows += group
        progress.update(1)
    return rows


def measure(task, rule, impls, bs, threads_list, cfg, group, progress):
    by_key = {(r["impl"], r["threads"]): r for r in group}
    for t in threads_list:
        for impl, (timing, share) in time_updates(task, rule, impls, bs, t, cfg).items():
            med = timing.median_s
            by_key[impl, t].update(median_ms=med * 1e3, q20_ms=timing.q20_s * 1e3, q80_ms=timing.q80_s * 1e3,
                                   windows=timing.windows, calls_per_window=timing.calls_per_window,
                                   samples_per_s=bs / med, step_share=share, step_ms=share * med * 1e3)
    records, per_epoch, warmup = train(task, rule, impls, bs, threads_list, cfg, progress)
    for (impl, t), rec in records.items():
        times = [s * 1e3 for s in rec.pop("epoch_s")]
        by_key[impl, t].update(status="ok", updates_per_epoch=per_epoch, warmup_updates=warmup,
                               epoch_median_ms=_median(times), epoch_q20_ms=_quantile(times, 0.2),
                               epoch_q80_ms=_quantile(times, 0.8), epochs=len(times), **rec)


def _median(values):
    return _quantile(values, 0.5)


def _quantile(values, q):
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def add_gains(rows):
    """On fusedopt rows, against the torch row of the same task, rule, batch size and threads:
    `update_ratio` and `epoch_ratio` (torch's median / fusedopt's), and `gain`/`epoch_gain`, the
    same where the two 20-80% bands are apart (None inside the noise)."""
    torch_rows = {(r["task"], r["rule"], r["batch_size"], r["threads"]): r for r in rows
                  if r["role"] == "best-torch" and r["status"] == "ok"}
    for row in rows:
        other = torch_rows.get((row["task"], row["rule"], row["batch_size"], row["threads"]))
        if row["role"] != "fusedopt" or row["status"] != "ok" or other is None:
            continue
        row.update(torch_impl=other["impl"], update_ratio=other["median_ms"] / row["median_ms"],
                   gain=None if row.get("floor") or other.get("floor") else noise.ratio(other, row),
                   epoch_ratio=other["epoch_median_ms"] / row["epoch_median_ms"],
                   epoch_gain=noise.ratio(other, row, "epoch_"),
                   test_acc_vs_torch=row["test_acc"] - other["test_acc"])


def run(cfg, progress, on_progress=None):
    """All rows of the sweep: (rows, selections, floors)."""
    rows, selections = [], []
    for name in cfg.tasks:
        task = cfg.loaded[name]
        for rule in cfg.rules:
            progress.set_postfix_str(f"{name} {rule.name} choosing torch impl", refresh=False)
            best, candidates, timings = choose_best_torch(task, rule, cfg)
            selections.append({"task": name, "rule": rule.name, "best_torch": best,
                               "candidate_step_ms": candidates, "candidate_timings": timings})
            rows += sweep(task, rule, best, cfg, progress)
            if on_progress is not None:
                on_progress(rows, selections)
    floors = _floors_only_ticks(rows)
    add_gains(rows)
    return rows, selections, floors


def _floors_only_ticks(rows):
    """Mark rows whose ms/update sit on a scheduler tick (per task, rule and thread count)."""
    groups = {}
    for r in rows:
        groups.setdefault((r["task"], r["rule"], r["threads"]), []).append(r)
    reasons = []
    for (task, rule, threads), group in groups.items():
        ok = [r for r in group if r["status"] == "ok"]
        tick = noise.on_tick([r["median_ms"] for r in ok])
        if tick is not None:
            reason = f"{task} {rule} at {threads or 'device'} threads: all {len(ok)} rows on a multiple of a " \
                     f"{tick:g} ms scheduler tick"
            reasons.append(reason)
            for r in ok:
                r["floor"] = reason
    return reasons
