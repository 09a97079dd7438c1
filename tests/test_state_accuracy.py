"""The state-format accuracy harness (bench/state_accuracy.py) at a tiny size: its rules come from
the registry, its simulation stores every state after every step, its verdicts follow the bands,
and a short digits run tells the formats apart (a code that rounds second moments to zero diverges,
bf16 states train as fp32 states do). The long runs live in the benchmark."""
import json
import math
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # bench/ is a folder of the repository, not an installed package
    sys.path.insert(0, str(ROOT))

from bench import state_accuracy as sa  # noqa: E402
from bench import state_codecs as sc  # noqa: E402
from fusedopt.registry import RULES  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # beside other test workers, spinning threads only slow it down
    yield
    torch.set_num_threads(threads)


def test_variants_cover_every_registry_rule_with_its_state_slots():
    variants = sa.rule_variants()
    assert {v.info.name for v in variants.values()} == set(RULES)
    for variant in variants.values():
        slots = variant.slots()
        assert slots and [key for key, _ in slots] == variant.info.state_keys(**variant.options)
    assert dict(variants["adam"].slots()) == {"exp_avg": True, "exp_avg_sq": False}


def test_every_state_is_stored_after_every_step():
    """After a step, each state holds exactly what its format decodes (re-encoding changes nothing;
    an fp32 Adam state would not survive it)."""
    variant = sa.rule_variants()["adam"]
    policy = sc.candidate_policies()["softsign+log"]
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(8, 300)), torch.nn.Parameter(torch.randn(300))]
    optimizer = variant.build(params)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn_like(p) * 10 ** (-4 * torch.rand_like(p))
        optimizer.step()
        sa.apply_policy(optimizer, params, variant.slots(), policy, None)
    for key, signed in variant.slots():
        matrix, vector = (optimizer.state[p][key] for p in params)
        assert torch.equal(sc.roundtrip(policy.format_for(params[0], signed), matrix), matrix)
        assert policy.format_for(params[1], signed) is sc.FP32  # a 1-D param's states stay fp32


def test_a_format_with_overrides_runs_only_where_they_apply(monkeypatch):
    ran = []
    monkeypatch.setattr(sa, "_one_run", lambda job: ran.append(job[1:3]) or {})
    monkeypatch.setattr(sa, "_progress", lambda *args: None)
    centered = next(name for name, v in sa.rule_variants().items() if "grad_avg" in dict(v.slots()))
    sa.run_grid([sa.Digits()], ["adam", centered], ["softsign+log", "softsign+log centered-bf16"], [0])
    assert ran == [("adam", "softsign+log"), (centered, "softsign+log"), (centered, "softsign+log centered-bf16")]


def test_verdicts_follow_the_bands():
    def digits(fmt, accuracies, losses):
        return [dict(task="digits", variant="adam", format=fmt, seed=s, test_accuracy=a, last_epoch_loss=l,
                     finite=math.isfinite(l))
                for s, (a, l) in enumerate(zip(accuracies, losses))]

    records = (digits("fp32", [97.0, 96.0, 98.0], [0.010, 0.014, 0.012]) + digits("a", [96.6, 95.6, 97.4], [0.011, 0.013, 0.014])
               + digits("b", [96.0, 95.0, 97.0], [0.010, 0.010, 0.010]) + digits("c", [97.0, 96.0, 98.0], [0.02, 0.02, 0.02])
               + digits("d", [97.0, 96.0, 98.0], [0.010, math.nan, 0.010]))
    records += [dict(task="transformer", variant="adam", format=f, seed=0, tail_loss=l, finite=True)
                for f, l in (("fp32", 1.0), ("a", 1.009), ("b", 1.011))]
    rows = {(r["task"], r["format"]): r for r in sa.summarize(records)}
    assert rows["digits", "a"]["passed"]  # 0.47 points below, loss 0.0127 inside 0.010-0.014
    assert not rows["digits", "b"]["passed"]  # a point below
    assert not rows["digits", "c"]["passed"]  # loss above fp32's spread
    assert not rows["digits", "d"]["passed"] and rows["digits", "d"]["non_finite"] == 1
    assert rows["transformer", "a"]["passed"] and not rows["transformer", "b"]["passed"]


def test_short_digits_runs_tell_the_formats_apart():
    """Two epochs of Adam: bf16 states match fp32 states; a linear 8-bit code on the second moment
    (small values round to zero, the update divides by eps) diverges."""
    task, variant = sa.Digits(epochs=2), sa.rule_variants()["adam"]
    policies = sc.candidate_policies()
    results = {name: task.run(variant, policies[name], seed=0) for name in ("fp32", "bf16", "linear+linear")}
    assert results["fp32"]["test_accuracy"] > 85 and results["fp32"]["finite"]
    assert abs(results["bf16"]["test_accuracy"] - results["fp32"]["test_accuracy"]) <= 1.0
    assert results["bf16"]["last_epoch_loss"] == pytest.approx(results["fp32"]["last_epoch_loss"], rel=0.02)
    assert not results["linear+linear"]["finite"] or results["linear+linear"]["test_accuracy"] < 50


def test_short_transformer_run_trains():
    task, variant = sa.CharText(**sa.QUICK["transformer"]), sa.rule_variants()["adamw"]
    result = task.run(variant, sc.candidate_policies()["fp32"], seed=0)
    assert result["finite"] and len(result["losses"]) == task.steps
    assert result["tail_loss"] < 0.85 * result["losses"][0]  # the loss falls within a few dozen steps


def test_bf16_second_moment_stalls_and_stochastic_rounding_tracks():
    """After the grads shrink 10x, fp32's v falls 100x; bf16 rounded to nearest stops falling
    (beta2 = 0.999 moves v by less than half a bf16 step), stochastic rounding follows fp32."""
    stall = sa.stall_demo(steps=1200, drop_at=400, elements=1024, formats=["fp32", "bf16", "bf16-sr"])
    ratios = {name: values[-1] for name, values in stall["ratios"].items()}
    assert ratios["fp32"] == 1.0
    assert ratios["bf16"] > 1.5
    assert ratios["bf16-sr"] == pytest.approx(1.0, abs=0.05)


def test_quick_command_writes_its_tables_and_plots(tmp_path):
    status = sa.main(["--quick", "--tasks", "digits", "--rules", "sgd_momentum", "--formats", "bf16",
                      "--jobs", "1", "--no-codec-time", "--no-stall", "--out", str(tmp_path)])
    assert status == 0
    result = json.loads((tmp_path / "state_accuracy.json").read_text())
    assert {(r["variant"], r["format"]) for r in result["rows"]} == {("sgd_momentum", "fp32"), ("sgd_momentum", "bf16")}
    assert (tmp_path / "loss_digits.png").stat().st_size > 0
    assert "| bf16 |" in (tmp_path / "state_accuracy.md").read_text()


def test_fusedopts_own_formats_run_its_kernels_and_store_their_states():
    """A fusedopt-* format builds fusedopt's class on the numba kernels, with the storage options:
    its states are 8-bit codes (or bf16) after the run, nothing rounds them afterwards, and two
    epochs of Adam train as fp32 states do."""
    variant = sa.rule_variants()["adam"]
    params = [torch.nn.Parameter(torch.randn(64, 128))]
    optimizer = variant.build(params, sa.policies()["fusedopt-8bit"])
    assert type(optimizer).__module__.startswith("fusedopt") and optimizer.param_groups[0]["state_precision"] == "8bit"
    params[0].grad = torch.randn(64, 128)
    optimizer.step()
    assert optimizer.state[params[0]]["exp_avg"].dtype == torch.int8
    assert optimizer.state[params[0]]["exp_avg_sq"].dtype == torch.uint8
    task = sa.Digits(epochs=2)
    fp32, ours = (task.run(variant, sa.policies()[name], seed=0) for name in ("fp32", "fusedopt-8bit"))
    assert ours["finite"] and abs(ours["test_accuracy"] - fp32["test_accuracy"]) <= 2.0
    shapes = [(768, 768), (768,)]  # a matrix in codes, a vector below the 8-bit threshold in fp32
    per_param = sa.fusedopt_state_bytes(variant, sa.FUSEDOPT_FORMATS["fusedopt-8bit"], shapes) / (768 * 768 + 768)
    assert per_param == pytest.approx((768 * 768 * 2 * (1 + 4 / 64) + 768 * 8) / (768 * 768 + 768))


def test_state_memory_counts_the_tensors_a_step_makes():
    """bench.state_memory on two shapes: Adam's 8-bit states are a byte per element and a 4-byte
    scale per 64 for the matrix, fp32 for the small vector; a remainder is 2 bytes per bf16 param."""
    from bench import state_memory

    variant = sa.rule_variants()["adam"]
    shapes, count = [(256, 128), (100,)], 256 * 128 + 100
    total, states = state_memory.bytes_per_param(variant, torch.float32, {"state_precision": "8bit"}, shapes)
    assert states == pytest.approx((256 * 128 * 2 * (1 + 4 / 64) + 100 * 8) / count)
    assert total == pytest.approx(states + 8)
    total, states = state_memory.bytes_per_param(variant, torch.bfloat16, {"master_weights": "remainder"}, shapes)
    assert states == pytest.approx(4 + 2) and total == pytest.approx(4 + 6)
