"""Property: for any rule, hyperparameters, tensor shapes and dtype, a few steps of the Triton
kernels give the float64 reference's params and states (fusedopt.reference), within the
tolerance of the dtype."""
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fusedopt.registry import RULES as REGISTRY
from helpers import (
    ReferenceOptimizer,
    assert_matches_reference,
    assign_grads,
    clone_params,
    fused_optimizer,
    make_grads,
    randn,
    tolerance,
)

DTYPES = {"fp32": torch.float32, "fp64": torch.float64, "bf16": torch.bfloat16}


class HypothesisPick:
    """fusedopt.registry.Pick on a hypothesis `draw`: what a rule's random_options draws from."""

    def __init__(self, draw):
        self.draw = draw

    def rate(self, low, high):
        return self.draw(st.floats(low, high, allow_nan=False, allow_infinity=False))

    def zero_or(self, low, high):
        return self.draw(st.one_of(st.just(0.0), st.floats(low, high, allow_nan=False, allow_infinity=False)))

    def boolean(self):
        return self.draw(st.booleans())

    def choice(self, values):
        return self.draw(st.sampled_from(values))


@st.composite
def cases(draw):
    """A rule of the registry and random options for it (its random_options)."""
    rule = draw(st.sampled_from(list(REGISTRY)))
    return rule, REGISTRY[rule].random_options(HypothesisPick(draw))


# 0-dim, 1-D of 1 to 300 elements, or 2-D of at most 300.
shapes = st.one_of(
    st.just(()),
    st.tuples(st.integers(1, 300)),
    st.integers(1, 17).flatmap(lambda rows: st.tuples(st.just(rows), st.integers(1, 300 // rows))),
)


# `device` is a plain string fixture: sharing it between examples is harmless.
@settings(max_examples=50, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(case=cases(), shape_list=st.lists(shapes, min_size=1, max_size=3), dtype_name=st.sampled_from(list(DTYPES)),
       steps=st.integers(1, 6), grad_scale=st.sampled_from([1e-2, 1.0, 1e2]), seed=st.integers(0, 2**31 - 1))
def test_kernels_match_the_float64_reference(case, shape_list, dtype_name, steps, grad_scale, seed, device):
    """Params and every state after 1-6 kernel steps equal the float64 reference's, the latter
    rounded to the param dtype after each step (what fp32 math stored in that dtype leaves):
    fp32 within rtol 1e-5 / atol 1e-6 (a few fp32 ulp per step), fp64 within rtol 1e-9 /
    atol 1e-10 (hyperparameters reach the interpreted kernels in double precision), bf16 within
    2 ulp relative / 4 ulp absolute (an occasional one-ulp rounding flip); on CUDA widened by
    the fp32 rounding of the hyperparameters (`helpers.tolerance`). Atol on states is relative
    to the RMS of that kind of state."""
    rule, options = case
    dtype = DTYPES[dtype_name]
    generator = torch.Generator().manual_seed(seed)
    params = [randn(shape, dtype, device, generator).requires_grad_() for shape in shape_list]
    fused_params = clone_params(params)
    fused = fused_optimizer(rule, fused_params, **options)
    oracle = ReferenceOptimizer(rule, params, options, storage_dtype=None if dtype == torch.float64 else dtype)
    for _ in range(steps):
        grads = make_grads(params, generator, scale=grad_scale)
        assign_grads(fused_params, grads)
        fused.step()
        oracle.step(grads)
    rtol, atol = tolerance(dtype, device, rule, options)
    assert_matches_reference(fused, oracle, fused_params, rtol=rtol, atol=atol, where=f"{rule} {options} {dtype_name}")
