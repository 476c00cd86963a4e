"""The attention reference against softmax(QK^T)V with masks built independently here."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from unmask import ops, reference


def explicit_attention(q, k, v, visible, scale):
    """Loop over batch and heads; the mask is a plain [B, Lq, Lk] bool built by the caller."""
    batch, q_len, q_heads, _ = q.shape
    group = q_heads // k.shape[2]
    out = torch.zeros(q.shape, dtype=torch.float64)
    for b in range(batch):
        for h in range(q_heads):
            scores = (q[b, :, h].double() @ k[b, :, h // group].double().T) * scale
            for i in range(q_len):
                seen = visible[b, i]
                if seen.any():
                    weights = torch.softmax(scores[i][seen], dim=0)
                    out[b, i, h] = weights @ v[b, seen, h // group].double()
    return out


def build_visibility(batch, q_len, k_len, kv_len, key_valid, block_size, q_offset):
    visible = torch.ones(batch, q_len, k_len, dtype=torch.bool)
    for b in range(batch):
        for i in range(q_len):
            for j in range(k_len):
                if kv_len is not None and j >= int(kv_len[b]):
                    visible[b, i, j] = False
                if key_valid is not None and not bool(key_valid[b, j]):
                    visible[b, i, j] = False
                if block_size is not None and j // block_size > (q_offset + i) // block_size:
                    visible[b, i, j] = False
    return visible


@given(
    batch=st.integers(1, 3),
    q_len=st.integers(1, 9),
    k_len=st.integers(1, 11),
    kv_heads=st.sampled_from([1, 2]),
    group=st.sampled_from([1, 2, 4]),
    head_dim=st.sampled_from([1, 4, 8]),
    use_kv_len=st.booleans(),
    use_key_valid=st.booleans(),
    block_size=st.one_of(st.none(), st.integers(1, 5)),
    q_offset=st.integers(0, 6),
    seed=st.integers(0, 2**16),
)
def test_reference_equals_explicit_softmax(batch, q_len, k_len, kv_heads, group, head_dim, use_kv_len,
                                           use_key_valid, block_size, q_offset, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, q_len, kv_heads * group, head_dim, generator=gen, dtype=torch.float64)
    k = torch.randn(batch, k_len, kv_heads, head_dim, generator=gen, dtype=torch.float64)
    v = torch.randn(batch, k_len, kv_heads, head_dim, generator=gen, dtype=torch.float64)
    kv_len = torch.randint(0, k_len + 2, (batch,), generator=gen) if use_kv_len else None
    key_valid = torch.rand(batch, k_len, generator=gen) > 0.3 if use_key_valid else None
    out = reference.attention(q, k, v, kv_len=kv_len, key_valid=key_valid, block_size=block_size, q_offset=q_offset)
    visible = build_visibility(batch, q_len, k_len, kv_len, key_valid, block_size, q_offset)
    expected = explicit_attention(q, k, v, visible, 1 / math.sqrt(head_dim))
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


def test_gqa_equals_repeated_kv():
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(2, 17, 8, 16, generator=gen)
    k = torch.randn(2, 23, 2, 16, generator=gen)
    v = torch.randn(2, 23, 2, 16, generator=gen)
    grouped = reference.attention(q, k, v, block_size=4)
    repeated = reference.attention(q, k.repeat_interleave(4, dim=2), v.repeat_interleave(4, dim=2), block_size=4)
    torch.testing.assert_close(grouped, repeated, rtol=0, atol=0)


def test_query_that_sees_no_key_returns_zeros():
    q = torch.randn(2, 5, 2, 8)
    k = torch.randn(2, 6, 2, 8)
    v = torch.randn(2, 6, 2, 8)
    out = reference.attention(q, k, v, kv_len=torch.tensor([0, 6]))
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert not torch.isnan(out).any()
    key_valid = torch.zeros(2, 6, dtype=torch.bool)
    assert torch.equal(reference.attention(q, k, v, key_valid=key_valid), torch.zeros_like(q))


def test_no_mask_is_plain_bidirectional_softmax():
    q, k, v = torch.randn(1, 7, 2, 4), torch.randn(1, 9, 2, 4), torch.randn(1, 9, 2, 4)
    expected = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    ).transpose(1, 2)
    torch.testing.assert_close(reference.attention(q, k, v), expected, rtol=1e-5, atol=1e-6)


def test_scale_is_used():
    q, k, v = torch.randn(1, 3, 1, 4), torch.randn(1, 5, 1, 4), torch.randn(1, 5, 1, 4)
    torch.testing.assert_close(reference.attention(q, k, v, scale=1.0), reference.attention(q * 2, k, v, scale=0.5))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_keep_their_dtype(dtype):
    q, k, v = (torch.randn(1, 4, 2, 8).to(dtype) for _ in range(3))
    out = ops.attention(q, k, v)
    assert out.dtype == dtype
    expected = reference.attention(q.double(), k.double(), v.double())
    # One rounding of the fp32 result to the input dtype: half an ulp of |out| <= max|v|.
    tolerance = torch.finfo(dtype).eps * float(v.abs().max())
    assert float((out.double() - expected).abs().max()) <= tolerance


@pytest.mark.parametrize("block_size,q_offset", [(4, 0), (3, 2)])
def test_a_hidden_key_never_reaches_a_query_even_when_not_finite(block_size, q_offset):
    """The specification: a key the masks hide from a query does not reach its output even
    where its V is inf or NaN (0 times NaN is NaN, so the product cannot be the plain
    one); queries that see it get what IEEE arithmetic gives: NaN for a NaN or for
    infinities of both signs, the infinity for one sign."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 12, 2, 8, generator=gen) for _ in range(3))
    first_end = (q_offset // block_size + 1) * block_size
    dirty = v.clone()
    dirty[0, first_end, 0, 0] = float("inf")
    dirty[0, first_end, 1, 1] = float("nan")
    dirty[0, first_end + 1, 0, 2], dirty[0, first_end + 2, 0, 2] = float("inf"), -float("inf")
    valid = torch.ones(1, 12, dtype=torch.bool)
    valid[0, 11] = False
    dirty[0, 11] = float("nan")  # hidden from every query by key_valid
    args = dict(block_size=block_size, q_offset=q_offset, key_valid=valid)
    clean_out, dirty_out = reference.attention(q, k, v, **args), reference.attention(q, k, dirty, **args)
    sees = (torch.arange(12) + q_offset) // block_size * block_size + block_size > first_end + 2
    assert 0 < int(sees.sum()) < 12
    assert torch.equal(dirty_out[:, ~sees], clean_out[:, ~sees])
    assert torch.isposinf(dirty_out[0, sees, 0, 0]).all()
    assert torch.isnan(dirty_out[0, sees, 1, 1]).all() and torch.isnan(dirty_out[0, sees, 0, 2]).all()
    finite = torch.ones_like(dirty_out, dtype=torch.bool)
    finite[0, :, 0, 0] = finite[0, :, 1, 1] = finite[0, :, 0, 2] = False
    torch.testing.assert_close(dirty_out[finite], clean_out[finite])
