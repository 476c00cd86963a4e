"""Attention through torch SDPA (unmask.sdpa) under unmask's contract, against the float64
reference with flash-attention's tolerance rule: every mask, GQA, head dims, dtypes;
queries that see nothing get zeros; hidden keys are never read; the routing rule."""

import contextlib

import pytest
import torch

from unmask import native, ops, reference, sdpa, validation
from tests.helpers import MASKS, check_attention_against_reference, dirty_hidden_keys, make_masks, random_inputs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("q_len,k_len", [(1, 1), (17, 99), (99, 17), (130, 1025)])
def test_masks_and_lengths(dtype, mask, q_len, k_len):
    q, k, v, gen = random_inputs(2, q_len, k_len, 4, 2, 32, dtype, seed=q_len * 1000 + k_len)
    check_attention_against_reference(q, k, v, backend=sdpa.SDPA, **make_masks(mask, 2, k_len, gen))


@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("head_dim", [16, 64, 1025])
def test_gqa_and_head_dims(group, head_dim):
    q, k, v, gen = random_inputs(1, 65, 257, 8, 8 // group, head_dim, torch.float32, seed=group * head_dim)
    check_attention_against_reference(q, k, v, backend=sdpa.SDPA, block_size=64,
                                      key_valid=torch.rand(1, 257, generator=gen) > 0.5)


def test_queries_that_see_nothing_get_zeros():
    q, k, v, _ = random_inputs(2, 9, 70, 2, 2, 16, torch.float32, seed=3)
    for masks in (dict(kv_len=torch.tensor([0, 70])), dict(kv_len=torch.tensor([0, 70]), block_size=8)):
        out = sdpa.launch(validation.attention_call(q, k, v, **masks))
        assert torch.equal(out[0], torch.zeros_like(out[0])) and not torch.isnan(out).any()
    key_valid = torch.ones(2, 70, dtype=torch.bool)
    key_valid[:, :16] = False  # the first two blocks of 8 see no key
    out = sdpa.launch(validation.attention_call(q, k, v, key_valid=key_valid, block_size=8, q_offset=0))
    assert torch.equal(out[:, :2], torch.zeros_like(out[:, :2])) and not torch.isnan(out).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hidden_keys_are_never_read(dtype):
    q, k, v, dirty_k, dirty_v, kv_len, key_valid = dirty_hidden_keys(dtype, 32)
    for block_size in (None, 16):
        args = dict(kv_len=kv_len, key_valid=key_valid, block_size=block_size)
        assert sdpa.SDPA.supports(validation.attention_call(q, dirty_k, dirty_v, **args)) is None
        clean = sdpa.launch(validation.attention_call(q, k, v, **args))
        assert torch.equal(sdpa.launch(validation.attention_call(q, dirty_k, dirty_v, **args)), clean)


def test_out_is_written_whole():
    q, k, v, _ = random_inputs(1, 7, 9, 2, 1, 16, torch.float32, seed=2)
    out = torch.full_like(q, float("nan"))
    sdpa.SDPA(validation.attention_call(q, k, v, block_size=2), out=out)
    torch.testing.assert_close(out, reference.attention(q, k, v, block_size=2), rtol=2e-5, atol=2e-6)


def test_empty_batch_and_empty_keys():
    q, k, v, _ = random_inputs(0, 5, 5, 2, 2, 16, torch.float32, seed=1)
    assert sdpa.launch(validation.attention_call(q, k, v)).shape == (0, 5, 2, 16)
    q, k, v, _ = random_inputs(1, 5, 0, 2, 2, 16, torch.float32, seed=1)
    assert torch.equal(sdpa.launch(validation.attention_call(q, k, v)), torch.zeros(1, 5, 2, 16))


ROUTES = [
    # (dtype, batch, q_len, k_len, heads, head_dim, the reason SDPA is preferred, or None)
    (torch.float32, 1, 1024, 1024, 2, 64, None),  # float32, 2^27 multiply-adds: the native kernel
    (torch.float32, 1, 1024, 1024, 2, 128, None),
    (torch.float32, 1, 1024, 1024, 8, 16, None),  # at any head dim
    (torch.float32, 1, 32, 4096, 64, 64, None),  # a cached block over 4096 keys
    (torch.float32, 1, 1024, 1024, 2, 32, None),  # 2^26, but 1024 query rows over 1024 keys
    (torch.float32, 1, 128, 128, 8, 128, None),  # 128 query rows over 128 keys: one query tile
    (torch.float32, 1, 128, 127, 8, 128, "multiply-adds"),  # fewer than 128 keys
    (torch.float32, 1, 7, 1024, 16, 64, "multiply-adds"),  # fewer than 8 query rows
    (torch.float32, 1, 1, 1024, 16, 64, "multiply-adds"),  # one query
    (torch.bfloat16, 1, 1024, 1024, 2, 128, "bfloat16"),
    (torch.float16, 1, 512, 512, 2, 64, "float16"),
    (torch.float32, 1, 24, 24, 4, 32, None),  # the bundled model's calls: small, the native kernel's fixed cost wins
    (torch.bfloat16, 1, 96, 96, 4, 64, None),  # 24K key elements < 32K
    (torch.float32, 64, 24, 24, 4, 32, "multiply-adds"),  # 196K key elements
    (torch.float32, 1, 32, 32, 32, 32, "multiply-adds"),  # 32K key elements: at the line, SDPA
]
MASKED_ROUTES = [
    # (batch, q_len, k_len, heads, head_dim, the reason SDPA is preferred, or None), float32, padded keys
    (16, 24, 24, 4, 32, None),  # a key mask: the route's hidden-key check costs more than SDPA saves
    (1, 8, 512, 16, 64, None),
    (1, 4, 512, 16, 64, "multiply-adds"),  # 4 query rows over 512 keys: SDPA
    (64, 24, 24, 4, 32, None),
]


@pytest.mark.parametrize("dtype,batch,q_len,k_len,heads,head_dim,expected", ROUTES)
def test_the_routing_rule(monkeypatch, dtype, batch, q_len, k_len, heads, head_dim, expected):
    """SDPA takes the CPU calls where it measured faster than the native kernel (the
    comments of unmask.sdpa); the native kernel keeps small calls, float32 calls of 2^27
    multiply-adds and more, and float32 calls of 8 query rows per kv head over 128 keys.
    As on an Intel CPU with AMX, where these were measured, run by another build."""
    monkeypatch.setattr(native, "cpu_has_amx", lambda: True)
    monkeypatch.setattr(native, "cpu_vendor", lambda: "GenuineIntel")
    q = torch.empty(batch, q_len, heads, head_dim, dtype=dtype)
    k = torch.empty(batch, k_len, heads, head_dim, dtype=dtype)
    without_amx = next((isa for isa in native.runnable_cpu_isas() if isa != "amx"), None)
    with native.cpu_isa_forced(without_amx) if without_amx else contextlib.nullcontext():
        reason = sdpa.preferred_on_cpu(validation.attention_call(q, k, k))
        assert (reason is None) == (expected is None) and (expected is None or expected in reason)
        assert ops.backend_for("attention", q, k, k).startswith("torch-sdpa" if expected else "cpu:")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("batch,q_len,k_len,q_heads,kv_heads", [
    (1, 1024, 1024, 2, 2), (1, 1, 1024, 16, 16), (4, 32, 1024, 16, 16), (1, 8, 512, 16, 16)])
def test_without_amx_half_precision_stays_native(monkeypatch, dtype, batch, q_len, k_len, q_heads, kv_heads):
    """Without AMX, torch's half-precision SDPA measured slower than the native kernel at
    every shape (unmask.sdpa's comments): those calls stay native, whichever build runs."""
    monkeypatch.setattr(native, "cpu_has_amx", lambda: False)
    q = torch.empty(batch, q_len, q_heads, 64, dtype=dtype)
    k = torch.empty(batch, k_len, kv_heads, 64, dtype=dtype)
    for isa in native.runnable_cpu_isas():
        with native.cpu_isa_forced(isa):
            assert sdpa.preferred_on_cpu(validation.attention_call(q, k, k)) is None
            assert ops.backend_for("attention", q, k, k) == f"cpu:{isa}"
    monkeypatch.setattr(native, "cpu_has_amx", lambda: True)
    without_amx = next((isa for isa in native.runnable_cpu_isas() if isa != "amx"), None)
    with native.cpu_isa_forced(without_amx) if without_amx else contextlib.nullcontext():
        assert "on a CPU with AMX" in sdpa.preferred_on_cpu(validation.attention_call(q, k, k))


AMD_ROUTES = [
    # (batch, q_len, k_len, q_heads, kv_heads, head_dim, masked, expected), float32 below 2^27 multiply-adds
    (1, 32, 32, 32, 32, 32, False, None),  # 32 x 32: SDPA on Intel, native here
    (1, 2, 1024, 16, 16, 64, False, None),  # from two queries
    (1, 7, 1024, 64, 64, 16, False, None),
    (1, 32, 96, 16, 16, 64, False, None),  # fewer than 128 keys
    (4, 2, 512, 16, 16, 64, True, None),
    (1, 1, 1024, 16, 16, 64, False, None),  # one query, a kv head per query head: the one-query path
    (1, 1, 4096, 32, 32, 32, False, None),
    (1, 1, 1024, 16, 16, 64, True, None),
    (1, 1, 1024, 16, 4, 64, False, "one-query float32 calls of a GQA group"),  # SDPA reads each kv row once
    (1, 1, 1024, 16, 4, 64, True, "one-query float32 calls of a GQA group"),  # masked, 4 rows per kv head
    (1, 1, 1024, 16, 2, 64, True, None),  # masked, 8 rows per kv head: the key-mask rule, as on Intel
]


@pytest.mark.parametrize("batch,q_len,k_len,q_heads,kv_heads,head_dim,masked,expected", AMD_ROUTES)
def test_the_routing_rule_for_float32_on_amd(monkeypatch, batch, q_len, k_len, q_heads, kv_heads, head_dim, masked,
                                             expected):
    """On AMD CPUs the native kernel keeps float32 calls of two queries and more."""
    monkeypatch.setattr(native, "cpu_vendor", lambda: "AuthenticAMD")
    q = torch.empty(batch, q_len, q_heads, head_dim)
    k = torch.empty(batch, k_len, kv_heads, head_dim)
    masks = {"key_valid": torch.ones(batch, k_len, dtype=torch.bool)} if masked else {}
    reason = sdpa.preferred_on_cpu(validation.attention_call(q, k, k, **masks))
    assert (reason is None) == (expected is None) and (expected is None or expected in reason)
    assert ops.backend_for("attention", q, k, k, **masks).startswith("torch-sdpa" if expected else "cpu:")


def test_the_routing_rule_counts_one_query_heads_rows_without_a_mask(monkeypatch):
    """A GQA call of one query (8 query heads per kv head) over 1024 keys stays in SDPA
    without a mask: the tiled kernel's tasks are query heads, each of one row here."""
    monkeypatch.setattr(native, "cpu_vendor", lambda: "GenuineIntel")
    q, k = torch.empty(1, 1, 16, 64), torch.empty(1, 1024, 2, 64)
    without_amx = next((isa for isa in native.runnable_cpu_isas() if isa != "amx"), None)
    with native.cpu_isa_forced(without_amx) if without_amx else contextlib.nullcontext():
        assert "multiply-adds" in sdpa.preferred_on_cpu(validation.attention_call(q, k, k))
        q8 = torch.empty(1, 8, 16, 64)
        assert sdpa.preferred_on_cpu(validation.attention_call(q8, k, k)) is None


AMX_ROUTES = [
    # (batch, q_len, k_len, q_heads, kv_heads, expected), bfloat16, head dim 64, the amx build
    (1, 1024, 1024, 16, 16, None),  # 1.2-1.8x SDPA on AMX tiles (float32 multiplies: SDPA)
    (4, 32, 1024, 16, 16, None),  # a cached block
    (1, 4, 512, 16, 16, None),  # 4 query rows per kv head
    (1, 1, 1024, 16, 4, None),  # one query, but 4 per kv head (GQA)
    (1, 1, 1024, 16, 16, "fewer than 4 query rows"),  # one query over 1024 keys: SDPA
]


@pytest.mark.skipif("amx" not in native.runnable_cpu_isas(), reason="needs a CPU with AMX")
@pytest.mark.parametrize("batch,q_len,k_len,q_heads,kv_heads,expected", AMX_ROUTES)
def test_the_routing_rule_for_bfloat16_on_amx(batch, q_len, k_len, q_heads, kv_heads, expected):
    q = torch.empty(batch, q_len, q_heads, 64, dtype=torch.bfloat16)
    k = torch.empty(batch, k_len, kv_heads, 64, dtype=torch.bfloat16)
    with native.cpu_isa_forced("amx"):
        reason = sdpa.preferred_on_cpu(validation.attention_call(q, k, k))
        assert (reason is None) == (expected is None) and (expected is None or expected in reason)
        assert ops.backend_for("attention", q, k, k) == ("torch-sdpa" if expected else "cpu:amx")


@pytest.mark.parametrize("batch,q_len,k_len,heads,head_dim,expected", MASKED_ROUTES)
def test_the_routing_rule_with_a_key_mask(monkeypatch, batch, q_len, k_len, heads, head_dim, expected):
    monkeypatch.setattr(native, "cpu_vendor", lambda: "GenuineIntel")  # where these were measured
    q = torch.empty(batch, q_len, heads, head_dim)
    k = torch.empty(batch, k_len, heads, head_dim)
    valid = torch.ones(batch, k_len, dtype=torch.bool)
    reason = sdpa.preferred_on_cpu(validation.attention_call(q, k, k, key_valid=valid))
    assert (reason is None) == (expected is None) and (expected is None or expected in reason)
    if k_len < sdpa.NATIVE_CPU_MIN_FLOAT32_KEYS:  # the mask alone sends these to the native kernel
        assert sdpa.preferred_on_cpu(validation.attention_call(q, k, k)) is not None


def test_a_nan_query_that_sees_no_key_gets_zeros():
    """SDPA gives such a row NaN; the contract gives every query that sees no key zeros
    (rows that see a NaN score stay NaN, as in the reference)."""
    q, k, v, _ = random_inputs(1, 6, 8, 2, 2, 16, torch.float32, seed=4)
    q[0, 0, 0] = float("nan")  # in the first block of 4, which sees no key (all hidden)
    q[0, 5, 1] = float("nan")  # sees keys: NaN
    key_valid = torch.ones(1, 8, dtype=torch.bool)
    key_valid[0, :4] = False
    out = sdpa.launch(validation.attention_call(q, k, v, key_valid=key_valid, block_size=4, q_offset=0))
    expected = reference.attention(q.double(), k.double(), v.double(), key_valid=key_valid, block_size=4)
    assert torch.equal(torch.isnan(out), torch.isnan(expected)) and torch.isnan(out).any()
    assert torch.equal(out[0, :4], torch.zeros_like(out[0, :4]))
