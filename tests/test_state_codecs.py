"""The study's storage formats for optimizer states (bench/state_codecs.py): each code's error
bound, what the smallest values become, stochastic rounding's expectation, blocks that stay within
dim-0 slices (so a shard encodes as its rows of the whole), and the bytes each format stores."""
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # bench/ is a folder of the repository, not an installed package
    sys.path.insert(0, str(ROOT))

from bench import state_codecs as sc  # noqa: E402

COMPANDED = [(signed, kind) for signed in (True, False) for kind in ("linear", "softsign", "sqrt", "root4")]


def spread(shape, seed, signed=True):
    """Values over many decades (as optimizer states are), with exact zeros among them."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator) * 10 ** (-6 * torch.rand(shape, generator=generator))
    x[..., 3] = 0
    return x if signed else x * x


def test_dynamic_maps_are_bitsandbytes_layout():
    signed, unsigned = sc.dynamic_code_map(True), sc.dynamic_code_map(False)
    for table in (signed, unsigned):
        assert len(table) == 256 and len(table.unique()) == 256 and bool((table[1:] > table[:-1]).all())
        assert table.max() == 1.0 and 0.0 in table.tolist()
    # the smallest magnitudes: 1e-6 times the first midpoint of linspace(0.1, 1, 2) or (.., 3)
    assert signed[signed > 0].min().item() == pytest.approx(0.55e-6)
    assert unsigned[unsigned > 0].min().item() == pytest.approx(0.325e-6)
    assert bool((unsigned >= 0).all()) and signed.min().item() == pytest.approx(-signed[-2].item())


@pytest.mark.parametrize("signed,kind", COMPANDED)
@pytest.mark.parametrize("bits", [8, 4])
def test_companded_code_is_within_half_a_step_on_its_scale(signed, kind, bits):
    code = sc.code(kind, signed, bits)
    y = torch.rand(5000, generator=torch.Generator().manual_seed(bits)) ** 3
    y = torch.cat([y, torch.tensor([0.0, 1.0])])
    if signed:
        y = y * torch.where(torch.arange(len(y)) % 2 == 0, 1.0, -1.0)
    decoded = code.decode(code.encode(y))
    forward, _ = sc.COMPANDERS[kind]
    steps = (forward(decoded.abs()) - forward(y.abs())) * code.top
    assert steps.abs().max().item() <= 0.5 + 1e-4
    assert bool((torch.sign(decoded) * torch.sign(y) >= 0).all())  # never the wrong sign
    assert decoded[-2].item() == 0.0 and abs(decoded[-1].item()) == 1.0  # zero and the absmax exact


@pytest.mark.parametrize("kind", ["sqrt", "root4", "linear"])
def test_floor_nonzero_never_rounds_a_positive_value_to_zero(kind):
    plain, floored = sc.code(kind, False), sc.code(kind, False, floor_nonzero=True)
    y = torch.tensor([0.0, 1e-30, 1e-12, 1e-11, 1e-5, 0.5, 1.0])
    assert plain.decode(plain.encode(y))[1:4].eq(0).all()  # the failure being avoided
    decoded = floored.decode(floored.encode(y))
    assert decoded[0] == 0 and bool((decoded[1:] > 0).all())
    assert torch.equal(decoded[5:], plain.decode(plain.encode(y))[5:])  # above the floor: the same code


def test_log_code_has_a_relative_error_bound_over_its_range():
    code = sc.code("log", False, log_range=24.0)
    y = torch.exp2(-24 * torch.rand(20000, generator=torch.Generator().manual_seed(0)))
    decoded = code.decode(code.encode(y))
    half_step = 2 ** (24 / (code.top - 1) / 2) - 1  # half a step, as a ratio
    assert ((decoded / y) - 1).abs().max().item() <= half_step * 1.001
    below = code.decode(code.encode(torch.tensor([0.0, 2.0**-40])))
    assert below.tolist() == [0.0, 2.0**-24]  # below the range: the smallest code, never zero


@pytest.mark.parametrize("name", ["softsign+log sr", "dynamic+udynamic sr", "softsign+sqrt-nz sr", "bf16-sr"])
def test_stochastic_rounding_is_unbiased(name):
    policy = sc.candidate_policies()[name]
    generator = torch.Generator().manual_seed(1)
    for fmt, signed in ((policy.signed, True), (policy.nonnegative, False)):
        # one row: blocks holding their absmax and values between codes, each repeated 4000 times (a
        # positive absmax: bitsandbytes' signed map holds 1 but not -1)
        values = torch.tensor([1.0, 0.3337, 0.01234, 0.000567] if not signed else [1.0, -0.3337, -0.01234, 0.000567])
        x = values.repeat(1, 4000).reshape(1, -1)
        draws = torch.stack([sc.roundtrip(fmt, x, generator) for _ in range(8)]).reshape(-1, 4)
        nearest = sc.roundtrip(type(fmt)(**_without_stochastic(fmt)), x).reshape(-1, 4)[0]
        mean = draws.mean(0)
        # the nearest-rounding error is the bias stochastic rounding removes; the tolerance is 5 standard errors
        sigma = draws.std(0) / math.sqrt(draws.shape[0])
        assert bool(((mean - values).abs() <= 5 * sigma + 1e-9).all()), (fmt.name, mean, values, nearest)


def _without_stochastic(fmt):
    if isinstance(fmt, sc.Bf16):
        return dict(stochastic=False)
    return dict(code=fmt.code, block=fmt.block, stochastic=False, layout=fmt.layout)


@pytest.mark.parametrize("block", [32, 100, 256])
@pytest.mark.parametrize("shape", [(6, 300), (7, 3, 50), (5, 17)])
def test_row_blocks_stay_within_dim0_slices(block, shape):
    """A dim-0 shard (what FSDP2 gives a rank) encodes to the same codes and scales as its rows of
    the whole tensor: the stored state does not depend on the mesh."""
    fmt = sc.Blockwise(sc.code("softsign", True), block=block)
    x = spread(shape, seed=block)
    whole = fmt.encode(x)
    per_row = math.ceil(math.prod(shape[1:]) / min(block, math.prod(shape[1:])))
    for start, stop in ((0, 2), (2, shape[0])):
        shard = fmt.encode(x[start:stop])
        assert torch.equal(shard.tensors["scales"], whole.tensors["scales"][start * per_row: stop * per_row])
        assert torch.equal(fmt.decode(shard, x[start:stop].shape), fmt.decode(whole, x.shape)[start:stop])


def test_flat_blocks_straddle_rows():
    fmt = sc.Blockwise(sc.code("softsign", True), block=256, layout="flat")
    x = spread((6, 100), seed=0)
    x[2, 0] = 10.0  # the largest value, in the first 256-element block of the whole, not of rows 0-1
    assert not torch.equal(fmt.decode(fmt.encode(x[:2]), (2, 100)), fmt.decode(fmt.encode(x), x.shape)[:2])


@pytest.mark.parametrize("name", list(sc.candidate_policies()))
def test_every_format_round_trips_within_its_block_and_keeps_zeros(name):
    policy = sc.candidate_policies()[name]
    for fmt, signed in ((policy.signed, True), (policy.nonnegative, False)):
        x = spread((9, 70), seed=3, signed=signed)
        decoded = sc.roundtrip(fmt, x, torch.Generator().manual_seed(0))
        assert decoded.shape == x.shape and decoded.dtype == torch.float32
        assert bool((decoded[..., 3] == 0).all())
        rows_absmax = x.abs().amax(1, keepdim=True)
        # within one code step of the largest magnitudes (their steps are the widest: 7% for 8-bit log codes)
        bound = {"fp32": 0.0, "bf16": 2**-8, "bf16-sr": 2**-7}.get(fmt.name, 0.75 if "4bit" in fmt.name else 0.07)
        assert bool(((decoded - x).abs() <= bound * rows_absmax + 1e-30).all()), fmt.name
        if not signed:
            assert bool((decoded >= 0).all())


@pytest.mark.parametrize("shape", [(1,), (5,), (4, 33), (300, 257), (2, 3, 129), (1024, 1)])
def test_storage_bytes_are_what_encode_stores(shape):
    for policy in sc.candidate_policies().values():
        for fmt in (policy.signed, policy.nonnegative):
            assert fmt.storage_bytes(shape) == fmt.encode(torch.ones(shape)).nbytes, (fmt.name, shape)


def test_policy_keeps_small_and_one_dim_params_in_fp32():
    policy = sc.candidate_policies()["softsign+log"]
    assert policy.format_for(torch.empty(768), True) is sc.FP32  # a 1-D param's dim-0 slices are elements
    assert policy.format_for(torch.empty(4, 8), False) is policy.nonnegative
    small = sc.StatePolicy("t", policy.signed, policy.nonnegative, min_numel=4096)
    assert small.format_for(torch.empty(63, 64), True) is sc.FP32
    assert small.format_for(torch.empty(64, 64), True) is policy.signed
    # 8-bit codes and a 4-byte scale per 256: 1 + 4/256 bytes per element, for each of Adam's two states
    assert sc.state_bytes(policy, [(512, 1024)], [("m", True), ("v", False)]) == 2 * (512 * 1024 + 4 * 512 * 4)


def test_overrides_apply_only_where_the_rule_keeps_the_named_state():
    policy = sc.candidate_policies()["softsign+log centered-bf16"]
    param = torch.empty(16, 16)
    centered = ["square_avg", "momentum_buffer", "grad_avg"]
    assert policy.overridden(centered) and not policy.overridden(["square_avg"])
    assert isinstance(policy.format_for(param, False, "square_avg", centered), sc.Bf16)
    assert isinstance(policy.format_for(param, True, "grad_avg", centered), sc.Bf16)
    assert policy.format_for(param, True, "momentum_buffer", centered) is policy.signed
    assert policy.format_for(param, False, "square_avg", ["square_avg"]) is policy.nonnegative
