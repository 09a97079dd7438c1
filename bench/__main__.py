"""Entry point for ``python -m bench [step|epilogue|batch|all]``."""
import sys

from .cli import main

sys.exit(main())
