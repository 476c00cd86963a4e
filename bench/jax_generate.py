"""unmask.jax.generate with the compiled block loop against the host loop it replaced
(unmask.benchmarks.jax_host_loop: a Python loop that reads the canvas back every step),
on this machine's JAX backend: the first call (compilation included) and warm calls
(median) reported apart, and the identical tokens checked.

    python bench/jax_generate.py [--quick] [--no-save]
"""

import statistics
import time

import numpy as np
import torch

import unmask
import unmask.jax as uj
from _common import parse, report
from unmask import cli, tasks
from unmask.benchmarks.harness import Row
from unmask.benchmarks.jax_host_loop import host_loop_generate


def workloads(quick: bool):
    bundled = uj.from_torch(unmask.from_pretrained(cli.default_model_path(), dtype=torch.float32))
    tokenizer = tasks.CharTokenizer()
    for batch in (1, 16):
        ids, mask, _ = tasks.encode_batch(tasks.examples(batch, seed=11, tasks=("add",)), tokenizer)
        prompt, prompt_mask = ids[:, :tasks.PROMPT_LENGTH].numpy(), mask[:, :tasks.PROMPT_LENGTH].numpy()
        arguments = {"gen_length": tasks.ANSWER_LENGTH, "block_length": tasks.ANSWER_LENGTH,
                     "steps": tasks.ANSWER_LENGTH, "stop_at_eos": False}
        yield f"bundled add batch {batch}", bundled, prompt, prompt_mask, arguments
    fields = {"d_model": 256, "n_layers": 4, "n_heads": 4, "n_kv_heads": 4, "mlp_hidden_size": 704,
              "vocab_size": 8192, "embedding_size": 8192, "mask_token_id": 8191, "eos_token_id": 8190}
    small = uj.from_torch(unmask.DiffusionTransformer.random(unmask.ModelConfig(**fields), seed=0, std=0.05))
    gen = 32 if quick else 64
    prompt = np.random.default_rng(0).integers(0, 8190, (1, 32))
    for rule in ({"steps": gen}, {"threshold": 0.9}):
        yield (f"small random model {next(iter(rule))}", small, prompt, None,
               {"gen_length": gen, "block_length": 16, "stop_at_eos": False, **rule})
    # A block-causal model (blocks of 16) on a long ragged canvas: a cached step's window
    # attends with its own queries (a traced q_offset), rows rotated to their own grids.
    fields = {**fields, "d_model": 128, "n_layers": 2, "mlp_hidden_size": 256, "block_size": 16}
    block_causal = uj.from_torch(unmask.DiffusionTransformer.random(unmask.ModelConfig(**fields), seed=0, std=0.05))
    ragged = np.random.default_rng(1).integers(0, 8190, (2, 448))
    ragged_mask = np.ones(ragged.shape, bool)
    ragged_mask[1, :5] = False  # row 1 left-padded by 5: its block grid is rotated
    yield ("block-causal model, ragged 448 steps", block_causal, ragged, ragged_mask,
           {"gen_length": gen, "block_length": 16, "steps": gen, "stop_at_eos": False})


def timed(generate, model, prompt, mask, arguments, reps: int):
    """(first call seconds, median warm seconds, output)."""
    started = time.perf_counter()
    out = generate(model, prompt, attention_mask=mask, **arguments)
    np.asarray(out.tokens)
    first = time.perf_counter() - started
    warm = []
    for _ in range(reps):
        started = time.perf_counter()
        out = generate(model, prompt, attention_mask=mask, **arguments)
        np.asarray(out.tokens)
        warm.append(time.perf_counter() - started)
    return first, statistics.median(warm), out


def main() -> None:
    args = parse(__doc__, lambda parser: parser.add_argument("--quick", action="store_true"))
    import jax

    reps = 3 if args.quick else 5
    rows = []
    for name, model, prompt, mask, arguments in workloads(args.quick):
        model.__dict__.pop("_block_decoders", None)  # each workload compiles its own
        base_first, base_warm, base = timed(host_loop_generate, model, prompt, mask, arguments, reps)
        first, warm, out = timed(uj.generate, model, prompt, mask, arguments, reps)
        identical = bool(np.array_equal(np.asarray(out.tokens), np.asarray(base.tokens)))
        shape = {"workload": name, "batch": int(prompt.shape[0]), "prompt": int(prompt.shape[1]),
                 "gen": arguments["gen_length"], "block": arguments["block_length"], "nfe": out.nfe,
                 "backend": jax.default_backend()}
        extra = {"first_call_ms": first * 1e3, "compile_ms_estimate": (first - warm) * 1e3,
                 "identical_tokens": identical, "ms_per_step": warm * 1e3 / out.nfe}
        rows.append(Row("jax-generate", "host loop (before)", shape, "float32", base_warm * 1e3,
                        extra={"first_call_ms": base_first * 1e3, "ms_per_step": base_warm * 1e3 / base.nfe}))
        rows.append(Row("jax-generate", "compiled block loop", shape, "float32", warm * 1e3,
                        speedup_vs_baseline=base_warm / warm, extra=extra))
        print(f"{name:28} host loop: first {base_first:7.2f} s warm {base_warm * 1e3:8.1f} ms | compiled: first "
              f"{first:7.2f} s warm {warm * 1e3:8.1f} ms  x{base_warm / warm:5.2f}  identical {identical}", flush=True)
        if not name.startswith("bundled"):  # the caches (compiled loop only; the host loop had none)
            for cache in ("prefix", "dual"):
                cache_first, cache_warm, cached = timed(uj.generate, model, prompt, mask, {**arguments, "cache": cache},
                                                        reps)
                rows.append(Row("jax-generate", f"compiled, cache={cache}", shape, "float32", cache_warm * 1e3,
                                speedup_vs_baseline=base_warm / cache_warm,
                                extra={"first_call_ms": cache_first * 1e3, "vs_uncached": warm / cache_warm,
                                       "token_agreement_with_uncached": float(np.mean(
                                           np.asarray(cached.tokens) == np.asarray(out.tokens)))}))
                print(f"{'':28} cache={cache:6}: first {cache_first:7.2f} s warm {cache_warm * 1e3:8.1f} ms  "
                      f"x{warm / cache_warm:5.2f} vs uncached", flush=True)
    args.device = "cpu"  # the rows' machine stamp; JAX's backend is in each row's shape
    report(args, rows, {})


if __name__ == "__main__":
    main()
