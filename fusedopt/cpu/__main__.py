"""python -m fusedopt.cpu: compile every numba CPU kernel into numba's on-disk cache
(fusedopt.cpu.precompile)."""
import sys

from .precompile import main

if __name__ == "__main__":
    sys.exit(main())
