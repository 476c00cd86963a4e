"""unmask's attention contract (docs/design.md, attention) through torch's
scaled_dot_product_attention: a backend of the kernel table for the cases where torch's
own kernels beat unmask's, and for those unmask's native kernels do not take.

What the contract asks beyond plain SDPA:
- the masks (kv_len, key_valid, block-causal with q_offset) become one boolean mask, of
  shape [B, 1, 1, Lk] when only keys are masked (no Lq x Lk tensor) and [B, 1, Lq, Lk]
  with the block-causal mask;
- hidden keys are never read: keys in blocks after every query's are sliced off; SDPA adds
  the mask to the scores, so a NaN elsewhere would still reach the output (NaN - inf,
  0 * NaN): keys kv_len or key_valid hide are zeroed in a copy when they may not be finite
  (a finite hidden key weighs exactly 0, so the result does not change); keys the
  block-causal mask shows some queries and hides from others must be finite, or the call
  goes to another backend (checked on the CPU; on a device such calls go elsewhere);
- a query that sees no key gets zeros (SDPA's softmax over no key gives NaN).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from unmask import native, reference
from unmask.validation import AttentionCall

# The native CPU kernel against torch SDPA on this project's machines (bench/attention.py
# --sweep, rows in bench/results/cpu.jsonl): in float32 the native kernel is faster on
# calls of 2^27 multiply-adds and more (B * Hq * Lq * Lk * D), at every head dim: 1.0-1.4x
# at 1024 x 1024, 1.7-2.9x with a block-causal mask (it skips hidden key tiles), 1.3-1.7x
# on cached 32-query blocks over 1024-4096 keys. Below that it is also faster from 8 query
# rows per kv head over 128 keys and more (since commit a98caca, a block of 128 queries
# is one query tile): [1, 128, H, D] over 128 keys 1.0-1.3x SDPA where the SDPA route ran
# 0.8-0.9x, [2, 16, 16, 64] over 512 keys 1.32x against 0.91x, [1, 1024, 2, 32] 1.08x
# against 0.95x; on fewer rows or keys SDPA's lower per-call cost wins or ties (one query
# over 1024 keys 0.57-0.95x native against 0.67-0.87x, 32 x 32 0.37-0.75x against
# 0.50-0.69x, [64, 32, 4, 32] over 32 keys 0.74x against 0.82x). In bfloat16 and
# float16 on a CPU with AMX, SDPA is faster than the avx512 and avx2 builds (oneDNN
# multiplies on AMX tiles, those builds in float32: 1.2-3.7x on Sapphire Rapids), except
# on small calls (below) and bfloat16 calls of a few query rows and more that the amx
# build runs (NATIVE_AMX_MIN_QUERY_ROWS). Without AMX the native kernel is the faster at
# every shape measured (Zen 4 with AVX512-BF16, 2 threads, torch 2.13: bfloat16 1.17-1.55x
# SDPA from [1, 8, 16, 128] over 512 keys to [1, 1024, 32, 128] over 1024, 8.3x for one
# query over 1024 keys; float16 1.6-4.1x), so it keeps half precision there.
NATIVE_CPU_MIN_FLOAT32_MACS = 2**27
NATIVE_CPU_MIN_FLOAT32_KEYS = 128
# From this many queries (over NATIVE_CPU_MIN_FLOAT32_KEYS keys), or with a key mask this
# many query rows per kv head (over any keys), the native kernel runs float32 calls of
# fewer multiply-adds. A key mask (kv_len, key_valid) tips it further: the SDPA route then
# checks the hidden keys (an index_select and a sum, a host read) and builds a mask,
# 50-150 us that SDPA's own speed does not win back. Measured with padded keys, native
# against the route: the serving engine's calls (B 4-64 x 24 keys, 4 heads x 32)
# 0.49-0.84x the time, 8 queries x 512 keys 0.62x, 64 x 64 at 8 heads 0.67x. Masked calls
# count query rows per kv head: one query over many keys packs them all.
NATIVE_CPU_MIN_QUERY_ROWS = 8
# With fewer key elements than this (B * Lk * Hkv * D) the native kernel's lower fixed cost
# wins: this backend builds a mask and checks hidden keys (~50-70 us a call), while the
# native kernel's own overhead grows with the keys it packs. Measured with padded prompts:
# the bundled model's calls (B 1-4, 24 keys x 128) ran 0.6-0.8x in SDPA, [1, 96 keys, 4 x 64]
# 0.74x; at 32K elements and more SDPA won (32 queries x 32 keys x 1024: 2-4x; [64, 24 keys,
# 4 x 32] 1.65x), within 0.88-1.07x near the line.
NATIVE_CPU_MAX_SMALL_KEYS = 2**15
# The amx build's bfloat16 kernel (csrc/cpu/attention_amx.cpp) against SDPA in bfloat16,
# native kernel calls on Sapphire Rapids: 1.1-2.0x from 4 query rows per kv head up (4 x
# 512 keys 1.21x, a cached block of 32 x 1024 1.45-2.0x, 1024 x 1024 1.18-1.79x); one query
# over 1024 keys 0.6x (each key tile is packed for AMX, then used by one row).
NATIVE_AMX_MIN_QUERY_ROWS = 4
# The float32 rules above were measured on Intel CPUs, where torch's SDPA runs MKL's
# tuned small products. On AMD's (MKL takes its generic path there: its *_def_*_zen
# kernels in the profiles) SDPA's per-call cost is higher and the native kernel measured
# faster from two queries up (Zen 4, 2 threads, raw SDPA against the native kernel, d_model
# 1024 at D 16-128): 32 x 32 1.02-2.76x, 2-4 queries over 1024 keys 1.04-1.86x, 7 x 1024
# 1.04-1.46x, 32 x 96 1.13-2.52x. One query runs its own path (csrc/cpu/attention_one_query.cpp,
# the route's cost included): 1.02-1.87x over 512-1024 keys with a kv head per query head,
# where the SDPA route measured 0.82-0.89x; with a GQA group SDPA reads each kv row once
# for the group and the native path measured 0.83-1.09x, so SDPA keeps those.
NATIVE_AMD_MIN_FLOAT32_QUERIES = 2
SDPA_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def preferred_on_cpu(call: AttentionCall) -> str | None:
    """Why torch SDPA runs this CPU call rather than the native kernel (None: it does not)."""
    shape = call.shape
    if shape.batch * shape.k_len * shape.kv_heads * shape.head_dim < NATIVE_CPU_MAX_SMALL_KEYS:
        return None
    if call.q.dtype != torch.float32 and not native.cpu_has_amx():
        return None  # half precision without AMX: SDPA multiplies no faster than the native kernel
    if call.q.dtype == torch.bfloat16 and native.cpu_isa() == "amx":
        if shape.q_len * (shape.q_heads // shape.kv_heads) >= NATIVE_AMX_MIN_QUERY_ROWS:
            return None
        return "torch SDPA is faster for bfloat16 calls of fewer than 4 query rows per kv head on the CPU"
    if call.q.dtype != torch.float32:
        return (f"torch SDPA is faster for {str(call.q.dtype).removeprefix('torch.')} on a CPU with AMX "
                f"(its kernels multiply on the tiles; this build, {native.cpu_isa()}, in float32)")
    macs = shape.batch * shape.q_heads * shape.q_len * shape.k_len * shape.head_dim
    if macs >= NATIVE_CPU_MIN_FLOAT32_MACS:
        return None
    masked = call.key_valid is not None or call.kv_len is not None
    if masked and shape.q_len * (shape.q_heads // shape.kv_heads) >= NATIVE_CPU_MIN_QUERY_ROWS:
        return None  # the contract's hidden-key check costs SDPA more than it saves (on any CPU)
    if native.cpu_vendor() == "AuthenticAMD":
        if shape.q_len >= NATIVE_AMD_MIN_FLOAT32_QUERIES or shape.q_heads == shape.kv_heads:
            return None
        return (f"torch SDPA is faster for one-query float32 calls of a GQA group ({macs} < 2^27 multiply-adds) "
                f"on AMD CPUs")
    # Unmasked: rows of one query head (the tiled kernel's task is a query head's rows; its
    # 1-row tasks of a GQA group were not among the measured wins).
    if shape.q_len >= NATIVE_CPU_MIN_QUERY_ROWS and shape.k_len >= NATIVE_CPU_MIN_FLOAT32_KEYS:
        return None
    return (f"torch SDPA is faster for float32 calls of {macs} < 2^27 multiply-adds with fewer than 8 queries "
            f"(with a key mask: query rows per kv head) or, unmasked, 128 keys on this CPU")


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


def _block_key_limits(call: AttentionCall) -> tuple[int, int]:
    """Under the block-causal mask: keys below `shared` are in blocks every query sees, keys
    from `end` on in blocks no query sees (so they are sliced off, never read)."""
    k_len, b = call.shape.k_len, call.block_size
    if b is None:
        return k_len, k_len
    first_block, last_block = call.q_offset // b, (call.q_offset + call.shape.q_len - 1) // b
    return min(k_len, (first_block + 1) * b), min(k_len, (last_block + 1) * b)


def _might_hold_non_finite(x: torch.Tensor) -> bool:
    """A conservative test that reads x once: a NaN or inf makes the sum non-finite (a sum
    that overflows says so too, and only costs the faster path)."""
    return x.numel() > 0 and not bool(torch.isfinite(x.sum()))


def _hidden_might_hold_non_finite(k: torch.Tensor, v: torch.Tensor, key_visible: torch.Tensor) -> bool:
    """Whether a key or value row the key masks hide may hold a NaN or inf (CPU: only the
    hidden rows are read, a small part of the keys for padding)."""
    rows = (~key_visible).flatten().nonzero().flatten()  # (batch, key) rows, for index_select
    if rows.numel() == 0:
        return False
    batch, keys = key_visible.shape
    return any(_might_hold_non_finite(x.reshape(batch * keys, -1).index_select(0, rows)) for x in (k, v))


def launch(call: AttentionCall, out: torch.Tensor | None = None) -> torch.Tensor:
    """out: optional tensor like q to write into (tests poison it)."""
    q, k, v = call.q, call.k, call.v
    shape = call.shape
    shared, end = _block_key_limits(call)
    if end < shape.k_len:
        k, v = k[:, :end], v[:, :end]  # keys in blocks after every query's: never read
    key_visible = _key_visible(call)
    key_visible = None if key_visible is None else key_visible[:, :end]
    if key_visible is not None and (q.device.type != "cpu" or _hidden_might_hold_non_finite(k, v, key_visible)):
        # Hidden keys are never read: a finite key under the mask weighs exactly 0, so on the
        # CPU, where one read tells, keys are zeroed in a copy only when some may not be
        # finite (a stale cache); on a device always (checking would synchronise).
        hide = ~key_visible[:, :, None, None]
        k, v = k.masked_fill(hide, 0), v.masked_fill(hide, 0)
    mask = None
    if shared < end:  # the block-causal mask shows some keys to some queries only
        mask = reference.visibility(shape.batch, shape.q_len, end, key_valid=key_visible, block_size=call.block_size,
                                    q_offset=call.q_offset, device=q.device)[:, None]
    elif key_visible is not None:
        mask = key_visible[:, None, None, :]
    result = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=call.scale,
        enable_gqa=shape.q_heads != shape.kv_heads)
    if mask is not None:  # a query that sees no key: zeros, not SDPA's NaN
        sees = mask.any(dim=-1, keepdim=True)
        if q.device.type != "cpu" or not bool(sees.all()):
            result = result.masked_fill(~sees, 0)
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
        shared, end = _block_key_limits(call)
        if shared == end:
            return None  # every key it reads is seen by every query (key-masked ones: launch)
        # Keys the block-causal mask shows some queries and hides from others cannot be
        # zeroed: SDPA adds the mask to the scores, so a NaN or inf there would reach the
        # queries that must not see it (NaN - inf, 0 * NaN). Checked where reading them
        # costs no synchronisation.
        if call.device.type != "cpu":
            return "torch SDPA would let a non-finite key hidden by the block-causal mask reach other queries"
        key_visible = _key_visible(call)
        for x in (call.k[:, shared:end], call.v[:, shared:end]):
            if key_visible is not None:  # keys kv_len or key_valid hide are zeroed by launch: not counted
                x = x.masked_fill(~key_visible[:, shared:end, None, None], 0)
            if _might_hold_non_finite(x):
                return "a non-finite key or value the block-causal mask hides from some queries: SDPA would spread it"
        return None

    def preferred(self, call: AttentionCall) -> str | None:
        """Why this backend runs the call where the native kernel also could."""
        return preferred_on_cpu(call) if call.device.type == "cpu" else None

    def __call__(self, call: AttentionCall, out: torch.Tensor | None = None) -> torch.Tensor:
        return self.launch(call, out=out)


SDPA = SdpaKernel()
