"""Tensor-parallel scaling: the time of one denoising step (the model over the canvas,
LM head on the active block, sampling across the ranks) against the number of ranks.

    python bench/distributed.py [--device cpu|cuda] [--ranks 1 2 4 8] [--no-save]

Each rank count runs under torchrun (gloo on CPU, NCCL on GPUs); the CPU's cores are
divided between the ranks, so on CPU this records the cost of the collectives more
than a speed-up. Rank 0 reports the median over warmed-up steps.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from _common import report  # noqa: E402

SHAPES = {
    # name: (config fields, canvas length, block length)
    "small": (dict(d_model=512, n_layers=4, n_heads=8, n_kv_heads=8, mlp_hidden_size=1408, vocab_size=32000,
                   embedding_size=32000, mask_token_id=31999, eos_token_id=31998), 320, 32),
    "llada-8b": (dict(d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, mlp_hidden_size=12288,
                      vocab_size=126464, embedding_size=126464), 512, 32),
}


def worker(args: argparse.Namespace) -> None:
    import unmask
    from unmask import distributed
    from unmask.benchmarks import harness

    mesh = distributed.init(args.device)
    fields, length, block = SHAPES[args.shape]
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    model = unmask.DiffusionTransformer.random(unmask.ModelConfig(**fields), seed=0, std=0.05, dtype=dtype)
    model = distributed.tensor_parallel(model, mesh)
    device = model.embed.weight.device
    canvas = torch.randint(0, fields["vocab_size"] - 2, (1, length), generator=torch.Generator().manual_seed(0)).to(device)
    start = length - 8 * block

    def step(i: int):
        with torch.inference_mode():
            logits = model(canvas, logit_positions=slice(start, start + block))
            return model.vocab_shard.sample(logits, banned=[fields["mask_token_id"]], seed=0, offset=i, check=False)

    torch.distributed.barrier()
    seconds = harness.median_seconds(step, device, warmup=2, reps=10, max_seconds=30.0)
    if torch.distributed.get_rank() == 0:
        Path(args.worker_out).write_text(json.dumps({"seconds": seconds, "threads": torch.get_num_threads()}))
    distributed.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", choices=sorted(SHAPES))
    parser.add_argument("--ranks", type=int, nargs="+")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--no-save", action="store_true")
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.shape = args.shape or ("llada-8b" if args.device == "cuda" else "small")
    if args.worker_out:
        worker(args)
        return

    from unmask.benchmarks import harness

    available = torch.cuda.device_count() if args.device == "cuda" else os.cpu_count()
    ranks = args.ranks or [n for n in (1, 2, 4, 8) if n <= available]
    fields, length, block = SHAPES[args.shape]
    rows, baseline = [], None
    for n in ranks:
        with tempfile.TemporaryDirectory() as scratch:
            result = Path(scratch) / "result.json"
            env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // n))}
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n),
                       __file__, "--device", args.device, "--shape", args.shape, "--worker-out", str(result)]
            subprocess.run(command, check=True, env=env, cwd=ROOT)
            measured = json.loads(result.read_text())
        baseline = baseline or measured["seconds"]
        rows.append(harness.Row("tp-step", f"tensor parallel x{n}", {"L": length, "block": block, "shape": args.shape,
                                                                    "ranks": n},
                                str(torch.bfloat16 if args.device == "cuda" else torch.float32).removeprefix("torch."),
                                measured["seconds"] * 1e3, speedup_vs_baseline=baseline / measured["seconds"],
                                extra={"threads_per_rank": measured["threads"]}))
    report(args, rows, {})


if __name__ == "__main__":
    main()
