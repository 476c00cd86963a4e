"""bench/attention.py --sweep's baselines do the kernel's work: SDPA with the case's mask,
and without one over the keys past a padding every row shares, give the reference's
output on every case kind (unmask.benchmarks.attention_sweep)."""

import pytest
import torch
import torch.nn.functional as F

from unmask import reference
from unmask.benchmarks import attention_sweep as sweep


@pytest.mark.parametrize("kind", ["none", "pad", "block", "tail"])
def test_the_sdpa_baselines_compute_the_cases_attention(kind):
    batch, q_len, k_len, heads, dim = 2, 32, 96, 2, 16
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(batch, q_len, heads, dim, generator=gen)
    k, v = (torch.randn(batch, k_len, heads, dim, generator=gen) for _ in range(2))
    arguments = sweep.masks(kind, batch, q_len, k_len)
    expected = reference.attention(q, k, v, **arguments)
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    masked = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=sweep.sdpa_mask(kind, batch, q_len, k_len, arguments))
    torch.testing.assert_close(masked.transpose(1, 2), expected, rtol=1e-5, atol=1e-5)
    cut = sweep.sliced_padding(kind, k_len)
    if kind in ("pad", "tail"):
        sliced = F.scaled_dot_product_attention(qt, kt[:, :, cut:], vt[:, :, cut:])
        torch.testing.assert_close(sliced.transpose(1, 2), expected, rtol=1e-5, atol=1e-5)
    else:
        assert cut is None, "no slice where the mask hides more than a shared padding"
    pairs = int(sweep.visible_pairs(kind, batch, q_len, k_len, arguments).sum())
    assert pairs <= batch * q_len * k_len and (pairs == batch * q_len * k_len) == (kind == "none")
