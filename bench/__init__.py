"""Benchmarks for fusedopt against torch.optim: optimizer step time and batch-size throughput.

Run ``python -m bench all`` (or ``step`` / ``batch``); ``python -m bench --help`` lists the options.
"""

__all__ = ["RULES", "bytes_per_param"]

from .rules import RULES, bytes_per_param
