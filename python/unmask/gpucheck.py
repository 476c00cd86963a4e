"""One command for a GPU session: every CUDA test and every GPU benchmark, results to a folder.

    python -m unmask.gpucheck --out DIR [--dry-run] [--only tests,sample,commit,attention,generate]

GPU time is scarce (a lent machine, minutes at a time), so this is the whole check in one
call, sized to finish in about 6 minutes on an H100:
  tests      the CUDA suites (tests/ of the checkout this runs in) on the GPU;
  sample     the sampler at LLaDA's vocabulary against the measured read bandwidth;
  commit     confidence-based unmasking of a block;
  attention  the attention kernel beside every torch SDPA backend and FlexAttention;
  generate   a denoising step at the LLaDA-8B shape with random bf16 weights, against the
             weight-read floor: no cache eager and as a CUDA graph, and the dual cache.
It writes DIR/results.jsonl (the bench rows, as bench/ writes them), DIR/tests.log (the
pytest output) and DIR/summary.md. --dry-run lists what it would run, with shapes, and
needs no GPU.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

STAGES = ("tests", "sample", "commit", "attention", "generate")
SAMPLE_SHAPES = ((32, 126464), (256, 126464))
COMMIT_SHAPES = ((1, 32), (8, 256), (64, 1024))
LLADA_8B = dict(d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, mlp_hidden_size=12288, vocab_size=126464,
                embedding_size=126464, mask_token_id=126336, eos_token_id=126081)
GENERATE = dict(prompt=256, gen_length=64, block_length=32)


def gpu_test_files(root: Path = Path("tests")) -> list[str]:
    """The test files with GPU cases (marked requires_gpu or run by the cuda_runner fixture)."""
    return sorted(str(path) for path in root.glob("test_*.py")
                  if any(mark in path.read_text() for mark in ("requires_gpu", "cuda_runner")))


def plan() -> dict[str, str]:
    """What each stage runs, in words (--dry-run prints this)."""
    files = gpu_test_files()
    return {
        "tests": f"pytest -k 'not interpreter' {' '.join(files) if files else '(no tests/ folder here)'}",
        "sample": f"unmask.ops.sample beside the eager reference, float32 and bfloat16, T = 0 and 1, shapes "
                  f"{list(SAMPLE_SHAPES)}, against the measured read bandwidth",
        "commit": f"unmask.ops.commit and the eager reference, k / threshold / factor, shapes {list(COMMIT_SHAPES)}",
        "attention": "bf16, D = 128, H = 32: lengths 1k-8k plain, 2k and 8k block-causal 32 + padding, "
                     "32 and 128 queries against 4096 cached keys (MHA and GQA); every SDPA backend, FlexAttention",
        "generate": f"LLaDA-8B shape {LLADA_8B}, random bf16 weights, prompt {GENERATE['prompt']}, "
                    f"{GENERATE['gen_length']} tokens in blocks of {GENERATE['block_length']}, one per step; "
                    "no cache and dual cache, each eager and with cuda_graph=True; the weight-read floor",
    }


def run_tests(out: Path) -> dict:
    files = gpu_test_files()
    if not files:
        return {"skipped": "no tests/ folder here: run from the repository's root"}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "not interpreter", *files]
    result = subprocess.run(command, capture_output=True, text=True)
    (out / "tests.log").write_text(result.stdout + result.stderr)
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    return {"exit_code": result.returncode, "summary": lines[-1] if lines else ""}


def bench_sample(device: torch.device) -> list:
    from unmask.benchmarks import harness, suites

    peak = harness.read_bandwidth(device, megabytes=1024)
    rows = []
    for temperature in (0.0, 1.0):
        rows += suites.bench_sample(device, list(SAMPLE_SHAPES), [torch.float32, torch.bfloat16], peak_gbps=peak,
                                    temperature=temperature, baselines=("reference",))
    return rows


def bench_commit(device: torch.device) -> list:
    from unmask.benchmarks import suites

    return suites.bench_commit(device, list(COMMIT_SHAPES))


def bench_attention(device: torch.device) -> list:
    from unmask.benchmarks import suites

    rows, _ = suites.bench_attention_gpu(device)
    return rows


def bench_generate(device: torch.device) -> list:
    import unmask
    from unmask.benchmarks import harness

    config = unmask.ModelConfig(**LLADA_8B)
    model = unmask.DiffusionTransformer.random(config, seed=0, std=0.02, dtype=torch.bfloat16, device=device)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    floor_ms = weight_bytes / harness.read_bandwidth(device, megabytes=1024) / 1e6  # bytes / (GB/s) -> ms
    prompt = torch.randint(0, 126000, (1, GENERATE["prompt"]), generator=torch.Generator().manual_seed(0))
    rows, tokens = [], {}
    for cache, cuda_graph in ((None, False), (None, True), ("dual", False), ("dual", True)):
        arguments = dict(gen_length=GENERATE["gen_length"], block_length=GENERATE["block_length"],
                         steps=GENERATE["gen_length"], cache=cache, cuda_graph=cuda_graph, stop_at_eos=False)
        unmask.generate(model, prompt.to(device), **{**arguments, "gen_length": GENERATE["block_length"],
                                                     "steps": GENERATE["block_length"]})  # warm-up
        out = unmask.generate(model, prompt.to(device), **arguments)
        tokens[cache, cuda_graph] = out.tokens
        step_ms = out.seconds / out.nfe * 1e3
        rows.append(harness.Row("generate", f"unmask cache={cache} cuda_graph={cuda_graph}",
                                {"shape": "llada-8b", **GENERATE}, "bfloat16", step_ms,
                                fraction_of_peak=floor_ms / step_ms, peak="weight-read floor per step",
                                extra={"floor_ms": floor_ms, "nfe": out.nfe, "cuda_graph": cuda_graph,
                                       "same_tokens_as_eager_no_cache": bool(torch.equal(tokens[None, False],
                                                                                         out.tokens)),
                                       "same_tokens_as_eager_same_cache": bool(torch.equal(tokens[cache, False],
                                                                                           out.tokens))}))
    return rows


BENCHES: dict[str, Callable[[torch.device], list]] = {
    "sample": bench_sample, "commit": bench_commit, "attention": bench_attention, "generate": bench_generate,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m unmask.gpucheck", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for results.jsonl, tests.log, summary.md")
    parser.add_argument("--dry-run", action="store_true", help="list what would run; no GPU needed")
    parser.add_argument("--only", default=",".join(STAGES), help=f"comma-separated stages of {STAGES}")
    args = parser.parse_args(argv)
    stages = [stage.strip() for stage in args.only.split(",") if stage.strip()]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        parser.error(f"--only: unknown stages {unknown}; choose from {STAGES}")
    if args.dry_run:
        for stage in stages:
            print(f"{stage:<10} {plan()[stage]}")
        return 0
    if not torch.cuda.is_available():
        print("unmask.gpucheck: no CUDA device visible (use --dry-run to see the plan)", file=sys.stderr)
        return 2
    from unmask.benchmarks import harness
    from unmask.cli import backend_status

    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda")
    summary = [f"# unmask.gpucheck on {harness.device_name(device)}, commit {harness.git_commit()}", ""]
    summary += [f"- {name}: {state} ({detail})" for name, state, detail in backend_status()]
    status = 0
    for stage in stages:
        started = time.perf_counter()
        try:
            if stage == "tests":
                result = run_tests(args.out)
                status |= 1 if result.get("exit_code", 0) else 0
                line = json.dumps(result)
            else:
                rows = BENCHES[stage](device)
                harness.write_rows(rows, device, args.out / "results.jsonl")
                line = f"{len(rows)} rows\n\n" + harness.format_table(rows)
        except Exception as error:  # noqa: BLE001 - a failed stage is reported, the others still run
            status |= 1
            line = f"failed: {type(error).__name__}: {error}"
        elapsed = time.perf_counter() - started
        summary += ["", f"## {stage} ({elapsed:.0f} s)", "", line]
        print(f"{stage}: {elapsed:.0f} s", flush=True)
        torch.cuda.empty_cache()
    (args.out / "summary.md").write_text("\n".join(summary) + "\n")
    print("\n".join(summary))
    return status


if __name__ == "__main__":
    sys.exit(main())
