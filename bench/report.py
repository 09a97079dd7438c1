"""The markdown report and the target checks, from the JSON-ready results of the step, epilogue
and batch benchmarks: a summary table first, then the details. A column no row of a table has a
value for (launches on a CPU, compile times without compiled rows) is left out."""

from . import noise
from .cases import LABELS, TORCH_IMPLS

UNRELIABLE = "†"
FLOOR = "‡"
NOISE = "≈"


def _ms(value):
    if value is None:
        return None
    for limit, fmt in ((100, ".0f"), (10, ".1f"), (1, ".2f"), (0.01, ".3f")):
        if value >= limit:
            return format(value, fmt)
    return f"{value:.4f}"


def _x(value):
    return None if value is None else f"{value:.2f}x"


def _fmt(value, spec):
    return None if value is None else format(value, spec)


def table(columns, rows, missing="–"):
    """Markdown table of `rows` through `columns` [(header, row -> cell or None)]; a column whose
    cells are all None is left out, and a None among values shows as `missing`."""
    cells = [[fn(row) for _, fn in columns] for row in rows]
    keep = [j for j in range(len(columns)) if any(c[j] is not None for c in cells)]
    lines = ["| " + " | ".join(columns[j][0] for j in keep) + " |", "|" + "---|" * len(keep)]
    lines += ["| " + " | ".join(missing if c[j] is None else str(c[j]) for j in keep) + " |" for c in cells]
    return "\n".join(lines)


def header(env, title):
    commit = (env.get("git_commit") or "")[:10]
    dirty = "+local changes" if env.get("git_dirty") else ""
    threads = f" · OMP_WAIT_POLICY={env.get('omp_wait_policy')}" if env.get("device") == "cpu" else ""
    return (f"# {title}\n\n**{env['device_name']}** · torch {env['torch']} · triton {env['triton']} · "
            f"fusedopt {env['fusedopt']}" + (f" ({commit}{dirty})" if commit else "") + threads
            + f" · {env['timestamp']}\n\n`{env.get('command', 'python -m bench')}`" + "".join(busy_warning(env))
            + ("".join(quick_warning()) if env.get("quick") else ""))


def quick_warning():
    return ["\n\n**`--quick`: indicative only.** Small sizes, few timing windows and short training: the numbers "
            "check that everything runs and show the shape of the results; quote the full run's (`python -m bench`, "
            "or `bash bench/run.sh --full`)."]


def busy_warning(env):
    """A line when other work loaded the machine as a CPU run started or ended, and what to do."""
    load = env.get("load_average") or {}
    cpus = load.get("cpus") or 1
    loads = [x for x in (load.get("load_1min"), env.get("load_1min_end")) if x is not None]
    if env.get("device") == "cpu" and any(noise.loaded(x, cpus) for x in loads):
        when = " and ".join(f"{x:.1f}" for x in loads)
        return [f"\n\n**Warning: the machine was loaded** (1-minute load {when} on {cpus} CPUs at the start"
                + (" and the end" if len(loads) > 1 else "") + " of this run): other processes competed for the "
                "cores, so timings are slower and noisier than the hardware allows, multi-threaded rows most. "
                "Ratios are shown only where the two timings' 20-80% bands are apart. To measure the hardware: "
                "rerun when `uptime` shows a load well below the core count (stop other jobs), or compare the "
                "1-thread rows, which suffer least; `--repeats` adds windows."]
    return []


def over_copy(row):
    """Faster than the copy measured beside it: not a memory-bound measurement."""
    return row.get("status") == "ok" and (row.get("copy_fraction") or 0) > 1.0


def unreliable_note(copy, env):
    cache = f" ({env['cache_bytes'] / 2**20:,.0f} MiB here)" if env.get("cache_bytes") else ""
    return (f"{UNRELIABLE} unreliable: the row's bandwidth exceeds the device-to-device copy measured beside it "
            f"in this run ({copy['bytes_per_s'] / 1e9:,.1f} GB/s, bytes read + written, through a "
            f"{copy['buffer_bytes'] / 2**20:,.0f} MiB buffer). A pass that reads and writes every element once "
            f"cannot beat that copy from memory, so its tensors were served from a cache{cache} or the timing is "
            "off: its GB/s and ratios do not compare with the other rows.")


# ---------------------------------------------------------------- step benchmark

def fastest_torch(rows, param_set, rule):
    ran = [r for r in rows if (r["param_set"], r["rule"]) == (param_set, rule)
           and r["impl"] in TORCH_IMPLS and r["status"] == "ok"]
    return min(ran, key=lambda r: r["median_ms"]) if ran else None


def compare(slow, fast):
    """`slow`'s time over `fast`'s as a cell: the ratio where the two timings' 20-80% bands are
    apart; `≈` where they overlap (inside the noise, no ratio); `‡` where either sits on a timing
    floor."""
    if slow.get("floor") or fast.get("floor"):
        return f"floor {FLOOR}"
    r = noise.ratio(slow, fast)
    return f"{NOISE} (noise)" if r is None else f"{r:.2f}x"


def summary_markdown(result, epilogue=None):
    """Per parameter set and rule: the fastest torch implementation's time over fusedopt's; and
    the epilogue (unscale + clip + AdamW), torch's composition over fusedopt's."""
    rows, sets = result["rows"], result["param_sets"]
    fused = {(r["param_set"], r["rule"]): r for r in rows if r["impl"] == "fusedopt"}
    if not fused:
        return ""
    cached = 0

    def cell(pset, rule):
        nonlocal cached
        f, t = fused.get((pset, rule)), fastest_torch(rows, pset, rule)
        if f is None or f["status"] != "ok":
            return f"fusedopt {f['status']}" if f else None
        if t is None:
            return "no torch row ran"
        cached += bool(over_copy(f) or over_copy(t))
        return f"{compare(t, f)} vs {LABELS[t['impl']][6:]}"

    labels = {r["rule"]: r["rule_label"] for r in rows}
    keys = list(labels)
    if epilogue:
        ep = {(r["param_set"], r["impl"]): r for r in epilogue["rows"]}

        def epilogue_cell(pset):
            t, f = ep.get((pset, "torch-composition")), ep.get((pset, "fusedopt"))
            if t is None or f is None:
                return None
            if "ok" != t["status"] or "ok" != f["status"]:
                return "; ".join(f"{r['impl']} {r['status']}" for r in (t, f) if r["status"] != "ok")
            return f"{compare(t, f)} vs composition"

        labels["epilogue"] = "AdamW epilogue (unscale + clip + step)"
        keys.append("epilogue")
    columns = [("rule", lambda rule: labels[rule])] + [
        (s["name"], lambda rule, s=s: epilogue_cell(s["name"]) if rule == "epilogue" else cell(s["name"], rule))
        for s in sets]
    backends = sorted({f"`{r['runs']}` (backend=`{r['backend']}`)" for r in fused.values()})
    out = ["Speed-up of fusedopt over the fastest torch.optim implementation measured in this run, per "
           "parameter set and rule: that implementation's median step time / fusedopt's. **Above 1.00x "
           "fusedopt is faster**, below 1.00x it is slower; after each figure, which torch implementation was "
           f"fastest. fusedopt ran on {', '.join(backends)}. Sets: "
           + "; ".join(f"{s['name']}: {s['description']} ({s['dtype']})" for s in sets) + "."
           + (" The epilogue row: torch's unscale_, clip_grad_norm_ and fused AdamW step over fusedopt's fused "
              "epilogue, per iteration." if epilogue else ""), "",
           table(columns, keys), "",
           f"A ratio is shown only where the two timings' 20-80% bands (over the timing windows) are apart: "
           f"**{NOISE} (noise)** means they overlap, so this run cannot tell the two apart. **floor {FLOOR}**: the "
           "rows sit on a timing floor (see the notes below the details), so they measure the clock or the "
           "scheduler, not the work."]
    if cached:
        out += ["", f"{cached} of these comparisons ran faster than the device-to-device copy (marked "
                f"{UNRELIABLE} in the details): their tensors sat in a cache. Both sides ran side by side on the "
                "same sizes, so the ratio still compares them, but not as memory-bound steps."]
    floors = result.get("floors", []) + ((epilogue or {}).get("floors") or [])
    if floors:
        out += ["", f"Timing floors {FLOOR}: " + "; ".join(floors) + "."]
    return "\n".join(out)


def not_measured(rows):
    """One line per (implementation, status, reason): the rows that did not run, and why."""
    groups = {}
    for r in rows:
        if r["status"] != "ok":
            groups.setdefault((r["impl_label"], r["status"], r["reason"]), []).append(r)
    lines = []
    for (impl, status, reason), members in groups.items():
        rules = ", ".join(dict.fromkeys(r["rule_label"] for r in members))
        sets = ", ".join(dict.fromkeys(r.get("param_set") or f"{r['model']} batch {r['batch_size']}" for r in members))
        lines.append(f"- {impl} for {rules} on {sets}: {status} ({reason})")
    return lines


def speedup_cell(row):
    """The fusedopt speed-up over this row, where the bands are apart and no floor."""
    if row.get("fusedopt_speedup") is None:
        return None
    if row.get("floor"):
        return f"floor {FLOOR}"
    return _x(row["fusedopt_speedup"]) if row.get("speedup_apart") else f"{NOISE} (noise)"


def details(rows, first, per):
    """One row per measurement: `first` (its header and key), then what each measured (a column
    no row has a value for is left out)."""
    def value(key, spec):
        return lambda r: None if r.get(key) is None else format(r[key], spec)

    return table([
        (first[0], lambda r: r[first[1]]), ("implementation", lambda r: r["impl_label"]),
        (f"ms/{per}", lambda r: _ms(r["median_ms"])), ("q20-q80 ms", lambda r: f"{_ms(r['q20_ms'])}-{_ms(r['q80_ms'])}"),
        ("B/param", lambda r: f"{r['bytes_per_param']:.4g}"), ("GB/s", value("gbs", ",.1f")),
        ("% copy", lambda r: f"{100 * r['copy_fraction']:.0f}" + (f" {UNRELIABLE}" if over_copy(r) else "")
         if r.get("copy_fraction") else None),
        (f"launches/{per}", value("launches_per_step", ",.0f")), ("host ms/step", lambda r: _ms(r.get("host_ms"))),
        ("fusedopt speed-up", speedup_cell), ("peak MiB", value("peak_mib", ",.1f")),
        ("temp MiB", value("temp_mib", ",.1f")),
        ("first step s", lambda r: _fmt(r.get("first_call_s"), ".2f") if r["impl"] == "fusedopt" else None),
        ("compile s", value("compile_s", ".1f")), ("note", lambda r: r.get("note"))], rows)


def footnotes(rows, copy, env, per):
    out = ["", f"*fusedopt speed-up*: the row's time / fusedopt's (above 1.00x fusedopt is faster), shown where the "
               f"two 20-80% bands are apart ({NOISE}: inside the noise; {FLOOR}: a timing floor). *first step s*: "
               f"fusedopt's first {per} (state creation, any kernel compilation), not in the median."]
    floors = sorted({r["floor"] for r in rows if r.get("floor")})
    if floors:
        out += ["", f"{FLOOR} timing floor: " + "; ".join(floors) + ". Rows of different work that take the same "
                "time, or times that are all whole multiples of the scheduler's tick, measure the clock or the "
                "process being descheduled, not the work: no ratio is taken from them. Rerun on a quieter machine, "
                "or with a larger --size."]
    if any(over_copy(r) for r in rows):
        out += ["", unreliable_note(copy, env)]
    missing = not_measured(rows)
    return out + (["", "Not measured:"] + missing if missing else [])


def step_markdown(result):
    cfg, rows, copy = result["config"], result["rows"], result["copy"]
    out = [f"Size preset `{cfg['size']}` · device-to-device copy **{copy['bytes_per_s'] / 1e9:,.1f} GB/s** "
           f"({copy['buffer_bytes'] / 2**20:,.0f} MiB buffer, bytes read + written, the better of a measurement "
           f"before and after the rows) · the implementations of each set and rule timed interleaved, median of "
           f"{cfg['repeats']} windows · GB/s: the bytes the rule must move per step (B/param) over the step time"]
    out += [f"- {k}: {v}" for k, v in result.get("notes", {}).items()]
    for pset in result["param_sets"]:
        ran = [r for r in rows if r["param_set"] == pset["name"] and r["status"] == "ok"]
        out += ["", f"### {pset['name']}: {pset['description']} ({pset['dtype']})", "",
                details(ran, ("rule", "rule_label"), "step") if ran else "(no row ran)"]
    return "\n".join(out + footnotes(rows, copy, result["env"], "step"))


def explain_step(row, copy_bps, with_bytes=True):
    """Why a step takes what it takes: time, bandwidth, bytes moved, launches, host overhead."""
    if row is None:
        return "not measured in this run"
    if row["status"] != "ok":
        return f"{row['impl_label']}: {row['status']} ({row['reason']})"
    ms, host = row["median_ms"], row.get("host_ms")
    parts = [f"{row['impl_label']} {_ms(ms)} ms (q20-q80 {_ms(row['q20_ms'])}-{_ms(row['q80_ms'])}) = "
             f"{row['gbs']:,.1f} GB/s" + (f" ({row['copy_fraction']:.0%} of copy)" if row.get("copy_fraction") else "")]
    if row.get("cache_resident"):
        parts.append("its tensors fit in L2")
    if with_bytes:
        n = row["n_tensors"]
        parts.append(f"moves {row['bytes_per_step'] / 1e9:.3g} GB ({row['bytes_per_param']:.4g} B/param x "
                     f"{row['n_params'] / 1e6:.1f}M in {n} tensor{'s' if n != 1 else ''})"
                     + (f", copy-bandwidth floor {_ms(row['bytes_per_step'] / copy_bps * 1e3)} ms" if copy_bps else ""))
    if row.get("launches_per_step") is not None:
        parts.append(f"{row['launches_per_step']:,.0f} launches/step")
    if host is not None:
        parts.append(("host-bound: " if host >= 0.7 * ms else "") + f"host {_ms(host)} ms/step ({host / ms:.0%} of the step)")
    return ", ".join(parts)


def judge(slow, fast, required):
    """(met, measured text) for "fast is `required` times faster than slow", from two timed rows:
    a floor decides nothing (None); inside the noise (20-80% bands overlapping) a target of at
    most 1x counts as met (no measurable loss) and a larger one is met by nobody; else the
    ratio of medians decides."""
    r = slow["median_ms"] / fast["median_ms"]
    if slow.get("floor") or fast.get("floor"):
        return None, f"floor {FLOOR}"
    if not noise.apart(slow, fast):
        return (True if required <= 1.0 else (None if r >= required else False)), f"{r:.2f}x {NOISE} (noise)"
    return r >= required, f"{r:.2f}x"


def step_targets(result):
    """The targets this run can check, each with the measurements behind it."""
    rows, copy_bps = result["rows"], result["copy"]["bytes_per_s"]
    idx = {(r["param_set"], r["rule"], r["impl"]): r for r in rows}
    size_note = "" if result["config"]["size"] == "full" else \
        f" (targets are stated at full size; this run used `{result['config']['size']}`)"
    targets = []

    def add(name, required, measured, met, why):
        targets.append({"target": name, "required": required, "measured": measured, "met": met,
                        "why": why + (size_note if met is not True else "")})

    def versus(name, fo, tf, required):
        if fo["status"] != "ok" or tf["status"] != "ok":
            add(name, f">= {required:.2f}x", "–", None,
                explain_step(fo, copy_bps) + "; " + explain_step(tf, copy_bps))
            return
        met, measured = judge(tf, fo, required)
        add(name, f">= {required:.2f}x", measured, met,
            explain_step(fo, copy_bps) + "; " + explain_step(tf, copy_bps, False))

    # 8-bit states: the bytes saved (16.25 against 28 per fp32 param) pay for the codec, on the sets
    # whose params hold codes (2-D, rows of whole blocks; elsewhere the states are bf16)
    for pset in result["param_sets"]:
        fp32, coded = idx.get((pset["name"], "adamw", "fusedopt")), idx.get((pset["name"], "adamw_8bit", "fusedopt"))
        plain16 = idx.get((pset["name"], "adamw_bf16", "fusedopt"))
        if fp32 is None or coded is None or (plain16 is not None and
                                             coded["bytes_per_param"] >= plain16["bytes_per_param"]):
            continue
        name = f"{pset['name']}: AdamW with 8-bit states no slower than with fp32 states"
        if coded["status"] != "ok" or fp32["status"] != "ok":
            add(name, ">= 1.00x", "–", None, f"8-bit: {coded['status']}; fp32: {fp32['status']}")
            continue
        met, measured = judge(fp32, coded, 1.0)
        add(name, ">= 1.00x", measured, met, f"8-bit states: {explain_step(coded, copy_bps)}; fp32 states: "
            f"{explain_step(fp32, copy_bps, False)}")
    if result["env"]["device"] == "cuda":
        fo, tf = idx.get(("gpt2", "adam", "fusedopt")), idx.get(("gpt2", "adam", "torch-fused"))
        if fo is not None:
            frac = fo.get("copy_fraction") if fo["status"] == "ok" else None
            add("Adam fp32, GPT-2 small shapes: fraction of copy bandwidth", ">= 90%",
                f"{100 * frac:.1f}%" if frac is not None else "–", None if frac is None else frac >= 0.9,
                explain_step(fo, copy_bps))
            if tf is not None:
                versus("Adam fp32, GPT-2 small shapes: speed-up over torch.optim.Adam(fused=True)", fo, tf, 1.1)
        for rule in result["config"]["rules"]:
            fo, tf = idx.get(("many-small", rule, "fusedopt")), idx.get(("many-small", rule, "torch-fused"))
            if fo is None or tf is None or tf["status"] == "unsupported":
                continue
            versus(f"2,000 small tensors, {fo['rule_label']}: speed-up over torch fused=True", fo, tf, 1.5)
        return targets
    # CPU: no slower than torch's fastest eager implementation (fused where torch has it), every
    # rule, one row per set; and >= 2.5x on the many small tensors
    eager = ("torch-forloop", "torch-foreach", "torch-fused")
    for pset in result["param_sets"]:
        pairs = []
        for f in (f for f in rows if f["impl"] == "fusedopt" and f["param_set"] == pset["name"] and f["status"] == "ok"):
            theirs = [idx.get((f["param_set"], f["rule"], impl)) for impl in eager]
            theirs = [t for t in theirs if t is not None and t["status"] == "ok"]
            if theirs:
                t = min(theirs, key=lambda t: t["median_ms"])
                pairs.append((f, t, t["median_ms"] / f["median_ms"]))
        if not pairs:
            continue
        required = 2.5 if pset["name"] == "many-small" else 1.0
        verdicts = [(f, t, sp, *judge(t, f, required)) for f, t, sp in pairs]
        missed = [f"{f['rule_label']} {text} ({_ms(f['median_ms'])} against {t['impl_label']} {_ms(t['median_ms'])} ms"
                  + _bound_note(f, t, required) + ")" for f, t, sp, met, text in verdicts if met is False]
        undecided = [f"{f['rule_label']} {text}" for f, t, sp, met, text in verdicts if met is None]
        noisy = [f"{f['rule_label']} {text}" for f, t, sp, met, text in verdicts if met and NOISE in text]
        met = False if missed else (None if len(undecided) == len(pairs) else True)
        why = [pairs[0][0]["impl_label"]]
        why += ["missed: " + "; ".join(missed)] if missed else []
        why += ["undecided: " + "; ".join(undecided)] if undecided else []
        why += ["inside the noise (no measurable loss): " + ", ".join(noisy)] if noisy else []
        if not missed:
            why.append(f"lowest median ratio {min(sp for _, _, sp in pairs):.2f}x")
        decided = len(pairs) - len(undecided)
        add(f"CPU, {pset['name']}: fusedopt speed-up over torch's fastest, every rule", f">= {required:.2f}x",
            f"{decided - len(missed)} of {decided} rules" + (f" ({len(undecided)} undecided)" if undecided else ""),
            met, "; ".join(why))
    return targets


def _bound_note(fused, theirs, required):
    """Where fusedopt's row runs near copy bandwidth (and not above it, from a cache): the share
    of it that `required` would need."""
    fraction = fused.get("copy_fraction")
    if not fraction or not 0.5 <= fraction <= 1.0:
        return ""
    needed = fraction * required * fused["median_ms"] / theirs["median_ms"]
    return f"; fusedopt at {fraction:.0%} of copy bandwidth, {required:.2f}x would need {needed:.0%}"


# ---------------------------------------------------------------- epilogue benchmark

def _pct(fraction):
    return "" if fraction is None else f" ({100 * fraction:.0f}%{' ' + UNRELIABLE if fraction > 1 else ''})"


def epilogue_markdown(result):
    cfg, rows, copy = result["config"], result["rows"], result["copy"]
    fused_label = next((f"fusedopt ({r['runs']})" for r in rows if r["impl"] == "fusedopt"), "fusedopt")
    out = [f"AdamW epilogue per iteration: GradScaler unscale + inf check, clip to global 2-norm "
           f"{cfg['max_norm']:g}, update (grads scaled by {cfg['grad_scale']:g}) · size preset `{cfg['size']}` · "
           f"device-to-device copy **{copy['bytes_per_s'] / 1e9:,.1f} GB/s** · both timed interleaved, median of "
           f"{cfg['repeats']} windows, each iteration from an idle device with the scaled grads re-filled "
           "(untimed) before it", "",
           "- torch: `scaler.unscale_(opt)`, `clip_grad_norm_(params, foreach=True)`, `scaler.step(opt)` with "
           "`AdamW(fused=True)`, `scaler.update()`",
           f"- {fused_label}: `opt.clip_grad_norm_(grad_scaler=scaler)`, `scaler.step(opt)`, `scaler.update()`",
           "- B/param: bytes each must move per param (fp32: torch 48 = unscale_ read+write g, norm read g, clip "
           "read+write g, update read p,g,m,v write p,m,v; fusedopt 32 = norm read g, update); GB/s = those bytes "
           "over the time", ""]
    ran = [r for r in rows if r["status"] == "ok"]
    out.append(details(ran, ("set", "param_set"), "iter") if ran else "(no row ran)")
    return "\n".join(out + footnotes(rows, copy, result["env"], "iteration"))


EPILOGUE_TARGET = "epilogue faster than torch's composition on CUDA"
CPU_EPILOGUE_TARGET = "epilogue on the CPU at least 1.2x torch's composition"


def epilogue_targets(result):
    """One row per parameter set: torch's composition's time / fusedopt's, > 1.00x on CUDA and
    >= 1.20x on the CPU's numba kernels (the bytes saved, 48 against 32 per fp32 param, promise
    1.5x; inside the noise, it cannot be met); a CPU run on another backend gives one row that says
    the target was not measured."""
    cuda = result["env"]["device"] == "cuda"
    runs = result["config"].get("fusedopt_runs")
    if not cuda and runs != "numba":
        return [{"target": CPU_EPILOGUE_TARGET, "required": ">= 1.20x", "measured": "–", "met": None,
                 "why": f"{result['env']['device'].upper()} run: the target is for the numba CPU kernels; here "
                        f"fusedopt ran `{runs}` (backend=`{result['config'].get('fusedopt_backend')}`)"}]
    name, required = (EPILOGUE_TARGET, 1.0 + 1e-9) if cuda else (CPU_EPILOGUE_TARGET, 1.2)
    size_note = "" if result["config"]["size"] == "full" else f" (this run used size `{result['config']['size']}`)"
    by_key = {(r["param_set"], r["impl"]): r for r in result["rows"]}
    targets = []
    for pset in result["param_sets"]:
        t, f = by_key.get((pset["name"], "torch-composition")), by_key.get((pset["name"], "fusedopt"))
        if t is None or f is None:
            continue
        if t["status"] != "ok" or f["status"] != "ok":
            met, measured = None, "–"
            why = "; ".join(f"{r['impl']}: {r['status']} ({r['reason']})" for r in (t, f) if r["status"] != "ok")
        else:
            met, measured = judge(t, f, required)
            why = "; ".join(
                f"{r['impl']} {_ms(r['median_ms'])} ms (q20-q80 {_ms(r['q20_ms'])}-{_ms(r['q80_ms'])}), "
                f"{r['bytes_per_param']:.4g} B/param = {r['gbs']:,.1f} GB/s{_pct(r.get('copy_fraction'))}"
                + (f", {r['launches_per_step']:,.0f} launches" if r.get("launches_per_step") is not None else "")
                for r in (t, f)) + size_note
            if not cuda:
                why = f"{f.get('impl_label', 'fusedopt')}; " + why
        targets.append({"target": f"{name}: {pset['name']} ({pset['dtype']})",
                        "required": "> 1.00x" if cuda else ">= 1.20x", "measured": measured, "met": met, "why": why})
    return targets


# ---------------------------------------------------------------- batch benchmark

def _band_ms(row, prefix=""):
    return f"{_ms(row[prefix + 'median_ms'])} ({_ms(row[prefix + 'q20_ms'])}-{_ms(row[prefix + 'q80_ms'])})"


def _threads(t):
    return "device" if t is None else str(t)


def gain_cell(row, ratio_key, gain_key):
    """A fusedopt row's gain over torch: the ratio where the bands are apart, ≈ inside the noise."""
    if row.get(ratio_key) is None:
        return None
    if ratio_key == "update_ratio" and row.get("floor"):
        return f"floor {FLOOR}"
    return _x(row[gain_key]) if row.get(gain_key) is not None else f"{NOISE} (noise)"


def batch_markdown(result):
    cfg, rows = result["config"], result["rows"]
    threads = cfg["threads"]
    fused_label = next((r["impl_label"] for r in rows if r["role"] == "fusedopt"), None)
    out = ["What a batch size costs per update and per epoch, and what the model learns with it: a practitioner's "
           "trade-off. Larger batches take fewer updates per epoch and, on parallel hardware, little more time per "
           "update, so an epoch is faster; but after the same number of epochs they have taken fewer steps, and "
           "with noisier small batches a model often learns more per epoch.", ""]
    out += [f"- **{m['name']}**: {m['description']}; model {m['n_params']:,} params in {m['n_tensors']} tensors"
            for m in result["models"]]
    rule_text = ("linear scaling, lr(B) = lr_ref x B / {0}" if cfg["lr_scaling"] == "linear"
                 else "square-root scaling, lr(B) = lr_ref x sqrt(B / {0})").format(cfg["ref_batch"])
    out += [f"- lr: {rule_text} (lr_ref: the rule's `default_lr` in fusedopt.registry), reached by a linear "
            "warmup over the first "
            f"{cfg['warmup_fraction']:.0%} of the updates of {cfg['epochs']} epochs "
            "(`fusedopt.schedules.warmup_constant`); weights and data order from seed "
            f"{cfg['seed']}, the same for every implementation",
            f"- *ms/update*: forward, backward and step on one batch, median (20-80% band) of {cfg['repeats']} "
            "windows, fusedopt and torch interleaved; *step %*: the optimizer step's share of it",
            f"- *epoch s*: an epoch measured end to end (shuffle, indexing, {cfg['epochs']} epochs per implementation "
            "and thread count, interleaved), median (20-80% band); never extrapolated",
            f"- *after {cfg['epochs']} epochs*: train loss and test accuracy of the fusedopt run (the torch run, from "
            f"the same start, is compared in the last column); *after {cfg['updates']} updates*: the fusedopt run "
            "(continued past the epochs where needed), with the samples it had seen",
            "- threads: " + (", ".join(_threads(t) for t in threads) + " (torch's and so fusedopt's CPU kernels' "
                             "thread count)" if threads != [None] else "the device")
            + (f"; fusedopt rows: {fused_label}" if fused_label else ""), "",
            "Fastest torch implementation per task and rule (the optimizer step alone, ms, timed interleaved):", ""]

    def candidate(impl):
        return lambda sel: _ms(sel["candidate_step_ms"][impl]) if isinstance(
            sel["candidate_step_ms"].get(impl), float) else "unsupported"

    out.append(table([("task", lambda s: s["task"]), ("rule", lambda s: s["rule"]),
                      ("for-loop", candidate("torch-forloop")), ("foreach", candidate("torch-foreach")),
                      ("fused", candidate("torch-fused")), ("chosen", lambda s: LABELS[s["best_torch"]])],
                     result["selections"]))
    ok = [r for r in rows if r["status"] == "ok"]
    torch_rows = {(r["task"], r["rule"], r["batch_size"], r["threads"]): r for r in ok if r["role"] == "best-torch"}
    fused_rows = {(r["task"], r["rule"], r["batch_size"], r["threads"]): r for r in ok if r["role"] == "fusedopt"}
    for task in cfg["tasks"]:
        for rule in cfg["rules"]:
            # batch sizes ascending, at each the most threads first (None: the device)
            keys = sorted({(r["batch_size"], r["threads"]) for r in ok if (r["task"], r["rule"]) == (task, rule)},
                          key=lambda k: (k[0], -(k[1] or 0)))
            if not keys:
                continue
            label = next(r["rule_label"] for r in ok if r["rule"] == rule)
            keyed = [(k, (fused_rows.get((task, rule, *k)), torch_rows.get((task, rule, *k)))) for k in keys]
            keyed = [(k, p) for k, p in keyed if p[1] is not None]
            pairs = [p for _, p in keyed]
            timing = table([
                ("batch", lambda p: p[1]["batch_size"]), ("updates/epoch", lambda p: p[1]["updates_per_epoch"]),
                ("threads", lambda p: _threads(p[1]["threads"])),
                ("fusedopt ms/update", lambda p: _band_ms(p[0]) if p[0] else None),
                (f"{LABELS[pairs[0][1]['impl']]} ms/update", lambda p: _band_ms(p[1])),
                ("fusedopt gain", lambda p: gain_cell(p[0], "update_ratio", "gain") if p[0] else None),
                ("step % fusedopt / torch", lambda p: (f"{100 * p[0]['step_share']:.0f} / " if p[0] else "")
                 + f"{100 * p[1]['step_share']:.0f}"),
                ("fusedopt epoch s", lambda p: _band_s(p[0]) if p[0] else None),
                ("torch epoch s", lambda p: _band_s(p[1])),
                ("epoch gain", lambda p: gain_cell(p[0], "epoch_ratio", "epoch_gain") if p[0] else None)], pairs)
            first_threads = keys[0][1]
            learned = [p for (b, t), p in keyed if t == first_threads]
            learning = table([
                ("batch", lambda p: p[1]["batch_size"]), ("lr", lambda p: f"{p[1]['lr']:.3g}"),
                ("warmup updates", lambda p: p[1]["warmup_updates"]),
                (f"train loss, {cfg['epochs']} epochs", lambda p: f"{(p[0] or p[1])['train_loss']:.3f}"),
                (f"test acc, {cfg['epochs']} epochs", lambda p: f"{100 * (p[0] or p[1])['test_acc']:.1f}%"),
                (f"test acc, {cfg['updates']} updates", lambda p: _at_updates(p[0] or p[1])),
                ("fusedopt - torch test acc", lambda p: f"{100 * p[0]['test_acc_vs_torch']:+.1f} pts"
                 if p[0] and p[0].get("test_acc_vs_torch") is not None else None)], learned)
            out += ["", f"### {task}, {label}", "", timing, "", learning]
            out += parallelism(task, rule, ok)
    out += ["", f"*fusedopt gain*, *epoch gain*: torch's median / fusedopt's (above 1.00x fusedopt is faster), shown "
                f"only where the two 20-80% bands are apart ({NOISE}: inside the noise)."]
    floors = result.get("floors") or []
    if floors:
        out += ["", f"{FLOOR} timing floor: " + "; ".join(floors) + ": these ms/update measure the scheduler, not "
                "the work."]
    missing = not_measured(rows)
    if missing:
        out += ["", "Not measured:"] + missing
    return "\n".join(out)


def _band_s(row):
    return f"{row['epoch_median_ms'] / 1e3:.3g} ({row['epoch_q20_ms'] / 1e3:.3g}-{row['epoch_q80_ms'] / 1e3:.3g})"


def _at_updates(row):
    at = row.get("at_updates") or {}
    if "test_acc" not in at:
        return None
    return f"{100 * at['test_acc']:.1f}% ({at['samples']:,} samples)"


def parallelism(task, rule, ok):
    """What threads (or the device) buy: the largest batch against batch 1 per update, and all
    threads against 1 at the largest batch, each ratio only where the bands are apart."""
    fused = sorted((r for r in ok if (r["task"], r["rule"], r["role"]) == (task, rule, "fusedopt")),
                   key=lambda r: r["batch_size"])
    if not fused:
        fused = sorted((r for r in ok if (r["task"], r["rule"]) == (task, rule)), key=lambda r: r["batch_size"])
    by = {(r["batch_size"], r["threads"]): r for r in fused}
    sizes = sorted({r["batch_size"] for r in fused})
    threads = sorted({r["threads"] or 0 for r in fused}, reverse=True)
    lines = []
    small, large = sizes[0], sizes[-1]
    for t in threads:
        a, b = by.get((small, t or None)), by.get((large, t or None))
        if a is None or b is None or small == large:
            continue
        cost = noise.ratio(b, a)
        where = f"at {_threads(t or None)} thread{'s' if t != 1 else ''}, an update of batch {large} takes "
        if cost is None:
            lines.append(where + f"{NOISE} one of batch {small} (inside the noise) for {large // small}x the samples")
            continue
        lines.append(where + f"{cost:.1f}x one of batch {small} for {large // small}x the samples "
                     f"({b['samples_per_s'] / a['samples_per_s']:.0f}x the samples/s)"
                     + (f" (less than batch {small}'s: those small updates were slowed by competing work)"
                        if cost < 1 else ""))
    if len(threads) > 1:
        many, one = by.get((large, threads[0])), by.get((large, 1))
        if many and one:
            r = noise.ratio(one, many)
            lines.append(f"at batch {large}, {threads[0]} threads against 1: "
                         + (f"{r:.2f}x ({'faster' if r > 1 else 'slower'})" if r else f"{NOISE} (inside the noise)")
                         + ("; more threads slower: the other cores were busy, or the work is too small to share"
                            if r and r < 1 else ""))
    return ["", "Parallelism (" + fused[0]["impl_label"] + "): " + "; ".join(lines) + "."] if lines else []


def batch_targets(result):
    """On CUDA, per task and rule: fusedopt no slower than torch at any batch size (inside the
    noise counts as no slower), and its gain largest at the smallest batch."""
    if result["env"]["device"] != "cuda" or not result["config"].get("with_fusedopt", True):
        return []
    targets = []
    for task in result["config"]["tasks"]:
        for rule in result["config"]["rules"]:
            frows = [r for r in result["rows"] if (r["task"], r["rule"], r["role"]) == (task, rule, "fusedopt")
                     and r.get("update_ratio") is not None]
            if not frows:
                continue
            slower = [r for r in frows if r.get("gain") is not None and r["gain"] < 1.0]
            best = max(frows, key=lambda r: r["update_ratio"])
            smallest = min(frows, key=lambda r: r["batch_size"])
            met = not slower and smallest["update_ratio"] >= 0.98 * best["update_ratio"]
            why = (f"at batch {smallest['batch_size']}: {gain_cell(smallest, 'update_ratio', 'gain')} "
                   f"(median ratio {smallest['update_ratio']:.2f}x); largest median ratio "
                   f"{best['update_ratio']:.2f}x at batch {best['batch_size']}")
            if slower:
                why += "; slower at batch " + ", ".join(
                    f"{r['batch_size']} ({r['gain']:.2f}x: fusedopt step {_ms(r['step_ms'])} of "
                    f"{_ms(r['median_ms'])} ms)" for r in slower)
            targets.append({"target": f"batch sweep, {task}, {frows[0]['rule_label']}: time per update no worse than "
                                      "torch's at every batch size, the largest gain at the smallest",
                            "required": ">= 1.00x everywhere", "measured": f"{len(frows) - len(slower)} of "
                            f"{len(frows)} batch sizes", "met": met, "why": why})
    return targets


def targets_markdown(targets, quick=False):
    results = {True: "met", False: "**missed**", None: "not measured"}
    note = " (indicative: --quick)" if quick else ""
    return "## Targets\n\n" + ("With `--quick` these verdicts are indicative only: small sizes and few windows.\n\n"
                                if quick else "") + table(
        [("target", lambda t: t["target"]), ("required", lambda t: t["required"]),
         ("measured", lambda t: t["measured"]), ("result", lambda t: results[t["met"]] + note),
         ("measurements", lambda t: t["why"])], targets)


def files_markdown(out_dir, files, plot_error=None):
    lines = ["## Files", "", f"In `{out_dir}`:"] + [f"- `{path}`" for path in files]
    if plot_error:
        lines.append(f"- no plots: {plot_error}")
    return "\n".join(lines)
