"""The CUDA attention kernel against the float64 reference, on a GPU and under the SIMT
interpreter (the `cuda_runner` fixture), under the flash-attention tolerance rule of
tests/helpers.py: its error is at most twice the error of the same computation in the
input dtype, plus rounding. The interpreter runs reduced shapes; the largest are GPU-only."""

import math

import pytest
import torch

from unmask import native, ops, reference, sdpa, validation
from tests.helpers import check_attention_against_reference, make_masks, random_inputs, requires_cuda_build
from tests.helpers import requires_gpu

DTYPES = [torch.bfloat16, torch.float16]
HEAD_DIMS = [64, 128]
# The CPU suite's mask kinds plus left padding with one query row that sees no key.
MASKS = ["none", "kv_len", "key_valid", "left_pad", "block_offset", "all"]
# (128-row query tile, 64-key tile) pairs a case may compute under the interpreter: about
# 600 a second on one core at D = 64 (bench/simt.py), so a case stays under half a second.
INTERPRETER_TILE_PAIRS = 300


def inputs(runner, batch, q_len, k_len, q_heads, kv_heads, head_dim, dtype, seed):
    q, k, v, gen = random_inputs(batch, q_len, k_len, q_heads, kv_heads, head_dim, dtype, seed)
    return q.to(runner.device), k.to(runner.device), v.to(runner.device), gen


def masks_for(runner, kind, batch, k_len, gen):
    if kind == "left_pad":
        key_valid = torch.ones(batch, k_len, dtype=torch.bool)
        key_valid[0, : k_len // 3] = False  # a left-padded prompt
        key_valid[-1] = False  # sees no key: zeros
        masks = {"key_valid": key_valid}
    else:
        masks = make_masks(kind, batch, k_len, gen)
    return {name: value.to(runner.device) if isinstance(value, torch.Tensor) else value for name, value in masks.items()}


def check(runner, q, k, v, **masks):
    check_attention_against_reference(q, k, v, backend=runner.backend("attention"), **masks)


def run_attention(runner, q, k, v, out=None, **args):
    """The CUDA backend itself, no dispatch."""
    return runner.backend("attention")(validation.attention_call(q, k, v, **args), out=out)


def workspace_bytes(runner, sizes, block_size, q_offset):
    params = native._C.AttentionParams()
    for name, value in zip(("batch", "q_len", "k_len", "q_heads", "kv_heads", "head_dim"), sizes):
        setattr(params, name, value)
    params.block_size, params.q_offset = block_size, q_offset
    if runner.interpreted:
        return native._C.attention_cuda_interpret_workspace_bytes(params)
    return native._C.attention_cuda_workspace_bytes(params)


def tile_pairs(batch, q_len, k_len, q_heads, kv_heads):
    return math.ceil(q_len * (q_heads // kv_heads) / 128) * batch * kv_heads * math.ceil(k_len / 64)


def skip_if_too_big(runner, batch, q_len, k_len, q_heads, kv_heads):
    if runner.interpreted and tile_pairs(batch, q_len, k_len, q_heads, kv_heads) > INTERPRETER_TILE_PAIRS:
        pytest.skip("a GPU-only shape: too many tiles for the interpreter")


def splits_expected(runner, batch, q_len, k_len, q_heads, kv_heads):
    """Whether the launcher should split the keys here: fewer 128-row query tiles than SMs."""
    blocks = math.ceil(q_len * (q_heads // kv_heads) / 128) * batch * kv_heads
    return blocks < runner.sm_count() and math.ceil(k_len / 64) >= 8


@requires_gpu
@requires_cuda_build
def test_dispatch_uses_the_cuda_kernel():
    q, k, v, _ = random_inputs(1, 8, 8, 2, 2, 64, torch.bfloat16, seed=0)
    assert ops.backend_for("attention", q.cuda(), k.cuda(), v.cuda()) == "cuda"


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("q_len,k_len", [(1, 1025), (17, 99), (99, 17), (130, 300), (1023, 1025), (1025, 1)])
def test_masks_and_lengths(cuda_runner, head_dim, dtype, mask, q_len, k_len):
    skip_if_too_big(cuda_runner, 2, q_len, k_len, 4, 2)
    q, k, v, gen = inputs(cuda_runner, 2, q_len, k_len, 4, 2, head_dim, dtype, seed=q_len * 1000 + k_len)
    check(cuda_runner, q, k, v, **masks_for(cuda_runner, mask, 2, k_len, gen))


@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gqa_with_padding_and_blocks(cuda_runner, group, head_dim, dtype):
    q_len, k_len = (257, 1023) if not cuda_runner.interpreted else (40, 300)
    q, k, v, gen = inputs(cuda_runner, 2, q_len, k_len, 8, 8 // group, head_dim, dtype, seed=group * head_dim)
    check(cuda_runner, q, k, v, **masks_for(cuda_runner, "left_pad", 2, k_len, gen), block_size=64,
          q_offset=k_len - q_len)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("q_len,k_len", [(32, 4096), (77, 2000), (128, 2049), (128, 4096), (32, 700)])
def test_short_query_blocks_split_the_keys(cuda_runner, masked, head_dim, dtype, q_len, k_len):
    """Cached decoding: the active block (the last q_len positions) against every cached
    key; block-causal with left padding, one row of a shorter cache and one empty."""
    batch, q_heads, kv_heads = 2, 32, 8
    if cuda_runner.interpreted:
        q_heads, kv_heads = 8, 2  # the same tiles per kv head, fewer heads
    skip_if_too_big(cuda_runner, batch, q_len, k_len, q_heads, kv_heads)
    q, k, v, _ = inputs(cuda_runner, batch, q_len, k_len, q_heads, kv_heads, head_dim, dtype, seed=q_len + k_len)
    masks = {}
    if masked:
        key_valid = torch.ones(batch, k_len, dtype=torch.bool)
        key_valid[0, :100] = False
        masks = {"key_valid": key_valid.to(cuda_runner.device),
                 "kv_len": torch.tensor([k_len - 7, 0]).to(cuda_runner.device),
                 "block_size": 32, "q_offset": k_len - q_len}
    if splits_expected(cuda_runner, batch, q_len, k_len, q_heads, kv_heads):
        sizes = [batch, q_len, k_len, q_heads, kv_heads, head_dim]
        assert workspace_bytes(cuda_runner, sizes, masks.get("block_size", 0), masks.get("q_offset", 0)) > 0
    check(cuda_runner, q, k, v, **masks)


def test_stale_cache_past_kv_len_is_never_read(cuda_runner):
    k_len = 2048 if not cuda_runner.interpreted else 400
    q, k, v, _ = inputs(cuda_runner, 2, 32, k_len, 8, 2, 128, torch.bfloat16, seed=11)
    kv_len = torch.tensor([k_len // 2, k_len], device=cuda_runner.device)
    dirty_k, dirty_v = k.clone(), v.clone()
    dirty_k[0, k_len // 2:] = float("nan")
    dirty_v[0, k_len // 2:] = float("nan")
    args = dict(kv_len=kv_len, scale=128**-0.5)
    clean = run_attention(cuda_runner, q, k, v, **args)
    assert torch.equal(run_attention(cuda_runner, q, dirty_k, dirty_v, **args), clean)


def test_keys_key_valid_hides_are_never_read(cuda_runner):
    """A key key_valid hides weighs 0, and 0 times NaN is NaN: its K and V must not be
    read at all (they are zero-filled as they load)."""
    k_len = 2048 if not cuda_runner.interpreted else 300
    q, k, v, _ = inputs(cuda_runner, 2, 32, k_len, 8, 2, 64, torch.bfloat16, seed=12)
    key_valid = torch.rand(2, k_len, generator=torch.Generator().manual_seed(3)) > 0.3
    key_valid = key_valid.to(cuda_runner.device)
    dirty_k, dirty_v = k.clone(), v.clone()
    dirty_k[~key_valid], dirty_v[~key_valid] = float("nan"), float("nan")
    args = dict(key_valid=key_valid, scale=64**-0.5)
    clean = run_attention(cuda_runner, q, k, v, **args)
    assert not torch.isnan(clean).any()
    assert torch.equal(run_attention(cuda_runner, q, dirty_k, dirty_v, **args), clean)


def test_keys_past_the_last_querys_block_are_never_read(cuda_runner):
    """Block-causal: keys past the block of the query tile's last query are hidden from
    every query of the tile, and never read."""
    q, k, v, _ = inputs(cuda_runner, 1, 40, 200, 4, 2, 64, torch.float16, seed=13)
    args = dict(block_size=16, q_offset=30, scale=64**-0.5)
    last_block_end = (30 + 40 - 1) // 16 * 16 + 16  # 80
    dirty_k, dirty_v = k.clone(), v.clone()
    dirty_k[:, last_block_end:], dirty_v[:, last_block_end:] = float("nan"), float("nan")
    clean = run_attention(cuda_runner, q, k, v, **args)
    assert not torch.isnan(clean).any()
    assert torch.equal(run_attention(cuda_runner, q, dirty_k, dirty_v, **args), clean)


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("block_size,q_offset", [(16, 32), (32, 0), (48, 16), (8, 0), (24, 5), (3, 1)])
def test_keys_only_later_queries_of_a_tile_see_never_reach_earlier_ones(cuda_runner, head_dim, group, block_size,
                                                                        q_offset):
    """Block-causal: a key in a later query's block, inside the same 128-row tile, reaches
    no earlier query even when its K and V are NaN (the earlier queries' outputs are those
    of clean inputs), and reaches the queries that see it as the reference says (NaN). Aligned blocks (multiples of 16) skip the slices; others take the
    row-by-row path for the slices whose V is not finite."""
    q_len, k_len = 96 // group * 2, 160
    q, k, v, _ = inputs(cuda_runner, 1, q_len, k_len, 2 * group, 2, head_dim, torch.float16, seed=17)
    args = dict(block_size=block_size, q_offset=q_offset, scale=head_dim**-0.5)
    first_block_end = (q_offset // block_size + 1) * block_size
    dirty_k, dirty_v = k.clone(), v.clone()
    dirty_k[:, first_block_end:first_block_end + 16] = float("nan")  # keys of the next query blocks
    dirty_v[:, first_block_end:first_block_end + 16] = float("nan")
    clean = run_attention(cuda_runner, q, k, v, **args)
    dirty = run_attention(cuda_runner, q, dirty_k, dirty_v, **args)
    sees = (torch.arange(q_len, device=q.device) + q_offset) // block_size * block_size + block_size > first_block_end
    assert 0 < int(sees.sum()) < q_len
    # The row-by-row path sums a slice's 16 products in its own order, the mma in the
    # tensor core's: at most one float16 rounding of the output apart (2^-11 relative).
    torch.testing.assert_close(dirty[:, ~sees], clean[:, ~sees], rtol=1e-3, atol=1e-3)
    assert not torch.isnan(clean).any()
    assert torch.isnan(dirty[:, sees]).all()
    assert torch.isnan(reference.attention(q.float(), dirty_k.float(), dirty_v.float(), **args)[:, sees]).all()


def test_strided_and_misaligned_inputs(cuda_runner):
    base = torch.randn(2, 40, 3, 6, 64).to(torch.bfloat16).to(cuda_runner.device)  # q, k, v interleaved rows
    q, k, v = base[:, :, 0], base[:, :, 1], base[:, :, 2]
    check(cuda_runner, q, k, v, block_size=8)
    flat = torch.randn(3 * 2 * 40 * 6 * 64 + 1).to(torch.float16).to(cuda_runner.device)
    q, k, v = flat[1:].view(3, 2, 40, 6, 64).unbind(0)  # 2 bytes off 16-byte alignment: copied
    check(cuda_runner, q, k, v, key_valid=torch.rand(2, 40, device=cuda_runner.device) > 0.2)
    check(cuda_runner, q.transpose(1, 2).contiguous().transpose(1, 2), k, v)  # head-major storage


def test_empty_batch_and_empty_keys(cuda_runner):
    q, k, v, _ = inputs(cuda_runner, 0, 5, 5, 2, 2, 64, torch.bfloat16, seed=1)
    assert run_attention(cuda_runner, q, k, v).shape == (0, 5, 2, 64)
    q, k, v, _ = inputs(cuda_runner, 1, 5, 0, 2, 2, 128, torch.bfloat16, seed=1)
    out = torch.full_like(q, float("nan"))
    run_attention(cuda_runner, q, k, v, out=out)
    assert torch.equal(out, torch.zeros_like(q))


@requires_gpu
@requires_cuda_build
def test_float32_takes_the_reference():
    q, k, v, _ = random_inputs(1, 17, 33, 4, 2, 64, torch.float32, seed=2)
    q, k, v = q.cuda(), k.cuda(), v.cuda()
    assert ops.backend_for("attention", q, k, v, block_size=8, scale=0.1) == "reference"
    torch.testing.assert_close(ops.attention(q, k, v, block_size=8, scale=0.1),
                               reference.attention(q, k, v, block_size=8, scale=0.1))


@requires_gpu
@requires_cuda_build
def test_dispatch_falls_back_for_head_dim_96_and_handles_an_empty_batch():
    q, k, v, _ = random_inputs(1, 8, 8, 2, 2, 96, torch.bfloat16, seed=3)
    q, k, v = q.cuda(), k.cuda(), v.cuda()
    assert ops.backend_for("attention", q, k, v) == "torch-sdpa"
    assert "head_dim=96" in ops.fallback_reason("attention", q, k, v)
    torch.testing.assert_close(ops.attention(q, k, v), reference.attention(q, k, v))
    assert ops.backend_for("attention", q, k, v, block_size=4) == "reference"  # SDPA would spread hidden NaN
    check_attention_against_reference(q, k, v, backend=sdpa.SDPA, key_valid=torch.rand(1, 8, device="cuda") > 0.3)
    q, k, v, _ = random_inputs(0, 5, 5, 2, 2, 64, torch.bfloat16, seed=1)
    assert ops.attention(q.cuda(), k.cuda(), v.cuda()).shape == (0, 5, 2, 64)


def test_head_dim_96_is_refused_by_the_kernel(cuda_runner):
    q, k, v, _ = inputs(cuda_runner, 1, 8, 8, 2, 2, 96, torch.bfloat16, seed=3)
    assert "head_dim=96" in cuda_runner.backend("attention").supports(validation.attention_call(q, k, v))
    with pytest.raises(NotImplementedError, match="head_dim = 96"):
        run_attention(cuda_runner, q, k, v)


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_many_blocks_take_the_unsplit_path(cuda_runner, simt_sm_count, head_dim):
    """More query tiles than SMs: no split, many key tiles skipped by padding and blocks.
    (The interpreter is told of 2 SMs, so a small case has more tiles than SMs.)"""
    batch, q_len, k_len, heads = (4, 1024, 1025, 8) if not cuda_runner.interpreted else (2, 64, 300, 4)
    if cuda_runner.interpreted:
        simt_sm_count(2)
    sizes = [batch, q_len, k_len, heads, heads, head_dim]
    assert workspace_bytes(cuda_runner, sizes, 8, 3) == 0
    q, k, v, gen = inputs(cuda_runner, batch, q_len, k_len, heads, heads, head_dim, torch.bfloat16, seed=head_dim)
    check(cuda_runner, q, k, v, **masks_for(cuda_runner, "all", batch, k_len, gen))


def test_padded_output_view_is_written_inside_only(cuda_runner):
    q, k, v, _ = inputs(cuda_runner, 2, 33, 70, 4, 2, 64, torch.float16, seed=5)
    buffer = torch.full((2, 33, 4, 72), float("nan"), dtype=torch.float16, device=cuda_runner.device)
    out = buffer[..., :64]  # strides (33*4*72, 4*72, 72): multiples of 8, not contiguous
    args = dict(block_size=16, scale=0.125)
    run_attention(cuda_runner, q, k, v, out=out, **args)
    assert torch.isnan(buffer[..., 64:]).all(), "wrote outside the output view"
    # The same kernel on the same inputs: the output layout must not change a single bit.
    assert torch.equal(out, run_attention(cuda_runner, q, k, v, **args))


def test_more_than_65535_batch_heads(cuda_runner):
    """(batch, kv head) pairs live on gridDim.x, whose limit is 2^31 - 1."""
    if cuda_runner.interpreted:
        pytest.skip("a GPU-only shape: 67200 blocks")
    q, k, v, _ = inputs(cuda_runner, 2100, 1, 9, 32, 32, 64, torch.bfloat16, seed=6)
    check(cuda_runner, q, k, v)
