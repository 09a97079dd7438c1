"""The benchmark harness end to end: ``python -m bench all --quick --device cpu`` writes a JSON row
for every parameter set, rule and implementation with positive times, markdown, and PNG plots.
No timing is asserted anywhere: CPU numbers in CI say nothing about GPU performance."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # bench/ is a folder of the repository, not an installed package
    sys.path.insert(0, str(ROOT))

from bench.paramsets import gpt2_shapes  # noqa: E402
from bench.rules import RULES, bytes_per_param  # noqa: E402

SETS = ("large", "gpt2", "many-small", "gpt2-bf16")
IMPLS = ("fusedopt", "torch-forloop", "torch-foreach", "torch-fused", "torch-compiled")
MODELS = ("mlp", "transformer")
PLOTS = ("step_time.png", "step_bandwidth.png", "batch_mlp.png", "batch_transformer.png")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-out")
    # one intra-op thread: beside other test workers, idle OpenMP threads spinning for the cores
    # can slow small-tensor steps a hundredfold (no timing is asserted, so nothing else changes)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "all", "--quick", "--device", "cpu", "--out", str(out),
         "--no-progress"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, f"bench exited with {proc.returncode}:\n{proc.stderr[-4000:]}"
    return out, proc.stdout


def _load(out, name):
    with open(out / name, encoding="utf-8") as f:
        return json.load(f)


def test_step_json_has_a_row_for_every_set_rule_and_implementation(quick_run):
    out, _ = quick_run
    rows = _load(out, "step.json")["rows"]
    keys = {(r["param_set"], r["rule"], r["impl"]) for r in rows}
    assert keys == {(s, r, i) for s in SETS for r in RULES for i in IMPLS}
    assert len(rows) == len(keys)


def test_step_rows_that_ran_have_positive_times_and_bandwidth(quick_run):
    out, _ = quick_run
    for row in _load(out, "step.json")["rows"]:
        if row["status"] != "ok":
            continue
        where = (row["param_set"], row["rule"], row["impl"])
        assert row["median_ms"] > 0 and row["host_ms"] > 0 and row["gbs"] > 0, where
        assert row["q20_ms"] <= row["median_ms"] <= row["q80_ms"], where


def test_fusedopt_and_torch_plain_rows_all_ran(quick_run):
    out, _ = quick_run
    for row in _load(out, "step.json")["rows"]:
        if row["impl"] in ("fusedopt", "torch-forloop", "torch-foreach"):
            assert row["status"] == "ok", (row["param_set"], row["rule"], row["impl"], row["reason"])


def test_missing_torch_variants_are_reported_with_a_reason(quick_run):
    out, _ = quick_run
    for row in _load(out, "step.json")["rows"]:
        if row["impl"] == "torch-compiled":
            assert row["status"] == "skipped" and "--quick" in row["reason"]
        if row["impl"] == "torch-fused" and row["rule"] == "rmsprop":
            assert row["status"] == "unsupported" and row["reason"]


def test_fusedopt_rows_carry_a_speedup_over_each_torch_row_that_ran(quick_run):
    out, _ = quick_run
    rows = _load(out, "step.json")["rows"]
    for row in rows:
        if row["impl"] != "fusedopt":
            continue
        ran = {r["impl"] for r in rows if (r["param_set"], r["rule"]) == (row["param_set"], row["rule"])
               and r["impl"] != "fusedopt" and r["status"] == "ok"}
        assert set(row["speedup_vs"]) == ran
        assert all(v > 0 for v in row["speedup_vs"].values())


def test_batch_json_has_every_model_rule_and_batch_size_for_both_sides(quick_run):
    out, _ = quick_run
    result = _load(out, "batch.json")
    sizes = result["config"]["batch_sizes"]
    assert sizes[0] == 1 and len(sizes) >= 2
    keys = {(r["model"], r["rule"], r["role"], r["batch_size"]) for r in result["rows"]}
    assert keys == {(m, r, role, b) for m in MODELS for r in RULES
                    for role in ("fusedopt", "best-torch") for b in sizes}
    for row in result["rows"]:
        where = (row["model"], row["rule"], row["impl"], row["batch_size"])
        assert row["status"] == "ok", (where, row["reason"])
        assert row["update_ms"] > 0 and row["samples_per_s"] > 0 and row["epoch_s"] > 0, where
        assert 0 <= row["step_share"] <= 1, where


def test_plots_and_markdown_are_written(quick_run):
    out, stdout = quick_run
    for name in PLOTS:
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000, name
    for name in ("report.md", "step.md", "batch.md"):
        assert (out / name).stat().st_size > 0, name
    assert "## Optimizer step time" in stdout and "## Batch-size throughput" in stdout


def test_bytes_per_param_follow_the_design_table():
    fp32 = {r.name: r.bytes_per_param() for r in RULES.values()}
    assert fp32 == {"sgd": 12, "sgd_momentum": 20, "adagrad": 20, "rmsprop": 20, "adam": 28, "adamw": 28, "radam": 28}
    assert RULES["adam"].bytes_per_param(torch.bfloat16) == 14
    assert bytes_per_param("RMSprop", momentum=0.9) == 28
    assert bytes_per_param("RMSprop", momentum=0.9, centered=True) == 36
    assert bytes_per_param("Adam", amsgrad=True) == 36


def test_gpt2_small_shapes_have_the_model_size():
    shapes = gpt2_shapes(1.0)
    assert len(shapes) == 148
    assert sum(math.prod(s) for s in shapes) == 124_439_808


def _step_row(param_set, rule, impl, ms, **extra):
    n, bpp = 124_439_808, RULES[rule].bytes_per_param()
    row = {"param_set": param_set, "rule": rule, "rule_label": RULES[rule].label, "impl": impl,
           "impl_label": impl, "status": "ok", "reason": None, "n_params": n, "n_tensors": 148,
           "bytes_per_param": bpp, "bytes_per_step": n * bpp, "median_ms": ms, "q20_ms": ms, "q80_ms": ms,
           "gbs": n * bpp / ms / 1e6, "copy_fraction": n * bpp / ms / 1e6 / 3000, "host_ms": 0.05,
           "launches_per_step": 1.0}
    row.update(extra)
    return row


def test_cuda_targets_are_judged_from_the_rows():
    """The GPU-only report logic, on made-up rows (nothing here is a measurement)."""
    from bench import report, step

    rows = [_step_row("gpt2", "adam", "fusedopt", 1.2), _step_row("gpt2", "adam", "torch-fused", 1.5),
            _step_row("many-small", "adam", "fusedopt", 0.1), _step_row("many-small", "adam", "torch-fused", 0.12),
            _step_row("many-small", "rmsprop", "fusedopt", 0.1),
            _step_row("many-small", "rmsprop", "torch-fused", 1.0, status="unsupported", reason="none")]
    step.add_speedups(rows)
    result = {"rows": rows, "env": {"device": "cuda"}, "copy": {"bytes_per_s": 3e12},
              "config": {"size": "full", "rules": ["adam", "rmsprop"]}}
    targets = {t["target"]: t for t in report.step_targets(result)}
    bandwidth = targets["Adam fp32, GPT-2 small shapes: fraction of copy bandwidth"]
    assert bandwidth["met"] is True  # 3.48 GB in 1.2 ms = 2.9 TB/s of 3 TB/s
    speedup = targets["Adam fp32, GPT-2 small shapes: speed-up over torch.optim.Adam(fused=True)"]
    assert speedup["met"] is True and speedup["measured"] == "1.25x"
    small = targets["2,000 small tensors, Adam: speed-up over torch fused=True"]
    assert small["met"] is False and "launches/step" in small["why"]
    assert not any("RMSprop" in name for name in targets)  # torch has no fused RMSprop to beat


def test_batch_target_needs_a_gain_everywhere_and_the_largest_at_small_batches():
    from bench import batch, report

    def rows(gains):
        out = []
        for bs, gain in gains.items():
            for role, ms in (("fusedopt", 1.0), ("best-torch", gain)):
                out.append({"model": "mlp", "rule": "adam", "rule_label": "Adam", "role": role,
                            "impl": "fusedopt" if role == "fusedopt" else "torch-fused", "batch_size": bs,
                            "status": "ok", "update_ms": ms, "q20_ms": ms, "q80_ms": ms, "step_ms": 0.1,
                            "step_share": 0.1 / ms})
        batch.add_gains(out)
        return {"rows": out, "env": {"device": "cuda"},
                "config": {"models": ["mlp"], "rules": ["adam"], "with_fusedopt": True}}

    assert report.batch_targets(rows({1: 1.8, 64: 1.3, 4096: 1.01}))[0]["met"] is True
    missed = report.batch_targets(rows({1: 1.8, 64: 1.3, 4096: 0.97}))[0]
    assert missed["met"] is False and "batch 4096" in missed["why"]
    assert report.batch_targets(rows({1: 1.1, 64: 1.5, 4096: 1.0}))[0]["met"] is False


def test_host_overhead_reports_torch_and_fusedopt_rows(capsys):
    from bench import host_overhead

    host_overhead.main(["--tensors", "20", "--numel", "16", "--steps", "5"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "us/step" not in line]
    assert len(rows) == 3
    for row in rows:
        assert float(row.split("|")[2]) > 0


# ---------------------------------------------------------------- epilogue stage

EPILOGUE_IMPLS = ("torch-composition", "fusedopt")


@pytest.fixture(scope="module")
def quick_epilogue_run(tmp_path_factory):
    """``python -m bench epilogue --quick --device cpu``: tiny sizes, a few seconds."""
    out = tmp_path_factory.mktemp("bench-epilogue-out")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "epilogue", "--quick", "--device", "cpu", "--out", str(out),
         "--no-progress"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, f"bench epilogue exited with {proc.returncode}:\n{proc.stderr[-4000:]}"
    return out, proc.stdout


def test_epilogue_bytes_per_param_follow_the_pass_count():
    from bench.epilogue import bytes_per_param as epilogue_bytes

    # fusedopt: norm reads g (4) + update reads p,g,m,v and writes p,m,v (28)
    assert epilogue_bytes("fusedopt") == 32
    # torch: unscale_ r+w g (8) + norm r g (4) + clip r+w g (8) + fused update (28)
    assert epilogue_bytes("torch-composition") == 48
    assert epilogue_bytes("fusedopt", torch.bfloat16) == 16
    assert epilogue_bytes("torch-composition", torch.bfloat16) == 24
    with pytest.raises(ValueError):
        epilogue_bytes("torch-fused")


def test_epilogue_json_has_both_implementations_with_times_and_bytes(quick_epilogue_run):
    out, _ = quick_epilogue_run
    result = _load(out, "epilogue.json")
    assert result["complete"] and result["env"]["device"] == "cpu"
    assert result["config"]["fusedopt_backend"] == "torch"  # the CPU run measures the reference path
    rows = result["rows"]
    sets = {s["name"]: s for s in result["param_sets"]}
    assert {"large", "gpt2"} <= set(sets)
    assert {(r["param_set"], r["impl"]) for r in rows} == {(s, i) for s in sets for i in EPILOGUE_IMPLS}
    assert len(rows) == 2 * len(sets)
    expected_bpp = {("torch-composition", "float32"): 48, ("fusedopt", "float32"): 32,
                    ("torch-composition", "bfloat16"): 24, ("fusedopt", "bfloat16"): 16}
    for row in rows:
        where = (row["param_set"], row["impl"])
        assert row["status"] == "ok", (where, row["reason"])
        assert row["median_ms"] > 0 and row["gbs"] > 0 and row["copy_fraction"] > 0, where
        assert row["q20_ms"] <= row["median_ms"] <= row["q80_ms"], where
        assert row["n_params"] == sets[row["param_set"]]["n_params"] > 0, where
        assert row["bytes_per_param"] == expected_bpp[(row["impl"], row["dtype"])], where
        assert row["bytes_per_iter"] == row["bytes_per_param"] * row["n_params"], where
        assert row["gbs"] == pytest.approx(row["bytes_per_iter"] / row["median_ms"] / 1e6), where
    by_key = {(r["param_set"], r["impl"]): r for r in rows}
    for name in sets:
        t, f = by_key[(name, "torch-composition")], by_key[(name, "fusedopt")]
        assert t["torch_update"] == "fused"  # torch 2.13 has a fused AdamW on the CPU
        assert f["torch_over_fusedopt"] == pytest.approx(t["median_ms"] / f["median_ms"]), name
        assert t["torch_over_fusedopt"] == f["torch_over_fusedopt"], name
        # the two implementations did the same epilogue: same params and the same unscaled, clipped
        # grads in exp_avg after one iteration
        tol = 1e-5 if f["dtype"] == "float32" else 2e-2
        assert f["max_abs_param_diff"] <= tol and f["max_abs_update"] > 10 * f["max_abs_param_diff"], name
        assert f["exp_avg_rel_diff"] <= tol, name


def test_epilogue_markdown_shows_both_sides_and_an_unmeasured_cuda_target(quick_epilogue_run):
    out, stdout = quick_epilogue_run
    assert "## Optimizer epilogue" in stdout and "## Optimizer step time" not in stdout
    assert (out / "epilogue.md").stat().st_size > 0 and (out / "report.md").stat().st_size > 0
    table = [line for line in stdout.splitlines() if line.startswith("| large (float32)")]
    assert len(table) == 1
    cells = [c.strip() for c in table[0].strip("|").split("|")]
    assert len(cells) == 11, cells  # nothing in a cell may break the markdown table
    assert float(cells[2]) > 0 and float(cells[3]) > 0 and cells[4].endswith("x")
    assert cells[5] == "48 / 32"
    target = [line for line in stdout.splitlines()
              if line.startswith("| epilogue faster than torch's composition on CUDA")]
    assert len(target) == 1 and "| not measured |" in target[0]
    targets = _load(out, "epilogue.json")["targets"]
    assert [t["met"] for t in targets] == [None]


def test_epilogue_cuda_target_is_judged_from_the_rows():
    """The GPU-only target logic, on made-up rows (nothing here is a measurement)."""
    from bench import epilogue, report

    def row(name, impl, ms, status="ok"):
        bpp = epilogue.bytes_per_param(impl)
        return {"param_set": name, "impl": impl, "status": status, "reason": None, "median_ms": ms,
                "q20_ms": ms, "q80_ms": ms, "bytes_per_param": bpp, "bytes_per_iter": bpp * 10**8,
                "gbs": bpp * 10**8 / ms / 1e6, "copy_fraction": 0.5, "launches_per_iter": 3.0}

    rows = [row("gpt2", "torch-composition", 3.0), row("gpt2", "fusedopt", 2.0),
            row("large", "torch-composition", 1.0), row("large", "fusedopt", 1.25)]
    epilogue.add_ratios(rows)
    result = {"rows": rows, "env": {"device": "cuda"},
              "config": {"size": "full", "fusedopt_backend": "triton"},
              "param_sets": [{"name": "gpt2", "dtype": "float32"}, {"name": "large", "dtype": "float32"}]}
    targets = {t["target"]: t for t in report.epilogue_targets(result)}
    gpt2 = targets["epilogue faster than torch's composition on CUDA: gpt2 (float32)"]
    assert gpt2["met"] is True and gpt2["measured"] == "1.50x"
    large = targets["epilogue faster than torch's composition on CUDA: large (float32)"]
    assert large["met"] is False and large["measured"] == "0.80x" and "48 B/param" in large["why"]


def test_all_includes_the_epilogue(quick_run):
    out, stdout = quick_run
    rows = _load(out, "epilogue.json")["rows"]
    assert {(r["param_set"], r["impl"]) for r in rows} == {(s, i) for s in SETS for i in EPILOGUE_IMPLS}
    assert all(r["status"] == "ok" for r in rows)
    assert "## Optimizer epilogue" in stdout
