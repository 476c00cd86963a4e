"""Speculative decoding: model calls, canvases evaluated, tokens per call and wall time of
generate(speculate=d) against speculate=0 (whose tokens every row must reproduce).

    python bench/speculative.py [--device cpu|cuda] [--out FILE] [--no-save] [--quick]

Workloads: the bundled model on its four tasks, one token per step (a batch of prompts per
task, and the same prompts one at a time), and the small random model of bench/generate.py
(one prompt, 128 tokens in blocks of 32, one per step); no cache and the dual cache; d = 2,
4, 8 and the block length. Wall time on a CPU says little about a GPU: a call on 2 cores
costs about d times a single canvas, while on a GPU at batch 1 a call costs about one read
of the weights. The GPU estimate below is a cost model fed with the measured calls and
canvases (see the README, Speculative decoding).
"""

import time

import torch

from _common import parse, report
import unmask
from unmask import cli, tasks
from unmask.benchmarks.harness import Row
from unmask.models.transformer import KVCache

# The GPU cost model: one call of n canvases at batch 1 reads the weights once and does n
# canvases' worth of matrix products. LLaDA-8B on an H100 (bf16): 16 GB of weights at
# 3.35 TB/s; a canvas of 32 recomputed positions (dual cache) or 300 (no cache) costs
# 2 * 8e9 FLOPs per position at 60% of the 989 TFLOP/s dense bf16 peak.
# With a cache, the drafted canvases get their own copy of it (KVCache.repeated, once per
# block and canvas count): LLaDA-8B holds 32 layers x (K + V) x 4096 x 2 bytes = 512 KiB a
# position, and a copy of n canvases of a 300-position canvas writes n such rows and reads
# the source once, at the same 3.35 TB/s. Counted per row of the workload's batches, as
# the calls are (the model is of one row at batch 1).
GPU_WEIGHT_READ_MS = 16e9 / 3.35e12 * 1e3
GPU_MS_PER_POSITION = 2 * 8e9 / (0.6 * 989e12) * 1e3
GPU_CACHE_BYTES_PER_POSITION = 32 * 2 * 4096 * 2
GPU_CANVAS_POSITIONS = 300


def gpu_call_ms(canvases: int, positions: int) -> float:
    return max(GPU_WEIGHT_READ_MS, canvases * positions * GPU_MS_PER_POSITION)


def gpu_copy_ms(rows_moved: int) -> float:
    """The cache copies of a run: rows_moved rows of the canvas written or read."""
    return rows_moved * GPU_CANVAS_POSITIONS * GPU_CACHE_BYTES_PER_POSITION / 3.35e12 * 1e3


class CacheCopies:
    """Counts the rows that KVCache.repeated writes and reads while it is entered."""

    def __enter__(self):
        self.rows, self.original = 0, KVCache.repeated

        def counted(cache, times, groups=1):
            self.rows += cache.shape[0] * (times + 1)
            return self.original(cache, times, groups)

        KVCache.repeated = counted
        return self

    def __exit__(self, *exc):
        KVCache.repeated = self.original


def workloads(quick: bool):
    bundled = unmask.from_pretrained(cli.default_model_path(), dtype=torch.float32)
    tokenizer = tasks.CharTokenizer()
    per_task = 16 if quick else 64
    for task in tasks.TASKS:
        ids, mask, _ = tasks.encode_batch(tasks.examples(per_task, seed=11, tasks=(task,)), tokenizer)
        prompt, prompt_mask = ids[:, :tasks.PROMPT_LENGTH], mask[:, :tasks.PROMPT_LENGTH]
        arguments = dict(gen_length=tasks.ANSWER_LENGTH, block_length=tasks.ANSWER_LENGTH, steps=tasks.ANSWER_LENGTH,
                         stop_at_eos=False)
        yield f"bundled {task} batch {per_task}", bundled, [(prompt, prompt_mask)], arguments
        singles = min(per_task, 8 if quick else 32)
        yield (f"bundled {task} one at a time", bundled,
               [(prompt[i:i + 1], prompt_mask[i:i + 1]) for i in range(singles)], arguments)
    fields = dict(d_model=256, n_layers=4, n_heads=4, n_kv_heads=4, mlp_hidden_size=704, vocab_size=8192,
                  embedding_size=8192, mask_token_id=8191, eos_token_id=8190)
    small = unmask.DiffusionTransformer.random(unmask.ModelConfig(**fields), seed=0, std=0.05)
    gen = 32 if quick else 128
    prompt = torch.randint(0, 8190, (1, 64), generator=torch.Generator().manual_seed(0))
    yield "small random model", small, [(prompt, None)], dict(gen_length=gen, block_length=32, steps=gen,
                                                               stop_at_eos=False)


def run(model, batches, arguments, **extra):
    calls = canvases = 0
    seconds = 0.0
    tokens = []
    with CacheCopies() as copies:
        for prompt, mask in batches:
            started = time.perf_counter()
            out = unmask.generate(model, prompt, attention_mask=mask, **arguments, **extra)
            seconds += time.perf_counter() - started
            calls, canvases = calls + out.nfe, canvases + out.canvases
            tokens.append(out.tokens)
    return calls, canvases, seconds, torch.cat(tokens), copies.rows


def main() -> None:
    args = parse(__doc__, lambda parser: parser.add_argument("--quick", action="store_true"))
    rows = []
    for name, model, batches, arguments in workloads(args.quick):
        model = model.to(args.device)
        batches = [(p.to(args.device), None if m is None else m.to(args.device)) for p, m in batches]
        generated = sum(p.shape[0] for p, _ in batches) * arguments["gen_length"]
        for cache in (None, "dual"):
            run(model, batches[:1], arguments, cache=cache)  # warm-up
            base_calls, _, base_seconds, base_tokens, _ = run(model, batches, arguments, cache=cache)
            positions = arguments["block_length"] if cache == "dual" else 300
            base_gpu = base_calls * gpu_call_ms(1, positions)
            for depth, siblings in [(0, False)] + [(d, s) for d in sorted({2, 4, 8, arguments["block_length"]})
                                                    for s in (False, True)]:
                if depth == 0:
                    calls, canvases, seconds, tokens, copied = base_calls, base_calls, base_seconds, base_tokens, 0
                else:
                    calls, canvases, seconds, tokens, copied = run(model, batches, arguments, cache=cache,
                                                                   speculate=depth, speculate_siblings=siblings)
                per_call = canvases / calls
                copied /= batches[0][0].shape[0]  # per row, as the rest of the model (batch 1)
                gpu = calls * gpu_call_ms(round(per_call), positions) + gpu_copy_ms(copied)
                rows.append(Row(
                    "speculative", f"speculate={depth}" + (" siblings" if siblings else ""),
                    {"workload": name, "cache": cache, "gen": arguments["gen_length"],
                     "block": arguments["block_length"], "prompts": len(batches) * batches[0][0].shape[0]},
                    str(next(model.parameters()).dtype).removeprefix("torch."), seconds * 1e3 / len(batches),
                    speedup_vs_baseline=base_seconds / seconds,
                    extra={"model_calls": calls, "canvases": canvases, "calls_vs_step_by_step": base_calls / calls,
                           "canvases_per_call": per_call, "tokens_per_call": generated / calls,
                           "identical_tokens": bool(torch.equal(tokens, base_tokens)),
                           "cache_rows_copied": copied, "gpu_model_copy_share": gpu_copy_ms(copied) / gpu,
                           "gpu_model_speedup": base_gpu / gpu}))
                print(f"{name:34} cache={str(cache):5} d={depth:<3}{'+s' if siblings else '  '} calls {calls:5} canvases {canvases:5} "
                      f"calls x{base_calls / calls:4.2f}  wall x{base_seconds / seconds:4.2f}  "
                      f"GPU model x{base_gpu / gpu:4.2f} (copies {gpu_copy_ms(copied) / gpu:4.0%})  identical {torch.equal(tokens, base_tokens)}", flush=True)
    report(args, rows, {})


if __name__ == "__main__":
    main()
