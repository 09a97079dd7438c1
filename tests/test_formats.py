"""Specification of optimizer states stored in bf16 and in blockwise 8 bits, and of bf16 params with
16-bit remainders (fusedopt.formats): the plain-torch codec's round trips and error bounds; which
format a param's states take; every rule's kernels (Triton's, numba's) against the plain-torch
reference with the same formats; an AMP-skipped step; stochastic rounding; checkpoints both ways;
states a user stored in bf16; remainders bitwise the fp32 master."""
import functools
import io
import math

import pytest
import torch

import fusedopt
from fusedopt import formats
from fusedopt.registry import RULES as REGISTRY
from fusedopt.rounding import join_master, split_master
from helpers import DEFAULT_LR, RULES, assert_close

# Params of every kind a format decision meets: 8-bit (rows of whole blocks, the last kernel block
# partly filled), 1-D (bf16: no blocks), rows that are not whole blocks (bf16), and small (plain).
SHAPES = [(37, 128), (70, 64), (4500,), (48, 100), (9, 7)]
PRECISIONS = ["bf16", "8bit"]
KERNELS = ["triton", "numba"]
# The kernels against the reference on each device they run on: CPU tensors (Triton's interpreter,
# numba), CUDA ones (Triton, compiled).
KERNELS_ON = [("cpu", "triton"), ("cpu", "numba")] + ([("cuda", "triton")] if torch.cuda.is_available() else [])


def make_params(seed, shapes=SHAPES, dtype=torch.float32, scale=1.0, device="cpu"):
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter((torch.randn(shape, generator=generator) * scale).to(device, dtype)) for shape in shapes]


def give_grads(params, generator, scale=1.0):
    return [(torch.randn(p.shape, generator=generator) * scale).to(p.device, p.dtype) for p in params]


def build(rule, params, backend, **options):
    info = REGISTRY[rule]
    return info.optimizer(params, backend=backend, **{"lr": DEFAULT_LR[rule], **info.richest[0], **options})


def decoded_states(optimizer, params):
    """{(param index, key): values in fp32} of every state tensor (8-bit codes decoded)."""
    out = {}
    for index, p in enumerate(params):
        state = optimizer.state[p]
        for key in optimizer._state_keys(optimizer.param_groups[0]):
            if key in state:
                out[index, key] = formats.decode(state, key, torch.float32)
    return out


# ---- the codec ----


def test_bf16_states_round_to_nearest_and_back_within_half_a_bf16_ulp():
    values = torch.randn(4096, 64) * 10
    state = {"m": torch.zeros(4096, 64, dtype=torch.bfloat16)}
    formats.encode(values, state, "m")
    decoded = formats.decode(state, "m", torch.float32)
    assert torch.equal(state["m"], values.bfloat16())
    assert ((decoded - values).abs() <= values.abs() * 2.0**-8).all()


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("magnitude", [1e-30, 1e-6, 1.0, 1e20])
def test_8bit_codes_round_trip_within_half_a_code_step_of_each_block(signed, magnitude):
    """Every element within half a code step of its block's scale (signed: scale / 127; the
    non-negative, stored as square roots: a half step in the root); a nonzero non-negative value
    never decodes to zero; a block of zeros stays zeros."""
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(64, 4 * formats.QUANT_BLOCK, generator=generator) * magnitude
    values[3] = 0.0  # whole blocks of zeros
    values[5, 7] = magnitude * 1e-9  # a tiny value beside large ones
    if not signed:
        values = values.abs()
    codes, scales = (formats.encode_signed if signed else formats.encode_unsigned)(values)
    assert codes.dtype == (torch.int8 if signed else torch.uint8) and codes.shape == values.shape
    assert scales.shape == (64, 4) and scales.dtype == torch.float32
    decoded = (formats.decode_signed if signed else formats.decode_unsigned)(codes, scales)
    step = scales.repeat_interleave(formats.QUANT_BLOCK, dim=1) / (formats.SIGNED_CODES if signed else
                                                                     formats.UNSIGNED_CODES)
    if signed:
        assert ((decoded - values).abs() <= step / 2 * (1 + 1e-6)).all()
    else:
        roots = values.sqrt()
        # codes rounded to nearest, and a nonzero root never below one step
        assert ((decoded.sqrt() - roots).abs() <= torch.maximum(step / 2 * (1 + 1e-6), step)).all()
        assert ((values > 0) <= (decoded > 0)).all()
    assert (decoded[3] == 0).all()


def test_a_nan_in_an_8bit_block_makes_that_block_nan_and_leaves_the_others():
    values = torch.randn(2, 2 * formats.QUANT_BLOCK)
    values[0, 3] = math.nan
    codes, scales = formats.encode_signed(values)
    decoded = formats.decode_signed(codes, scales)
    assert decoded[0, :formats.QUANT_BLOCK].isnan().all()
    assert decoded[0, formats.QUANT_BLOCK:].isfinite().all() and decoded[1].isfinite().all()


@pytest.mark.parametrize("signed", [True, False])
def test_stochastic_codes_are_unbiased(signed):
    """Averaged over many roundings, the decoded value is the value (to 1% of a code step)."""
    values = (torch.rand(1, formats.QUANT_BLOCK) * 2 - (1 if signed else 0)).expand(4000, -1).contiguous()
    values[:, 0] = 1.0  # each block's scale: 1
    generator = torch.Generator().manual_seed(0)
    codes, scales = (formats.encode_signed if signed else formats.encode_unsigned)(values, generator)
    decoded = (formats.decode_signed if signed else formats.decode_unsigned)(codes, scales)
    target = values if signed else values  # unsigned: unbiased in the root
    mean = decoded.mean(0) if signed else decoded.sqrt().mean(0)
    expected = target[0] if signed else target[0].sqrt()
    step = 1 / (formats.SIGNED_CODES if signed else formats.UNSIGNED_CODES)
    assert ((mean - expected).abs() < 0.05 * step).all()


def test_remainders_give_the_fp32_master_back_bit_for_bit():
    master = torch.randn(100_000) * 1e3
    master[:5] = torch.tensor([math.inf, -math.inf, 3.4e38, -0.0, 1e-40])
    param, remainder = split_master(master)
    assert param.dtype == torch.bfloat16 and remainder.dtype == torch.int16
    assert torch.equal(join_master(param, remainder).view(torch.int32), master.view(torch.int32))
    # the param is the master rounded to nearest (ties away from zero): within half a bf16 ulp
    finite = master.isfinite() & (master.abs() < 3e38)
    assert ((param.float() - master).abs()[finite] <= master.abs()[finite] * 2.0**-8 + 2.0**-134).all()
    nan_param, _ = split_master(torch.tensor([math.nan]))
    assert nan_param.isnan().all()


# ---- which format a param's states take ----


@pytest.mark.parametrize("shape, dtype, expected", [
    ((37, 128), torch.float32, {"fp32": "plain", "bf16": "bf16", "8bit": "8bit"}),
    ((4500,), torch.float32, {"fp32": "plain", "bf16": "bf16", "8bit": "bf16"}),  # 1-D: no blocks within rows
    ((48, 100), torch.float32, {"fp32": "plain", "bf16": "bf16", "8bit": "bf16"}),  # rows not whole blocks
    ((9, 7), torch.float32, {"fp32": "plain", "bf16": "plain", "8bit": "plain"}),  # small: below the threshold
    ((37, 128), torch.bfloat16, {"fp32": "plain", "bf16": "plain", "8bit": "8bit"}),
    ((37, 128), torch.float64, {"fp32": "plain", "bf16": "plain", "8bit": "plain"}),
])
def test_the_format_follows_the_global_shape(shape, dtype, expected):
    param = torch.zeros(shape, dtype=dtype)
    assert {precision: formats.state_format(precision, param) for precision in formats.PRECISIONS} == expected


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("precision", PRECISIONS)
def test_state_tensors_take_the_format_and_cost_the_bytes_it_says(rule, precision):
    params = make_params(1)
    optimizer = build(rule, params, "torch", state_precision=precision, **REGISTRY[rule].stateful)
    for p, g in zip(params, give_grads(params, torch.Generator().manual_seed(2))):
        p.grad = g
    optimizer.step()
    for p in params:
        state = optimizer.state[p]
        group = optimizer.param_groups[0]
        for key in optimizer._state_keys(group):
            fmt = formats.state_format(precision, p, optimizer.spec.may_code(optimizer.spec.options(group), key))
            assert formats.format_of(state, key, p) == fmt, (rule, key, p.shape)
            nbytes = sum(state[key + suffix].numel() * state[key + suffix].element_size()
                         for suffix in formats.suffixes(state, key))
            per_element = {formats.PLAIN: 4, formats.BF16: 2, formats.Q8: 1 + 4 / formats.QUANT_BLOCK}[fmt]
            assert nbytes == p.numel() * per_element


@pytest.mark.parametrize("backend", ["torch", "numba"])
def test_centered_rmsprop_keeps_its_variance_pair_out_of_8bit_codes(backend):
    """sqrt(square_avg - grad_avg^2) of two states coded apart could take the root of a negative:
    under "8bit", centered RMSprop stores that pair in bf16 (its momentum buffer still in codes),
    and uncentered RMSprop codes square_avg."""
    expected = {True: {"square_avg": formats.BF16, "momentum_buffer": formats.Q8, "grad_avg": formats.BF16},
                False: {"square_avg": formats.Q8, "momentum_buffer": formats.Q8}}
    for centered in (True, False):
        param = torch.nn.Parameter(torch.randn(64, 128))
        optimizer = fusedopt.RMSprop([param], lr=0.01, momentum=0.9, centered=centered, state_precision="8bit",
                                     backend=backend)
        param.grad = torch.randn(64, 128)
        optimizer.step()
        state = optimizer.state[param]
        assert {key: formats.format_of(state, key, param) for key in expected[centered]} == expected[centered]


def test_unknown_formats_raise_value_error_naming_the_argument():
    param = [torch.nn.Parameter(torch.zeros(3))]
    with pytest.raises(ValueError, match="state_precision.*'fp32', 'bf16', '8bit'"):
        fusedopt.Adam(param, state_precision="fp8")
    with pytest.raises(ValueError, match="state_rounding.*'nearest', 'stochastic'"):
        fusedopt.Adam(param, state_rounding="up")
    with pytest.raises(ValueError, match="master_weights"):
        fusedopt.Adam(param, master_weights="fp16")
    optimizer = fusedopt.Adam(param)
    with pytest.raises(ValueError, match="state_precision"):
        optimizer.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))], "state_precision": 8})


def test_the_storage_options_are_kept_per_group_and_only_where_set():
    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(3))
    optimizer = fusedopt.Adam([{"params": [a]}, {"params": [b], "state_precision": "bf16"}], state_precision="8bit",
                              state_rounding="stochastic")
    assert optimizer.param_groups[0]["state_precision"] == "8bit"
    assert optimizer.param_groups[1]["state_precision"] == "bf16"
    assert optimizer.param_groups[1]["state_rounding"] == "stochastic"
    assert "state_precision" not in fusedopt.Adam([a]).param_groups[0]  # torch.optim's groups, as they are


# ---- the kernels against the reference, format by format ----


def run_beside_reference(rule, backend, precision, rounding="nearest", steps=4, seed=3, dtype=torch.float32,
                         poison=None, device="cpu", **options):
    """The rule on `backend` and on the plain-torch reference, same formats, same grads."""
    ours_params, theirs_params = (make_params(seed, dtype=dtype, device=device) for _ in range(2))
    options = dict(REGISTRY[rule].stateful, state_precision=precision, state_rounding=rounding, **options)
    ours, theirs = build(rule, ours_params, backend, **options), build(rule, theirs_params, "torch", **options)
    generator = torch.Generator().manual_seed(seed + 1)
    for step in range(steps):
        grads = give_grads(ours_params, generator)
        if poison is not None:
            poison(step, grads)
        for p, q, g in zip(ours_params, theirs_params, grads):
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
    if backend != "torch":
        assert all(not plan.reference_params for plan in ours._plans.values()), "a param took the reference"
    return ours, theirs, ours_params, theirs_params


def assert_states_within_a_code_step(ours, theirs, ours_params, theirs_params, where):
    """Decoded states equal the reference's, but for an occasional code (or bf16 rounding) that
    falls the other way: within one step of its block (8-bit) or one bf16 ulp."""
    mine, reference = decoded_states(ours, ours_params), decoded_states(theirs, theirs_params)
    for (index, key), expected in reference.items():
        actual = mine[index, key]
        state = theirs.state[theirs_params[index]]
        if formats.format_of(state, key, theirs_params[index]) == formats.Q8:
            scales = formats.decode(dict(m=state[key + formats.SCALES]), "m", torch.float32)
            step = scales.repeat_interleave(formats.QUANT_BLOCK, dim=1).reshape(expected.shape) / 127
            step = step * (2 * expected.abs().sqrt() + step) if state[key].dtype == torch.uint8 else step
            tolerance = step * 1.01 + 1e-30
        else:
            tolerance = expected.abs() * 2.0**-7 + 1e-30
        bad = (actual - expected).abs() > tolerance
        assert not bad.any(), f"{where} param {index} {key}: {int(bad.sum())} of {bad.numel()} elements differ"


@pytest.mark.parametrize("device, backend", KERNELS_ON, ids=[f"{d}-{b}" for d, b in KERNELS_ON])
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("rule", RULES)
def test_kernels_give_the_references_states_and_params(rule, precision, device, backend):
    ours, theirs, ours_params, theirs_params = run_beside_reference(rule, backend, precision, device=device)
    assert_states_within_a_code_step(ours, theirs, ours_params, theirs_params, f"{rule} {precision} {backend}")
    for index, (p, q) in enumerate(zip(ours_params, theirs_params)):
        assert_close(p.detach(), q.detach(), rtol=1e-3, atol=1e-3 * DEFAULT_LR[rule],
                     name=f"{rule} {precision} {backend} param {index}")


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("precision", PRECISIONS)
def test_an_amp_skipped_step_leaves_codes_scales_and_params_bit_identical(precision, backend):
    params = make_params(4)
    optimizer = build("adam", params, backend, state_precision=precision)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    generator = torch.Generator().manual_seed(5)
    for step in range(3):
        grads = give_grads(params, generator)
        if step == 2:
            grads[0][0, 0] = math.inf
        scaler.scale(torch.ones(()))  # as a scaled loss would: the scaler's scale made
        for p, g in zip(params, grads):
            p.grad = g * scaler.get_scale()
        before = [t.clone() for p in params for t in [p.detach(), *optimizer.state[p].values()]] if step == 2 else None
        scaler.step(optimizer)
        scaler.update()
    after = [t for p in params for t in [p.detach(), *optimizer.state[p].values()]]
    assert all(torch.equal(a, b) for a, b in zip(after, before))


@pytest.mark.parametrize("backend", KERNELS)
def test_infs_and_nans_in_grads_reach_the_states_as_in_the_reference(backend):
    def poison(step, grads):
        if step == 1:
            grads[0][2, 5] = math.nan
            grads[1][0, 0] = math.inf

    ours, theirs, ours_params, theirs_params = run_beside_reference("adam", backend, "8bit", poison=poison)
    mine, reference = decoded_states(ours, ours_params), decoded_states(theirs, theirs_params)
    for key, expected in reference.items():
        assert torch.equal(mine[key].isnan(), expected.isnan()), key


def edge_value_grads():
    """Grads (16 rows of 4 blocks) whose first step puts a block's edge values in the states as
    they are: SGD's momentum buffer is the grad, Adagrad's sum its square. Blocks of largest 127
    (or 255) make the codec's multiplier 1, so ties of rounding are exact; beside them tiny and
    denormal values, zeros of both signs, blocks holding an inf or a NaN, and a block of values
    below 127 / the largest float (its codes' multiplier is inf)."""
    generator = torch.Generator().manual_seed(11)
    grads = torch.randn(16, 4 * formats.QUANT_BLOCK, generator=generator)
    blocks = grads.view(-1, formats.QUANT_BLOCK)
    ties = torch.arange(formats.QUANT_BLOCK - 1) + 0.5
    blocks[1, 1:] = ties - 32  # x.5 either side of zero
    blocks[1, 0] = 127.0
    blocks[2, 1:] = ties  # roots x.5 (squares and roots exact) beside the largest, 255
    blocks[2, 0] = 255.0
    blocks[3, :8] = torch.tensor([1.0, 1e-3, 1e-20, 1e-40, 0.0, -0.0, -1e-3, 0.5])
    blocks[4] = -0.0
    blocks[5] = 0.0
    blocks[6, 9] = math.inf
    blocks[7, 2] = -math.inf
    blocks[8, 40] = math.nan
    blocks[9] = blocks[9] * 1e-38  # a block so small that 127 / its largest |x| overflows to inf
    blocks[9, :3] = torch.tensor([0.0, 1e-45, -3e-38])
    return grads


def wild_grads(seed):
    """Grads (16 rows of 4 blocks) whose blocks each span up to 40 binades anywhere from the
    denormals to the overflow, with zeros of both signs, and a tenth of them exact ties."""
    generator = torch.Generator().manual_seed(seed)
    blocks = 16 * 4
    top = torch.randint(-150, 129, (blocks, 1), generator=generator).float()
    spread = torch.randint(0, 40, (blocks, 1), generator=generator).float()
    exponents = top - torch.rand(blocks, formats.QUANT_BLOCK, generator=generator) * spread
    values = torch.sign(torch.randn(blocks, formats.QUANT_BLOCK, generator=generator)) * torch.exp2(exponents)
    draw = torch.rand(blocks, formats.QUANT_BLOCK, generator=generator)
    values = torch.where(draw < 0.05, 0.0, torch.where(draw < 0.07, -0.0, values))
    ties = torch.randint(-127, 127, (blocks, formats.QUANT_BLOCK), generator=generator) + 0.5
    ties[:, 0] = 127.0
    values = torch.where(torch.rand(blocks, 1, generator=generator) < 0.1, ties, values)
    return values.reshape(16, 4 * formats.QUANT_BLOCK)


CODEC_CASES = {"edge values": edge_value_grads,
               **{f"every magnitude, seed {seed}": functools.partial(wild_grads, seed) for seed in range(3)}}


@pytest.mark.parametrize("device, backend", KERNELS_ON, ids=[f"{d}-{b}" for d, b in KERNELS_ON])
@pytest.mark.parametrize("rule, key", [("sgd", "momentum_buffer"), ("adagrad", "sum")])
@pytest.mark.parametrize("case", CODEC_CASES)
def test_kernels_encode_as_the_codec_does_bit_for_bit(case, rule, key, device, backend):
    """A first step puts the grads in the states as they are (SGD's momentum buffer is the grad,
    Adagrad's sum its square): the kernels' codes and scales are the codec's, bit for bit (on a
    GPU too: its compilers must neither fuse nor approximate the codec's arithmetic)."""
    grads = CODEC_CASES[case]()
    runs = []
    for runner, on in ((backend, device), ("torch", "cpu")):
        param = torch.nn.Parameter(torch.zeros_like(grads, device=on))
        optimizer = REGISTRY[rule].optimizer([param], lr=0.1, backend=runner, state_precision="8bit",
                                             **REGISTRY[rule].stateful)
        param.grad = grads.to(on)
        optimizer.step()
        runs.append({name: value.cpu() for name, value in optimizer.state[param].items()})
    ours, reference = runs
    assert ours[key].dtype == (torch.int8 if rule == "sgd" else torch.uint8)
    assert torch.equal(ours[key], reference[key])
    torch.testing.assert_close(ours[key + formats.SCALES], reference[key + formats.SCALES], rtol=0, atol=0,
                               equal_nan=True)


@pytest.mark.parametrize("backend", KERNELS + ["torch"])
@pytest.mark.parametrize("precision", PRECISIONS)
def test_stochastic_rounding_of_states_is_reproducible_and_differs_from_nearest(precision, backend):
    runs = [run_beside_reference("adam", backend, precision, rounding, seed=6)[0] for rounding in
            ("stochastic", "stochastic", "nearest")]
    states = [decoded_states(run, run.param_groups[0]["params"]) for run in runs]
    assert all(torch.equal(states[0][key], states[1][key]) for key in states[0])
    assert any(not torch.equal(states[0][key], states[2][key]) for key in states[0])


# ---- bf16 params whose fp32 master is a 16-bit remainder ----


@pytest.mark.parametrize("backend", KERNELS + ["torch"])
@pytest.mark.parametrize("rule", RULES)
def test_remainders_keep_the_fp32_master_bit_for_bit(rule, backend):
    ours_params, theirs_params = make_params(7, dtype=torch.bfloat16), make_params(7, dtype=torch.bfloat16)
    ours = build(rule, ours_params, backend, master_weights="remainder")
    theirs = build(rule, theirs_params, backend, master_weights=True)
    step_both(ours, theirs, ours_params, theirs_params, seed=8, steps=4)
    for p, q in zip(ours_params, theirs_params):
        assert ours.state[p]["master_remainder"].dtype == torch.int16 and "master_param" not in ours.state[p]
        master = join_master(p.detach(), ours.state[p]["master_remainder"])
        assert torch.equal(master.view(torch.int32), theirs.state[q]["master_param"].view(torch.int32))
        assert torch.equal(p.detach(), split_master(master)[0]) and torch.equal(p, q)  # the same params too


# ---- checkpoints ----


@pytest.mark.parametrize("precision", PRECISIONS)
def test_a_low_precision_checkpoint_is_compact_and_loads_back_exactly(precision):
    params = make_params(9)
    optimizer = build("adam", params, "numba", state_precision=precision)
    for p, g in zip(params, give_grads(params, torch.Generator().manual_seed(9))):
        p.grad = g
    optimizer.step()
    saved = optimizer.state_dict()
    buffer = io.BytesIO()
    torch.save(saved, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    elements = sum(p.numel() for p in params)
    nbytes = sum(t.numel() * t.element_size() for values in loaded["state"].values() for key, t in values.items()
                 if key != "step")
    fp32_bytes = elements * 4 * len(optimizer._state_keys(optimizer.param_groups[0]))
    assert nbytes < fp32_bytes * (0.6 if precision == "bf16" else 0.4)
    twin_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    twin = build("adam", twin_params, "numba", state_precision=precision)
    twin.load_state_dict(loaded)
    for index, values in twin.state_dict()["state"].items():
        for key, value in values.items():
            assert value.dtype == saved["state"][index][key].dtype and torch.equal(value, saved["state"][index][key])
    grads = give_grads(params, torch.Generator().manual_seed(10))
    for p, q, g in zip(params, twin_params, grads):
        p.grad, q.grad = g.clone(), g.clone()
    optimizer.step()
    twin.step()
    assert all(torch.equal(p, q) for p, q in zip(params, twin_params))


def test_a_torch_optim_checkpoint_loads_into_8bit_states_and_exports_back():
    params = make_params(11)
    torch_optimizer = torch.optim.AdamW([torch.nn.Parameter(p.detach().clone()) for p in params], lr=0.01)
    for p, g in zip(torch_optimizer.param_groups[0]["params"], give_grads(params, torch.Generator().manual_seed(11))):
        p.grad = g
    torch_optimizer.step()
    ours = fusedopt.AdamW(params, lr=0.01, state_precision="8bit")
    ours.load_state_dict(torch_optimizer.state_dict())
    assert ours.param_groups[0]["state_precision"] == "8bit"  # a torch.optim group keeps this optimizer's
    for p, q in zip(params, torch_optimizer.param_groups[0]["params"]):
        fmt = formats.state_format("8bit", p)
        for key in ("exp_avg", "exp_avg_sq"):
            assert formats.format_of(ours.state[p], key, p) == fmt
            expected = torch_optimizer.state[q][key]
            assert_close(formats.decode(ours.state[p], key, torch.float32), expected, rtol=0.02,
                         atol=float(expected.abs().max()) / 100, name=key)
    exported = fusedopt.fp32_state_dict(ours)
    back = torch.optim.AdamW([torch.nn.Parameter(p.detach().clone()) for p in params], lr=0.01)
    back.load_state_dict(exported)
    for q in back.param_groups[0]["params"]:
        assert {key: value.dtype for key, value in back.state[q].items()} == {
            "step": torch.float32, "exp_avg": torch.float32, "exp_avg_sq": torch.float32}
    assert "state_precision" not in exported["param_groups"][0]


def test_codes_that_do_not_fit_their_param_raise_and_load_nothing():
    params = make_params(12)
    optimizer = build("adam", params, "torch", state_precision="8bit")
    for p, g in zip(params, give_grads(params, torch.Generator().manual_seed(12))):
        p.grad = g
    optimizer.step()
    saved = optimizer.state_dict()
    other = [torch.nn.Parameter(torch.zeros(38, 128))] + make_params(12)[1:]
    target = build("adam", other, "torch", state_precision="8bit")
    with pytest.raises(ValueError, match="shape"):
        target.load_state_dict(saved)
    assert len(target.state) == 0 and "state_precision" in target.param_groups[0]


# ---- states a user stored in bf16 ----


@pytest.mark.parametrize("backend", KERNELS + ["torch"])
def test_bf16_states_put_in_by_the_user_step_as_bf16_precision(backend):
    """fp32 params whose exp_avg and exp_avg_sq a pre-step hook made bf16 (as torchtitan does) step as
    state_precision="bf16" would."""
    shapes = [shape for shape in SHAPES if math.prod(shape) >= formats.SMALLEST_QUANTIZED]  # small: plain
    ours_params, theirs_params = make_params(13, shapes), make_params(13, shapes)
    ours = build("adam", ours_params, backend, amsgrad=False)
    theirs = build("adam", theirs_params, backend, amsgrad=False, state_precision="bf16")

    def to_bf16(optimizer, args, kwargs):
        for group in optimizer.param_groups:
            for p in group["params"]:
                state = optimizer.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    for key in ("exp_avg", "exp_avg_sq"):
                        state[key] = torch.zeros_like(p, dtype=torch.bfloat16)

    ours.register_step_pre_hook(to_bf16)
    step_both(ours, theirs, ours_params, theirs_params, seed=14, steps=3)
    for p, q in zip(ours_params, theirs_params):
        assert torch.equal(p, q)
        for key in ("exp_avg", "exp_avg_sq"):
            assert ours.state[p][key].dtype == torch.bfloat16
            assert torch.equal(formats.decode(ours.state[p], key, torch.float32),
                               formats.decode(theirs.state[q], key, torch.float32))


# ---- the tables behind 8-bit states are never stale ----


def step_both(ours, theirs, ours_params, theirs_params, seed, steps=2):
    """`steps` steps of both optimizers on the same fresh grads."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p, q, g in zip(ours_params, theirs_params, give_grads(ours_params, generator)):
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()


def assert_runs_match(ours, theirs, ours_params, theirs_params, where):
    assert all(not plan.reference_params for plan in ours._plans.values()), "a param took the reference"
    assert_states_within_a_code_step(ours, theirs, ours_params, theirs_params, where)
    for index, (p, q) in enumerate(zip(ours_params, theirs_params)):
        assert_close(p.detach(), q.detach(), rtol=1e-3, atol=1e-3 * DEFAULT_LR["adam"], name=f"{where} param {index}")


@pytest.mark.parametrize("how", ["data", "set_"])
@pytest.mark.parametrize("backend", KERNELS)
def test_8bit_codes_and_scales_given_new_storage_are_updated_there(backend, how, table_check):
    """Codes and scales moved to new storage (same values) between steps: the kernel reads and
    writes the new storage, and never again the old."""
    ours, theirs, ours_params, theirs_params = run_beside_reference("adam", backend, "8bit", steps=2)
    old = []
    for optimizer, params in ((ours, ours_params), (theirs, theirs_params)):
        for p in params:
            for key, value in optimizer.state[p].items():
                if key != "step":
                    if optimizer is ours:
                        old.append((value.data, value.data.clone()))
                    new = value.detach().clone()
                    if how == "data":
                        value.data = new
                    else:
                        value.set_(new)
    step_both(ours, theirs, ours_params, theirs_params, seed=16)
    assert_runs_match(ours, theirs, ours_params, theirs_params, f"8-bit states moved by {how}")
    assert all(torch.equal(alias, before) for alias, before in old), "an old storage was written"


@pytest.mark.parametrize("how", ["replaced", "data"])
@pytest.mark.parametrize("backend", KERNELS)
def test_scales_that_do_not_fit_their_codes_raise_before_anything_is_written(backend, how, table_check):
    ours, _, ours_params, _ = run_beside_reference("adam", backend, "8bit", steps=2)
    state = ours.state[ours_params[0]]
    rows, blocks = state["exp_avg_sq_scales"].shape
    wrong = torch.ones(rows, blocks + 1)
    if how == "replaced":
        state["exp_avg_sq_scales"] = wrong
    else:
        state["exp_avg_sq_scales"].data = wrong
    before = [p.detach().clone() for p in ours_params], [{k: v.clone() for k, v in ours.state[p].items()}
                                                         for p in ours_params]
    for p, g in zip(ours_params, give_grads(ours_params, torch.Generator().manual_seed(17))):
        p.grad = g
    with pytest.raises(RuntimeError, match="scales of state 'exp_avg_sq'"):
        ours.step()
    for p, value, saved in zip(ours_params, *before):
        assert torch.equal(p.detach(), value)
        assert all(torch.equal(ours.state[p][key], tensor) for key, tensor in saved.items())


@pytest.mark.parametrize("backend", KERNELS)
def test_8bit_states_the_user_replaces_by_bf16_ones_step_as_bf16(backend, table_check):
    ours, theirs, ours_params, theirs_params = run_beside_reference("adam", backend, "8bit", steps=2)
    for optimizer, params in ((ours, ours_params), (theirs, theirs_params)):
        for p in params:
            state = optimizer.state[p]
            for key in optimizer._state_keys(optimizer.param_groups[0]):
                if formats.format_of(state, key, p) == formats.Q8:
                    state[key] = formats.decode(state, key, torch.float32).bfloat16()
                    del state[key + formats.SCALES]
    step_both(ours, theirs, ours_params, theirs_params, seed=18)
    assert all(formats.format_of(ours.state[p], "exp_avg", p) != formats.Q8 for p in ours_params)
    assert_runs_match(ours, theirs, ours_params, theirs_params, "8-bit states made bf16")


# ---- storage options edited between steps, and checkpoints of other settings ----


def state_snapshot(optimizer):
    return {index: dict(values) for index, values in optimizer.state_dict()["state"].items()}


def assert_same_run(ours, theirs, ours_params, theirs_params):
    assert all(torch.equal(p, q) for p, q in zip(ours_params, theirs_params))
    mine, reference = state_snapshot(ours), state_snapshot(theirs)
    assert mine.keys() == reference.keys()
    for index, values in reference.items():
        assert mine[index].keys() == values.keys(), index
        for key, value in values.items():
            assert mine[index][key].dtype == value.dtype and torch.equal(mine[index][key], value), (index, key)


EDITS = {"fp32 to 8bit": ({}, {"state_precision": "8bit"}), "8bit to fp32": ({"state_precision": "8bit"},
                                                                              {"state_precision": "fp32"}),
         "8bit to bf16": ({"state_precision": "8bit"}, {"state_precision": "bf16"}),
         "fp32 to bf16": ({}, {"state_precision": "bf16"}),
         "nearest to stochastic": ({"state_precision": "8bit"}, {"state_rounding": "stochastic"})}


@pytest.mark.parametrize("backend", KERNELS + ["torch"])
@pytest.mark.parametrize("edit", EDITS)
def test_a_group_given_other_storage_options_steps_as_a_checkpoint_saved_with_them(edit, backend):
    """Storage options edited into a group between steps take effect at the next step, on the
    kernels as on the reference: the states are converted, and the run goes on bit for bit as one
    restored from a checkpoint whose group holds the new options."""
    before, after = EDITS[edit]
    ours_params, theirs_params = make_params(21), make_params(21)
    ours, theirs = (build("adam", params, backend, **before) for params in (ours_params, theirs_params))
    step_both(ours, theirs, ours_params, theirs_params, seed=22)
    saved = theirs.state_dict()
    for group in saved["param_groups"]:
        group.update(after)
    theirs = build("adam", theirs_params, backend, **before)
    theirs.load_state_dict(saved)
    ours.param_groups[0].update(after)
    step_both(ours, theirs, ours_params, theirs_params, seed=23)
    assert_same_run(ours, theirs, ours_params, theirs_params)
    old, new = (options.get("state_precision", ours.param_groups[0].get("state_precision", "fp32"))
                for options in (before, after))
    for p in ours_params:  # each state in the format the group now asks for; bf16 ones stay bf16
        kept = formats.state_format(old, p) == formats.BF16
        for key in ("exp_avg", "exp_avg_sq"):
            expected = formats.BF16 if kept else formats.state_format(new, p)
            assert formats.format_of(ours.state[p], key, p) == expected, (p.shape, key)
    if backend != "torch":
        assert all(not plan.reference_params for plan in ours._plans.values()), "a param took the reference"
        if "state_rounding" in after:
            assert all(bucket.storage.state_rounding == "stochastic" for plan in ours._plans.values()
                       for bucket in plan.buckets)


@pytest.mark.parametrize("backend", KERNELS + ["torch"])
@pytest.mark.parametrize("key, value", [("state_precision", "fp16"), ("state_precision", "int4"),
                                        ("state_rounding", "up")])
def test_storage_options_that_are_none_of_theirs_raise_at_the_step_and_at_loading(key, value, backend):
    params = make_params(24)
    optimizer = build("adam", params, backend, state_precision="8bit")
    step_both(optimizer, optimizer, params, params, seed=25, steps=1)
    saved = optimizer.state_dict()
    before = [p.detach().clone() for p in params]
    optimizer.param_groups[0][key] = value
    with pytest.raises(ValueError, match=f"Invalid {key}: {value!r}"):
        step_both(optimizer, optimizer, params, params, seed=26, steps=1)
    assert all(torch.equal(p, q) for p, q in zip(params, before))
    saved["param_groups"][0][key] = value
    target = build("adam", make_params(24), backend, state_precision="8bit")
    with pytest.raises(ValueError, match=f"Invalid {key}"):
        target.load_state_dict(saved)
    assert len(target.state) == 0 and target.param_groups[0].get(key) != value


@pytest.mark.parametrize("precision", PRECISIONS)
def test_sgds_momentum_buffer_of_a_sparse_grad_stays_sparse_as_in_torch(precision):
    """torch.optim keeps a sparse momentum buffer for a sparse grad; no format stores one."""
    ours_param, theirs_param = (torch.nn.Parameter(torch.ones(64, 64)) for _ in range(2))
    ours = fusedopt.SGD([ours_param], lr=0.1, momentum=0.9, state_precision=precision)
    theirs = torch.optim.SGD([theirs_param], lr=0.1, momentum=0.9)
    for step in range(3):
        indices = torch.tensor([[0, 5, step], [1, 2, 63]])
        grad = torch.sparse_coo_tensor(indices, torch.tensor([1.0, -2.0, 0.5]), (64, 64))
        ours_param.grad, theirs_param.grad = grad.clone(), grad.clone()
        ours.step()
        theirs.step()
    assert torch.equal(ours_param, theirs_param)
    buffer = ours.state[ours_param]["momentum_buffer"]
    assert buffer.is_sparse and torch.equal(buffer.to_dense(), theirs.state[theirs_param]["momentum_buffer"].to_dense())


@pytest.mark.parametrize("precision", ["fp32", *PRECISIONS])
def test_a_none_momentum_buffer_of_an_old_torch_checkpoint_starts_from_the_grad(precision):
    """torch.optim.SGD saved {"momentum_buffer": None} for momentum=0 (torch 2.0 and before); it
    loads it, and with momentum on starts the buffer from the grad."""
    ours_param, theirs_param = (torch.nn.Parameter(torch.ones(64, 64)) for _ in range(2))
    saved = {"state": {0: {"momentum_buffer": None}},
             "param_groups": [dict(lr=0.1, momentum=0.9, dampening=0, weight_decay=0, nesterov=False,
                                   maximize=False, foreach=None, differentiable=False, fused=None, params=[0])]}
    ours = fusedopt.SGD([ours_param], lr=0.1, momentum=0.9, state_precision=precision)
    theirs = torch.optim.SGD([theirs_param], lr=0.1, momentum=0.9)
    ours.load_state_dict(saved)
    theirs.load_state_dict(saved)
    generator = torch.Generator().manual_seed(27)
    for _ in range(2):
        grad = torch.randn(64, 64, generator=generator)
        ours_param.grad, theirs_param.grad = grad.clone(), grad.clone()
        ours.step()
        theirs.step()
    assert_close(ours_param.detach(), theirs_param.detach(), rtol=1e-2, atol=1e-3, name=precision)
    assert formats.format_of(ours.state[ours_param], "momentum_buffer", ours_param) == \
        formats.state_format(precision, ours_param)


MASTER_SETTINGS = {"fp32 copy": True, "remainder": "remainder", "none": False}


@pytest.mark.parametrize("backend", KERNELS + ["torch"])
@pytest.mark.parametrize("saved_with, loaded_into", [("fp32 copy", "remainder"), ("remainder", "fp32 copy"),
                                                     ("fp32 copy", "none"), ("remainder", "none")])
def test_a_checkpoint_of_another_master_weights_setting_converts_or_drops_its_master(saved_with, loaded_into,
                                                                                     backend):
    """A bf16 param's master saved under one master_weights setting: converted where the loading
    optimizer keeps the other kind (the same master bit for bit, so the run goes on exactly), and
    dropped where it keeps none (stale after its first step, it must not come back later)."""
    params = make_params(28, dtype=torch.bfloat16)
    saving = build("adam", params, backend, master_weights=MASTER_SETTINGS[saved_with])
    step_both(saving, saving, params, params, seed=29, steps=3)
    loaded_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    loading = build("adam", loaded_params, backend, master_weights=MASTER_SETTINGS[loaded_into])
    buffer = io.BytesIO()
    torch.save(saving.state_dict(), buffer)
    buffer.seek(0)
    loading.load_state_dict(torch.load(buffer, weights_only=True))
    kept = {"fp32 copy": "master_param", "remainder": "master_remainder", "none": None}[loaded_into]
    for p in loaded_params:
        assert [key for key in formats.MASTER_KEYS if key in loading.state[p]] == ([kept] if kept else [])
    if kept is None:  # the params move without a master; one kept again later starts from them
        step_both(loading, loading, loaded_params, loaded_params, seed=30, steps=2)
        again = build("adam", loaded_params, backend, master_weights=MASTER_SETTINGS[saved_with])
        again.load_state_dict(loading.state_dict())
        for p in loaded_params:
            master = again.state[p]["master_param" if saved_with == "fp32 copy" else "master_remainder"]
            assert torch.equal(master, p.detach().float()) if saved_with == "fp32 copy" else not master.any()
        return
    step_both(saving, loading, params, loaded_params, seed=32, steps=3)
    for p, q in zip(params, loaded_params):  # the same masters and params: the run went on exactly
        assert torch.equal(p, q) and torch.equal(master_of(saving.state[p], p).view(torch.int32),
                                                 master_of(loading.state[q], q).view(torch.int32))
        assert torch.equal(q.detach(), split_master(master_of(loading.state[q], q))[0])


def master_of(state, param):
    return join_master(param.detach(), state["master_remainder"]) if "master_remainder" in state else \
        state["master_param"]


@pytest.mark.parametrize("backend", KERNELS + ["torch"])
def test_a_master_at_a_tie_converts_to_the_same_master_and_param(backend):
    """A master exactly halfway between two bf16 values: its param is rounded away from zero,
    beside a remainder as beside an fp32 copy; the conversion keeps both."""
    params = make_params(38, shapes=[(37, 128)], dtype=torch.bfloat16)
    saving = build("adam", params, backend, master_weights="remainder")
    step_both(saving, saving, params, params, seed=39, steps=1)
    saved = saving.state_dict()
    masters = join_master(params[0].detach(), saved["state"][0]["master_remainder"])
    bits = masters.view(torch.int32) & ~0xFFFF | 0x8000  # halfway: low half exactly 0x8000
    ties = bits.view(torch.float32)
    high, remainder = split_master(ties)
    loaded_params = [torch.nn.Parameter(high.clone())]
    saved["state"][0]["master_remainder"] = remainder
    loading = build("adam", loaded_params, backend, master_weights=True)
    loading.load_state_dict(saved)
    master = loading.state[loaded_params[0]]["master_param"]
    assert torch.equal(master.view(torch.int32), ties.view(torch.int32))
    assert torch.equal(loaded_params[0].detach(), high) and not torch.equal(high, ties.bfloat16())
    loading._prepare_master(loaded_params[0])  # as the first step's plan does: the master stays
    assert torch.equal(loading.state[loaded_params[0]]["master_param"].view(torch.int32), ties.view(torch.int32))


def test_a_checkpoint_with_other_groups_gets_torchs_message_and_scales_load_as_fp32():
    params = make_params(33)
    optimizer = build("adam", params, "torch", state_precision="8bit")
    step_both(optimizer, optimizer, params, params, seed=34, steps=1)
    saved = optimizer.state_dict()
    two_groups = build("adam", [{"params": params[:2]}, {"params": params[2:]}], "torch", state_precision="8bit")
    with pytest.raises(ValueError, match="different number of parameter groups"):
        two_groups.load_state_dict(saved)
    fewer = build("adam", params[:-1], "torch", state_precision="8bit")
    with pytest.raises(ValueError, match="doesn't match the size of optimizer's group"):
        fewer.load_state_dict(saved)
    for values in saved["state"].values():
        for key in [key for key in values if key.endswith(formats.SCALES)]:
            values[key] = values[key].double()
    twin = build("adam", make_params(33), "torch", state_precision="8bit")
    twin.load_state_dict(saved)
    assert all(value.dtype == torch.float32 for values in twin.state.values() for key, value in values.items()
               if key.endswith(formats.SCALES))


@pytest.mark.parametrize("encode", [formats.encode_signed, formats.encode_unsigned])
def test_a_shard_without_rows_encodes_to_no_codes_and_no_scales(encode):
    """An FSDP2 shard of a param with fewer rows than ranks holds none."""
    codes, scales = encode(torch.zeros(0, 4096))
    assert codes.shape == (0, 4096) and scales.shape == (0, 64)


@pytest.mark.parametrize("master_weights", [True, "remainder"])
def test_adagrads_master_is_made_with_its_state_and_follows_a_param_written_before_the_first_step(master_weights):
    """Adagrad makes its state in its constructor, as torch does: the master with it, so that the
    state_dict torch.distributed.checkpoint loads into names it; a param written after that (a
    model's load_state_dict) is the one the first step starts from."""
    params, later = make_params(35, dtype=torch.bfloat16), make_params(36, dtype=torch.bfloat16)
    optimizer = build("adagrad", params, "numba", master_weights=master_weights)
    key = "master_param" if master_weights is True else "master_remainder"
    assert all(key in values for values in optimizer.state_dict()["state"].values())
    with torch.no_grad():
        for p, q in zip(params, later):
            p.copy_(q)
    twin_params = [torch.nn.Parameter(q.detach().clone()) for q in later]
    twin = build("adagrad", twin_params, "numba", master_weights=master_weights)
    step_both(optimizer, twin, params, twin_params, seed=37, steps=2)
    assert all(torch.equal(p, q) for p, q in zip(params, twin_params))


def test_a_nan_in_a_master_leaves_the_others_where_the_params_are_planned_again():
    """A replan (here: the optimizer's own state dict loaded back) checks each param against its
    fp32 master: an element whose param is NaN, as its master is, is no param written since."""
    runs = []
    for reload in (False, True):
        params = make_params(41, shapes=[(64, 128)], dtype=torch.bfloat16)
        optimizer = build("adam", params, "numba", master_weights=True)
        generator = torch.Generator().manual_seed(42)
        for step in range(3):
            grad = give_grads(params, generator)[0]
            if step == 1:
                grad[0, 7] = math.nan
            if step == 2 and reload:
                optimizer.load_state_dict(optimizer.state_dict())
            params[0].grad = grad
            optimizer.step()
        runs.append(optimizer.state[params[0]]["master_param"])
    assert torch.equal(runs[0].nan_to_num(0.0), runs[1].nan_to_num(0.0)) and int(runs[1].isnan().sum()) == 1
