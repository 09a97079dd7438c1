"""Optimizers on a 2-parameter error surface: the paths of gradient descent, momentum, Adagrad,
RMSprop and Adam (fusedopt's, drop-in for torch.optim's) from the same start, drawn over the
surface's contours.

    python examples/error_surface.py [-o paths.png] [--steps 60]

The surface is a long, narrow, tilted valley (an ill-conditioned quadratic plus a gentle
quartic wall): plain gradient descent zig-zags across the steep direction and crawls along the
flat one; momentum builds speed along the valley (and overshoots); the adaptive rules divide each
coordinate's step by its own gradient scale, so they head along the diagonal at first.
"""
import argparse
import math

import torch

import fusedopt

ANGLE = math.radians(30)


def surface(x, y):
    """The error: steep across the valley (u), flat along it (v)."""
    u = math.cos(ANGLE) * x + math.sin(ANGLE) * y
    v = -math.sin(ANGLE) * x + math.cos(ANGLE) * y
    return 2.0 * u**2 + 0.05 * v**2 + 0.002 * v**4


# (label, optimizer class, constructor options): each lr picked so the path reaches the valley
RUNS = [
    ("gradient descent", fusedopt.SGD, {"lr": 0.44}),
    ("momentum 0.9", fusedopt.SGD, {"lr": 0.02, "momentum": 0.9}),
    ("Adagrad", fusedopt.Adagrad, {"lr": 2.0}),
    ("RMSprop", fusedopt.RMSprop, {"lr": 0.05}),
    ("Adam", fusedopt.Adam, {"lr": 0.3}),
]
START = (-4.0, 3.0)


def path(optimizer_class, options, steps, backend="auto"):
    """The (x, y) points the optimizer visits from START, START included."""
    point = torch.nn.Parameter(torch.tensor(START, dtype=torch.float64))
    optimizer = optimizer_class([point], **options, backend=backend)
    points = [tuple(point.tolist())]
    for _ in range(steps):
        optimizer.zero_grad()
        surface(point[0], point[1]).backward()
        optimizer.step()
        points.append(tuple(point.tolist()))
    return points


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--out", default="error_surface.png")
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = torch.linspace(-5, 5, 201, dtype=torch.float64)
    gx, gy = torch.meshgrid(xs, xs, indexing="xy")
    fig, ax = plt.subplots(figsize=(7.5, 6.5))
    ax.contour(gx, gy, surface(gx, gy), levels=torch.logspace(-2, 2, 18).tolist(), cmap="viridis", linewidths=0.7)
    for label, cls, options in RUNS:
        points = path(cls, options, args.steps)
        final = surface(*points[-1])
        ax.plot([p[0] for p in points], [p[1] for p in points], marker=".", markersize=3, linewidth=1.2,
                label=f"{label} (lr {options['lr']:g}): error {final:.3g} after {args.steps} steps")
    ax.plot(*START, "k*", markersize=12)
    ax.plot(0, 0, "kx", markersize=10)
    ax.set_xlim(-5, 5)
    ax.set_ylim(-5, 5)
    ax.set_aspect("equal")
    ax.set_xlabel("parameter 1")
    ax.set_ylabel("parameter 2")
    ax.set_title(f"{args.steps} steps from * towards the minimum x on a narrow, tilted valley", fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")
    for label, cls, options in RUNS:
        print(f"{label:>16}: error {surface(*path(cls, options, args.steps)[-1]):.4g}")


if __name__ == "__main__":
    main()
