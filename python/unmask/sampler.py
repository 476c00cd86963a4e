"""Block-parallel decoding for masked diffusion LMs (docs/design.md, The sampler).

generate() writes a canvas of mask tokens after each (left-padded) prompt and fills
it block by block, left to right. Each step runs the model once, samples a token and
a confidence for every masked position of the active block (unmask.ops.sample) and
commits some of them (unmask.ops.commit):

- steps (LLaDA): a block with m masked positions and s steps commits m // s tokens
  per step, plus one in each of the first m % s steps;
- threshold / factor (parallel decoding): every position whose confidence passes,
  at least one per step, until the block has no mask;
- steps with threshold (SDAR, LLaDA 2.0): the steps rule's counts as floors, and every
  position above the threshold; the block ends when its masks do.

infill() runs the same loop over masks wherever they stand in a given sequence.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from collections.abc import Callable, Sequence

import torch

from unmask import ops, revise, rng, speculative, validation
from unmask.output import GenerateOutput
from unmask.schedule import block_plans, grid_blocks, schedule_counts  # noqa: F401 (schedule_counts, as before)
from unmask.validation import CACHE_MODES, Revision, Rule, Sampling

Callback = Callable[[int, torch.Tensor, torch.Tensor], None]


# --------------------------------------------------------------------------- small pure pieces


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device | str | None = None):
    """Token-id lists of different lengths -> ids [B, P] and attention mask [B, P] (left padding)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.int64)
    mask = torch.zeros((len(prompts), width), dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        if len(prompt):
            ids[row, width - len(prompt):] = torch.tensor(list(prompt), dtype=torch.int64)
            mask[row, width - len(prompt):] = True
    return ids.to(device), mask.to(device)


def model_logits(model, x: torch.Tensor, attention_mask: torch.Tensor | None, positions: slice | torch.Tensor, *,
                 cache=None, segment: tuple[int, int] | None = None) -> torch.Tensor:
    """Logits [B, P, V] of the canvas positions `positions` (a slice, or an int64 index
    tensor on the device: a step that replays for every block reads its block there).

    The unmask model runs its LM head on those positions only (and, with a cache, its
    layers on `segment` only); any other callable returning logits [B, L, V] (or an
    object with .logits) runs on the whole canvas and is indexed afterwards. A
    transformers Dream model (config.model_type "Dream") is called as Dream's own loop
    calls it (transformers_dream_logits).
    """
    from unmask.models import DiffusionTransformer

    if isinstance(model, DiffusionTransformer):
        return model(x, attention_mask, logit_positions=positions, cache=cache, segment=segment)
    if getattr(getattr(model, "config", None), "model_type", None) == "Dream":
        out = transformers_dream_logits(model, x, attention_mask)
    else:
        out = model(x, attention_mask=attention_mask)
    logits = getattr(out, "logits", out)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or logits.shape[:2] != x.shape:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"model must return logits [B, L, V] = [{x.shape[0]}, {x.shape[1]}, V], got {shape}")
    return logits[:, positions]


def transformers_dream_logits(model, x: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Logits [B, L, V] of a transformers Dream model (trust_remote_code), called as Dream's
    generation loop calls it: a left-padded batch gets a [B, 1, L, L] mask of pairs of real
    tokens and positions counted over real tokens (1 on padding); and the logits, which the
    model returns unshifted (position i holds the prediction for i + 1), shifted right by
    one, so that position i holds its own (position 0 keeps its own row, and so does a
    left-padded row's first real token, as unmask's Dream-layout model does: Dream's own
    loop reads it from the pad before it, and a padded row decoded otherwise than alone).
    Called as a plain callable, the model's logits would be read one position off:
    fluent-looking text from the wrong predictions, and no error. No host read: every row
    builds the mask."""
    position_ids = first_real = None
    if attention_mask is not None:
        real = attention_mask.bool()
        position_ids = (real.long().cumsum(-1) - 1).masked_fill(~real, 1)
        first_real = real.to(torch.int32).argmax(dim=1)  # the first True
        attention_mask = real[:, None, None, :] & real[:, None, :, None]
    out = model(x, attention_mask=attention_mask, position_ids=position_ids)
    logits = getattr(out, "logits", out)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
        return logits  # model_logits names what came back
    shifted = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
    if first_real is None:
        return shifted
    own = torch.arange(logits.shape[1], device=logits.device) == first_real[:, None].to(logits.device)
    return torch.where(own[:, :, None], logits, shifted)


def guided_logits(model, x, attention_mask, prompt_positions, mask_id: int, cfg_scale: float,
                  positions: slice | torch.Tensor, *, cache=None, segment: tuple[int, int] | None = None):
    """Classifier-free guidance: un + (cfg_scale + 1) * (cond - un), the unconditional pass
    seeing the prompt replaced by masks; both passes in one batched call."""
    if cfg_scale == 0.0:
        return model_logits(model, x, attention_mask, positions, cache=cache, segment=segment)
    unconditional = x.masked_fill(prompt_positions, mask_id)
    both_mask = None if attention_mask is None else torch.cat([attention_mask, attention_mask])
    both = model_logits(model, torch.cat([x, unconditional]), both_mask, positions, cache=cache, segment=segment)
    cond, uncond = both.chunk(2)
    return guide(cond, uncond, cfg_scale)


def guide(cond: torch.Tensor, uncond: torch.Tensor, cfg_scale: float) -> torch.Tensor:
    """Classifier-free guidance of conditional and unconditional logits, in their dtype, or
    in float32 for float16 ones: float16 stops at 65504, which a logit difference of 650
    reaches at cfg_scale 100 (float32 and bfloat16 reach 3e38)."""
    if cond.dtype == torch.float16:
        cond, uncond = cond.float(), uncond.float()
    return uncond + (cfg_scale + 1.0) * (cond - uncond)


class _StepModel:
    """One model evaluation per step, with or without a key/value cache.

    cache "prefix": the block's first step runs the whole canvas and fills the cache;
    later steps recompute the block and everything after it, reusing the keys and
    values of the finished prefix. "dual": later steps recompute the block alone,
    reusing the prefix and the (still masked) suffix as they were at the block's start.
    A model that predicts position i from i - 1 (Dream) also recomputes the position
    just before the block, whose hidden state gives the block's first logits.
    """

    def __init__(self, model, cache: str | None, attention_mask, prompt_positions, mask_id: int, cfg_scale: float):
        self.model, self.cache_mode = model, cache
        self.attention_mask, self.prompt_positions = attention_mask, prompt_positions
        self.mask_id, self.cfg_scale = mask_id, cfg_scale
        self.cache = None
        self.begin_block(0, 0)

    def begin_block(self, start: int, end: int) -> None:
        """The block the next calls are for (the cache's segments are picked from it)."""
        self.block, self.first_step_of_block = (start, end), True
        self.canvases_cache = None  # (canvases per row, KVCache) of the block's speculative calls

    def __call__(self, x: torch.Tensor, positions: torch.Tensor, *, canvases_per_row: int = 1) -> torch.Tensor:
        """Logits of the block: `positions` (start..end-1 on the device) without a cache,
        which needs no host value (a captured step replays for every block); with a
        cache, the segment the model recomputes is picked on the host from the block.

        canvases_per_row n > 1 (speculative decoding): x holds n canvases of every row,
        all rows' first canvases, then all rows' second ones, ...; they share what the
        cache holds outside the block (the block's first call holds one canvas per row)."""
        n = canvases_per_row
        attention_mask, prompt_positions = self.attention_mask, self.prompt_positions
        if n > 1:
            attention_mask = None if attention_mask is None else attention_mask.repeat(n, 1)
            prompt_positions = prompt_positions.repeat(n, 1)
        if self.cache_mode is None:
            return guided_logits(self.model, x, attention_mask, prompt_positions, self.mask_id, self.cfg_scale,
                                 positions)
        groups = 2 if self.cfg_scale > 0 else 1
        (start, end), segment = self.block, None
        if not self.first_step_of_block:
            segment = self.model.recomputed_segment(start, end, x.shape[1], self.cache_mode)
        elif n > 1:
            raise ValueError("the first call of a block fills the cache from one canvas per row")
        if self.cache is None:
            self.cache = self.model.new_cache(x.shape[0] * groups, x.shape[1])
        self.first_step_of_block = False
        cache = self.cache if n == 1 else self._canvases_cache(n, groups)
        return guided_logits(self.model, x, attention_mask, prompt_positions, self.mask_id, self.cfg_scale,
                             slice(start, end), cache=cache, segment=segment)

    def _canvases_cache(self, n: int, groups: int):
        """The cache for n canvases per row. Their copies differ only inside the segment,
        which every call rewrites before attending, and outside it they hold the block's
        first call, which no later call of the block changes: so one copy serves the whole
        block (a copy per call wrote n caches each time: for LLaDA-8B in bfloat16 ~170 MB a
        copy at 330 positions, 2.5 GB a call at 15 canvases, against a 16 GB weight read).
        Fewer canvases than the copy holds take its leading rows (canvas-major order); with
        CFG's two groups those are not leading, and the copy is made again."""
        if self.canvases_cache is not None:
            held, cache = self.canvases_cache
            if held == n:
                return cache
            if groups == 1 and held > n:
                return cache.leading(n * self.cache.shape[0])
        cache = self.cache.repeated(n, groups)
        self.canvases_cache = (n, cache)
        return cache

    def fill(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """A cached block's first call as a function of device tensors: the whole canvas,
        filling the cache, and the logits of `positions` (start..end-1)."""
        return guided_logits(self.model, x, self.attention_mask, self.prompt_positions, self.mask_id, self.cfg_scale,
                             positions, cache=self._cache_for(x))

    def recompute(self, x: torch.Tensor, positions: torch.Tensor, *, length: int | None = None) -> torch.Tensor:
        """The block's later calls as a function of device tensors: a DeviceSegment at
        positions[0] over the cached rest of the canvas, of the block alone (dual) or of
        `length` positions, the block and what follows it (prefix), with the block's logits."""
        from unmask.models import DeviceSegment

        segment = DeviceSegment(positions[0], length or positions.shape[0], logits=positions.shape[0])
        return guided_logits(self.model, x, self.attention_mask, self.prompt_positions, self.mask_id, self.cfg_scale,
                             None, cache=self._cache_for(x), segment=segment)

    def _cache_for(self, x: torch.Tensor):
        if self.cache is None:
            self.cache = self.model.new_cache(x.shape[0] * (2 if self.cfg_scale > 0 else 1), x.shape[1])
        return self.cache

    @property
    def graphable(self) -> bool:
        """Whether a step is a fixed function of device tensors (no cache segment picked on
        the host, no tensor-parallel collectives): it may be captured as a CUDA graph.
        Without a cache, and with a cache where the model takes a DeviceSegment (no
        block-causal mask, no shifted logits): a block's first call (fill) and its later
        calls (recompute) are two such steps; the prefix cache's recompute step has a
        segment length of its own in every block, so it is one step per block."""
        from unmask.models import DiffusionTransformer

        if not isinstance(self.model, DiffusionTransformer) or self.model.vocab_shard is not None:
            return False
        if self.model.config.moe is not None and not _experts_read_nothing_on_the_host(self.model):
            return False
        config = self.model.config
        return self.cache_mode is None or (config.block_size is None and not config.shift_logits)


def _experts_read_nothing_on_the_host(model) -> bool:
    """Whether a mixture's experts run the CUDA kernel (csrc/cuda/moe.cu), which routes the
    pairs on the device: bfloat16 weights on a GPU, at most 1024 experts, a build with CUDA
    kernels. Elsewhere a traced or captured step would run torch's products one expert at a
    time (unmask.experts), which read the counts on the host."""
    from unmask import native
    from unmask.models.transformer import MixtureOfExperts

    for module in model.modules():
        if isinstance(module, MixtureOfExperts):
            weight = module.expert_gate
            return (weight.device.type == "cuda" and weight.dtype == torch.bfloat16
                    and module.moe.n_experts <= native.CUDA_MOE_MAX_EXPERTS
                    and ("moe_swiglu", "cuda") in native.kernels())
    return True


# --------------------------------------------------------------------------- the step loop
#
# The loop keeps every data-dependent decision on the device and synchronises with it at
# most once per block (docs/design.md, The sampler):
# - steps: the commit counts of a block depend only on its masked count per row at the
#   block's start (block_length in generate; read once, up front, in infill), so the host
#   plans every step of the block where some row commits (schedule_counts) without looking;
# - threshold / factor (and steps with threshold, which can end a block before its plan):
#   each step posts "masks remain" to pinned host memory without
#   blocking; the host reads it once that step has finished: at once on the CPU, one step
#   later on a GPU (whose next step is already queued), so a GPU block may end with one
#   extra step that commits nothing (it counts as a model call, not as a schedule step);
# - sampling covers every position of the block (the kernels skip nothing, so no index of
#   the masked positions is built on the host), and rows with invalid logits are
#   collected on the device and reported at the next synchronisation;
# - EOS: rows stop on the device; the host learns whether any still runs at the next
#   block's start, together with the invalid-logits flag: that read is the block's one
#   synchronisation (plus one at the end for the last block).


class _StepFlags:
    """Booleans a step posts for the host without a synchronisation: copied (non-blocking)
    into pinned host memory and read once their step has finished."""

    def __init__(self, device: torch.device):
        self.device, self.cuda = device, device.type == "cuda"
        self.host = torch.zeros(2, dtype=torch.bool, pin_memory=self.cuda)
        self.events = [torch.cuda.Event() for _ in range(2)] if self.cuda else None
        self.lag = 1 if self.cuda else 0  # how many steps later a flag is read

    def post(self, step: int, flag: torch.Tensor) -> None:
        self.host[step % 2].copy_(flag, non_blocking=True)
        if self.cuda:
            self.events[step % 2].record(torch.cuda.current_stream(self.device))

    def read(self, step: int) -> bool:
        if self.cuda:
            self.events[step % 2].synchronize()  # the step has finished; later steps stay queued
        return bool(self.host.numpy()[step % 2])


def _host_read(*values: torch.Tensor) -> list:
    """The loop's synchronisation: a few device scalars read on the host at once."""
    return torch.stack([v.reshape(()).to(torch.int64) for v in values]).tolist()


def _raise_if_invalid(invalid: bool) -> None:
    if invalid:
        raise ops.InvalidLogitsError(validation.INVALID_MODEL_LOGITS)


@dataclasses.dataclass
class StepState:
    """The device tensors a denoising step reads and writes: the same ones for every step
    and block of a decode, so a step captured once (CUDA graph) or traced once
    (torch.compile) serves them all. Steps change them in place only."""

    x: torch.Tensor        # int64 [B, L], the canvas
    start: torch.Tensor    # int64 0-d, the active block's first position
    offset: torch.Tensor   # int64 [B], each row's RNG step offset (its own schedule steps so far)
    k: torch.Tensor        # int64 [B], tokens each row commits this step (the steps rule)
    running: torch.Tensor  # bool [B], rows not stopped at EOS
    invalid: torch.Tensor  # bool 0-d, an eligible position got invalid logits

    @classmethod
    def new(cls, x: torch.Tensor) -> StepState:
        device, batch = x.device, x.shape[0]
        scalar = functools.partial(torch.zeros, (), dtype=torch.int64, device=device)
        return cls(x, scalar(), torch.zeros(batch, dtype=torch.int64, device=device),
                   torch.zeros(batch, dtype=torch.int64, device=device),
                   torch.ones(batch, dtype=torch.bool, device=device), torch.zeros((), dtype=torch.bool, device=device))


class DenoiseStep:
    """One step of the active block: the model, sample, commit. A function of the
    StepState's tensors only, with no host value that changes between steps or blocks.

    logits_fn(positions) gives the block's logits [B, block_length, V] for positions
    start..start+block_length-1 as a device tensor. Returns (committed [B, block_length],
    remaining: bool 0-d, whether an eligible position is still masked); both are fresh
    tensors in eager mode and the graph's static outputs when replayed."""

    def __init__(self, state: StepState, block_length: int, logits_fn: Callable[[torch.Tensor], torch.Tensor], *,
                 rule: Rule, sampling: Sampling, mask_id: int, sample: Callable = ops.sample,
                 vocab: int | None = None):
        self.state, self.block_length, self.logits_fn = state, block_length, logits_fn
        self.sampling, self.mask_id, self.sample, self.vocab = sampling, mask_id, sample, vocab
        self.mode = rule.commit_options(state.k)
        self.banned = torch.full((1,), mask_id, dtype=torch.int64, device=state.x.device)  # (no host copy)
        self.offsets = torch.arange(block_length, device=state.x.device)

    def __call__(self) -> tuple[torch.Tensor, torch.Tensor]:
        state, sampling = self.state, self.sampling
        positions = state.start + self.offsets
        index = positions.expand(state.x.shape[0], -1)
        block = state.x.gather(1, index)
        eligible = (block == self.mask_id) & state.running[:, None]
        logits = self.logits_fn(positions)
        if self.mask_id >= (logits.shape[-1] if self.vocab is None else self.vocab):
            raise ValueError(f"mask_id={self.mask_id} lies outside the model's vocabulary (V={logits.shape[-1]})")
        tokens, conf = self.sample(logits, **sampling.options, banned=self.banned, seed=sampling.seed,
                                   offset=state.offset[:, None].expand_as(block), check=False)
        state.invalid.logical_or_(((tokens < 0) & eligible).any())
        committed = ops.commit(block, tokens, conf, eligible, **self.mode)
        state.x.scatter_(1, index, block)
        # Each row's own step count addresses its noise (docs/design.md, The sampler): a
        # row steps while it has masks, so its draws never depend on how long its
        # companions take (under the steps rule a row's steps that commit nothing come
        # after its last mask: its count is its own plan's, not the busiest row's).
        state.offset.add_(eligible.any(dim=1))
        return committed, (eligible & ~committed).any()


class _CudaGraphStep:
    """A DenoiseStep captured as a CUDA graph on its first call and replayed after.

    The first call runs the step for real on a side stream (it warms up the allocator
    and the kernels' lazy state, and its commits count); the capture that follows
    records the next step without running it, and every later call replays it."""

    def __init__(self, step: DenoiseStep):
        self.step, self.graph, self.outputs = step, None, None
        self.device = step.state.x.device

    def __call__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.graph is not None:
            self.graph.replay()
            return self.outputs
        main = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(device=self.device)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            warm = self.step()
        main.wait_stream(side)
        for output in warm:  # made on the side stream, read on the main one
            output.record_stream(main)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, stream=torch.cuda.Stream(device=self.device)):
                self.outputs = self.step()
        except RuntimeError as error:  # e.g. a kernel of the step synchronises with the host
            raise RuntimeError(f"cuda_graph=True: the denoising step could not be captured ({error}); "
                               "generate(..., cuda_graph=False) runs it eagerly") from error
        self.graph = graph
        return warm


def _decode(
    step_model: _StepModel,
    x: torch.Tensor,
    blocks: list[tuple[int, int]],
    rule: Rule,
    sampling: Sampling,
    *,
    sample: Callable,
    vocab: int | None,
    mask_id: int,
    eos_ids: tuple[int, ...] | None,
    generation_start: int,
    callback: Callback | None,
    masked_counts: list[list[int]] | None = None,
    traced_step: Callable[[DenoiseStep], Callable] | None = None,
    speculate: int = 0,
    siblings: bool = True,
    revision: Revision | None = None,
    full_block_plans: bool = False,
) -> tuple[int, list[int], int]:
    """Fill the masks of x block by block, in place. Returns (nfe, steps per block).

    sample: unmask.ops.sample, or a tensor-parallel model's sampler over its vocabulary
    shard (vocab: the whole vocabulary then; None reads it from the logits).
    masked_counts[i][b]: masks of row b in block i at its start (None: every position of
    every block, as in generate on the prompt's grid). eos_ids set: after each block, a row whose generated text
    holds EOS stops and the rest of it becomes EOS; decoding ends when no row is running.
    traced_step: wraps each DenoiseStep: _CudaGraphStep (captured once per block shape and
    replayed) or torch.compile; None runs it eagerly.
    speculate d > 0: up to d steps per model call, verified (unmask.speculative); siblings:
    each drafted step also drafts its runner-up. revision: committed tokens may be masked
    again (unmask.revise). full_block_plans: the steps rule plans each block as if all its
    positions were masks, capped by those present (schedule.capped_step_counts).
    Returns (model calls, schedule steps per block, canvases evaluated per row).
    """
    batch = x.shape[0]
    state = StepState.new(x)
    flags = _StepFlags(x.device)
    steps: dict[tuple, Callable] = {}  # by block length, kind and segment length: graphs are captured per shape
    nfe = canvases = 0
    steps_per_block = []
    for index, (start, end) in enumerate(blocks):
        if index > 0 and eos_ids is not None:
            any_running, bad = _host_read(state.running.any(), state.invalid)
            _raise_if_invalid(bad)
            if not any_running:
                break
        counts = [end - start] * batch if masked_counts is None else masked_counts[index]
        if max(counts) == 0:
            steps_per_block.append(0)
            continue
        state.start.fill_(start)
        step_model.begin_block(start, end)
        # A block of one position has no other to verify it against: the plain loop decodes it.
        revising = revision is not None and end - start > 1
        if revising or speculate:  # loops that read the host per call
            if revising:
                result = revise.decode_block(
                    step_model, x, start, end, rule=rule, sampling=sampling, sample=sample, vocab=vocab,
                    mask_id=mask_id, running=state.running, invalid=state.invalid, offset_base=state.offset,
                    revision=revision, callback=callback, nfe=nfe)
            else:
                plan = None if rule.steps_per_block is None else block_plans(
                    counts, end - start, rule.steps_per_block, rule.schedule, full_block=full_block_plans)
                result = speculative.decode_block(
                    step_model, x, start, end, depth=speculate, rule=rule, sampling=sampling, sample=sample,
                    vocab=vocab, mask_id=mask_id, running=state.running, invalid=state.invalid,
                    offset_base=state.offset, plan=plan, callback=callback, nfe=nfe, siblings=siblings)
            state.offset.add_(result.row_steps)
            nfe, canvases = nfe + result.calls, canvases + result.canvases
            steps_per_block.append(result.steps)
            if eos_ids is not None:
                state.running.logical_and_(~_stop_rows_at_eos(x, generation_start, end, eos_ids, state.running))
            continue
        # A captured cached step is two graphs, the block's first call (fill) and the later
        # ones (recompute; with the prefix cache one per block, its segment running to the
        # canvas's end): the host picks which replays, as an eager step's _StepModel does
        # from its own flag.
        kinds = ("fill", "recompute") if traced_step and step_model.cache_mode is not None else (None,)
        if kinds[0] is not None:
            step_model._cache_for(x)  # on this stream, before any capture's side-stream warm-up
        segment_length = x.shape[1] - start if step_model.cache_mode == "prefix" else end - start
        keys = {kind: (end - start, kind, segment_length if kind == "recompute" else None) for kind in kinds}
        for kind, key in keys.items():
            if key not in steps:
                if kind is None:
                    logits_fn = functools.partial(step_model, x)
                elif kind == "fill":
                    logits_fn = functools.partial(step_model.fill, x)
                else:
                    logits_fn = functools.partial(step_model.recompute, x, length=segment_length)
                denoise = DenoiseStep(state, end - start, logits_fn, rule=rule, sampling=sampling, mask_id=mask_id,
                                      sample=sample, vocab=vocab)
                steps[key] = traced_step(denoise) if traced_step else denoise
        block_steps = 0  # the block's model calls so far, until a lagging flag ends it

        def step() -> torch.Tensor:
            kind = kinds[min(block_steps, len(kinds) - 1)]  # the block's first call fills the cache
            committed, remaining = steps[keys[kind]]()
            if callback is not None:
                everywhere = torch.zeros_like(x, dtype=torch.bool)
                everywhere[:, start:end] = committed
                callback(nfe, x, everywhere)
            return remaining

        # The steps rule runs its plan; a threshold, alone or beside the plan (which it can
        # finish early), runs until the block's masks are gone: each step commits at least
        # one position of every row with masks.
        plan = None if rule.steps_per_block is None else block_plans(counts, end - start, rule.steps_per_block,
                                                                     rule.schedule, full_block=full_block_plans)
        if plan is not None:
            plan_on_device = torch.tensor(plan, dtype=torch.int64).to(x.device, non_blocking=True)
        ends_early = plan is None or rule.threshold is not None
        for i in range(end - start if plan is None else len(plan[0])):
            if plan is not None:
                state.k.copy_(plan_on_device[:, i])
            remaining = step()
            if ends_early:
                flags.post(nfe, remaining)
            nfe, canvases, block_steps = nfe + 1, canvases + 1, block_steps + 1
            if ends_early and block_steps > flags.lag and not flags.read(nfe - 1 - flags.lag):
                # The steps after the block's last commit committed nothing: they were
                # model calls (nfe counts them) but not steps of the schedule (no row
                # had a mask, so none moved its RNG offset).
                block_steps -= flags.lag
                break
        steps_per_block.append(block_steps)
        if eos_ids is not None:
            state.running.logical_and_(~_stop_rows_at_eos(x, generation_start, end, eos_ids, state.running))
    (bad,) = _host_read(state.invalid)
    _raise_if_invalid(bad)
    return nfe, steps_per_block, canvases


def _run(step_model: _StepModel, x: torch.Tensor, blocks: list[tuple[int, int]], rule: Rule, sampling: Sampling, *,
         mask_id: int, eos_ids: tuple[int, ...] | None, generation_start: int, callback: Callback | None,
         masked_counts: list[list[int]] | None = None,
         traced_step: Callable[[DenoiseStep], Callable] | None = None,
         speculate: int = 0, siblings: bool = True, revision: Revision | None = None,
         full_block_plans: bool = False, alg_temp: float | None = None) -> GenerateOutput:
    """The decoding loop of generate and infill, timed the same way for both: from the
    first model call to the last token on the host (a CUDA device is synchronised)."""
    sample, vocab = _sampler_of(step_model.model)
    if alg_temp is not None:
        sample = drawn_positions(sample, alg_temp)
    started = time.perf_counter()
    # The model's device is the current one while decoding: streams, events and graphs
    # made without a device argument (here and in the kernels) then belong to it.
    device_guard = torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()
    with torch.inference_mode(), device_guard:
        nfe, steps_per_block, canvases = _decode(
            step_model, x, blocks, rule, sampling, sample=sample, vocab=vocab, mask_id=mask_id, eos_ids=eos_ids,
            generation_start=generation_start, callback=callback, masked_counts=masked_counts, traced_step=traced_step,
            speculate=speculate, siblings=siblings, revision=revision, full_block_plans=full_block_plans,
        )
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
    seconds = time.perf_counter() - started
    return GenerateOutput(x[:, generation_start:].clone(), x, nfe, steps_per_block, seconds, canvases)


def drawn_positions(sample: Callable, alg_temp: float) -> Callable:
    """sample, its confidences turned into conf / alg_temp + Gumbel noise: the commit's
    top-k of those draws the step's positions without replacement with probabilities
    softmax(conf / alg_temp) (the Gumbel-top-k trick; Dream's torch.multinomial over that
    softmax, in distribution, with unmask's noise). The noise is Philox stream 1 at each
    position's row id and step offset, the draw remasking="random" ranks by: so the same
    seed draws the same positions on every backend, and a huge alg_temp commits what
    remasking="random" commits. Ranked in float32, as the kernels rank."""
    def drawn(logits, *, seed, offset, **options):
        tokens, conf = sample(logits, seed=seed, offset=offset, **options)
        rows = torch.arange(conf.numel(), device=conf.device)  # the sample call's row ids (no `rows` given)
        offsets = torch.as_tensor(offset, device=conf.device).expand_as(conf).reshape(-1)
        draws = rng.draws(seed, rows, 1, offset=offsets, stream=rng.RANDOM_CONFIDENCE_STREAM)[:, 0]
        return tokens, (conf.double() / alg_temp + rng.gumbel_from_draws(draws).view_as(conf)).float()

    return drawn


def _sampler_of(model) -> tuple[Callable, int | None]:
    """ops.sample, or the sampler of a tensor-parallel unmask model's vocabulary shard
    (DiffusionTransformer.vocab_shard, set by unmask.distributed.tensor_parallel)."""
    from unmask.models import DiffusionTransformer

    if isinstance(model, DiffusionTransformer) and model.vocab_shard is not None:
        return model.vocab_shard.sample, model.vocab_shard.vocab
    return ops.sample, None


def _stop_rows_at_eos(x: torch.Tensor, generation_start: int, decoded_end: int, eos_ids: tuple[int, ...],
                      running: torch.Tensor):
    """Rows (still running) whose decoded text holds an EOS (any of eos_ids): everything
    after their first becomes the first EOS id. Returns the bool [B] of rows that stop. On
    the device, no branch on data."""
    decoded = x[:, generation_start:decoded_end]
    is_eos = decoded == eos_ids[0]
    for eos_id in eos_ids[1:]:  # a few ids: a compare each, no id tensor to copy over
        is_eos |= decoded == eos_id
    stops = is_eos.any(dim=1) & running
    positions = torch.arange(x.shape[1] - generation_start, device=x.device)
    first_eos = torch.where(is_eos, positions[: decoded.shape[1]], x.shape[1]).min(dim=1).values
    after = (positions[None, :] > first_eos[:, None]) & stops[:, None]
    x[:, generation_start:] = x[:, generation_start:].masked_fill(after, eos_ids[0])
    return stops


# --------------------------------------------------------------------------- arguments


def _check_cache(model, cache) -> None:
    from unmask.models import DiffusionTransformer

    validation.check_choice("cache", cache, CACHE_MODES)
    if cache is not None and not isinstance(model, DiffusionTransformer):
        raise ValueError(f"cache={cache!r} needs the unmask model (unmask.from_pretrained); got {type(model).__name__}")


def prompt_batch(prompts, attention_mask, pad_id: int, device):
    """Prompts as ids [B, P] (left-padded) and the mask of real tokens [B, P]."""
    if isinstance(prompts, torch.Tensor):
        if validation.dtype_name(prompts) not in validation.INT_DTYPES or prompts.dim() != 2:
            raise ValueError(f"prompts must be an int tensor [B, P], got {prompts.dtype} {tuple(prompts.shape)}")
        if prompts.shape[0] == 0:
            raise ValueError("prompts: empty batch (B = 0)")
        ids = prompts.to(device=device, dtype=torch.int64)
        if attention_mask is None:
            return ids, torch.ones_like(ids, dtype=torch.bool)
        if tuple(attention_mask.shape) != tuple(prompts.shape):
            raise ValueError(f"attention_mask must have the prompts' shape {tuple(prompts.shape)}, got {tuple(attention_mask.shape)}")
        return ids, attention_mask.to(device=device, dtype=torch.bool)
    validation.prompt_list_batch(prompts, attention_mask)
    return left_pad(prompts, pad_id, device)


# Whether generate captures its step as a CUDA graph where that applies, when not told.
# Off until a GPU run has compared graph replay with eager decoding (python -m
# unmask.gpucheck does); the capture is then one step's work per decode.
CUDA_GRAPH_BY_DEFAULT = False


def _traced_step(cuda_graph: bool | None, compile_step: bool, step_model: _StepModel, device: torch.device,
                 eager_loop: str) -> Callable[[DenoiseStep], Callable] | None:
    """What wraps generate's denoising steps: _CudaGraphStep, torch.compile or None
    (eager). eager_loop: the argument that picked a loop which runs eagerly ("speculate"
    or "revise_threshold"), or "".

    compile=True traces the step with torch.compile on the CPU, where a CUDA graph could
    capture it on a GPU (the unmask model, no tensor parallelism; with a cache, no
    block-causal mask or shifted logits). On a GPU cuda_graph=True removes the launches;
    compile there is not run in any test, so it is refused. Dynamo keeps the code it
    generates with DenoiseStep.__call__, guarded by the step's types, shapes and
    constants, not by which step object runs: a later generate of the same shapes reuses
    it (a step that read a host value of its own generate would compile again;
    tests/test_step_graph.py checks that none does)."""
    validation.check_bool("compile", compile_step)
    if compile_step:
        if cuda_graph:
            raise ValueError("compile=True and cuda_graph=True do not combine: pick one way to trace the step")
        if eager_loop:
            raise ValueError(f"compile=True and {eager_loop} do not combine: that loop runs eagerly")
        if device.type != "cpu":
            raise ValueError(f"compile=True runs on the CPU (the model is on {device}); on a GPU, cuda_graph=True "
                             "captures the step")
        if not step_model.graphable:
            raise ValueError("compile=True needs the unmask model with cache=None, or a cache and neither a "
                             "block-causal mask nor shifted logits, and no tensor parallelism (cache="
                             f"{step_model.cache_mode!r}, model {type(step_model.model).__name__})")
        return functools.partial(torch.compile, fullgraph=True)
    return _CudaGraphStep if _use_cuda_graph(cuda_graph, step_model, device, eager_loop) else None


def _use_cuda_graph(cuda_graph: bool | None, step_model: _StepModel, device: torch.device, eager_loop: str) -> bool:
    """eager_loop: the argument that picked a loop which runs eagerly ("speculate" or
    "revise_threshold"), or ""."""
    if cuda_graph is not None and not isinstance(cuda_graph, bool):
        raise TypeError(f"cuda_graph must be a bool or None, got {type(cuda_graph).__name__}")
    if cuda_graph and eager_loop:
        raise ValueError(f"cuda_graph=True and {eager_loop} do not combine: that loop runs eagerly")
    applies = device.type == "cuda" and step_model.graphable and not eager_loop
    if cuda_graph and not applies:
        raise ValueError("cuda_graph=True needs the unmask model on a CUDA device with cache=None, or a cache and "
                         "neither a block-causal mask nor shifted logits, no tensor parallelism, and experts (if "
                         "any) in bfloat16 that the CUDA kernel takes (device "
                         f"{device}, cache={step_model.cache_mode!r}, model {type(step_model.model).__name__})")
    return applies and (CUDA_GRAPH_BY_DEFAULT if cuda_graph is None else cuda_graph)


def _eager_loop(speculate: int, revision: Revision | None) -> str:
    return "speculate" if speculate else "revise_threshold" if revision is not None else ""


def _to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on the device; to a GPU through pinned memory, without blocking (a
    plain copy from pageable memory waits for the device)."""
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def _model_device(model, device) -> torch.device:
    if device is not None:
        return torch.device(device)
    if isinstance(model, torch.nn.Module):
        for param in model.parameters():
            return param.device
    return torch.device("cpu")


# --------------------------------------------------------------------------- public API


def generate(
    model,
    prompts,
    *,
    attention_mask: torch.Tensor | None = None,
    gen_length: int = 128,
    block_length: int = 32,
    steps: int | None = None,
    threshold: float | None = None,
    factor: float | None = None,
    schedule: str = "llada",
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    remasking: str = "low_confidence",
    conf_temperature: float = 1.0,
    cfg_scale: float = 0.0,
    mask_id: int | None = None,
    eos_id: int | Sequence[int] | None = None,
    stop_at_eos: bool = True,
    seed: int = 0,
    callback: Callback | None = None,
    cache: str | None = None,
    block_grid: str = "prompt",
    cuda_graph: bool | None = None,
    compile: bool = False,
    speculate: int = 0,
    speculate_siblings: bool = True,
    revise_threshold: float | None = None,
    revise_groups: int = 2,
    max_revisions: int = 1,
    alg_temp: float | None = None,
    device: torch.device | str | None = None,
) -> GenerateOutput:
    """Decode gen_length tokens after each prompt with a masked diffusion LM.

    model: the unmask model, or any callable model(input_ids, attention_mask=None)
    returning logits [B, L, V] (or an object with .logits). prompts: an int tensor
    [B, P] (attention_mask [B, P] marks real tokens) or a list of token-id lists,
    left-padded here. One of steps (default gen_length: one token per step), threshold
    or factor picks the commit rule, or steps with threshold (each step's planned count
    a floor: SDAR's and LLaDA 2.0's rule); schedule spreads the steps rule's commits
    over a block's steps: "llada" (an even split, the first steps taking the remainder)
    or "dream" (Dream's timesteps from 1 to 1e-3, unmask.schedule.dream_counts).
    remasking picks the confidence that ranks positions; conf_temperature is the temperature
    of the softmax it is measured under (1: LLaDA's; Dream measures it at its sampling
    temperature: pass conf_temperature=temperature when temperature > 0).
    block_grid: "prompt" (blocks of block_length from the prompt's end) or "model" (for a
    block-causal model, config.block_size: blocks on the model's own grid, counted from
    each row's first token, as block diffusion models decode: the prompt's last partial
    block is completed first, and the last block runs to the grid's end, whose tokens past
    gen_length are decoded and dropped; a model with shifted logits, such as Fast-dLLM
    v2, commits the first position of each model block alone, predicted from the finished
    blocks before it, before the rest of the block; _model_grid_blocks).
    eos_id: where a row stops (stop_at_eos): after the block holding it, the rest of the
    row becomes EOS; an id, or a list of ids (any of them stops a row; the first pads and
    fills), default the model's eos_ids (generation_config.json's eos_token_id where the
    checkpoint has one, else config.json's).
    callback(step, canvas, committed)
    runs after every model call, step counting the calls (with speculate, one call takes
    several schedule steps: committed is their union, and the canvases between them are
    not shown). cache: None (a full forward every step), "prefix" or
    "dual" (reuse keys and values across the steps of a block; exact for block-causal
    models, an approximation for bidirectional ones), for the unmask model only.
    cuda_graph: capture the denoising step (model, sample, commit) as a CUDA graph once
    and replay it for every step and block; True needs the unmask model on a CUDA device
    with no tensor parallelism and no cache, or a cache on a model without a block-causal
    mask or shifted logits. None: CUDA_GRAPH_BY_DEFAULT where it applies.
    compile: trace the denoising step with torch.compile(fullgraph=True) (inductor) on the
    CPU, for the steps cuda_graph could capture on a GPU: for small models, where
    launching each operation costs more than computing it. The first call of a shape
    compiles (6-20 s for the dual cache's two graphs on 2 cores); later calls of that
    shape, in any generate, reuse the code. Inductor generates the pointwise operations
    (norms, rotary, SwiGLU) itself, whose last-bit rounding may differ from the eager
    kernels'.
    speculate: d > 0 drafts the next steps from the last logits and verifies up to d of
    them per model call (unmask.speculative): the tokens of speculate=0, in at most as
    many model calls (exactly so where the model's logits of a canvas do not depend on
    what shares its batch; README, Speculative decoding). speculate_siblings: each drafted
    step also drafts its runner-up commit (up to 2d - 1 canvases per call; fewer calls).
    revise_threshold (with threshold or factor): self-correction (unmask.revise); a token
    committed earlier in the active block is masked again when the model's probability
    of it, with its position masked, falls below revise_threshold, at most max_revisions
    times per position; each call also evaluates revise_groups verification canvases.
    alg_temp (Dream's, with steps alone): None or 0 commits each step's most confident
    positions; a positive temperature draws them, without replacement, with probabilities
    softmax(confidence / alg_temp) (drawn_positions), as Dream's torch.multinomial does.
    """
    num_blocks = validation.block_count(gen_length, block_length)
    sampling = validation.sampling(temperature=temperature, top_k=top_k, top_p=top_p, remasking=remasking, seed=seed,
                                   conf_temperature=conf_temperature)
    rule = validation.rule(steps, threshold, factor, num_blocks=num_blocks, default_steps=gen_length,
                           confidence=sampling.confidence, schedule=schedule)
    cfg_scale = validation.check_cfg_scale(cfg_scale)
    validation.check_int("speculate", speculate, low=0)
    validation.check_bool("speculate_siblings", speculate_siblings)
    revision = validation.revision(revise_threshold, revise_groups, max_revisions, rule=rule, speculate=speculate)
    alg_temp = validation.position_temperature(alg_temp, rule=rule, confidence=sampling.confidence,
                                               speculate=speculate)
    _check_cache(model, cache)
    validation.check_choice("block_grid", block_grid, validation.BLOCK_GRIDS)
    mask_id, eos_ids = validation.model_special_ids(model, mask_id, eos_id)
    pad_id = eos_ids[0] if eos_ids is not None else 0

    device = _model_device(model, device)
    # Checked on the host: from the lists themselves, or from a host copy of a tensor (one
    # synchronisation, before decoding starts, when the tensor lives on a device).
    ids, prompt_mask = prompt_batch(prompts, attention_mask, pad_id, "cpu")
    if isinstance(prompts, (list, tuple)):
        validation.prompt_lists(prompts, mask_id=mask_id, vocab=validation.model_vocab(model))
        padded = len({len(prompt) for prompt in prompts}) > 1
    else:
        validation.left_padded(prompt_mask)
        validation.prompt_ids(ids, prompt_mask, mask_id=mask_id, vocab=validation.model_vocab(model))
        padded = not bool(prompt_mask.all())
    given = ids  # sequences give the padding back as it came (-1, say)
    ids = ids.masked_fill(~prompt_mask, pad_id)  # the model embeds every position
    batch, prompt_len = ids.shape
    if block_grid == "model":
        blocks, masked_counts, decoded = _model_grid_blocks(model, prompt_mask, gen_length, block_length)
    else:
        blocks = [(prompt_len + i * block_length, prompt_len + (i + 1) * block_length) for i in range(num_blocks)]
        masked_counts, decoded = None, gen_length
    # The canvas, built on the host and copied over without blocking.
    x = _to_device(torch.cat([ids, torch.full((batch, decoded), mask_id, dtype=torch.int64)], dim=1), device)
    canvas_mask = torch.cat([prompt_mask, torch.ones(batch, decoded, dtype=torch.bool)], dim=1)
    prompt_positions = _to_device(canvas_mask & (torch.arange(canvas_mask.shape[1]) < prompt_len), device)
    # Padding is invisible to attention; with no padding, pass no mask at all.
    model_mask = _to_device(canvas_mask, device) if padded else None

    step_model = _StepModel(model, cache, model_mask, prompt_positions, mask_id, cfg_scale)
    if callback is not None and decoded > gen_length:  # it sees the canvas the result holds
        shown, inner = prompt_len + gen_length, callback

        def callback(step, canvas, committed):
            inner(step, canvas[:, :shown], committed[:, :shown])
    out = _run(step_model, x, blocks, rule, sampling, mask_id=mask_id, eos_ids=eos_ids if stop_at_eos else None,
               generation_start=prompt_len, callback=callback, masked_counts=masked_counts, speculate=speculate,
               siblings=speculate_siblings, revision=revision, full_block_plans=block_grid == "model",
               traced_step=_traced_step(cuda_graph, compile, step_model, device, _eager_loop(speculate, revision)),
               alg_temp=alg_temp)
    if decoded > gen_length:  # the model grid's tail past gen_length was decoded for its context alone
        sequences = out.sequences[:, :prompt_len + gen_length].clone()
        out = dataclasses.replace(out, tokens=sequences[:, prompt_len:], sequences=sequences)
    if padded:  # the prompt is never decoded: its region goes back as given, padding included
        out.sequences[:, :prompt_len].copy_(_to_device(given, device))
    return out


def _model_grid_blocks(model, prompt_mask: torch.Tensor, gen_length: int,
                       block_length: int) -> tuple[list[tuple[int, int]], list[list[int]], int]:
    """generate's blocks on a block-causal model's grid (block_grid="model"):
    unmask.schedule.grid_blocks for this model and these rows."""
    config = getattr(model, "config", None)
    return grid_blocks(getattr(config, "block_size", None), bool(getattr(config, "shift_logits", False)),
                       prompt_mask.sum(dim=1).tolist(), prompt_mask.shape[1], gen_length, block_length,
                       model_name=type(model).__name__)  # a host tensor: no device read


def infill(
    model,
    ids: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    block_length: int | None = None,
    steps: int | None = None,
    threshold: float | None = None,
    factor: float | None = None,
    schedule: str = "llada",
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    remasking: str = "low_confidence",
    conf_temperature: float = 1.0,
    mask_id: int | None = None,
    seed: int = 0,
    callback: Callback | None = None,
    speculate: int = 0,
    speculate_siblings: bool = True,
    revise_threshold: float | None = None,
    revise_groups: int = 2,
    max_revisions: int = 1,
) -> GenerateOutput:
    """Decode the mask tokens of ids [B, L] wherever they stand (editing, fill-in-the-middle).

    Blocks of block_length (default: the whole sequence) go left to right; steps
    defaults to one token per step for the row with the most masks per block, spread by
    schedule as in generate (each row planned from its own masks).
    revise_threshold: self-correction as in generate (given tokens are never masked).
    Returns the filled ids as .tokens (and .sequences).
    """
    mask_id = validation.model_special_id(model, mask_id, "mask_id", "mask_token_id")
    validation.special_ids(mask_id=mask_id, eos_id=None, vocab=validation.model_vocab(model))
    if not isinstance(ids, torch.Tensor) or validation.dtype_name(ids) not in validation.INT_DTYPES or ids.dim() != 2:
        raise ValueError(f"ids must be an int tensor [B, L], got {getattr(ids, 'dtype', type(ids).__name__)}")
    if ids.shape[0] == 0 or ids.shape[1] == 0:
        raise ValueError(f"ids must be non-empty, got shape {tuple(ids.shape)}")
    length = ids.shape[1]
    block_length = length if block_length is None else block_length
    validation.check_positive_int("block_length", block_length)
    validation.check_int("speculate", speculate, low=0)
    validation.check_bool("speculate_siblings", speculate_siblings)
    if length % block_length != 0:
        raise ValueError(f"block_length={block_length} must divide the sequence length {length}")
    num_blocks = length // block_length
    x = ids.to(device=_model_device(model, None), dtype=torch.int64).clone()
    model_mask = None
    if attention_mask is not None:
        if tuple(attention_mask.shape) != tuple(ids.shape):
            raise ValueError(f"attention_mask must have the shape of ids {tuple(ids.shape)}, got {tuple(attention_mask.shape)}")
        model_mask = attention_mask.to(device=x.device, dtype=torch.bool)
        given = x
        # padding is never decoded: it holds an id the model embeds (not the -1 it may be
        # given) and that is not the mask id (which the loop would take for a position to decode)
        x = x.masked_fill(~model_mask, 1 if mask_id == 0 else 0)
    # The masks of every block (padding excluded), read once with the range of the given
    # ids: the loop plans each block's steps from them, and the default step count is one
    # token per step for the busiest row.
    masked = (x == mask_id) if model_mask is None else (x == mask_id) & model_mask
    given_ids = ~masked if model_mask is None else model_mask & ~masked
    read = torch.cat([masked.reshape(x.shape[0], num_blocks, block_length).sum(dim=-1).t().reshape(-1),
                      torch.where(given_ids, x, torch.iinfo(torch.int64).max).min().reshape(1),
                      torch.where(given_ids, x, -1).max().reshape(1)]).tolist()
    validation.id_range(read[-2], read[-1], vocab=validation.model_vocab(model), name="ids")
    masked_counts = [read[block * x.shape[0]:(block + 1) * x.shape[0]] for block in range(num_blocks)]
    default_steps = max(1, max(max(block) for block in masked_counts)) * num_blocks
    sampling = validation.sampling(temperature=temperature, top_k=top_k, top_p=top_p, remasking=remasking, seed=seed,
                                   conf_temperature=conf_temperature)
    rule = validation.rule(steps, threshold, factor, num_blocks=num_blocks, default_steps=default_steps,
                           confidence=sampling.confidence, schedule=schedule)
    revision = validation.revision(revise_threshold, revise_groups, max_revisions, rule=rule, speculate=speculate)

    blocks = [(i * block_length, (i + 1) * block_length) for i in range(num_blocks)]
    step_model = _StepModel(model, None, model_mask, torch.zeros_like(x, dtype=torch.bool), mask_id, 0.0)
    out = _run(step_model, x, blocks, rule, sampling, mask_id=mask_id, eos_ids=None, generation_start=0,
               callback=callback, masked_counts=masked_counts, speculate=speculate, siblings=speculate_siblings,
               revision=revision)
    if model_mask is not None:  # padding goes back as given
        out.sequences.copy_(torch.where(model_mask, out.sequences, given))
        out.tokens.copy_(out.sequences)
    return out
