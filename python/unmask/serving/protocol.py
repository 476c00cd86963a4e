"""The OpenAI wire format of unmask serve: request bodies checked into a Job's settings
(every rule through unmask.validation, errors naming the field as OpenAI's `param`),
and the response and stream-chunk bodies."""

from __future__ import annotations

import dataclasses
import time
import uuid

from unmask import schedule, validation

# Diffusion decoding parameters a body may carry beside OpenAI's fields.
DIFFUSION_FIELDS = ("block_length", "steps", "schedule", "threshold", "factor", "remasking", "conf_temperature",
                    "cfg_scale", "cache", "speculate", "block_grid", "alg_temp")
OPENAI_FIELDS = ("model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stream", "stream_options",
                 "n", "user")
# OpenAI fields the server does not implement, with the values that ask for nothing (a
# client that sends every field at its default is served; any other value is a 400
# naming the field). Not 0 for logprobs: a legacy completion's logprobs=0 still asks for
# the chosen tokens' log probabilities.
NEUTRAL_FIELDS = {"logprobs": (None, False), "top_logprobs": (None, 0), "echo": (None, False), "best_of": (None, 1),
                  "suffix": (None,), "frequency_penalty": (None, 0), "presence_penalty": (None, 0),
                  "logit_bias": (None, {}), "response_format": (None, {"type": "text"}), "tools": (None, []),
                  "tool_choice": (None, "none")}
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions
MAX_CHOICES = 128  # n: OpenAI's limit
# A body's block_length on the prompt's grid where neither it nor the server sets one (cut
# to max_tokens); on the model's grid the default is the model's block_size.
DEFAULT_BLOCK_LENGTH = 32


class RequestError(ValueError):
    """A request the server refuses with HTTP 400; param names the offending field."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.status, self.kind = message, param, status, kind


def error_body(message: str, param: str | None = None, kind: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


@dataclasses.dataclass(frozen=True)
class Settings:
    """What a request asks the engine for (the arguments unmask.generate would take)."""

    prompt: tuple[int, ...]
    gen_length: int
    block_length: int
    rule: validation.Rule
    sampling: validation.Sampling
    cfg_scale: float
    cache: str | None  # unmask.generate's cache: None, "prefix" or "dual"
    max_tokens: int  # the answer is cut to this many tokens (gen_length is whole blocks)
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk with the usage
    block_grid: str  # unmask.generate's: "prompt" or "model"
    # the canvas positions [start, end) of the blocks decoded, in order: to the one holding
    # the answer's last position (max_tokens), past which nothing can change the answer
    blocks: tuple[tuple[int, int], ...]
    canvas_length: int  # the prompt and the positions after it that the model sees
    n: int = 1  # choices: choice i decodes with seed + i (choice())
    alg_temp: float | None = None  # Dream's: positions drawn (unmask.sampler.drawn_positions)

    def choice(self, index: int) -> Settings:
        """Choice `index` of n: one completion with seed + index, so each choice is the
        answer a request with that seed and n = 1 gets, and choices that draw noise
        differ (with temperature 0 and a confidence that draws none they are the same)."""
        sampling = dataclasses.replace(self.sampling, seed=self.sampling.seed + index)
        return dataclasses.replace(self, sampling=sampling, n=1)

    def generate_arguments(self) -> dict:
        """The same decoding through unmask.generate (tests compare the two)."""
        rule = self.rule
        steps = None if rule.steps_per_block is None else rule.steps_per_block * (self.gen_length // self.block_length)
        remasking = {v: k for k, v in validation.REMASKING_TO_CONFIDENCE.items()}[self.sampling.confidence]
        return {"gen_length": self.gen_length, "block_length": self.block_length, "steps": steps,
                "schedule": rule.schedule, "threshold": rule.threshold, "factor": rule.factor,
                "temperature": self.sampling.temperature,
                "top_k": self.sampling.top_k, "top_p": self.sampling.top_p, "remasking": remasking,
                "conf_temperature": self.sampling.conf_temperature,
                "cfg_scale": self.cfg_scale, "cache": self.cache, "seed": self.sampling.seed,
                "block_grid": self.block_grid, "alg_temp": self.alg_temp}


def _checked(param: str, check, *args, **kwargs):
    """A validation call whose errors become RequestErrors naming param."""
    try:
        return check(*args, **kwargs)
    except (TypeError, ValueError) as error:
        raise RequestError(str(error), param) from None


def _param_of(error: Exception, candidates: tuple[str, ...]) -> str | None:
    """The field a multi-field check complained about: its message starts with the name."""
    text = str(error)
    return next((name for name in candidates if text.startswith(name)), None)


def settings(body: dict, *, prompt: list[int], default_block_length: int | None, max_context: int,
             vocab: int | None, mask_id: int, caches: bool = True, default_cache: str | None = None,
             chat: bool = False, model_blocks: tuple[int, bool] | None = None,
             default_block_grid: str = "prompt") -> Settings:
    """A completion request's decoding settings, checked (RequestError on any bad field).
    default_block_length: a body's block_length where it gives none (None: the model's
    block_size on its grid, else DEFAULT_BLOCK_LENGTH; on the prompt's grid cut to max_tokens);
    caches: whether the model takes a key/value cache (the unmask model does);
    default_cache: the cache of a body without the field (null in the body means none);
    chat: a chat completion's body (max_completion_tokens, OpenAI's newer name for
    max_tokens there, is taken too); model_blocks: a block-causal model's block_size and
    whether its logits are shifted (None: the model has no blocks, block_grid="model" is
    refused); default_block_grid: the block_grid of a body without the field."""
    # a completion's prompt is `prompt`, a chat's is `messages`: a body with the other
    # field is refused, not served with that field silently unread
    own = ("messages", "max_completion_tokens") if chat else ("prompt",)
    unknown = sorted(set(body) - set(OPENAI_FIELDS) - set(DIFFUSION_FIELDS) - set(NEUTRAL_FIELDS) - set(own))
    if unknown:
        other = {"prompt": "/v1/completions", "messages": "/v1/chat/completions"}.get(unknown[0])
        if other is not None:
            raise RequestError(f"{unknown[0]} belongs to {other}; this endpoint takes "
                               f"{'messages' if chat else 'prompt'}", unknown[0])
        raise RequestError(f"unknown field {unknown[0]!r}", unknown[0])
    for name, neutral in NEUTRAL_FIELDS.items():
        if name in body and not any(validation.same_value(body[name], value) for value in neutral):
            raise RequestError(f"{name} is not supported by this server (it accepts only {neutral}), "
                               f"got {body[name]!r}", name)
    n = _checked("n", validation.check_int, "n", _default(body, "n", 1), low=1, high=MAX_CHOICES + 1)
    if body.get("speculate", 0) not in (0, None):
        raise RequestError("speculate is not supported by the server (use unmask.generate(speculate=d))", "speculate")
    block_grid = _default(body, "block_grid", default_block_grid)
    _checked("block_grid", validation.check_choice, "block_grid", block_grid, validation.BLOCK_GRIDS)
    if block_grid == "model" and model_blocks is None:
        raise RequestError("block_grid='model' needs a block-causal model (config.block_size); this server's model "
                           "has none", "block_grid")
    stream = _default(body, "stream", False)
    if not isinstance(stream, bool):
        raise RequestError(f"stream must be a bool, got {type(stream).__name__}", "stream")
    include_usage = _stream_options(body.get("stream_options"), stream)
    max_tokens, length_field = body.get("max_tokens"), "max_tokens"
    if chat and body.get("max_completion_tokens") is not None:
        if max_tokens is not None and max_tokens != body["max_completion_tokens"]:
            raise RequestError("give max_completion_tokens or max_tokens (its older name), not two different "
                               "values", "max_completion_tokens")
        max_tokens, length_field = body["max_completion_tokens"], "max_completion_tokens"
    max_tokens = DEFAULT_MAX_TOKENS if max_tokens is None else _checked(length_field, validation.check_int,
                                                                         length_field, max_tokens, low=1)
    block_length = body.get("block_length")
    if block_length is None and block_grid == "model":
        block_length = model_blocks[0] if default_block_length is None else default_block_length
    elif block_length is None:
        block_length = min(DEFAULT_BLOCK_LENGTH if default_block_length is None else default_block_length, max_tokens)
    _checked("block_length", validation.check_positive_int, "block_length", block_length)
    # in integers: max_tokens and block_length may be any size here
    gen_length = -(-max_tokens // block_length) * block_length  # whole blocks; the answer is cut after
    prompt_field = "messages" if chat else "prompt"  # where a chat's prompt came from
    # The canvas's length is checked before any block is listed (a list as long as a
    # huge max_tokens would stall the event loop): the blocks fit the context after it.
    if block_grid == "model":
        block_size, shifted = model_blocks
        try:
            grid = validation.model_grid(block_size, block_length, [len(prompt)], shifted=shifted,
                                         model_name="the model")
        except ValueError as error:
            raise RequestError(f"{error}{_server_default(body)}", "block_length") from None
        canvas_length = -(-(len(prompt) + max_tokens) // grid) * grid
        rounding, rounding_field = f"decoded to the end of the grid block of {grid} holding its end", (
            "block_length" if block_length > block_size else length_field)  # the model's blocks set the grid
    else:
        canvas_length = len(prompt) + gen_length
        rounding, rounding_field = f"rounded to whole blocks of {block_length} ({gen_length})", "block_length"
    if canvas_length > max_context:
        # the field to change: the prompt when it alone fills the context, else the one
        # that rounds the answer past it (block_length, or max_tokens where the model's
        # own blocks round it)
        param = (prompt_field if len(prompt) >= max_context else length_field
                 if len(prompt) + max_tokens > max_context else rounding_field)
        hint = _server_default(body) if param == "block_length" else ""
        raise RequestError(f"the prompt ({len(prompt)} tokens) and {length_field}={max_tokens} {rounding} "
                           f"({canvas_length} tokens) exceed the context of {max_context} tokens{hint}", param)
    if block_grid == "model":
        blocks = _model_grid_blocks(model_blocks, len(prompt), max_tokens, block_length)
    else:
        blocks = tuple((len(prompt) + start, len(prompt) + start + block_length)
                       for start in range(0, gen_length, block_length))
    _checked(prompt_field, validation.prompt_lists, [prompt], mask_id=mask_id, vocab=vocab)
    sampling_fields = ("temperature", "top_k", "top_p", "remasking", "seed", "conf_temperature")
    try:
        sampling = validation.sampling(temperature=_default(body, "temperature", 0.0), top_k=_default(body, "top_k", 0),
                                       top_p=_default(body, "top_p", 1.0),
                                       remasking=_default(body, "remasking", "low_confidence"),
                                       seed=_default(body, "seed", 0),
                                       conf_temperature=_default(body, "conf_temperature", 1.0))
    except (TypeError, ValueError) as error:
        raise RequestError(str(error), _param_of(error, sampling_fields)) from None
    if sampling.seed + n - 1 >= validation.SEED_LIMIT:
        raise RequestError(f"choice i of n decodes with seed + i, which must be below 2**64: seed {sampling.seed} "
                           f"leaves room for {validation.SEED_LIMIT - sampling.seed} choices, got n={n}", "n")
    try:
        rule = validation.rule(body.get("steps"), body.get("threshold"), body.get("factor"),
                               num_blocks=gen_length // block_length, default_steps=gen_length,
                               confidence=sampling.confidence, schedule=_default(body, "schedule", "llada"))
    except (TypeError, ValueError) as error:
        param = _param_of(error, ("schedule", "steps", "threshold", "factor")) or "steps"
        raise RequestError(str(error), param) from None
    alg_temp = _checked("alg_temp", validation.position_temperature, body.get("alg_temp"), rule=rule,
                        confidence=sampling.confidence, speculate=0)
    cfg_scale = _checked("cfg_scale", validation.check_cfg_scale, _default(body, "cfg_scale", 0.0))
    cache = body.get("cache", default_cache)
    _checked("cache", validation.check_choice, "cache", cache, validation.CACHE_MODES)
    if cache is not None and not caches:
        raise RequestError(f"cache={cache!r} needs the unmask model; this server's model takes no cache", "cache")
    return Settings(tuple(prompt), gen_length, block_length, rule, sampling, cfg_scale, cache, max_tokens,
                    _stop_strings(body.get("stop")), stream, include_usage, block_grid, blocks, canvas_length, n,
                    alg_temp)


def _server_default(body: dict) -> str:
    """What a 400 naming block_length adds where the body gave none: the value was the
    server's, which the client did not send."""
    return "" if body.get("block_length") is not None else " (the server's default block_length: send block_length)"


def _model_grid_blocks(model_blocks: tuple[int, bool], prompt_length: int, max_tokens: int,
                       block_length: int) -> tuple[tuple[int, int], ...]:
    """block_grid="model": the blocks unmask.generate decodes on the model's grid
    (unmask.schedule.grid_blocks), up to the one holding the answer's last position; the
    canvas runs to the end of the grid block (of max(block_size, block_length)) holding
    it. Later blocks only fill positions after the answer, and the block-causal mask hides
    the grid blocks after it from it: the answer is generate's (same steps per block) with
    any gen_length from max_tokens on."""
    block_size, shifted = model_blocks
    blocks, _, _ = schedule.grid_blocks(block_size, shifted, [prompt_length], prompt_length, max_tokens, block_length,
                                        model_name="the model")
    answer_end = prompt_length + max_tokens
    return tuple((start, end) for start, end in blocks if start < answer_end)


def _default(body: dict, name: str, default):
    value = body.get(name)
    return default if value is None else value


def _stream_options(options, stream: bool) -> bool:
    """stream_options.include_usage: null or an object, and only beside stream=true (as OpenAI has it).
    Its other fields (include_obfuscation) ask for nothing this server has to do."""
    if options is None:
        return False
    if not isinstance(options, dict):
        raise RequestError(f"stream_options must be an object, got {type(options).__name__}", "stream_options")
    if not stream:
        raise RequestError("stream_options is only allowed when stream is true", "stream_options")
    include_usage = _default(options, "include_usage", False)
    if not isinstance(include_usage, bool):
        raise RequestError(f"stream_options.include_usage must be a bool, got {type(include_usage).__name__}",
                           "stream_options")
    return include_usage


def _stop_strings(stop) -> tuple[str, ...]:
    if stop is None:
        return ()
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise RequestError("stop must be a non-empty string or a list of up to 4 of them", "stop")
    return tuple(stop)


def cut_at_stop(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    """text up to its first stop string, and whether one was found."""
    cuts = [text.index(s) for s in stop if s in text]
    return (text[:min(cuts)], True) if cuts else (text, False)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def completion_body(request_id: str, model: str, answers: list[tuple[str, str]], usage: dict, chat: bool) -> dict:
    """answers: each choice's (text, finish_reason), in index order."""
    created = int(time.time())
    if chat:
        choices = [{"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": reason,
                    "logprobs": None} for i, (text, reason) in enumerate(answers)]
        return {"id": request_id, "object": "chat.completion", "created": created, "model": model,
                "choices": choices, "usage": usage}
    choices = [{"index": i, "text": text, "finish_reason": reason, "logprobs": None}
               for i, (text, reason) in enumerate(answers)]
    return {"id": request_id, "object": "text_completion", "created": created, "model": model, "choices": choices,
            "usage": usage}


def total_usage(usages: list[dict]) -> dict:
    """The usage of a request's choices together: its prompt once, every choice's
    completion (as OpenAI counts n > 1)."""
    prompt = usages[0]["prompt_tokens"]
    completion = sum(usage["completion_tokens"] for usage in usages)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def usage_chunk(request_id: str, model: str, usage: dict, chat: bool, created: int) -> dict:
    return {"id": request_id, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": created, "model": model, "choices": [], "usage": usage}


def chunk_body(request_id: str, model: str, delta: str | None, finish_reason: str | None, chat: bool, created: int,
               canvas: str | None = None, step: int | None = None, first: bool = False, index: int = 0) -> dict:
    """One server-sent event of choice `index`; created: the stream's time, the same in
    each of its chunks. The extension field `unmask` carries that choice's whole canvas
    (text with a placeholder per masked position) and step, for clients that draw the
    diffusion as it happens."""
    if chat:
        content = {"role": "assistant", "content": delta or ""} if first else ({"content": delta} if delta else {})
        choice = {"index": index, "delta": content, "finish_reason": finish_reason, "logprobs": None}
        body = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [choice]}
    else:
        choice = {"index": index, "text": delta or "", "finish_reason": finish_reason, "logprobs": None}
        body = {"id": request_id, "object": "text_completion", "created": created, "model": model, "choices": [choice]}
    if canvas is not None:
        body["unmask"] = {"canvas": canvas, "step": step}
    return body
