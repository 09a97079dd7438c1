"""Memory of an optimizer's state per param under each of fusedopt's storage options, for every
rule of the registry, counted on the tensors a step makes (on the meta device: shapes and dtypes,
no data) for GPT-2 small's 148 shapes (124M params): param + grad + fp32 master or remainder +
states, in bytes per param.

    python -m bench.state_memory [--out FILE.md]
"""
import argparse
import math
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a file: bench/ is a folder of the repository
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.cases import gpt2_shapes  # noqa: E402
from bench.state_accuracy import rule_variants  # noqa: E402

# (column, param dtype, storage options)
CONFIGS = (
    ("fp32", torch.float32, {}),
    ("fp32, bf16 states", torch.float32, {"state_precision": "bf16"}),
    ("fp32, 8-bit states", torch.float32, {"state_precision": "8bit"}),
    ("bf16, master", torch.bfloat16, {"master_weights": True}),
    ("bf16, remainder", torch.bfloat16, {"master_weights": "remainder"}),
    ("bf16, remainder, 8-bit states", torch.bfloat16, {"master_weights": "remainder", "state_precision": "8bit"}),
)


def nbytes(tensor):
    return tensor.numel() * tensor.element_size()


def bytes_per_param(variant, dtype, options, shapes):
    """(param + grad + master + states, states alone) per param, from the tensors after one step."""
    params = [torch.nn.Parameter(torch.empty(shape, dtype=dtype, device="meta")) for shape in shapes]
    for p in params:
        p.grad = torch.empty_like(p)
    optimizer = variant.info.optimizer(params, **variant.options, **options, backend="torch")
    optimizer.step()
    count = sum(p.numel() for p in params)
    held = [tensor for state in optimizer.state.values() for key, tensor in state.items()
            if torch.is_tensor(tensor) and key != "step"]  # the step counts: one scalar per param
    states = sum(nbytes(t) for t in held)
    return (2 * sum(nbytes(p) for p in params) + states) / count, states / count


def table(shapes):
    lines = ["| rule | " + " | ".join(name for name, _, _ in CONFIGS) + " |", "|---|" + "---|" * len(CONFIGS)]
    for name, variant in rule_variants().items():
        cells = []
        for _, dtype, options in CONFIGS:
            total, states = bytes_per_param(variant, dtype, options, shapes)
            cells.append(f"{total:.2f} ({states:.2f})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.state_memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="also write the table to this markdown file")
    args = parser.parse_args(argv)
    shapes = gpt2_shapes()
    count = sum(math.prod(shape) for shape in shapes)
    text = (f"Bytes per param, GPT-2 small's {len(shapes)} shapes ({count / 1e6:.1f}M params): param + grad + "
            "master (fp32 copy or 16-bit remainder) + states, and in brackets the states with any master; "
            "columns: the params' dtype and the storage options\n\n" + table(shapes))
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
