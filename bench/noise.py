"""Measurement hygiene shared by every benchmark: when two timings may be compared (their 20-80%
bands apart), timing floors (rows of different work taking the same time, or every row on a
multiple of the scheduler tick) and what the machine's load says about a CPU run.

A row here is a dict with ``median_ms``, ``q20_ms`` and ``q80_ms`` (or keys named by the caller).
"""

import os

# Linux scheduler ticks (CONFIG_HZ 1000, 250, 100): a process that loses the CPU for whole time
# slices measures whole ticks, whatever work it did
TICKS_MS = (1.0, 4.0, 10.0)
TICK_TOLERANCE = 0.02  # of a tick: a random time lands this close to a multiple 4% of the time
EQUAL_TIMES = 0.02  # 3 or more medians within 2% of each other ...
DIFFERENT_WORK = 1.3  # ... while the work differs by 1.3x or more: the work cannot set the time


def band(row, prefix=""):
    return row[f"{prefix}q20_ms"], row[f"{prefix}q80_ms"]


def apart(a, b, prefix=""):
    """Whether the 20-80% bands of two timings do not overlap: only then is their ratio shown."""
    (lo_a, hi_a), (lo_b, hi_b) = band(a, prefix), band(b, prefix)
    return hi_a < lo_b or hi_b < lo_a


def ratio(slow, fast, prefix=""):
    """`slow`'s median over `fast`'s where their bands are apart, else None (inside the noise)."""
    if not apart(slow, fast, prefix):
        return None
    return slow[f"{prefix}median_ms"] / fast[f"{prefix}median_ms"]


def spread(row, prefix=""):
    """The 20-80% band as a fraction of the median."""
    lo, hi = band(row, prefix)
    median = row[f"{prefix}median_ms"]
    return (hi - lo) / median if median > 0 else 0.0


def on_tick(times_ms, min_rows=3):
    """The scheduler tick (ms) every time is a whole multiple of, or None. Needs `min_rows` times,
    each at least one tick: by chance all of 3 land within 2% of one tick's multiples about once
    in 5,000 runs."""
    if len(times_ms) < min_rows:
        return None
    for tick in sorted(TICKS_MS, reverse=True):  # the coarsest tick that fits
        if all(t >= tick * (1 - TICK_TOLERANCE) and abs(t / tick - round(t / tick)) <= TICK_TOLERANCE
               for t in times_ms):
            return tick
    return None


def equal_time_clusters(rows, work_key, time_key="median_ms"):
    """Runs of 3 or more rows whose times are within 2% of each other while their work
    (`work_key`) differs by 1.3x or more: something other than the work set their time."""
    ordered = sorted((r for r in rows if r[time_key] > 0), key=lambda r: r[time_key])
    clusters, i = [], 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1][time_key] <= ordered[i][time_key] * (1 + EQUAL_TIMES):
            j += 1
        run = ordered[i:j + 1]
        work = [r[work_key] for r in run]
        if len(run) >= 3 and min(work) > 0 and max(work) / min(work) >= DIFFERENT_WORK:
            clusters.append(run)
            i = j + 1
        else:
            i += 1
    return clusters


def mark_floors(groups, work_key, time_key="median_ms", prefix_note=""):
    """Set ``floor`` (the reason) on the ok rows of each group in `groups` (lists of rows) whose
    times are a timing floor: 3 or more rows of different work at the same time, or every row of
    the group on a multiple of a scheduler tick. Returns the reasons found."""
    reasons = []
    for rows in groups:
        ok = [r for r in rows if r.get("status") == "ok" and r.get(time_key) is not None]
        for run in equal_time_clusters(ok, work_key, time_key):
            times, work = [r[time_key] for r in run], [r[work_key] for r in run]
            reason = (f"{prefix_note}{len(run)} rows of work differing {max(work) / min(work):.1f}x all took "
                      f"{min(times):.3g}-{max(times):.3g} ms")
            reasons.append(reason)
            for r in run:
                r["floor"] = reason
        tick = on_tick([r[time_key] for r in ok])
        if tick is not None:
            reason = f"{prefix_note}all {len(ok)} rows on a multiple of a {tick:g} ms scheduler tick"
            reasons.append(reason)
            for r in ok:
                r["floor"] = reason
    return reasons


def load_now():
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def loaded(load, cpus):
    """A CPU run competes with other work when the 1-minute load exceeds half the cores."""
    return load is not None and cpus and load > 0.5 * cpus
