"""A mixture's routed experts (unmask.ops.moe_swiglu): the CPU kernel under every
instruction-set build against the reference, on random data and odd shapes, into
poisoned outputs; a token's result whatever shares its call; the torch backend; where
the table sends a call; the argument checks."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from unmask import dispatch, experts, native, ops, reference, validation

pytestmark = pytest.mark.skipif(not native.available(), reason="unmask._C not built")

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def random_call(tokens, dim, hidden, n_experts, per_token, dtype, seed, scale=1.0, repeats=False):
    """repeats: a token may choose an expert twice (no router does; the contract allows it)."""
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(tokens, dim, generator=gen) * scale).to(dtype)
    if repeats:
        chosen = torch.randint(0, n_experts, (tokens, per_token), generator=gen)
    elif tokens:
        chosen = torch.stack([torch.randperm(n_experts, generator=gen)[:per_token] for _ in range(tokens)])
    else:
        chosen = torch.zeros(0, per_token, dtype=torch.int64)
    weights = torch.rand(tokens, per_token, generator=gen) + 0.1
    gate = (torch.randn(n_experts, hidden, dim, generator=gen) * dim ** -0.5).to(dtype)
    up = (torch.randn(n_experts, hidden, dim, generator=gen) * dim ** -0.5).to(dtype)
    down = (torch.randn(n_experts, dim, hidden, generator=gen) * hidden ** -0.5).to(dtype)
    return x, chosen, weights, gate, up, down


def run_kernel(*arguments) -> torch.Tensor:
    call = validation.moe_swiglu_call(*arguments)
    out = torch.full(call.x.shape, float("nan"))
    native.kernels()[("moe_swiglu", "cpu")](call, out=out)
    return out


def absolute_scale(x, chosen, weights, gate, up, down):
    """The reference on the inputs' absolute values (float64): the scale of the terms each
    sum adds. A float32 sum's rounding error is bounded by that, not by the result (a dot
    product of 17 terms summing to 1/120 of their absolute sum loses two digits in any
    order: Higham, Accuracy and Stability of Numerical Algorithms, 3.1)."""
    return reference.moe_swiglu(*(a.double().abs() if a.is_floating_point() else a
                                  for a in (x, chosen, weights, gate, up, down)))


def within_rounding(got, arguments, baseline):
    """got's error against the float64 reference at most twice `baseline`'s, plus two
    float32 roundings of the absolute scale (absolute_scale; over ~7000 random calls of
    these shapes, every ISA build and dtype, the amx build's tiles included, which sum
    each dot product in one float32 accumulator, the excess was at most 0.49 of one), on
    the largest element and the mean."""
    x, chosen, weights, gate, up, down = arguments
    exact = reference.moe_swiglu(x.double(), chosen, weights.double(), gate.double(), up.double(), down.double())
    error, baseline = (got.double() - exact).abs(), (baseline.double() - exact).abs()
    noise = 2 * torch.finfo(torch.float32).eps * absolute_scale(*arguments)
    message = (f"max error {float(error.max()):.3g} vs baseline {float(baseline.max()):.3g}; "
               f"mean {float(error.mean()):.3g} vs {float(baseline.mean()):.3g}")
    assert float(error.max()) <= 2 * float(baseline.max()) + float(noise.max()), message
    assert float(error.mean()) <= 2 * float(baseline.mean()) + float(noise.mean()), message


def check_against_reference(got, arguments):
    """The kernel (float32 arithmetic on the inputs as they are) within rounding of the
    float32 reference's error."""
    assert not torch.isnan(got).any(), "unwritten or NaN outputs"
    x, chosen, weights, gate, up, down = arguments
    within_rounding(got, arguments, reference.moe_swiglu(x.float(), chosen, weights, gate.float(), up.float(),
                                                         down.float()))


@settings(deadline=None)
@given(tokens=st.integers(1, 40), dim=st.sampled_from([1, 3, 16, 17, 33, 100]),
       hidden=st.sampled_from([1, 5, 16, 31, 48]), n_experts=st.integers(1, 9), per_token=st.integers(1, 9),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16), repeats=st.booleans())
def test_the_kernel_matches_the_reference(cpu_isa, tokens, dim, hidden, n_experts, per_token, dtype, seed, repeats):
    """Odd widths (vector tails; the amx build's partial chunks of 32 inputs and blocks of
    16 rows), experts chosen by 1 to 40 tokens (row tiles of 4 and 8 and their remainders;
    the amx build's groups of 16 tokens, in pairs and alone), experts no token chose, a
    token choosing one expert twice."""
    arguments = random_call(tokens, dim, hidden, n_experts, min(per_token, n_experts), dtype, seed, repeats=repeats)
    check_against_reference(run_kernel(*arguments), arguments)


def test_a_tokens_result_does_not_depend_on_its_companions(cpu_isa):
    """Above the threading threshold, experts split across threads and tiles: each token
    comes out bit for bit as it does alone (and so does any subset's)."""
    for dtype, (dim, hidden) in zip(DTYPES * 2, [(256, 64)] * 3 + [(100, 31)] * 3):  # whole vectors, then tails
        arguments = random_call(96, dim, hidden, 16, 4, dtype, seed=7)
        together = run_kernel(*arguments)
        check_against_reference(together, arguments)
        x, chosen, weights, gate, up, down = arguments
        for token in (0, 41, 95):
            alone = run_kernel(x[token:token + 1], chosen[token:token + 1], weights[token:token + 1], gate, up, down)
            assert torch.equal(alone[0], together[token]), (dtype, token)
        some = slice(10, 23)
        assert torch.equal(run_kernel(x[some], chosen[some], weights[some], gate, up, down), together[some])


def test_expanded_rows():
    """x whose rows overlap (one row expanded, stride 0) is read as the rows it shows."""
    x, chosen, weights, gate, up, down = random_call(5, 24, 12, 5, 2, torch.bfloat16, seed=4)
    expanded = x[:1].expand(5, 24)
    got = ops.moe_swiglu(expanded, chosen, weights, gate, up, down)
    assert torch.equal(got, ops.moe_swiglu(expanded.contiguous(), chosen, weights, gate, up, down))
    check_against_reference(got, (expanded.contiguous(), chosen, weights, gate, up, down))


def test_strided_rows_int32_ids_and_no_tokens():
    x, chosen, weights, gate, up, down = random_call(9, 24, 12, 5, 2, torch.bfloat16, seed=3)
    wide = torch.randn(9, 40).to(torch.bfloat16)
    wide[:, 8:32] = x
    strided = wide[:, 8:32]
    assert ops.backend_for("moe_swiglu", strided, chosen, weights, gate, up, down).startswith("cpu:")
    got = ops.moe_swiglu(strided, chosen.to(torch.int32), weights, gate, up, down)
    assert torch.equal(got, ops.moe_swiglu(x, chosen, weights, gate, up, down))
    check_against_reference(got, (x, chosen, weights, gate, up, down))
    for backend in ("native", "reference"):
        with dispatch.forced(backend):
            empty = ops.moe_swiglu(x[:0], chosen[:0], weights[:0], gate, up, down)
        assert empty.shape == (0, 24) and empty.dtype == torch.float32
    empty = experts.EXPERTS(validation.moe_swiglu_call(x[:0], chosen[:0], weights[:0], gate, up, down))
    assert empty.shape == (0, 24)
    short_ids = experts.EXPERTS(validation.moe_swiglu_call(x, chosen.to(torch.int32), weights, gate, up, down))
    assert torch.equal(short_ids, experts.EXPERTS(validation.moe_swiglu_call(x, chosen, weights, gate, up, down)))


def test_a_compiled_call_runs_torchs_products():
    """Traced, the op is torch's products (a graph break where they read the counts):
    the eager torch backend's result."""
    arguments = random_call(9, 24, 12, 5, 2, torch.float32, seed=8)
    compiled = torch.compile(ops.moe_swiglu, backend="eager")
    torch.testing.assert_close(compiled(*arguments), experts.EXPERTS(validation.moe_swiglu_call(*arguments)),
                               rtol=0, atol=0)


def per_token_in_dtype(x, chosen, weights, gate, up, down):
    """The textbook computation in the inputs' dtype: each token's each choice by its own
    products (as a per-token MoE loop in the model's dtype does), summed in float32."""
    linear, silu = torch.nn.functional.linear, torch.nn.functional.silu
    out = torch.zeros(x.shape, dtype=torch.float32)
    for t in range(x.shape[0]):
        for j, e in enumerate(chosen[t].tolist()):
            y = linear(silu(linear(x[t:t + 1], gate[e])) * linear(x[t:t + 1], up[e]), down[e])
            out[t] += weights[t, j] * y[0].float()
    return out


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_torch_backend_matches_the_reference(dtype):
    """torch's products in the input dtype (hidden activations rounded to it, as an
    nn.Linear MLP does): within rounding (within_rounding) of the per-token computation in
    that dtype (its products group the tokens; the roundings are the same kind)."""
    arguments = random_call(37, 40, 24, 6, 3, dtype, seed=11)
    within_rounding(experts.EXPERTS(validation.moe_swiglu_call(*arguments)), arguments, per_token_in_dtype(*arguments))


def test_the_torch_backend_carries_gradients():
    """A call that needs a gradient runs torch's products (the kernel is inference-only),
    whose gradient equals the reference's."""
    arguments = [a.double().requires_grad_(a.is_floating_point()) if a.is_floating_point() else a
                 for a in random_call(7, 12, 8, 4, 2, torch.float32, seed=5)]
    assert ops.backend_for("moe_swiglu", *arguments) == "torch-experts"
    assert "gradient" in ops.fallback_reason("moe_swiglu", *[a.float() if a.is_floating_point() else a
                                                             for a in arguments])
    ops.moe_swiglu(*arguments).sum().backward()
    got = [a.grad.clone() for a in arguments if a.is_floating_point()]
    for a in arguments:
        a.grad = None
    reference.moe_swiglu(*arguments).sum().backward()
    for mine, theirs in zip(got, [a.grad for a in arguments if a.is_floating_point()]):
        torch.testing.assert_close(mine, theirs, rtol=1e-10, atol=1e-12)


def test_where_the_table_sends_a_call():
    """The kernel takes every CPU call it supports, however many tokens share it (the
    backend, and so a token's bits, do not depend on its companions)."""
    kernel = f"cpu:{native.cpu_isa()}"
    for tokens in (1, 16, 600):  # 600 x 2 / 8: 150 pairs per expert
        assert ops.backend_for("moe_swiglu", *random_call(tokens, 32, 8, 8, 2, torch.bfloat16, seed=1)) == kernel
    small = random_call(16, 32, 8, 8, 2, torch.bfloat16, seed=1)
    wide = random_call(5, 32, 8, 8, 2, torch.float64, seed=1)
    assert ops.backend_for("moe_swiglu", *wide) == "torch-experts"
    with dispatch.forced("reference"):
        assert ops.backend_for("moe_swiglu", *small) == "reference"
    with dispatch.forced("native"):
        with pytest.raises(NotImplementedError, match="dtype float64"):
            ops.moe_swiglu(*wide)


@pytest.mark.parametrize("bad", [-1, 8, 2**40])
def test_an_expert_id_out_of_range_is_named(bad):
    x, chosen, weights, gate, up, down = random_call(6, 16, 8, 8, 2, torch.float32, seed=2)
    chosen[4, 1] = bad
    with pytest.raises(ValueError, match=f"experts.* {bad} .*n_experts"):
        ops.moe_swiglu(x, chosen, weights, gate, up, down)
    for backend in (experts.EXPERTS, dispatch.REFERENCE["moe_swiglu"]):
        with pytest.raises(ValueError, match=f"experts must hold ids in \\[0, n_experts\\) = \\[0, 8\\), got {bad}"):
            backend(validation.moe_swiglu_call(x, chosen, weights, gate, up, down))


def test_the_checks_name_the_argument():
    x, chosen, weights, gate, up, down = random_call(6, 16, 8, 8, 2, torch.float32, seed=2)
    cases = [
        ((x[0], chosen, weights, gate, up, down), ValueError, "x must have 2 dimensions"),
        ((x, chosen.float(), weights, gate, up, down), TypeError, "experts must have dtype"),
        ((x, chosen, weights.double(), gate, up, down), TypeError, "weights must have dtype"),
        ((x, chosen, weights, gate.bfloat16(), up, down), TypeError, "gate must have x's dtype float32"),
        ((x, chosen, weights, gate[:, :, :15], up, down), ValueError, r"gate must have shape \(8, 8, 16\)"),
        ((x, chosen, weights, gate, up[:7], down), ValueError, r"up must have shape \(8, 8, 16\)"),
        ((x, chosen, weights, gate, up, down.transpose(1, 2)), ValueError, r"down must have shape \(8, 16, 8\)"),
        ((x, chosen[:5], weights, gate, up, down), ValueError, r"experts must have shape \(6, k\)"),
        ((x[:, :0], chosen, weights, gate[:, :, :0], up[:, :, :0], down[:, :0]), ValueError, "need d, E and f"),
        ((x, torch.zeros(6, 9, dtype=torch.int64), torch.ones(6, 9), gate, up, down), ValueError, "1 <= k <= 8"),
        ((x, chosen, weights[:, :1], gate, up, down), ValueError, r"weights must have shape \(6, 2\)"),
        ((x, chosen, weights.to("meta"), gate, up, down), ValueError, "weights must be on cpu"),
    ]
    for arguments, error, message in cases:
        with pytest.raises(error, match=message):
            ops.moe_swiglu(*arguments)


def test_inf_and_nan_reach_the_outputs_the_reference_gives_them(cpu_isa):
    """A NaN weight, an inf input and an activation that overflows to inf give NaN and
    inf where the float32 reference has them (the amx build splits each activation into
    bfloat16 pieces: an inf must stay one piece, inf - inf would be a NaN)."""
    for dtype in DTYPES:
        x, chosen, weights, gate, up, down = random_call(40, 40, 20, 4, 2, dtype, seed=11)
        gate[0, 3, 5] = float("nan")  # every token choosing expert 0: NaN
        x[7, 2] = float("inf")  # token 7: inf or NaN sums
        if dtype != torch.float16:  # expert 1's first hidden unit past float32's range for token 9
            gate[1, 0] = up[1, 0] = 1e20
            x[9] = x[9].abs()
            chosen[9, 0] = 1
        arguments = (x, chosen, weights, gate, up, down)
        got = run_kernel(*arguments)
        expected = reference.moe_swiglu(x.float(), chosen, weights, gate.float(), up.float(), down.float())
        assert torch.isnan(expected).any(), dtype
        assert dtype == torch.float16 or torch.isinf(expected[9]).any(), dtype
        assert torch.equal(torch.isnan(got), torch.isnan(expected)), dtype
        assert torch.equal(got[torch.isinf(expected)], expected[torch.isinf(expected)]), dtype

    # A gate sum of -inf: silu(-inf) is -inf / (1 + e^inf), NaN in float32, not -inf.
    x, chosen, weights, gate, up, down = random_call(3, 40, 20, 4, 2, torch.bfloat16, seed=12)
    x[0, 2] = float("inf")
    gate[:, :, 2], up[:, :, 2], down = -gate[:, :, 2].abs(), up[:, :, 2].abs(), down.abs()
    got = run_kernel(x, chosen, weights, gate, up, down)
    assert torch.isnan(got[0]).all() and not torch.isnan(got[1:]).any()
