"""Warmup against none on a small transformer: the same Adam, lr and data, once with the lr held
from the first update and once reached by a linear warmup (fusedopt.schedules), training loss
per update and test accuracy drawn side by side, over a few seeds.

    python examples/warmup.py [-o warmup.png] [--lrs 0.01,0.05] [--updates 200] [--seeds 2]

The task is the batch-size benchmark's character model (bench/tasks.py): next-character
prediction on generated English-like text. One panel per lr. At a moderate lr warmup only
delays the start; at a large one, Adam's first updates (its second moment still near zero, so
every coordinate moves by about lr) knock the freshly initialised attention and layer norms
about, and warmup, which keeps those first steps small, is what lets training proceed.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo's bench/

import fusedopt  # noqa: E402
from bench import tasks  # noqa: E402
from fusedopt import schedules  # noqa: E402


def train(task, lr, updates, warmup_steps, seed, batch_size=32):
    """(loss per update, test accuracy) of Adam with `warmup_steps` of linear warmup."""
    model = task.build_model(torch.device("cpu"), seed)
    optimizer = fusedopt.Adam(model.parameters(), lr=lr)
    scheduler = schedules.warmup_constant(optimizer, warmup_steps=warmup_steps)
    order = torch.Generator().manual_seed(seed)
    losses = []
    while len(losses) < updates:
        for batch in torch.randperm(task.n_train, generator=order).split(batch_size):
            if len(losses) == updates:
                break
            optimizer.zero_grad()
            loss = tasks.loss_fn(model(task.x_train[batch]), task.y_train[batch])
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
    with torch.no_grad():
        return losses, tasks.accuracy(model(task.x_test), task.y_test)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--out", default="warmup.png")
    parser.add_argument("--lrs", default="0.01,0.05", help="comma list: one panel each")
    parser.add_argument("--updates", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=50, help="warmup updates")
    parser.add_argument("--seeds", type=int, default=2)
    args = parser.parse_args(argv)
    task = tasks.load("chars", "small")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lrs = [float(lr) for lr in args.lrs.split(",")]
    fig, axes = plt.subplots(1, len(lrs), figsize=(5.5 * len(lrs), 4.6), squeeze=False, sharey=True)
    for ax, lr in zip(axes[0], lrs):
        for warmup, color in ((0, "#d62728"), (args.warmup, "#1f77b4")):
            name = "no warmup" if warmup == 0 else f"linear warmup, {warmup} updates"
            accuracies = []
            for seed in range(args.seeds):
                losses, acc = train(task, lr, args.updates, warmup, seed)
                accuracies.append(acc)
                ax.plot(losses, color=color, alpha=0.6, linewidth=0.9, label=name if seed == 0 else None)
            text = ", ".join(f"{100 * a:.1f}%" for a in accuracies)
            print(f"lr {lr:g}, {name}: test accuracy {text}")
            ax.plot([], [], " ", label=f"  test accuracy {text}")
        ax.set_yscale("log")
        ax.set_xlabel("update")
        ax.set_title(f"Adam, lr {lr:g}, batch 32", fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("training loss (lower is better)")
    fig.suptitle(task.description, fontsize=9)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
