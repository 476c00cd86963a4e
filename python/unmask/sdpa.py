"""unmask's attention contract (docs/design.md, attention) through torch's
scaled_dot_product_attention: a backend of the kernel table for the cases where torch's
own kernels beat unmask's, and for those unmask's native kernels do not take.

What the contract asks beyond plain SDPA:
- the masks (kv_len, key_valid, block-causal with q_offset) become one boolean mask, of
  shape [B, 1, 1, Lk] when only keys are masked (no Lq x Lk tensor) and [B, 1, Lq, Lk]
  with the block-causal mask;
- hidden keys are never read: K and V rows that kv_len or key_valid hide are zeroed in a
  copy first (a stale cache may hold NaN there, and SDPA's P V would multiply it by 0);
- a query that sees no key gets zeros (SDPA's softmax over no key gives NaN);
- NaN in a key or value reaches only the queries that see it: SDPA adds the mask to the
  scores, so under a block-causal mask it takes only finite K and V (checked on the CPU).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from unmask import reference
from unmask.validation import AttentionCall

# The native CPU kernel against torch SDPA on this project's machines (bench/attention.py
# --sweep, rows in bench/results/cpu.jsonl): the native kernel is faster in float32 at
# head dims of 64 and more on long query blocks (1.0-1.5x at 1024 x 1024, 2.4-2.6x with a
# block-causal mask, whose hidden key tiles it skips); SDPA is faster everywhere else:
# head dims 16 and 32 (2.5-4x), short query blocks (1.5-4x), bfloat16 (SDPA's kernels
# multiply in bfloat16, the native kernel in float32: 2-7x).
NATIVE_CPU_MIN_HEAD_DIM = 64
NATIVE_CPU_MIN_QUERIES = 512
SDPA_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def preferred_on_cpu(call: AttentionCall) -> str | None:
    """Why torch SDPA runs this CPU call rather than the native kernel (None: it does not)."""
    shape = call.shape
    if call.q.dtype != torch.float32:
        return f"torch SDPA is faster for {str(call.q.dtype).removeprefix('torch.')} on the CPU"
    if shape.head_dim < NATIVE_CPU_MIN_HEAD_DIM:
        return f"torch SDPA is faster at head_dim={shape.head_dim} < {NATIVE_CPU_MIN_HEAD_DIM} on the CPU"
    if shape.q_len < NATIVE_CPU_MIN_QUERIES:
        return f"torch SDPA is faster for q_len={shape.q_len} < {NATIVE_CPU_MIN_QUERIES} queries on the CPU"
    return None


def _key_visible(call: AttentionCall) -> torch.Tensor | None:
    """Bool [B, Lk]: keys kv_len and key_valid leave visible (None: every key)."""
    visible = None
    if call.kv_len is not None:
        keys = torch.arange(call.shape.k_len, device=call.q.device)
        visible = keys[None, :] < call.kv_len.to(call.q.device)[:, None]
    if call.key_valid is not None:
        valid = call.key_valid.to(device=call.q.device, dtype=torch.bool)
        visible = valid if visible is None else visible & valid
    return visible


def launch(call: AttentionCall, out: torch.Tensor | None = None) -> torch.Tensor:
    """out: optional tensor like q to write into (tests poison it)."""
    q, k, v = call.q, call.k, call.v
    shape = call.shape
    key_visible = _key_visible(call)
    if key_visible is not None:  # hidden keys are never read: zero them in a copy
        hide = ~key_visible[:, :, None, None]
        k, v = k.masked_fill(hide, 0), v.masked_fill(hide, 0)
    mask = None
    if call.block_size is not None:
        mask = reference.visibility(shape.batch, shape.q_len, shape.k_len, kv_len=call.kv_len,
                                    key_valid=call.key_valid, block_size=call.block_size, q_offset=call.q_offset,
                                    device=q.device)[:, None]
    elif key_visible is not None:
        mask = key_visible[:, None, None, :]
    result = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=call.scale,
        enable_gqa=shape.q_heads != shape.kv_heads)
    if mask is not None:  # a query that sees no key: zeros, not SDPA's NaN
        result = result.masked_fill(~mask.any(dim=-1, keepdim=True), 0)
    result = result.transpose(1, 2)
    if out is None:
        return result.contiguous()
    return out.copy_(result)


@dataclasses.dataclass(frozen=True)
class SdpaKernel:
    """torch SDPA as a backend of the kernel table (unmask.dispatch)."""

    kernel: str = "attention"
    name: str = "torch-sdpa"
    launch: Callable = launch

    def supports(self, call: AttentionCall) -> str | None:
        if call.q.dtype not in SDPA_DTYPES:
            return f"torch SDPA does not take {call.q.dtype}"
        if call.block_size is not None:
            # SDPA adds the mask to the scores: a NaN key or value a block-causal mask hides
            # from some queries would still reach them (NaN - inf, 0 * NaN). Checked where
            # reading K and V costs no synchronisation.
            if call.device.type != "cpu":
                return "torch SDPA would let a non-finite key hidden by the block-causal mask reach other queries"
            finite = torch.isfinite(call.k).all(dim=(2, 3)) & torch.isfinite(call.v).all(dim=(2, 3))
            key_visible = _key_visible(call)
            if not bool((finite if key_visible is None else finite | ~key_visible).all()):  # hidden keys are zeroed
                return "a non-finite key or value under a block-causal mask: torch SDPA would spread it"
        return None

    def preferred(self, call: AttentionCall) -> str | None:
        """Why this backend runs the call where the native kernel also could."""
        return preferred_on_cpu(call) if call.device.type == "cpu" else None

    def __call__(self, call: AttentionCall, out: torch.Tensor | None = None) -> torch.Tensor:
        return self.launch(call, out=out)


SDPA = SdpaKernel()
