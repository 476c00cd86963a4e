"""The SIMT interpreter's speed: CUDA threads and fiber switches per second on one core,
for each CUDA kernel at a few shapes, so tests of the interpreted kernels can be sized.

    python bench/simt.py [--out FILE] [--no-save]

Each case runs once after a warm-up; the interpreter's own counters (unmask._C.simt_stats)
give threads, switches and the seconds spent inside launches.
"""

import argparse
from pathlib import Path

import torch

from unmask import native, validation
from unmask.benchmarks import harness

RESULTS = Path(__file__).resolve().parent / "results"


def cases():
    gen = torch.Generator().manual_seed(0)

    def randn(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=gen).to(dtype)

    for n, vocab in ((32, 126464), (256, 4096)):
        logits = randn(n, vocab, dtype=torch.bfloat16)
        yield "sample", {"N": n, "V": vocab, "T": 1.0}, "bfloat16", validation.sample_call(
            logits, temperature=1.0, check=False)
    for batch, length in ((8, 256), (64, 1024)):
        canvas = torch.zeros(batch, length, dtype=torch.int64)
        yield "commit", {"B": batch, "L": length}, "int64", validation.commit_call(
            canvas, canvas, torch.rand(batch, length, generator=gen), torch.ones(batch, length, dtype=torch.bool),
            threshold=0.9)
    for q_len, k_len, head_dim in ((130, 300, 64), (130, 300, 128), (32, 4096, 128)):
        q = randn(2, q_len, 8, head_dim, dtype=torch.bfloat16)
        k, v = (randn(2, k_len, 2, head_dim, dtype=torch.bfloat16) for _ in range(2))
        yield "attention", {"B": 2, "Lq": q_len, "Lk": k_len, "H": 8, "Hkv": 2, "D": head_dim}, "bfloat16", \
            validation.attention_call(q, k, v, block_size=32, q_offset=k_len - q_len)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="JSON lines file (default bench/results/cpu.jsonl)")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()
    if not native.interpreter_available():
        raise SystemExit("this build has no SIMT interpreter (GCC on x86-64 Linux)")
    rows = []
    for kernel, shape, dtype, call in cases():
        backend = native.interpreted_kernels()[(kernel, "cpu")]
        backend(call)  # warm-up: fiber stacks mapped, pages touched
        native._C.simt_reset_stats()
        backend(call)
        stats = native._C.simt_stats()
        threads_per_second = stats["threads"] / stats["seconds"]
        rows.append(harness.Row("simt", f"{kernel} (interpreted)", shape, dtype, stats["seconds"] * 1e3, extra={
            "threads": stats["threads"], "blocks": stats["blocks"], "switches": stats["switches"],
            "threads_per_second": threads_per_second, "switches_per_second": stats["switches"] / stats["seconds"],
            "sm_count": native._C.simt_sm_count()}))
        print(f"{kernel:<10} {str(shape):<58} {stats['seconds'] * 1e3:9.1f} ms  {stats['threads']:>8} threads  "
              f"{threads_per_second:10.0f} threads/s  {stats['switches'] / stats['seconds']:12.0f} switches/s")
    device = torch.device("cpu")
    print(f"device: {harness.device_name(device)}  commit: {harness.git_commit()}")
    if not args.no_save:
        out = args.out or RESULTS / "cpu.jsonl"
        harness.write_rows(rows, device, out)
        print(f"appended {len(rows)} rows to {out}")


if __name__ == "__main__":
    main()
