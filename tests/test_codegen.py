"""Every kernel specialization compiles for sm_80 and sm_90 without a GPU; the aligned fp32,
bf16 and fp16 kernels use 128-bit global loads and stores (the grad-norm reduction stores one
partial per block: loads only), and nothing spills to local memory.

The compiler and the interpreter cannot share a process, so the code generator runs in a
subprocess without TRITON_INTERPRET.
"""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")


ARCHS = (80, 90)


@pytest.fixture(scope="module")
def code_generators(tmp_path_factory):
    """One code-generator subprocess per architecture, started together (each compiles every
    specialization: minutes on a cold Triton cache), so that the two compile side by side."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    runs = {}
    for arch in ARCHS:
        out = tmp_path_factory.mktemp(f"sm_{arch}")
        with open(out / "stdout", "w") as stdout, open(out / "stderr", "w") as stderr:  # files: no pipe fills up
            process = subprocess.Popen(
                [sys.executable, "-m", "fusedopt.kernels.codegen", "--arch", f"sm_{arch}", "--ptx-dir",
                 str(out / "ptx"), "--json", str(out / "table.json")],
                stdout=stdout, stderr=stderr, text=True, env=env,
            )
        runs[arch] = process, out
    yield runs
    for process, _ in runs.values():
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.fixture(scope="module", params=ARCHS, ids=[f"sm_{arch}" for arch in ARCHS])
def codegen(request, code_generators):
    process, out = code_generators[request.param]
    try:
        process.wait(timeout=600)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    stdout, stderr = (out / "stdout").read_text(), (out / "stderr").read_text()
    assert process.returncode == 0, stderr[-4000:]
    with open(out / "table.json") as file:
        table = json.load(file)
    return table, out / "ptx", stdout


def expected_specializations():
    """Listing the specializations compiles nothing: the interpreter's kernels list the same."""
    from fusedopt.kernels.codegen import specializations

    return len(list(specializations()))


def test_every_specialization_compiles(codegen):
    table, ptx_dir, stdout = codegen
    rows = table["kernels"]
    assert len(rows) == expected_specializations()
    # Each rule x option set x dtype x alignment appears once.
    assert len({row["kernel"] for row in rows}) == len(rows)
    # every rule of the registry (AdamW is Adam's kernel) and the grad-norm reduction
    from fusedopt.registry import RULES

    assert {row["rule"] for row in rows} == {*RULES, "grad_norm"} - {"adamw"}
    assert {row["dtype"] for row in rows} == {"fp32", "bf16", "fp16", "fp64"}


def test_ptx_files_are_written(codegen):
    table, ptx_dir, _ = codegen
    files = sorted(os.listdir(ptx_dir))
    assert len(files) == len(table["kernels"])
    for name in files[:3]:
        assert ".entry" in (ptx_dir / name).read_text()


def test_printed_table_lists_every_kernel(codegen):
    table, _, stdout = codegen
    for row in table["kernels"]:
        assert row["kernel"] in stdout


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_aligned_kernels_use_128_bit_accesses(codegen, dtype):
    rows = [row for row in codegen[0]["kernels"] if row["aligned"] and row["dtype"] == dtype]
    assert rows
    for row in rows:
        assert row["load_bits"] == 128, row
        if row["rule"] != "grad_norm":
            assert row["store_bits"] == 128, row


def test_no_kernel_spills(codegen):
    for row in codegen[0]["kernels"]:
        assert row["spill_bytes"] == 0, row
        assert row["registers"] is not None and row["registers"] <= 255, row


def test_8bit_codecs_round_as_the_reference_does(codegen):
    """The 8-bit codec is exact on a GPU: its products are mul.rn.f32 (never fused into an fma,
    never flushed to zero), no fma adds the shift that rounds a code, and no division of it is
    approximate."""
    import re

    table, ptx_dir, _ = codegen
    rows = [row for row in table["kernels"] if "states_8bit" in row["kernel"]]
    assert rows
    for row in rows:
        (path,) = [ptx_dir / name for name in os.listdir(ptx_dir) if name.startswith(row["kernel"] + ".")]
        ptx = path.read_text()
        assert "mul.rn.f32" in ptx and "mul.rn.ftz.f32" not in ptx, row["kernel"]
        assert not re.search(r"fma\.rn\.f32\s+[^;]*0f4B400000;", ptx), row["kernel"]  # 1.5 * 2^23
        assert "div.approx" not in ptx, row["kernel"]
