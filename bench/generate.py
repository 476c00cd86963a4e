"""Whole-generation benchmark: one denoising step and tokens per second, unmask (no cache,
prefix, dual) against LLaDA's published loop (eager, SDPA, full-canvas logits).

    python bench/generate.py [--device cpu|cuda] [--shape small|llada-8b] [--no-save]

The LLaDA-8B shape (random bf16 weights) needs a GPU; on the CPU the small shape runs.
The weight-read floor is the time to read every weight once at the measured copy
bandwidth: a step of a bandwidth-bound model cannot be faster.
"""

import argparse
import time
from pathlib import Path

import torch

import unmask
from unmask.benchmarks import harness
from unmask.benchmarks.llada_baseline import llada_generate

SHAPES = {
    # name: (config fields, prompt length)
    "small": (dict(d_model=256, n_layers=4, n_heads=4, n_kv_heads=4, mlp_hidden_size=704, vocab_size=8192,
                   embedding_size=8192, mask_token_id=8191, eos_token_id=8190), 64),
    "llada-8b": (dict(d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, mlp_hidden_size=12288,
                      vocab_size=126464, embedding_size=126464), 256),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", choices=sorted(SHAPES), default=None)
    parser.add_argument("--gen-length", type=int, default=256)
    parser.add_argument("--block-length", type=int, default=32)
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    shape = args.shape or ("llada-8b" if device.type == "cuda" else "small")
    fields, prompt_len = SHAPES[shape]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = unmask.DiffusionTransformer.random(unmask.ModelConfig(**fields), seed=0, std=0.05, dtype=dtype,
                                               device=device)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bandwidth = harness.copy_bandwidth(device) / 2  # read bandwidth share of a copy
    floor_ms = weight_bytes / bandwidth / 1e6
    prompt = torch.randint(0, fields["vocab_size"] - 2, (1, prompt_len), generator=torch.Generator().manual_seed(0)).to(device)
    gen, block = args.gen_length, args.block_length
    rows = []

    def record(impl, seconds, nfe, agreement=None):
        step_ms = seconds / nfe * 1e3
        rows.append(harness.Row(
            "generate", impl, {"shape": shape, "P": prompt_len, "G": gen, "block": block}, str(dtype)[6:],
            step_ms, fraction_of_peak=floor_ms / step_ms, peak="weight-read floor per step",
            extra={"tokens_per_second": gen / seconds, "nfe": nfe, "floor_ms": floor_ms,
                   "token_agreement_with_uncached": agreement},
        ))

    harness.synchronize(device)
    started = time.perf_counter()
    _, calls = llada_generate(model, prompt, steps=gen, gen_length=gen, block_length=block)
    harness.synchronize(device)
    record("LLaDA published loop", time.perf_counter() - started, calls)

    uncached = None
    variants = [(None, False), ("prefix", False), ("dual", False)]
    if device.type == "cuda":
        variants.insert(1, (None, True))  # the step captured once and replayed
    for cache, cuda_graph in variants:
        out = unmask.generate(model, prompt, gen_length=gen, block_length=block, steps=gen, cache=cache,
                              cuda_graph=cuda_graph, stop_at_eos=False)
        uncached = out.tokens if cache is None and not cuda_graph else uncached
        agreement = float((out.tokens == uncached).float().mean())
        record(f"unmask cache={cache}" + (" cuda_graph" if cuda_graph else ""), out.seconds, out.nfe, agreement)

    baseline = rows[0].median_ms
    for row in rows:
        row.speedup_vs_baseline = baseline / row.median_ms
    print(f"device: {harness.device_name(device)}  commit: {harness.git_commit()}")
    print(f"weights {weight_bytes / 1e9:.3f} GB; read bandwidth {bandwidth:.1f} GB/s; floor {floor_ms:.3f} ms/step")
    print(harness.format_table(rows))
    for row in rows:
        print(f"  {row.impl:<24} {row.extra['tokens_per_second']:8.1f} tokens/s  agreement {row.extra['token_agreement_with_uncached']}")
    if not args.no_save:
        harness.write_rows(rows, device, Path(__file__).resolve().parent / "results" / f"{device.type}.jsonl")


if __name__ == "__main__":
    main()
