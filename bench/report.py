"""Markdown tables and the target checks, from the JSON-ready results of ``step``, ``epilogue``
and ``batch``."""

from .epilogue import bytes_per_param as epilogue_bytes
from .impls import IMPLS, LABELS

NA = "n/a"


def _num(value, fmt, missing=NA):
    return missing if value is None else format(value, fmt)


def _ms(value):
    if value is None:
        return NA
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    if value >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}" if value >= 0.01 else f"{value:.4f}"


def _x(value):
    return NA if value is None else f"{value:.2f}x"


def _table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def header(env, title):
    commit = (env.get("git_commit") or "")[:10]
    dirty = "+local changes" if env.get("git_dirty") else ""
    return "\n".join([
        f"# {title}",
        "",
        f"**{env['device_name']}** · torch {env['torch']} · triton {env['triton']} · "
        f"fusedopt {env['fusedopt']}" + (f" ({commit}{dirty})" if commit else "")
        + f" · {env['timestamp']}",
    ])


# ---------------------------------------------------------------- step benchmark

def step_markdown(result):
    cfg, rows, copy = result["config"], result["rows"], result["copy"]
    out = [
        f"Size preset `{cfg['size']}` · device-to-device copy: **{copy['bytes_per_s'] / 1e9:,.0f} GB/s** "
        f"({copy['buffer_bytes'] / 2**20:,.0f} MiB buffer, bytes read + written, the better of a "
        f"measurement before and after the rows) · fusedopt backend "
        f"`{cfg['fusedopt_backend']}` · median of {cfg['repeats']} timing windows per row",
    ]
    out += busy_warning(result["env"])
    if result.get("notes"):
        out += [f"- {k}: {v}" for k, v in result["notes"].items()]
    for pset in result["param_sets"]:
        out += ["", f"### {pset['name']}: {pset['description']} ({pset['dtype']})", ""]
        body = []
        for row in rows:
            if row["param_set"] != pset["name"]:
                continue
            if row["status"] != "ok":
                body.append([row["rule_label"], row["impl_label"]] + ["–"] * 9
                            + [f"{row['status']}: {row['reason']}"])
                continue
            note = []
            if row.get("cache_resident"):
                note.append("fits in L2")
            body.append([
                row["rule_label"], row["impl_label"], _ms(row["median_ms"]), _num(row["gbs"], ",.1f"),
                _num(None if row.get("copy_fraction") is None else 100 * row["copy_fraction"], ".0f"),
                _num(row.get("launches_per_step"), ",.0f"), _ms(row.get("host_ms")),
                "–" if row["impl"] == "fusedopt" else _x(row.get("fusedopt_speedup")),
                _num(row.get("peak_mib"), ",.1f"), _num(row.get("temp_mib"), ",.1f"),
                _num(row.get("compile_s"), ".1f", "–"), "; ".join(note),
            ])
        out.append(_table(["rule", "implementation", "ms/step", "GB/s", "% copy", "launches/step",
                           "host ms/step", "fusedopt speed-up", "peak MiB", "temp MiB", "compile s",
                           "note"], body))
    out += ["", "### fusedopt speed-up over each torch implementation (its time / fusedopt's)", ""]
    torch_impls = [i for i in IMPLS[1:] if i in cfg["impls"]]
    body = []
    for row in rows:
        if row["impl"] != "fusedopt":
            continue
        vs = row.get("speedup_vs") or {}
        body.append([row["param_set"], row["rule_label"],
                     _ms(row.get("median_ms")) if row["status"] == "ok" else row["status"]]
                    + [_x(vs.get(i)) for i in torch_impls])
    if body:
        out.append(_table(["set", "rule", "fusedopt ms"] + [LABELS[i] for i in torch_impls], body))
    else:
        out.append("(fusedopt not in this run)")
    return "\n".join(out)


def busy_warning(env):
    """A line when other work loaded the machine while a CPU run measured it."""
    load = env.get("load_average") or {}
    cpus = load.get("cpus") or 1
    # measured before the run started (later values count this run's own threads)
    if env.get("device") == "cpu" and load.get("load_1min", 0) > 0.5 * cpus:
        return ["", f"**Warning:** system load {load['load_1min']:.1f} on {cpus} CPUs as this run "
                    "started: other processes compete for the cores, so CPU timings may be unreliable."]
    return []


def _row_index(rows):
    return {(r["param_set"], r["rule"], r["impl"]): r for r in rows}


def explain_step(row, copy_bps, with_bytes=True):
    """Why a step takes what it takes: bytes moved, launches, host overhead."""
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
    if host is not None and not row.get("host_is_step"):
        bound = "host-bound: " if host >= 0.7 * ms else ""
        parts.append(f"{bound}host {_ms(host)} ms/step ({host / ms:.0%} of the step)")
    return ", ".join(parts)


def step_targets(result):
    """The issue's targets that this run can check, each with measured value and explanation."""
    rows, device = result["rows"], result["env"]["device"]
    copy_bps = result["copy"]["bytes_per_s"]
    idx = _row_index(rows)
    size_note = "" if result["config"]["size"] == "full" else \
        f" (targets are stated at full size; this run used `{result['config']['size']}`)"
    targets = []

    def add(name, required, measured, met, why):
        targets.append({"target": name, "required": required, "measured": measured, "met": met,
                        "why": why + (size_note if met is not True else "")})

    if device == "cuda":
        fo = idx.get(("gpt2", "adam", "fusedopt"))
        tf = idx.get(("gpt2", "adam", "torch-fused"))
        if fo is not None:
            ok = fo["status"] == "ok"
            frac = fo.get("copy_fraction") if ok else None
            add("Adam fp32, GPT-2 small shapes: fraction of copy bandwidth", ">= 90%",
                _num(None if frac is None else 100 * frac, ".1f") + "%", None if frac is None else frac >= 0.9,
                explain_step(fo, copy_bps))
            if tf is not None:
                sp = (fo.get("speedup_vs") or {}).get("torch-fused")
                add("Adam fp32, GPT-2 small shapes: speed-up over torch.optim.Adam(fused=True)", ">= 1.10x",
                    _x(sp), None if sp is None else sp >= 1.1,
                    explain_step(fo, copy_bps) + "; " + explain_step(tf, copy_bps, False))
        for rule in result["config"]["rules"]:
            fo = idx.get(("many-small", rule, "fusedopt"))
            tf = idx.get(("many-small", rule, "torch-fused"))
            if fo is None or tf is None or tf["status"] == "unsupported":
                continue
            sp = (fo.get("speedup_vs") or {}).get("torch-fused")
            add(f"2,000 small tensors, {fo['rule_label']}: speed-up over torch fused=True", ">= 1.50x",
                _x(sp), None if sp is None else sp >= 1.5,
                explain_step(fo, copy_bps) + "; " + explain_step(tf, copy_bps, False))
    else:
        for row in rows:
            if row["impl"] != "fusedopt":
                continue
            fe = idx.get((row["param_set"], row["rule"], "torch-foreach"))
            tf = idx.get((row["param_set"], row["rule"], "torch-fused"))
            if fe is None:
                continue
            ratio = None
            if row["status"] == "ok" and fe["status"] == "ok":
                ratio = row["median_ms"] / fe["median_ms"]
            fused_txt = "torch fused: " + (f"{_ms(tf['median_ms'])} ms" if tf and tf["status"] == "ok"
                                          else (tf["status"] if tf else "not run"))
            targets.append({
                "target": f"CPU, {row['param_set']}, {row['rule_label']}: fusedopt time / torch foreach time",
                "required": "<= 1.00", "measured": _num(ratio, ".2f"),
                "met": None if ratio is None else ratio <= 1.0,
                "why": f"fusedopt backend `{row.get('backend', '?')}`: " + explain_step(row, copy_bps)
                       + "; " + explain_step(fe, copy_bps, False) + "; " + fused_txt
                       + (per_tensor_overhead(row, fe) if ratio is not None and ratio > 1.0 else "")})
    return targets


def per_tensor_overhead(fusedopt_row, foreach_row):
    """The CPU path's extra time per tensor: its per-tensor ops against foreach's batched ones."""
    extra_us = (fusedopt_row["median_ms"] - foreach_row["median_ms"]) * 1e3 / fusedopt_row["n_tensors"]
    return (f"; the gap is {extra_us:.1f} us per tensor: fusedopt's CPU path runs each rule as "
            f"per-tensor torch ops (the reference), torch foreach batches each op over all tensors")


# ---------------------------------------------------------------- epilogue benchmark

def _pct(fraction):
    return NA if fraction is None else f"{100 * fraction:.0f}%"


def epilogue_markdown(result):
    cfg, rows, copy = result["config"], result["rows"], result["copy"]
    device = result["env"]["device"]
    if device == "cuda":
        where = "CUDA: fusedopt runs its Triton kernels"
    else:
        where = (f"{device.upper()}: fusedopt backend `{cfg['fusedopt_backend']}`"
                 + {"torch": " (its plain-torch reference path, not the kernels)",
                    "triton": " (the kernels through the Triton interpreter)"}.get(cfg["fusedopt_backend"], ""))
    out = [
        f"AdamW epilogue per iteration: GradScaler unscale + inf check, clip to global 2-norm "
        f"{cfg['max_norm']:g}, update (grads scaled by {cfg['grad_scale']:g}). Device: **{where}** · "
        f"size preset `{cfg['size']}` · device-to-device copy **{copy['bytes_per_s'] / 1e9:,.0f} GB/s** · "
        f"median of {cfg['repeats']} timing windows, each iteration timed from an idle device with the "
        f"scaled grads re-filled (untimed) before it",
    ]
    out += busy_warning(result["env"])
    out += ["", "- torch: `scaler.unscale_(opt)`, `clip_grad_norm_(params, foreach=True)`, `scaler.step(opt)` "
                "with `AdamW(fused=True)`, `scaler.update()`",
            "- fusedopt: `opt.clip_grad_norm_(grad_scaler=scaler)`, `scaler.step(opt)`, `scaler.update()`",
            f"- B/param: bytes each must move per parameter (`bench.epilogue.bytes_per_param`; fp32: torch "
            f"{epilogue_bytes('torch-composition')} = unscale_ read+write g, norm read g, clip read+write g, "
            f"update read p,g,m,v write p,m,v; fusedopt {epilogue_bytes('fusedopt')} = norm read g, update); "
            f"GB/s = those bytes over the time", ""]
    by_key = {(r["param_set"], r["impl"]): r for r in rows}
    body = []
    for pset in result["param_sets"]:
        t, f = by_key.get((pset["name"], "torch-composition")), by_key.get((pset["name"], "fusedopt"))
        if t is None or f is None:
            continue

        def cell(row, fn):
            return fn(row) if row["status"] == "ok" else row["status"]

        def launches(row):
            return _num(row.get("launches_per_iter"), ",.0f")

        notes = [f"{r['impl']}: {r['status']} ({r['reason']})" for r in (t, f) if r["status"] != "ok"]
        if t.get("torch_update") not in (None, "fused"):
            notes.append(f"torch update: AdamW {t['torch_update']} (no fused kernel here)")
        if f.get("max_abs_param_diff") is not None:
            notes.append(f"after 1 iteration from the same start, fusedopt's params differ from torch's by "
                         f"<= {f['max_abs_param_diff']:.1e} (update {f['max_abs_update']:.1e}), exp_avg by "
                         f"{f['exp_avg_rel_diff']:.1e} relative")
        body.append([
            f"{pset['name']} ({pset['dtype']})", f"{pset['n_params'] / 1e6:,.2f}M / {pset['n_tensors']:,}",
            cell(t, lambda r: _ms(r["median_ms"])), cell(f, lambda r: _ms(r["median_ms"])),
            _x(f.get("torch_over_fusedopt")),
            f"{t['bytes_per_param']} / {f['bytes_per_param']}",
            f"{t['bytes_per_iter'] / 1e6:,.1f} / {f['bytes_per_iter'] / 1e6:,.1f}",
            cell(t, lambda r: f"{r['gbs']:,.1f} ({_pct(r.get('copy_fraction'))})"),
            cell(f, lambda r: f"{r['gbs']:,.1f} ({_pct(r.get('copy_fraction'))})"),
            f"{launches(t)} / {launches(f)}", "; ".join(notes),
        ])
    out.append(_table(["set", "params / tensors", "torch ms/iter", "fusedopt ms/iter", "torch / fusedopt",
                       "B/param torch / fusedopt", "MB/iter torch / fusedopt", "torch GB/s (% copy)",
                       "fusedopt GB/s (% copy)", "launches/iter torch / fusedopt", "note"], body))
    return "\n".join(out)


EPILOGUE_TARGET = "epilogue faster than torch's composition on CUDA"


def epilogue_targets(result):
    """One row per parameter set on CUDA (torch's time / fusedopt's > 1); on the CPU one row that
    says the target was not measured (fusedopt's CPU path is not its kernels)."""
    if result["env"]["device"] != "cuda":
        return [{"target": EPILOGUE_TARGET, "required": "> 1.00x", "measured": NA, "met": None,
                 "why": f"{result['env']['device'].upper()} run: the target is for the CUDA kernels; here fusedopt "
                        f"ran its `{result['config']['fusedopt_backend']}` backend"}]
    size_note = "" if result["config"]["size"] == "full" else \
        f" (this run used size `{result['config']['size']}`)"
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
                f"{r['bytes_per_param']} B/param = {r['gbs']:,.1f} GB/s ({_pct(r.get('copy_fraction'))} of copy)"
                + (f", {r['launches_per_iter']:,.0f} launches" if r.get("launches_per_iter") is not None else "")
                for r in (t, f)) + size_note
        targets.append({"target": f"{EPILOGUE_TARGET}: {pset['name']} ({pset['dtype']})", "required": "> 1.00x",
                        "measured": _x(ratio), "met": None if ratio is None else ratio > 1.0, "why": why})
    return targets


# ---------------------------------------------------------------- batch benchmark

def batch_markdown(result):
    cfg, rows = result["config"], result["rows"]
    out = [f"Model preset `{cfg['preset']}` · epoch = {cfg['epoch_samples']:,} samples · synthetic data "
           f"on the device · median of {cfg['repeats']} windows per row"]
    out += busy_warning(result["env"])
    out += ["", "Models: " + "; ".join(f"**{m['name']}** {m['n_params'] / 1e6:.2f}M params in "
                                       f"{m['n_tensors']} tensors" for m in result["models"])]
    out += ["", "Best torch implementation per model and rule (optimizer step alone, ms):", ""]
    body = []
    for sel in result["selections"]:
        c = sel["candidate_step_ms"]
        body.append([sel["model"], sel["rule"]]
                    + [_ms(c[i]) if isinstance(c.get(i), float) else "unsupported"
                       for i in ("torch-forloop", "torch-foreach", "torch-fused")]
                    + [LABELS[sel["best_torch"]]])
    out.append(_table(["model", "rule", "for-loop", "foreach", "fused", "chosen"], body))
    fused_rows = {(r["model"], r["rule"], r["batch_size"]): r for r in rows if r["role"] == "fusedopt"}
    torch_rows = {(r["model"], r["rule"], r["batch_size"]): r for r in rows if r["role"] == "best-torch"}
    for model in cfg["models"]:
        out += ["", f"### {model}", ""]
        body = []
        for rule in cfg["rules"]:
            for bs in cfg["batch_sizes"]:
                f, t = fused_rows.get((model, rule, bs)), torch_rows.get((model, rule, bs))
                if t is None:
                    continue
                f_ok = f is not None and f["status"] == "ok"
                t_ok = t["status"] == "ok"

                def pair(key, fmt):
                    return [fmt(f[key]) if f_ok else (f["status"] if f is not None else "–"),
                            fmt(t[key]) if t_ok else t["status"]]

                rate, secs, share = (lambda v: f"{v:,.0f}"), (lambda v: f"{v:,.2f}"), (lambda v: f"{100 * v:.0f}%")
                update = pair("update_ms", _ms)
                body.append([t["rule_label"], bs, update[0], f"{update[1]} ({LABELS[t['impl']]})",
                             *pair("samples_per_s", rate), *pair("epoch_s", secs), *pair("step_share", share),
                             _x(f.get("gain")) if f is not None else "–"])
        out.append(_table(["rule", "batch", "fusedopt ms/update", "torch ms/update", "fusedopt samples/s",
                           "torch samples/s", "fusedopt epoch s", "torch epoch s", "fusedopt step share",
                           "torch step share", "fusedopt gain"], body))
    return "\n".join(out)


def batch_targets(result):
    if result["env"]["device"] != "cuda" or not result["config"].get("with_fusedopt", True):
        return []
    targets = []
    for model in result["config"]["models"]:
        for rule in result["config"]["rules"]:
            frows = [r for r in result["rows"] if r["model"] == model and r["rule"] == rule
                     and r["role"] == "fusedopt"]
            gains = [(r["batch_size"], r["gain"]) for r in frows if r.get("gain") is not None]
            if not gains:
                continue
            worst_bs, worst = min(gains, key=lambda g: g[1])
            best_bs, best = max(gains, key=lambda g: g[1])
            smallest_bs, smallest_gain = min(gains)
            met = worst >= 1.0 and smallest_gain >= 0.98 * best
            label = frows[0]["rule_label"]
            why = (f"gain {smallest_gain:.2f}x at batch {smallest_bs}, largest {best:.2f}x at batch {best_bs}, "
                   f"smallest {worst:.2f}x at batch {worst_bs}")
            if not met:
                f = next(r for r in frows if r["batch_size"] == worst_bs)
                t = next(r for r in result["rows"] if r["model"] == model and r["rule"] == rule
                         and r["role"] == "best-torch" and r["batch_size"] == worst_bs)
                spread = max((r["q80_ms"] - r["q20_ms"]) / r["update_ms"] for r in (f, t))
                why += (f"; at batch {worst_bs}: fusedopt step {_ms(f['step_ms'])} ms of {_ms(f['update_ms'])} ms "
                        f"({f['step_share']:.0%}), {LABELS[t['impl']]} step {_ms(t['step_ms'])} ms of "
                        f"{_ms(t['update_ms'])} ms ({t['step_share']:.0%}); timing spread (q20-q80) {spread:.1%}")
            targets.append({"target": f"batch sweep, {model}, {label}: throughput >= best torch at every "
                                      f"batch size, largest gain at the smallest", "required": ">= 1.00x everywhere",
                            "measured": f"min {worst:.2f}x, at smallest batch {smallest_gain:.2f}x",
                            "met": met, "why": why})
    return targets


def targets_markdown(targets):
    if not targets:
        return ""
    body = [[t["target"], t["required"], t["measured"],
             {True: "met", False: "**missed**", None: "not measured"}[t["met"]], t["why"]] for t in targets]
    return "\n".join(["## Targets", "", _table(["target", "required", "measured", "result", "measurements"], body)])
