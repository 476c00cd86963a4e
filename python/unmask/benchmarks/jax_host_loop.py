"""The baseline of bench/jax_generate.py: unmask.jax.generate as it was before the compiled
block loop (commit 577aa20), a Python loop over steps that reads the canvas back to numpy
at every step (eligibility, schedule, invalid logits) and runs EOS through the torch
sampler. Same tokens as unmask.jax.generate; kept for the measurement only."""

from __future__ import annotations

import time

import jax.numpy as jnp
import numpy as np
import torch

from unmask import sampler as torch_sampler
from unmask.schedule import step_counts
from unmask import validation
from unmask.jax.kernels import commit
from unmask.jax.model import JaxModel


def _block_logits(model: JaxModel, x, mask, prompt_positions, mask_id: int, cfg_scale: float, start: int, end: int):
    if cfg_scale == 0.0:
        return model(x, mask, logit_start=start, logit_end=end)
    unconditional = jnp.where(prompt_positions, mask_id, x)
    both_mask = None if mask is None else jnp.concatenate([mask, mask])
    both = model(jnp.concatenate([x, unconditional]), both_mask, logit_start=start, logit_end=end)
    cond, uncond = jnp.split(both, 2)
    return uncond + (cfg_scale + 1.0) * (cond - uncond)


def host_loop_generate(model: JaxModel, prompts, *, attention_mask=None, gen_length: int = 128, block_length: int = 32,
             steps: int | None = None, threshold: float | None = None, factor: float | None = None,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, remasking: str = "low_confidence",
             cfg_scale: float = 0.0, mask_id: int | None = None, eos_id=None, stop_at_eos: bool = True,
             seed: int = 0, callback=None, conf_temperature: float = 1.0) -> torch_sampler.GenerateOutput:
    """As unmask.generate; tokens and sequences come back as jnp arrays."""
    num_blocks = validation.block_count(gen_length, block_length)
    sampling = validation.sampling(temperature=temperature, top_k=top_k, top_p=top_p, remasking=remasking, seed=seed,
                                   conf_temperature=conf_temperature)
    rule = validation.rule(steps, threshold, factor, num_blocks=num_blocks, default_steps=gen_length,
                           confidence=sampling.confidence)
    cfg_scale = validation.check_float("cfg_scale", cfg_scale, nonnegative=True)
    mask_id, eos_ids = validation.model_special_ids(model, mask_id, eos_id)
    pad_id = eos_ids[0] if eos_ids is not None else 0
    eos_ids = eos_ids if stop_at_eos else None

    if isinstance(prompts, (list, tuple)):
        ids, prompt_mask = torch_sampler.prompt_batch(prompts, None, pad_id, "cpu")
    else:
        ids, prompt_mask = torch_sampler.prompt_batch(torch.as_tensor(np.asarray(prompts)), None if attention_mask is None
                                                      else torch.as_tensor(np.asarray(attention_mask)), pad_id, "cpu")
    validation.prompt_ids(ids, prompt_mask, mask_id=mask_id, vocab=validation.model_vocab(model))
    ids, prompt_mask = ids.numpy(), prompt_mask.numpy()
    batch, prompt_len = ids.shape
    x = jnp.asarray(np.concatenate([ids, np.full((batch, gen_length), mask_id)], axis=1), jnp.int32)
    canvas_mask = np.concatenate([prompt_mask, np.ones((batch, gen_length), bool)], axis=1)
    model_mask = None if canvas_mask.all() else jnp.asarray(canvas_mask)
    prompt_positions = jnp.asarray(np.concatenate([prompt_mask, np.zeros((batch, gen_length), bool)], axis=1))

    started = time.perf_counter()
    running = np.ones(batch, bool)
    nfe, steps_per_block = 0, []
    for block in range(num_blocks):
        start, end = prompt_len + block * block_length, prompt_len + (block + 1) * block_length
        masked = (np.asarray(x[:, start:end]) == mask_id) & running[:, None]
        counts = None
        if rule.steps_per_block is not None:
            counts = np.asarray(step_counts(masked.sum(1).tolist(), rule.steps_per_block, rule.schedule))
        block_steps = 0
        for step in range(counts.shape[1] if counts is not None else end - start):
            eligible = (np.asarray(x[:, start:end]) == mask_id) & running[:, None]
            if not eligible.any() and (counts is None or rule.threshold is not None):
                break  # a threshold (alone, or beside the plan) ends the block with its masks
            mode = rule.commit_options(None if counts is None else jnp.asarray(counts[:, step]))
            logits = _block_logits(model, x, model_mask, prompt_positions, mask_id, cfg_scale, start, end)
            tokens, conf = model.sample_logits(logits, **sampling.options, banned=[mask_id], seed=sampling.seed,
                                               offset=nfe)
            if (np.asarray(tokens)[eligible] < 0).any():
                raise ValueError("logits: rows with NaN or +inf logits or no finite kept logit")
            new_block, committed = commit(x[:, start:end], tokens, conf, jnp.asarray(eligible), **mode)
            x = x.at[:, start:end].set(new_block)
            nfe += 1
            block_steps += 1
            if callback is not None:
                everywhere = jnp.zeros(x.shape, bool).at[:, start:end].set(committed)
                callback(nfe - 1, x, everywhere)
        steps_per_block.append(block_steps)
        if eos_ids is not None:
            canvas = torch.from_numpy(np.array(x)).long()  # a writable copy
            running &= ~torch_sampler._stop_rows_at_eos(canvas, prompt_len, end, eos_ids, torch.as_tensor(running)).numpy()
            x = jnp.asarray(canvas.numpy(), jnp.int32)
            if not running.any():
                break
    seconds = time.perf_counter() - started
    return torch_sampler.GenerateOutput(x[:, prompt_len:], x, nfe, steps_per_block, seconds)
