"""The examples/ scripts' computations (their plots are left to a person): each optimizer on the
error surface ends far closer to the minimum than it started."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import error_surface  # noqa: E402


@pytest.mark.parametrize("label,cls,options", error_surface.RUNS, ids=[run[0] for run in error_surface.RUNS])
def test_each_optimizer_descends_the_error_surface(label, cls, options):
    points = error_surface.path(cls, options, steps=60, backend="torch")
    assert len(points) == 61 and points[0] == error_surface.START
    assert error_surface.surface(*points[-1]) < 0.05 * error_surface.surface(*error_surface.START), label
