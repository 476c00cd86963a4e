"""Training a small masked diffusion model on unmask.tasks (`unmask train`).

The objective of LLaDA (Nie et al., 2025, eq. 3 and its SFT form): per sequence a mask
ratio t ~ U(eps, 1]; every answer token is masked with probability t (prompt tokens
never are); the loss is the cross-entropy on the masked tokens weighted by 1 / t,
averaged over answer tokens. Each step trains on one batch of the short tasks and one of
the long tasks (two layouts, two forwards; the step's loss is their mean). Batches are
drawn from a seed and the step number, so a resumed run sees exactly the batches an
uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from unmask import tasks, validation
from unmask.models import DiffusionTransformer, ModelConfig, from_pretrained, save_pretrained

STATE_FILE = "train_state.pt"


@dataclasses.dataclass
class TrainConfig:
    steps: int = 14000
    batch_size: int = 96  # short-task rows per step
    long_batch_size: int = 48  # long-task rows per step (0: the short tasks only)
    # 5e-4: at 2e-3 cumsum's loss sits at ln 10 (chance) for thousands of steps; at 5e-4
    # it learns the per-digit rule by step ~750 (bench/task_probe.py, issue 20). The
    # default (short-task) model was trained at 2e-3 (README).
    learning_rate: float = 5e-4
    warmup_steps: int = 100
    weight_decay: float = 0.01
    seed: int = 0
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    mlp_hidden_size: int = 384
    checkpoint_every: int = 250
    max_minutes: float = 44.0  # stop (and save) when the time is up, wherever the schedule is
    compile: bool = False  # torch.compile the model: 1.37x faster steps on 2 CPU cores, ~30 s to compile


def check_run(config) -> None:
    """The fields train and distill share (TrainConfig, DistillConfig), checked before
    anything is written: a run of no steps or empty batches is an error naming the field."""
    for name in ("steps", "batch_size", "checkpoint_every"):
        validation.check_int(name, getattr(config, name), low=1)
    for name in ("long_batch_size", "warmup_steps"):
        validation.check_int(name, getattr(config, name), low=0)
    validation.check_float("learning_rate", config.learning_rate, positive=True)
    validation.check_float("weight_decay", config.weight_decay, nonnegative=True)
    validation.check_float("max_minutes", config.max_minutes, positive=True)


def model_config(config: TrainConfig, tokenizer: tasks.CharTokenizer) -> ModelConfig:
    vocab = len(tokenizer.vocab)
    return ModelConfig(d_model=config.d_model, n_layers=config.n_layers, n_heads=config.n_heads,
                       n_kv_heads=config.n_heads, mlp_hidden_size=config.mlp_hidden_size, vocab_size=vocab,
                       embedding_size=vocab, rope_theta=10000.0, mask_token_id=tokenizer.mask_id,
                       eos_token_id=tokenizer.eos_id)


def diffusion_loss(model, ids, attention_mask, answer_positions, mask_id: int, generator: torch.Generator,
                   eps: float = 1e-3) -> torch.Tensor:
    batch = ids.shape[0]
    t = eps + (1 - eps) * torch.rand(batch, generator=generator)
    masked = (torch.rand(ids.shape, generator=generator) < t[:, None]) & answer_positions
    noisy = ids.masked_fill(masked, mask_id)
    logits = model(noisy, attention_mask)
    ce = F.cross_entropy(logits[masked], ids[masked], reduction="none")
    weights = (1.0 / t)[:, None].expand_as(masked)[masked]
    return (ce * weights).sum() / answer_positions.sum()


def learning_rate(config: TrainConfig, step: int) -> float:
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.learning_rate * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def save(out: Path, model, optimizer, step: int, config: TrainConfig, tokenizer: tasks.CharTokenizer) -> None:
    save_pretrained(model, out)
    tokenizer.save(out / "tokenizer.json")
    torch.save({"optimizer": optimizer.state_dict(), "step": step, "config": dataclasses.asdict(config)},
               out / STATE_FILE)


@torch.no_grad()
def exact_match(model, n: int = 256, seed: int = 1_000_003, task_names: tuple[str, ...] = tasks.ALL_TASKS,
                **generate_kwargs) -> dict[str, float]:
    """Accuracy per task (exact match, validity for the tasks with many answers) on
    examples from a seed training never uses, one token per step unless
    generate_kwargs say otherwise."""
    from unmask.sampler import generate

    tokenizer = tasks.CharTokenizer()
    scores = {}
    for task in task_names:
        prompt_length, answer_length = tasks.layout(task)
        batch = tasks.examples(n, seed=seed, tasks=(task,))
        ids, mask, _ = tasks.encode_batch(batch, tokenizer)
        rule_given = any(name in generate_kwargs for name in ("steps", "threshold", "factor"))
        settings = generate_kwargs if rule_given else {"steps": answer_length, **generate_kwargs}
        out = generate(model, ids[:, :prompt_length], attention_mask=mask[:, :prompt_length], gen_length=answer_length,
                       block_length=answer_length, stop_at_eos=False, **settings)
        answers = [tokenizer.answer(row) for row in out.tokens.tolist()]
        scores[task] = sum(tasks.correct(e, a) for a, e in zip(answers, batch)) / n
    return scores


def batch_loss(model, config: TrainConfig, step: int, tokenizer: tasks.CharTokenizer) -> torch.Tensor:
    """The diffusion loss of step's batches: the short tasks', and the long tasks' when
    long_batch_size > 0 (their mean: each layout weighs the same)."""
    groups = [(tasks.TASKS, config.batch_size, 0)]
    if config.long_batch_size:
        groups.append((tasks.LONG_TASKS, config.long_batch_size, 1))
    # One seed stream per group; with the short tasks alone, the seeds the default model
    # was trained with (and with train's short-task vocabulary, its starting weights).
    streams = len(groups)
    losses = []
    for task_names, size, group in groups:
        batch = tasks.examples(size, seed=(config.seed * 1_000_003 + step) * streams + group, tasks=task_names)
        ids, mask, answers = tasks.encode_batch(batch, tokenizer)
        generator = torch.Generator().manual_seed((config.seed * 7_919 + step) * streams + group)
        losses.append(diffusion_loss(model, ids, mask, answers, tokenizer.mask_id, generator))
    return sum(losses) / len(losses)


def optimise(model, optimizer, config, loss_at: Callable[[int], torch.Tensor], out: Path,
             tokenizer: tasks.CharTokenizer, *, start_step: int, desc: str, progress: bool) -> tuple[int, float]:
    """The optimisation loop of train and distill: steps start_step .. config.steps - 1
    of AdamW on loss_at(step) with config's learning-rate schedule and gradient clipping
    at 1, a checkpoint every config.checkpoint_every steps, stopping (and saving) after
    config.max_minutes. Returns (the last step + 1, minutes)."""
    bar = None
    if progress:
        try:
            from tqdm import tqdm

            bar = tqdm(total=config.steps, initial=start_step, desc=desc, unit="step")
        except ImportError:
            pass
    started = time.perf_counter()
    done = start_step  # a finished run resumed takes no step
    for step in range(start_step, config.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, step)
        loss = loss_at(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        done = step + 1
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
        out_of_time = (time.perf_counter() - started) / 60 > config.max_minutes
        if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps or out_of_time:
            save(out, model, optimizer, step + 1, config, tokenizer)
        if out_of_time:
            break
    if bar is not None:
        bar.close()
    return done, (time.perf_counter() - started) / 60


def train(out: str | Path, config: TrainConfig, *, resume: bool = True, progress: bool = True) -> DiffusionTransformer:
    check_run(config)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    # Short tasks alone: their alphabet's vocabulary, as unmask-bundled was made with.
    tokenizer = tasks.CharTokenizer(tasks.CHARACTERS if config.long_batch_size else tasks.SHORT_CHARACTERS)
    start_step = 0
    if resume and (out / STATE_FILE).exists():
        model = from_pretrained(out, dtype=torch.float32)
        state = torch.load(out / STATE_FILE, weights_only=False)
        start_step = state["step"]
    else:
        model = DiffusionTransformer.random(model_config(config, tokenizer), seed=config.seed, std=0.02)
    model.train()
    for param in model.parameters():
        param.requires_grad_(True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, betas=(0.9, 0.98),
                                  weight_decay=config.weight_decay)
    if start_step:
        optimizer.load_state_dict(state["optimizer"])
    # The compiled module shares the parameters; checkpoints save the plain model.
    forward = torch.compile(model, dynamic=False) if config.compile else model

    last, minutes = optimise(model, optimizer, config, lambda step: batch_loss(forward, config, step, tokenizer),
                             out, tokenizer, start_step=start_step, desc="train", progress=progress)
    model.eval()
    scores = exact_match(model, task_names=tasks.TASKS + (tasks.LONG_TASKS if config.long_batch_size else ()))
    (out / "train_result.json").write_text(json.dumps(
        {"steps": last, "minutes": minutes, "exact_match_one_token_per_step": scores,
         "config": dataclasses.asdict(config)}, indent=2) + "\n")
    return model
