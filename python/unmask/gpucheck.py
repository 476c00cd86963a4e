"""One command for a GPU session: every CUDA test and every GPU benchmark, results to a folder.

    python -m unmask.gpucheck --out DIR [--dry-run] [--only tests,sample,commit,attention,generate]
                              [--deadline SECONDS]

GPU time is scarce (a lent machine, minutes at a time), so this is the whole check in one
call, each stage in a process of its own under a time limit that leaves the total inside
one 10-minute command on an H100:
  tests      the GPU test cases (pytest -m gpu: tests/ of the checkout this runs in);
  sample     the sampler at LLaDA's vocabulary against the measured read bandwidth;
  commit     confidence-based unmasking of a block;
  attention  the attention kernel beside every torch SDPA backend and FlexAttention;
  moe        a mixture's routed experts at LLaDA2.0-mini's shape beside torch's products;
  generate   a denoising step at the LLaDA-8B shape with random bf16 weights, against the
             weight-read floor: no cache eager and as a CUDA graph, and the dual cache.
It writes DIR/results.jsonl (the bench rows, as bench/ writes them), DIR/tests.log (the
pytest output, as it runs), DIR/stages.log (the bench stages' output) and DIR/summary.md
(rewritten after every stage, so a run cut short keeps what it did). A stage that fails,
faults the GPU or runs out of its time is reported and the next one starts in a fresh
process. It stops before starting anything when this build cannot run its CUDA kernels.
--dry-run prints the plan (the commands, shapes and limits) and needs no GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

# JAX (probed by the backend report, imported by some tests) takes 75% of a GPU's memory on
# first use unless told not to: the 8B generate stage would not fit beside it.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import torch  # noqa: E402 - after the environment JAX reads

STAGES = ("tests", "sample", "commit", "attention", "moe", "generate")
# Seconds each stage may run (its process is killed past that). Estimates on an H100: the
# tests ~2-3 min, sample ~20 s, commit seconds, attention 1-2 min (two FlexAttention
# compiles), moe ~20 s (weights made on the GPU), generate ~1 min. The sum, 555 s, leaves a
# 10-minute command room to start.
STAGE_LIMITS = {"tests": 210, "sample": 60, "commit": 30, "attention": 120, "moe": 45, "generate": 90}
TEST_TIMEOUT = 120  # seconds per test case, where pytest-timeout is installed
SAMPLE_SHAPES = ((32, 126464), (256, 126464))
COMMIT_SHAPES = ((1, 32), (8, 256), (64, 1024))
# LLaDA2.0-mini's experts (d 2048, 256 of 512, 8 a token) at a 32-token block step, an
# uncached 256-token step and a 2048-token prompt: 1, 8 and 64 pairs an expert.
MOE_SHAPES = ((32, 2048, 256, 512, 8), (256, 2048, 256, 512, 8), (2048, 2048, 256, 512, 8))
LLADA_8B = dict(d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, mlp_hidden_size=12288, vocab_size=126464,
                embedding_size=126464, mask_token_id=126336, eos_token_id=126081)
GENERATE = dict(prompt=256, gen_length=64, block_length=32)


def test_command(root: Path = Path("tests")) -> list[str] | None:
    """The pytest command of the tests stage: the cases marked gpu (tests/conftest.py marks
    every case skipped without a CUDA device), one time limit per case where
    pytest-timeout is installed; None without a tests/ folder."""
    if not (root / "conftest.py").exists():
        return None
    command = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-m", "gpu", str(root)]
    try:
        import pytest_timeout  # noqa: F401

        command += [f"--timeout={TEST_TIMEOUT}"]
    except ImportError:
        pass
    return command


def stage_command(stage: str, out: Path) -> list[str]:
    """A bench stage runs in a process of its own: a GPU fault or a hang ends it alone."""
    return [sys.executable, "-m", "unmask.gpucheck", "--out", str(out), "--stage", stage]


def plan(out: Path) -> dict[str, str]:
    """What each stage runs (--dry-run prints this)."""
    tests = test_command()
    described = {
        "tests": " ".join(tests) if tests else "(no tests/ folder here: run from the repository's root)",
        "sample": f"unmask.ops.sample beside the eager reference, float32 and bfloat16, T = 0 and 1, shapes "
                  f"{list(SAMPLE_SHAPES)}, against the read bandwidth measured over 1 GiB",
        "commit": f"unmask.ops.commit and the eager reference, k / threshold / factor, shapes {list(COMMIT_SHAPES)}",
        "attention": "bf16, D = 128, H = 32: lengths 1k-8k plain, 2k and 8k block-causal 32 + padding, "
                     "32 and 128 queries against 4096 cached keys (MHA and GQA); torch SDPA's flash, efficient "
                     "and cuDNN backends, FlexAttention; the bf16 matmul rate and the copy bandwidth",
        "moe": f"unmask.ops.moe_swiglu beside torch's products one expert at a time, bf16, (T, d, E, f, k) "
               f"{list(MOE_SHAPES)}, against the read bandwidth measured over 1 GiB",
        "generate": f"LLaDA-8B shape {LLADA_8B}, random bf16 weights, prompt {GENERATE['prompt']}, "
                    f"{GENERATE['gen_length']} tokens in blocks of {GENERATE['block_length']}, one per step; "
                    "no cache and dual cache, each eager and with cuda_graph=True, each after a warm-up run "
                    "of the same arguments; the weight-read floor (the weights a step reads)",
    }
    return {stage: f"[limit {STAGE_LIMITS[stage]} s] {described[stage]}"
            + ("" if stage == "tests" else f"\n{'':11}as: {' '.join(stage_command(stage, out))}")
            for stage in STAGES}


def preflight() -> str | None:
    """Why this build cannot check the GPU (None when it can): without a device, CUDA kernels
    or a sample call routed to them, every GPU case would skip and the run report success."""
    if not torch.cuda.is_available():
        return "no CUDA device visible (use --dry-run to see the plan)"
    from unmask import native, ops

    if not native.available() or not native._C.cuda_compiled():
        return "this build has no CUDA kernels (install with nvcc on PATH; UNMASK_CUDA=ON makes it an error)"
    logits = torch.zeros(2, 8, device="cuda")
    backend = ops.backend_for("sample", logits)
    if backend != "cuda":
        return f"a CUDA sample call runs on {backend!r}, not the CUDA kernel ({ops.fallback_reason('sample', logits)})"
    return None


def run_logged(command: list[str], log_path: Path, limit: float, *, mode: str, header: str = "") -> int | None:
    """command's exit status, its output written (mode "w") or appended ("a") to log_path
    as it runs (a run cut short keeps it); None when it ran past `limit` seconds and was
    killed."""
    with open(log_path, mode) as log:
        log.write(header)
        log.flush()
        try:
            return subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, timeout=limit).returncode
        except subprocess.TimeoutExpired:
            return None


def run_tests(out: Path, limit: float) -> dict:
    command = test_command()
    if command is None:
        return {"failed": "no tests/ folder here: run from the repository's root"}
    code = run_logged(command, out / "tests.log", limit, mode="w")
    if code is None:
        return {"failed": f"pytest ran past its {limit:.0f} s limit (tests.log holds what it printed)"}
    lines = [line for line in (out / "tests.log").read_text().splitlines() if line.strip()]
    return {"exit_code": code, "summary": lines[-1] if lines else ""}


def run_stage(stage: str, out: Path, limit: float) -> dict:
    code = run_logged(stage_command(stage, out), out / "stages.log", limit, mode="a", header=f"\n===== {stage}\n")
    if code is None:
        return {"failed": f"ran past its {limit:.0f} s limit (stages.log holds what it printed)"}
    table = out / f".{stage}.md"
    text = table.read_text() if table.exists() else ""
    table.unlink(missing_ok=True)
    return {"exit_code": code, "table": text} if code == 0 else {"failed": f"exit status {code} (see stages.log)"}


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


def bench_moe(device: torch.device) -> list:
    from unmask.benchmarks import harness, suites

    return suites.bench_moe(device, harness.read_bandwidth(device, megabytes=1024), shapes=MOE_SHAPES)


def step_weight_bytes(model) -> int:
    """The weights a denoising step reads: every parameter but the input embedding (a step
    gathers a few hundred of its rows), unless the LM head is that same tensor."""
    embedding = model.embed.weight
    tied = model.lm_head.weight is embedding
    return sum(p.numel() * p.element_size() for p in model.parameters() if tied or p is not embedding)


def bench_generate(device: torch.device) -> list:
    import unmask
    from unmask.benchmarks import harness

    config = unmask.ModelConfig(**LLADA_8B)
    model = unmask.DiffusionTransformer.random(config, seed=0, std=0.02, dtype=torch.bfloat16, device=device)
    floor_ms = step_weight_bytes(model) / harness.read_bandwidth(device, megabytes=1024) / 1e6  # B / (GB/s) -> ms
    prompt = torch.randint(0, 126000, (1, GENERATE["prompt"]), generator=torch.Generator().manual_seed(0))
    rows, tokens = [], {}
    for cache, cuda_graph in ((None, False), (None, True), ("dual", False), ("dual", True)):
        arguments = dict(gen_length=GENERATE["gen_length"], block_length=GENERATE["block_length"],
                         steps=GENERATE["gen_length"], cache=cache, cuda_graph=cuda_graph, stop_at_eos=False)
        unmask.generate(model, prompt.to(device), **arguments)  # warm-up: the same shapes, kernels and graphs
        out = unmask.generate(model, prompt.to(device), **arguments)
        tokens[cache, cuda_graph] = out.tokens
        step_ms = out.seconds / out.nfe * 1e3
        rows.append(harness.Row("generate", f"unmask cache={cache} cuda_graph={cuda_graph}",
                                {"shape": "llada-8b", **GENERATE}, "bfloat16", step_ms,
                                fraction_of_peak=floor_ms / step_ms, peak="weight-read floor per step",
                                extra={"floor_ms": floor_ms, "nfe": out.nfe, "cuda_graph": cuda_graph,
                                       # the dual cache is an approximation: other tokens than no cache are expected
                                       "same_tokens_as_eager_no_cache": bool(torch.equal(tokens[None, False],
                                                                                         out.tokens)),
                                       "same_tokens_as_eager_same_cache": bool(torch.equal(tokens[cache, False],
                                                                                           out.tokens))}))
    return rows


BENCHES: dict[str, Callable[[torch.device], list]] = {
    "sample": bench_sample, "commit": bench_commit, "attention": bench_attention, "moe": bench_moe,
    "generate": bench_generate,
}


def bench_stage(stage: str, out: Path) -> int:
    """The child process of one bench stage: its rows appended to results.jsonl, its table
    left for the parent's summary."""
    from unmask.benchmarks import harness

    device = torch.device("cuda")
    rows = BENCHES[stage](device)
    harness.write_rows(rows, device, out / "results.jsonl")
    (out / f".{stage}.md").write_text(f"{len(rows)} rows\n\n" + harness.format_table(rows))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m unmask.gpucheck", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for results.jsonl, the logs, summary.md")
    parser.add_argument("--dry-run", action="store_true", help="list what would run; no GPU needed")
    parser.add_argument("--only", default=",".join(STAGES), help=f"comma-separated stages of {STAGES}")
    parser.add_argument("--deadline", type=float, default=560.0,
                        help="seconds from the start after which no stage starts, and a stage's limit is cut to "
                             "what is left (default 560: inside a 10-minute command)")
    parser.add_argument("--stage", choices=tuple(BENCHES), help=argparse.SUPPRESS)  # a bench stage's own process
    args = parser.parse_args(argv)
    if args.stage:
        return bench_stage(args.stage, args.out)
    stages = [stage.strip() for stage in args.only.split(",") if stage.strip()]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        parser.error(f"--only: unknown stages {unknown}; choose from {STAGES}")
    if args.dry_run:
        described = plan(args.out)
        for stage in stages:
            print(f"{stage:<10} {described[stage]}")
        print(f"{'':<10} total limit {sum(STAGE_LIMITS[s] for s in stages)} s, deadline {args.deadline:.0f} s")
        return 0
    refused = preflight()
    if refused is not None:
        print(f"unmask.gpucheck: {refused}", file=sys.stderr)
        return 2
    from unmask.benchmarks import harness
    from unmask.cli import backend_status

    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda")
    summary = [f"# unmask.gpucheck on {harness.device_name(device)}, commit {harness.git_commit()}", ""]
    summary += [f"- {name}: {state} ({detail})" for name, state, detail in backend_status()]
    status = 0
    for stage in stages:
        left = args.deadline - (time.perf_counter() - started)
        if left < 10:
            status |= 1
            summary += ["", f"## {stage}", "", f"not started: {args.deadline:.0f} s deadline reached"]
            continue
        limit = min(STAGE_LIMITS[stage], left)
        stage_started = time.perf_counter()
        result = run_tests(args.out, limit) if stage == "tests" else run_stage(stage, args.out, limit)
        status |= 1 if "failed" in result or result.get("exit_code") else 0
        line = result.pop("table", None) or json.dumps(result)
        elapsed = time.perf_counter() - stage_started
        summary += ["", f"## {stage} ({elapsed:.0f} s)", "", line]
        (args.out / "summary.md").write_text("\n".join(summary) + "\n")
        print(f"{stage}: {elapsed:.0f} s", flush=True)
    (args.out / "summary.md").write_text("\n".join(summary) + "\n")
    print("\n".join(summary))
    return status


if __name__ == "__main__":
    sys.exit(main())
