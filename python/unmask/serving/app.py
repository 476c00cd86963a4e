"""unmask serve: the OpenAI-compatible HTTP front of the engine (Starlette on uvicorn).

Starlette rather than FastAPI: the server validates bodies itself, through
unmask.validation, to answer OpenAI-format 400s that name the field; FastAPI's pydantic
layer would answer 422s in its own format and add a dependency for nothing else."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from unmask import validation
from unmask.models import DiffusionTransformer
from unmask.models.checkpoint import encode_text
from unmask.serving import protocol
from unmask.serving.engine import Engine, Job, QueueFull, Unavailable
from unmask.serving.protocol import RequestError

RETRY_AFTER_SECONDS = 1
# The largest request body read (413 beyond): 32x a 32k-token prompt as token ids (256 KiB
# of JSON), more as text, and small enough that its JSON parse on the event loop (8 MiB:
# 6 ms of text, 73 ms of ids on this 2-core dev machine) stalls the other streams briefly.
MAX_BODY_BYTES = 8 << 20


def _error(error: RequestError) -> JSONResponse:
    headers = {"Retry-After": str(RETRY_AFTER_SECONDS)} if error.status in (429, 503) else None
    return JSONResponse(protocol.error_body(error.message, error.param, error.kind), status_code=error.status,
                        headers=headers)


class Server:
    """The routes over one model and its engine."""

    def __init__(self, model, tokenizer, *, model_name: str, model_dir: str | None = None, max_batch: int = 16,
                 max_queue: int = 64, max_context: int = 4096, default_block_length: int | None = None,
                 default_cache: str | None = None, default_block_grid: str = "prompt", engine=None,
                 trust_remote_code: bool = False, max_body_bytes: int = MAX_BODY_BYTES,
                 request_timeout: float | None = None, eos_id=None):
        """engine: an unmask.serving.engine_process.EngineProcess to run the steps (model
        then only describes the model: a weightless skeleton will do; the limits are the
        EngineProcess's own, max_batch and max_queue here are unread); None runs an Engine
        on a thread of this process. request_timeout: seconds a request may take from its
        arrival, queue included (None: no limit); past it the request is cancelled (its rows
        leave the batch) and answered 504, or its stream ends with an error event.
        default_block_length, default_cache, default_block_grid: what a body without the
        field asks for (default_block_length None: 32 on the prompt's grid, cut to
        max_tokens, and the model's block_size on its own; see protocol.settings).
        eos_id: where answers end, an id or a list of ids (any ends an answer; None: the
        model's eos_ids, generation_config.json's list where the checkpoint has one; a
        chat model's turn may end at another token: <|im_end|> for SDAR's chat answers)."""
        self.model, self.tokenizer, self.model_name, self.model_dir = model, tokenizer, model_name, model_dir
        if default_block_length is not None:
            validation.check_positive_int("default_block_length", default_block_length)
        self.max_context, self.default_block_length = max_context, default_block_length
        self.engine = Engine(model, tokenizer, max_batch=max_batch, max_queue=max_queue) if engine is None else engine
        self.caches = isinstance(model, DiffusionTransformer)
        config = model.config if self.caches else None
        # a block-causal model's blocks, for block_grid="model" (None: it has none)
        self.model_blocks = None if config is None or config.block_size is None else (
            config.block_size, bool(config.shift_logits))
        validation.check_choice("default_block_grid", default_block_grid, validation.BLOCK_GRIDS)
        if default_block_grid == "model":  # the server's own defaults must make a request it can serve
            if self.model_blocks is None:
                raise ValueError("default_block_grid='model' (unmask serve --block-grid model) needs a block-causal "
                                 f"model (config.block_size); {model_name} has none")
            block_size, shifted = self.model_blocks
            validation.model_grid(block_size, default_block_length or block_size, [0], shifted=shifted,
                                  model_name=type(model).__name__)
        self.default_block_grid = default_block_grid
        self.eos_ids = validation.model_special_ids(model, None, eos_id)[1]
        validation.check_choice("default_cache", default_cache, validation.CACHE_MODES)
        if default_cache is not None and not self.caches:
            raise ValueError(f"default_cache={default_cache!r} needs the unmask model")
        self.default_cache, self.trust_remote_code = default_cache, trust_remote_code
        self.max_body_bytes = validation.check_positive_int("max_body_bytes", max_body_bytes)
        if request_timeout is not None:
            request_timeout = validation.check_float("request_timeout", request_timeout, positive=True)
        self.request_timeout = request_timeout
        self.chat_template = self._load_chat_template()  # at start-up, not on the event loop of a first request

    @contextlib.asynccontextmanager
    async def lifespan(self, app):
        self.engine.start()
        try:
            yield
        finally:  # uvicorn got SIGTERM and has let running requests finish: stop the engine
            await asyncio.to_thread(self.engine.stop)

    def app(self) -> Starlette:
        return Starlette(routes=[
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/models/{model:path}", self.model_card, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
        ], lifespan=self.lifespan, exception_handlers={HTTPException: _http_error})

    def _card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": 0, "owned_by": "unmask"}

    async def models(self, request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [self._card()]})

    async def model_card(self, request: Request) -> JSONResponse:
        """GET /v1/models/{model}: what the OpenAI client's models.retrieve() reads."""
        if request.path_params["model"] != self.model_name:
            return _error(RequestError(f"unknown model {request.path_params['model']!r}; this server serves "
                                       f"{self.model_name!r}", "model", status=404))
        return JSONResponse(self._card())

    async def health(self, request: Request) -> JSONResponse:
        if self.engine.dead is not None:  # the steps stopped: 503, so that a supervisor restarts the server
            return JSONResponse({"status": "error", "detail": self.engine.dead, **self.engine.load()}, status_code=503)
        return JSONResponse({"status": "ok", **self.engine.load()})

    async def completions(self, request: Request):
        return await self._serve(request, chat=False)

    async def chat_completions(self, request: Request):
        return await self._serve(request, chat=True)

    # ------------------------------------------------------------------ a request

    async def _serve(self, request: Request, *, chat: bool):
        deadline = None if self.request_timeout is None else asyncio.get_running_loop().time() + self.request_timeout
        try:
            body = await self._body(request)
            prompt = self._chat_prompt(body) if chat else self._prompt(body)
            settings = protocol.settings(body, prompt=prompt, default_block_length=self.default_block_length,
                                         max_context=self.max_context, vocab=validation.model_vocab(self.model),
                                         mask_id=self.model.mask_id, caches=self.caches,
                                         default_cache=self.default_cache, chat=chat,
                                         model_blocks=self.model_blocks, default_block_grid=self.default_block_grid)
            if settings.n > self.engine.capacity:  # it could never be admitted: not a 429 to retry forever
                raise RequestError(f"n={settings.n} choices are {settings.n} requests, more than this server holds at "
                                   f"once ({self.engine.capacity}: --max-batch and --max-queue)", "n")
        except RequestError as error:
            return _error(error)
        # One job per choice (n > 1: choice i with seed + i), each engine event tagged with
        # its choice; the engine admits each as a request of its own.
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        jobs = [Job(settings.choice(index), self.model.mask_id, self.eos_ids,
                    on_event=lambda event, index=index: loop.call_soon_threadsafe(events.put_nowait, (index, event)))
                for index in range(settings.n)]
        try:
            self.engine.submit(*jobs)  # all the choices or none
        except QueueFull as full:
            return _error(RequestError(str(full), None, status=429, kind="rate_limit_error"))
        except Unavailable as gone:
            return _error(RequestError(str(gone), None, status=503, kind="server_error"))
        request_id = protocol.new_id("chatcmpl" if chat else "cmpl")
        if settings.stream:
            return _CancellingStream(self._stream(jobs, events, request_id, chat, settings.include_usage, deadline),
                                     lambda: self._cancel(jobs))
        return await self._complete(request, jobs, events, request_id, chat, deadline)

    def _cancel(self, jobs: list[Job]) -> None:
        for job in jobs:
            if not job.finished:
                self.engine.cancel(job)

    def _timed_out(self) -> RequestError:
        return RequestError(f"the request did not finish within the server's request_timeout of "
                            f"{self.request_timeout:g} s", None, status=504, kind="server_error")

    @staticmethod
    async def _next_event(events: asyncio.Queue, deadline: float | None, poll: float | None):
        """The next event, waiting at most `poll` seconds and never past the deadline:
        None when either passes first."""
        wait = poll
        if deadline is not None:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                return None
            wait = left if wait is None else min(wait, left)
        try:
            return await asyncio.wait_for(events.get(), timeout=wait)
        except asyncio.TimeoutError:
            return None

    async def _read_body(self, request: Request) -> bytes:
        """The body's bytes, refused (413) past max_body_bytes before they are all read:
        by its Content-Length when it declares one, else as its chunks arrive."""
        too_large = RequestError(f"the body exceeds {self.max_body_bytes} bytes", None, status=413)
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            raise too_large
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:
                raise too_large
            chunks.append(chunk)
        return b"".join(chunks)

    async def _body(self, request: Request) -> dict:
        raw = await self._read_body(request)
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError):  # RecursionError: arrays nested deeper than the parser goes
            raise RequestError("the body must be a JSON object") from None
        if not isinstance(body, dict):
            raise RequestError("the body must be a JSON object")
        if "model" not in body:
            raise RequestError("model is required", "model")
        if body["model"] != self.model_name:
            raise RequestError(f"unknown model {body['model']!r}; this server serves {self.model_name!r}", "model")
        return body

    def _encode(self, text: str, param: str) -> list[int]:
        try:
            return encode_text(self.tokenizer, text, param)
        except ValueError as error:
            raise RequestError(str(error), param) from None

    def _prompt(self, body: dict) -> list[int]:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, str):
            return self._encode(prompt, "prompt")
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return prompt  # token ids
        raise RequestError("prompt must be a string, a list of one string, or a list of token ids", "prompt")

    def _chat_prompt(self, body: dict) -> list[int]:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise RequestError("messages must be a non-empty list of {role, content}", "messages")
        messages = [_text_message(m, i) for i, m in enumerate(messages)]
        if self.chat_template is None:  # no chat template (the bundled model): the last user turn is the prompt
            users = [m["content"] for m in messages if m["role"] == "user"]
            if not users:
                raise RequestError("messages hold no user turn", "messages")
            return self._encode(users[-1], "messages")
        try:
            ids = self.chat_template.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        except Exception as error:  # the template's own rules (e.g. roles must alternate)
            raise RequestError(f"the chat template refused the messages: {error}", "messages") from None
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        return [int(t) for t in ids]

    def _load_chat_template(self):
        """The checkpoint's chat template through transformers, if it has one (None: the
        model has none, or transformers is missing or cannot read it). A tokenizer shipped
        as code (Dream's) without trust_remote_code stops the start (cli.chat_tokenizer)."""
        from unmask import cli

        if not self.model_dir:
            return None
        try:
            tokenizer, why = cli.chat_tokenizer(self.model_dir, trust_remote_code=self.trust_remote_code), None
        except Exception as error:
            tokenizer, why = None, f"{type(error).__name__}: {error}"
        if getattr(tokenizer, "chat_template", None):
            return tokenizer
        if _declares_chat_template(Path(self.model_dir)):  # an Instruct model served without its template
            why = why or ("transformers loaded the tokenizer without it" if tokenizer is not None
                          else "transformers is not installed (pip install 'unmask[hf]')"
                          if importlib.util.find_spec("transformers") is None else "no tokenizer_config.json beside it")
            logging.getLogger("unmask.serve").warning(
                "%s has a chat template that could not be loaded (%s): chat requests get the last user turn "
                "alone, without the template, system prompt or history", self.model_dir, why)
        return None

    async def _complete(self, request: Request, jobs: list[Job], events: asyncio.Queue, request_id: str, chat: bool,
                        deadline: float | None):
        done: dict[int, dict] = {}
        try:
            while True:
                event = await self._next_event(events, deadline, poll=0.25)
                if event is None:
                    if deadline is not None and asyncio.get_running_loop().time() >= deadline:
                        return _error(self._timed_out())  # the finally below cancels the job
                    if await request.is_disconnected():  # the client went away: free its rows
                        return JSONResponse(protocol.error_body("client disconnected"), status_code=499)
                    continue
                index, event = event
                if event["kind"] == "error":  # 500: its step failed; 503: the engine stopped (429: its queue was full)
                    status = event.get("status", 500)  # (a choice that fails fails the request: the others leave)
                    return _error(RequestError(event["message"], None, status=status,
                                               kind="rate_limit_error" if status == 429 else "server_error"))
                if event["kind"] == "done":
                    done[index] = event
                    if len(done) == len(jobs):
                        answers = [(done[i]["text"], done[i]["finish_reason"]) for i in range(len(jobs))]
                        usage = protocol.total_usage([done[i]["usage"] for i in range(len(jobs))])
                        return JSONResponse(protocol.completion_body(request_id, self.model_name, answers, usage, chat))
        finally:  # also when the handler is cancelled (shutdown timeout)
            self._cancel(jobs)

    async def _stream(self, jobs: list[Job], events: asyncio.Queue, request_id: str, chat: bool, usage: bool,
                      deadline: float | None):
        """The choices' chunks as their steps come, interleaved (each names its index);
        the usage chunk (all choices) after the last choice's end. The response that
        sends them cancels the jobs when it ends (_CancellingStream)."""
        created, first, usages = int(time.time()), set(range(len(jobs))), {}
        while True:
            event = await self._next_event(events, deadline, poll=None)
            if event is None:  # past the deadline (the status line went out with the first byte)
                yield _sse(protocol.error_body(self._timed_out().message, kind="server_error"))
                break
            index, event = event
            if event["kind"] == "error":
                yield _sse(protocol.error_body(event["message"], kind="server_error"))
                break
            if event["kind"] == "delta":
                yield _sse(protocol.chunk_body(request_id, self.model_name, event["text"], None, chat, created,
                                               canvas=event["canvas"], step=event["step"], first=index in first,
                                               index=index))
                first.discard(index)
            if event["kind"] == "done":
                yield _sse(protocol.chunk_body(request_id, self.model_name, None, event["finish_reason"], chat,
                                               created, first=index in first, index=index))
                first.discard(index)
                usages[index] = event["usage"]
                if len(usages) < len(jobs):
                    continue
                if usage:  # stream_options.include_usage: OpenAI's last chunk, no choices
                    total = protocol.total_usage([usages[i] for i in range(len(jobs))])
                    yield _sse(protocol.usage_chunk(request_id, self.model_name, total, chat, created))
                break
        yield "data: [DONE]\n\n"


class _CancellingStream(StreamingResponse):
    """A server-sent event stream that calls `finished` however its response ends: sent
    whole, the client gone, the server shutting down. A finally in the generator would not
    do: a client that leaves before the first chunk cancels the response before the
    generator starts, and an unstarted generator runs no finally (its jobs decoded on to
    max_tokens for nobody)."""

    def __init__(self, content, finished: Callable[[], None]):
        super().__init__(content, media_type="text/event-stream")
        self._finished = finished

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._finished()


async def _http_error(request: Request, error: HTTPException) -> JSONResponse:
    """Starlette's own 404 (no such route) and 405 (a route without that method) in
    OpenAI's error body, which the client reads."""
    return JSONResponse(protocol.error_body(f"{request.method} {request.url.path}: {error.detail}"),
                        status_code=error.status_code, headers=getattr(error, "headers", None))


def _text_message(message, index: int) -> dict:
    """{role, content: str}: content given as a string or as OpenAI's list of text parts
    ([{"type": "text", "text": ...}], joined); other part types are refused. OpenAI's
    "developer" role, its newer name for "system", is read as "system" (chat templates
    know the older name)."""
    where = f"messages[{index}]"
    if not isinstance(message, dict) or message.get("role") not in ("system", "developer", "user", "assistant"):
        raise RequestError(f"{where} must be {{role: system|developer|user|assistant, content}}", "messages")
    content = message.get("content")
    if isinstance(content, list):
        if not all(isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
                   for part in content):
            raise RequestError(f"{where}.content: only text parts are supported", "messages")
        content = "".join(part["text"] for part in content)
    if not isinstance(content, str):
        raise RequestError(f"{where}.content must be a string or a list of text parts", "messages")
    return {"role": "system" if message["role"] == "developer" else message["role"], "content": content}


def _sse(body: dict) -> str:
    return f"data: {json.dumps(body)}\n\n"


def serve(model_dir: str | None = None, *, host: str = "127.0.0.1", port: int = 8000, max_batch: int = 16,
          max_queue: int = 64, max_context: int = 4096, device: str | None = None, dtype=None,
          block_length: int | None = None, cache: str | None = None, block_grid: str = "prompt",
          engine: str = "process",
          engine_threads: int | None = None, trust_remote_code: bool = False,
          request_timeout: float | None = None, eos_id=None) -> None:
    """Load the model (the bundled one by default) and serve it until SIGINT/SIGTERM.
    engine "process" steps it in a child process (unmask.serving.engine_process), "thread"
    on a thread of this one; engine_threads: torch's CPU threads for the steps."""
    import torch
    import uvicorn

    import unmask
    from unmask import cli
    from unmask.models.checkpoint import skeleton
    from unmask.serving.engine_process import EngineProcess, EngineSpec

    bundled = model_dir is None or model_dir in cli.BUNDLED_MODELS
    name = cli.model_name(model_dir or "unmask-bundled")
    model_dir = str(cli.model_path(model_dir or "unmask-bundled"))
    validation.check_choice("engine", engine, ("process", "thread"))
    if engine_threads is not None:
        validation.check_positive_int("engine_threads", engine_threads)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    runner = None
    if engine == "process":
        model = skeleton(model_dir)
        runner = EngineProcess(EngineSpec(model_dir, max_batch, max_queue, dtype=dtype, device=device,
                                          threads=engine_threads))
    else:
        if engine_threads is not None:
            torch.set_num_threads(engine_threads)
        model = unmask.from_pretrained(model_dir, dtype=dtype, device=device)
    if getattr(model, "tokenizer", None) is None:
        raise SystemExit(f"unmask serve needs a tokenizer in {model_dir} (text in, text out): tokenizer.json, or "
                         "vocab.json and merges.txt with transformers installed")
    server = Server(model, model.tokenizer, model_name=name,
                    model_dir=model_dir, max_batch=max_batch, max_queue=max_queue, max_context=max_context,
                    default_block_length=block_length or (8 if bundled else None), default_cache=cache,
                    default_block_grid=block_grid, engine=runner,
                    trust_remote_code=trust_remote_code, request_timeout=request_timeout, eos_id=eos_id)
    uvicorn.run(server.app(), host=host, port=port, log_level="info", timeout_graceful_shutdown=60)


def _declares_chat_template(model_dir: Path) -> bool:
    """Whether a checkpoint ships a chat template (in tokenizer_config.json, or as
    chat_template.jinja / .json beside it), read without transformers."""
    if (model_dir / "chat_template.jinja").exists() or (model_dir / "chat_template.json").exists():
        return True
    try:
        return bool(json.loads((model_dir / "tokenizer_config.json").read_text()).get("chat_template"))
    except (OSError, ValueError, AttributeError):
        return False
