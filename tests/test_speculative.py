"""Speculative decoding (unmask.speculative): speculate=d gives the tokens of speculate=0 in
at most as many model calls, for every commit rule, remasking kind, temperature, filter,
CFG, ragged batch, EOS stop and cache, on LLaDA, Dream and block-causal layouts."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import unmask
from unmask import cli, tasks
from tests.helpers import tiny_config


def random_model(seed: int, layout: str, std: float):
    fields = dict(model_type="dream", include_qkv_bias=True) if layout == "dream" else {}
    if layout == "block-causal":
        fields = dict(block_size=4)
    return unmask.DiffusionTransformer.random(tiny_config(**fields), seed=seed, std=std)


@st.composite
def decoding_arguments(draw):
    block_length = draw(st.sampled_from([4, 8]))
    blocks = draw(st.integers(1, 2))
    gen_length = block_length * blocks
    rule = draw(st.sampled_from(["steps", "steps2", "steps_more", "threshold", "factor", "steps_threshold"]))
    arguments = dict(gen_length=gen_length, block_length=block_length,
                     temperature=draw(st.sampled_from([0.0, 0.0, 0.7, 1.0])),
                     remasking=draw(st.sampled_from(["low_confidence", "margin", "entropy", "random"])),
                     seed=draw(st.integers(0, 2**40)), stop_at_eos=draw(st.booleans()),
                     cfg_scale=draw(st.sampled_from([0.0, 0.0, 1.5])),
                     cache=draw(st.sampled_from([None, None, "prefix", "dual"])),
                     conf_temperature=draw(st.sampled_from([1.0, 1.0, 0.3])))
    if rule == "steps":
        arguments["steps"] = gen_length  # one token per step
    elif rule == "steps2":
        arguments["steps"] = gen_length // 2  # two per step
    elif rule == "steps_more":
        arguments["steps"] = 2 * gen_length  # more steps than tokens: steps where no row commits
    elif rule == "threshold":
        arguments["threshold"] = draw(st.sampled_from([0.2, 0.5, 0.9])) if arguments["remasking"] != "entropy" else -1.0
    elif rule == "steps_threshold":  # the plan's counts as floors (SDAR's dynamic rule): rows may finish early
        arguments["steps"] = draw(st.sampled_from([gen_length // 2, gen_length, 2 * gen_length]))
        arguments["threshold"] = draw(st.sampled_from([0.05, 0.2])) if arguments["remasking"] != "entropy" else -2.0
    else:
        arguments["factor"] = draw(st.sampled_from([0.5, 1.0, 2.0]))
    if draw(st.booleans()):
        arguments.update(top_k=5, top_p=0.9)
    return arguments


@settings(max_examples=60)
@given(arguments=decoding_arguments(), layout=st.sampled_from(["llada", "dream", "block-causal"]),
       model_seed=st.integers(0, 1000), std=st.sampled_from([0.3, 1.0]), depth=st.integers(1, 8),
       prompts=st.lists(st.lists(st.integers(0, 58), min_size=1, max_size=6), min_size=1, max_size=3),
       siblings=st.booleans())
def test_speculation_gives_the_step_by_step_tokens(arguments, layout, model_seed, std, depth, prompts, siblings):
    model = random_model(model_seed, layout, std)
    expected = unmask.generate(model, prompts, **arguments)
    got = unmask.generate(model, prompts, speculate=depth, speculate_siblings=siblings, **arguments)
    assert torch.equal(got.tokens, expected.tokens)
    assert got.nfe <= expected.nfe
    assert got.steps_per_block == expected.steps_per_block
    assert got.canvases >= got.nfe


def test_a_confident_model_accepts_drafts():
    """The bundled model on its tasks, one token per step: fewer calls, same answers."""
    from unmask import cli, tasks

    model = unmask.from_pretrained(cli.default_model_path(), dtype=torch.float32)
    tokenizer = tasks.CharTokenizer()
    ids, mask, _ = tasks.encode_batch(tasks.examples(8, seed=2), tokenizer)
    arguments = dict(attention_mask=mask[:, :tasks.PROMPT_LENGTH], gen_length=tasks.ANSWER_LENGTH,
                     block_length=tasks.ANSWER_LENGTH, steps=tasks.ANSWER_LENGTH, stop_at_eos=False)
    expected = unmask.generate(model, ids[:, :tasks.PROMPT_LENGTH], **arguments)
    for depth in (2, 4, 8):
        got = unmask.generate(model, ids[:, :tasks.PROMPT_LENGTH], speculate=depth, **arguments)
        assert torch.equal(got.tokens, expected.tokens)
        assert got.nfe < expected.nfe, f"speculate={depth}: {got.nfe} calls, step by step {expected.nfe}"


class Adversary:
    """Logits drawn afresh from a hash of the whole canvas: every commit changes every
    logit, so no draft made from earlier logits can be trusted."""

    vocab = 23

    def __call__(self, ids, attention_mask=None):
        rows = []
        for row in ids:
            seed = int(torch.sum(row * torch.arange(1, row.numel() + 1) * 7919)) % (2**31)
            rows.append(torch.randn(row.numel(), self.vocab, generator=torch.Generator().manual_seed(seed)) * 3)
        return torch.stack(rows)


@pytest.mark.parametrize("arguments", [dict(steps=12), dict(steps=6, temperature=1.0), dict(threshold=0.3),
                                       dict(factor=1.0, remasking="margin"), dict(steps=6, threshold=0.3),
                                       dict(steps=24, threshold=0.2, temperature=1.0)])
def test_an_adversarial_model_gives_the_same_tokens_in_no_more_calls(arguments):
    model = Adversary()
    prompts = [[3, 4, 5], [7]]
    common = dict(gen_length=12, block_length=6, mask_id=22, eos_id=21, stop_at_eos=False, **arguments)
    expected = unmask.generate(model, prompts, **common)
    for depth in (2, 5):
        got = unmask.generate(model, prompts, speculate=depth, **common)
        assert torch.equal(got.tokens, expected.tokens) and got.nfe <= expected.nfe


def test_infill_speculates_too():
    model = random_model(5, "llada", 1.0)
    ids = torch.tensor([[3, 60, 60, 7, 60, 9, 60, 60], [60, 2, 2, 60, 60, 60, 4, 60]])
    for arguments in (dict(block_length=4), dict(block_length=8, threshold=0.5, temperature=1.0)):
        expected = unmask.infill(model, ids, **arguments)
        got = unmask.infill(model, ids, speculate=3, **arguments)
        assert torch.equal(got.tokens, expected.tokens) and got.nfe <= expected.nfe


@pytest.mark.parametrize("value,exception,message", [
    (-1, ValueError, "speculate must be >= 0, got -1"),
    (2.0, TypeError, "speculate must be an int, got float"),
    (True, TypeError, "speculate must be an int, got bool"),
])
def test_speculate_is_checked(value, exception, message):
    model = random_model(1, "llada", 0.3)
    with pytest.raises(exception, match=message):
        unmask.generate(model, [[1, 2]], gen_length=4, block_length=4, speculate=value)
    with pytest.raises(exception, match=message):
        unmask.infill(model, torch.tensor([[1, 60]]), speculate=value)


def test_speculate_siblings_is_checked():
    model = random_model(1, "llada", 0.3)
    with pytest.raises(TypeError, match="speculate_siblings must be a bool, got int"):
        unmask.generate(model, [[1, 2]], gen_length=4, block_length=4, speculate=2, speculate_siblings=1)


def test_runner_up_drafts_save_calls_on_the_bundled_tasks():
    """The commit the stale logits rank second is often the true one: drafting it too
    takes fewer calls over the tasks, with the same tokens."""
    model = unmask.from_pretrained(cli.default_model_path())
    tokenizer = tasks.CharTokenizer()
    calls = {False: 0, True: 0}
    for task in tasks.TASKS:
        ids, mask, _ = tasks.encode_batch(tasks.examples(8, seed=11, tasks=(task,)), tokenizer)
        for i in range(ids.shape[0]):
            prompt, prompt_mask = ids[i:i + 1, :tasks.PROMPT_LENGTH], mask[i:i + 1, :tasks.PROMPT_LENGTH]
            outs = {siblings: unmask.generate(model, prompt, attention_mask=prompt_mask, gen_length=8, block_length=8,
                                              steps=8, stop_at_eos=False, speculate=8, speculate_siblings=siblings)
                    for siblings in (False, True)}
            assert torch.equal(outs[True].tokens, outs[False].tokens)
            for siblings, out in outs.items():
                calls[siblings] += out.nfe
    assert calls[True] < calls[False]


def test_speculate_does_not_combine_with_a_cuda_graph():
    model = random_model(1, "llada", 0.3)
    with pytest.raises(ValueError, match="cuda_graph=True and speculate do not combine"):
        unmask.generate(model, [[1, 2]], gen_length=4, block_length=4, speculate=2, cuda_graph=True)
    with pytest.raises(ValueError, match="cuda_graph=True and revise_threshold do not combine"):
        unmask.generate(model, [[1, 2]], gen_length=4, block_length=4, threshold=0.5, revise_threshold=0.5,
                        cuda_graph=True)


def test_the_callback_sees_every_call():
    model = random_model(2, "llada", 0.3)
    seen = []
    out = unmask.generate(model, [[1, 2]], gen_length=8, block_length=8, steps=8, speculate=4,
                          callback=lambda step, x, committed: seen.append((step, int(committed.sum()))))
    assert [step for step, _ in seen] == list(range(out.nfe))
    assert sum(count for _, count in seen) == 8, "every committed position is reported once"


def test_the_canvases_copy_of_the_cache_is_laid_out_canvas_major_per_group():
    from unmask.models.transformer import KVCache

    for batch, groups in [(4, 1), (4, 2), (1, 1), (2, 2)]:
        cache = KVCache(tiny_config(), batch, 6, dtype=torch.float32, device=torch.device("cpu"))
        for tensor in cache.keys + cache.values:
            tensor.normal_()
        copy = cache.repeated(3, groups)
        for mine, theirs in zip(copy.keys + copy.values, cache.keys + cache.values):
            expected = torch.cat([group.repeat(3, 1, 1, 1) for group in theirs.chunk(groups)])
            assert torch.equal(mine, expected) and mine.is_contiguous()
            mine[-1] = 7.0  # each canvas its own memory, apart from the cache's
            assert not bool((theirs == 7.0).any()) and not bool((mine[:-1] == 7.0).any())
    leading = copy.leading(5)
    leading.keys[0][4] = 7.0
    assert leading.shape == (5, 6) and bool((copy.keys[0][4] == 7.0).all()), "leading rows are a view"


@pytest.mark.parametrize("cfg_scale", [0.0, 1.5])
@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_a_block_copies_the_cache_once_per_canvas_count(monkeypatch, cache, cfg_scale):
    """The canvases of a block's speculative calls share one copy of the cache outside the
    recomputed segment: once per block, or with CFG's two groups once per canvas count
    (fewer canvases are then not the copy's leading rows), not once per call."""
    from unmask import sampler
    from unmask.models.transformer import KVCache

    events, repeated, begin_block = [], KVCache.repeated, sampler._StepModel.begin_block

    def counted_copy(self, times, groups=1):
        events.append(times)
        return repeated(self, times, groups)

    def marked_block(self, start, end):
        if end > start:  # not the empty block a step model starts with
            events.append("block")
        begin_block(self, start, end)

    model = random_model(3, "llada", 1.0)
    arguments = dict(gen_length=16, block_length=8, steps=16, cache=cache, cfg_scale=cfg_scale)
    expected = unmask.generate(model, [[1, 2, 3], [4]], **arguments)
    monkeypatch.setattr(KVCache, "repeated", counted_copy)
    monkeypatch.setattr(sampler._StepModel, "begin_block", marked_block)
    got = unmask.generate(model, [[1, 2, 3], [4]], speculate=4, **arguments)
    assert torch.equal(got.tokens, expected.tokens)
    per_block = [[int(t) for t in block.split()] for block in " ".join(map(str, events)).split("block")[1:]]
    assert len(per_block) == 2 and all(per_block), per_block
    for counts in per_block:
        if cfg_scale == 0.0:
            assert len(counts) == 1, f"one copy per block, got copies for {counts} canvases"
        else:
            assert len(set(counts)) == len(counts), f"one copy per canvas count, got copies for {counts} canvases"
    assert got.nfe - 2 > sum(map(len, per_block)) or cfg_scale > 0, "the block's calls outnumber its copies"
