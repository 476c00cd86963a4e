"""The sampler: LLaDA parity at temperature 0, and the properties every decode must have."""

import pytest
import torch
import torch.nn.functional as F

import unmask
from unmask.sampler import schedule_counts
from tests.helpers import tiny_model

MASK = 60
EOS = 59


class NeverPredictsMask(torch.nn.Module):
    """LLaDA's published loop takes the argmax over the whole vocabulary; unmask never
    samples the mask id. Real checkpoints never rank the mask id first; a random tiny
    model might, so for parity the mask logit is -1e4: finite, so CFG arithmetic stays
    finite, and exp(-1e4) underflows to exactly 0, so every other softmax probability
    is the one unmask computes with the mask id banned."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.mask_id = model.mask_id
        self.eos_id = model.eos_id

    def forward(self, input_ids, attention_mask=None):
        logits = self.model(input_ids, attention_mask).clone()
        logits[..., self.mask_id] = -1e4
        return logits


def llada_generate(model, prompt, attention_mask, *, steps, gen_length, block_length, cfg_scale, mask_id):
    """LLaDA's published generate() at temperature 0 with low_confidence remasking, rewritten
    from its description: per-row schedule, argmax, softmax probability of the argmax,
    -inf beyond the active block and on decoded positions, per-row top-k commit."""
    batch, prompt_len = prompt.shape
    x = torch.full((batch, prompt_len + gen_length), mask_id, dtype=torch.long)
    x[:, :prompt_len] = prompt
    full_mask = None
    if attention_mask is not None:
        full_mask = torch.cat([attention_mask, torch.ones(batch, gen_length, dtype=torch.bool)], dim=1)
    prompt_index = torch.zeros_like(x, dtype=torch.bool)
    prompt_index[:, :prompt_len] = True
    num_blocks = gen_length // block_length
    steps_per_block = steps // num_blocks
    for block in range(num_blocks):
        start = prompt_len + block * block_length
        end = start + block_length
        block_masks = (x[:, start:end] == mask_id).sum(dim=1)
        per_step = []
        for i in range(steps_per_block):
            per_step.append(block_masks // steps_per_block + (i < block_masks % steps_per_block).long())
        for i in range(steps_per_block):
            mask_index = x == mask_id
            if cfg_scale > 0:
                un_x = x.clone()
                un_x[prompt_index] = mask_id
                both_mask = None if full_mask is None else torch.cat([full_mask, full_mask])
                both = model(torch.cat([x, un_x]), both_mask)
                cond, uncond = both.chunk(2)
                logits = uncond + (cfg_scale + 1) * (cond - uncond)
            else:
                logits = model(x, full_mask)
            x0 = logits.argmax(dim=-1)
            p = F.softmax(logits.double(), dim=-1)
            x0_p = p.gather(-1, x0[..., None]).squeeze(-1)
            x0_p[:, end:] = float("-inf")
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, torch.tensor(float("-inf"), dtype=torch.float64))
            transfer = torch.zeros_like(x0, dtype=torch.bool)
            for row in range(batch):
                _, chosen = confidence[row].topk(int(per_step[i][row]))
                transfer[row, chosen] = True
            x[transfer] = x0[transfer]
    return x[:, prompt_len:]


PARITY_CASES = [
    # gen_length, block_length, steps, cfg_scale
    (16, 16, 16, 0.0),
    (16, 8, 8, 0.0),
    (24, 8, 6, 0.0),  # 8 masks over 2 steps per block
    (20, 4, 15, 0.0),  # 4 masks over 3 steps: the m % s remainder
    (16, 8, 4, 1.5),
]


@pytest.mark.parametrize("gen_length,block_length,steps,cfg_scale", PARITY_CASES)
def test_llada_parity_batch_one(gen_length, block_length, steps, cfg_scale):
    model = NeverPredictsMask(tiny_model(seed=1))
    prompt = torch.tensor([[3, 14, 15, 9, 26]])
    with torch.no_grad():
        expected = llada_generate(model, prompt, None, steps=steps, gen_length=gen_length,
                                  block_length=block_length, cfg_scale=cfg_scale, mask_id=MASK)
    out = unmask.generate(model, prompt, gen_length=gen_length, block_length=block_length, steps=steps,
                          cfg_scale=cfg_scale, stop_at_eos=False)
    assert torch.equal(out.tokens, expected)
    assert len(set(out.tokens.flatten().tolist())) > 2, "the test model must not be degenerate"


@pytest.mark.parametrize("gen_length,block_length,steps,cfg_scale", PARITY_CASES)
def test_llada_parity_batch_three_left_padded(gen_length, block_length, steps, cfg_scale):
    model = NeverPredictsMask(tiny_model(seed=2))
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [20, 21, 22, 23]]
    ids, attention_mask = unmask.sampler.left_pad(prompts, pad_id=0)
    with torch.no_grad():
        expected = llada_generate(model, ids, attention_mask, steps=steps, gen_length=gen_length,
                                  block_length=block_length, cfg_scale=cfg_scale, mask_id=MASK)
    out = unmask.generate(model, prompts, gen_length=gen_length, block_length=block_length, steps=steps,
                          cfg_scale=cfg_scale, stop_at_eos=False)
    assert torch.equal(out.tokens, expected)
    tensor_out = unmask.generate(model, ids, attention_mask=attention_mask, gen_length=gen_length,
                                 block_length=block_length, steps=steps, cfg_scale=cfg_scale, stop_at_eos=False)
    assert torch.equal(tensor_out.tokens, expected)


def test_unmask_model_directly_matches_parity_wrapper_when_mask_is_never_argmax():
    # The unmask model with its LM head on the active block only gives the same tokens as
    # the full-canvas callable.
    model = tiny_model(seed=3)
    prompts = [[1, 2, 3], [4]]
    direct = unmask.generate(model, prompts, gen_length=8, block_length=4, steps=8, stop_at_eos=False)
    wrapped = unmask.generate(lambda ids, attention_mask=None: model(ids, attention_mask), prompts,
                              gen_length=8, block_length=4, steps=8, mask_id=MASK, stop_at_eos=False)
    assert torch.equal(direct.tokens, wrapped.tokens)


@pytest.mark.parametrize("remasking", ["low_confidence", "margin", "entropy", "random"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_every_step_commits_its_scheduled_count(remasking, temperature):
    model = tiny_model(seed=4)
    gen_length, block_length, steps = 12, 6, 8  # 6 masks over 4 steps: 2, 2, 1, 1
    log = []

    def callback(step, canvas, committed):
        log.append((step, canvas.clone(), committed.clone()))

    prompts = [[1, 2, 3, 4], [5, 6]]
    out = unmask.generate(model, prompts, gen_length=gen_length, block_length=block_length, steps=steps,
                          remasking=remasking, temperature=temperature, seed=5, callback=callback,
                          stop_at_eos=False)
    assert out.nfe == steps == len(log)
    assert out.steps_per_block == [4, 4]
    assert [int(c[2][0].sum()) for c in log] == [2, 2, 1, 1] * 2
    assert [entry[0] for entry in log] == list(range(steps))
    prompt_width = 4
    assert torch.equal(out.sequences[1, 2:prompt_width], torch.tensor([5, 6])), "the prompt never changes"
    assert torch.equal(out.sequences[0, :prompt_width], torch.tensor([1, 2, 3, 4]))
    assert not (out.tokens == MASK).any(), "no mask remains and the mask id is never produced"
    for _, canvas, committed in log:
        assert not (canvas[committed] == MASK).any()


def test_schedule_counts_follow_llada():
    counts = torch.tensor(schedule_counts([7, 3, 0], 3))
    assert counts.tolist() == [[3, 2, 2], [1, 1, 1], [0, 0, 0]]
    assert counts.sum(1).tolist() == [7, 3, 0]


def test_schedule_counts_leave_out_the_steps_where_no_row_commits():
    # LLaDA's schedule of 2 and 1 masks over 5 steps is [1, 1, 0, 0, 0] and [1, 0, 0, 0, 0]:
    # the last three steps commit nothing and cost no model call.
    assert schedule_counts([2, 1], 5) == [[1, 1], [1, 0]]
    assert schedule_counts([0, 0], 4) == [[], []]
    # a plan the size of the block however many steps are asked for (a server's request
    # may ask for any number)
    assert schedule_counts([3], 10**15) == [[1, 1, 1]]


def test_more_steps_than_masks_give_the_tokens_of_one_token_per_step():
    model = tiny_model(seed=4)
    prompts = [[1, 2, 3], [4, 5]]
    one_per_step = unmask.generate(model, prompts, gen_length=16, block_length=8, steps=16, stop_at_eos=False)
    many = unmask.generate(model, prompts, gen_length=16, block_length=8, steps=2 * 10**12, stop_at_eos=False)
    assert torch.equal(many.tokens, one_per_step.tokens)
    assert many.nfe == one_per_step.nfe == 16


@pytest.mark.parametrize("rule", [{"threshold": 0.3}, {"threshold": 0.99}, {"factor": 1.0}])
def test_parallel_decoding_fills_every_block(rule):
    model = tiny_model(seed=5)
    out = unmask.generate(model, [[1, 2], [3, 4, 5]], gen_length=16, block_length=8, stop_at_eos=False, **rule)
    assert not (out.tokens == MASK).any()
    assert out.nfe == sum(out.steps_per_block)
    assert all(1 <= s <= 8 for s in out.steps_per_block)


def test_low_threshold_commits_many_tokens_per_step():
    model = tiny_model(seed=5)
    fast = unmask.generate(model, [[1, 2]], gen_length=16, block_length=8, threshold=0.0, stop_at_eos=False)
    assert fast.nfe == 2  # every position passes: one step per block


def test_same_seed_same_output_and_seed_matters():
    model = tiny_model(seed=6, std=0.1)
    kwargs = dict(gen_length=16, block_length=8, steps=8, temperature=1.0, stop_at_eos=False)
    a = unmask.generate(model, [[1, 2, 3]], seed=11, **kwargs)
    b = unmask.generate(model, [[1, 2, 3]], seed=11, **kwargs)
    c = unmask.generate(model, [[1, 2, 3]], seed=12, **kwargs)
    assert torch.equal(a.tokens, b.tokens)
    assert not torch.equal(a.tokens, c.tokens)


class ScriptedModel:
    """Logits that put EOS first at chosen generated positions and token 7 elsewhere."""

    mask_id = MASK
    eos_id = EOS

    def __init__(self, eos_positions, end_token=EOS):
        self.eos_positions = eos_positions  # row -> positions (absolute) that predict end_token
        self.end_token = end_token
        self.calls = 0

    def __call__(self, input_ids, attention_mask=None):
        self.calls += 1
        logits = torch.zeros(*input_ids.shape, 61)
        logits[..., 7] = 5.0
        for row, positions in self.eos_positions.items():
            for position in positions:
                logits[row, position, self.end_token] = 10.0
        return logits


def test_eos_stops_rows_and_fills_the_rest():
    # Prompt width 2, blocks of 4: row 0 says EOS at generated position 1, row 1 at 5.
    model = ScriptedModel({0: [3], 1: [7]})
    out = unmask.generate(model, [[1, 2], [3, 4]], gen_length=12, block_length=4, steps=12)
    assert out.tokens[0].tolist() == [7, EOS] + [EOS] * 10
    assert out.tokens[1].tolist() == [7, 7, 7, 7, 7, EOS] + [EOS] * 6
    assert out.steps_per_block == [4, 4]  # the third block never ran: every row had stopped
    assert out.nfe == 8 == model.calls
    keep_going = unmask.generate(ScriptedModel({0: [3], 1: [7]}), [[1, 2], [3, 4]], gen_length=12,
                                 block_length=4, steps=12, stop_at_eos=False)
    assert keep_going.nfe == 12 and keep_going.tokens[0, 2] == 7


def test_a_row_stops_at_any_of_several_eos_ids():
    # eos_id=[30, EOS] (generation_config.json's list, say <|im_end|> and <|endoftext|>):
    # row 0 ends at 30, row 1 at EOS (its 30 comes later, in a block never decoded); the
    # rest of a stopped row is the first listed id
    class EndsOneWay(ScriptedModel):
        def __call__(self, input_ids, attention_mask=None):
            logits = super().__call__(input_ids, attention_mask)
            logits[1, 7, EOS] = 10.0
            logits[1, 11, 30] = 20.0
            return logits

    out = unmask.generate(EndsOneWay({0: [3]}, end_token=30), [[1, 2], [3, 4]], gen_length=12, block_length=4,
                          steps=12, eos_id=[30, EOS])
    assert out.tokens[0].tolist() == [7, 30] + [30] * 10
    assert out.tokens[1].tolist() == [7, 7, 7, 7, 7, EOS] + [30] * 6
    assert out.steps_per_block == [4, 4]
    one = unmask.generate(EndsOneWay({0: [3]}, end_token=30), [[1, 2], [3, 4]], gen_length=12, block_length=4,
                          steps=12, eos_id=EOS)  # 30 is a token like any other then
    assert one.tokens[0].tolist() == [7, 30] + [7] * 10 and one.steps_per_block == [4, 4, 4]
    assert one.tokens[1].tolist() == [7, 7, 7, 7, 7, EOS] + [EOS] * 6


class TwoPositions:
    """Two generated positions: A's best token barely leads a runner-up, B's leads six
    flat ones by 1. At confidence temperature 1, A is the more confident (0.525 against
    0.312); at 0.1, B is (0.9997 against 0.731). So which commits first tells the
    temperature the sampler measured confidence at."""

    mask_id, eos_id = 9, 8

    def __call__(self, input_ids, attention_mask=None):
        logits = torch.full((*input_ids.shape, 10), -1e4)
        logits[:, -2, :2] = torch.tensor([5.0, 4.9])
        logits[:, -1, 2:9] = 0.0
        logits[:, -1, 2] = 1.0
        return logits


@pytest.mark.parametrize("conf_temperature,first", [(1.0, 0), (0.1, 1)])
def test_conf_temperature_ranks_positions(conf_temperature, first):
    seen = []
    out = unmask.generate(TwoPositions(), [[1]], gen_length=2, block_length=2, steps=2, stop_at_eos=False,
                          conf_temperature=conf_temperature, callback=lambda step, x, committed: seen.append(
                              committed[0].nonzero().flatten().tolist()))
    assert out.tokens[0].tolist() == [0, 2]
    assert seen[0] == [1 + first]  # canvas column: the prompt is column 0


def test_infill_fills_masks_where_they_stand():
    model = tiny_model(seed=7)
    ids = torch.tensor([[1, MASK, MASK, 4, MASK, 6, 7, MASK], [MASK, 2, 3, 4, 5, 6, 7, 8]])
    out = unmask.infill(model, ids)
    assert not (out.tokens == MASK).any()
    unmasked = ids != MASK
    assert torch.equal(out.tokens[unmasked], ids[unmasked])
    assert out.nfe == 4  # one token per step for the row with the most masks
    by_blocks = unmask.infill(model, ids, block_length=4, threshold=0.0)
    assert not (by_blocks.tokens == MASK).any()


@pytest.mark.parametrize("block_size", [None, 4])
def test_a_padded_dream_row_starting_with_a_mask_decodes_as_alone(block_size):
    # The first real token of a left-padded row is predicted from its own position, as
    # position 0 alone (it was predicted from the pad before it): infill of a row that
    # starts with a mask, and generate from an empty prompt.
    model = tiny_model(seed=6, std=1.0, model_type="dream", include_qkv_bias=True, block_size=block_size)
    m = model.mask_id
    ids = torch.tensor([[0, 0, m, 5, m, 7, m, m], [3, 4, m, m, 5, m, 6, m]])
    mask = torch.tensor([[False, False] + [True] * 6, [True] * 8])
    for kwargs in (dict(), dict(threshold=0.5)):
        padded = unmask.infill(model, ids, attention_mask=mask, **kwargs).tokens
        alone = unmask.infill(model, ids[:1, 2:], **kwargs).tokens
        assert torch.equal(padded[0, 2:], alone[0]), kwargs
    arguments = dict(gen_length=8, block_length=4, steps=8, stop_at_eos=False)
    together = unmask.generate(model, [[], [3, 4, 5]], **arguments).tokens
    assert torch.equal(together[0], unmask.generate(model, [[]], **arguments).tokens[0])


def test_generic_callable_with_logits_attribute():
    model = tiny_model(seed=8)

    class Output:
        def __init__(self, logits):
            self.logits = logits

    out = unmask.generate(lambda ids, attention_mask=None: Output(model(ids, attention_mask)), [[1, 2]],
                          gen_length=4, block_length=4, steps=4, mask_id=MASK, stop_at_eos=False)
    assert torch.equal(out.tokens, unmask.generate(model, [[1, 2]], gen_length=4, block_length=4, steps=4,
                                                    stop_at_eos=False).tokens)


def test_result_reports_timing():
    out = unmask.generate(tiny_model(), [[1]], gen_length=4, block_length=4, steps=2)
    assert out.seconds > 0 and out.tokens_per_second > 0


class TransformersDreamLike(torch.nn.Module):
    """What a transformers Dream model (trust_remote_code) returns, made from unmask's own
    Dream-layout model: logits unshifted (position i holds the prediction for i + 1), a
    [B, 1, L, L] mask of real-token pairs and position ids counted over real tokens in."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.config = type("DreamConfig", (), {"model_type": "Dream"})()

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        real = None
        if attention_mask is not None:
            assert attention_mask.shape == (input_ids.shape[0], 1, input_ids.shape[1], input_ids.shape[1])
            real = attention_mask[:, 0].diagonal(dim1=-2, dim2=-1)  # a token pairs with itself where it is real
            assert torch.equal(position_ids[real], ((real.long().cumsum(-1) - 1)[real]))
        own = self.model(input_ids, real)  # unmask's Dream model shifts: position i holds its own prediction
        raw = torch.cat([own[:, 1:], torch.full_like(own[:, :1], float("nan"))], dim=1)
        if real is not None:  # a pad's own prediction (what Dream reads for the first real token): token 7, sure
            raw = torch.where(real[:, :, None], raw, torch.nn.functional.one_hot(torch.tensor(7), raw.shape[-1]) * 50.0)
        return type("Output", (), {"logits": raw})()


@pytest.mark.parametrize("prompts", [
    [[1, 2, 3, 4], [5, 6]],  # left-padded: the mask and positions matter
    [[1, 2, 3, 4], []],  # an empty prompt: row 1's first real token is generated, from its own state
])
def test_a_transformers_dream_model_is_read_with_its_logits_shifted(prompts):
    dream = tiny_model(seed=6, model_type="dream")
    expected = unmask.generate(dream, prompts, gen_length=8, block_length=4, steps=8, stop_at_eos=False)
    out = unmask.generate(TransformersDreamLike(dream), prompts, gen_length=8, block_length=4, steps=8,
                          mask_id=MASK, eos_id=EOS, stop_at_eos=False)
    assert torch.equal(out.tokens, expected.tokens)
    assert len(set(expected.tokens.flatten().tolist())) > 3, "the test model must not be degenerate"


def test_padding_is_checked_and_given_back_as_it_came():
    """A right-padded attention_mask is refused (generation would continue after the pads);
    pad ids outside the vocabulary (-1) reach no embedding, and the prompt region of
    sequences, like infill's padding, comes back as given. infill's given ids are checked
    against the vocabulary as generate's prompts are."""
    model = tiny_model(seed=5)
    arguments = dict(gen_length=4, block_length=4, steps=4)
    left = torch.tensor([[-1, -1, 7, 8], [1, 2, 3, 4]])
    mask = left >= 0
    alone = unmask.generate(model, [[7, 8]], **arguments)
    out = unmask.generate(model, left, attention_mask=mask, **arguments)
    assert torch.equal(out.tokens[0], alone.tokens[0]) and torch.equal(out.sequences[:, :4], left)
    right = torch.tensor([[7, 8, 0, 0], [1, 2, 3, 4]])
    with pytest.raises(ValueError, match="attention_mask must be left-padded .* row 0 has padding after a real token"):
        unmask.generate(model, right, attention_mask=right > 0, **arguments)
    ids = torch.tensor([[-1, 60, 5, 60, 60, 7], [60, 60, 3, 4, 60, 9]])
    filled = unmask.infill(model, ids, attention_mask=ids >= 0, block_length=6, steps=4)
    assert filled.tokens[0, 0] == -1 and bool((filled.tokens[:, 1:] != 60).all())
    masked_pad = torch.tensor([[60, 60, 5, 60]])  # a pad that holds the mask id stays one (it came back as 0)
    filled = unmask.infill(model, masked_pad, attention_mask=torch.tensor([[False, True, True, True]]), steps=2)
    assert filled.tokens[0, 0] == 60 and bool((filled.tokens[0, 1:] != 60).all())
    with pytest.raises(ValueError, match=r"ids must hold token ids in \[0, 61\) \(the vocabulary\), got ids in \[3, 99\]"):
        unmask.infill(model, torch.tensor([[99, 60, 3]]), steps=1)
    # a model whose mask id is 0: its padding must not be taken for masks to decode
    zero_mask = tiny_model(seed=5, mask_token_id=0)
    ids = torch.tensor([[-1, -1, 7, 0, 0, 9], [3, 4, 5, 0, 8, 0]])
    for rule in ({"steps": 6}, {"threshold": 0.5}):
        filled = unmask.infill(zero_mask, ids, attention_mask=ids >= 0, mask_id=0, **rule)
        assert filled.tokens[0, :2].tolist() == [-1, -1] and bool((filled.tokens[:, 2:] != 0).all()), rule
        assert filled.nfe <= 3, rule  # the busiest row has 3 masks: no call is spent on padding


@pytest.mark.parametrize("extra", [{}, {"speculate": 3}, {"revise_threshold": 0.3}, {"cache": "dual"}],
                         ids=["plain", "speculate", "revise", "dual-cache"])
@pytest.mark.parametrize("rule", [{"threshold": 0.4}, {"factor": 1.0}], ids=["threshold", "factor"])
def test_a_rows_noise_does_not_depend_on_its_companions(rule, extra):
    """With noise and a threshold or factor rule, a row steps through a block while it has
    masks and its RNG offset counts its own steps (docs/design.md, The sampler): a
    companion that takes more or fewer steps per block leaves the row's tokens as they
    were. (The row keeps its index: its noise is addressed by its row in the batch.)"""
    model = tiny_model(seed=6, std=1.0)  # confident enough that rows take 2-8 steps a block, each its own count
    kwargs = dict(gen_length=24, block_length=8, temperature=1.0, seed=5, stop_at_eos=False, **rule, **extra)
    rows = [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    first = unmask.generate(model, rows, **kwargs)
    for companion in ([40, 41, 42], [9, 9, 9], [30, 20, 10]):
        other = unmask.generate(model, [rows[0], companion, rows[2]], **kwargs)
        assert torch.equal(other.tokens[0], first.tokens[0]) and torch.equal(other.tokens[2], first.tokens[2])


@pytest.mark.parametrize("speculate", [0, 3])
def test_an_infill_rows_noise_does_not_depend_on_its_companions_masks(speculate):
    """infill under the steps rule: the rows of a block hold different numbers of masks, so
    the block's plan is as long as its busiest row's; a row steps (and moves its RNG
    offset) only while it has masks, so a companion with more or fewer masks leaves its
    tokens as they were."""
    model = tiny_model(seed=6, std=1.0)
    m = model.mask_id
    row = [3, m, 4, 5, m, m, m, m]
    kwargs = dict(block_length=4, steps=8, temperature=1.0, seed=3, speculate=speculate)
    first = unmask.infill(model, torch.tensor([row, [6, m, m, m, m, m, 7, m]]), **kwargs)
    for companion in ([6, 7, 8, m, m, 7, m, m], [m, m, m, m, 9, 9, 9, m], [6, 7, 8, 9, 9, 9, 9, 9]):
        other = unmask.infill(model, torch.tensor([row, companion]), **kwargs)
        assert torch.equal(other.tokens[0], first.tokens[0]), companion


def test_float16_logits_are_guided_in_float32():
    # A logit difference of 700 at cfg_scale 100 is 70700: past float16's 65504, infinite
    # (an InvalidLogitsError blaming the model) had it been guided in float16.
    from unmask.sampler import guide

    cond = torch.tensor([[700.0, 0.0, -3.0]], dtype=torch.float16)
    uncond = torch.zeros_like(cond)
    guided = guide(cond, uncond, 100.0)
    assert guided.dtype == torch.float32 and torch.isfinite(guided).all()
    assert torch.equal(guided, torch.tensor([[70700.0, 0.0, -303.0]]))
    bf16 = guide(cond.bfloat16(), uncond.bfloat16(), 1.0)
    assert bf16.dtype == torch.bfloat16  # the dtypes that cannot overflow stay as they are
