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


@pytest.fixture(scope="module", params=[80, 90], ids=["sm_80", "sm_90"])
def codegen(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"sm_{request.param}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    result = subprocess.run(
        [sys.executable, "-m", "fusedopt.kernels.codegen", "--arch", f"sm_{request.param}",
         "--ptx-dir", str(out / "ptx"), "--json", str(out / "table.json")],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    with open(out / "table.json") as file:
        table = json.load(file)
    return table, out / "ptx", result.stdout


def expected_specializations():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = "from fusedopt.kernels.codegen import specializations; print(len(list(specializations())))"
    return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                              check=True).stdout)


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
