"""The model's pointwise kernels (unmask.ops.rms_norm, unmask.ops.rotary): the CPU kernels
under every instruction-set build against the reference, on random data and odd shapes,
into poisoned outputs; where the table sends a call; their argument checks."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from unmask import dispatch, native, ops, reference, validation
from unmask.models.transformer import rotary_tables

pytestmark = pytest.mark.skipif(not native.available(), reason="unmask._C not built")

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def cpu_kernel(kernel: str):
    return native.kernels()[(kernel, "cpu")]


def poisoned(x: torch.Tensor) -> torch.Tensor:
    return torch.full(x.shape, float("nan"), dtype=x.dtype)


def check_rms_norm(x, weight, eps):
    """The kernel against the float64 reference: its error at most twice the float32
    reference's (the model's arithmetic before the kernel), plus one rounding of the
    output dtype, on the largest element and on the mean. Why the rounding: both round
    their float32 result to the dtype, and the kernel sums a row in another order, which
    may move the row's one scale factor by an ulp and with it every element of the row by
    up to an ulp of itself (on a single row of 17 or 32 elements that alone measured 4x
    the reference's mean error)."""
    out = poisoned(x)
    cpu_kernel("rms_norm")(validation.rms_norm_call(x, weight, eps), out=out)
    assert not torch.isnan(out).any(), "unwritten or NaN outputs"
    exact = reference.rms_norm(x.double(), weight.double(), eps)
    error = (out.double() - exact).abs()
    baseline = (reference.rms_norm(x, weight, eps).double() - exact).abs()
    ulp = torch.finfo(x.dtype).eps
    message = (f"max error {float(error.max()):.3g} vs reference {float(baseline.max()):.3g}; "
               f"mean {float(error.mean()):.3g} vs {float(baseline.mean()):.3g}")
    assert float(error.max()) <= 2 * float(baseline.max()) + ulp * float(exact.abs().max()), message
    assert float(error.mean()) <= 2 * float(baseline.mean()) + ulp * float(exact.abs().mean()), message
    return out


@given(rows=st.integers(1, 70), dim=st.sampled_from([1, 3, 17, 32, 100, 128, 1000]), dtype=st.sampled_from(DTYPES),
       weight_float32=st.booleans(), eps=st.sampled_from([0.0, 1e-6, 1e-5, 0.5]), seed=st.integers(0, 2**16))
def test_rms_norm_matches_the_reference(cpu_isa, rows, dim, dtype, weight_float32, eps, seed):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, dim, generator=gen) * 4).to(dtype)
    weight = (1 + torch.randn(dim, generator=gen)).to(torch.float32 if weight_float32 else dtype)
    check_rms_norm(x, weight, eps)


def test_rms_norm_large_call_splits_rows_across_threads(cpu_isa):
    """Above the kernel's threading threshold (2^16 elements), rows go to several threads:
    each row must still come out exactly as it does alone."""
    gen = torch.Generator().manual_seed(3)
    for dtype in DTYPES:
        x = torch.randn(300, 1024, generator=gen).to(dtype)
        weight = torch.randn(1024, generator=gen)
        together = check_rms_norm(x, weight, 1e-5)
        for row in (0, 137, 299):
            assert torch.equal(ops.rms_norm(x[row:row + 1], weight, 1e-5), together[row:row + 1])


def test_rms_norm_reads_strided_rows_and_leading_dims():
    gen = torch.Generator().manual_seed(1)
    wide = torch.randn(9, 40, generator=gen)
    weight = torch.randn(24, generator=gen)
    strided = wide[:, 8:32]  # rows 40 elements apart
    assert ops.backend_for("rms_norm", strided, weight, 1e-6).startswith("cpu:")
    check_rms_norm(strided, weight, 1e-6)
    x = torch.randn(2, 3, 5, 24, generator=gen)
    out = ops.rms_norm(x, weight, 1e-6)
    assert out.shape == x.shape
    torch.testing.assert_close(out, reference.rms_norm(x, weight, 1e-6), rtol=1e-6, atol=1e-6)
    for row in range(3):
        assert torch.equal(out[1, row], ops.rms_norm(x[1, row], weight, 1e-6)), "a row does not depend on the others"


def test_rms_norm_of_zeros_and_extremes():
    weight = torch.ones(8)
    assert torch.equal(ops.rms_norm(torch.zeros(2, 8), weight, 1e-5), torch.zeros(2, 8))
    big = torch.full((1, 8), 1e18)
    torch.testing.assert_close(ops.rms_norm(big, weight, 1e-5), torch.ones(1, 8))
    assert ops.rms_norm(torch.empty(0, 8), weight, 1e-5).shape == (0, 8)


@given(batch=st.integers(1, 4), length=st.integers(1, 40), heads=st.integers(1, 5),
       head_dim=st.sampled_from([2, 6, 16, 32, 34, 64, 128]), dtype=st.sampled_from(DTYPES),
       per_row_tables=st.booleans(), seed=st.integers(0, 2**16))
def test_rotary_equals_the_reference_to_the_bit(cpu_isa, batch, length, heads, head_dim, dtype, per_row_tables, seed):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(batch, length, heads, head_dim, generator=gen) * 3).to(dtype)
    starts = torch.randint(0, 500, (batch if per_row_tables else 1, 1), generator=gen)
    cos, sin = rotary_tables(starts + torch.arange(length), head_dim, 10000.0)
    out = poisoned(x)
    cpu_kernel("rotary")(validation.rotary_call(x, cos, sin), out=out)
    expected = reference.rotary(x, cos, sin)
    assert torch.equal(out, expected), f"max difference {float((out.double() - expected.double()).abs().max()):.3g}"


def test_rotary_reads_strided_heads(cpu_isa):
    """A view of a wider projection (heads 80 elements apart, head_dim 32) is read in place."""
    gen = torch.Generator().manual_seed(2)
    wide = torch.randn(2, 7, 3, 80, generator=gen)
    x = wide[..., 16:48]
    cos, sin = rotary_tables(torch.arange(7)[None], 32, 10000.0)
    assert torch.equal(ops.rotary(x, cos, sin), reference.rotary(x, cos, sin))
    big = torch.randn(3, 200, 4, 64, generator=gen)  # above the threading threshold
    cos, sin = rotary_tables(torch.arange(200)[None], 64, 10000.0)
    assert torch.equal(ops.rotary(big, cos, sin), reference.rotary(big, cos, sin))


def test_the_table_sends_gradients_and_float64_to_the_reference():
    x = torch.randn(4, 16, requires_grad=True)
    weight = torch.ones(16)
    assert ops.backend_for("rms_norm", x, weight, 1e-5) == "reference"
    assert "gradient" in ops.fallback_reason("rms_norm", x, weight, 1e-5)
    ops.rms_norm(x, weight, 1e-5).sum().backward()  # training differentiates the reference
    assert x.grad is not None and torch.isfinite(x.grad).all()
    with torch.no_grad():
        assert ops.backend_for("rms_norm", x, weight, 1e-5).startswith("cpu:")
    assert "dtype float64" in ops.fallback_reason("rms_norm", x.detach().double(), weight.double(), 1e-5)
    q = torch.randn(1, 3, 2, 8, dtype=torch.float64)
    cos, sin = rotary_tables(torch.arange(3)[None], 8, 10000.0)
    assert ops.backend_for("rotary", q, cos.double(), sin.double()) == "reference"
    with dispatch.forced("native"), pytest.raises(NotImplementedError, match="float64"):
        ops.rotary(q, cos.double(), sin.double())


def test_the_model_runs_the_kernels(monkeypatch):
    """Inference through the model reaches the CPU kernels (its norm weights are
    nn.Parameters, which must count as plain tensors), with the reference's logits up to
    rms_norm's float32 rounding."""
    from tests.helpers import tiny_model

    model = tiny_model()
    ids = torch.randint(0, 50, (2, 9))
    launched = []
    for name in ("rms_norm_cpu", "rotary_cpu"):
        launcher = getattr(native._C, name)
        monkeypatch.setattr(native._C, name, lambda params, n=name, f=launcher: launched.append(n) or f(params))
    with torch.inference_mode():
        fused = model(ids)
        count = len(launched)
        with dispatch.forced("reference"):
            plain = model(ids)
    layers = model.config.n_layers
    assert count == len(launched) == 2 * layers + 1 + 2 * layers, f"kernel launches: {launched}"
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)


def test_under_torch_compile_the_reference_operations_are_traced():
    weight = torch.randn(16)
    x = torch.randn(5, 16)
    compiled = torch.compile(lambda t: ops.rms_norm(t, weight, 1e-5), fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), reference.rms_norm(x, weight, 1e-5), rtol=0, atol=0)


@pytest.mark.parametrize("args, error, match", [
    ((torch.randn(3, 8), torch.ones(7), 1e-5), ValueError, "weight must have shape"),
    ((torch.randn(3, 8), torch.ones(8, dtype=torch.float16), 1e-5), TypeError, "weight must be float32 or x's dtype"),
    ((torch.randn(3, 8), torch.ones(8), -1.0), ValueError, "eps must be >= 0"),
    ((torch.randn(3, 8), torch.ones(8), float("nan")), ValueError, "eps must be finite"),
    ((torch.randn(3, 8), torch.ones(8), 1e39), ValueError, r"eps must be at most 3.402823e\+38 \(a finite float32\)"),
    ((torch.randint(0, 3, (3, 8)), torch.ones(8), 1e-5), TypeError, "x must have dtype"),
    ((torch.tensor(1.0), torch.ones(1), 1e-5), ValueError, "x must have a last dimension of at least 1"),
    ((torch.ones(3, 0), torch.ones(0), 1e-5), ValueError, "x must have a last dimension of at least 1"),
])
def test_rms_norm_arguments_are_checked(args, error, match):
    with pytest.raises(error, match=match):
        ops.rms_norm(*args)


def test_rotary_arguments_are_checked():
    cos, sin = rotary_tables(torch.arange(3)[None], 8, 10000.0)
    with pytest.raises(ValueError, match="head dim\\) must be even and at least 2"):
        ops.rotary(torch.randn(1, 3, 2, 7), cos[..., :7], sin[..., :7])
    with pytest.raises(ValueError, match="head dim\\) must be even and at least 2, got 0"):
        ops.rotary(torch.randn(1, 3, 2, 0), cos[..., :0], sin[..., :0])
    with pytest.raises(ValueError, match="cos must have shape"):
        ops.rotary(torch.randn(1, 4, 2, 8), cos, sin)
    with pytest.raises(ValueError, match="cos must have shape \\(1 or 2"):
        ops.rotary(torch.randn(2, 3, 2, 8), cos.expand(3, -1, -1, -1), sin)
    with pytest.raises(TypeError, match="cos must have dtype"):
        ops.rotary(torch.randn(1, 3, 2, 8), cos.half(), sin)
    # float64 tables only beside a float64 x: the kernels read float32 ones (a float64 table
    # used to be read as float32 bit patterns: numbers of 1e34 in a bfloat16 x's rotation)
    for dtype in (torch.float32, torch.bfloat16):
        with pytest.raises(TypeError, match=r"cos must have dtype in \(float32\), got float64"):
            ops.rotary(torch.randn(1, 3, 2, 8, dtype=dtype), cos.double(), sin.double())
        with pytest.raises(TypeError, match=r"sin must have dtype in \(float32\), got float64"):
            ops.rotary(torch.randn(1, 3, 2, 8, dtype=dtype), cos, sin.double())
    with pytest.raises(ValueError, match="cos and sin must have one shape and dtype"):
        ops.rotary(torch.randn(1, 3, 2, 8, dtype=torch.float64), cos, sin.double())
    x64 = torch.randn(1, 3, 2, 8, dtype=torch.float64)
    torch.testing.assert_close(ops.rotary(x64, cos.double(), sin.double()), reference.rotary(x64, cos, sin))
    with pytest.raises(ValueError, match="x must have 4 dimensions"):
        ops.rotary(torch.randn(3, 2, 8), cos, sin)


def test_the_launchers_refuse_bad_params_naming_the_field():
    C = native._C
    x = torch.randn(2, 8)
    params = native._params(C.RmsNormParams, x=x.data_ptr(), weight=x.data_ptr(), out=x.data_ptr(),
                            dtype=C.ScalarType.float32, weight_dtype=C.ScalarType.float32, rows=2, dim=8,
                            x_row_stride=4, eps=1e-5)
    with pytest.raises(ValueError, match="x_row_stride = 4"):
        C.rms_norm_cpu(params)
    params.x_row_stride, params.weight = 8, 0
    with pytest.raises(ValueError, match="weight = 0 must not be null"):
        C.rms_norm_cpu(params)
    rotary = native._params(C.RotaryParams, x=x.data_ptr(), out=x.data_ptr(), dtype=C.ScalarType.float32, batch=2,
                            length=1, heads=1, head_dim=7, x_stride=[8, 8, 8], out_stride=[8, 8, 8],
                            cos=x.data_ptr(), sin=x.data_ptr(), table_batch=1)
    with pytest.raises(ValueError, match="head_dim = 7 must be even"):
        C.rotary_cpu(rotary)
    rotary.head_dim, rotary.table_batch = 8, 3
    with pytest.raises(ValueError, match="table_batch = 3 must be 1 or batch"):
        C.rotary_cpu(rotary)
