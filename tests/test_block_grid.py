"""generate(block_grid="model"): blocks on a block-causal model's own grid, as block
diffusion models decode, against transcriptions of two published loops written here from
their descriptions: Fast-dLLM v2's (shifted logits; the token after a finished block taken
first; sub-blocks committed by threshold) and SDAR's (no shift; the prompt's last partial
block completed first; a block's steps planned as if it were all masks)."""

import pytest
import torch

import unmask
from unmask import revise, schedule
from tests.helpers import tiny_model

MASK = 60
DREAM_LAYOUT = {"model_type": "dream", "include_qkv_bias": True}


def best(model, x, positions):
    """Greedy tokens and their probabilities at `positions` of canvas x [1, n], the mask
    id never chosen (unmask's sampler bans it)."""
    with torch.no_grad():
        logits = model(x).float()[0, positions]
    logits[:, MASK] = float("-inf")
    probs = logits.softmax(dim=-1)
    return probs.argmax(dim=-1), probs.max(dim=-1).values


def fast_dllm_v2(model, prompt: list[int], gen_length: int, block: int, sub_block: int, threshold: float):
    """Fast-dLLM v2's generation loop, greedy: the canvas grows a model block at a time; a
    prompt that ends on the grid, and every finished block, is followed by the greedy
    token its last position predicts (taken before the next block's steps); the rest of a
    block is filled sub-block by sub-block, each step committing the masks whose
    probability exceeds the threshold, and at least the most probable one. The model is
    called on the whole canvas: block-causal attention keeps later blocks out of earlier
    positions, as its key/value cache does."""
    x = torch.tensor([prompt])
    end = -(-(len(prompt) + gen_length) // block) * block
    while True:
        if x.shape[1] % block == 0:  # the next block starts with the token after this one
            canvas = torch.cat([x, torch.tensor([[MASK]])], dim=1)
            token, _ = best(model, canvas, [x.shape[1]])
            x = torch.cat([x, token[None]], dim=1)
        start = x.shape[1] - x.shape[1] % block
        x = torch.cat([x, torch.full((1, start + block - x.shape[1]), MASK)], dim=1)
        for low in range(start, start + block, sub_block):
            while (x[0, low:low + sub_block] == MASK).any():
                tokens, conf = best(model, x, list(range(low, low + sub_block)))
                conf = torch.where(x[0, low:low + sub_block] == MASK, conf, -1.0)
                commit = conf > threshold
                commit[conf.argmax()] = True
                x[0, low:low + sub_block] = torch.where(commit, tokens, x[0, low:low + sub_block])
        if x.shape[1] >= end:
            return x[0, len(prompt):len(prompt) + gen_length]


def sdar(model, prompt: list[int], gen_length: int, block: int, steps: int, threshold: float | None = None,
         calls: list | None = None):
    """SDAR's generation loop with its static rule, greedy: blocks on the grid from
    position 0, the prompt's last partial block decoded first; each block's steps commit
    the counts of LLaDA's schedule for a whole block (fewer when fewer masks are left),
    the most probable masks first. With a threshold, its low_confidence_dynamic rule (and
    LLaDA 2.0's): a step commits every mask above the threshold when there are at least
    its count of them, else its count; a block ends when its masks do. calls, when
    given, gets the model calls made."""
    end = -(-(len(prompt) + gen_length) // block) * block
    x = torch.cat([torch.tensor([prompt]), torch.full((1, end - len(prompt)), MASK)], dim=1)
    counts = [block // steps + (i < block % steps) for i in range(steps)]  # LLaDA's split of a whole block
    for start in range(len(prompt) // block * block, end, block):
        for count in counts:
            masked = x[0, start:start + block] == MASK
            if not masked.any():
                break
            tokens, conf = best(model, x, list(range(start, start + block)))
            if calls is not None:
                calls.append(start)
            conf = torch.where(masked, conf, -1.0)
            chosen = conf.topk(min(count, int(masked.sum()))).indices
            if threshold is not None and int((conf > threshold).sum()) >= count:
                chosen = (conf > threshold).nonzero()[:, 0]
            x[0, start + chosen] = tokens[chosen]
    return x[0, len(prompt):len(prompt) + gen_length]


@pytest.mark.parametrize("cache", [None, "prefix", "dual"])
@pytest.mark.parametrize("prompt_length,block,sub_block", [(6, 4, 2), (8, 4, 2), (3, 8, 4), (16, 8, 8), (5, 4, 4)])
def test_decodes_as_fast_dllm_v2(prompt_length, block, sub_block, cache):
    model = tiny_model(seed=5, std=0.5, block_size=block, **DREAM_LAYOUT)
    prompt = [(7 * i + 3) % 50 for i in range(prompt_length)]
    expected = fast_dllm_v2(model, prompt, 16, block, sub_block, threshold=0.25)
    out = unmask.generate(model, [prompt], gen_length=16, block_length=sub_block, threshold=0.25,
                          block_grid="model", cache=cache, stop_at_eos=False)
    assert out.tokens[0].tolist() == expected.tolist()
    assert out.sequences.shape == (1, prompt_length + 16)
    if cache is None:  # the prompt's grid is not the blocks' of block_grid="prompt" here
        plain = unmask.generate(model, [prompt], gen_length=16, block_length=sub_block, threshold=0.25,
                                stop_at_eos=False)
        assert plain.tokens[0].tolist() != expected.tolist()


SDAR_LAYOUT = {"model_type": "sdar", "qk_norm": True, "attention_head_dim": 16, "norm_std": 0.3}


@pytest.mark.parametrize("layout", [{}, SDAR_LAYOUT], ids=["llada", "sdar"])
@pytest.mark.parametrize("prompt_length,block,steps_per_block", [(6, 4, 4), (6, 4, 2), (13, 8, 3), (8, 4, 3),
                                                                 (1, 8, 8)])
def test_decodes_as_sdar(prompt_length, block, steps_per_block, layout):
    model = tiny_model(seed=6, std=0.5, block_size=block, **layout)
    prompt = [(5 * i + 1) % 50 for i in range(prompt_length)]
    expected = sdar(model, prompt, 16, block, steps_per_block)
    out = unmask.generate(model, [prompt], gen_length=16, block_length=block, steps=steps_per_block * 16 // block,
                          block_grid="model", stop_at_eos=False)
    assert out.tokens[0].tolist() == expected.tolist()


@pytest.mark.parametrize("layout", [{}, SDAR_LAYOUT], ids=["llada", "sdar"])
@pytest.mark.parametrize("threshold", [0.12, 0.3])
@pytest.mark.parametrize("prompt_length,block,steps_per_block", [(6, 4, 4), (13, 8, 3), (8, 4, 2), (1, 8, 8)])
def test_decodes_as_sdar_dynamic(prompt_length, block, steps_per_block, threshold, layout):
    """steps with threshold: SDAR's low_confidence_dynamic, in the same model calls."""
    model = tiny_model(seed=6, std=0.5, block_size=block, **layout)
    prompt = [(5 * i + 1) % 50 for i in range(prompt_length)]
    calls = []
    expected = sdar(model, prompt, 16, block, steps_per_block, threshold=threshold, calls=calls)
    out = unmask.generate(model, [prompt], gen_length=16, block_length=block, steps=steps_per_block * 16 // block,
                          threshold=threshold, block_grid="model", stop_at_eos=False)
    assert out.tokens[0].tolist() == expected.tolist()
    assert out.nfe == len(calls)


def test_the_dynamic_rule_is_not_the_static_one():
    """The cases above would pass with the threshold ignored if it never decided: here it
    commits past the plan (fewer calls) and changes the tokens."""
    model = tiny_model(seed=6, std=0.5, block_size=8, **SDAR_LAYOUT)
    prompt = [(5 * i + 1) % 50 for i in range(13)]
    arguments = dict(gen_length=16, block_length=8, steps=16, block_grid="model", stop_at_eos=False)
    static = unmask.generate(model, [prompt], **arguments)
    dynamic = unmask.generate(model, [prompt], threshold=0.12, **arguments)
    assert dynamic.nfe < static.nfe
    assert dynamic.tokens[0].tolist() != static.tokens[0].tolist()
    calls = []
    assert dynamic.tokens[0].tolist() == sdar(model, prompt, 16, 8, 8, threshold=0.12, calls=calls).tolist()


@pytest.mark.parametrize("layout", [{}, DREAM_LAYOUT], ids=["llada", "dream"])
@pytest.mark.parametrize("options", [{"threshold": 0.25}, {"steps": 12, "cache": "dual"},
                                     {"steps": 12, "cfg_scale": 1.0, "cache": "prefix"},
                                     {"threshold": 0.25, "temperature": 0.8, "seed": 2}],
                         ids=["threshold", "steps-dual", "cfg-prefix", "sampled"])
def test_ragged_rows_on_one_grid_decode_as_alone(layout, options):
    model = tiny_model(seed=5, std=0.5, block_size=4, **layout)
    prompts = [[1, 2, 3, 4, 5, 6], [7, 8], [9, 10, 11, 12, 13, 14, 15, 16, 17, 18]]  # lengths 2 modulo 4
    arguments = dict(gen_length=12, block_length=2, block_grid="model", stop_at_eos=False, **options)
    together = unmask.generate(model, prompts, **arguments)
    # a sampled row's noise follows its index in the batch (README, RNG): row 0 alone then
    for row, prompt in enumerate(prompts[:1] if "temperature" in options else prompts):
        assert together.tokens[row].tolist() == unmask.generate(model, [prompt], **arguments).tokens[0].tolist()


def test_eos_on_the_model_grid():
    # EOS taken as the token row 0 gives at generated position 5 (its third block, past
    # a block of one): that row stops after the block, the rest EOS; the other goes on.
    model = tiny_model(seed=5, std=0.5, block_size=4, **DREAM_LAYOUT)
    prompts = [[1, 2, 3, 4, 5, 6], [7, 8]]
    arguments = dict(gen_length=12, block_length=2, threshold=0.25, block_grid="model")
    free = unmask.generate(model, prompts, stop_at_eos=False, **arguments).tokens
    eos = int(free[0, 5])
    first = [row.tolist().index(eos) if eos in row.tolist() else 12 for row in free]
    out = unmask.generate(model, prompts, eos_id=eos, **arguments)
    for row in range(2):
        expected = free[row].clone()
        expected[first[row] + 1:] = eos
        assert out.tokens[row].tolist() == expected.tolist()
    assert out.tokens.shape == (2, 12) and out.sequences.shape == (2, 6 + 12)


def test_callbacks_see_the_canvas_the_result_holds():
    model = tiny_model(seed=5, std=0.5, block_size=4, **DREAM_LAYOUT)
    widths = []
    out = unmask.generate(model, [[1, 2, 3, 4, 5, 6]], gen_length=4, block_length=2, threshold=0.25,
                          block_grid="model", stop_at_eos=False,
                          callback=lambda step, x, committed: widths.append((x.shape[1], committed.shape[1])))
    assert set(widths) == {(10, 10)} and out.sequences.shape == (1, 10)  # the grid's end lies at 12


def test_revision_on_the_model_grid(monkeypatch):
    # A block of one has nothing to verify it against (its logits cannot see its own
    # model block): the plain loop decodes it, and the other blocks are revised.
    revised, decode_block = [], revise.decode_block
    monkeypatch.setattr(revise, "decode_block",
                        lambda model, x, start, end, **kw: revised.append((start, end)) or decode_block(model, x, start,
                                                                                                        end, **kw))
    model = tiny_model(seed=5, std=0.5, block_size=4, **DREAM_LAYOUT)
    out = unmask.generate(model, [[1, 2, 3, 4, 5, 6]], gen_length=8, block_length=4, threshold=0.25,
                          block_grid="model", revise_threshold=0.2, stop_at_eos=False)
    assert not (out.tokens == MASK).any()
    assert revised == [(4, 8), (9, 12), (13, 16)]  # not (8, 9) nor (12, 13)


def test_blocks_of_several_model_blocks():
    # block_length a multiple of block_size: allowed without shifted logits, where each
    # model block's first position needs no block of its own; cached equals uncached.
    model = tiny_model(seed=6, std=0.5, block_size=4)
    arguments = dict(gen_length=16, block_length=8, steps=8, block_grid="model", stop_at_eos=False)
    plain = unmask.generate(model, [[1, 2, 3, 4, 5]], **arguments)
    assert torch.equal(unmask.generate(model, [[1, 2, 3, 4, 5]], cache="dual", **arguments).tokens, plain.tokens)
    with pytest.raises(ValueError, match="block_length=8 to divide the model's block_size=4 .its logits are shifted"):
        unmask.generate(tiny_model(block_size=4, **DREAM_LAYOUT), [[1, 2]], **arguments)


def test_where_the_model_grid_does_not_apply():
    arguments = dict(gen_length=8, block_length=4, block_grid="model")
    with pytest.raises(ValueError, match="block_grid='model' needs a block-causal model"):
        unmask.generate(tiny_model(), [[1, 2]], **arguments)
    model = tiny_model(block_size=4)
    with pytest.raises(ValueError, match=r"lengths of a batch must agree modulo 4 .* got lengths \[2, 3\]"):
        unmask.generate(model, [[1, 2], [3, 4, 5]], **arguments)
    with pytest.raises(ValueError, match="block_length=6 to divide the model's block_size=4"):
        unmask.generate(model, [[1, 2]], gen_length=12, block_length=6, block_grid="model")
    with pytest.raises(ValueError, match="block_grid must be one of"):
        unmask.generate(model, [[1, 2]], gen_length=8, block_length=4, block_grid="canvas")
    uj = pytest.importorskip("unmask.jax", reason="JAX is not installed")
    with pytest.raises(ValueError, match=r"lengths of a batch must agree modulo 4 .* got lengths \[2, 3\]"):
        uj.generate(uj.from_torch(model), [[1, 2], [3, 4, 5]], **arguments)


def test_capped_plans_follow_the_whole_blocks_schedule():
    assert schedule.capped_step_counts([2, 8, 0], 8, 4) == [[2, 0, 0, 0], [2, 2, 2, 2], [0, 0, 0, 0]]
    assert schedule.capped_step_counts([5], 8, 2) == [[4, 1]]  # step_counts spreads it [3, 2]
    assert schedule.capped_step_counts([3, 8], 8, 4) == [[2, 1, 0, 0], [2, 2, 2, 2]]
    assert schedule.capped_step_counts([1], 4, 4) == [[1]]  # the steps where no row commits are left out
    with pytest.raises(ValueError, match="a block of 4 positions holds at most 4 masks"):
        schedule.capped_step_counts([5], 4, 4)


@pytest.mark.parametrize("layout", [{}, DREAM_LAYOUT], ids=["llada", "dream"])
@pytest.mark.parametrize("rule", [{"steps": 8}, {"threshold": 0.25}], ids=["steps", "threshold"])
def test_caches_speculation_and_cfg_keep_the_tokens(layout, rule):
    # The block-causal caches are exact and speculation is lossless on the model grid too
    # (blocks that begin inside the prompt, blocks of one position).
    model = tiny_model(seed=8, std=0.5, block_size=4, **layout)
    prompts = [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11, 12, 13, 14]]
    for cfg_scale in (0.0, 1.0):
        arguments = dict(gen_length=8, block_length=2, block_grid="model", stop_at_eos=False, cfg_scale=cfg_scale,
                         temperature=0.7, seed=3, **rule)
        expected = unmask.generate(model, prompts, **arguments)
        for variant in ({"cache": "prefix"}, {"cache": "dual"}, {"speculate": 2}):
            got = unmask.generate(model, prompts, **arguments, **variant)
            assert torch.equal(got.tokens, expected.tokens), variant
