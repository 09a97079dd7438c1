"""Every measurement the benchmarks take: device time per call (median over windows, several
callables interleaved), host time, launches, temporary memory and the copy-bandwidth yardstick.

Device time: CUDA events on CUDA, ``time.perf_counter`` on the CPU; each window's call count is
sized from the previous window, so one slow outlier cannot stretch the run.
"""

import contextlib
import functools
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass

import torch

from .env import synchronize


@dataclass
class Timing:
    median_s: float
    q20_s: float
    q80_s: float
    calls_per_window: int
    windows: int

    @classmethod
    def of(cls, per_call, calls):
        return cls(statistics.median(per_call), quantile(per_call, 0.2), quantile(per_call, 0.8),
                   max(calls), len(per_call))

    def as_ms(self):
        return {"median_ms": self.median_s * 1e3, "q20_ms": self.q20_s * 1e3, "q80_ms": self.q80_s * 1e3,
                "calls_per_window": self.calls_per_window, "windows": self.windows}


def quantile(values, q):
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


class Clock:
    """Marks on the device's timeline: CUDA events recorded on the stream, or perf_counter."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, marks):
        """Seconds from the first mark to each mark (waits for the last)."""
        if not self.cuda:
            return [m - marks[0] for m in marks]
        marks[-1].synchronize()
        return [marks[0].elapsed_time(m) / 1e3 for m in marks]


def _calls(window_s, last, max_calls):
    return max(1, min(max_calls, math.ceil(window_s / max(last, 1e-7))))


def time_interleaved(fns, device, *, repeats, window_s, warmup=1, setup=None, max_calls=200):
    """{name: Timing} of one call of each of `fns` ({name: callable}), their windows interleaved
    round by round (each round starting one further along), so that a machine that speeds up or
    slows down affects them alike. Without `setup` a window is back-to-back calls; with it,
    every call follows `setup(name)` and a synchronisation, outside the timed span."""
    clock = Clock(device)

    def window(name, calls):
        if setup is None:
            synchronize(device)
            marks = [clock.mark()]
            for _ in range(calls):
                fns[name]()
            marks.append(clock.mark())
            return clock.seconds(marks)[-1] / calls
        total = 0.0
        for _ in range(calls):
            setup(name)
            synchronize(device)
            start = clock.mark()
            fns[name]()
            total += clock.seconds([start, clock.mark()])[-1]
        return total / calls

    names = list(fns)
    for name in names:
        for _ in range(warmup):
            if setup is not None:
                setup(name)
            fns[name]()
    last = {name: window(name, 1) for name in names}
    per_call, counts = {n: [] for n in names}, {n: [] for n in names}
    for k in range(repeats):
        for name in names[k % len(names):] + names[:k % len(names)]:
            counts[name].append(_calls(window_s, last[name], max_calls))
            last[name] = window(name, counts[name][-1])
            per_call[name].append(last[name])
    return {name: Timing.of(per_call[name], counts[name]) for name in names}


def time_calls(fn, device, *, repeats, window_s, warmup=2, max_calls_per_window=200):
    """Timing of one call of `fn` (median over `repeats` windows of about `window_s`)."""
    return time_interleaved({"fn": fn}, device, repeats=repeats, window_s=window_s, warmup=warmup,
                            max_calls=max_calls_per_window)["fn"]


def time_split_interleaved(cases, device, *, repeats, window_s, warmup=2, max_calls=100):
    """{name: (Timing of `first(); second()`, median share of the time spent in `second`)} for
    `cases` {name: (first, second)}, their windows interleaved round by round as in
    `time_interleaved`: a mark between the two in every call, so the share needs no extra
    synchronisation."""
    clock = Clock(device)

    def window(name, calls):
        first, second = cases[name]
        synchronize(device)
        marks = []
        for _ in range(calls):
            marks.append(clock.mark())
            first()
            marks.append(clock.mark())
            second()
        stamps = clock.seconds(marks + [clock.mark()])
        total = stamps[-1]
        in_second = sum(stamps[i + 1] - stamps[i] for i in range(1, len(stamps) - 1, 2))
        return total / calls, in_second / total if total > 0 else 0.0

    names = list(cases)
    for name in names:
        for _ in range(warmup):
            cases[name][0]()
            cases[name][1]()
    last = {name: window(name, 1)[0] for name in names}
    samples, counts = {n: [] for n in names}, {n: [] for n in names}
    for k in range(repeats):
        for name in names[k % len(names):] + names[:k % len(names)]:
            counts[name].append(_calls(window_s, last[name], max_calls))
            samples[name].append(window(name, counts[name][-1]))
            last[name] = samples[name][-1][0]
    return {name: (Timing.of([s[0] for s in samples[name]], counts[name]),
                   statistics.median(s[1] for s in samples[name])) for name in names}


def host_time(fn, device, repeats):
    """Median wall time from calling `fn` to its return, each call starting from an idle device:
    on CUDA the CPU cost of issuing the work, which bounds a step of many small tensors."""
    samples = []
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    synchronize(device)
    return statistics.median(samples)


@contextlib.contextmanager
def quiet_stderr():
    """Silence file descriptor 2: the profiler's C++ side prints start/stop lines there."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def count_device_launches(fn, device, calls=1):
    """Kernels (and device copies/memsets) per call of `fn`, from the profiler; None on the CPU,
    where there is nothing to count, or when the profiler fails."""
    if device.type != "cuda":
        return None
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    try:
        synchronize(device)
        with quiet_stderr(), profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(calls):
                fn()
            synchronize(device)
        try:
            count = sum(1 for e in prof.profiler.kineto_results.events() if e.device_type() == DeviceType.CUDA)
        except AttributeError:
            count = sum(1 for e in prof.events() if e.device_type == DeviceType.CUDA)
        return count / calls
    except Exception:  # the profiler is optional evidence; a failure must not stop the run
        return None


def temporary_bytes(fn, device):
    """Peak bytes allocated during one call of `fn` above what was allocated before it: the
    caching allocator's peak on CUDA, the profiler's allocation records on the CPU."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return max(0, torch.cuda.max_memory_allocated(device) - base)
    from torch.profiler import ProfilerActivity, profile

    try:
        with quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        records = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                         key=lambda e: e.start_ns())
        current = peak = 0
        for record in records:
            current += record.nbytes()
            peak = max(peak, current)
        return peak
    except Exception:
        return None


def copy_bandwidth(device, nbytes, *, repeats, window_s):
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    timing = time_calls(functools.partial(dst.copy_, src), device, repeats=repeats, window_s=window_s)
    del src, dst
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"buffer_bytes": nbytes // 4 * 4, **timing.as_ms(), "bytes_per_s": 2 * (nbytes // 4 * 4) / timing.median_s}
