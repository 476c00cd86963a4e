"""The native attention kernel against the float64 reference, under flash-attention's
tolerance rule (tests.helpers.check_attention_against_reference), under every
instruction-set build this CPU runs."""

import os
from pathlib import Path

import pytest
import torch

from unmask import dispatch, native, ops, reference, validation
from tests.helpers import MASKS, check_attention_against_reference as check_against_reference, make_masks
from tests.helpers import dirty_hidden_keys, random_inputs, requires_extension

pytestmark = [requires_extension, pytest.mark.usefixtures("cpu_isa")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("q_len,k_len", [(1, 1), (17, 99), (99, 17), (130, 1025)])
def test_masks_and_lengths(dtype, mask, q_len, k_len):
    q, k, v, gen = random_inputs(2, q_len, k_len, 4, 2, 64, dtype, seed=q_len * 1000 + k_len)
    check_against_reference(q, k, v, **make_masks(mask, 2, k_len, gen))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("head_dim", [160, 128, 96, 64, 48, 32, 24, 16, 1])
def test_gqa_and_head_dims(dtype, group, head_dim):
    """Head dims the AMX kernel pads (to 32) and splits (P V in groups of 64 columns)."""
    q, k, v, gen = random_inputs(1, 1023, 257, 8, 8 // group, head_dim, dtype, seed=group * head_dim)
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_empty_batch_and_empty_keys(dtype):
    q, k, v, _ = random_inputs(0, 5, 5, 2, 2, 64, dtype, seed=1)
    assert ops.attention(q, k, v).shape == (0, 5, 2, 64)
    q, k, v, _ = random_inputs(1, 5, 0, 2, 2, 64, dtype, seed=1)
    out = torch.full_like(q, float("nan"))
    native.kernels()[("attention", "cpu")](validation.attention_call(q, k, v), out=out)
    assert torch.equal(out, torch.zeros(1, 5, 2, 64, dtype=dtype))


@pytest.mark.parametrize("q_len", [70, 28])  # 28: a short block, its queries along the lanes
def test_hidden_keys_weigh_exactly_zero(q_len):
    """Padding keys add nothing, not a tiny weight times their V: with V near the float32
    maximum at the hidden keys, any weight above 0 (2^-126 times 3e38 is 3.5) would show."""
    q, k, v, gen = random_inputs(2, q_len, 100, 4, 2, 64, torch.float32, seed=11)
    key_valid = torch.rand(2, 100, generator=gen) > 0.3
    key_valid[:, :40] = False  # the whole first key tile but 24 keys: a tile with both kinds
    v[~key_valid] = 3e38
    out = torch.full_like(q, float("nan"))
    native.kernels()[("attention", "cpu")](validation.attention_call(q, k, v, key_valid=key_valid), out=out)
    exact = reference.attention(q.double(), k.double(), v.double(), key_valid=key_valid)
    error = (out.double() - exact).abs()
    assert float(error.max()) < 1e-5, f"max error {float(error.max()):.3g}, mean {float(error.mean()):.3g}"


@pytest.mark.parametrize("q_len", [37, 28])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hidden_keys_are_never_read(dtype, q_len):
    """A cache's rows past kv_len, and keys key_valid hides, may hold anything: NaN there
    leaves the output bit-identical (0 * NaN in P V would poison it)."""
    q, k, v, dirty_k, dirty_v, kv_len, key_valid = dirty_hidden_keys(dtype, 64, q_len=q_len)
    for block_size in (None, 16):
        args = dict(kv_len=kv_len, key_valid=key_valid, block_size=block_size)
        clean = ops.attention(q, k, v, **args)
        assert not torch.isnan(clean).any()
        assert torch.equal(ops.attention(q, dirty_k, dirty_v, **args), clean)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nan_scores_make_their_rows_nan_as_in_the_reference(dtype):
    """NaN in a visible key, or in a query, makes exactly the rows that see it NaN (the
    reference's softmax does); every other row is unaffected."""
    q, k, v, _ = random_inputs(1, 96, 96, 2, 2, 64, dtype, seed=9)
    # float32: the kernel's rounding; bfloat16: twice the input type's epsilon.
    tolerance = dict(rtol=2e-5, atol=2e-6) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1.6e-2)
    k[0, 70, 1] = float("nan")  # seen by head 1's queries of blocks 2 (64..95) under blocks of 32
    q[0, 5, 0] = float("nan")  # one query row of head 0
    for block_size in (None, 32):
        out = ops.attention(q, k, v, block_size=block_size)
        expected = reference.attention(q.double(), k.double(), v.double(), block_size=block_size)
        assert torch.equal(torch.isnan(out), torch.isnan(expected))
        assert torch.isnan(out).any()
        finite = ~torch.isnan(expected)
        torch.testing.assert_close(out[finite].double(), expected[finite], **tolerance)
    # A NaN query that sees no key (its block's keys all hidden) gets zeros, as in the
    # reference, though its tile holds keys other queries see.
    key_valid = torch.ones(1, 96, dtype=torch.bool)
    key_valid[:, :32] = False
    out = ops.attention(q, k, v, block_size=32, key_valid=key_valid)
    expected = reference.attention(q.double(), k.double(), v.double(), block_size=32, key_valid=key_valid)
    assert torch.equal(torch.isnan(out), torch.isnan(expected))
    assert torch.equal(out[0, :32], torch.zeros_like(out[0, :32]))


# One query (q_len 1) runs its own path (csrc/cpu/attention_one_query.cpp): keys read in
# place, key by key across a task's heads, nothing packed.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("k_len", [1, 63, 64, 65, 300])
def test_one_query(dtype, mask, k_len):
    q, k, v, gen = random_inputs(3, 1, k_len, 4, 2, 64, dtype, seed=k_len + 7)
    check_against_reference(q, k, v, **make_masks(mask, 3, k_len, gen))


@pytest.mark.parametrize("batch,q_heads,kv_heads", [(1, 16, 16), (1, 32, 4), (3, 12, 4), (5, 3, 1)])
@pytest.mark.parametrize("head_dim", [128, 33, 1])
def test_one_query_heads_split_across_tasks(batch, q_heads, kv_heads, head_dim):
    """A task takes a slice of a batch row's heads (the heads of one row split so every
    thread has work), and with 1025 keys and more the call runs on several threads: every
    head of every row must come out, with block-causal limits inside a key tile."""
    q, k, v, gen = random_inputs(batch, 1, 1025, q_heads, kv_heads, head_dim, torch.float32, seed=q_heads * head_dim)
    check_against_reference(q, k, v, key_valid=torch.rand(batch, 1025, generator=gen) > 0.2, block_size=48,
                            q_offset=700)
    check_against_reference(q, k, v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_query_never_reads_hidden_keys(dtype):
    q, k, v, dirty_k, dirty_v, kv_len, key_valid = dirty_hidden_keys(dtype, 64, q_len=1)
    for masks in ({"kv_len": kv_len, "key_valid": key_valid}, {"key_valid": key_valid, "block_size": 16,
                                                                "q_offset": 70}):
        clean = ops.attention(q, k, v, **masks)
        assert not torch.isnan(clean).any()
        assert torch.equal(ops.attention(q, dirty_k, dirty_v, **masks), clean)
    # keys past the query's block (block-causal) are not read either
    late_k, late_v = k.clone(), v.clone()
    late_k[:, 80:], late_v[:, 80:] = float("nan"), float("nan")
    causal = {"block_size": 16, "q_offset": 70}  # the query at 70 sees keys 0..79
    assert torch.equal(ops.attention(q, late_k, late_v, **causal), ops.attention(q, k, v, **causal))


def test_one_query_nan_rules_and_no_visible_key():
    """NaN in a visible key or in the query makes the row NaN, as in the reference; a
    visible key with infinite V reaches the row; a query that sees no key gets zeros."""
    q, k, v, _ = random_inputs(2, 1, 130, 2, 2, 64, torch.float32, seed=3)
    k[0, 100, 1] = float("nan")
    q[1, 0, 0] = float("nan")
    for masks in ({}, {"block_size": 32, "q_offset": 70}):  # the query at 70 does not see key 100
        out = ops.attention(q, k, v, **masks)
        expected = reference.attention(q.double(), k.double(), v.double(), **masks)
        assert torch.equal(torch.isnan(out), torch.isnan(expected)), masks
        finite = ~torch.isnan(expected)
        torch.testing.assert_close(out[finite].double(), expected[finite], rtol=2e-5, atol=2e-6)
    v_inf = v.clone()
    v_inf[0, 5, 0, 3] = float("inf")
    out = ops.attention(q, k, v_inf)
    assert out[0, 0, 0, 3] == float("inf") and not torch.isnan(out[0, 0, 0]).any()
    out = ops.attention(q, k, v, kv_len=torch.tensor([0, 130]))
    assert torch.equal(out[0], torch.zeros_like(out[0]))


# Blocks of 25-32 queries (a cached decoding step's block) run with the queries along the
# lanes of two zmm on AVX-512 (csrc/cpu/attention_lanes.cpp); 24 is the tiled kernel's.
SHORT_BLOCKS = [24, 25, 31, 32]


# bfloat16: the lanes under the avx512 build, AMX tiles under the amx build
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("q_len", SHORT_BLOCKS)
def test_short_query_blocks(dtype, mask, q_len):
    q, k, v, gen = random_inputs(2, q_len, 200, 4, 2, 64, dtype, seed=q_len)
    check_against_reference(q, k, v, **make_masks(mask, 2, 200, gen))


@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("head_dim", [160, 128, 33, 16, 1])
def test_short_query_blocks_head_dims_and_causal_offsets(group, head_dim):
    """Head dims off the register blocks (33, 1), and a block-causal cached block whose
    queries straddle a block boundary (positions 100..127 under blocks of 16)."""
    q, k, v, gen = random_inputs(1, 28, 130, 8, 8 // group, head_dim, torch.float32, seed=head_dim)
    check_against_reference(q, k, v, key_valid=torch.rand(1, 130, generator=gen) > 0.3, block_size=16,
                            q_offset=100)


def test_nan_scores_in_a_short_block_make_their_rows_nan():
    """The NaN rules lane by lane: NaN in a visible key makes the queries that see it NaN
    and no other (under blocks of 32 from q_offset 50, rows 14..27 of head 1 see key 70),
    a NaN query makes its own row NaN, and a query that sees no key gets zeros."""
    q, k, v, _ = random_inputs(1, 28, 96, 2, 2, 64, torch.float32, seed=9)
    k[0, 70, 1] = float("nan")
    q[0, 5, 0] = float("nan")
    for masks in ({}, {"block_size": 32}, {"block_size": 32, "q_offset": 50}):
        out = ops.attention(q, k, v, **masks)
        expected = reference.attention(q.double(), k.double(), v.double(), **masks)
        assert torch.equal(torch.isnan(out), torch.isnan(expected)), masks
        finite = ~torch.isnan(expected)
        torch.testing.assert_close(out[finite].double(), expected[finite], rtol=2e-5, atol=2e-6)
    nan_rows = torch.isnan(ops.attention(q, k, v, block_size=32, q_offset=50)).any(dim=-1)[0]
    assert nan_rows[:, 1].tolist() == [False] * 14 + [True] * 14 and nan_rows[5, 0]
    key_valid = torch.ones(1, 96, dtype=torch.bool)
    key_valid[:, :32] = False  # block 0's keys: its queries (positions 0..27) see nothing
    out = ops.attention(q, k, v, block_size=32, key_valid=key_valid)
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("batch,q_heads,kv_heads", [(1, 16, 16), (4, 32, 16), (3, 12, 4)])
def test_short_query_blocks_with_many_heads(batch, q_heads, kv_heads):
    """A task takes a group of a batch row's heads (several where the heads outnumber the
    tasks the threads need) and copies each key's rows of the group at once."""
    q, k, v, gen = random_inputs(batch, 32, 150, q_heads, kv_heads, 32, torch.float32, seed=q_heads)
    check_against_reference(q, k, v, key_valid=torch.rand(batch, 150, generator=gen) > 0.2, block_size=16,
                            q_offset=60)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("q_len", [32, 27, 13, 8])  # the lanes kernel (AVX-512 builds, float32); the head groups
@pytest.mark.parametrize("group,head_dim", [(1, 64), (4, 64), (2, 16), (1, 33), (4, 128)])
@pytest.mark.parametrize("masks", [{}, {"block_size": 16, "q_offset": 130}])
def test_short_blocks_read_visible_tiles_where_they_lie(dtype, q_len, group, head_dim, masks):
    """A short block's key tiles with no hidden key are read in place (float32 by both
    kernels, bfloat16 by the head groups) with the inputs' own strides: here K's keys
    interleaved with a third tensor's (a key's rows 3 x 8 rows apart) and V laid out
    apart from K (a swapped stride reads the wrong rows), at head dims on and off the
    register blocks; a last tile cut short by k_len is copied."""
    gen = torch.Generator().manual_seed(q_len * group * head_dim)
    base = torch.randn(2, 300, 3, 8, head_dim, generator=gen).to(dtype)
    q = torch.randn(2, q_len, 8, head_dim, generator=gen).to(dtype)
    k = base[:, :, 1, : 8 // group]
    v = torch.randn(2, 300, 8 // group, head_dim, generator=gen).to(dtype)
    assert k.stride(1) == 3 * 8 * head_dim and v.stride(1) == 8 // group * head_dim
    check_against_reference(q, k, v, **masks)


@pytest.mark.parametrize("q_len", [8, 24, 28, 32, 70])
def test_a_row_that_sees_no_key_after_a_call_that_left_nan(q_len):
    """Each thread keeps its output accumulators across calls and tasks, and a short
    block's first key tile writes them rather than adding to them: a batch row whose every
    key tile is hidden (kv_len 0) gets zeros, beside a row whose outputs are all NaN (a
    NaN query) and after a call that left NaN in every accumulator."""
    q, k, v, _ = random_inputs(2, q_len, 150, 4, 4, 64, torch.float32, seed=q_len)
    assert torch.isnan(ops.attention(torch.full_like(q, float("nan")), k, v)).all()
    q[0] = float("nan")
    out = ops.attention(q, k, v, kv_len=torch.tensor([150, 0]))
    assert torch.isnan(out[0]).all() and torch.equal(out[1], torch.zeros_like(out[1]))
    check_against_reference(q[1:], k[1:], v[1:])


@pytest.mark.parametrize("q_len", [32, 70])  # the lanes kernel, the tiled one
def test_a_maximum_that_moves_late_rescales_what_came_before(q_len):
    """Keys of the last tiles score far above the first tiles' maxima (by more than the
    lazy rescaling's slack of 2^8): what the earlier tiles added must be scaled down."""
    q, k, v, _ = random_inputs(1, q_len, 300, 2, 2, 64, torch.float32, seed=4)
    k[:, 200:] *= 40
    check_against_reference(q, k, v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # bfloat16: the AMX kernel on the amx build
@pytest.mark.parametrize("q_len", [32, 28, 70, 13])  # float32: the lanes kernel (AVX-512 builds), the tiled one
@pytest.mark.parametrize("block_size,q_offset", [(32, 0), (8, 20), (1, 5)])
def test_keys_the_block_causal_mask_hides_are_never_read(q_len, block_size, q_offset, dtype):
    """NaN in K and V at the keys past the first query's block leaves every query that does
    not reach them bit-identical, including queries of the same register block or vector
    as a later query that does (it adds 0 times their V, and 0 times NaN is NaN)."""
    q, k, v, _ = random_inputs(1, q_len, 100, 2, 2, 64, dtype, seed=q_len + block_size)
    masks = dict(block_size=block_size, q_offset=q_offset)
    kernel = native.kernels()[("attention", "cpu")]  # the native kernel itself, whatever the table would pick
    clean = kernel(validation.attention_call(q, k, v, **masks))
    hidden_from_first = (q_offset // block_size + 1) * block_size  # keys from here on
    dirty_k, dirty_v = k.clone(), v.clone()
    dirty_k[:, hidden_from_first:] = float("nan")
    dirty_v[:, hidden_from_first:] = float("nan")
    out = kernel(validation.attention_call(q, dirty_k, dirty_v, **masks))
    positions = q_offset + torch.arange(q_len)
    reaches = (positions // block_size + 1) * block_size > hidden_from_first
    assert torch.equal(out[:, ~reaches], clean[:, ~reaches])
    assert torch.isnan(out[:, reaches]).all(dim=-1).all()


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads the resident set from /proc")
def test_a_large_calls_pack_is_given_back_by_a_small_one():
    """The CPU kernel keeps its K/V pack across calls (fit_pack); one long prefill's pack
    (here 2 x 96 MiB) used to stay held for the life of the process. A later call that
    needs under a quarter of it gives it back."""
    def resident_mib():
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    with dispatch.forced("native"):
        q, k = torch.randn(1, 200, 8, 128), torch.randn(1, 24576, 8, 128)  # 200 queries: the shared pack
        before = resident_mib()
        ops.attention(q, k, k)
        held = resident_mib() - before
        del q, k
        after_big = resident_mib()
        small = torch.randn(1, 200, 8, 128)
        torch.testing.assert_close(ops.attention(small, small, small), reference.attention(small, small, small),
                                   rtol=1e-4, atol=1e-5)
        given_back = after_big - resident_mib()
    assert held > 150 and given_back > held / 2, (held, given_back)  # other allocations move a few MiB
