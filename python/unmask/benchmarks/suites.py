"""The microbenchmarks: sample, commit and attention, each beside its baselines in one run."""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch

from unmask import experts as experts_backend
from unmask import native, ops, reference, validation
from unmask.benchmarks.harness import (Row, alternating_median_seconds, copy_bandwidth, median_seconds, read_bandwidth,
                                       synchronize)


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


def random_logits(n: int, vocab: int, device: torch.device, *, peaked: bool, seed: int) -> torch.Tensor:
    """randn * 3 (flat: every id within reach of the Gumbel noise, the sampler's worst
    case), or peaked: one id per row 25 above that, as a trained model's masked
    positions usually look, where the native sampler skips most ids' noise."""
    gen = torch.Generator(device=device).manual_seed(seed)
    logits = torch.randn(n, vocab, device=device, generator=gen) * 3
    if peaked:
        top = torch.randint(0, vocab, (n, 1), device=device, generator=gen)
        logits.scatter_add_(1, top, torch.full((n, 1), 25.0, device=device))
    return logits


def bench_sample(device: torch.device, shapes: list[tuple[int, int]], dtypes: list[torch.dtype], *,
                 peak_gbps: float | None, temperature: float = 0.0, reps: int = 10,
                 baselines: tuple[str, ...] = ("reference",), total_bytes: int = 2**30,
                 peaked: bool = False, conf_temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0) -> list[Row]:
    """Bytes moved = logits read once + tokens (8 B) and confidences (4 B) written.

    peak_gbps None: the native kernel is timed in three rounds, each right after a
    measurement of the read bandwidth; its time is the median over the rounds, and each
    group of rows is reported against the median bandwidth (extra.read_bandwidth_gbps). A shared cloud machine's bandwidth drifts by 20-30% over
    the minutes the baselines take, more than the differences being measured."""
    rows = []
    for n, vocab in shapes:
        for dtype in dtypes:
            size = n * vocab * torch.tensor([], dtype=dtype).element_size()
            inputs = rotating_inputs(lambda i: random_logits(n, vocab, device, peaked=peaked, seed=i).to(dtype), size,
                                     total_bytes)
            count = len(inputs)
            moved = size + n * 12
            filters = dict(top_k=top_k, top_p=top_p)
            backend = ops.backend_for("sample", inputs[0], temperature=temperature, banned=[vocab - 1],
                                      conf_temperature=conf_temperature, check=False, **filters)
            impls = {}
            if "reference" in baselines:
                impls["reference (eager)"] = lambda i: reference.sample(
                    inputs[i % count], temperature=temperature, seed=i, conf_temperature=conf_temperature, **filters)
            if "compiled" in baselines:
                # A fresh compile per shape and dtype: dynamo's recompile limit would
                # otherwise send later shapes back to eager without saying so in the table.
                torch._dynamo.reset()
                compiled_reference = torch.compile(reference.sample, dynamic=False)
                impls["reference (compiled)"] = lambda i: compiled_reference(
                    inputs[i % count], temperature=temperature, seed=0, conf_temperature=conf_temperature)
            if "llada" in baselines:
                impls["LLaDA float64 path"] = lambda i: llada_float64_sample(inputs[i % count], temperature, vocab - 1)
            impls[f"unmask.ops [{backend}]"] = lambda i: ops.sample(
                inputs[i % count], temperature=temperature, seed=i, banned=[vocab - 1],
                conf_temperature=conf_temperature, check=False, **filters)
            timings = {}
            peak = peak_gbps
            for name, fn in impls.items():
                if "unmask" not in name:
                    timings[name] = median_seconds(fn, device, reps=min(reps, 3), warmup=1)
                elif peak_gbps is not None:
                    timings[name] = median_seconds(fn, device, reps=reps)
                else:
                    rounds = [(read_bandwidth(device, megabytes=1024), median_seconds(fn, device, reps=reps))
                              for _ in range(3)]
                    peak = statistics.median(bw for bw, _ in rounds)
                    timings[name] = statistics.median(t for _, t in rounds)
            baseline = next(iter(timings.values()))
            shape = {"N": n, "V": vocab, "T": temperature, **({"logits": "peaked"} if peaked else {}),
                     **({"conf_T": conf_temperature} if conf_temperature != 1.0 else {}),
                     **({"top_k": top_k} if top_k else {}), **({"top_p": top_p} if top_p < 1.0 else {})}
            for name, seconds in timings.items():
                gbps = moved / seconds / 1e9
                rows.append(Row("sample", name, shape, str(dtype).removeprefix("torch."),
                                seconds * 1e3, gbps=gbps, fraction_of_peak=gbps / peak, peak="read bandwidth",
                                speedup_vs_baseline=baseline / seconds, extra={"read_bandwidth_gbps": peak}))
            inputs = None  # free this shape's inputs before the next is made
    return rows


def bench_commit(device: torch.device, shapes: list[tuple[int, int]], *, reps: int = 20,
                 compiled_reference: bool = False) -> list[Row]:
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
            compiled = compiled_baseline(reference.commit, canvas, tokens, conf, eligible,
                                         **args) if compiled_reference else None
            impls = {
                "reference (eager)": lambda i: reference.commit(canvas, tokens, conf, eligible, **args),
                **({"reference (compiled)": compiled} if compiled is not None else {}),
                f"unmask.ops [{ops.backend_for('commit', canvas, tokens, conf, eligible, **mode)}]":
                    lambda i: ops.commit(canvas, tokens, conf, eligible, **mode),
            }
            baseline = None
            for name, fn in impls.items():
                seconds = median_seconds(fn, device, reps=reps)
                baseline = baseline or seconds
                rows.append(Row("commit", name, {"B": batch, "L": length, "mode": next(iter(mode))}, "int64",
                                seconds * 1e3, speedup_vs_baseline=baseline / seconds))
    return rows


# (tokens, d_model, heads, head_dim): the bundled model's dual-cache block and a serving
# step's packed tokens; the medium model of bench/generate.py (LLaDA-8B's head dim at
# d_model 1024) at a dual-cache block, a few requests' blocks and a whole canvas.
POINTWISE_SHAPES = ((32, 128, 4, 32), (192, 128, 4, 32), (32, 1024, 16, 64), (192, 1024, 16, 64),
                    (1024, 1024, 16, 64))


def bench_pointwise(device: torch.device, shapes=POINTWISE_SHAPES, dtypes=(torch.float32, torch.bfloat16), *,
                    reps: int = 30) -> list[Row]:
    """The model's pointwise kernels (unmask.ops.rms_norm, .rotary) beside the reference's
    eager torch operations (what the model ran before) and their torch.compile, timed in
    turns. Bytes are what one pass must move: x read and y written (rotary's q is x's size)."""
    from unmask.models.transformer import rotary_tables

    rows = []
    for tokens, d_model, heads, head_dim in shapes:
        for dtype in dtypes:
            gen = torch.Generator().manual_seed(0)
            x = torch.randn(tokens, d_model, generator=gen).to(device, dtype)
            weight = (1 + torch.randn(d_model, generator=gen)).to(device)
            q = torch.randn(1, tokens, heads, head_dim, generator=gen).to(device, dtype)
            cos, sin = rotary_tables(torch.arange(tokens, device=device)[None], head_dim, 10000.0)
            cases = {
                "rms_norm": (lambda: reference.rms_norm(x, weight, 1e-5), lambda: ops.rms_norm(x, weight, 1e-5),
                             (reference.rms_norm, x, weight, 1e-5), ops.backend_for("rms_norm", x, weight, 1e-5)),
                "rotary": (lambda: reference.rotary(q, cos, sin), lambda: ops.rotary(q, cos, sin),
                           (reference.rotary, q, cos, sin), ops.backend_for("rotary", q, cos, sin)),
            }
            for kernel, (eager, fused, compile_args, backend) in cases.items():
                compiled = compiled_baseline(*compile_args)
                impls = {"reference (eager)": lambda i, f=eager: f(),
                         **({"reference (compiled)": compiled} if compiled is not None else {}),
                         f"unmask.ops [{backend}]": lambda i, f=fused: f()}
                with torch.no_grad():
                    times = alternating_median_seconds(list(impls.values()), device, reps=reps)
                moved = 2 * x.numel() * x.element_size()
                for (name, _), seconds in zip(impls.items(), times):
                    rows.append(Row(kernel, name, {"T": tokens, "d_model": d_model, "H": heads, "D": head_dim},
                                    str(dtype).removeprefix("torch."), seconds * 1e3, gbps=moved / seconds / 1e9,
                                    speedup_vs_baseline=times[0] / seconds))
    return rows


# (tokens, d_model, experts, expert hidden size, experts per token)
MOE_SHAPES = ((64, 1024, 128, 256, 8),  # a small MoE's step: 4 pairs per expert
              (32, 2048, 256, 512, 8),  # LLaDA2.0-mini, a 32-token block (a cached step): 1 per expert
              (256, 2048, 256, 512, 8),  # LLaDA2.0-mini, 256 tokens (an uncached step): 8 per expert
              (1024, 2048, 256, 512, 8),  # a long prompt's first call: 32 per expert
              (2048, 2048, 256, 512, 8))  # 64 per expert: torch's bf16 products ahead


def bench_moe(device: torch.device, peak: float, shapes=MOE_SHAPES, dtype: torch.dtype = torch.bfloat16, *,
              reps: int = 7) -> list[Row]:
    """A mixture's routed experts (unmask.ops.moe_swiglu) beside torch's products one
    expert at a time (unmask.experts: what the model ran before the kernel, and the
    backend from many pairs per expert), timed in turns on weight sets rotated past the
    caches. Bytes are the chosen experts' weights, read once: the call's floor at a
    step's few pairs per expert; flops are two per weight element per pair. peak: the
    read bandwidth in GB/s the fractions are of (measured by the caller, who reports it).
    Under the amx build, bfloat16 rows add the avx512 build's kernel (its vector units'
    products) on the same CPU."""
    rows = []
    for tokens, d_model, n_experts, hidden, per_token in shapes:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(tokens, d_model, generator=gen).to(device, dtype)
        chosen = torch.stack([torch.randperm(n_experts, generator=gen)[:per_token] for _ in range(tokens)]).to(device)
        weights = torch.rand(tokens, per_token, generator=gen).to(device)
        expert_bytes = 3 * d_model * hidden * torch.tensor([], dtype=dtype).element_size()

        def make(i):  # on the device: a GPU's 1.6 GB a set would take seconds on its host
            g = torch.Generator(device).manual_seed(i + 1)
            return [(torch.randn(n_experts, *shape, generator=g, device=device) * 0.03).to(dtype)
                    for shape in ((hidden, d_model), (hidden, d_model), (d_model, hidden))]

        weight_sets = rotating_inputs(make, n_experts * expert_bytes)
        calls = [validation.moe_swiglu_call(x, chosen, weights, *w) for w in weight_sets]
        backend = ops.backend_for("moe_swiglu", x, chosen, weights, *weight_sets[0])
        impls = {"torch experts (eager)": lambda i: experts_backend.launch(calls[i % len(calls)]),
                 f"unmask.ops [{backend}]": lambda i: ops.moe_swiglu(x, chosen, weights, *weight_sets[i % len(calls)])}
        if backend == "cpu:amx" and dtype == torch.bfloat16:  # the vector units' products, on the same CPU
            def vector_build(i):
                with native.cpu_isa_forced("avx512"):
                    return ops.moe_swiglu(x, chosen, weights, *weight_sets[i % len(calls)])
            impls["unmask.ops [cpu:avx512 build]"] = vector_build
        with torch.no_grad():
            times = alternating_median_seconds(list(impls.values()), device, reps=reps)
        read = int(chosen.unique().numel()) * expert_bytes
        flops = 2 * chosen.numel() * expert_bytes // torch.tensor([], dtype=dtype).element_size()
        for (name, _), seconds in zip(impls.items(), times):
            gbps = read / seconds / 1e9
            rows.append(Row("moe_swiglu", name, {"T": tokens, "d_model": d_model, "E": n_experts, "f": hidden,
                                                 "k": per_token, "pairs_per_expert": tokens * per_token / n_experts},
                            str(dtype).removeprefix("torch."), seconds * 1e3, gbps=gbps, gflops=flops / seconds / 1e9,
                            fraction_of_peak=gbps / peak, peak="read bandwidth",
                            speedup_vs_baseline=times[0] / seconds))
        del weight_sets, calls
    return rows


def compiled_baseline(fn: Callable, *args, **kwargs) -> Callable | None:
    """torch.compile of a reference function on fixed inputs (a fresh compile: dynamo's
    recompile limit would otherwise send later shapes back to eager without saying so),
    run once to compile; None where it does not compile on this device or torch build."""
    try:
        torch._dynamo.reset()
        compiled = torch.compile(fn, dynamic=False)
        run = lambda i: compiled(*args, **kwargs)  # noqa: E731
        run(0)
        return run
    except Exception:  # noqa: BLE001 - any failure means "baseline unavailable here"
        return None


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
                    reps: int = 5, flex_attention: bool = False, reference_baselines: bool = False,
                    matmul_gflops: float | None = None) -> list[Row]:
    """FLOPs = 4 * B * H * Lq * Lk * D, with no discount for masking; matmul_gflops (the
    same run's dense matmul of this dtype) fills in each row's fraction of peak. Ratios
    are against torch SDPA, the first row of each mask."""
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

        masked = dict(key_valid=key_valid, block_size=block)
        compiled = {kind: compiled_baseline(reference.attention, q, k, v, **kwargs) if reference_baselines else None
                    for kind, kwargs in (("none", {}), ("block+pad", masked))}

        def references(kind, kwargs):
            if not reference_baselines:
                return {}
            impls = {"reference (eager)": lambda i: reference.attention(q, k, v, **kwargs)}
            if compiled[kind] is not None:
                impls["reference (compiled)"] = compiled[kind]
            return impls

        cases = {
            "none": {
                "torch SDPA": lambda i: sdpa(None),
                **references("none", {}),
                f"unmask.ops [{ops.backend_for('attention', q, k, v)}]": lambda i: ops.attention(q, k, v),
            },
            "block+pad": {
                "torch SDPA (bool mask)": lambda i: sdpa(block_mask[:, None]),
                **({"FlexAttention (compiled)": flex} if flex is not None else {}),
                **references("block+pad", masked),
                f"unmask.ops [{ops.backend_for('attention', q, k, v, **masked)}]":
                    lambda i: ops.attention(q, k, v, **masked),
            },
        }
        for mask_kind, impls in cases.items():
            baseline = None
            for name, fn in impls.items():
                seconds = median_seconds(fn, device, reps=reps)
                baseline = baseline or seconds
                rows.append(Row("attention", name, {"B": batch, "L": length, "H": heads, "D": head_dim, "mask": mask_kind},
                                str(dtype).removeprefix("torch."), seconds * 1e3, gflops=flops / seconds / 1e9,
                                fraction_of_peak=flops / seconds / 1e9 / matmul_gflops if matmul_gflops else None,
                                peak=f"{str(dtype).removeprefix('torch.')} matmul" if matmul_gflops else None,
                                speedup_vs_baseline=baseline / seconds))
    return rows


def matmul_tflops(device: torch.device, *, n: int = 8192, dtype: torch.dtype = torch.bfloat16) -> float:
    """Measured dense matmul throughput (TFLOP/s): the compute yardstick of the attention rows."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    seconds = median_seconds(lambda i: a @ b, device, warmup=3, reps=10)
    return 2 * n**3 / seconds / 1e12


def sdpa_runners(inputs: Callable[[int], tuple], mask: torch.Tensor | None = None) -> dict[str, Callable]:
    """torch SDPA pinned to each backend that accepts the case (a backend that raises is
    left out). inputs(i) -> (q, k, v) [B, L, H, D] for run i; GQA through enable_gqa."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q0, k0, _ = inputs(0)
    kwargs = {"attn_mask": mask}
    if q0.shape[2] != k0.shape[2]:
        kwargs["enable_gqa"] = True
    runners = {}
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                          ("cudnn", SDPBackend.CUDNN_ATTENTION)):
        def run(i, backend=backend):
            q, k, v = inputs(i)
            with sdpa_kernel(backend):
                return torch.nn.functional.scaled_dot_product_attention(
                    q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), **kwargs)

        try:
            run(0)
            synchronize(q0.device)
        except (RuntimeError, TypeError, ValueError, NotImplementedError):
            continue  # this backend does not take the case (mask, GQA, head dim, device)
        runners[f"torch SDPA [{name}]"] = run
    return runners


def bench_attention_gpu(device: torch.device, *, reps: int = 10) -> tuple[list[Row], dict]:
    """bf16, D = 128, H = 32 on CUDA: the unmask kernel beside torch SDPA (each backend that
    takes the case) and FlexAttention. FLOPs = 4 * B * Hq * Lq * Lk * D with no discount for
    masking, against a bf16 matmul measured in the same run; the short-query (cached
    decoding) rows also report GB/s of the K and V reads against device copy bandwidth.
    speedup_vs_baseline is against the fastest torch implementation of the same case."""
    dtype, heads, head_dim = torch.bfloat16, 32, 128
    peaks = {"bf16_matmul_tflops": matmul_tflops(device),
             "copy_bandwidth_gbps": copy_bandwidth(device, megabytes=1024)}
    rows: list[Row] = []

    def unmask_label(*args, **kwargs) -> str:
        return f"unmask.ops [{ops.backend_for('attention', *args, **kwargs)}]"

    def record(impls: dict[str, Callable], shape: dict, flops: int, kv_bytes: int | None = None) -> None:
        seconds = {name: median_seconds(fn, device, reps=reps) for name, fn in impls.items()}
        torch_times = [t for name, t in seconds.items() if not name.startswith("unmask.ops")]
        fastest_torch = min(torch_times) if torch_times else None
        for name, t in seconds.items():
            tflops = flops / t / 1e12
            row = Row("attention", name, shape, "bfloat16", t * 1e3, gflops=tflops * 1e3,
                      fraction_of_peak=tflops / peaks["bf16_matmul_tflops"], peak="bf16 matmul",
                      speedup_vs_baseline=None if fastest_torch is None else fastest_torch / t,
                      extra={"tflops": tflops})
            if kv_bytes is not None:
                row.gbps = kv_bytes / t / 1e9
                row.fraction_of_peak, row.peak = row.gbps / peaks["copy_bandwidth_gbps"], "copy bandwidth"
                row.extra["fraction_of_matmul"] = tflops / peaks["bf16_matmul_tflops"]
            rows.append(row)

    def randn(*shape):
        return torch.randn(*shape, device=device, dtype=dtype)

    # Plain bidirectional attention.
    for batch, length in ((4, 1024), (2, 2048), (1, 4096), (1, 8192)):
        q, k, v = (randn(batch, length, heads, head_dim) for _ in range(3))
        impls = sdpa_runners(lambda i: (q, k, v))
        impls[unmask_label(q, k, v)] = lambda i: ops.attention(q, k, v)
        record(impls, {"B": batch, "Lq": length, "Lk": length, "H": heads, "D": head_dim, "mask": "none"},
               4 * batch * heads * length * length * head_dim)
        q = k = v = impls = None  # free before the next shape

    # Block diffusion: block-causal (32) with the first eighth of every row left padding.
    block = 32
    for batch, length in ((2, 2048), (1, 8192)):
        q, k, v = (randn(batch, length, heads, head_dim) for _ in range(3))
        key_valid = torch.ones(batch, length, dtype=torch.bool, device=device)
        key_valid[:, : length // 8] = False
        visible = reference.visibility(batch, length, length, key_valid=key_valid, block_size=block, device=device)
        impls = sdpa_runners(lambda i: (q, k, v), mask=visible[:, None])
        flex = flex_attention_baseline(q, k, v, key_valid, block)
        if flex is not None:
            impls["FlexAttention (compiled)"] = flex
        impls[unmask_label(q, k, v, key_valid=key_valid, block_size=block)] = \
            lambda i: ops.attention(q, k, v, key_valid=key_valid, block_size=block)
        shape = {"B": batch, "Lq": length, "Lk": length, "H": heads, "D": head_dim, "mask": f"block{block}+pad"}
        record(impls, shape, 4 * batch * heads * length * length * head_dim)
        q = k = v = key_valid = visible = impls = flex = None

    # Cached decoding: a 32- or 128-token block against 4096 cached keys, MHA and GQA.
    # Inputs rotate through copies larger than L2 so every run reads K and V from HBM.
    k_len = 4096
    for q_len in (32, 128):
        for kv_heads in (heads, 8):
            kv_bytes = 2 * k_len * kv_heads * head_dim * 2

            def make(i, q_len=q_len, kv_heads=kv_heads):
                kv_shape = (1, k_len, kv_heads, head_dim)
                return randn(1, q_len, heads, head_dim), randn(*kv_shape), randn(*kv_shape)

            inputs = rotating_inputs(make, kv_bytes)
            count = len(inputs)
            impls = sdpa_runners(lambda i: inputs[i % count])
            impls[unmask_label(*inputs[0])] = lambda i: ops.attention(*inputs[i % count])
            shape = {"B": 1, "Lq": q_len, "Lk": k_len, "H": heads, "Hkv": kv_heads, "D": head_dim, "mask": "none"}
            record(impls, shape, 4 * heads * q_len * k_len * head_dim, kv_bytes=kv_bytes)
            inputs = impls = None
    return rows, peaks


def quick(device: torch.device, only: list[str] | None = None) -> tuple[list[Row], dict]:
    """A short run of every benchmark (or of those in `only`) on small shapes (`unmask
    bench --quick [--only ...]`)."""
    only = only or ["sample", "attention", "commit"]
    peak = read_bandwidth(device, megabytes=256)
    rows = []
    if "sample" in only:
        rows += bench_sample(device, [(32, 32768)], [torch.float32, torch.bfloat16], peak_gbps=peak, reps=5,
                             total_bytes=64 * 2**20)
    if "commit" in only:
        rows += bench_commit(device, [(8, 256)], reps=10)
    if "attention" in only:
        rows += bench_attention(device, [(1, 256, 8, 64)], torch.float32, reps=3)
    return rows, {"read_bandwidth_gbps": peak}


def full_sample(device: torch.device, shapes: list[tuple[int, int]] | None = None) -> tuple[list[Row], dict]:
    # GPU: against device-to-device copy bandwidth (issue 4's yardstick); CPU: a read,
    # measured beside each native timing (bench_sample).
    peak = copy_bandwidth(device, megabytes=1024) if device.type == "cuda" else None
    shapes = shapes or [(32, 126464), (256, 126464), (256, 152064)]
    rows = []
    for temperature in (0.0, 1.0):
        rows += bench_sample(device, shapes, [torch.float32, torch.bfloat16], peak_gbps=peak, temperature=temperature,
                             baselines=("reference", "compiled", "llada"))
    # Peaked logits at T = 1: the case where skipping noise pays (LLaDA's path as baseline:
    # the eager reference takes a minute a call here).
    rows += bench_sample(device, shapes[:1], [torch.float32, torch.bfloat16], peak_gbps=peak, temperature=1.0,
                         baselines=("llada",), peaked=True)
    # A sharp conf_temperature puts part of every row's 2^z below 2^-126: the row that
    # shows a kernel making subnormals (13x slower on AVX-512 when the clamp was dropped).
    rows += bench_sample(device, shapes[:1], [torch.float32, torch.bfloat16], peak_gbps=peak,
                         conf_temperature=0.05)
    # The filters: top_k, and top_p at Dream's recipe (temperature 0.2, top_p 0.95: the
    # nucleus is measured at the sampling temperature), where the kept ids are a short
    # sorted list; and top_p 0.95 at T 1 on these flat rows, a nucleus of ~11k ids that
    # the kernel's mass passes narrow down (sample_filter.h), its slowest common case.
    rows += bench_sample(device, shapes[:1], [torch.float32, torch.bfloat16], peak_gbps=peak, temperature=0.7,
                         top_k=50)
    for temperature in (0.2, 1.0):
        rows += bench_sample(device, shapes[:1], [torch.float32, torch.bfloat16], peak_gbps=peak,
                             temperature=temperature, top_p=0.95)
    if peak is None:
        peak = statistics.median(row.extra["read_bandwidth_gbps"] for row in rows)
    return rows, {"read_bandwidth_gbps (median)": peak}


def full_attention(device: torch.device) -> tuple[list[Row], dict]:
    if device.type == "cuda":
        return bench_attention_gpu(device)
    # n = 2048: the size at which torch's CPU matmul peaks on the 2-core dev machine.
    matmul_gflops = matmul_tflops(device, n=2048, dtype=torch.float32) * 1e3
    rows = bench_attention(device, [(1, 1024, 32, 128)], torch.float32, flex_attention=True,
                           reference_baselines=True, matmul_gflops=matmul_gflops)
    return rows, {"float32_matmul_gflops": matmul_gflops}


def full_commit(device: torch.device) -> tuple[list[Row], dict]:
    return bench_commit(device, [(1, 32), (8, 256), (64, 1024)], compiled_reference=True), {}


__all__ = ["bench_attention", "bench_attention_gpu", "bench_commit", "bench_pointwise", "bench_sample", "full_attention", "full_commit",
           "full_sample", "matmul_tflops", "quick", "sdpa_runners"]
