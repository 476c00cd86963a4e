"""The CPU attention sweep: the shapes decoding runs, unmask beside torch SDPA.

Head dims 16, 32, 64 and 128 at d_model 1024 (H = 1024 / D); queries 1 to 1024 against
keys 32 to 4096; no mask, key padding, block-causal 32 with padding, and the cached-block
cases of cached decoding (a block of 32 queries against every cached key of the canvas,
with left padding, bidirectional as in LLaDA's dual cache, or block-causal at the end of
the canvas as in block diffusion); float32 and bfloat16. SDPA gets the equivalent boolean
mask, no mask where the case has none, and where the padding is the same in every row
(these cases' left padding) also no mask over the keys past it (sliced off: the same
output, less work): each row's ratio is to the faster SDPA. Rows report the fraction of
a same-dtype matmul measured in the same run, with the FLOPs of the visible
query-key pairs only.
"""

from __future__ import annotations

import torch

from unmask import ops, reference
from unmask.benchmarks.harness import Row, alternating_median_seconds, median_seconds

HEAD_DIMS = (16, 32, 64, 128)
D_MODEL = 1024
# (name, batch, q_len, k_len, masks): masks as unmask.ops.attention arguments; "pad" hides
# the first eighth of every row's keys (left padding).
CASES = (
    ("full 1024", 1, 1024, 1024, "none"),
    ("full 1024 pad", 1, 1024, 1024, "pad"),
    ("full 1024 block32+pad", 1, 1024, 1024, "block"),
    ("full 128", 1, 128, 128, "none"),
    ("full 128 pad x4", 4, 128, 128, "pad"),
    ("full 32", 1, 32, 32, "none"),
    ("one query x1024", 1, 1, 1024, "none"),
    ("8 queries x512 pad x4", 4, 8, 512, "pad"),
    ("cached block 32 x1024 pad x4", 4, 32, 1024, "pad"),
    ("cached block 32 x4096 pad", 1, 32, 4096, "pad"),
    # The block diffusion decodes is the canvas's last: block-causal, it sees every key
    # before it, so this is the padded case's work through the block-causal path.
    ("cached last block, block-causal 32 x1024 pad x4", 4, 32, 1024, "tail"),
)
QUICK_CASES = ("full 128", "cached block 32 x1024 pad x4", "one query x1024")


def masks(kind: str, batch: int, q_len: int, k_len: int) -> dict:
    if kind == "none":
        return {}
    key_valid = torch.ones(batch, k_len, dtype=torch.bool)
    key_valid[:, : k_len // 8] = False
    if kind == "pad":
        return {"key_valid": key_valid}
    if kind == "block":
        return {"key_valid": key_valid, "block_size": 32}
    # "tail": the last block of a block-causal canvas, its queries at q_offset k_len - q_len
    return {"key_valid": key_valid, "block_size": 32, "q_offset": k_len - q_len}


def visible_pairs(kind: str, batch: int, q_len: int, k_len: int, arguments: dict) -> torch.Tensor:
    """bool [B, Lq, Lk]: which keys each query sees."""
    return reference.visibility(batch, q_len, k_len, key_valid=arguments.get("key_valid"),
                                block_size=arguments.get("block_size"), q_offset=arguments.get("q_offset", 0))


def sdpa_mask(kind: str, batch: int, q_len: int, k_len: int, arguments: dict) -> torch.Tensor | None:
    if kind == "none":
        return None
    return visible_pairs(kind, batch, q_len, k_len, arguments)[:, None]


def sliced_padding(kind: str, k_len: int) -> int | None:
    """Where every row's padding is the same first keys and nothing else is hidden from any
    query ("pad", and "tail": the last block sees every key), how many keys to slice off
    for an SDPA call without a mask; None otherwise."""
    return k_len // 8 if kind in ("pad", "tail") else None


def matmul_gflops(dtype: torch.dtype, n: int = 2048) -> float:
    a, b = (torch.randn(n, n).to(dtype) for _ in range(2))
    return 2 * n**3 / median_seconds(lambda i: a @ b, torch.device("cpu"), warmup=2, reps=5) / 1e9


# Calls of each implementation per row, in turns. The 2-core machine's per-call times
# scatter by 20-40%: with 9, the float32 D 128 cached-block row read 1.11-1.42x in three
# runs of one build; with 31, 1.45-1.51x (the sweep 84 s instead of 33). Slower phases
# of the machine, minutes long, still move whole runs: compare runs by their medians.
REPS = 31


def sweep(*, dtypes=(torch.float32, torch.bfloat16), head_dims=HEAD_DIMS, quick: bool = False,
          reps: int = REPS) -> tuple[list[Row], dict]:
    rows, peaks = [], {}
    for dtype in dtypes:
        name = str(dtype).removeprefix("torch.")
        peaks[f"{name}_matmul_gflops"] = peak = matmul_gflops(dtype)
        for head_dim in head_dims:
            heads = D_MODEL // head_dim
            for case, batch, q_len, k_len, kind in CASES:
                if quick and case not in QUICK_CASES:
                    continue
                gen = torch.Generator().manual_seed(q_len * 7 + k_len)
                q = torch.randn(batch, q_len, heads, head_dim, generator=gen).to(dtype)
                k, v = (torch.randn(batch, k_len, heads, head_dim, generator=gen).to(dtype) for _ in range(2))
                arguments = masks(kind, batch, q_len, k_len)
                mask = sdpa_mask(kind, batch, q_len, k_len, arguments)
                qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
                # FLOPs of the pairs a query sees (QK^T and PV, 2 each per pair and dim)
                flops = 4 * heads * head_dim * int(visible_pairs(kind, batch, q_len, k_len, arguments).sum())
                shape = {"case": case, "B": batch, "Lq": q_len, "Lk": k_len, "H": heads, "D": head_dim, "mask": kind}

                def sdpa(i):
                    return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask)

                def ours(i):
                    return ops.attention(q, k, v, **arguments)

                runs = {"torch SDPA" + (" (bool mask)" if mask is not None else ""): sdpa}
                cut = sliced_padding(kind, k_len)
                if cut is not None:
                    ks, vs = kt[:, :, cut:], vt[:, :, cut:]

                    def sliced(i):
                        return torch.nn.functional.scaled_dot_product_attention(qt, ks, vs)

                    runs["torch SDPA (no mask, padding sliced off)"] = sliced
                times = alternating_median_seconds((*runs.values(), ours), torch.device("cpu"), reps=reps)
                baselines, seconds = dict(zip(runs, times[:-1])), times[-1]
                baseline = min(baselines.values())  # the faster SDPA
                label = f"unmask.ops [{ops.backend_for('attention', q, k, v, **arguments)}]"
                for impl, time in (*baselines.items(), (label, seconds)):
                    rows.append(Row("attention sweep", impl, shape, name, time * 1e3, gflops=flops / time / 1e9,
                                    fraction_of_peak=flops / time / 1e9 / peak, peak=f"{name} matmul",
                                    speedup_vs_baseline=baseline / time,
                                    extra={"matmul_gflops": peak, "baseline": min(baselines, key=baselines.get)}))
                print(f"{name:8} D={head_dim:<3} {case:48} SDPA {baseline * 1e3:9.3f} ms  unmask {seconds * 1e3:9.3f} ms"
                      f"  x{baseline / seconds:5.2f}", flush=True)
    return rows, peaks
