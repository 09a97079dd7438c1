"""PNG plots from the results: step time and bandwidth by implementation; throughput, epoch time
and the step's share of the iteration against batch size (log axes)."""

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
    """batch_<model>.png: samples/s, epoch time and step share against batch size."""
    plt = _pyplot()
    rows = [r for r in result["rows"] if r["status"] == "ok"]
    rules = result["config"]["rules"]
    cmap = plt.get_cmap("tab10")
    title = f"{result['env']['device_name']} · torch {result['env']['torch']} · {result['env']['date']}"
    paths = []
    for model in result["config"]["models"]:
        fig, axes = plt.subplots(1, 3, figsize=(17, 4.6))
        for k, rule in enumerate(rules):
            for role, style in (("fusedopt", "-"), ("best-torch", "--")):
                series = sorted((r for r in rows if (r["model"], r["rule"], r["role"]) == (model, rule, role)),
                                key=lambda r: r["batch_size"])
                if not series:
                    continue
                bs = [r["batch_size"] for r in series]
                name = f"{series[0]['rule_label']} {series[0]['impl_label']}"
                for ax, key, scale in ((axes[0], "samples_per_s", 1), (axes[1], "epoch_s", 1),
                                       (axes[2], "step_share", 100)):
                    ax.plot(bs, [r[key] * scale for r in series], style, marker=".", color=cmap(k % 10),
                            label=name)
        for ax, ylabel in ((axes[0], "samples/s"), (axes[1], "seconds per epoch"),
                           (axes[2], "optimizer step, % of iteration")):
            ax.set_xscale("log", base=2)
            sizes = result["config"]["batch_sizes"]
            ax.set_xticks(sizes, [str(b) for b in sizes], fontsize=7)
            ax.minorticks_off()
            ax.set_xlabel("batch size")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3, which="both")
        for ax in axes[:2]:
            if ax.has_data():
                ax.set_yscale("log")
        axes[2].set_ylim(0, 100)
        if axes[2].has_data():
            axes[2].legend(fontsize=6, ncol=2)
        info = next((m for m in result["models"] if m["name"] == model), None)
        size = f" ({info['n_params'] / 1e6:.2f}M params, {info['n_tensors']} tensors)" if info else ""
        fig.suptitle(f"{model}{size}: solid fusedopt, dashed best torch · epoch = "
                     f"{result['config']['epoch_samples']:,} samples · {title}", fontsize=10)
        fig.tight_layout()
        path = os.path.join(out_dir, f"batch_{model}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
