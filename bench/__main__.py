"""Entry point for ``python -m bench [step|epilogue|batch|all]``."""
import os
import sys

# Idle OpenMP threads sleep instead of spinning: on a loaded CPU, threads spinning for a
# descheduled peer turned a 1 ms step into 60 ms. Set before torch loads; the report records it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .cli import main  # noqa: E402

sys.exit(main())
