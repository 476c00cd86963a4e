"""Whole-generation benchmark: one denoising step and tokens per second, unmask against
the loops users would otherwise run, cache mode by cache mode (none, prefix, dual): the
Fast-dLLM loop of the same mode (unmask.benchmarks.fastdllm_baseline: eager, SDPA,
float64 softmax over every position the model returns, the cache refilled at every
block, the mask id banned as unmask's sampler bans it) and LLaDA's published loop (no cache).

    python bench/generate.py [--device cpu|cuda] [--shape small|medium|bundled|llada-8b]
                             [--dtype float32|bfloat16] [--compile] [--no-save]

Each step is also set against the step's matrix products measured alone, in turn with
the generations (every projection of every layer at the step's token count, and the LM
head on the block, with the model's own weights): a step that costs little more than
them has little left to fuse. --compile adds unmask with generate(..., compile=True) to
each pair (its compilation, in a warm-up generate, is not timed). On a GPU the LLaDA-8B
shape (random bf16 weights) runs and the weight-read floor (every weight read once at
the measured copy bandwidth) is reported.
"""

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import unmask
from unmask.benchmarks import harness
from unmask.benchmarks.fastdllm_baseline import fastdllm_generate
from unmask.benchmarks.llada_baseline import llada_generate

BUNDLED = Path(unmask.__file__).resolve().parent / "data" / "default_model"
SHAPES = {
    # name: (config fields, prompt length, generated length)
    "small": (dict(d_model=256, n_layers=4, n_heads=4, n_kv_heads=4, mlp_hidden_size=704, vocab_size=8192,
                   embedding_size=8192, mask_token_id=8191, eos_token_id=8190), 64, 256),
    # LLaDA-8B's proportions (head dim 64-128, MLP 3x, 32K+ vocabulary) scaled to a 2-core CPU
    "medium": (dict(d_model=1024, n_layers=8, n_heads=16, n_kv_heads=16, mlp_hidden_size=3072, vocab_size=32000,
                    embedding_size=32000, mask_token_id=31999, eos_token_id=31998), 64, 128),
    # the bundled model's configuration (d_model 128, 4 layers, head dim 32), random weights
    "bundled": (None, 64, 128),
    "llada-8b": (dict(d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, mlp_hidden_size=12288,
                      vocab_size=126464, embedding_size=126464), 256, 256),
}
CACHES = (None, "prefix", "dual")


def model_config(shape: str) -> unmask.ModelConfig:
    fields = SHAPES[shape][0]
    if fields is None:
        known = set(unmask.ModelConfig.__dataclass_fields__)
        saved = json.loads((BUNDLED / "config.json").read_text())
        fields = {name: value for name, value in saved.items() if name in known}
    return unmask.ModelConfig(**fields)


def segment_lengths(cache: str | None, prompt_len: int, gen: int, block: int, steps_per_block: int) -> list[int]:
    """Positions the model computes at each call of a generation (unmask and Fast-dLLM alike)."""
    total, lengths = prompt_len + gen, []
    for b in range(gen // block):
        begin = prompt_len + b * block
        for step in range(steps_per_block):
            lengths.append(total if cache is None or step == 0 else block if cache == "dual" else total - begin)
    return lengths


def matmul_products(model: unmask.DiffusionTransformer, tokens: int, block: int, device: torch.device):
    """The step's matrix products alone, as a function: every projection of every layer
    over `tokens` positions and the LM head over `block` positions (unmask's step: the
    block; the Fast-dLLM loop's: every position it computes), with the model's weights,
    in the step's order."""
    config = model.config
    x = torch.randn(1, tokens, config.d_model, dtype=model.embed.weight.dtype, device=device)
    hidden = torch.randn(1, tokens, config.mlp_hidden_size, dtype=x.dtype, device=device)

    @torch.inference_mode()
    def products(i=0):
        for layer in model.layers:
            for projection in (layer.q_proj, layer.k_proj, layer.v_proj, layer.o_proj, layer.gate_proj,
                               layer.up_proj):
                F.linear(x, projection.weight)
            F.linear(hidden, layer.down_proj.weight)
        return F.linear(x[:, :block], model.lm_head.weight)

    return products


def products_in_turn(functions: dict[tuple[int, int], object], seconds: dict[tuple[int, int], list[float]],
                     device: torch.device):
    """A round of the products of every distinct (step length, LM head length), each the
    median of three timed calls (appended to seconds[key]): timed in turn with the
    generations, so the step and its products meet the machine at the same speed (it
    drifts by 10-40%)."""
    def run(i):
        for key, products in functions.items():
            seconds.setdefault(key, []).append(harness.median_seconds(products, device, warmup=0, reps=3))
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", choices=sorted(SHAPES), default=None)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None)
    parser.add_argument("--gen-length", type=int, default=None)
    parser.add_argument("--block-length", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per pair; medians reported")
    parser.add_argument("--compile", action="store_true", help="also time generate(..., compile=True)")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    shape = args.shape or ("llada-8b" if device.type == "cuda" else "small")
    _, prompt_len, default_gen = SHAPES[shape]
    dtype = getattr(torch, args.dtype) if args.dtype else torch.bfloat16 if device.type == "cuda" else torch.float32
    config = model_config(shape)
    model = unmask.DiffusionTransformer.random(config, seed=0, std=0.05, dtype=dtype, device=device)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    gen, block = args.gen_length or default_gen, args.block_length
    ordinary = torch.tensor([i for i in range(config.vocab_size) if i not in (config.mask_token_id, config.eos_token_id)])
    prompt = ordinary[torch.randint(0, len(ordinary), (1, prompt_len), generator=torch.Generator().manual_seed(0))]
    prompt = prompt.to(device)
    steps_per_block = block  # one token per step, LLaDA's and Fast-dLLM's schedule with steps = gen_length
    shape_fields = {"shape": shape, "P": prompt_len, "G": gen, "block": block, "d_model": config.d_model,
                    "layers": config.n_layers, "V": config.vocab_size}
    floor_ms = None
    if device.type == "cuda":
        floor_ms = weight_bytes / (harness.copy_bandwidth(device) / 2) / 1e6
    rows = []

    def record(impl, seconds, nfe, *, products_ms, agreement, baseline_ms):
        step_ms = seconds / nfe * 1e3
        extra = {"tokens_per_second": gen / seconds, "nfe": nfe, "matmul_ms_per_step": products_ms,
                 "step_over_matmuls": step_ms / products_ms, "token_agreement_with_fastdllm": agreement}
        if floor_ms is not None:
            extra["weight_read_floor_ms"] = floor_ms
        rows.append(harness.Row("generate", impl, shape_fields, str(dtype)[6:], step_ms,
                                fraction_of_peak=products_ms / step_ms, peak="the step's matrix products alone",
                                speedup_vs_baseline=None if baseline_ms is None else baseline_ms / step_ms,
                                extra=extra))

    # by (positions a call computes, positions its LM head reads): one entry per round
    products_seconds: dict[tuple[int, int], list[float]] = {}

    def products_ms(lengths: list[tuple[int, int]]) -> float:
        for key in lengths:
            if key not in products_seconds:  # a length no timed round met (the LLaDA loop's)
                products_seconds[key] = [harness.median_seconds(matmul_products(model, *key, device), device,
                                                                warmup=2, reps=7)]
        return statistics.mean(statistics.median(products_seconds[key]) for key in lengths) * 1e3

    for cache in CACHES:
        lengths = segment_lengths(cache, prompt_len, gen, block, steps_per_block)
        outputs = {}  # the last run's (tokens, model calls) of each side

        def baseline(i):
            outputs["baseline"] = fastdllm_generate(model, prompt, steps=gen, gen_length=gen, block_length=block,
                                                    cache=cache)

        def ours(i, compile=False):
            out = unmask.generate(model, prompt, gen_length=gen, block_length=block, steps=gen, cache=cache,
                                  stop_at_eos=False, compile=compile)
            outputs["compiled" if compile else "ours"] = out.tokens, out.nfe

        # unmask's LM head reads the block; the loop's every position it computes
        ours_lengths = [(n, block) for n in lengths]
        loop_lengths = [(n, n) for n in lengths]
        products = {key: matmul_products(model, *key, device) for key in sorted(set(ours_lengths + loop_lengths))}
        for function in products.values():
            function()  # warm-up
        products_seconds.clear()  # this mode's rounds only
        timed = [baseline, ours, products_in_turn(products, products_seconds, device)]
        if args.compile:
            timed.append(lambda i: ours(i, compile=True))
            timed[-1](-1)  # compiles this cache mode's graphs
        baseline(-1)  # a warm-up run of each generation (the products were warmed above)
        ours(-1)
        # in turns, a round each: the machine's speed drifts
        baseline_seconds, our_seconds, _, *compiled_seconds = harness.alternating_median_seconds(
            timed, device, warmup=0, reps=args.rounds, max_seconds=math.inf)
        (reference_tokens, baseline_nfe), (our_tokens, our_nfe) = outputs["baseline"], outputs["ours"]
        agreement = float((our_tokens == reference_tokens).float().mean())
        baseline_step_ms = baseline_seconds / baseline_nfe * 1e3
        record(f"Fast-dLLM loop cache={cache}", baseline_seconds, baseline_nfe, products_ms=products_ms(loop_lengths),
               agreement=1.0, baseline_ms=baseline_step_ms)
        record(f"unmask cache={cache}", our_seconds, our_nfe, products_ms=products_ms(ours_lengths),
               agreement=agreement, baseline_ms=baseline_step_ms)
        print(f"cache={cache}: Fast-dLLM {baseline_step_ms:.2f} ms/step, unmask {rows[-1].median_ms:.2f} ms/step "
              f"(x{rows[-1].speedup_vs_baseline:.2f}), matrix products {rows[-1].extra['matmul_ms_per_step']:.2f} ms "
              f"(step {rows[-1].extra['step_over_matmuls']:.2f}x), same tokens {agreement:.3f}", flush=True)
        if compiled_seconds:
            compiled_tokens, compiled_nfe = outputs["compiled"]
            record(f"unmask cache={cache} compile=True", compiled_seconds[0], compiled_nfe,
                   products_ms=products_ms(ours_lengths), agreement=float((compiled_tokens == reference_tokens).float().mean()),
                   baseline_ms=baseline_step_ms)
            print(f"cache={cache}: unmask compile=True {rows[-1].median_ms:.2f} ms/step "
                  f"(x{rows[-1].speedup_vs_baseline:.2f} the loop, step {rows[-1].extra['step_over_matmuls']:.2f}x its "
                  f"products), the same tokens as eager unmask: {torch.equal(compiled_tokens, our_tokens)}", flush=True)

    harness.synchronize(device)
    started = time.perf_counter()
    _, calls = llada_generate(model, prompt, steps=gen, gen_length=gen, block_length=block)
    harness.synchronize(device)
    record("LLaDA published loop", time.perf_counter() - started, calls, products_ms=products_ms([(prompt_len + gen, prompt_len + gen)]),
           agreement=None, baseline_ms=None)

    print(f"device: {harness.device_name(device)}  commit: {harness.git_commit()}")
    print(f"weights {weight_bytes / 1e9:.3f} GB" + (f"; weight-read floor {floor_ms:.3f} ms/step" if floor_ms else ""))
    print(harness.format_table(rows))
    for row in rows:
        print(f"  {row.impl:<26} {row.extra['tokens_per_second']:8.1f} tokens/s  step/matmuls "
              f"{row.extra['step_over_matmuls']:.2f}  same tokens as Fast-dLLM {row.extra['token_agreement_with_fastdllm']}")
    if not args.no_save:
        harness.write_rows(rows, device, Path(__file__).resolve().parent / "results" / f"{device.type}.jsonl")


if __name__ == "__main__":
    main()
