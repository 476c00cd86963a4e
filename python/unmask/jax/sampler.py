"""unmask.jax.generate: the sampler of unmask.generate over JAX arrays and the Pallas
kernels, with the same arguments (KV caches included) and the same results: at
temperature 0 it produces the torch sampler's tokens, and with a seed the same noise (the
Philox draws are bit-identical; only float near-ties may differ).

Each block is one compiled program (docs/design.md, JAX): a lax loop over the block's
steps with the schedule, the eligibility, the "commit at least one" rule, the invalid-
logits flag and the EOS stop on the device. The block's start is traced, so one
compilation serves every block of a canvas shape, and the seed too, so one serves every
seed; the host reads three scalars per block (steps taken, any row running, invalid
logits). No torch: numpy and unmask.validation.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from unmask import validation
from unmask.pallas import philox
from unmask.schedule import block_plans, grid_blocks
from unmask.jax.kernels import commit, default_interpret, seed_words
from unmask.jax.model import JaxModel
from unmask.output import GenerateOutput


@dataclasses.dataclass(frozen=True)
class BlockProgram:
    """Everything that shapes a block's compiled loop besides array shapes (hashable: the
    key of the model's compiled decoders)."""

    block_length: int
    generation_start: int  # the canvas position where the generated text begins
    rule: validation.Rule  # the commit rule and, for the steps rule, its schedule
    sampling: validation.Sampling  # with seed 0: the seed is traced (one compilation for every seed)
    cfg_scale: float
    cache: str | None  # None, "prefix" or "dual" (unmask.generate's cache)
    mask_id: int
    eos_ids: tuple[int, ...] | None  # set: rows stop at any of them
    callback: bool  # a host callback runs after every step (io_callback: a round trip each)
    # block_grid="model": the masks the block starts with (a prompt's partial block holds
    # fewer than its length), planned as a whole block capped by them; None: all masks
    masked: int | None = None
    alg_temp: float | None = None  # Dream's: positions drawn (_drawn_positions)

    def step_counts(self) -> np.ndarray:
        """Tokens every row commits at each step that commits any (steps rule): the
        schedule of a fully masked block, or on the model grid the whole block's capped by
        the masks present (unmask.schedule, as the torch loop plans them)."""
        masked = self.block_length if self.masked is None else self.masked
        plan = block_plans([masked], self.block_length, self.rule.steps_per_block, self.rule.schedule,
                           full_block=self.masked is not None)
        return np.asarray(plan[0], np.int32)


def _drawn_positions(conf, seed, offset, alg_temp: float):
    """unmask.sampler.drawn_positions on the device: conf [B, block] / alg_temp plus the
    Gumbel noise of Philox stream 1 at each position's row id (b * block + position, the
    sample call's) and step offset [B, block], so the commit's top-k draws the positions
    torch's loop draws (in float32 here, float64 there: the same order but at near-ties)."""
    rows = jnp.arange(conf.size, dtype=jnp.uint32).reshape(conf.shape)
    words = jax.lax.bitcast_convert_type(seed, jnp.uint32)
    draws = philox.draws(words[0], words[1], rows, jnp.zeros_like(rows), offset.astype(jnp.uint32), 1)
    return conf / alg_temp + philox.gumbel_from_draws(draws)


def _stop_rows_at_eos(x, running, generation_start: int, decoded_end, eos_ids: tuple[int, ...]):
    """unmask.sampler's EOS stop on the device: a running row whose decoded text (up to
    decoded_end, traced) holds an EOS (any of eos_ids) stops, and everything after its
    first becomes the first EOS id."""
    generated = x[:, generation_start:]
    positions = jnp.arange(generated.shape[1])
    is_eos = functools.reduce(jnp.logical_or, [generated == eos_id for eos_id in eos_ids])
    is_eos = is_eos & (positions < decoded_end - generation_start)[None, :]
    stops = is_eos.any(axis=1) & running
    first_eos = jnp.where(is_eos, positions[None, :], generated.shape[1]).min(axis=1)
    after = (positions[None, :] > first_eos[:, None]) & stops[:, None]
    return x.at[:, generation_start:].set(jnp.where(after, eos_ids[0], generated)), running & ~stops


def _decode_block(model: JaxModel, program: BlockProgram, host_callback, params, x, model_mask, prompt_positions,
                  running, offset, start, seed, calls):
    """One block decoded on the device. offset: int32 [B], each row's RNG step (its own
    schedule steps so far); calls: model calls before the block (the callback's step).
    Returns (x, running, offset, steps, invalid)."""
    p, length, canvas = program, program.block_length, x.shape[1]
    sampling = p.sampling
    shift = int(model.config.shift_logits)  # Dream: a block's first logits come from the position before it

    def model_input(x):
        if p.cfg_scale == 0.0:
            return x, model_mask
        unconditional = jnp.where(prompt_positions, p.mask_id, x)
        both_mask = None if model_mask is None else jnp.concatenate([model_mask, model_mask])
        return jnp.concatenate([x, unconditional]), both_mask

    def guided(logits):
        if p.cfg_scale == 0.0:
            return logits
        cond, uncond = jnp.split(logits, 2)
        if cond.dtype == jnp.float16:  # as torch's sampler.guide: float16 overflows at 65504
            cond, uncond = cond.astype(jnp.float32), uncond.astype(jnp.float32)
        return uncond + (p.cfg_scale + 1.0) * (cond - uncond)

    def logits_of(x, cache):
        """The block's logits and the cache (None without one; the first step of a block
        with a cache runs the whole canvas and fills it, cache=None in)."""
        ids, mask = model_input(x)
        if cache is None:  # no cache, or the block's first step, which fills it from a whole-canvas run
            logits, cache = model.window_logits(params, ids, mask, start, length)
            return guided(logits), cache if p.cache is not None else None
        first, size = jnp.maximum(start - shift, 0), model.config.block_size
        # A block-causal model recomputes whole model blocks, as torch's
        # DiffusionTransformer.recomputed_segment: a position sharing a model block with
        # the generation block sees its tokens. The window's width is static, so it holds
        # the widest such span (up to bs - 1 positions more on either side).
        widen = 2 * (size - 1) if size else 0
        if size:
            first = first // size * size
        if p.cache == "dual":  # the block alone (and the position before it when shifted)
            fresh_to = start + length if not size else jnp.minimum(-(-(start + length) // size) * size, canvas)
            width = min(length + shift + widen, canvas)
            window_start = jnp.minimum(first, canvas - width)  # the window stays inside the canvas
        else:  # "prefix": the block and everything after it, in a window of static width that
            # starts where the generated text does (positions before `first` keep the cache)
            window_start = max(p.generation_start - shift, 0)
            window_start = window_start // size * size if size else window_start
            width, fresh_to = canvas - window_start, canvas
        logits, cache = model.window_logits(params, ids, mask, start, length, cache=cache, window_start=window_start,
                                            window_length=width, fresh_from=first, fresh_to=fresh_to)
        return guided(logits), cache

    def step(state, mode):
        x, cache, offset, calls, invalid = state
        block = jax.lax.dynamic_slice_in_dim(x, start, length, axis=1)
        eligible = (block == p.mask_id) & running[:, None]
        logits, cache = logits_of(x, cache)
        offsets = jnp.broadcast_to(offset[:, None], block.shape)
        tokens, conf = model.sample_logits(logits, **sampling.options, banned=[p.mask_id], seed=seed, offset=offsets)
        if p.alg_temp is not None:
            conf = _drawn_positions(conf, seed, offsets, p.alg_temp)
        invalid |= ((tokens < 0) & eligible).any()
        new_block, committed = commit(block, tokens, conf, eligible, interpret=model.interpret, **mode)
        x = jax.lax.dynamic_update_slice_in_dim(x, new_block.astype(x.dtype), start, axis=1)
        if host_callback is not None:
            everywhere = jax.lax.dynamic_update_slice_in_dim(jnp.zeros(x.shape, bool), committed, start, axis=1)
            io_callback(host_callback, None, calls, x, everywhere, ordered=True)
        # each row's own step count addresses its noise, as torch's DenoiseStep counts it:
        # a row steps while it has masks
        offset = offset + eligible.any(axis=1).astype(offset.dtype)
        return (x, cache, offset, calls + 1, invalid), (eligible & ~committed).any()

    state = (x, None, offset, calls, jnp.zeros((), bool))
    # With a cache the block's first step (which fills it) is taken before the loop: the
    # loop's carry then holds the cache from its first iteration.
    peeled = int(p.cache is not None)
    rule = p.rule
    if rule.steps_per_block is not None and rule.threshold is None:
        counts = jnp.asarray(p.step_counts())

        def scheduled(i, state):
            return step(state, rule.commit_options(jnp.broadcast_to(counts[i], running.shape)))[0]

        if peeled:
            state = scheduled(0, state)
        state = jax.lax.fori_loop(peeled, counts.shape[0], scheduled, state)
        steps = jnp.int32(counts.shape[0])
    else:  # a threshold (alone, or beside the plan: its counts floors) or the factor: until the masks end
        counts = None if rule.steps_per_block is None else jnp.asarray(p.step_counts())
        # every step commits at least one masked position of each running row
        most = length if counts is None else counts.shape[0]

        def more(carry):
            _, remaining, steps = carry
            return remaining & (steps < most)

        def confident(carry):
            state, _, steps = carry
            floor = None if counts is None else jnp.broadcast_to(counts[steps], running.shape)
            state, remaining = step(state, rule.commit_options(floor))
            return state, remaining, steps + 1

        carry = (state, jnp.ones((), bool), jnp.int32(0))
        if peeled:
            carry = confident(carry)
        state, _, steps = jax.lax.while_loop(more, confident, carry)
    x, _, offset, _, invalid = state
    if p.eos_ids is not None:
        x, running = _stop_rows_at_eos(x, running, p.generation_start, start + length, p.eos_ids)
    return x, running, offset, steps, invalid


def block_decoder(model: JaxModel, program: BlockProgram):
    """The compiled block loop for this model and program: jitted once, kept on the model
    (jit's own cache then holds one executable per canvas shape), per interpret setting
    (which the trace reads: a model whose interpret changes gets other kernels). A program
    with a callback calls the one set in the model's callback holder for the running
    generate (so a new callback each call compiles nothing new)."""
    decoders = model.__dict__.setdefault("_block_decoders", {})
    key = (program, default_interpret(model.interpret))
    if key not in decoders:
        host_callback = None
        if program.callback:
            holder = model.__dict__.setdefault("_callback_holder", {})

            def host_callback(step, x, committed):
                holder["callback"](int(step), np.asarray(x), np.asarray(committed))
        decoders[key] = jax.jit(functools.partial(_decode_block, model, program, host_callback))
    return decoders[key]


def _prompt_batch(prompts, attention_mask, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Prompts as ids [B, P] (left-padded) and the mask of real tokens [B, P], in numpy."""
    if isinstance(prompts, (list, tuple)):
        validation.prompt_list_batch(prompts, attention_mask)
        width = max(len(p) for p in prompts)
        ids = np.full((len(prompts), width), pad_id, np.int64)
        known = np.zeros((len(prompts), width), bool)
        for row, prompt in enumerate(prompts):
            if prompt:
                ids[row, width - len(prompt):], known[row, width - len(prompt):] = prompt, True
        return ids, known
    ids = np.asarray(prompts)
    if validation.dtype_name(ids) not in validation.INT_DTYPES or ids.ndim != 2 or ids.shape[0] == 0:
        raise ValueError(f"prompts must be an int array [B, P] with B > 0, got {ids.dtype} {ids.shape}")
    if attention_mask is None:
        return ids.astype(np.int64), np.ones(ids.shape, bool)
    known = np.asarray(attention_mask)
    validation.check_shape("attention_mask", known.shape, ids.shape, "the prompts' shape")
    return ids.astype(np.int64), known.astype(bool)


def generate(model: JaxModel, prompts, *, attention_mask=None, gen_length: int = 128, block_length: int = 32,
             steps: int | None = None, threshold: float | None = None, factor: float | None = None,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, remasking: str = "low_confidence",
             cfg_scale: float = 0.0, mask_id: int | None = None, eos_id=None, stop_at_eos: bool = True,
             seed: int = 0, callback=None, cache: str | None = None, schedule: str = "llada",
             conf_temperature: float = 1.0, block_grid: str = "prompt", alg_temp: float | None = None) -> GenerateOutput:
    """As unmask.generate; tokens and sequences come back as jnp arrays. callback(step, x,
    committed) gets numpy arrays, from inside the compiled loop (a host round trip per
    step: leave it None for speed)."""
    if not isinstance(model, JaxModel):
        raise TypeError(f"model must be an unmask.jax.JaxModel (unmask.jax.from_torch or from_pretrained), got "
                        f"{type(model).__name__}")
    num_blocks = validation.block_count(gen_length, block_length)
    sampling = validation.sampling(temperature=temperature, top_k=top_k, top_p=top_p, remasking=remasking, seed=seed,
                                   conf_temperature=conf_temperature)
    rule = validation.rule(steps, threshold, factor, num_blocks=num_blocks, default_steps=gen_length,
                           confidence=sampling.confidence, schedule=schedule)
    alg_temp = validation.position_temperature(alg_temp, rule=rule, confidence=sampling.confidence, speculate=0)
    cfg_scale = validation.check_cfg_scale(cfg_scale)
    validation.check_choice("cache", cache, validation.CACHE_MODES)
    validation.check_choice("block_grid", block_grid, validation.BLOCK_GRIDS)
    mask_id, eos_ids = validation.model_special_ids(model, mask_id, eos_id)
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable, got {type(callback).__name__}")

    ids, prompt_mask = _prompt_batch(prompts, attention_mask, eos_ids[0] if eos_ids is not None else 0)  # torch's
    eos_ids = eos_ids if stop_at_eos else None
    validation.prompt_ids(ids, prompt_mask, mask_id=mask_id, vocab=validation.model_vocab(model))
    batch, prompt_len = ids.shape
    if block_grid == "model":  # the torch loop's blocks (unmask.schedule.grid_blocks)
        blocks, masked_counts, decoded = grid_blocks(model.config.block_size, model.config.shift_logits,
                                                     prompt_mask.sum(axis=1).tolist(), prompt_len, gen_length,
                                                     block_length, model_name=type(model).__name__)
        masked = [counts[0] for counts in masked_counts]
    else:
        blocks = [(prompt_len + i * block_length, prompt_len + (i + 1) * block_length) for i in range(num_blocks)]
        masked, decoded = [None] * num_blocks, gen_length
    x = jnp.asarray(np.concatenate([ids, np.full((batch, decoded), mask_id)], axis=1), jnp.int32)
    canvas_mask = np.concatenate([prompt_mask, np.ones((batch, decoded), bool)], axis=1)
    model_mask = None if canvas_mask.all() else jnp.asarray(canvas_mask)
    prompt_positions = jnp.asarray(np.concatenate([prompt_mask, np.zeros((batch, decoded), bool)], axis=1))
    shown = prompt_len + gen_length  # the canvas the result holds (the grid's tail past it is dropped)
    if callback is not None:
        inner = callback
        model.__dict__.setdefault("_callback_holder", {})["callback"] = lambda step, canvas, committed: inner(
            step, canvas[:, :shown], committed[:, :shown])

    started = time.perf_counter()
    running, offset, seed_array = jnp.ones((batch,), bool), jnp.zeros((batch,), jnp.int32), seed_words(sampling.seed)
    nfe, steps_per_block = 0, []
    for (start, end), block_masks in zip(blocks, masked):
        program = BlockProgram(end - start, prompt_len, rule, dataclasses.replace(sampling, seed=0), cfg_scale, cache,
                               mask_id, eos_ids, callback is not None, block_masks, alg_temp)
        x, running, offset, block_steps, invalid = block_decoder(model, program)(
            model.params, x, model_mask, prompt_positions, running, offset, jnp.int32(start), seed_array,
            jnp.int32(nfe))
        block_steps, invalid, any_running = jax.device_get((block_steps, invalid, running.any()))  # the block's one read
        if invalid:
            raise validation.InvalidLogitsError(validation.INVALID_MODEL_LOGITS)
        nfe += int(block_steps)
        steps_per_block.append(int(block_steps))
        if eos_ids is not None and not any_running:
            break
    x = x[:, :shown]
    x.block_until_ready()
    seconds = time.perf_counter() - started
    return GenerateOutput(x[:, prompt_len:], x, nfe, steps_per_block, seconds, nfe)
