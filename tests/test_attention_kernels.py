"""The native attention kernel against the float64 reference, under flash-attention's
tolerance rule: its error is at most twice the error of the same computation done in
the input dtype, plus the rounding of one output element."""

import pytest
import torch

from unmask import native, ops, reference

pytestmark = pytest.mark.skipif(ops._C is None, reason="unmask._C not built")


def attention_in_input_dtype(q, k, v, visible, scale):
    """Plain softmax(QK^T)V with every product and the softmax in q.dtype: the baseline
    error a kernel in that dtype is allowed twice of."""
    group = q.shape[2] // k.shape[2]
    qh = q.transpose(1, 2)
    kh = k.repeat_interleave(group, dim=2).transpose(1, 2)
    vh = v.repeat_interleave(group, dim=2).transpose(1, 2)
    scores = (qh @ kh.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~visible[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return (probs @ vh).transpose(1, 2)


def check_against_reference(q, k, v, kernel=native.attention_cpu, **masks):
    """kernel: a native adapter (attention_cpu, attention_cuda); everything runs on q's device."""
    batch, q_len, _, head_dim = q.shape
    out = torch.full_like(q, float("nan"))  # poison: every element must be written
    kernel(q, k, v, kv_len=masks.get("kv_len"), key_valid=masks.get("key_valid"),
           block_size=masks.get("block_size"), q_offset=masks.get("q_offset", 0), scale=head_dim**-0.5, out=out)
    exact = reference.attention(q.double(), k.double(), v.double(), **masks)
    visible = reference.visibility(batch, q_len, k.shape[1], **masks, device=q.device)
    baseline = attention_in_input_dtype(q, k, v, visible, head_dim**-0.5).double()
    error, baseline_error = (out.double() - exact).abs(), (baseline - exact).abs()
    rounding = torch.finfo(q.dtype).eps * float(v.abs().max())
    message = (f"max error {float(error.max()):.3g} vs baseline {float(baseline_error.max()):.3g}; "
               f"mean {float(error.mean()):.3g} vs {float(baseline_error.mean()):.3g}")
    assert not torch.isnan(out).any(), "unwritten or NaN outputs"
    assert float(error.max()) <= 2 * float(baseline_error.max()) + rounding, message
    assert float(error.mean()) <= 2 * float(baseline_error.mean()) + rounding / 8, message


def random_inputs(batch, q_len, k_len, q_heads, kv_heads, head_dim, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, q_len, q_heads, head_dim, generator=gen).to(dtype)
    k = torch.randn(batch, k_len, kv_heads, head_dim, generator=gen).to(dtype)
    v = torch.randn(batch, k_len, kv_heads, head_dim, generator=gen).to(dtype)
    return q, k, v, gen


MASKS = ["none", "kv_len", "key_valid", "block", "block_offset", "all"]


def make_masks(kind, batch, k_len, gen):
    kv_len = torch.randint(0, k_len + 1, (batch,), generator=gen)
    key_valid = torch.rand(batch, k_len, generator=gen) > 0.25
    return {
        "none": {},
        "kv_len": {"kv_len": kv_len},
        "key_valid": {"key_valid": key_valid},
        "block": {"block_size": 16},
        "block_offset": {"block_size": 32, "q_offset": 40},
        "all": {"kv_len": kv_len, "key_valid": key_valid, "block_size": 8, "q_offset": 3},
    }[kind]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("q_len,k_len", [(1, 1), (17, 99), (99, 17), (130, 1025)])
def test_masks_and_lengths(dtype, mask, q_len, k_len):
    q, k, v, gen = random_inputs(2, q_len, k_len, 4, 2, 64, dtype, seed=q_len * 1000 + k_len)
    check_against_reference(q, k, v, **make_masks(mask, 2, k_len, gen))


@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("head_dim", [128, 64, 24, 1])
def test_gqa_and_head_dims(group, head_dim):
    q, k, v, gen = random_inputs(1, 1023, 257, 8, 8 // group, head_dim, torch.float32, seed=group * head_dim)
    check_against_reference(q, k, v, key_valid=torch.rand(1, 257, generator=gen) > 0.5, block_size=64)


def test_long_block_causal_bf16():
    q, k, v, gen = random_inputs(1, 1025, 1025, 4, 1, 128, torch.bfloat16, seed=7)
    check_against_reference(q, k, v, block_size=32, key_valid=torch.rand(1, 1025, generator=gen) > 0.1)


def test_strided_inputs():
    base = torch.randn(2, 40, 3, 6, 64)  # q, k, v interleaved: rows are not contiguous
    q, k, v = base[:, :, 0], base[:, :, 1], base[:, :, 2]
    torch.testing.assert_close(ops.attention(q, k, v, block_size=8),
                               reference.attention(q, k, v, block_size=8), rtol=2e-5, atol=2e-6)


def test_queries_that_see_nothing_get_zeros():
    q, k, v, _ = random_inputs(2, 9, 70, 2, 2, 64, torch.float32, seed=3)
    out = ops.attention(q, k, v, kv_len=torch.tensor([0, 70]), key_valid=torch.ones(2, 70, dtype=torch.bool))
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert not torch.isnan(out).any()


def test_empty_batch_and_empty_keys():
    q, k, v, _ = random_inputs(0, 5, 5, 2, 2, 64, torch.float32, seed=1)
    assert ops.attention(q, k, v).shape == (0, 5, 2, 64)
    q, k, v, _ = random_inputs(1, 5, 0, 2, 2, 64, torch.float32, seed=1)
    assert torch.equal(ops.attention(q, k, v), torch.zeros(1, 5, 2, 64))


def test_hidden_keys_weigh_exactly_zero():
    """Padding keys add nothing, not a tiny weight times their V: with V near the float32
    maximum at the hidden keys, any weight above 0 (2^-126 times 3e38 is 3.5) would show."""
    q, k, v, gen = random_inputs(2, 70, 100, 4, 2, 64, torch.float32, seed=11)
    key_valid = torch.rand(2, 100, generator=gen) > 0.3
    key_valid[:, :40] = False  # the whole first key tile but 24 keys: a tile with both kinds
    v[~key_valid] = 3e38
    out = torch.full_like(q, float("nan"))
    native.attention_cpu(q, k, v, kv_len=None, key_valid=key_valid, block_size=None, q_offset=0,
                         scale=64**-0.5, out=out)
    exact = reference.attention(q.double(), k.double(), v.double(), key_valid=key_valid)
    error = (out.double() - exact).abs()
    assert float(error.max()) < 1e-5, f"max error {float(error.max()):.3g}, mean {float(error.mean()):.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hidden_keys_are_never_read(dtype):
    """A cache's rows past kv_len, and keys key_valid hides, may hold anything: NaN there
    leaves the output bit-identical (0 * NaN in P V would poison it)."""
    q, k, v, gen = random_inputs(2, 37, 150, 4, 2, 64, dtype, seed=5)
    kv_len = torch.tensor([90, 150])
    key_valid = torch.rand(2, 150, generator=gen) > 0.2
    hidden = (torch.arange(150)[None] >= kv_len[:, None]) | ~key_valid
    dirty_k, dirty_v = k.clone(), v.clone()
    dirty_k[hidden], dirty_v[hidden] = float("nan"), float("nan")
    for block_size in (None, 16):
        args = dict(kv_len=kv_len, key_valid=key_valid, block_size=block_size)
        clean = ops.attention(q, k, v, **args)
        assert not torch.isnan(clean).any()
        assert torch.equal(ops.attention(q, dirty_k, dirty_v, **args), clean)


def test_nan_scores_make_their_rows_nan_as_in_the_reference():
    """NaN in a visible key, or in a query, makes exactly the rows that see it NaN (the
    reference's softmax does); every other row is unaffected."""
    q, k, v, _ = random_inputs(1, 96, 96, 2, 2, 64, torch.float32, seed=9)
    k[0, 70, 1] = float("nan")  # seen by head 1's queries of blocks 2 (64..95) under blocks of 32
    q[0, 5, 0] = float("nan")  # one query row of head 0
    for block_size in (None, 32):
        out = ops.attention(q, k, v, block_size=block_size)
        expected = reference.attention(q.double(), k.double(), v.double(), block_size=block_size)
        assert torch.equal(torch.isnan(out), torch.isnan(expected))
        assert torch.isnan(out).any()
        finite = ~torch.isnan(expected)
        torch.testing.assert_close(out[finite].double(), expected[finite], rtol=2e-5, atol=2e-6)
    # A NaN query that sees no key (its block's keys all hidden) gets zeros, as in the
    # reference, though its tile holds keys other queries see.
    key_valid = torch.ones(1, 96, dtype=torch.bool)
    key_valid[:, :32] = False
    out = ops.attention(q, k, v, block_size=32, key_valid=key_valid)
    expected = reference.attention(q.double(), k.double(), v.double(), block_size=32, key_valid=key_valid)
    assert torch.equal(torch.isnan(out), torch.isnan(expected))
    assert torch.equal(out[0, :32], torch.zeros_like(out[0, :32]))
