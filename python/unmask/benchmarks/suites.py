"""The microbenchmarks: sample, commit and attention, each beside its baselines in one run."""

from __future__ import annotations


import torch

from unmask import ops, reference
from unmask.benchmarks.harness import Row, copy_bandwidth, median_seconds, read_bandwidth


def llada_float64_sample(logits: torch.Tensor, temperature: float, mask_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What LLaDA's published generate() does per step, as a baseline: logits cast to
    float64, torch.rand noise, exp(logits) / (-log u)^T, argmax, softmax confidence."""
    logits = logits.to(torch.float64)
    if temperature > 0:
        noise = torch.rand_like(logits)
        scores = logits.exp() / (-torch.log(noise)) ** temperature
    else:
        scores = logits
    tokens = scores.argmax(dim=-1)
    probs = torch.softmax(logits, dim=-1)
    return tokens, probs.gather(-1, tokens[..., None]).squeeze(-1)


def rotating_inputs(make, bytes_each: int, total_bytes: int = 2**30, most: int = 16) -> list:
    """Copies of an input, enough that cycling through them exceeds every cache level
    (this machine's L3 is 260 MB), so each timed run reads from DRAM."""
    count = max(2, min(most, -(-total_bytes // max(1, bytes_each))))
    return [make(i) for i in range(count)]


def bench_sample(device: torch.device, shapes: list[tuple[int, int]], dtypes: list[torch.dtype], *,
                 peak_gbps: float, temperature: float = 0.0, reps: int = 10, baselines: tuple[str, ...] = ("reference",),
                 total_bytes: int = 2**30) -> list[Row]:
    """Bytes moved = logits read once + tokens (8 B) and confidences (4 B) written."""
    rows = []
    for n, vocab in shapes:
        for dtype in dtypes:
            size = n * vocab * torch.tensor([], dtype=dtype).element_size()
            inputs = rotating_inputs(lambda i: (torch.randn(n, vocab, device=device) * 3).to(dtype), size, total_bytes)
            count = len(inputs)
            moved = size + n * 12
            backend = ops.backend_for("sample", device)
            impls = {}
            if "reference" in baselines:
                impls["reference (eager)"] = lambda i: reference.sample(inputs[i % count], temperature=temperature, seed=i)
            if "compiled" in baselines:
                # A fresh compile per shape and dtype: dynamo's recompile limit would
                # otherwise send later shapes back to eager without saying so in the table.
                torch._dynamo.reset()
                compiled_reference = torch.compile(reference.sample, dynamic=False)
                impls["reference (compiled)"] = lambda i: compiled_reference(inputs[i % count], temperature=temperature, seed=0)
            if "llada" in baselines:
                impls["LLaDA float64 path"] = lambda i: llada_float64_sample(inputs[i % count], temperature, vocab - 1)
            impls[f"unmask.ops [{backend}]"] = lambda i: ops.sample(
                inputs[i % count], temperature=temperature, seed=i, banned=[vocab - 1], check=False)
            baseline = None
            for name, fn in impls.items():
                seconds = median_seconds(fn, device, reps=reps if "unmask" in name else min(reps, 3), warmup=1 if "unmask" not in name else 3)
                baseline = baseline or seconds
                gbps = moved / seconds / 1e9
                rows.append(Row("sample", name, {"N": n, "V": vocab, "T": temperature}, str(dtype).removeprefix("torch."),
                                seconds * 1e3, gbps=gbps, fraction_of_peak=gbps / peak_gbps, peak="read bandwidth",
                                speedup_vs_baseline=baseline / seconds))
            del inputs
    return rows


def bench_commit(device: torch.device, shapes: list[tuple[int, int]], *, reps: int = 20) -> list[Row]:
    rows = []
    for batch, length in shapes:
        gen = torch.Generator().manual_seed(0)
        conf = torch.rand(batch, length, generator=gen).to(device)
        eligible = (torch.rand(batch, length, generator=gen) > 0.3).to(device)
        tokens = torch.randint(0, 1000, (batch, length), generator=gen).to(device)
        canvas = torch.zeros(batch, length, dtype=torch.int64, device=device)
        for mode in ({"k": 4}, {"threshold": 0.9}, {"factor": 1.0}):
            k = torch.full((batch,), 4, device=device) if "k" in mode else None
            args = {"k": k} if k is not None else mode
            impls = {
                "reference (eager)": lambda i: reference.commit(canvas, tokens, conf, eligible, **args),
                f"unmask.ops [{ops.backend_for('commit', device)}]": lambda i: ops.commit(canvas, tokens, conf, eligible, **mode),
            }
            baseline = None
            for name, fn in impls.items():
                seconds = median_seconds(fn, device, reps=reps)
                baseline = baseline or seconds
                rows.append(Row("commit", name, {"B": batch, "L": length, "mode": next(iter(mode))}, "int64",
                                seconds * 1e3, speedup_vs_baseline=baseline / seconds))
    return rows


def flex_attention_baseline(q, k, v, key_valid, block):
    """FlexAttention with the block-causal + padding block mask, compiled; None where it
    does not run on this device or torch build."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        def visible(b, h, q_idx, kv_idx):
            return key_valid[b, kv_idx] & (kv_idx // block <= q_idx // block)

        block_mask = create_block_mask(visible, q.shape[0], None, q.shape[1], k.shape[1], device=q.device)
        compiled = torch.compile(flex_attention, dynamic=False)
        qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        run = lambda i: compiled(qt, kt, vt, block_mask=block_mask)  # noqa: E731
        run(0)
        return run
    except Exception:  # noqa: BLE001 - any failure means "baseline unavailable here"
        return None


def bench_attention(device: torch.device, shapes: list[tuple[int, int, int, int]], dtype: torch.dtype, *,
                    reps: int = 5, flex_attention: bool = False) -> list[Row]:
    """FLOPs = 4 * B * H * Lq * Lk * D, with no discount for masking."""
    rows = []
    for batch, length, heads, head_dim in shapes:
        q, k, v = (torch.randn(batch, length, heads, head_dim, device=device, dtype=dtype) for _ in range(3))
        flops = 4 * batch * heads * length * length * head_dim
        key_valid = torch.ones(batch, length, dtype=torch.bool, device=device)
        key_valid[:, : length // 8] = False  # left padding
        block = 32
        block_mask = reference.visibility(batch, length, length, key_valid=key_valid, block_size=block, device=device)

        def sdpa(mask):
            qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask)

        flex = flex_attention_baseline(q, k, v, key_valid, block) if flex_attention else None

        cases = {
            "none": {
                "torch SDPA": lambda i: sdpa(None),
                f"unmask.ops [{ops.backend_for('attention', device)}]": lambda i: ops.attention(q, k, v),
            },
            "block+pad": {
                "torch SDPA (bool mask)": lambda i: sdpa(block_mask[:, None]),
                **({"FlexAttention (compiled)": flex} if flex is not None else {}),
                f"unmask.ops [{ops.backend_for('attention', device)}]": lambda i: ops.attention(
                    q, k, v, key_valid=key_valid, block_size=block),
            },
        }
        for mask_kind, impls in cases.items():
            baseline = None
            for name, fn in impls.items():
                seconds = median_seconds(fn, device, reps=reps)
                baseline = baseline or seconds
                rows.append(Row("attention", name, {"B": batch, "L": length, "H": heads, "D": head_dim, "mask": mask_kind},
                                str(dtype).removeprefix("torch."), seconds * 1e3, gflops=flops / seconds / 1e9,
                                speedup_vs_baseline=baseline / seconds))
    return rows


def quick(device: torch.device) -> tuple[list[Row], dict]:
    """A short run of every benchmark on small shapes (`unmask bench --quick`)."""
    peak = read_bandwidth(device, megabytes=256)
    rows = bench_sample(device, [(32, 32768)], [torch.float32, torch.bfloat16], peak_gbps=peak, reps=5,
                        total_bytes=64 * 2**20)
    rows += bench_commit(device, [(8, 256)], reps=10)
    rows += bench_attention(device, [(1, 256, 8, 64)], torch.float32, reps=3)
    return rows, {"read_bandwidth_gbps": peak}


def full_sample(device: torch.device, shapes: list[tuple[int, int]] | None = None) -> tuple[list[Row], dict]:
    # GPU: against device-to-device copy bandwidth (issue 4's yardstick); CPU: a read.
    peak = copy_bandwidth(device, megabytes=1024) if device.type == "cuda" else read_bandwidth(device, megabytes=1024)
    shapes = shapes or [(32, 126464), (256, 126464), (256, 152064)]
    rows = []
    for temperature in (0.0, 1.0):
        rows += bench_sample(device, shapes, [torch.float32, torch.bfloat16], peak_gbps=peak, temperature=temperature,
                             baselines=("reference", "compiled", "llada"))
    return rows, {"read_bandwidth_gbps": peak}


def full_attention(device: torch.device) -> tuple[list[Row], dict]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return bench_attention(device, [(1, 1024, 32, 128)], dtype, flex_attention=True), {}


def full_commit(device: torch.device) -> tuple[list[Row], dict]:
    return bench_commit(device, [(1, 32), (8, 256), (64, 1024)]), {}


__all__ = ["bench_attention", "bench_commit", "bench_sample", "full_attention", "full_commit", "full_sample",
           "math", "quick"]
