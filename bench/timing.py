"""Measuring one callable: device time per call, host time per call, launches, temporary memory.

Device time: CUDA event pairs around windows of calls (one synchronisation per window), or
``time.perf_counter`` on the CPU; the median over windows is reported with its 20/80 quantiles.
"""

import contextlib
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

    def as_ms(self):
        return {
            "median_ms": self.median_s * 1e3,
            "q20_ms": self.q20_s * 1e3,
            "q80_ms": self.q80_s * 1e3,
            "calls_per_window": self.calls_per_window,
            "windows": self.windows,
        }


def quantile(values, q):
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def time_window(fn, device, calls):
    """Seconds that ``calls`` back-to-back calls of ``fn`` take on the device."""
    if device.type == "cuda":
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        synchronize(device)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return time.perf_counter() - t0


def time_calls(fn, device, *, repeats, window_s, warmup=2, max_calls_per_window=200):
    """Median time of one call of ``fn`` over ``repeats`` windows of about ``window_s`` each."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    last = time_window(fn, device, 1)
    per_call, counts = [], []
    for _ in range(repeats):
        # size each window from the previous one, so one slow outlier cannot stretch the run
        calls = max(1, min(max_calls_per_window, math.ceil(window_s / max(last, 1e-7))))
        last = time_window(fn, device, calls) / calls
        per_call.append(last)
        counts.append(calls)
    return Timing(statistics.median(per_call), quantile(per_call, 0.2), quantile(per_call, 0.8),
                  max(counts), repeats)


def host_time(fn, device, repeats):
    """Median wall time from calling ``fn`` to its return, each call starting with an idle device.

    On CUDA this is the CPU cost of issuing the work (no synchronisation inside the timed span);
    it bounds the step from below when the tensors are many and small.
    """
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
    """Kernels (and device copies/memsets) one call of ``fn`` runs on CUDA, via the profiler.

    Returns None on the CPU, where there are no launches to count, or when the profiler fails.
    """
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
            events = prof.profiler.kineto_results.events()
            count = sum(1 for e in events if e.device_type() == DeviceType.CUDA)
        except AttributeError:
            count = sum(1 for e in prof.events() if e.device_type == DeviceType.CUDA)
    except Exception:  # the profiler is optional evidence; a failure must not stop the run
        return None
    return count / calls


def temporary_bytes(fn, device):
    """Peak bytes allocated during one call of ``fn`` above what was allocated before it.

    CUDA: the caching allocator's peak counter. CPU: allocation records of the profiler
    (``profile_memory=True``) replayed in time order. None when neither is available.
    """
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
        records = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
        records.sort(key=lambda e: e.start_ns())
        current = peak = 0
        for record in records:
            current += record.nbytes()
            peak = max(peak, current)
        return peak
    except Exception:
        return None


def copy_bandwidth(device, nbytes, *, repeats, window_s):
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    numel = nbytes // 4
    src = torch.empty(numel, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    timing = time_calls(lambda: dst.copy_(src), device, repeats=repeats, window_s=window_s)
    result = {
        "buffer_bytes": numel * 4,
        **timing.as_ms(),
        "bytes_per_s": 2 * numel * 4 / timing.median_s,
    }
    del src, dst
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result
