"""PNG plots from the results: step time and bandwidth by implementation; per batch-size task, time
per update, measured time per epoch and test accuracy against batch size, one panel per rule."""

import math
import os

from .cases import IMPLS

COLORS = {"fusedopt": "#d62728", "torch-forloop": "#7f7f7f", "torch-foreach": "#1f77b4",
          "torch-fused": "#2ca02c", "torch-compiled": "#9467bd"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _grid(n):
    cols = min(2, n)
    return math.ceil(n / cols), cols


def plot_step(result, out_dir):
    """step_time.png and step_bandwidth.png: one panel per parameter set, grouped bars by rule."""
    plt = _pyplot()
    rows = [r for r in result["rows"] if r["status"] == "ok"]
    sets = [p["name"] for p in result["param_sets"]]
    rules = result["config"]["rules"]
    labels = {r["rule"]: r["rule_label"] for r in result["rows"]}
    impls = [i for i in IMPLS if any(r["impl"] == i for r in rows)]
    title = f"{result['env']['device_name']} · torch {result['env']['torch']} · {result['env']['date']}"
    paths = []
    for kind, key, ylabel in (("time", "median_ms", "ms per step (log)"),
                              ("bandwidth", "copy_fraction", "% of device copy bandwidth")):
        nrows, ncols = _grid(len(sets))
        fig, axes = plt.subplots(nrows, ncols, figsize=(7 * ncols, 3.8 * nrows), squeeze=False)
        width = 0.8 / max(1, len(impls))
        for ax, pset in zip(axes.flat, sets):
            for j, impl in enumerate(impls):
                xs, ys = [], []
                for i, rule in enumerate(rules):
                    row = next((r for r in rows if (r["param_set"], r["rule"], r["impl"]) == (pset, rule, impl)), None)
                    if row is not None and row.get(key) is not None:
                        xs.append(i + (j - (len(impls) - 1) / 2) * width)
                        ys.append(row[key] * (100 if kind == "bandwidth" else 1))
                ax.bar(xs, ys, width, label=next(r["impl_label"] for r in rows if r["impl"] == impl), color=COLORS[impl])
            ax.set_xticks(range(len(rules)), [labels.get(r, r) for r in rules], fontsize=8)
            ax.set_title(next(p["description"] for p in result["param_sets"] if p["name"] == pset), fontsize=9)
            ax.set_ylabel(ylabel, fontsize=8)
            if kind == "time" and ax.has_data():
                ax.set_yscale("log")
            else:
                ax.axhline(90, color="black", linestyle=":", linewidth=1)
            ax.grid(axis="y", alpha=0.3)
        for ax in list(axes.flat)[len(sets):]:
            ax.set_visible(False)
        if axes.flat[0].has_data():
            axes.flat[0].legend(fontsize=7)
        fig.suptitle(f"optimizer step {kind} · {title}", fontsize=10)
        fig.tight_layout()
        path = os.path.join(out_dir, f"step_{kind}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_batch(result, out_dir):
    """batch_<task>.png: small multiples, one column per rule; rows: time per update, measured time
    per epoch (both with their 20-80% bands), test accuracy, each against batch size."""
    plt = _pyplot()
    rows = [r for r in result["rows"] if r["status"] == "ok"]
    cfg = result["config"]
    title = f"{result['env']['device_name']} · torch {result['env']['torch']} · {result['env']['date']}"
    threads = cfg["threads"]
    styles = {t: ("-" if k == 0 else "--") for k, t in enumerate(threads)}
    colors = {"fusedopt": COLORS["fusedopt"], "best-torch": "#1f77b4"}
    from matplotlib.ticker import FuncFormatter

    plain = FuncFormatter(lambda v, _: f"{v:g}")
    plain_minor = FuncFormatter(lambda v, _: f"{v:g}" if f"{v:g}"[0] in "25" else "")
    paths = []
    for task in cfg["tasks"]:
        rules = [rule for rule in cfg["rules"] if any((r["task"], r["rule"]) == (task, rule) for r in rows)]
        if not rules:
            continue
        fig, axes = plt.subplots(3, len(rules), figsize=(max(8.0, 3.6 * len(rules) + 1.2), 9.6), squeeze=False,
                                 sharex=True)
        for j, rule in enumerate(rules):
            mine = [r for r in rows if (r["task"], r["rule"]) == (task, rule)]
            for role in ("fusedopt", "best-torch"):
                for t in threads:
                    series = sorted((r for r in mine if (r["role"], r["threads"]) == (role, t)),
                                    key=lambda r: r["batch_size"])
                    if not series:
                        continue
                    bs = [r["batch_size"] for r in series]
                    name = ("fusedopt" if role == "fusedopt" else "torch's fastest") + (
                        "" if t is None else f", {t} thread{'s' if t != 1 else ''}")
                    for ax, prefix, scale in ((axes[0][j], "", 1), (axes[1][j], "epoch_", 1e-3)):
                        ax.plot(bs, [r[prefix + "median_ms"] * scale for r in series], styles[t], marker=".",
                                color=colors[role], label=name)
                        ax.fill_between(bs, [r[prefix + "q20_ms"] * scale for r in series],
                                        [r[prefix + "q80_ms"] * scale for r in series], color=colors[role], alpha=0.15)
            learned = sorted((r for r in mine if r["threads"] == threads[0] and r["role"] == mine[0]["role"]),
                             key=lambda r: r["batch_size"])
            bs = [r["batch_size"] for r in learned]
            ax = axes[2][j]
            ax.plot(bs, [100 * r["test_acc"] for r in learned], "-", marker="o", color="black",
                    label=f"after {cfg['epochs']} epochs")
            at = [(r["batch_size"], r["at_updates"]["test_acc"]) for r in learned if (r.get("at_updates") or {})]
            if at:
                ax.plot([a[0] for a in at], [100 * a[1] for a in at], ":", marker="s", color="#2ca02c",
                        label=f"after {cfg['updates']} updates")
            ax.set_ylim(0, 100)
            torch_impl = next((r["impl_label"] for r in mine if r["role"] == "best-torch"), None)
            axes[0][j].set_title(mine[0]["rule_label"] + (f"\n(against {torch_impl})" if torch_impl else ""),
                                 fontsize=10)
        for j in range(len(rules)):
            for i, ylabel in enumerate(("ms per update\n(lower is better)", "s per epoch, measured\n(lower is better)",
                                        "test accuracy, %\n(higher is better)")):
                ax = axes[i][j]
                ax.set_xscale("log", base=2)
                if i < 2 and ax.has_data():
                    ax.set_yscale("log")
                    ax.yaxis.set_major_formatter(plain)
                    ax.yaxis.set_minor_formatter(plain_minor)
                ax.grid(alpha=0.3, which="both")
                if j == 0:
                    ax.set_ylabel(ylabel, fontsize=9)
            axes[2][j].set_xlabel("batch size")
        sizes = sorted({r["batch_size"] for r in rows if r["task"] == task})
        for ax in axes[2]:
            ax.set_xticks(sizes, [str(b) for b in sizes], fontsize=7)
            ax.minorticks_off()
        handles, labels = axes[0][0].get_legend_handles_labels()
        h2, l2 = axes[2][0].get_legend_handles_labels()
        fig.legend(handles + h2, labels + l2, loc="lower center", ncol=3 if len(rules) < 3 else 6, fontsize=8,
                   frameon=False)
        info = next((m for m in result["models"] if m["name"] == task), None)
        about = f"{info['description']}; {info['n_params']:,} params" if info else task
        scaling = "batch" if cfg["lr_scaling"] == "linear" else "sqrt(batch"
        fig.suptitle(f"{task}: {about}\nlr = lr_ref x {scaling} / {cfg['ref_batch']}{')' * (scaling != 'batch')} "
                     f"with warmup · bands: 20-80% over "
                     f"repeats · {title}", fontsize=9)
        fig.tight_layout(rect=(0, 0.07, 1, 1))
        path = os.path.join(out_dir, f"batch_{task}.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths
