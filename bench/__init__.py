"""Benchmarks for fusedopt against torch.optim: optimizer step time, the AMP + clipping + AdamW
epilogue, and batch-size throughput.

Run ``python -m bench all`` (or ``step`` / ``epilogue`` / ``batch``); ``python -m bench --help`` lists
the options.
"""

__all__ = ["RULES", "bytes_per_param"]

from .rules import RULES, bytes_per_param
