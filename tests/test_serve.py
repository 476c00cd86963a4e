"""unmask serve, driven as a client would: the official openai client (sync and
streaming) and raw HTTP for the errors, against a server on 127.0.0.1 serving the bundled
model. Answers are compared with offline unmask.generate of the same request."""

import asyncio
import concurrent.futures
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("starlette", reason="the serve extra is not installed (pip install 'unmask[serve]')")
uvicorn = pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

import torch  # noqa: E402

import unmask  # noqa: E402
from unmask import cli  # noqa: E402
from unmask.models import checkpoint  # noqa: E402
from unmask.serving import protocol  # noqa: E402
from unmask.serving.app import Server  # noqa: E402
from unmask.serving.engine import Job, QueueFull, Unavailable  # noqa: E402
from unmask.serving.engine_process import EngineProcess, EngineSpec  # noqa: E402

MODEL = "unmask-bundled"
PROMPTS = ["123+456=", "sort:8531=", "rev:abc=", "99+1=", "(()=", "sort:91=", "7+8=", "rev:xyz="]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Running:
    """A uvicorn server in a thread, stopped as SIGTERM would stop it (should_exit)."""

    def __init__(self, server: Server):
        self.server, self.port = server, free_port()
        config = uvicorn.Config(server.app(), host="127.0.0.1", port=self.port, log_level="warning")
        self.uvicorn = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.uvicorn.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.uvicorn.started:
            assert time.time() < deadline, "the server did not start"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=60)

    def stop(self):
        self.uvicorn.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def model():
    return unmask.from_pretrained(cli.default_model_path())


def start(model, **limits) -> Running:
    return Running(Server(model, model.tokenizer, model_name=MODEL, default_block_length=8, **limits))


@pytest.fixture(scope="module")
def server(model):
    running = start(model, max_batch=16, max_queue=64)
    yield running
    running.stop()


def offline(model, prompt: str, eos_id: int | None = None, **body) -> str:
    """What unmask.generate answers for the request body, cut as the server cuts (at
    eos_id, default the model's)."""
    max_tokens = body.pop("max_tokens", 16)
    block = body.pop("block_length", min(8, max_tokens))
    gen_length = -(-max_tokens // block) * block
    eos_id = model.eos_id if eos_id is None else eos_id
    arguments = {"gen_length": gen_length, "block_length": block, "eos_id": eos_id, **body}
    out = unmask.generate(model, [model.tokenizer.encode(prompt).ids], **arguments)
    tokens = []
    for token in out.tokens[0].tolist()[:max_tokens]:
        if token == eos_id:
            break
        tokens.append(token)
    return model.tokenizer.decode(tokens)


SETTINGS = [
    {"max_tokens": 8},
    {"max_tokens": 8, "threshold": 0.5},
    {"max_tokens": 8, "steps": 4},
    {"max_tokens": 16, "block_length": 8, "steps": 4, "schedule": "dream"},  # "579"; LLaDA's schedule gives "578"
    {"max_tokens": 8, "temperature": 0.8, "seed": 5},
    {"max_tokens": 8, "temperature": 1.0, "seed": 9, "remasking": "random"},
    {"max_tokens": 12, "block_length": 4, "factor": 1.0},
    {"max_tokens": 8, "cfg_scale": 0.5},
    {"max_tokens": 16, "cache": "dual"},  # two blocks: the cache is filled again for the second
    {"max_tokens": 12, "block_length": 4, "threshold": 0.5, "cache": "prefix"},
    # steps with a threshold: the plan's counts as floors, a block ending with its masks
    {"max_tokens": 16, "block_length": 8, "steps": 8, "threshold": 0.3},
    # sampled: a block that ends early must not move the next block's noise (its RNG step);
    # blocks of two planned as 1 + 1, the threshold taking both at once (seed 2: a draw
    # that an extra step would change)
    {"max_tokens": 16, "block_length": 2, "steps": 16, "threshold": 0.3, "temperature": 3.0, "seed": 2},
    {"max_tokens": 8, "temperature": 0.8, "seed": 5, "cfg_scale": 0.5, "cache": "dual"},
    # Dream's sampling: the nucleus and the confidence at the sampling temperature
    {"max_tokens": 8, "temperature": 0.5, "top_p": 0.8, "conf_temperature": 0.5, "remasking": "entropy", "seed": 3},
    # Dream's alg_temp: positions drawn (greedy tokens; "579" here, where the top-k gives "578")
    {"max_tokens": 16, "block_length": 8, "steps": 8, "alg_temp": 1.0, "seed": 1},
]
EXTRA_FIELDS = ("block_length", "steps", "schedule", "threshold", "factor", "remasking", "conf_temperature",
                "cfg_scale", "cache", "alg_temp")


@pytest.mark.parametrize("settings", SETTINGS, ids=[str(i) for i in range(len(SETTINGS))])
def test_completion_equals_offline_generate(server, model, settings):
    body = dict(settings)
    extra = {k: body.pop(k) for k in list(body) if k in EXTRA_FIELDS}
    reply = server.client.completions.create(model=MODEL, prompt=PROMPTS[0], extra_body=extra, **body)
    assert reply.choices[0].text == offline(model, PROMPTS[0], **settings)
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens == len(model.tokenizer.encode(PROMPTS[0]).ids)
    assert reply.usage.completion_tokens == len(model.tokenizer.encode(reply.choices[0].text).ids)


def test_chat_uses_the_last_user_turn_without_a_template(server, model):
    reply = server.client.chat.completions.create(model=MODEL, max_tokens=8, messages=[
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "sort:8531="}])
    assert reply.choices[0].message.content == offline(model, "sort:8531=", max_tokens=8)
    assert reply.choices[0].message.role == "assistant"


@pytest.mark.parametrize("declared", [True, False])
def test_a_chat_template_that_cannot_be_loaded_is_said_at_start(model, tmp_path, monkeypatch, caplog, declared):
    """An Instruct checkpoint served where its template cannot be loaded (transformers
    missing: cli.chat_tokenizer gives None) answers chats with the last user turn alone:
    the server says so in its log when it starts, and says nothing for a checkpoint that
    has no template."""
    config = {"chat_template": "{{ messages }}"} if declared else {}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    monkeypatch.setattr(cli, "chat_tokenizer", lambda *args, **kwargs: None)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)  # as without transformers
    with caplog.at_level("WARNING", logger="unmask.serve"):
        server = Server(model, model.tokenizer, model_name=MODEL, model_dir=str(tmp_path))
    assert server.chat_template is None
    said = [record.getMessage() for record in caplog.records if record.name == "unmask.serve"]
    assert (len(said) == 1 and "could not be loaded" in said[0] and "transformers" in said[0]) if declared else not said


def test_chat_content_as_text_parts(server, model):
    reply = server.client.chat.completions.create(model=MODEL, max_tokens=8, messages=[
        {"role": "user", "content": [{"type": "text", "text": "sort:"}, {"type": "text", "text": "8531="}]}])
    assert reply.choices[0].message.content == offline(model, "sort:8531=", max_tokens=8)
    bad = httpx.post(server.url + "/v1/chat/completions", timeout=30, json={
        "model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "messages"
    unknown = httpx.post(server.url + "/v1/chat/completions", timeout=30, json={
        "model": MODEL, "messages": [{"role": "user", "content": "sort: 8531="}]})
    assert unknown.status_code == 400 and unknown.json()["error"]["param"] == "messages"


def test_models_and_health(server):
    assert [m.id for m in server.client.models.list().data] == [MODEL]
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_streaming_sends_final_text_in_reading_order_and_the_canvas(server, model):
    chunks = list(server.client.completions.create(model=MODEL, prompt="sort:8531=", max_tokens=8, stream=True))
    text = "".join(c.choices[0].text for c in chunks)
    assert text == offline(model, "sort:8531=", max_tokens=8)
    canvases = [c.model_extra["unmask"]["canvas"] for c in chunks if c.model_extra.get("unmask")]
    assert len(canvases) >= 2 and canvases[-1].replace("\u2591", "").startswith(text)
    masks = [c.count("\u2591") for c in canvases]
    assert masks == sorted(masks, reverse=True)  # the canvas fills in, step by step
    sent = ""
    for c in chunks:  # what was sent is always a prefix of the answer
        sent += c.choices[0].text
        assert text.startswith(sent)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_stream_options_include_usage(server):
    chunks = list(server.client.completions.create(model=MODEL, prompt="99+1=", max_tokens=8, stream=True,
                                                   stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len("".join(
        c.choices[0].text for c in chunks[:-1]))


def test_chat_streaming(server, model):
    chunks = list(server.client.chat.completions.create(
        model=MODEL, max_tokens=8, stream=True, messages=[{"role": "user", "content": "123+456="}]))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == offline(model, "123+456=", max_tokens=8)


def _request(server, prompt, settings):
    body = dict(settings)
    extra = {k: body.pop(k) for k in list(body) if k in EXTRA_FIELDS}
    return server.client.completions.create(model=MODEL, prompt=prompt, extra_body=extra, **body).choices[0].text


@pytest.mark.parametrize("settings", [{"temperature": 10.0, "seed": 5}, {"temperature": 10.0, "seed": 0, "cache": "dual"},
                                      {"threshold": 0.5}], ids=["sampled", "sampled-cached", "greedy"])
def test_n_choices_are_the_answers_of_seed_plus_index(server, model, settings):
    """n choices: choice i is the answer of the same request with seed + i and n = 1
    (greedy choices are all the same answer); usage counts the prompt once and every
    choice's completion."""
    body = dict(settings, max_tokens=8)
    extra = {k: body.pop(k) for k in list(body) if k in EXTRA_FIELDS}
    reply = server.client.completions.create(model=MODEL, prompt=PROMPTS[1], n=3, extra_body=extra, **body)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    seed = settings.get("seed", 0)
    for choice in reply.choices:
        assert choice.text == offline(model, PROMPTS[1], **{**settings, "seed": seed + choice.index, "max_tokens": 8})
    distinct = len({c.text for c in reply.choices})
    assert distinct == 1 if "temperature" not in settings else distinct > 1, "sampled choices must differ"
    assert reply.usage.prompt_tokens == len(model.tokenizer.encode(PROMPTS[1]).ids)
    assert reply.usage.completion_tokens == sum(len(model.tokenizer.encode(c.text).ids) for c in reply.choices)
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_n_choices_stream_interleaved_each_with_its_index(server, model):
    chunks = list(server.client.chat.completions.create(
        model=MODEL, max_tokens=8, stream=True, n=2, temperature=10.0, seed=11, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "123+456="}]))
    texts, roles, reasons = {0: "", 1: ""}, {0: [], 1: []}, {0: [], 1: []}
    for chunk in chunks[:-1]:
        (choice,) = chunk.choices
        texts[choice.index] += choice.delta.content or ""
        roles[choice.index].append(choice.delta.role)
        reasons[choice.index].append(choice.finish_reason)
    indices = [chunk.choices[0].index for chunk in chunks[:-1]]
    assert indices != sorted(indices), "the choices' chunks come as their steps do, interleaved"
    for index in (0, 1):
        assert texts[index] == offline(model, "123+456=", max_tokens=8, temperature=10.0, seed=11 + index)
        assert roles[index][0] == "assistant" and set(roles[index][1:]) <= {None}  # the role once, first
        assert reasons[index][-1] in ("stop", "length") and set(reasons[index][:-1]) <= {None}
    assert texts[0] != texts[1]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == sum(
        len(model.tokenizer.encode(text).ids) for text in texts.values())


def test_a_request_in_a_crowd_answers_as_alone(server):
    """Different prompts, lengths, rules and seeds decoded together: each answer equals
    the one it gets alone (its noise follows its own seed and steps, not its row)."""
    work = [(PROMPTS[i % len(PROMPTS)], SETTINGS[i % len(SETTINGS)]) for i in range(24)]
    alone = [_request(server, prompt, settings) for prompt, settings in work]
    with concurrent.futures.ThreadPoolExecutor(24) as pool:
        crowd = list(pool.map(lambda w: _request(server, *w), work))
    assert crowd == alone


def post(server, body) -> httpx.Response:
    return httpx.post(server.url + "/v1/completions", content=body if isinstance(body, str) else json.dumps(body),
                      headers={"content-type": "application/json"}, timeout=30)


ERRORS = [
    ("{not json", None),
    ({"prompt": "1"}, "model"),
    ({"model": "gpt-4", "prompt": "1"}, "model"),
    ({"model": MODEL}, "prompt"),
    ({"model": MODEL, "prompt": "1", "temperature": "hot"}, "temperature"),
    ({"model": MODEL, "prompt": "1", "top_p": 1.5}, "top_p"),
    ({"model": MODEL, "prompt": "1", "max_tokens": 0}, "max_tokens"),
    ({"model": MODEL, "prompt": "1", "max_tokens": 5000}, "max_tokens"),
    # refused at once, not after listing 10**12 blocks (or a float overflow: a 500)
    ({"model": MODEL, "prompt": "1", "max_tokens": 10**12, "block_length": 1}, "max_tokens"),
    ({"model": MODEL, "prompt": "1", "max_tokens": 10**400}, "max_tokens"),
    ({"model": MODEL, "prompt": "1", "max_tokens": 8, "block_length": 10**400}, "block_length"),
    ({"model": MODEL, "prompt": "1", "n": 0}, "n"),
    ({"model": MODEL, "prompt": "1", "alg_temp": -1}, "alg_temp"),
    ({"model": MODEL, "prompt": "1", "alg_temp": 0.5, "threshold": 0.5}, "alg_temp"),
    ({"model": MODEL, "prompt": "1", "n": 129}, "n"),  # OpenAI's limit is 128
    ({"model": MODEL, "prompt": "1", "n": "2"}, "n"),
    ({"model": MODEL, "prompt": "1", "n": 2, "seed": 2**64 - 1}, "n"),  # choice 1 would need seed 2**64
    ({"model": MODEL, "prompt": "1", "stop": 5}, "stop"),
    ({"model": MODEL, "prompt": "1", "steps": 3, "max_tokens": 16}, "steps"),
    ({"model": MODEL, "prompt": "1", "threshold": 1.5}, "threshold"),
    ({"model": MODEL, "prompt": "1", "remasking": "best"}, "remasking"),
    ({"model": MODEL, "prompt": "1", "conf_temperature": 0}, "conf_temperature"),
    ({"model": MODEL, "prompt": "1", "block_grid": "model"}, "block_grid"),  # the bundled model has no blocks
    ({"model": MODEL, "prompt": "1", "block_grid": "diagonal"}, "block_grid"),
    ({"model": MODEL, "prompt": "1", "seed": -1}, "seed"),
    ({"model": MODEL, "prompt": "1", "frequency_penalty": 1}, "frequency_penalty"),
    ({"model": MODEL, "prompt": [1, 99999]}, "prompt"),
    ({"model": MODEL, "prompt": "1", "block_length": 0}, "block_length"),
    ({"model": MODEL, "prompt": "1", "cache": "triple"}, "cache"),
    ({"model": MODEL, "prompt": "1", "cfg_scale": 1e308}, "cfg_scale"),  # guided logits overflowed: a 500
    ({"model": MODEL, "prompt": "1", "schedule": "cosine"}, "schedule"),
    ({"model": MODEL, "prompt": "1", "schedule": "dream", "threshold": 0.5}, "schedule"),
    ({"model": MODEL, "prompt": "1", "stream": True, "stream_options": "yes"}, "stream_options"),
    ({"model": MODEL, "prompt": "1", "stream": True, "stream_options": {"include_usage": 1}}, "stream_options"),
    ({"model": MODEL, "prompt": "1", "stream_options": {"include_usage": True}}, "stream_options"),  # not streaming
    ({"model": MODEL, "prompt": "1", "logprobs": 0}, "logprobs"),
    ({"model": MODEL, "prompt": "1", "echo": True}, "echo"),
    ({"model": MODEL, "prompt": "1", "n": True}, "n"),
    ({"model": MODEL, "prompt": "1", "max_completion_tokens": 8}, "max_completion_tokens"),  # chat's field
    ({"model": MODEL, "prompt": "1", "max_tokens": 8, "block_length": 10**12}, "block_length"),
    ({"model": MODEL, "prompt": "1 + 2 ="}, "prompt"),  # a space: the bundled tokenizer's unknown, read as <pad>
    ("[" * 100_000 + "]" * 100_000, None),  # nested deeper than the JSON parser goes
    ({"model": MODEL, "prompt": "1", "messages": [{"role": "user", "content": "2"}]}, "messages"),  # a chat's field
]


@pytest.mark.parametrize("body,param", ERRORS, ids=[str(p) for _, p in ERRORS])
def test_bad_requests_get_400_naming_the_field(server, body, param):
    reply = post(server, body)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]


def test_a_chats_prompt_errors_name_messages(server):
    """A chat's prompt comes from `messages`: an error about it names that field, not
    `prompt`, which a chat body does not have."""
    def chat(content):
        return httpx.post(server.url + "/v1/chat/completions", timeout=30,
                          json={"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 8})

    for content in ("1" * 5000, "1 + 2 ="):  # longer than the context; a character the tokenizer lacks
        reply = chat(content)
        assert reply.status_code == 400 and reply.json()["error"]["param"] == "messages", reply.text
    both = httpx.post(server.url + "/v1/chat/completions", timeout=30, json={
        "model": MODEL, "prompt": "1", "messages": [{"role": "user", "content": "2"}], "max_tokens": 8})
    assert both.status_code == 400 and both.json()["error"]["param"] == "prompt", both.text  # a completion's field


def test_a_body_past_the_limit_gets_413_before_it_is_read(server):
    from unmask.serving import app

    big = json.dumps({"model": MODEL, "prompt": "1" * app.MAX_BODY_BYTES}).encode()
    declared = httpx.post(server.url + "/v1/completions", content=big, timeout=30)  # with its Content-Length
    chunked = httpx.post(server.url + "/v1/completions", timeout=30,  # without: read until past the limit
                         content=(big[i:i + (1 << 16)] for i in range(0, len(big), 1 << 16)))
    for reply in (declared, chunked):
        assert reply.status_code == 413 and "exceeds" in reply.json()["error"]["message"], reply.text
    assert post(server, {"model": MODEL, "prompt": "1+1=", "max_tokens": 8}).status_code == 200


def test_fields_at_their_neutral_values_are_served(server, model):
    # what a client that sends every OpenAI field at its default sends
    neutral = {"n": None, "stream": None, "logprobs": None, "echo": False, "best_of": 1, "frequency_penalty": 0,
               "presence_penalty": 0.0, "logit_bias": {}, "suffix": None, "user": "u"}
    reply = post(server, {"model": MODEL, "prompt": "99+1=", "max_tokens": 8, **neutral})
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["text"] == offline(model, "99+1=", max_tokens=8)


def test_any_number_of_steps_is_planned_at_once(server, model):
    # LLaDA's schedule of 8 masks over 10**15 steps commits one token at each of the first
    # 8 steps and nothing after: the server plans those 8 (not a list of 10**15 counts)
    reply = post(server, {"model": MODEL, "prompt": "7+8=", "max_tokens": 8, "steps": 10**15})
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["text"] == offline(model, "7+8=", max_tokens=8, steps=8)


def test_chat_takes_max_completion_tokens_and_the_developer_role(server, model):
    reply = server.client.chat.completions.create(model=MODEL, max_completion_tokens=8, messages=[
        {"role": "developer", "content": "be brief"}, {"role": "user", "content": "sort:8531="}])
    assert reply.choices[0].message.content == offline(model, "sort:8531=", max_tokens=8)
    both = httpx.post(server.url + "/v1/chat/completions", timeout=30, json={
        "model": MODEL, "max_tokens": 4, "max_completion_tokens": 8, "messages": [{"role": "user", "content": "1"}]})
    assert both.status_code == 400 and both.json()["error"]["param"] == "max_completion_tokens"


def test_a_stream_keeps_one_created_time(server, monkeypatch):
    class Clock:  # a second passes at each reading: chunks that each read the time differ
        now = 1_000_000

        def time(self):
            Clock.now += 1
            return Clock.now

    from unmask.serving import app
    monkeypatch.setattr(app, "time", Clock(), raising=False)
    monkeypatch.setattr(protocol, "time", Clock())
    chunks = list(server.client.completions.create(model=MODEL, prompt="rev:abc=", max_tokens=8, stream=True,
                                                   stream_options={"include_usage": True}))
    assert len(chunks) >= 3 and len({c.created for c in chunks}) == 1


def test_models_retrieve_and_unknown_routes_answer_in_openai_errors(server):
    assert server.client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        server.client.models.retrieve("gpt-4")
    for method, path, status in (("GET", "/v1/completions", 405), ("GET", "/v1/nothing", 404),
                                 ("GET", "/v1/models/gpt-4", 404)):
        reply = httpx.request(method, server.url + path, timeout=30)
        assert reply.status_code == status and reply.json()["error"]["message"], (path, reply.text)


def test_a_failing_request_fails_alone(model, monkeypatch):
    running = start(model, max_batch=8, max_queue=8)
    try:
        engine = running.server.engine
        original = engine._sample

        def sample(group, logits, tokens, conf):
            if any(job.settings.sampling.seed == 666 for job in group):
                raise RuntimeError("injected")
            return original(group, logits, tokens, conf)

        monkeypatch.setattr(engine, "_sample", sample)
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            bad = pool.submit(post, running, {"model": MODEL, "prompt": "1+1=", "temperature": 1.0, "seed": 666})
            good = pool.submit(post, running, {"model": MODEL, "prompt": "1+1=", "max_tokens": 8})
        assert bad.result().status_code == 500 and "injected" in bad.result().json()["error"]["message"]
        assert good.result().status_code == 200
        assert post(running, {"model": MODEL, "prompt": "2+2=", "max_tokens": 8}).status_code == 200
    finally:
        running.stop()


@pytest.mark.parametrize("error", [RuntimeError("CUDA error: an illegal memory access was encountered"),
                                   torch.OutOfMemoryError("CUDA out of memory")])
def test_steps_that_keep_failing_stop_the_engine_out_of_memory_aside(model, monkeypatch, error):
    """A sticky device error fails every model call: after MAX_FAILED_STEPS steps in a row
    fail (each failing its own requests), the engine stops, /health answers 503 so that a
    supervisor restarts the server, and new requests get 503. Steps that ran out of memory
    (one huge request) do not count."""
    from unmask.serving import engine as engine_module

    running = start(model, max_batch=8, max_queue=8)
    try:
        engine = running.server.engine

        def broken(jobs):
            raise error

        monkeypatch.setattr(engine, "_block_logits", broken)
        for _ in range(engine_module.MAX_FAILED_STEPS):
            failed = post(running, {"model": MODEL, "prompt": "1+1=", "max_tokens": 8})
            assert failed.status_code == 500 and "the model step failed" in failed.json()["error"]["message"]
        health = httpx.get(running.url + "/health", timeout=10)
        if isinstance(error, torch.OutOfMemoryError):
            assert health.status_code == 200 and engine.dead is None
            monkeypatch.undo()
            assert post(running, {"model": MODEL, "prompt": "1+1=", "max_tokens": 8}).status_code == 200
        else:
            assert health.status_code == 503 and "BrokenDevice: 3 model steps failed in a row" in health.json()["detail"]
            refused = post(running, {"model": MODEL, "prompt": "1+1=", "max_tokens": 8})
            assert refused.status_code == 503 and "the engine stopped" in refused.json()["error"]["message"]
    finally:
        running.stop()


def _slow_steps(engine, seconds: float):
    original = engine._block_logits

    def slow(jobs):
        time.sleep(seconds)
        return original(jobs)

    engine._block_logits = slow


def _wait_for(condition, what: str, seconds: float = 10):
    deadline = time.time() + seconds
    while not condition():
        assert time.time() < deadline, what
        time.sleep(0.01)


def _held_steps(engine) -> threading.Event:
    """The engine's steps wait (up to 30 s) until the returned event is set."""
    release, original = threading.Event(), engine._block_logits

    def held(jobs):
        release.wait(30)
        return original(jobs)

    engine._block_logits = held
    return release


def test_a_full_queue_answers_429_with_retry_after(model):
    """One request decoding (its step held), one waiting: the next gets 429; both
    admitted ones then finish."""
    running = start(model, max_batch=1, max_queue=1)
    engine = running.server.engine
    release = _held_steps(engine)
    try:
        body = {"model": MODEL, "prompt": "1+1=", "max_tokens": 8}
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            first = pool.submit(post, running, body)
            _wait_for(lambda: engine.load()["active"] == 1, "the first request was not admitted")
            second = pool.submit(post, running, body)
            _wait_for(lambda: engine.load()["waiting"] == 1, "the second request did not queue")
            limited = post(running, body)
            release.set()
            assert first.result().status_code == 200 and second.result().status_code == 200
        assert limited.status_code == 429
        assert limited.headers["retry-after"] == "1" and limited.json()["error"]["type"] == "rate_limit_error"
    finally:
        release.set()
        running.stop()


def test_choices_are_admitted_together_or_refused_together(model):
    """n choices are n requests to the engine: admitted all at once or refused (429)
    with none left behind; more than the server ever holds is a 400 naming n, not a 429
    a client would retry forever."""
    running = start(model, max_batch=2, max_queue=1)
    engine = running.server.engine
    release = _held_steps(engine)
    try:
        too_many = post(running, {"model": MODEL, "prompt": "1+1=", "max_tokens": 8, "n": 4})
        assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "n"
        body = {"model": MODEL, "prompt": "1+1=", "max_tokens": 8, "n": 2}
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            first = pool.submit(post, running, body)
            _wait_for(lambda: engine.load()["active"] + engine.load()["waiting"] == 2, "the first request's choices")
            refused = post(running, body)  # 1 place left for 2 choices
            assert refused.status_code == 429 and refused.json()["error"]["type"] == "rate_limit_error"
            assert engine.load()["active"] + engine.load()["waiting"] == 2, "a refused choice was left in the engine"
            release.set()
            assert [c["index"] for c in first.result().json()["choices"]] == [0, 1]
    finally:
        release.set()
        running.stop()


def test_a_client_that_disconnects_frees_its_rows(model):
    running = start(model, max_batch=4, max_queue=4)
    try:
        _slow_steps(running.server.engine, 0.05)
        body = {"model": MODEL, "prompt": "1+1=", "max_tokens": 64, "block_length": 8, "stream": True}
        with httpx.stream("POST", running.url + "/v1/completions", json=body, timeout=30) as reply:
            next(reply.iter_lines())  # the first event: the request is decoding
            assert running.server.engine.load()["active"] == 1
        deadline = time.time() + 10
        while running.server.engine.load()["active"]:
            assert time.time() < deadline, "the cancelled request kept its rows"
            time.sleep(0.05)
        assert running.server.engine.load()["steps"] < 64  # it did not run to the end
    finally:
        running.stop()


def test_a_stream_whose_client_leaves_before_its_first_chunk_is_cancelled(model):
    """The client goes while the response's first message is being sent (the steps held,
    no chunk yet): the response is cancelled before its generator starts, and the jobs
    are cancelled all the same (an unstarted generator runs no finally)."""
    running = start(model, max_batch=4, max_queue=4)
    engine = running.server.engine
    release, submitted, original_submit = _held_steps(engine), [], engine.submit

    def recording_submit(*jobs):
        submitted.extend(jobs)
        return original_submit(*jobs)

    engine.submit = recording_submit
    body = json.dumps({"model": MODEL, "prompt": "1+1=", "max_tokens": 8, "stream": True, "n": 2}).encode()
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        if message["type"] == "http.response.start":
            await asyncio.sleep(0.2)  # the disconnect cancels the response here

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/completions", "raw_path": b"/v1/completions", "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", running.port)}
    try:
        asyncio.run(running.uvicorn.config.app(scope, receive, send))
        assert len(submitted) == 2
        assert all(job.cancelled for job in submitted), "a job of a stream nobody reads was left decoding"
    finally:
        release.set()
        running.stop()


def test_many_concurrent_requests_none_lost_or_duplicated(server, model):
    prompts = [f"{a}+{b}=" for a in range(8) for b in range(8)]
    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        answers = list(pool.map(lambda p: _request(server, p, {"max_tokens": 8}), prompts))
    assert answers == [offline(model, p, max_tokens=8) for p in prompts]


def test_sigterm_finishes_running_requests_then_exits():
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([sys.executable, "-m", "unmask", "serve", "--port", str(port)], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 60
        while True:
            try:
                httpx.get(url + "/health", timeout=1)
                break
            except httpx.TransportError:
                assert time.time() < deadline and process.poll() is None, "unmask serve did not start"
                time.sleep(0.2)
        body = {"model": MODEL, "prompt": "1+1=", "max_tokens": 256, "block_length": 8, "stream": True}
        lines = []
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as reply:
            for line in reply.iter_lines():
                if line and not lines:
                    process.send_signal(signal.SIGTERM)  # mid-request
                lines.append(line)
        assert [line for line in lines if line][-1] == "data: [DONE]"  # the running request finished
        finished = [json.loads(line[6:]) for line in lines if line.startswith("data: {")][-1]
        assert finished["choices"][0]["finish_reason"] in ("stop", "length")
        # uvicorn re-raises the signal once it has shut down gracefully: the exit is SIGTERM's
        assert process.wait(timeout=60) in (0, -signal.SIGTERM)
        with pytest.raises(httpx.TransportError):
            httpx.get(url + "/health", timeout=1)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
        process.stdout.close()


# --------------------------------------------------------------------------- a block-causal model


class IdTokenizer:
    """Text is the ids, comma-separated; a prompt is given as ids."""

    def decode(self, ids):
        return ",".join(str(i) for i in ids)


GRID_BODIES = [
    ([5, 6, 7, 8, 9], {"max_tokens": 6}),  # the server's defaults: the model's grid and block_size
    ([10, 11], {"max_tokens": 7, "block_length": 2, "threshold": 0.3, "cache": "dual"}),
    ([12, 13, 14], {"max_tokens": 6, "block_length": 8, "steps": 2, "temperature": 1.0, "seed": 3}),
    ([15, 16, 17], {"max_tokens": 6, "block_length": 4, "block_grid": "prompt"}),
]


def test_a_block_causal_model_is_served_on_its_own_grid():
    """unmask serve --block-grid model: requests decode as unmask.generate(block_grid=
    "model") decodes them (ending at any of the model's EOS ids, generation_config.json's
    list), a request may ask for the prompt's grid, and a block_length off the model's grid
    is a 400 naming it."""
    from tests.helpers import tiny_model

    model = tiny_model(seed=11, std=0.5, block_size=4)
    eos_id = 30  # the first answer's fifth token (the model's own EOS, 59, is in none of these answers)
    model.stop_ids = (model.eos_id, eos_id)  # as a generation_config.json listing both sets it
    running = Running(Server(model, IdTokenizer(), model_name="tiny", default_block_grid="model"))
    try:
        for prompt, body in GRID_BODIES:
            body = dict(body)
            max_tokens, grid = body.pop("max_tokens"), body.pop("block_grid", "model")
            extra = dict(body, **({} if grid == "model" else {"block_grid": grid}))
            block = body.pop("block_length", 4)
            answer = running.client.completions.create(model="tiny", prompt=prompt, max_tokens=max_tokens,
                                                       extra_body=extra)
            gen_length = -(-max_tokens // block) * block
            out = unmask.generate(model, [prompt], gen_length=gen_length, block_length=block, block_grid=grid,
                                  eos_id=eos_id, **body)
            tokens = out.tokens[0].tolist()[:max_tokens]
            assert (eos_id in tokens) == (prompt == GRID_BODIES[0][0])
            tokens = tokens[:tokens.index(eos_id)] if eos_id in tokens else tokens
            assert answer.choices[0].text == IdTokenizer().decode(tokens), (prompt, body)
            assert answer.choices[0].finish_reason == ("stop" if prompt == GRID_BODIES[0][0] else "length")
        refused = httpx.post(running.url + "/v1/completions", json={"model": "tiny", "prompt": [5], "block_length": 3},
                             timeout=30)
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "block_length"
    finally:
        running.stop()
    with pytest.raises(ValueError, match="block-causal"):
        Server(tiny_model(), IdTokenizer(), model_name="tiny", default_block_grid="model")
    with pytest.raises(ValueError, match="block_length=3"):
        Server(model, IdTokenizer(), model_name="tiny", default_block_grid="model", default_block_length=3)
    for bad in (60, 61, -1, [30, 60], []):  # the mask id, past the vocabulary, negative, in a list, none
        with pytest.raises(ValueError, match="eos_id"):
            Server(model, IdTokenizer(), model_name="tiny", eos_id=bad)
    assert Server(model, IdTokenizer(), model_name="tiny", eos_id=[31, 32]).eos_ids == (31, 32)  # --eos-id 31 32
    assert Server(model, IdTokenizer(), model_name="tiny", eos_id=31).eos_ids == (31,)


# --------------------------------------------------------------------------- the engine in its own process

# "7": the second token of the bundled model's answer to "123+456=" ("579"), taken for the
# end of answers by the engine process's server (unmask serve --eos-id)
PROCESS_EOS = 10


def start_in_process(**limits) -> Running:
    """A server whose steps run in a child process (unmask serve's default)."""
    limits = {"max_batch": 16, "max_queue": 64, **limits}
    model_dir = str(cli.default_model_path())
    engine = EngineProcess(EngineSpec(model_dir, limits["max_batch"], limits["max_queue"], threads=1))
    skeleton = checkpoint.skeleton(model_dir)
    return Running(Server(skeleton, skeleton.tokenizer, model_name=MODEL, default_block_length=8, engine=engine,
                          **limits))


@pytest.fixture(scope="module")
def process_server():
    running = start_in_process(eos_id=PROCESS_EOS)
    yield running
    running.stop()


def test_the_engine_in_its_own_process_answers_as_offline(process_server, model):
    work = [(PROMPTS[i % len(PROMPTS)], SETTINGS[i % len(SETTINGS)]) for i in range(len(SETTINGS) + 3)]
    with concurrent.futures.ThreadPoolExecutor(len(work)) as pool:
        crowd = list(pool.map(lambda w: _request(process_server, *w), work))
    assert crowd == [offline(model, prompt, eos_id=PROCESS_EOS, **settings) for prompt, settings in work]
    assert crowd[0] == "5"  # "579" ended at the server's EOS
    stream = process_server.client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=8, stream=True)
    assert "".join(chunk.choices[0].text for chunk in stream) == offline(model, PROMPTS[1], eos_id=PROCESS_EOS,
                                                                         max_tokens=8)
    choices = process_server.client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=8, n=2,
                                                       temperature=1.0, seed=4).choices
    assert [c.text for c in choices] == [offline(model, PROMPTS[2], eos_id=PROCESS_EOS, max_tokens=8, temperature=1.0,
                                                 seed=4 + i) for i in range(2)]


def test_the_engine_process_refuses_beyond_its_queue_at_once():
    engine = EngineProcess(EngineSpec(str(cli.default_model_path()), max_batch=1, max_queue=1, threads=1))
    engine.start()
    try:
        model = checkpoint.skeleton(str(cli.default_model_path()))
        long = {"model": MODEL, "prompt": "1+1=", "max_tokens": 512, "block_length": 8}
        settings = protocol.settings(long, prompt=[5, 6], default_block_length=8, max_context=4096, vocab=None,
                                     mask_id=model.mask_id)
        events = []
        jobs = [Job(settings, model.mask_id, model.eos_ids, on_event=events.append) for _ in range(3)]
        engine.submit(jobs[0])
        engine.submit(jobs[1])
        with pytest.raises(QueueFull):
            engine.submit(jobs[2])
        assert engine.load()["active"] == 1 and engine.load()["waiting"] == 1
        engine.cancel(jobs[1])  # its place frees at once
        engine.submit(jobs[2])
        engine.cancel(jobs[0])
        engine.cancel(jobs[2])
        assert engine.load()["active"] == 0
    finally:
        engine.stop()
    assert engine.process.exitcode == 0 and engine.dead is None
    engine.stop()  # a second stop does nothing
    with pytest.raises(Unavailable, match="shutting down"):
        engine.submit(jobs[0])


def test_an_engine_process_that_cannot_load_its_model_says_why(tmp_path):
    engine = EngineProcess(EngineSpec(str(tmp_path), max_batch=1, max_queue=1, threads=1))
    with pytest.raises(RuntimeError, match="the engine process did not start: FileNotFoundError: path: no config.json"):
        engine.start()
    engine.stop()  # nothing to stop, no error


def test_a_crashed_engine_process_fails_its_requests_not_the_server():
    running = start_in_process(max_batch=4, max_queue=4)
    try:
        # one block of 1024 steps: the requests cannot end (at EOS, at a block's end) before the kill
        body = {"model": MODEL, "prompt": "1+1=", "max_tokens": 1024, "block_length": 1024}
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            plain = pool.submit(post, running, body)
            with httpx.stream("POST", running.url + "/v1/completions", json={**body, "stream": True},
                              timeout=30) as reply:
                lines = reply.iter_lines()
                next(lines)  # decoding
                _wait_for(lambda: running.server.engine.load()["active"] == 2, "the plain request was not admitted")
                running.server.engine.process.kill()  # as a segfault in a kernel would end it
                rest = [line for line in lines if line.startswith("data: ")]
        assert json.loads(rest[-2][6:])["error"]["message"].startswith("the engine process exited")
        assert rest[-1] == "data: [DONE]"
        # a response not yet begun says 503 (a restarted server may serve it), not 500
        assert plain.result().status_code == 503, plain.result().text
        assert plain.result().json()["error"]["message"].startswith("the engine process exited")
        health = httpx.get(running.url + "/health", timeout=10)
        assert health.status_code == 503 and health.json()["status"] == "error"
        refused = post(running, {"model": MODEL, "prompt": "1+1=", "max_tokens": 8})
        assert refused.status_code == 503 and "the engine stopped" in refused.json()["error"]["message"]
    finally:
        running.stop()


def test_an_engine_message_the_front_cannot_read_fails_its_requests_and_stops_the_engine():
    """The thread that relays the engine's events must not end silently with clients
    waiting: a message it cannot read fails what the engine held, marks the engine dead
    (/health 503) and ends the engine process, whose steps nobody would hear."""
    import pickle

    running = start_in_process(max_batch=4, max_queue=4)
    engine = running.server.engine
    try:
        def unreadable():
            raise pickle.UnpicklingError("injected")

        engine.connection.recv = unreadable  # the reader's next read (it waits in the one before)
        body = {"model": MODEL, "prompt": "1+1=", "max_tokens": 1024, "block_length": 1024, "stream": True}
        with httpx.stream("POST", running.url + "/v1/completions", json=body, timeout=30) as reply:
            rest = [line for line in reply.iter_lines() if line.startswith("data: ")]
        error = json.loads(rest[-2][6:])["error"]["message"]
        assert error == "the engine's messages could not be read: UnpicklingError: injected" and rest[-1] == "data: [DONE]"
        health = httpx.get(running.url + "/health", timeout=10)
        assert health.status_code == 503 and "UnpicklingError" in health.json()["detail"]
        engine.process.join(timeout=10)
        assert engine.process.exitcode is not None  # killed, not left decoding
    finally:
        running.stop()


def test_a_request_past_the_request_timeout_is_cancelled_and_answered_504(model):
    # 2048 tokens one per step take seconds (~9 s here); the limit is 0.3 s from arrival.
    # The request is answered 504 (streamed: an error event ends the stream), its rows
    # leave the batch at once (a request left running would hold it for seconds), and a
    # short request on the same server still completes.
    running = start(model, max_batch=4, max_queue=4, request_timeout=0.3)
    slow = {"model": MODEL, "prompt": "123+456=", "max_tokens": 2048, "steps": 2048}
    try:
        started = time.time()
        reply = post(running, slow)
        assert reply.status_code == 504, reply.text
        assert "request_timeout of 0.3 s" in reply.json()["error"]["message"] and time.time() - started < 5
        with httpx.stream("POST", running.url + "/v1/completions", json={**slow, "stream": True}, timeout=30) as stream:
            lines = [line for line in stream.iter_lines() if line.startswith("data: ")]
        assert lines[-1] == "data: [DONE]" and "request_timeout" in lines[-2]
        deadline = time.time() + 1.5
        while running.server.engine.load()["active"] or running.server.engine.load()["waiting"]:
            assert time.time() < deadline, "the timed-out requests were not cancelled"
            time.sleep(0.05)
        assert post(running, {"model": MODEL, "prompt": "123+456=", "max_tokens": 8}).status_code == 200
    finally:
        running.stop()
    with pytest.raises(ValueError, match="request_timeout"):
        Server(model, model.tokenizer, model_name=MODEL, request_timeout=0)
