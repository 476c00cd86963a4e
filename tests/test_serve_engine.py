"""The serving engine without HTTP: requests of different prompt lengths, rules and
seeds decoded together give each the tokens unmask.generate gives it alone, for LLaDA,
Dream and block-causal layouts, with and without a key/value cache (cached requests
joining at different steps, so their blocks sit at different depths of one batch), CFG
in bfloat16, and a byte-level tokenizer's stream."""

import pytest
import torch

import unmask
from unmask import validation
from unmask.serving import protocol
from unmask.serving.engine import Engine, Job
from tests.helpers import requires_gpu, tiny_model


class IdTokenizer:
    """Text is the ids, comma-separated (the engine only decodes for its answers)."""

    def decode(self, ids):
        return ",".join(str(i) for i in ids)

    def encode(self, text):
        return type("Encoding", (), {"ids": [int(t) for t in text.split(",") if t]})()


def job_for(model, prompt, events, default_block_length=4, **body):
    config = model.config
    settings = protocol.settings({"model": "m", "prompt": prompt, **body}, prompt=prompt,
                                 default_block_length=default_block_length, max_context=4096,
                                 vocab=validation.model_vocab(model), mask_id=model.mask_id,
                                 model_blocks=None if config.block_size is None else (config.block_size,
                                                                                      config.shift_logits))
    return Job(settings, model.mask_id, None, on_event=events.append)  # no EOS: every position is decoded and compared


def run(engine, jobs):
    while any(not job.finished for job in jobs):
        engine._step([job for job in jobs if not job.finished])


def alone(model, prompt, settings):
    out = unmask.generate(model, [prompt], stop_at_eos=False, **settings.generate_arguments())
    return out.tokens[0].tolist()


REQUESTS = [
    ([5, 6, 7, 8, 9], {"max_tokens": 8}),
    ([10, 11], {"max_tokens": 12, "threshold": 0.3}),
    ([12, 13, 14], {"max_tokens": 8, "temperature": 1.0, "seed": 4}),
    ([3] * 9, {"max_tokens": 4, "block_length": 2, "factor": 1.0}),
    ([20, 21, 22, 23], {"max_tokens": 8, "cfg_scale": 0.5, "steps": 4}),
    ([7], {"max_tokens": 8, "remasking": "random", "temperature": 0.5, "seed": 2**63}),
    # the first request's prompt and rule with a sharper confidence: its own call, its own order
    ([5, 6, 7, 8, 9], {"max_tokens": 8, "conf_temperature": 0.05}),
]
MODELS = {"llada": {}, "dream": {"model_type": "dream", "include_qkv_bias": True}, "block-causal": {"block_size": 4}}


@pytest.mark.parametrize("layout", list(MODELS))
def test_requests_in_a_crowd_decode_as_alone(layout):
    model = tiny_model(seed=3, **MODELS[layout])
    engine = Engine(model, IdTokenizer(), max_batch=16, max_queue=16)
    events = [[] for _ in REQUESTS]
    jobs = [job_for(model, prompt, events[i], **body) for i, (prompt, body) in enumerate(REQUESTS)]
    run(engine, jobs)
    for job, (prompt, _), seen in zip(jobs, REQUESTS, events):
        assert seen[-1]["kind"] == "done", seen[-1]
        assert job.generated() == alone(model, prompt, job.settings)


CACHED_REQUESTS = [
    ([3, 4, 5, 6, 7], {"max_tokens": 12, "cache": "dual"}),  # three blocks: the cache is filled for each
    ([8, 9], {"max_tokens": 12, "steps": 6, "cache": "dual"}),
    ([10, 11, 12, 13, 14, 15, 16], {"max_tokens": 8, "threshold": 0.3, "cache": "prefix"}),
    ([17, 18, 19], {"max_tokens": 8, "temperature": 1.0, "seed": 4, "cache": "dual"}),
    ([20, 21, 22, 23], {"max_tokens": 8, "cfg_scale": 1.0, "cache": "dual"}),
    ([24, 25, 26], {"max_tokens": 8}),  # no cache, beside the cached ones
    ([27, 28, 29, 30, 31, 32], {"max_tokens": 6, "block_length": 2, "cache": "prefix"}),
]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_gpu)])
@pytest.mark.parametrize("layout", list(MODELS))
def test_cached_requests_at_different_depths_decode_as_alone(layout, device):
    # A new request joins every second step: the later steps of cached blocks run as one
    # group per segment shape, each row over its own cache from its own position.
    model = tiny_model(seed=7, std=0.5, **MODELS[layout]).to(device)
    engine = Engine(model, IdTokenizer(), max_batch=16, max_queue=16)
    jobs = [job_for(model, prompt, [], **body) for prompt, body in CACHED_REQUESTS]
    step, segment_steps = 0, 0
    while any(not job.finished for job in jobs):
        joined = jobs[:step // 2 + 1]
        engine._step([job for job in joined if not job.finished])
        segment_steps += bool(engine._stacked)  # the step ran rows over their own caches
        # a stacked request's keys and values live in the stack alone (no second copy)
        assert all(job.kv is None for job in joined if job.settings.cache and job.step_in_block > 1)
        step += 1
    assert segment_steps > step // 2
    for job, (prompt, _) in zip(jobs, CACHED_REQUESTS):
        assert job.generated() == alone(model, prompt, job.settings)


GRID_LAYOUTS = {"sdar": {"block_size": 4}, "fast-dllm-v2": {"block_size": 4, **MODELS["dream"]}}
GRID_REQUESTS = [
    ([5, 6, 7, 8, 9], {"max_tokens": 8}),  # the prompt's partial block first
    ([10, 11], {"max_tokens": 6, "steps": 6, "threshold": 0.3}),  # SDAR's dynamic rule
    ([12, 13, 14, 15], {"max_tokens": 8, "threshold": 0.3, "block_length": 2}),  # a prompt ending on the grid
    ([3] * 9, {"max_tokens": 3, "block_length": 2, "factor": 1.0}),  # generate decodes two blocks more
    ([20, 21, 22], {"max_tokens": 8, "cfg_scale": 0.5, "steps": 4}),
    ([7], {"max_tokens": 5, "temperature": 1.0, "seed": 4, "cache": "dual"}),
    # a partial block planned as a whole one, capped by its masks ([2], where its masks spread give [1, 1])
    ([30, 31, 32, 33, 34, 35], {"max_tokens": 8, "steps": 6, "cache": "prefix"}),
    ([17, 18, 19], {"max_tokens": 6, "block_length": 2, "threshold": 0.5, "cache": "dual"}),
    ([36, 37], {"max_tokens": 9}),  # the server's default block_length on this grid: the model's block_size
]


@pytest.mark.parametrize("layout", list(GRID_LAYOUTS))
def test_requests_on_the_models_grid_decode_as_alone(layout):
    """block_grid="model" (SDAR's, and with shifted logits Fast-dLLM v2's, blocks): a
    request joining every step, so that blocks of other lengths and depths share the
    steps, answers what unmask.generate(block_grid="model") answers alone; decoding ends
    at the block holding the answer's last position."""
    model = tiny_model(seed=7, std=0.5, **GRID_LAYOUTS[layout])
    engine = Engine(model, IdTokenizer(), max_batch=16, max_queue=16)
    jobs = [job_for(model, prompt, [], default_block_length=None, block_grid="model", **body)
            for prompt, body in GRID_REQUESTS]
    step = 0
    while any(not job.finished for job in jobs):
        engine._step([job for job in jobs[:step + 1] if not job.finished])
        step += 1
    block_lengths = set()
    for job, (prompt, body) in zip(jobs, GRID_REQUESTS):
        s = job.settings
        answer_end = len(prompt) + s.max_tokens
        assert s.blocks[-1][0] < answer_end <= s.blocks[-1][1]
        assert s.block_length == body.get("block_length", 4)
        block_lengths |= {end - start for start, end in s.blocks}
        assert job.generated()[:s.max_tokens] == alone(model, prompt, s)[:s.max_tokens]
    # a shifted model's blocks after the prompt start with a block of one (their first
    # position, decoded alone)
    assert block_lengths == ({1, 2, 3, 4} if layout == "fast-dllm-v2" else {2, 4})


def test_a_request_on_the_models_grid_that_exceeds_the_context_names_the_field_to_change():
    def refused(body, prompt_length=5, max_context=4095, default_block_length=None):
        with pytest.raises(protocol.RequestError) as error:
            protocol.settings({"block_grid": "model", **body}, prompt=[5] * prompt_length,
                              default_block_length=default_block_length, max_context=max_context, vocab=61,
                              mask_id=60, model_blocks=(4, False))
        return error.value.param, error.value.message

    # the model's blocks of 4 round 5 + 4090 to 4096: only max_tokens (or the prompt) can help
    assert refused({"max_tokens": 4090})[0] == "max_tokens"
    assert refused({"max_tokens": 4090, "block_length": 2})[0] == "max_tokens"
    # blocks of 8 round 5 + 4086 to 4096 where blocks of 4 would give 4092
    assert refused({"max_tokens": 4086, "block_length": 8})[0] == "block_length"
    assert refused({"max_tokens": 10**12, "block_length": 1})[0] == "max_tokens"  # at once
    assert refused({"max_tokens": 8}, prompt_length=4095)[0] == "prompt"
    param, message = refused({"max_tokens": 8, "block_length": 3})
    assert param == "block_length" and "server's default" not in message
    param, message = refused({"max_tokens": 8}, default_block_length=3)  # the server's, off this model's grid
    assert param == "block_length" and "the server's default block_length: send block_length" in message
    param, message = refused({"max_tokens": 8, "block_length": None}, default_block_length=3)  # null: the default
    assert param == "block_length" and "the server's default block_length" in message
    param, message = refused({"max_tokens": 4086}, default_block_length=8)  # the server's blocks of 8 overflow
    assert param == "block_length" and "the server's default block_length" in message
    assert "server's default" not in refused({"max_tokens": 4086, "block_length": 8})[1]


def test_a_request_on_the_models_grid_stops_after_the_block_holding_its_eos():
    # as unmask.generate stops: the same model calls, the answer up to EOS
    model = tiny_model(seed=11, std=0.5, block_size=4, eos_token_id=30)  # the answer's fifth token: a second block
    engine = Engine(model, IdTokenizer(), max_batch=2, max_queue=2)
    events = []
    job = job_for(model, [5, 6, 7, 8, 9], events, default_block_length=None, max_tokens=12, block_grid="model")
    job.eos_ids = (58, model.eos_id)  # any of a list ends it (58 is in no answer here)
    steps = 0
    while not job.finished:
        engine._step([job])
        steps += 1
    out = unmask.generate(model, [[5, 6, 7, 8, 9]], **job.settings.generate_arguments())
    answer = out.tokens[0].tolist()
    assert events[-1]["text"] == IdTokenizer().decode(answer[:answer.index(30)]) and answer.index(30) == 4
    assert events[-1]["finish_reason"] == "stop"
    assert (job.block, len(job.settings.blocks)) == (1, 4) and steps == out.nfe == 7


def test_cfg_in_bfloat16_guides_in_the_model_dtype():
    model = tiny_model(seed=5).to(torch.bfloat16)
    engine = Engine(model, IdTokenizer(), max_batch=4, max_queue=4)
    jobs = [job_for(model, [5 + i, 9, 11], [], max_tokens=8, cfg_scale=1.5) for i in range(4)]
    run(engine, jobs)
    for job in jobs:
        assert job.generated() == alone(model, list(job.settings.prompt), job.settings)


class ByteLevel(IdTokenizer):
    """Decodes a two-token character as U+FFFD until both tokens are there."""

    def decode(self, ids):
        text = ""
        for i, token in enumerate(ids):
            if token == 40:
                text += "\u00e9" if i + 1 < len(ids) and ids[i + 1] == 41 else "\ufffd"
            elif token != 41:
                text += chr(ord("a") + token % 26)
        return text


def test_streamed_text_never_sends_half_a_character():
    model = tiny_model(seed=3)
    engine = Engine(model, ByteLevel(), max_batch=2, max_queue=2)
    events = []
    job = job_for(model, [5, 6, 7], events, max_tokens=8, stream=True)
    job.canvas[3:5] = torch.tensor([12, 40])  # by hand: "m" and the first byte of an e-acute
    engine._advance(job, block_done=False)
    assert events[-1]["text"] == "m"  # not "m\ufffd"
    job.canvas[5] = 41
    engine._advance(job, block_done=False)
    assert events[-1]["text"] == "\u00e9" and job.sent_text == "m\u00e9"


def test_a_servers_default_cache_applies_where_a_body_names_none():
    def cache_of(body, default):
        return protocol.settings({"prompt": [5], **body}, prompt=[5], default_block_length=4, max_context=64,
                                 vocab=61, mask_id=60, default_cache=default).cache

    assert cache_of({}, "dual") == "dual"
    assert cache_of({"cache": None}, "dual") is None  # null turns it off
    assert cache_of({"cache": "prefix"}, "dual") == "prefix"
    assert cache_of({}, None) is None
    with pytest.raises(protocol.RequestError) as refused:
        protocol.settings({"cache": "dual"}, prompt=[5], default_block_length=4, max_context=64, vocab=61,
                          mask_id=60, caches=False)
    assert refused.value.param == "cache"


def test_a_tensor_parallel_model_is_refused():
    # its LM head returns one rank's slice of the vocabulary: the engine's ops.sample would
    # take slice-local ids for tokens, silently
    model = tiny_model(seed=0)
    model.vocab_shard = object()  # what unmask.distributed.tensor_parallel sets
    with pytest.raises(ValueError, match="tensor-parallel"):
        Engine(model, None, max_batch=2, max_queue=2)


class Letters(IdTokenizer):
    """Token t is a letter (40 then 41 an e-acute, half of one a U+FFFD); its encode adds
    a BOS, as LLaDA's and Llama's tokenizers do."""

    decode = ByteLevel.decode

    def __init__(self):
        self.decodes = 0

    def encode(self, text):
        return type("Encoding", (), {"ids": [1] + [ord(c) - ord("a") for c in text]})()

    def counted_decode(self, ids):
        self.decodes += 1
        return ByteLevel.decode(self, ids)


@pytest.mark.parametrize("answer,stop,text,tokens", [
    ([0, 1, 2, 3, 4, 5, 6, 7], "d", "abc", 3),
    ([40, 41, 0, 3, 4, 5, 6, 7], "d", "\u00e9a", 3),  # a two-token character
    ([0, 1, 2, 3, 4, 5, 6, 7], "a", "", 0),
    ([0, 1, 2, 3, 4, 5, 6, 40], "\ufffd", "abcdefg", 7),  # the last token half a character
])
def test_usage_after_a_stop_string_counts_the_answers_own_tokens(answer, stop, text, tokens):
    """completion_tokens of an answer cut at a stop string: the answer's tokens that
    decode to the returned text, not a re-encoding of it (which adds this tokenizer's BOS)."""
    model = tiny_model(seed=3)
    engine = Engine(model, Letters(), max_batch=2, max_queue=2)
    events = []
    job = job_for(model, [5, 6, 7], events, max_tokens=8, block_length=8, stop=stop)
    job.canvas[3:] = torch.tensor(answer)
    engine._advance(job, block_done=True)
    assert events[-1]["kind"] == "done" and events[-1]["text"] == text and events[-1]["finish_reason"] == "stop"
    assert events[-1]["usage"]["completion_tokens"] == tokens


def test_a_request_that_does_not_stream_decodes_its_text_at_block_ends_only():
    # decoding the whole answer at every step costs a long answer quadratic tokenizer work
    model = tiny_model(seed=3)
    tokenizer = Letters()
    tokenizer.decode = tokenizer.counted_decode
    engine = Engine(model, tokenizer, max_batch=2, max_queue=2)
    events = []
    job = job_for(model, [5, 6, 7], events, max_tokens=12, block_length=4, steps=12)
    run(engine, [job])
    assert events[-1]["kind"] == "done", events[-1]
    assert tokenizer.decodes == 3  # one per block, not one per step (12)
