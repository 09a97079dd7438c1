"""Entry point for ``python -m bench step|batch|all``."""

import sys

from .cli import main

sys.exit(main())
