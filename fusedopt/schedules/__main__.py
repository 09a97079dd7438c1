"""Command line: draw a recipe's lr curve to a PNG, or list the recipe names.

    python -m fusedopt.schedules plot warmup_cosine --warmup-steps 500 --total-steps 20000 -o lr.png
"""

from __future__ import annotations

import argparse
import inspect
import sys

from .plotting import INSTALL_HINT
from .recipes import RECIPES, floor_factor, from_name


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fusedopt.schedules",
        description="Learning-rate schedules of fusedopt.schedules.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("list", help="print the recipe names")
    plot = commands.add_parser(
        "plot",
        help="draw a recipe's lr curve to a PNG",
        description=f"Draw the lr of a recipe over steps 0..total-steps (needs {INSTALL_HINT}).",
    )
    plot.add_argument("name", metavar="NAME", help="one of " + ", ".join(RECIPES))
    plot.add_argument("--total-steps", type=int, required=True, help="steps drawn (and run length)")
    plot.add_argument("--warmup-steps", type=int, help="warmup length (one_cycle: the rise)")
    plot.add_argument("--lr", type=float, default=1.0, help="base lr (default 1.0: the factor)")
    plot.add_argument("--min-lr", type=float, help="lr the decay ends at (default 0)")
    plot.add_argument("--d-model", type=int, default=512, help="transformer: model width")
    plot.add_argument("--width", type=int, default=800, help="image width in pixels")
    plot.add_argument("--height", type=int, default=500, help="image height in pixels")
    plot.add_argument("--dpi", type=int, default=100, help="dots per inch of the image")
    plot.add_argument("--log", action="store_true", help="logarithmic lr axis")
    plot.add_argument("-o", "--output", required=True, help="PNG file to write")
    plot.set_defaults(command_parser=plot)  # errors then print the plot command's usage
    return parser


def _schedule_arguments(args, parser: argparse.ArgumentParser) -> dict:
    """The keyword arguments of the recipe `args.name` taken from the command line."""
    accepted = inspect.signature(RECIPES[args.name]).parameters
    given = {"total_steps": args.total_steps}
    if args.warmup_steps is not None:
        given["warmup_steps"] = args.warmup_steps
    elif "warmup_steps" in accepted and accepted["warmup_steps"].default is inspect.Parameter.empty:
        given["warmup_steps"] = 0
    if "d_model" in accepted:
        given["d_model"] = args.d_model
    if args.min_lr is not None:
        if "floor" not in accepted:
            raise ValueError(f"min_lr: --min-lr does not apply to {args.name}")
        given["floor"] = floor_factor(args.min_lr, args.lr, where="--lr")
    return given


def main(argv: list[str] | None = None) -> int:
    """Run the command line; bad values (an unknown schedule name, negative steps, ...) raise
    ValueError naming the argument, which the program reports as a usage error (exit code 2)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "list":
        print("\n".join(RECIPES))
        return 0
    if args.name not in RECIPES:
        raise ValueError(f"name: unknown schedule {args.name!r} (known: {', '.join(RECIPES)})")
    schedule = from_name(args.name, **_schedule_arguments(args, args.command_parser))
    try:
        schedule.plot(
            args.total_steps,
            args.output,
            base_lr=args.lr,
            size=(args.width, args.height),
            dpi=args.dpi,
            title=f"{args.name}",
            log_scale=args.log,
        )
    except ImportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {args.output} ({args.width}x{args.height} px)")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ValueError as err:
        print(f"python -m fusedopt.schedules: error: {err}", file=sys.stderr)
        sys.exit(2)
