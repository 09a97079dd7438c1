"""`pytest bench` times the step cases only when asked to keep the numbers (--benchmark-json,
--benchmark-save, --benchmark-autosave, --benchmark-enable); otherwise each case runs once at a
tiny size, as a quick check that every case builds and steps."""
import pytest


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    keep = ("benchmark_json", "benchmark_save", "benchmark_autosave", "benchmark_enable", "benchmark_compare")
    if hasattr(config.option, "benchmark_disable") and not any(getattr(config.option, k, None) for k in keep):
        config.option.benchmark_disable = True
