"""Benchmarks for fusedopt against torch.optim: optimizer step time, the AMP + clipping + AdamW
epilogue, and batch-size throughput. ``python -m bench --help`` lists the options."""
