"""The `unmask` command: info, generate, bench."""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import math
import os
import platform
import sys
from pathlib import Path

import torch


def backend_status() -> list[tuple[str, str, str]]:
    """(backend, state, detail) rows for `unmask info` and the README table."""
    from unmask import native

    rows = []
    built = native.available()
    rows.append(("C++ extension (unmask._C)", "built" if built else "missing",
                 f"OpenMP threads: {native._C.openmp_threads()}" if built else "pip install . builds it"))
    stale = native.stale_build()
    if stale is not None:
        rows.append(("C++ sources", "changed", stale))
    if built:
        runnable = native.runnable_cpu_isas()
        rows.append(("CPU instruction set", native.cpu_isa(),
                     f"compiled: {', '.join(native.cpu_isas())}; this CPU ({native.cpu_vendor() or 'vendor unknown'}) "
                     f"runs: {', '.join(runnable)}; "
                     "UNMASK_ISA=<name> picks a lower one"))
    kernels = native.kernels()
    cpu_kernels = sorted(kernel for kernel, device in kernels if device == "cpu")
    rows.append(("C++ CPU kernels", "usable" if cpu_kernels else "none",
                 ", ".join(cpu_kernels) or "CPU tensors use unmask.reference"))
    cuda_built = built and native._C.cuda_compiled()
    rows.append(("CUDA kernels compiled", "yes" if cuda_built else "no",
                 "sm_80, sm_90 by default" if cuda_built else "built only where nvcc is found"))
    devices = native._C.cuda_device_count() if built else 0
    gpu_detail = torch.cuda.get_device_name(0) if devices and torch.cuda.is_available() else "no CUDA device visible"
    rows.append(("GPU present", "yes" if devices else "no", gpu_detail))
    cuda_kernels = sorted(kernel for kernel, device in kernels if device == "cuda")
    rows.append(("CUDA kernels usable", "yes" if cuda_kernels and devices else "no",
                 ", ".join(cuda_kernels) or "CUDA tensors use unmask.reference"))
    try:
        import jax

        rows.append(("JAX / Pallas", "installed", f"jax {jax.__version__}, backend {jax.default_backend()}"))
    except ImportError:
        rows.append(("JAX / Pallas", "not installed", "pip install .[jax]"))
    return rows


def example_dispatch(device: str = "cpu") -> list[tuple[str, str]]:
    """(call, backend) for a typical call of each kernel on `device`: what runs there."""
    from unmask import ops
    from unmask.models.transformer import rotary_tables

    q = torch.zeros(1, 4, 2, 64, device=device)
    canvas = torch.zeros(1, 8, dtype=torch.int64, device=device)
    logits = torch.zeros(4, 1000, device=device)
    eligible = torch.ones(1, 8, dtype=torch.bool, device=device)
    calls = [
        ("attention float32 D=64", lambda: ops.backend_for("attention", q, q, q)),
        ("attention bfloat16 D=64", lambda: ops.backend_for("attention", *(q.bfloat16(),) * 3)),
        ("sample greedy", lambda: ops.backend_for("sample", logits)),
        ("sample top_p=0.9", lambda: ops.backend_for("sample", logits, temperature=1.0, top_p=0.9)),
        ("commit threshold", lambda: ops.backend_for("commit", canvas, canvas, canvas.float(), eligible,
                                                     threshold=0.9)),
        ("rms_norm bfloat16", lambda: ops.backend_for("rms_norm", logits.bfloat16(), logits[0], 1e-5)),
        ("rotary bfloat16 D=64", lambda: ops.backend_for("rotary", q.bfloat16(), *rotary_tables(
            torch.zeros(1, 4, dtype=torch.int64, device=device), 64, 10000.0))),
    ]
    return [(name, backend()) for name, backend in calls]


def cmd_info(args: argparse.Namespace) -> int:
    import unmask
    from unmask import dispatch

    print(f"unmask {unmask.__version__}  torch {torch.__version__}  python {platform.python_version()}  "
          f"numpy {importlib.metadata.version('numpy')}")
    print(f"dispatch: UNMASK_BACKEND={dispatch.backend_mode()}")
    rows = backend_status()
    width = max(len(r[0]) for r in rows)
    for name, state, detail in rows:
        print(f"  {name:<{width}}  {state:<13}  {detail}")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        print(f"what runs on {device}:")
        for call, backend in example_dispatch(device):
            print(f"  {call:<{width}}  {backend}")
    return 0


def _parse_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError as error:
        raise SystemExit(f"--ids must be integers separated by commas or spaces: {error}") from None


def _positive_int(text: str) -> int:
    """An argparse type: a count of at least 1 (argparse names the option in its error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive int, got {value}")
    return value


def _positive_seconds(text: str) -> float:
    """An argparse type: a finite number of seconds above 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds above 0, got {text}")
    return value


def _dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    choices = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    return choices[name]


class CanvasPrinter:
    """Shows the canvas after every step: committed tokens appear in place of masks."""

    def __init__(self, tokenizer, mask_id: int, prompt_width: int, stream=None):
        self.tokenizer, self.mask_id, self.prompt_width = tokenizer, mask_id, prompt_width
        self.stream = sys.stdout if stream is None else stream
        self.interactive = self.stream.isatty()

    def render(self, ids: list[int]) -> str:
        pieces = []
        for token in ids:
            if token == self.mask_id:
                pieces.append("_")
            elif self.tokenizer is not None:
                pieces.append(self.tokenizer.decode([token]))
            else:
                pieces.append(f"{token} ")
        return "".join(pieces)

    def __call__(self, step: int, canvas: torch.Tensor, committed: torch.Tensor) -> None:
        line = f"step {step + 1:>4} +{int(committed[0].sum()):>2} | {self.render(canvas[0, self.prompt_width:].tolist())}"
        if self.interactive:
            self.stream.write("\r\x1b[2K" + line[: 200])
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def chat_tokenizer(model_dir: str, *, trust_remote_code: bool = False):
    """The checkpoint's tokenizer through transformers, for its chat template; None where
    transformers is missing or the directory has no tokenizer_config.json. A tokenizer
    that is code shipped with the checkpoint (Dream's) runs only with trust_remote_code;
    without it this exits saying so, rather than leave a chat model without its template
    (transformers would otherwise ask on the terminal, or raise)."""
    if not (Path(model_dir) / "tokenizer_config.json").exists():
        return None
    try:
        from transformers import AutoTokenizer
    except ImportError:
        return None
    try:
        return AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    except ValueError as error:
        if trust_remote_code or "trust_remote_code" not in str(error):
            raise
        raise SystemExit(f"{model_dir}: its tokenizer is code shipped with the checkpoint (as Dream's is); "
                         "pass --trust-remote-code to run it") from None


def chat_prompt(model_dir: str, text: str, *, trust_remote_code: bool = False) -> list[int]:
    """The Instruct models' chat template around one user turn, through transformers."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise SystemExit("--chat applies the model's chat template through transformers: pip install 'unmask[hf]'") from None
    tokenizer = chat_tokenizer(model_dir, trust_remote_code=trust_remote_code)
    if not getattr(tokenizer, "chat_template", None):
        raise SystemExit(f"--chat: {model_dir} has no chat template (a Base model?); drop --chat")
    ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    return [int(t) for t in ids]


# Models shipped in the package (README, The bundled model): --model takes these names.
BUNDLED_MODELS = {"unmask-bundled": "default_model",  # the four short tasks of unmask.tasks (the default)
                  "unmask-long": "long_model",  # all nine tasks, short and long (unmask train)
                  "unmask-long-k4": "long_model_k4"}  # its 4-tokens-per-step student (unmask distill)


def default_model_path() -> Path:
    """The small model bundled with the package, trained on unmask.tasks (README)."""
    return model_path("unmask-bundled")


def model_path(name_or_dir: str) -> Path:
    """A bundled model's directory by its name, or the directory given."""
    if name_or_dir in BUNDLED_MODELS:
        return Path(__file__).resolve().parent / "data" / BUNDLED_MODELS[name_or_dir]
    return Path(name_or_dir)


def _device(name: str | None) -> torch.device:
    """--device: the named device, checked (a bad name or a CUDA device on a machine with
    none is an error naming the option, not torch's traceback), or CUDA where there is one."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"--device {name!r}: {error}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name!r}: this machine has no CUDA device torch can use")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name!r}: unmask runs on cpu or cuda devices")
    return device


def model_name(name_or_dir: str) -> str:
    return name_or_dir if name_or_dir in BUNDLED_MODELS else Path(name_or_dir).name


def cmd_generate(args: argparse.Namespace) -> int:
    import unmask

    bundled = args.model is None or args.model in BUNDLED_MODELS
    if bundled:
        args.model = str(model_path(args.model or "unmask-bundled"))
        if args.prompt is None and args.ids is None:
            args.prompt = "123+456="
    # The bundled model answers in 8 positions; real checkpoints default to 64 tokens.
    if args.gen_length is None:
        args.gen_length = 8 if bundled else 64
    if args.block_length is None:
        args.block_length = min(32, args.gen_length)
    from unmask import distributed

    parallel = distributed.launched_world_size() > 1  # started by torchrun: tensor-parallel
    if parallel:
        mesh = distributed.init(args.device)
        model = distributed.tensor_parallel(unmask.from_pretrained(args.model, dtype=_dtype(args.dtype)), mesh)
    else:
        model = unmask.from_pretrained(args.model, dtype=_dtype(args.dtype), device=_device(args.device))
    speaks = not parallel or torch.distributed.get_rank() == 0  # one rank prints
    tokenizer = model.tokenizer
    if args.ids is not None:
        prompt = _parse_ids(args.ids)
    elif args.prompt is not None and args.chat:
        prompt = chat_prompt(args.model, args.prompt, trust_remote_code=args.trust_remote_code)
    elif args.prompt is not None:
        if tokenizer is None:
            raise SystemExit(f"--prompt needs a tokenizer in {args.model} (tokenizer.json, or vocab.json and merges.txt "
                             "with transformers installed); pass token ids with --ids instead")
        from unmask.models.checkpoint import encode_text

        prompt = encode_text(tokenizer, args.prompt, "--prompt")
    else:
        raise SystemExit("give --prompt TEXT or --ids 1,2,3")
    printer = None if args.quiet or not speaks else CanvasPrinter(tokenizer, model.mask_id, len(prompt))
    try:
        out = unmask.generate(
            model, [prompt], gen_length=args.gen_length, block_length=args.block_length, steps=args.steps,
            threshold=args.threshold, factor=args.factor, schedule=args.schedule, temperature=args.temperature,
            top_k=args.top_k, top_p=args.top_p, remasking=args.remasking, conf_temperature=args.conf_temperature,
            cfg_scale=args.cfg_scale, seed=args.seed, callback=printer, cache=args.cache, block_grid=args.block_grid,
            speculate=args.speculate, revise_threshold=args.revise_threshold, eos_id=args.eos_id,
            alg_temp=args.alg_temp,
        )
    except BaseException:
        if parallel:  # no barrier: a rank that failed alone would wait there for the others forever
            distributed.shutdown(wait_for_others=False)
        raise
    if parallel:
        distributed.shutdown()
    if not speaks:
        return 0
    if printer is not None and printer.interactive:
        print()
    tokens = out.tokens[0].tolist()
    eos_ids = set(model.eos_ids if args.eos_id is None else args.eos_id)
    ends = [i for i, token in enumerate(tokens) if token in eos_ids]
    if ends:
        tokens = tokens[: ends[0]]
    print(tokenizer.decode(tokens) if tokenizer is not None else " ".join(map(str, tokens)))
    drafts = f"  canvases {out.canvases}" if args.speculate or args.revise_threshold is not None else ""
    print(f"NFE {out.nfe}{drafts}  steps per block {out.steps_per_block}  {out.seconds:.2f} s  "
          f"{out.tokens_per_second:.1f} tokens/s", file=sys.stderr)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from unmask import train

    config = train.TrainConfig(steps=args.steps, seed=args.seed, batch_size=args.batch_size,
                               long_batch_size=args.long_batch_size, learning_rate=args.learning_rate,
                               max_minutes=args.max_minutes, compile=args.compile)
    train.train(args.out, config, resume=not args.no_resume)
    print((Path(args.out) / "train_result.json").read_text())
    return 0


def _task_weight(text: str) -> tuple[str, float]:
    """'cumsum=2' -> ('cumsum', 2.0), for unmask distill --task-weight."""
    name, sep, weight = text.partition("=")
    with contextlib.suppress(ValueError):
        if sep:
            return name, float(weight)
    raise argparse.ArgumentTypeError(f"expected TASK=WEIGHT (e.g. cumsum=2), got {text!r}")


def cmd_distill(args: argparse.Namespace) -> int:
    from unmask import distill

    config = distill.DistillConfig(tokens_per_step=args.tokens_per_step, steps=args.steps, seed=args.seed,
                                   max_minutes=args.max_minutes, compile=args.compile,
                                   random_orders=args.random_orders, task_weights=dict(args.task_weight or []))
    distill.distill(model_path(args.teacher), args.out, config)
    print((Path(args.out) / "distill_result.json").read_text())
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import unmask
    from unmask import evaluate

    results = []
    names = args.model or ["unmask-bundled"]
    labels = [model_name(name) for name in names]
    if len(set(labels)) < len(labels):  # runs/a/model and runs/b/model: the table and plot tell them apart by path
        labels = list(names)
    if len(set(labels)) < len(labels):
        raise ValueError(f"--model names one model twice: {names}")
    for index, (name, label) in enumerate(zip(names, labels)):
        model = unmask.from_pretrained(model_path(name), dtype=torch.float32)
        # The first model runs every strategy; later ones (a distilled student) the
        # strategies they were made for.
        results += evaluate.evaluate(model, n_per_task=args.n, model_name=label,
                                     strategy_set="all" if index == 0 else "student")
    print(evaluate.format_table(results))
    if args.json:
        evaluate.write_json(results, Path(args.json))
    if args.plot:
        if evaluate.plot(results, Path(args.plot)):
            print(f"plot: {args.plot}")
        else:
            print("plot skipped: matplotlib is not installed (pip install matplotlib)", file=sys.stderr)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from unmask.benchmarks import harness, suites

    device = _device(args.device)
    if args.quick:
        rows, peaks = suites.quick(device, only=args.only)
    else:
        rows, peaks = [], {}
        for name in args.only or ["sample", "attention", "commit"]:
            more, more_peaks = getattr(suites, f"full_{name}")(device)
            rows += more
            peaks.update(more_peaks)
    print(f"device: {harness.device_name(device)}  commit: {harness.git_commit()}")
    for key, value in peaks.items():
        print(f"measured {key.replace('_', ' ')}: {value:.1f}")
    print(harness.format_table(rows))
    harness.write_rows(rows, device, Path(args.out) if args.out else None)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from unmask.serving.app import serve
    except ImportError as missing:
        raise SystemExit(f"unmask serve needs the serve extra ({missing.name} is missing): "
                         "pip install 'unmask[serve]'") from None
    serve(args.model, host=args.host, port=args.port, max_batch=args.max_batch, max_queue=args.max_queue,
          max_context=args.max_context, device=None if args.device is None else str(_device(args.device)),
          dtype=_dtype(args.dtype), block_length=args.block_length,
          cache=args.cache, block_grid=args.block_grid, engine=args.engine, engine_threads=args.engine_threads,
          trust_remote_code=args.trust_remote_code, request_timeout=args.request_timeout, eos_id=args.eos_id)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unmask", description="kernels and sampler for masked diffusion LMs")
    commands = parser.add_subparsers(dest="command", required=True)
    from unmask.train import TrainConfig

    train_defaults = TrainConfig()

    info = commands.add_parser("info", help="versions and which backends are built and usable")
    info.set_defaults(run=cmd_info)

    gen = commands.add_parser("generate", help="generate text with a checkpoint, showing the canvas fill in")
    gen.add_argument("--model", help="checkpoint directory (LLaDA or Dream format) or a bundled model's name "
                                     f"({'/'.join(BUNDLED_MODELS)}); default: unmask-bundled")
    gen.add_argument("--prompt", help="prompt text (needs the model directory's tokenizer)")
    gen.add_argument("--ids", help="prompt token ids, e.g. 1,2,3")
    gen.add_argument("--gen-length", type=int, help="default 64 (8 for the bundled model)")
    gen.add_argument("--block-length", type=int, help="default min(32, gen length)")
    gen.add_argument("--steps", type=int, help="denoising steps in all; with --threshold, each step's floor (commit "
                                                "the step's planned count, or more above the threshold: SDAR's and "
                                                "LLaDA 2.0's rule)")
    rule = gen.add_mutually_exclusive_group()
    rule.add_argument("--threshold", type=float)
    rule.add_argument("--factor", type=float)
    gen.add_argument("--schedule", default="llada", choices=["llada", "dream"],
                     help="how --steps spreads a block's commits: LLaDA's even split or Dream's timesteps")
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-k", type=int, default=0, help="sample among the K most likely tokens (0: all)")
    gen.add_argument("--top-p", type=float, default=1.0,
                     help="sample from the nucleus of mass P at the sampling temperature (1: all)")
    gen.add_argument("--remasking", default="low_confidence", choices=["low_confidence", "margin", "entropy", "random"])
    gen.add_argument("--conf-temperature", type=float, default=1.0,
                     help="temperature of the confidence that ranks positions (1: LLaDA's; Dream's is "
                          "its --temperature)")
    gen.add_argument("--alg-temp", type=float, default=None,
                     help="Dream's alg_temp (the steps rule): draw each step's positions with probabilities "
                          "softmax(confidence / T) instead of taking the most confident (0 or unset: those)")
    gen.add_argument("--cfg-scale", type=float, default=0.0)
    gen.add_argument("--cache", choices=["prefix", "dual"], help="reuse keys and values within a block")
    gen.add_argument("--block-grid", choices=["prompt", "model"], default="prompt",
                     help="blocks from the prompt's end, or on a block-causal model's own grid (as Fast-dLLM v2 "
                          "and SDAR decode)")
    gen.add_argument("--speculate", type=int, default=0, metavar="D",
                     help="verify up to D drafted steps per model call (the same tokens in fewer calls)")
    gen.add_argument("--revise-threshold", type=float, metavar="R",
                     help="self-correction (with --threshold or --factor): mask committed tokens of the block again "
                          "when their probability falls below R")
    gen.add_argument("--chat", action="store_true", help="wrap --prompt in the model's chat template (transformers)")
    gen.add_argument("--trust-remote-code", action="store_true",
                     help="let --chat run a tokenizer shipped as code with the checkpoint (Dream's)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--eos-id", type=int, nargs="+",
                     help="stop at these ids (any of them) instead of the checkpoint's EOS (generation_config.json's "
                          "list, else config.json's: SDAR's config names <|endoftext|>, its chat answers end at "
                          "<|im_end|>, 151645)")
    gen.add_argument("--device", help="cpu or cuda; under torchrun the device type of every rank")
    gen.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    gen.add_argument("--quiet", action="store_true", help="print only the result")
    gen.set_defaults(run=cmd_generate)

    train_parser = commands.add_parser("train", help="train a small diffusion model on unmask.tasks (resumable)")
    train_parser.add_argument("--out", required=True, help="checkpoint directory (LLaDA format)")
    train_parser.add_argument("--steps", type=int, default=train_defaults.steps)
    train_parser.add_argument("--seed", type=int, default=0)
    train_parser.add_argument("--batch-size", type=int, default=train_defaults.batch_size, help="short-task rows per step")
    train_parser.add_argument("--long-batch-size", type=int, default=train_defaults.long_batch_size,
                              help="long-task rows per step (0: the short tasks only)")
    train_parser.add_argument("--learning-rate", type=float, default=train_defaults.learning_rate,
                              help="AdamW's peak rate (100 warm-up steps, then a cosine to zero)")
    train_parser.add_argument("--max-minutes", type=float, default=train_defaults.max_minutes)
    train_parser.add_argument("--compile", action="store_true", help="torch.compile the model (faster steps)")
    train_parser.add_argument("--no-resume", action="store_true", help="start over even if --out holds a run")
    train_parser.set_defaults(run=cmd_train)

    distill_parser = commands.add_parser("distill", help="distil a model into one that commits K tokens per step")
    from unmask.distill import DistillConfig

    distill_defaults = DistillConfig()
    distill_parser.add_argument("--teacher", default="unmask-bundled",
                                help=f"checkpoint directory or {'/'.join(BUNDLED_MODELS)}")
    distill_parser.add_argument("--out", required=True, help="the student's checkpoint directory")
    distill_parser.add_argument("--tokens-per-step", type=int, default=distill_defaults.tokens_per_step, metavar="K")
    distill_parser.add_argument("--steps", type=int, default=distill_defaults.steps)
    distill_parser.add_argument("--seed", type=int, default=0)
    distill_parser.add_argument("--max-minutes", type=float, default=distill_defaults.max_minutes,
                                help="training time limit (the teacher's trajectories come first)")
    distill_parser.add_argument("--compile", action="store_true", help="torch.compile the student (faster steps)")
    distill_parser.add_argument("--random-orders", type=float, default=distill_defaults.random_orders, metavar="F",
                                help="fraction of training rows revealing a random order of the teacher's answer "
                                     "instead of its commit order (for samplers with a fixed count per step)")
    distill_parser.add_argument("--task-weight", type=_task_weight, action="append", metavar="TASK=W",
                                help="draw TASK's training rows W times as often as a task not named (repeatable)")
    distill_parser.set_defaults(run=cmd_distill)

    eval_parser = commands.add_parser("eval", help="accuracy, NFE and speed of every decoding strategy on the tasks")
    eval_parser.add_argument("--model", action="append",
                             help=f"checkpoint directory or {'/'.join(BUNDLED_MODELS)} (repeatable: the first runs "
                                  "every strategy, the others the steps and threshold ones); default: unmask-bundled")
    eval_parser.add_argument("--n", type=_positive_int, default=256, help="examples per task")
    eval_parser.add_argument("--plot", help="write a PNG of accuracy against tokens per step")
    eval_parser.add_argument("--json", help="write the results as JSON lines")
    eval_parser.set_defaults(run=cmd_eval)

    serve_parser = commands.add_parser("serve", help="an OpenAI-compatible server that batches requests' steps")
    serve_parser.add_argument("--model", help="checkpoint directory with tokenizer.json or a bundled model's name "
                                              f"({'/'.join(BUNDLED_MODELS)}); default: unmask-bundled")
    serve_parser.add_argument("--host", default="127.0.0.1")
    serve_parser.add_argument("--port", type=int, default=8000)
    serve_parser.add_argument("--max-batch", type=int, default=16, help="requests decoded together")
    serve_parser.add_argument("--max-queue", type=int, default=64, help="requests waiting beyond those; more get 429")
    serve_parser.add_argument("--max-context", type=int, default=4096, help="prompt + generated tokens per request")
    serve_parser.add_argument("--block-length", type=int,
                              help="default block_length (32, or the model's block_size with --block-grid model; 8 "
                                   "for the bundled model)")
    serve_parser.add_argument("--block-grid", choices=["prompt", "model"], default="prompt",
                              help="the block_grid of requests that name none: blocks from the prompt's end, or on "
                                   "a block-causal model's own grid (SDAR, Fast-dLLM v2, LLaDA 2.0), as "
                                   "unmask.generate")
    serve_parser.add_argument("--device", help="cpu or cuda")
    serve_parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    serve_parser.add_argument("--cache", choices=["prefix", "dual"],
                              help="the key/value cache of requests that name none (a request's \"cache\": null "
                                   "turns it off); default: none, as unmask.generate")
    serve_parser.add_argument("--engine", choices=["process", "thread"], default="process",
                              help="run the denoising steps in a child process (default: the HTTP front and the "
                                   "steps do not share a GIL, and a crash in a step spares the server) or on a "
                                   "thread of the server's process")
    serve_parser.add_argument("--engine-threads", type=_positive_int,
                              help="torch CPU threads for the steps (default: with --engine process one fewer than "
                                   "the cores, leaving one to HTTP; with --engine thread torch's default)")
    serve_parser.add_argument("--eos-id", type=int, nargs="+",
                              help="end answers at these ids (any of them) instead of the checkpoint's EOS "
                                   "(generation_config.json's list, else config.json's; SDAR's chat answers end at "
                                   "<|im_end|>, 151645)")
    serve_parser.add_argument("--request-timeout", type=_positive_seconds, metavar="SECONDS",
                              help="cancel a request not finished this long after it arrived (504; default: none)")
    serve_parser.add_argument("--trust-remote-code", action="store_true",
                              help="let the chat template's tokenizer run code shipped with the checkpoint (Dream's)")
    serve_parser.set_defaults(run=cmd_serve)

    bench = commands.add_parser("bench", help="microbenchmarks against the baselines, in roofline units")
    bench.add_argument("--quick", action="store_true", help="a short run on small shapes")
    bench.add_argument("--only", nargs="+", choices=["sample", "attention", "commit"])
    bench.add_argument("--device")
    bench.add_argument("--out", help="append JSON lines to this file (e.g. bench/results/cpu.jsonl)")
    bench.set_defaults(run=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, TypeError, FileNotFoundError) as error:
        print(f"unmask {args.command}: {error}", file=sys.stderr)
        return 2


def _exit_torchrun_rank(code: int) -> None:
    """End a torchrun rank without interpreter finalization: after destroy_process_group,
    gloo's worker threads can still be torn down during finalization and abort the rank
    ("terminate called without an active exception", seen once in ~20 runs here; cf.
    pytorch/pytorch#179291). Output is flushed first; only the command line does this."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def entry() -> None:
    """The `unmask` command (python -m unmask too)."""
    code = main()
    if os.environ.get("WORLD_SIZE", "1") != "1":
        _exit_torchrun_rank(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
