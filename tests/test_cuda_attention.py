"""The CUDA attention kernel against the float64 reference (run on a GPU, skipped elsewhere),
under the flash-attention tolerance rule of tests/test_attention_kernels.py: its error is
at most twice the error of the same computation in the input dtype, plus rounding."""

import math

import pytest
import torch

from unmask import native, ops, reference, validation
from tests.helpers import check_attention_against_reference, make_masks, random_inputs, requires_cuda_build
from tests.helpers import requires_gpu

pytestmark = [requires_gpu, requires_cuda_build]

DTYPES = [torch.bfloat16, torch.float16]
HEAD_DIMS = [64, 128]
# The CPU suite's mask kinds plus left padding with one query row that sees no key.
MASKS = ["none", "kv_len", "key_valid", "left_pad", "block_offset", "all"]


def cuda_inputs(batch, q_len, k_len, q_heads, kv_heads, head_dim, dtype, seed):
    q, k, v, gen = random_inputs(batch, q_len, k_len, q_heads, kv_heads, head_dim, dtype, seed)
    return q.cuda(), k.cuda(), v.cuda(), gen


def cuda_masks(kind, batch, k_len, gen):
    if kind == "left_pad":
        key_valid = torch.ones(batch, k_len, dtype=torch.bool)
        key_valid[0, : k_len // 3] = False  # a left-padded prompt
        key_valid[-1] = False  # sees no key: zeros
        masks = {"key_valid": key_valid}
    else:
        masks = make_masks(kind, batch, k_len, gen)
    return {name: value.cuda() if isinstance(value, torch.Tensor) else value for name, value in masks.items()}


def check(q, k, v, **masks):
    check_attention_against_reference(q, k, v, device_type="cuda", **masks)


def cuda_attention(q, k, v, out=None, **args):
    """The CUDA backend itself, no dispatch."""
    return native.kernels()[("attention", "cuda")](validation.attention_call(q, k, v, **args), out=out)


def workspace_bytes(sizes, block_size, q_offset):
    params = native._C.AttentionParams()
    for name, value in zip(("batch", "q_len", "k_len", "q_heads", "kv_heads", "head_dim"), sizes):
        setattr(params, name, value)
    params.block_size, params.q_offset = block_size, q_offset
    return native._C.attention_cuda_workspace_bytes(params)


def splits_expected(batch, q_len, k_len, q_heads, kv_heads):
    """Whether the launcher should split the keys here: fewer 128-row query tiles than SMs."""
    sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    blocks = math.ceil(q_len * (q_heads // kv_heads) / 128) * batch * kv_heads
    return blocks < sms and math.ceil(k_len / 64) >= 8


def test_dispatch_uses_the_cuda_kernel():
    q, k, v, _ = cuda_inputs(1, 8, 8, 2, 2, 64, torch.bfloat16, seed=0)
    assert ops.backend_for("attention", q, k, v) == "cuda"


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("q_len,k_len", [(1, 1025), (17, 99), (99, 17), (1023, 1025), (1025, 1)])
def test_masks_and_lengths(head_dim, dtype, mask, q_len, k_len):
    q, k, v, gen = cuda_inputs(2, q_len, k_len, 4, 2, head_dim, dtype, seed=q_len * 1000 + k_len)
    check(q, k, v, **cuda_masks(mask, 2, k_len, gen))


@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gqa_with_padding_and_blocks(group, head_dim, dtype):
    q, k, v, gen = cuda_inputs(2, 257, 1023, 8, 8 // group, head_dim, dtype, seed=group * head_dim)
    check(q, k, v, **cuda_masks("left_pad", 2, 1023, gen), block_size=64, q_offset=700)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("q_len,k_len", [(32, 4096), (77, 2000), (128, 2049), (128, 4096)])
def test_short_query_blocks_split_the_keys(masked, head_dim, dtype, q_len, k_len):
    """Cached decoding: the active block (the last q_len positions) against every cached
    key; block-causal with left padding, one row of a shorter cache and one empty."""
    batch, q_heads, kv_heads = 2, 32, 8
    q, k, v, _ = cuda_inputs(batch, q_len, k_len, q_heads, kv_heads, head_dim, dtype, seed=q_len + k_len)
    masks = {}
    if masked:
        key_valid = torch.ones(batch, k_len, dtype=torch.bool)
        key_valid[0, :100] = False
        masks = {"key_valid": key_valid.cuda(), "kv_len": torch.tensor([k_len - 7, 0]).cuda(),
                 "block_size": 32, "q_offset": k_len - q_len}
    if splits_expected(batch, q_len, k_len, q_heads, kv_heads):
        sizes = [batch, q_len, k_len, q_heads, kv_heads, head_dim]
        assert workspace_bytes(sizes, masks.get("block_size", 0), masks.get("q_offset", 0)) > 0
    check(q, k, v, **masks)


def test_stale_cache_past_kv_len_is_never_read():
    q, k, v, _ = cuda_inputs(2, 32, 2048, 8, 2, 128, torch.bfloat16, seed=11)
    kv_len = torch.tensor([1000, 2048], device="cuda")
    dirty_k, dirty_v = k.clone(), v.clone()
    dirty_k[0, 1000:] = float("nan")
    dirty_v[0, 1000:] = float("nan")
    args = dict(kv_len=kv_len, scale=128**-0.5)
    assert torch.equal(cuda_attention(q, dirty_k, dirty_v, **args), cuda_attention(q, k, v, **args))


def test_strided_and_misaligned_inputs():
    base = torch.randn(2, 40, 3, 6, 64).to(torch.bfloat16).cuda()  # q, k, v interleaved rows
    q, k, v = base[:, :, 0], base[:, :, 1], base[:, :, 2]
    check(q, k, v, block_size=8)
    flat = torch.randn(3 * 2 * 40 * 6 * 64 + 1).to(torch.float16).cuda()
    q, k, v = flat[1:].view(3, 2, 40, 6, 64).unbind(0)  # 2 bytes off 16-byte alignment: copied
    check(q, k, v, key_valid=torch.rand(2, 40, device="cuda") > 0.2)
    check(q.transpose(1, 2).contiguous().transpose(1, 2), k, v)  # head-major storage


def test_empty_batch_and_empty_keys():
    q, k, v, _ = cuda_inputs(0, 5, 5, 2, 2, 64, torch.bfloat16, seed=1)
    assert ops.attention(q, k, v).shape == (0, 5, 2, 64)
    q, k, v, _ = cuda_inputs(1, 5, 0, 2, 2, 128, torch.bfloat16, seed=1)
    assert torch.equal(ops.attention(q, k, v), torch.zeros(1, 5, 2, 128, dtype=torch.bfloat16, device="cuda"))


def test_float32_takes_the_reference():
    q, k, v, _ = cuda_inputs(1, 17, 33, 4, 2, 64, torch.float32, seed=2)
    assert ops.backend_for("attention", q, k, v, block_size=8, scale=0.1) == "reference"
    torch.testing.assert_close(ops.attention(q, k, v, block_size=8, scale=0.1),
                               reference.attention(q, k, v, block_size=8, scale=0.1))


def test_head_dim_96_takes_the_reference_and_the_kernel_refuses_it():
    q, k, v, _ = cuda_inputs(1, 8, 8, 2, 2, 96, torch.bfloat16, seed=3)
    assert ops.backend_for("attention", q, k, v) == "reference"
    assert "head_dim=96" in ops.fallback_reason("attention", q, k, v)
    with pytest.raises(NotImplementedError, match="head_dim = 96"):
        cuda_attention(q, k, v)


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_many_blocks_take_the_unsplit_path(head_dim):
    """More query tiles than SMs: no split, many key tiles skipped by padding and blocks."""
    batch, q_len, k_len, heads = 4, 1024, 1025, 8
    sizes = [batch, q_len, k_len, heads, heads, head_dim]
    assert workspace_bytes(sizes, 8, 3) == 0
    q, k, v, gen = cuda_inputs(batch, q_len, k_len, heads, heads, head_dim, torch.bfloat16, seed=head_dim)
    check(q, k, v, **cuda_masks("all", batch, k_len, gen))


def test_padded_output_view_is_written_inside_only():
    q, k, v, _ = cuda_inputs(2, 33, 70, 4, 2, 64, torch.float16, seed=5)
    buffer = torch.full((2, 33, 4, 72), float("nan"), dtype=torch.float16, device="cuda")
    out = buffer[..., :64]  # strides (33*4*72, 4*72, 72): multiples of 8, not contiguous
    args = dict(block_size=16, scale=0.125)
    cuda_attention(q, k, v, out=out, **args)
    assert torch.isnan(buffer[..., 64:]).all(), "wrote outside the output view"
    # The same kernel on the same inputs: the output layout must not change a single bit.
    assert torch.equal(out, cuda_attention(q, k, v, **args))


def test_more_than_65535_batch_heads():
    """(batch, kv head) pairs live on gridDim.x, whose limit is 2^31 - 1."""
    q, k, v, _ = cuda_inputs(2100, 1, 9, 32, 32, 64, torch.bfloat16, seed=6)
    check(q, k, v)
