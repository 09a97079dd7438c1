"""The markdown report and the target checks, from the JSON-ready results of the step, epilogue
and batch benchmarks: a summary table first, then the details. A column no row of a table has a
value for (launches on a CPU, compile times without compiled rows) is left out."""

from .cases import LABELS, TORCH_IMPLS

UNRELIABLE = "†"


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
            + f" · {env['timestamp']}\n\n`{env.get('command', 'python -m bench')}`" + "".join(busy_warning(env)))


def busy_warning(env):
    """A line when other work loaded the machine as a CPU run started."""
    load = env.get("load_average") or {}
    cpus = load.get("cpus") or 1
    if env.get("device") == "cpu" and load.get("load_1min", 0) > 0.5 * cpus:
        return [f"\n\n**Warning:** system load {load['load_1min']:.1f} on {cpus} CPUs as this run started: "
                "other processes compete for the cores, so CPU timings may be unreliable."]
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


EPILOGUE_ROW = "AdamW epilogue"  # the summary's row of the epilogue benchmark


def summary_markdown(result, epilogue=None):
    """Per parameter set and rule: the fastest torch implementation's time over fusedopt's; with
    the epilogue benchmark's result, one more row: torch's unscale + clip + fused step over
    fusedopt's clip + step, per set."""
    rows, sets = result["rows"], result["param_sets"]
    fused = {(r["param_set"], r["rule"]): r for r in rows if r["impl"] == "fusedopt"}
    if not fused:
        return ""
    flagged = False
    epilogue_rows = {(r["param_set"], r["impl"]): r for r in (epilogue or {}).get("rows", [])}

    def epilogue_cell(pset):
        nonlocal flagged
        f, t = epilogue_rows.get((pset, "fusedopt")), epilogue_rows.get((pset, "torch-composition"))
        if f is None or t is None:
            return None
        if f["status"] != "ok" or t["status"] != "ok":
            return "; ".join(f"{r['impl_label']} {r['status']}" for r in (f, t) if r["status"] != "ok")
        mark = f" {UNRELIABLE}" if over_copy(f) or over_copy(t) else ""
        flagged |= bool(mark)
        return f"{t['median_ms'] / f['median_ms']:.2f}x vs {t['impl_label'].replace('torch, ', '')} composition{mark}"

    def cell(pset, rule):
        nonlocal flagged
        f, t = fused.get((pset, rule)), fastest_torch(rows, pset, rule)
        if f is None or f["status"] != "ok":
            return f"fusedopt {f['status']}" if f else None
        if t is None:
            return "no torch row ran"
        mark = f" {UNRELIABLE}" if over_copy(f) or over_copy(t) else ""
        flagged |= bool(mark)
        return f"{t['median_ms'] / f['median_ms']:.2f}x vs {LABELS[t['impl']][6:]}{mark}"

    labels = {r["rule"]: r["rule_label"] for r in rows}
    if epilogue_rows:
        labels[EPILOGUE_ROW] = f"{EPILOGUE_ROW} (AMP unscale + clip + step)"

    def any_cell(pset, rule):
        return epilogue_cell(pset) if rule == EPILOGUE_ROW else cell(pset, rule)

    columns = [("rule", lambda rule: labels[rule])] + [(s["name"], lambda rule, s=s: any_cell(s["name"], rule))
                                                       for s in sets]
    backends = sorted({f"`{r['runs']}` (backend=`{r['backend']}`)" for r in fused.values()})
    out = ["Speed-up of fusedopt over the fastest torch.optim implementation measured in this run, per "
           "parameter set and rule: that implementation's median step time / fusedopt's. **Above 1.00x "
           "fusedopt is faster**, below 1.00x it is slower; after each figure, which torch implementation was "
           f"fastest. fusedopt ran on {', '.join(backends)}. Sets: "
           + "; ".join(f"{s['name']}: {s['description']} ({s['dtype']})" for s in sets) + "."
           + (f" The {EPILOGUE_ROW} row is the epilogue benchmark's: torch's `scaler.unscale_`, `clip_grad_norm_` "
              "and fused AdamW step over fusedopt's `clip_grad_norm_(grad_scaler=)` and step (per iteration)."
              if epilogue_rows else ""), "",
           table(columns, list(labels))]
    if flagged:
        out += ["", unreliable_note(result["copy"], result["env"])]
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


def details(rows, first, per):
    """One row per measurement: `first` (its header and key), then what each measured (a column
    no row has a value for is left out)."""
    def value(key, spec):
        return lambda r: None if r.get(key) is None else format(r[key], spec)

    return table([
        (first[0], lambda r: r[first[1]]), ("implementation", lambda r: r["impl_label"]),
        (f"ms/{per}", lambda r: _ms(r["median_ms"])), ("q20-q80 ms", lambda r: f"{_ms(r['q20_ms'])}-{_ms(r['q80_ms'])}"),
        ("B/param", lambda r: r["bytes_per_param"]), ("GB/s", value("gbs", ",.1f")),
        ("% copy", lambda r: f"{100 * r['copy_fraction']:.0f}" + (f" {UNRELIABLE}" if over_copy(r) else "")
         if r.get("copy_fraction") else None),
        (f"launches/{per}", value("launches_per_step", ",.0f")), ("host ms/step", lambda r: _ms(r.get("host_ms"))),
        ("fusedopt speed-up", lambda r: _x(r.get("fusedopt_speedup"))), ("peak MiB", value("peak_mib", ",.1f")),
        ("temp MiB", value("temp_mib", ",.1f")),
        ("first step s", lambda r: _fmt(r.get("first_call_s"), ".2f") if r["impl"] == "fusedopt" else None),
        ("compile s", value("compile_s", ".1f")), ("note", lambda r: r.get("note"))], rows)


def footnotes(rows, copy, env, per):
    out = ["", f"*fusedopt speed-up*: the row's time / fusedopt's (above 1.00x fusedopt is faster). *first step s*: "
               f"fusedopt's first {per} (state creation, any kernel compilation), not in the median."]
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
        parts.append(f"moves {row['bytes_per_step'] / 1e9:.3g} GB ({row['bytes_per_param']} B/param x "
                     f"{row['n_params'] / 1e6:.1f}M in {n} tensor{'s' if n != 1 else ''})"
                     + (f", copy-bandwidth floor {_ms(row['bytes_per_step'] / copy_bps * 1e3)} ms" if copy_bps else ""))
    if row.get("launches_per_step") is not None:
        parts.append(f"{row['launches_per_step']:,.0f} launches/step")
    if host is not None:
        parts.append(("host-bound: " if host >= 0.7 * ms else "") + f"host {_ms(host)} ms/step ({host / ms:.0%} of the step)")
    return ", ".join(parts)


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

    if result["env"]["device"] == "cuda":
        fo, tf = idx.get(("gpt2", "adam", "fusedopt")), idx.get(("gpt2", "adam", "torch-fused"))
        if fo is not None:
            frac = fo.get("copy_fraction") if fo["status"] == "ok" else None
            add("Adam fp32, GPT-2 small shapes: fraction of copy bandwidth", ">= 90%",
                f"{100 * frac:.1f}%" if frac is not None else "–", None if frac is None else frac >= 0.9,
                explain_step(fo, copy_bps))
            if tf is not None:
                sp = (fo.get("speedup_vs") or {}).get("torch-fused")
                add("Adam fp32, GPT-2 small shapes: speed-up over torch.optim.Adam(fused=True)", ">= 1.10x",
                    _x(sp) or "–", None if sp is None else sp >= 1.1,
                    explain_step(fo, copy_bps) + "; " + explain_step(tf, copy_bps, False))
        for rule in result["config"]["rules"]:
            fo, tf = idx.get(("many-small", rule, "fusedopt")), idx.get(("many-small", rule, "torch-fused"))
            if fo is None or tf is None or tf["status"] == "unsupported":
                continue
            sp = (fo.get("speedup_vs") or {}).get("torch-fused")
            add(f"2,000 small tensors, {fo['rule_label']}: speed-up over torch fused=True", ">= 1.50x",
                _x(sp) or "–", None if sp is None else sp >= 1.5,
                explain_step(fo, copy_bps) + "; " + explain_step(tf, copy_bps, False))
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
        missed = [f"{f['rule_label']} {sp:.2f}x ({_ms(f['median_ms'])} against {t['impl_label']} {_ms(t['median_ms'])} ms"
                  + _bound_note(f, t, required) + ")" for f, t, sp in pairs if sp < required]
        add(f"CPU, {pset['name']}: fusedopt speed-up over torch's fastest, every rule", f">= {required:.2f}x",
            f"{len(pairs) - len(missed)} of {len(pairs)} rules", not missed, f"{pairs[0][0]['impl_label']}; "
            + ("missed: " + "; ".join(missed) if missed else f"lowest {min(sp for _, _, sp in pairs):.2f}x"))
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
    """One row per parameter set: torch's time / fusedopt's, > 1.00x on CUDA, >= 1.20x on the CPU's
    numba kernels (the bytes saved, 48 against 32 per fp32 param, promise 1.5x); a CPU run on
    another backend gives one row that says the target was not measured."""
    cuda = result["env"]["device"] == "cuda"
    runs = result["config"].get("fusedopt_runs")
    if not cuda and runs != "numba":
        return [{"target": CPU_EPILOGUE_TARGET, "required": ">= 1.20x", "measured": "–", "met": None,
                 "why": f"{result['env']['device'].upper()} run: the target is for the numba CPU kernels; here "
                        f"fusedopt ran `{runs}` (backend=`{result['config'].get('fusedopt_backend')}`)"}]
    name, required, at_least = (EPILOGUE_TARGET, "> 1.00x", 1.0) if cuda else (CPU_EPILOGUE_TARGET, ">= 1.20x", 1.2)
    size_note = "" if result["config"]["size"] == "full" else f" (this run used size `{result['config']['size']}`)"
    by_key = {(r["param_set"], r["impl"]): r for r in result["rows"]}
    targets = []
    for pset in result["param_sets"]:
        t, f = by_key.get((pset["name"], "torch-composition")), by_key.get((pset["name"], "fusedopt"))
        if t is None or f is None:
            continue
        ratio = f.get("torch_over_fusedopt")
        if ratio is None:
            why = "; ".join(f"{r['impl']}: {r['status']} ({r['reason']})" for r in (t, f) if r["status"] != "ok")
        else:
            why = "; ".join(
                f"{r['impl']} {_ms(r['median_ms'])} ms (q20-q80 {_ms(r['q20_ms'])}-{_ms(r['q80_ms'])}), "
                f"{r['bytes_per_param']} B/param = {r['gbs']:,.1f} GB/s{_pct(r.get('copy_fraction'))}"
                + (f", {r['launches_per_step']:,.0f} launches" if r.get("launches_per_step") is not None else "")
                for r in (t, f)) + size_note
        met = None if ratio is None else (ratio > at_least if cuda else ratio >= at_least)
        targets.append({"target": f"{name}: {pset['name']} ({pset['dtype']})", "required": required,
                        "measured": _x(ratio) or "–", "met": met, "why": why})
    return targets


# ---------------------------------------------------------------- batch benchmark

def batch_markdown(result):
    cfg, rows = result["config"], result["rows"]
    out = [f"Model preset `{cfg['preset']}` · epoch = {cfg['epoch_samples']:,} samples · synthetic data on the "
           f"device · median of {cfg['repeats']} windows per row · models: "
           + "; ".join(f"**{m['name']}** {m['n_params'] / 1e6:.2f}M params in {m['n_tensors']} tensors"
                       for m in result["models"]),
           "", "Fastest torch implementation per model and rule (optimizer step alone, ms, timed interleaved):", ""]

    def candidate(impl):
        return lambda sel: _ms(sel["candidate_step_ms"][impl]) if isinstance(
            sel["candidate_step_ms"].get(impl), float) else "unsupported"

    out.append(table([("model", lambda s: s["model"]), ("rule", lambda s: s["rule"]),
                      ("for-loop", candidate("torch-forloop")), ("foreach", candidate("torch-foreach")),
                      ("fused", candidate("torch-fused")), ("chosen", lambda s: LABELS[s["best_torch"]])],
                     result["selections"]))
    fused = {(r["model"], r["rule"], r["batch_size"]): r for r in rows if r["role"] == "fusedopt" and r["status"] == "ok"}
    pairs = [(fused.get((t["model"], t["rule"], t["batch_size"])), t) for t in rows
             if t["role"] == "best-torch" and t["status"] == "ok"]

    def both(name, key, fmt):
        return [(f"fusedopt {name}", lambda p: fmt(p[0][key]) if p[0] else None),
                (f"torch {name}", lambda p: fmt(p[1][key]))]

    columns = ([("rule", lambda p: p[1]["rule_label"]), ("batch", lambda p: p[1]["batch_size"]),
                ("torch impl", lambda p: LABELS[p[1]["impl"]])] + both("ms/update", "update_ms", _ms)
               + both("samples/s", "samples_per_s", lambda v: f"{v:,.0f}")
               + both("epoch s", "epoch_s", lambda v: f"{v:,.2f}")
               + both("step share", "step_share", lambda v: f"{100 * v:.0f}%")
               + [("fusedopt gain", lambda p: _x(p[0].get("gain")) if p[0] else None)])
    for model in cfg["models"]:
        out += ["", f"### {model}", "", table(columns, [p for p in pairs if p[1]["model"] == model])]
    fused_label = next((r["impl_label"] for r in rows if r["role"] == "fusedopt"), None)
    out += ["", (f"fusedopt rows: {fused_label}. " if fused_label else "")
            + "*ms/update*: one forward, backward and step; *step share*: the step's part of it; *fusedopt "
              "gain*: torch's time per update / fusedopt's (above 1.00x fusedopt is faster)."]
    missing = not_measured(rows)
    if missing:
        out += ["", "Not measured:"] + missing
    return "\n".join(out)


def batch_targets(result):
    if result["env"]["device"] != "cuda" or not result["config"].get("with_fusedopt", True):
        return []
    targets = []
    for model in result["config"]["models"]:
        for rule in result["config"]["rules"]:
            frows = [r for r in result["rows"] if (r["model"], r["rule"], r["role"]) == (model, rule, "fusedopt")]
            gains = [(r["batch_size"], r["gain"]) for r in frows if r.get("gain") is not None]
            if not gains:
                continue
            worst_bs, worst = min(gains, key=lambda g: g[1])
            best_bs, best = max(gains, key=lambda g: g[1])
            smallest_bs, smallest_gain = min(gains)
            met = worst >= 1.0 and smallest_gain >= 0.98 * best
            why = (f"gain {smallest_gain:.2f}x at batch {smallest_bs}, largest {best:.2f}x at batch {best_bs}, "
                   f"smallest {worst:.2f}x at batch {worst_bs}")
            if not met:
                f = next(r for r in frows if r["batch_size"] == worst_bs)
                t = next(r for r in result["rows"] if (r["model"], r["rule"], r["role"], r["batch_size"])
                         == (model, rule, "best-torch", worst_bs))
                spread = max((r["q80_ms"] - r["q20_ms"]) / r["update_ms"] for r in (f, t))
                why += (f"; at batch {worst_bs}: fusedopt step {_ms(f['step_ms'])} ms of {_ms(f['update_ms'])} ms "
                        f"({f['step_share']:.0%}), {LABELS[t['impl']]} step {_ms(t['step_ms'])} ms of "
                        f"{_ms(t['update_ms'])} ms ({t['step_share']:.0%}); timing spread (q20-q80) {spread:.1%}")
            targets.append({"target": f"batch sweep, {model}, {frows[0]['rule_label']}: throughput >= best torch at "
                                      "every batch size, largest gain at the smallest",
                            "required": ">= 1.00x everywhere",
                            "measured": f"min {worst:.2f}x, at smallest batch {smallest_gain:.2f}x", "met": met,
                            "why": why})
    return targets


def targets_markdown(targets):
    results = {True: "met", False: "**missed**", None: "not measured"}
    return "## Targets\n\n" + table(
        [("target", lambda t: t["target"]), ("required", lambda t: t["required"]),
         ("measured", lambda t: t["measured"]), ("result", lambda t: results[t["met"]]),
         ("measurements", lambda t: t["why"])], targets)


def files_markdown(out_dir, files, plot_error=None):
    lines = ["## Files", "", f"In `{out_dir}`:"] + [f"- `{path}`" for path in files]
    if plot_error:
        lines.append(f"- no plots: {plot_error}")
    return "\n".join(lines)
