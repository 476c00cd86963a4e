"""The serving engine: one thread owns the model and runs denoising steps for every
active request at once (docs/design.md, Serving).

Each step: one model call over the canvases of all active requests (right-padded to one
width; a CFG request adds its unconditional canvas; after its block's first step, a
request with a key/value cache sends only the segment its cache recomputes, at its own
position: one packed forward of those groups of rows), then sample and commit per group of
requests that may share a kernel call, then per-request bookkeeping (block ends, EOS,
stop strings, streaming). Requests join at any step (their own first block starts
then) and leave when they finish or are cancelled, so requests at different positions
in their generation, with different lengths and settings, share steps.

A request's tokens do not depend on its companions: its noise is addressed by its own
seed and step count and by its position in its own block, never by its row in the batch.
Requests that draw no noise (temperature 0, a confidence other than "random") share one
sample call per (block length, sampling settings); a request that draws noise gets a
call of its own ([1, block, V] logits, offset = its step count), exactly what
unmask.generate makes for it alone. The model call is shared by all; its logits equal a
lone call's up to float rounding (the GEMMs see another batch; see README, Serving).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import itertools
import threading
from collections.abc import Callable

import torch

from unmask import ops, sampler, schedule
from unmask.models.transformer import DiffusionTransformer, KVCache, Rows, RowSegments
from unmask.serving.protocol import Settings, cut_at_stop

MASK_PLACEHOLDER = "\u2591"  # one per masked position in the streamed canvas
# Model steps failing in a row (running out of memory aside) that stop the engine (_loop).
MAX_FAILED_STEPS = 3


class BrokenDevice(RuntimeError):
    """MAX_FAILED_STEPS model steps failed in a row: the engine stops."""


class QueueFull(RuntimeError):
    """More requests waiting than the server's --max-queue."""


class Unavailable(RuntimeError):
    """The engine takes no more requests (shutting down, or its thread failed)."""


def check_admission(stopping: bool, dead: str | None, held: int, max_batch: int, max_queue: int,
                    adding: int = 1) -> None:
    """What submit() refuses: Unavailable when shutting down or the steps stopped,
    QueueFull when the requests held (decoding or waiting) and the `adding` new ones
    would not fit max_batch + max_queue."""
    if stopping or dead is not None:
        raise Unavailable("the server is shutting down" if stopping else f"the engine stopped: {dead}")
    if held + adding > max_batch + max_queue:
        waiting = max(0, held - max_batch)
        more = "" if adding == 1 else f", no room for {adding} more"
        raise QueueFull(f"{waiting} requests are waiting (--max-queue {max_queue}){more}")


@dataclasses.dataclass(eq=False)  # a request is itself: found in queues by identity
class Job:
    """One request's state: its canvas (settings.canvas_length) and where its decoding
    stands: the active block, an index into settings.blocks."""

    settings: Settings
    mask_id: int
    eos_ids: tuple[int, ...] | None  # where its answer ends (any of them)
    on_event: Callable[[dict], None]  # thread-safe: called from the engine thread
    canvas: torch.Tensor = None
    block: int = 0  # the active block
    plan: list[int] | None = None  # steps rule: tokens per step of the active block (steps that commit some)
    step_in_block: int = 0
    offset: int = 0  # the RNG step: schedule steps taken so far, as unmask.generate counts them
    # with settings.cache: the cache its block's first step filled (its rows from kv_row on,
    # beside the other requests of that fill), until the engine stacks them with other
    # requests' (then they live in the stack)
    kv: KVCache | None = None
    kv_row: int = 0
    kv_fill: int = -1  # which fill of the engine's made kv
    sent_text: str = ""
    cancelled: bool = False
    finished: bool = False

    def __post_init__(self):
        s = self.settings
        self.canvas = torch.tensor(list(s.prompt) + [self.mask_id] * (s.canvas_length - len(s.prompt)),
                                   dtype=torch.int64)
        self._start_block()

    @property
    def prompt_length(self) -> int:
        return len(self.settings.prompt)

    @property
    def canvases(self) -> int:
        """Rows it takes in a model call: its canvas, and the unconditional one under CFG."""
        return 2 if self.settings.cfg_scale > 0 else 1

    def block_range(self) -> tuple[int, int]:
        """The active block's canvas positions [start, end)."""
        return self.settings.blocks[self.block]

    @property
    def block_length(self) -> int:
        """The active block's: block_length, or less on the model's grid where a model
        with shifted logits decodes the first position of its blocks alone."""
        start, end = self.block_range()
        return end - start

    def _start_block(self) -> None:
        self.step_in_block = 0
        rule = self.settings.rule
        if rule.steps_per_block is not None:  # as unmask.generate plans it; zero-commit steps cost no call
            start, end = self.block_range()
            masked = end - max(start, self.prompt_length)
            self.plan = schedule.block_plans([masked], end - start, rule.steps_per_block, rule.schedule,
                                             full_block=self.settings.block_grid == "model")[0]

    def generated(self) -> list[int]:
        """The canvas after the prompt: the answer's positions (max_tokens, then the rest of
        the last block) and, on the model's grid, the rest of the model's block."""
        return self.canvas[self.prompt_length:].tolist()


class Engine:
    """The decode loop of the server, on its own thread. submit() and cancel() may be
    called from any thread."""

    def __init__(self, model, tokenizer, *, max_batch: int, max_queue: int,
                 after_step: Callable[[], None] | None = None):
        # after_step: called on the engine thread once a step's events are all out (and
        # after the events of a failure that ends the thread): lets a caller send them on
        # together (unmask.serving.engine_process).
        if getattr(model, "vocab_shard", None) is not None:
            # its logits are one rank's slice of the vocabulary; the engine samples them
            # with ops.sample, which would take slice-local ids for tokens
            raise ValueError("model: a tensor-parallel model (unmask.distributed) samples across its ranks; the "
                             "server's engine runs one device's model")
        self.model, self.tokenizer = model, tokenizer
        self.after_step = after_step
        self.max_batch, self.max_queue = max_batch, max_queue
        self.waiting: collections.deque[Job] = collections.deque()
        self.active: list[Job] = []
        self.condition = threading.Condition()
        self.stopping = False
        self.dead: str | None = None  # why the engine thread ended, if it failed
        self.steps = 0  # model calls so far (for /health)
        self._pieces: dict[int, str] = {}  # token -> its text alone, for the streamed canvas
        self._fills = itertools.count()  # names each fill of a request's cache
        self._stacked: dict = {}  # segment shape -> (the fills it holds, their caches stacked, fill -> first row)
        self.thread = threading.Thread(target=self._run, name="unmask-engine", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        """Finish every request admitted or waiting, then end the thread."""
        with self.condition:
            self.stopping = True
            self.condition.notify_all()
        self.thread.join()

    @property
    def capacity(self) -> int:
        """The requests it holds at once, decoding and waiting."""
        return self.max_batch + self.max_queue

    def submit(self, *jobs: Job) -> None:
        """Queues the jobs (a request's choices), all or none (QueueFull, Unavailable)."""
        with self.condition:
            check_admission(self.stopping, self.dead, len(self.active) + len(self.waiting), self.max_batch,
                            self.max_queue, adding=len(jobs))
            self.waiting.extend(jobs)
            self.condition.notify_all()

    def cancel(self, job: Job) -> None:
        """The client went away: its rows are freed at the next step (a waiting request
        leaves the queue now)."""
        job.cancelled = True
        with self.condition:
            if job in self.waiting:
                self.waiting.remove(job)
            self.condition.notify_all()

    def load(self) -> dict:
        with self.condition:
            return {"active": len(self.active), "waiting": len(self.waiting), "steps": self.steps}

    # ------------------------------------------------------------------ the loop

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as error:  # never leave clients waiting on a thread that is gone
            with self.condition:
                self.dead = f"{type(error).__name__}: {error}"
                stranded = list(self.active) + list(self.waiting)
                self.waiting.clear()
            for job in stranded:
                with contextlib.suppress(Exception):
                    self._fail(job, f"the engine stopped: {self.dead}", status=503)
            if self.after_step is not None:
                self.after_step()
            if not isinstance(error, BrokenDevice):  # that one is said in self.dead, and /health gives it
                raise

    def _loop(self) -> None:
        failed_in_a_row = 0  # model steps, out-of-memory aside
        while True:
            with self.condition:
                self.active = [job for job in self.active if not (job.cancelled or job.finished)]
                while self.waiting and len(self.active) < self.max_batch:
                    job = self.waiting.popleft()
                    if not job.cancelled:
                        self.active.append(job)
                if not self.active:
                    self._stacked = {}  # idle: no cache outlives its requests
                    if self.stopping and not self.waiting:
                        return
                    self.condition.wait()
                    continue
                jobs = list(self.active)
            try:
                self._step(jobs)
                failed_in_a_row = 0
            except Exception as error:  # a failure of the shared model call: these requests fail, not the server
                for job in jobs:
                    self._fail(job, f"the model step failed: {type(error).__name__}: {error}")
                # Each failed step fails its own requests, so steps that keep failing for new
                # ones mean a broken device (a sticky CUDA error fails every later call), not a
                # bad request: the engine stops, /health answers 503 and a supervisor restarts
                # the server. Running out of memory (one huge request) does not count.
                failed_in_a_row = 0 if isinstance(error, torch.OutOfMemoryError) else failed_in_a_row + 1
                if failed_in_a_row >= MAX_FAILED_STEPS:
                    raise BrokenDevice(f"{failed_in_a_row} model steps failed in a row, the last with "
                                       f"{type(error).__name__}: {error}") from error
            self.steps += 1
            if self.after_step is not None:
                self.after_step()

    def _step(self, jobs: list[Job]) -> None:
        logits = self._block_logits(jobs)
        tokens, conf = {}, {}
        for group in _groups(jobs, _sampling_key):
            self._guarded(group, lambda group=group: self._sample(group, logits, tokens, conf))
        for group in _groups([j for j in jobs if id(j) in tokens], _commit_key):
            self._guarded(group, lambda group=group: self._commit(group, tokens, conf))

    def _guarded(self, group: list[Job], work: Callable[[], None]) -> None:
        try:
            work()
        except Exception as error:  # one group's kernel call failed: its requests fail
            for job in group:
                self._fail(job, f"{type(error).__name__}: {error}")

    def _block_logits(self, jobs: list[Job]) -> dict[int, torch.Tensor]:
        """Each job's active block's logits [block_length, V], CFG applied, from one model
        call (a packed forward, DiffusionTransformer.forward_packed) of several groups of
        rows: the whole canvases of the jobs without a cache and of the cached jobs at
        their block's first step (which fills their caches), and one group per segment
        shape for the cached jobs' later steps, each row recomputing its own segment (its
        block, and the rest of its canvas under "prefix") over its own cache, as
        unmask.generate's cache does for a lone request."""
        plain = [job for job in jobs if job.settings.cache is None]
        filling = [job for job in jobs if job.settings.cache is not None and job.step_in_block == 0]
        cached = [job for job in jobs if job.settings.cache is not None and job.step_in_block > 0]
        stacked, self._stacked = self._stacked, {}
        groups = [(group, self._whole_canvas_rows(group, fill=group is filling)) for group in (plain, filling) if group]
        groups += [self._segment_rows(group, stacked) for group in _groups(cached, self._segment_key)]
        with torch.inference_mode():
            if isinstance(self.model, DiffusionTransformer):  # as the server decides which requests may cache
                logits = self.model.forward_packed([rows for _, rows in groups])
            else:  # another model (no cache): its own call
                (_, rows), = groups
                logits = [self.model(rows.input_ids, rows.attention_mask, logit_positions=rows.logit_positions)]
        out = {}
        for (group, rows), group_logits in zip(groups, logits):
            if group is filling:  # each job knows its rows of the new cache until a stack takes them
                r = 0
                for job in group:
                    job.kv, job.kv_row, job.kv_fill = rows.cache, r, next(self._fills)
                    r += job.canvases
            out.update(self._guided(group, group_logits))
        return out

    @staticmethod
    def _rows(jobs: list[Job]) -> list[tuple[Job, torch.Tensor]]:
        """The canvases a model call runs: each job's, and the unconditional one of a CFG job."""
        rows = []
        for job in jobs:
            rows.append((job, job.canvas))
            if job.canvases == 2:
                unconditional = job.canvas.clone()
                unconditional[:job.prompt_length] = job.mask_id
                rows.append((job, unconditional))
        return rows

    def _padded(self, rows: list[tuple[Job, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """ids [R, W] with the canvases padded on the right, so every position keeps its
        index of a lone call (block-causal masks and rotary positions see the canvas as
        alone; the padding keys are hidden by the mask [R, W], None where no row is
        padded), and each row's block positions [R, widest block] for the LM head, which
        runs on each row's own block only (shorter blocks repeat their last position)."""
        # A few whole-batch operations, not a few per row: at 16 rows a loop cost ~0.2 ms a step.
        lengths = [len(canvas) for _, canvas in rows]
        pad = self.model.eos_id if getattr(self.model, "eos_id", None) is not None else 0
        ids = torch.nn.utils.rnn.pad_sequence([canvas for _, canvas in rows], batch_first=True, padding_value=pad)
        known = None
        if min(lengths) != max(lengths):
            known = torch.arange(ids.shape[1]) < torch.tensor(lengths)[:, None]
        widest = max(job.block_length for job, _ in rows)
        block_ranges = torch.tensor([job.block_range() for job, _ in rows])  # [R, 2]: start, end
        positions = torch.minimum(block_ranges[:, :1] + torch.arange(widest), block_ranges[:, 1:] - 1)
        device = next(self.model.parameters()).device
        return ids.to(device), None if known is None else known.to(device), positions.to(device)

    @staticmethod
    def _guided(jobs: list[Job], logits: torch.Tensor) -> dict[int, torch.Tensor]:
        """Each job's block logits out of a call's rows (laid out as _rows lays them out),
        guided in the model's dtype as unmask.generate guides."""
        out, r = {}, 0
        for job in jobs:
            block = logits[r, :job.block_length]
            if job.canvases == 2:
                block = sampler.guide(block, logits[r + 1, :job.block_length], job.settings.cfg_scale)
            out[id(job)] = block
            r += job.canvases
        return out

    def _whole_canvas_rows(self, jobs: list[Job], *, fill: bool) -> Rows:
        """The jobs' whole canvases; with fill, into a new cache (their blocks' first steps)."""
        ids, known, positions = self._padded(self._rows(jobs))
        return Rows(ids, known, positions, self.model.new_cache(*ids.shape) if fill else None)

    def _segment(self, job: Job) -> tuple[int, int]:
        """The positions a cached step recomputes, as unmask.generate's cache picks them
        (DiffusionTransformer.recomputed_segment)."""
        start, end = job.block_range()
        return self.model.recomputed_segment(start, end, len(job.canvas), job.settings.cache)

    def _segment_key(self, job: Job):
        first, stop = self._segment(job)
        block_causal = self.model.config.block_size is not None  # its mask takes one query offset per call
        return stop - first, job.block_length, first if block_causal else None

    def _segment_rows(self, jobs: list[Job], stacked: dict) -> tuple[list[Job], Rows]:
        """Later steps of cached blocks: every row its own segment over its own cache. The
        jobs come back in the order of their rows.

        The jobs' caches, stacked into one, are kept for the next step while the same
        fills share the group: a step writes only the rows' segments, which every step
        recomputes before any query reads them, so the rest stays as each fill left it.
        A job's keys and values live in one place: the cache of its fill until its first
        stacking, then its rows of the stack. A new stack gathers the jobs still in the
        last one, in their order there, then the newcomers by fill: a few runs of rows,
        each gathered in one operation per tensor (KVCache.gathered)."""
        key = self._segment_key(jobs[0])
        held_fills, cache, held_rows = stacked.get(key, (None, None, {}))
        jobs = sorted(jobs, key=lambda job: (0, held_rows[job.kv_fill]) if job.kv is None else (1, job.kv_fill))
        rows = self._rows(jobs)
        ids, known, positions = self._padded(rows)
        fills = tuple(job.kv_fill for job in jobs)
        if held_fills != fills:
            pieces, placed, row = [], {}, 0
            for job in jobs:
                source, first = (cache, held_rows[job.kv_fill]) if job.kv is None else (job.kv, job.kv_row)
                if not pieces or pieces[-1][0] is not source:
                    pieces.append((source, []))
                pieces[-1][1].extend(range(first, first + job.canvases))
                placed[job.kv_fill], row = row, row + job.canvases
            cache, held_rows = KVCache.gathered(pieces, ids.shape[1]), placed
            for job in jobs:
                job.kv = None
        self._stacked[key] = fills, cache, held_rows
        segments = RowSegments([self._segment(job)[0] for job, _ in rows], key[0])
        return jobs, Rows(ids, known, positions, cache, segments)

    def _sample(self, group: list[Job], logits: dict, tokens: dict, conf: dict) -> None:
        s = group[0].settings.sampling
        stacked = torch.stack([logits[id(job)] for job in group])  # [n, block, V]
        offset = group[0].offset if len(group) == 1 else 0  # shared calls draw no noise
        alg_temp = group[0].settings.alg_temp  # (a job with one samples alone: it draws noise)
        sample = ops.sample if alg_temp is None else sampler.drawn_positions(ops.sample, alg_temp)
        got_tokens, got_conf = sample(stacked, **s.options, banned=[group[0].mask_id], seed=s.seed, offset=offset,
                                      check=False)
        # one host copy per group, not one per request and output
        for job, job_tokens, job_conf in zip(group, got_tokens.cpu().unbind(), got_conf.cpu().unbind()):
            tokens[id(job)], conf[id(job)] = job_tokens, job_conf

    def _commit(self, group: list[Job], tokens: dict, conf: dict) -> None:
        rule = group[0].settings.rule
        blocks = torch.stack([job.canvas[slice(*job.block_range())] for job in group])
        eligible = blocks == group[0].mask_id
        token_rows = torch.stack([tokens[id(job)] for job in group])
        invalid = ((token_rows < 0) & eligible).any(dim=1)
        counts = None
        if rule.steps_per_block is not None:  # the plan's count (with a threshold, each step's floor)
            counts = torch.tensor([job.plan[job.step_in_block] for job in group], dtype=torch.int64)
        mode = rule.commit_options(counts)
        committed = ops.commit(blocks, token_rows, torch.stack([conf[id(job)] for job in group]), eligible, **mode)
        remaining = (eligible & ~committed).any(dim=1)
        # the group's flags as Python values once, not a tensor read per request
        for job, block, failed, masked_left in zip(group, blocks.unbind(), invalid.tolist(), remaining.tolist()):
            if failed:
                self._fail(job, "the model gave NaN or +inf logits, or no finite logit but the mask, "
                                "for a masked position")
                continue
            job.canvas[slice(*job.block_range())] = block
            job.step_in_block += 1
            job.offset += 1
            if rule.steps_per_block is not None:  # a threshold beside the plan can finish the block early
                block_done = job.step_in_block == len(job.plan) or (rule.threshold is not None and not masked_left)
            else:
                block_done = not masked_left
            try:
                self._advance(job, block_done)
            except Exception as error:  # this request's bookkeeping (tokenizer, events) failed: it alone fails
                self._fail(job, f"{type(error).__name__}: {error}")

    # ------------------------------------------------------------------ per request

    def _advance(self, job: Job, block_done: bool) -> None:
        """Stream what became final, and end the block or the request where it ends."""
        if not (block_done or job.settings.stream):
            return  # nothing to send or decide: the answer's text is decoded at block ends only, not every step
        generated = job.generated()
        tokens, at_eos = self._final_tokens(job, generated)
        decoded = self.tokenizer.decode(tokens)
        text, stopped = cut_at_stop(decoded, job.settings.stop)
        last_block = job.block == len(job.settings.blocks) - 1
        finish = None
        if block_done:
            decoded_blocks = generated[:job.block_range()[1] - job.prompt_length]
            if stopped or not set(job.eos_ids or ()).isdisjoint(decoded_blocks):
                finish = "stop"  # unmask.generate stops a row at the end of the block holding its EOS
            elif last_block:
                finish = "length"
        if job.settings.stream:
            hold = 0 if finish else max((len(s) - 1 for s in job.settings.stop), default=0)  # a stop string may be forming
            visible = text[:max(len(job.sent_text), len(text) - hold)]
            if not finish:  # a byte-level tokenizer decodes a character's first bytes as U+FFFD until it is whole
                visible = visible.rstrip("\ufffd")
            delta = visible[len(job.sent_text):] if visible.startswith(job.sent_text) else ""
            # every step commits: each sends what became final (maybe nothing) and the canvas
            job.on_event({"kind": "delta", "text": delta, "canvas": self._canvas(job, generated), "step": job.offset})
            job.sent_text += delta
        if finish is not None:
            job.finished, job.kv = True, None
            # "stop" where EOS or a stop string ended the answer within max_tokens, else "length"
            reason = "stop" if at_eos or stopped else "length"
            completion = len(tokens) if text == decoded else self._tokens_of(text, tokens)
            usage = {"prompt_tokens": job.prompt_length, "completion_tokens": completion,
                     "total_tokens": job.prompt_length + completion}
            job.on_event({"kind": "done", "text": text, "finish_reason": reason, "usage": usage})
        elif block_done:
            job.block += 1
            job._start_block()

    @staticmethod
    def _final_tokens(job: Job, generated: list[int]) -> tuple[list[int], bool]:
        """The answer's tokens that are final in reading order (up to the first mask), cut
        at EOS and max_tokens; and whether EOS cut them."""
        final = []
        for token in generated[:job.settings.max_tokens]:
            if token == job.mask_id:
                return final, False
            if token in (job.eos_ids or ()):
                return final, True
            final.append(token)
        return final, False

    def _tokens_of(self, text: str, tokens: list[int]) -> int:
        """How many of the answer's tokens the text cut at a stop string holds: the
        shortest prefix of them that decodes to the text and beyond (so usage counts
        the tokens that made the answer, as decoded, not a re-encoding of it, which may
        split otherwise or add a BOS). Decoded prefixes grow with their length, so a
        bisection takes log2(len(tokens)) decodes."""
        low, high = 0, len(tokens)  # decode(tokens[:high]) starts with text (the text is a cut of it)
        while low < high:
            middle = (low + high) // 2
            if self.tokenizer.decode(tokens[:middle]).startswith(text):
                high = middle
            else:
                low = middle + 1
        return high

    def _piece(self, token: int) -> str:
        piece = self._pieces.get(token)
        if piece is None:
            piece = self._pieces[token] = self.tokenizer.decode([token])
        return piece

    def _canvas(self, job: Job, generated: list[int]) -> str:
        return "".join(MASK_PLACEHOLDER if t == job.mask_id else self._piece(t)
                       for t in generated[:job.settings.max_tokens])

    def _fail(self, job: Job, message: str, status: int = 500) -> None:
        """status: the HTTP status a response not yet begun answers with (500: this
        request's step failed; 503: the engine stopped, a restart may serve it)."""
        if not job.finished:
            job.finished, job.kv = True, None
            with contextlib.suppress(Exception):  # a client whose loop is gone hears nothing, the engine goes on
                job.on_event({"kind": "error", "message": message, "status": status})


def _sampling_key(job: Job):
    s = job.settings.sampling
    draws_noise = s.temperature > 0 or s.confidence == "random" or job.settings.alg_temp is not None
    if draws_noise:
        return "alone", id(job)
    # every option but the seed, which a call that draws no noise does not read (as the JAX
    # loop's BlockProgram keys its compiled programs)
    return "shared", job.block_length, dataclasses.replace(s, seed=0)


def _commit_key(job: Job):
    return job.block_length, job.settings.rule


def _groups(jobs: list[Job], key) -> list[list[Job]]:
    grouped: dict = {}
    for job in jobs:
        grouped.setdefault(key(job), []).append(job)
    return list(grouped.values())
