"""fusedopt in distributed training, torch.optim as the oracle: FSDP2 (fully_shard, including a
rank with empty local shards), HSDP, the global grad norm, AMP with GradScaler and
ShardedGradScaler, bf16 params with master weights or stochastic rounding, torch.distributed
.checkpoint in both directions and across world sizes, DDP and ZeroRedundancyOptimizer, for every
rule on the reference and on the kernels (Triton's and numba's; the DDP, ZeRO and checkpoint kinds
on numba's alone).

The scenarios (tests/distributed_scenarios.py) run in a few spawns of 2 (or 1) gloo ranks on the
CPU; each test here asserts one behaviour on what one scenario measured on every rank. A scenario
that raised or hung fails its tests with the ranks' tracebacks or log tails.
"""
import math
import re
from pathlib import Path

import pytest

import distributed_scenarios as scenarios
from distributed_scenarios import MAX_NORM, SCENARIOS, STEPS, name_of, names

PHASE_FIXTURES = {"save1": "saved_on_one_rank", "world2": "two_ranks", "load1": "loaded_on_one_rank"}


# ---- running the scenarios that the selected tests ask for ----


def _selected(session, phase):
    """The scenarios of `phase` that the tests of this module selected in this session need."""
    wanted = set()
    for item in session.items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and Path(str(item.path)) == Path(__file__) and "scenario" in callspec.params:
            name = callspec.params["scenario"]
            wanted |= {name, *SCENARIOS[name].needs, *SCENARIOS[name].runs_with}
    return [name for name in wanted if SCENARIOS[name].phase == phase]


def _run(request, workdir, phase):
    wanted = _selected(request.session, phase)
    return scenarios.run_phase(phase, wanted, workdir) if wanted else {}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("distributed")


@pytest.fixture(scope="module")
def saved_on_one_rank(request, workdir):
    return _run(request, workdir, "save1")


@pytest.fixture(scope="module")
def two_ranks(request, workdir, saved_on_one_rank):
    return _run(request, workdir, "world2")


@pytest.fixture(scope="module")
def loaded_on_one_rank(request, workdir, two_ranks):
    return _run(request, workdir, "load1")


def _records(request, name):
    results = request.getfixturevalue(PHASE_FIXTURES[SCENARIOS[name].phase])
    return results[name]


def _failure(name, records):
    errors = [record["error"] for record in records if not record["ok"]]
    return f"scenario {name} failed on {len(errors)} of {len(records)} ranks:\n" + "\n".join(errors)


class Outcome:
    """One scenario's records, one per rank: {"ok", "value", "error"}."""

    def __init__(self, name, records, needed):
        self.name, self.records, self.needed = name, records, needed

    def values(self):
        """What the scenario measured, one value per rank; the test fails where it raised on any
        rank (or where a checkpoint it loads could not be saved)."""
        for name, records in self.needed.items():
            if not all(record["ok"] for record in records):
                pytest.fail(f"the checkpoint it loads was not saved: {_failure(name, records)}", pytrace=False)
        if not all(record["ok"] for record in self.records):
            pytest.fail(_failure(self.name, self.records), pytrace=False)
        return [record["value"] for record in self.records]


@pytest.fixture
def outcome(request, scenario):
    """The outcome of the test's `scenario` (its phase spawned, with the others it needs, on first use)."""
    needed = {name: _records(request, name) for name in SCENARIOS[scenario].needs}
    return Outcome(scenario, _records(request, scenario), needed)


def assert_none(ranks, key):
    """No rank reports any problem under `key` (a list of mismatch descriptions)."""
    problems = [f"rank {rank}: {problem}" for rank, value in enumerate(ranks) for problem in value[key]]
    assert not problems, "\n".join(problems)


# Launches of a clip_grad_norm_ and the step: each kernel backend's reduction and update; none on
# the reference.
CLIP_AND_STEP_LAUNCHES = {"torch": 0, "triton": 2, "numba": 2}


def backend_of(scenario):
    return SCENARIOS[scenario].kwargs["backend"]


def kwargs_of(scenario):
    return SCENARIOS[scenario].kwargs


# ---- the harness ----


@pytest.mark.parametrize("scenario", names("harness", case="fails-on-one-rank"))
def test_a_scenario_raising_on_one_rank_fails_with_its_traceback_without_waiting_out_the_timeout(outcome):
    last, first = outcome.records[-1], outcome.records[0]
    assert not last["ok"] and "deliberate failure on the last rank" in last["error"]
    assert not first["ok"], "the rank left in the collective must report it broken"
    found = re.search(r"the collective failed after ([0-9.]+) s", first["error"])
    assert found, first["error"]
    assert float(found.group(1)) < scenarios.COLLECTIVE_TIMEOUT_S / 2


@pytest.mark.parametrize("scenario", names("harness", case="collective-after-a-failure"))
def test_the_next_scenario_after_a_failure_gets_a_working_process_group(outcome):
    ranks = outcome.values()
    assert ranks == [2.0, 2.0]


# ---- FSDP2 ----

FSDP2 = names("fsdp2-trajectory")


@pytest.mark.parametrize("scenario", [name_of("fsdp2-trajectory", rule="sgd", backend="torch")])
def test_the_fsdp2_model_leaves_rank_1_empty_local_shards(outcome):
    """The setting the FSDP2 scenarios rely on: Linear(3, 1) over 2 ranks puts its one row on rank 0."""
    ranks = outcome.values()
    assert ranks[1]["local_numels"]["4.weight"] == 0 and ranks[1]["local_numels"]["4.bias"] == 0
    assert ranks[0]["local_numels"]["4.weight"] == 3
    assert ranks[0]["local_numels"]["0.weight"] == 4 * 5 and ranks[1]["local_numels"]["0.weight"] == 3 * 5


@pytest.mark.parametrize("scenario", FSDP2)
def test_fsdp2_params_and_states_match_torch_optim(outcome):
    ranks = outcome.values()
    assert_none(ranks, "mismatches")


@pytest.mark.parametrize("scenario", FSDP2)
def test_fsdp2_states_are_dtensors_placed_like_their_params(outcome):
    ranks = outcome.values()
    assert_none(ranks, "state_layout")


@pytest.mark.parametrize("scenario", FSDP2)
def test_fsdp2_step_launches_one_kernel_per_bucket_with_the_kernels_and_none_with_torch(outcome, scenario):
    ranks = outcome.values()
    expected = 0 if backend_of(scenario) == "torch" else 1
    assert [value["launches"] for value in ranks] == [[expected] * STEPS] * len(ranks)


GROUPS = names("fsdp2-groups")


@pytest.mark.parametrize("scenario", GROUPS)
def test_fsdp2_param_group_of_only_empty_shards_on_a_rank_steps_like_torch_optim(outcome):
    ranks = outcome.values()
    assert_none(ranks, "mismatches")


@pytest.mark.parametrize("scenario", [name for name in GROUPS if backend_of(name) != "torch"])
def test_fsdp2_two_param_groups_launch_at_most_one_kernel_each(outcome):
    ranks = outcome.values()
    assert ranks[0]["launches"] == [2] * STEPS, "rank 0 holds rows of both groups"
    assert all(count <= 2 for count in ranks[1]["launches"])


# ---- the global grad norm ----

CLIPS = names("fsdp2-clip") + names("fsdp2-groups-clip")


@pytest.mark.parametrize("scenario", CLIPS)
def test_clip_grad_norm_returns_torchs_global_norm(outcome):
    ranks = outcome.values()
    for value in ranks:
        assert value["norms"] == pytest.approx(value["torch_norms"], rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("scenario", CLIPS)
def test_clip_grad_norm_returns_the_same_norm_on_every_rank(outcome):
    ranks = outcome.values()
    assert all(value["norms"] == ranks[0]["norms"] for value in ranks)


@pytest.mark.parametrize("scenario", CLIPS)
def test_clip_grad_norm_returns_a_0_dim_dtensor_replicated_on_the_params_mesh(outcome, scenario):
    ranks = outcome.values()
    replicated = ["Replicate()"] * (2 if kwargs_of(scenario)["mesh"] == "hsdp" else 1)
    for value in ranks:
        assert value["norm_is_dtensor"] == [True] * STEPS
        assert value["norm_placements"] == [replicated] * STEPS
        assert value["norm_on_param_mesh"] == [True] * STEPS
        assert value["norm_shapes"] == [[]] * STEPS and value["norm_dtypes"] == ["torch.float32"] * STEPS


@pytest.mark.parametrize("scenario", CLIPS)
def test_clip_grad_norm_clips_the_next_step_as_torch_clips_the_grads(outcome):
    ranks = outcome.values()
    assert all(norm > MAX_NORM for norm in ranks[0]["torch_norms"]), "scenario setting: every step clipped"
    assert_none(ranks, "mismatches")


@pytest.mark.parametrize("scenario", names("fsdp2-clip"))
def test_clip_grad_norm_and_step_launch_what_each_backend_launches(outcome, scenario):
    ranks = outcome.values()
    expected = CLIP_AND_STEP_LAUNCHES[backend_of(scenario)]
    assert [value["launches"] for value in ranks] == [[expected] * STEPS] * len(ranks)


@pytest.mark.parametrize("scenario", names("fsdp2-clip", mesh="hsdp", norm_type=2.0))
def test_hsdp_params_are_replicated_and_sharded(outcome):
    """The setting of the HSDP scenarios: fully_shard on a (replicate, shard) mesh."""
    ranks = outcome.values()
    assert [value["param_placements"] for value in ranks] == [["Replicate()", "Shard(dim=0)"]] * 2


@pytest.mark.parametrize("scenario", names("fsdp2-clip", mesh="hsdp"))
def test_hsdp_states_are_dtensors_placed_like_their_params(outcome):
    ranks = outcome.values()
    assert_none(ranks, "state_layout")


@pytest.mark.parametrize("scenario", names("fsdp2-max-grad-norm"))
def test_max_grad_norm_leaves_the_global_norm_in_last_grad_norm_as_a_plain_tensor(outcome):
    ranks = outcome.values()
    for value in ranks:
        assert value["norm_types"] == ["Tensor"] * STEPS
        assert value["norms"] == pytest.approx(value["torch_norms"], rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("scenario", names("fsdp2-max-grad-norm"))
def test_max_grad_norm_clips_every_step_like_torchs_clip_grad_norm(outcome):
    ranks = outcome.values()
    assert all(norm > 1.0 for norm in ranks[0]["torch_norms"]), "scenario setting: every step clipped"
    assert_none(ranks, "mismatches")


# ---- AMP ----

AMP = names("amp")
AMP_INF = names("amp-inf")
AMP_CLIP = names("amp-clip")
AMP_CLIP_INF = names("amp-clip-inf")


@pytest.mark.parametrize("scenario", AMP)
def test_dtensor_params_leave_unscaling_to_the_scaler(outcome):
    ranks = outcome.values()
    assert [value["supports_amp_scaling"] for value in ranks] == [False] * len(ranks)


@pytest.mark.parametrize("scenario", AMP)
def test_scaler_steps_fsdp2_params_like_torch_optim(outcome):
    ranks = outcome.values()
    assert_none(ranks, "mismatches")


@pytest.mark.parametrize("scenario", AMP)
def test_scaler_scale_evolves_as_with_torch_optim(outcome):
    ranks = outcome.values()
    assert ranks[0]["torch_scales"][-1] > 2.0**10, "scenario setting: the scale grows"
    for value in ranks:
        assert value["scales"] == value["torch_scales"]


@pytest.mark.parametrize("scenario", AMP_INF + AMP_CLIP_INF)
def test_inf_in_one_ranks_grad_skips_the_step_on_every_rank(outcome):
    ranks = outcome.values()
    for rank, value in enumerate(ranks):
        assert value["torch_skipped_step_changes"] == [], "torch.optim skips it too"
        assert value["skipped_step_changes"] == [], f"rank {rank}"
        assert value["steps_after_skip"] == value["torch_steps_after_skip"], f"rank {rank}: step counts advanced"


@pytest.mark.parametrize("scenario", AMP_INF + AMP_CLIP_INF)
def test_inf_in_one_ranks_grad_backs_off_the_scale_on_every_rank_as_with_torch_optim(outcome):
    ranks = outcome.values()
    torch_scales = ranks[0]["torch_scales"]
    assert torch_scales[1] == torch_scales[0] / 2, "scenario setting: the inf step backs off the scale"
    for value in ranks:
        assert value["scales"] == torch_scales
        assert value["torch_scales"] == torch_scales


@pytest.mark.parametrize("scenario", AMP_INF + AMP_CLIP_INF)
def test_training_after_an_inf_on_one_rank_matches_torch_optim(outcome):
    ranks = outcome.values()
    assert_none(ranks, "mismatches")


@pytest.mark.parametrize("scenario", AMP_CLIP + AMP_CLIP_INF)
def test_clip_grad_norm_with_grad_scaler_returns_torchs_norm_of_the_unscaled_grads(outcome, scenario):
    ranks = outcome.values()
    inf_step = kwargs_of(scenario).get("inf_step")
    for value in ranks:
        finite = [index for index in range(STEPS) if index != inf_step]
        assert [value["norms"][i] for i in finite] == pytest.approx([value["torch_norms"][i] for i in finite],
                                                                  rel=1e-5, abs=1e-6)
        if inf_step is not None:
            assert not math.isfinite(value["norms"][inf_step])


@pytest.mark.parametrize("scenario", AMP_CLIP)
def test_clip_grad_norm_with_grad_scaler_then_scaler_step_matches_unscale_clip_step(outcome):
    ranks = outcome.values()
    assert all(norm > 1.0 for norm in ranks[0]["torch_norms"]), "scenario setting: every step clipped"
    assert_none(ranks, "mismatches")


@pytest.mark.parametrize("scenario", AMP_CLIP)
def test_clip_grad_norm_with_grad_scaler_keeps_the_scale_as_torch(outcome):
    ranks = outcome.values()
    for value in ranks:
        assert value["scales"] == value["torch_scales"]


# ---- bf16 params ----

MASTER = names("bf16-master")
STOCHASTIC = names("bf16-stochastic")


@pytest.mark.parametrize("scenario", MASTER)
def test_bf16_master_weights_are_fp32_dtensors_placed_like_their_params(outcome):
    ranks = outcome.values()
    assert ranks[0]["param_dtypes"] == ["torch.bfloat16"] * 6, "scenario setting: a bf16 model"
    assert_none(ranks, "master_layout")


@pytest.mark.parametrize("scenario", MASTER)
def test_bf16_params_are_their_master_weights_rounded_to_nearest(outcome):
    ranks = outcome.values()
    assert_none(ranks, "param_is_rounded_master")


@pytest.mark.parametrize("scenario", MASTER)
def test_bf16_master_weights_follow_torch_optim_on_an_fp32_copy(outcome):
    ranks = outcome.values()
    assert_none(ranks, "master_vs_fp32")


@pytest.mark.parametrize("scenario", MASTER)
def test_bf16_master_weights_states_follow_torch_optims_fp32_states_within_bf16_rounding(outcome):
    ranks = outcome.values()
    assert_none(ranks, "states_vs_fp32")


@pytest.mark.parametrize("scenario", STOCHASTIC)
def test_stochastic_rounding_on_shards_stays_finite(outcome):
    ranks = outcome.values()
    assert ranks[0]["param_dtypes"] == ["torch.bfloat16"] * 6, "scenario setting: a bf16 model"
    assert [value["all_finite"] for value in ranks] == [True] * len(ranks)


@pytest.mark.parametrize("scenario", STOCHASTIC)
def test_stochastic_rounding_on_shards_is_reproducible_with_the_same_seed(outcome):
    ranks = outcome.values()
    assert [value["same_seed_identical"] for value in ranks] == [True] * len(ranks)


@pytest.mark.parametrize("scenario", STOCHASTIC)
def test_stochastic_rounding_on_shards_draws_other_bits_with_another_seed(outcome):
    ranks = outcome.values()
    assert any(value["other_seed_differs"] for value in ranks)


@pytest.mark.parametrize("scenario", STOCHASTIC)
def test_stochastic_rounding_on_shards_stays_within_bf16_rounding_of_the_fp32_trajectory(outcome):
    ranks = outcome.values()
    assert_none(ranks, "beyond_rounding")


# ---- states in bf16 and 8 bits, bf16 params with remainders ----

FORMATS = names("formats")


@pytest.mark.parametrize("scenario", FORMATS)
def test_sharded_states_take_the_format_of_the_global_shape_placed_like_their_params(outcome):
    assert_none(outcome.values(), "layout")


@pytest.mark.parametrize("scenario", FORMATS)
def test_sharded_low_precision_states_step_bit_for_bit_as_unsharded_ones(outcome):
    assert_none(outcome.values(), "differ")


@pytest.mark.parametrize("scenario", FORMATS)
def test_sharded_low_precision_states_launch_once_per_storage(outcome, scenario):
    ranks = outcome.values()
    expected = 0 if backend_of(scenario) == "torch" else ranks[0]["storages"]
    # fp32 params: 8-bit, bf16 (rows not whole blocks) and plain (small) states; bf16 params: no bf16 tier
    eight_bit = kwargs_of(scenario)["precision"] == "8bit" and "remainder" not in scenario
    assert ranks[0]["storages"] == (3 if eight_bit else 2), "scenario setting"
    assert [value["launches"] for value in ranks] == [[expected] * STEPS] * len(ranks)


@pytest.mark.parametrize("scenario", names("formats-load"))
def test_dcp_reshards_8bit_codes_and_scales_exactly(outcome, scenario):
    ranks = outcome.values()
    saved_on = 1 if kwargs_of(scenario)["tag"] == "1to2" else 2
    assert [value["world_size"] for value in ranks] == [3 - saved_on] * (3 - saved_on)
    assert_none(ranks, "loaded")


@pytest.mark.parametrize("scenario", names("formats-load"))
def test_training_continues_after_resharding_8bit_states_as_the_reference(outcome):
    assert_none(outcome.values(), "continued")


# ---- torch.distributed.checkpoint ----

TRANSFERS = names("dcp-transfer")
RESHARDS = names("reshard-load")


@pytest.mark.parametrize("scenario", names("dcp-transfer", source="fused", via="state_dict"))
def test_get_optimizer_state_dict_of_fusedopt_equals_torch_optims(outcome):
    ranks = outcome.values()
    assert_none(ranks, "state_dict_format")


@pytest.mark.parametrize("scenario", TRANSFERS)
def test_checkpoint_of_one_optimizer_loads_into_the_other(outcome):
    ranks = outcome.values()
    assert_none(ranks, "loaded")


@pytest.mark.parametrize("scenario", TRANSFERS)
def test_training_continues_from_the_other_optimizers_checkpoint_as_torch_optim(outcome):
    ranks = outcome.values()
    assert_none(ranks, "continued")


@pytest.mark.parametrize("scenario", names("dcp-bf16"))
def test_dcp_restores_bf16_master_weights_and_rounding_state_exactly(outcome, scenario):
    ranks = outcome.values()
    assert_none(ranks, "loaded")
    assert_none(ranks, "state_layout")
    for value in ranks:
        if kwargs_of(scenario)["rounding"] == "master":
            assert value["master_dtypes"] == ["torch.float32"]
        else:
            assert value["group_steps"] == [[2.0], [2.0]]


@pytest.mark.parametrize("scenario", names("dcp-bf16"))
def test_training_resumed_from_dcp_with_bf16_rounding_is_the_uninterrupted_run_bit_for_bit(outcome):
    ranks = outcome.values()
    assert_none(ranks, "continued")


@pytest.mark.parametrize("scenario", RESHARDS)
def test_dcp_checkpoint_saved_on_one_world_size_loads_exactly_on_another(outcome, scenario):
    ranks = outcome.values()
    saved_on = 1 if kwargs_of(scenario)["tag"] == "1to2" else 2
    assert [value["world_size"] for value in ranks] == [3 - saved_on] * (3 - saved_on)
    assert_none(ranks, "loaded")


@pytest.mark.parametrize("scenario", RESHARDS)
def test_training_continues_after_resharding_as_torch_optim(outcome):
    ranks = outcome.values()
    assert_none(ranks, "continued")


# ---- tensor parallel ----

TP = names("tp")


@pytest.mark.parametrize("scenario", TP)
def test_tensor_parallel_params_and_states_match_torch_optim(outcome):
    ranks = outcome.values()
    assert ranks[0]["placements"] == [["Shard(dim=0)"], ["Shard(dim=0)"], ["Shard(dim=1)"], ["Replicate()"],
                                      ["Shard(dim=0)"], ["Shard(dim=0)"]], "scenario setting: column/row splits"
    assert_none(ranks, "mismatches")


@pytest.mark.parametrize("scenario", TP)
def test_tensor_parallel_norm_is_torchs_global_norm(outcome):
    for value in outcome.values():
        assert value["norms"] == pytest.approx(value["torch_norms"], rel=1e-5)


@pytest.mark.parametrize("scenario", TP)
def test_tensor_parallel_clip_and_step_launch_what_each_backend_launches(outcome, scenario):
    expected = CLIP_AND_STEP_LAUNCHES[backend_of(scenario)]
    assert [value["launches"] for value in outcome.values()] == [[expected] * STEPS] * 2


# ---- DDP and ZeroRedundancyOptimizer ----

DDP = names("ddp")
ZERO = names("zero")


@pytest.mark.parametrize("scenario", DDP)
def test_ddp_params_and_states_match_torch_optim(outcome):
    ranks = outcome.values()
    assert_none(ranks, "mismatches")


@pytest.mark.parametrize("scenario", DDP)
def test_ddp_step_launches_one_kernel_with_the_kernels_and_none_with_torch(outcome, scenario):
    ranks = outcome.values()
    expected = 0 if backend_of(scenario) == "torch" else 1
    assert [value["launches"] for value in ranks] == [[expected] * STEPS] * len(ranks)


@pytest.mark.parametrize("scenario", ZERO)
def test_zero_redundancy_optimizer_params_match_torch_optims_class(outcome):
    ranks = outcome.values()
    assert_none(ranks, "params")


@pytest.mark.parametrize("scenario", ZERO)
def test_zero_redundancy_optimizer_consolidated_state_matches_torch_optims_class(outcome):
    ranks = outcome.values()
    assert ranks[1]["consolidated_states"] is None, "consolidated to rank 0"
    assert ranks[0]["consolidated_states"] == []
