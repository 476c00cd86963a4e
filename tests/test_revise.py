"""Self-correction (generate(..., revise_threshold=...), unmask.revise): the contracts of
the decoding loop (it ends within its bound, leaves given tokens alone, is deterministic
and independent of its batch companions) and that it corrects what it can see is wrong."""

import pytest
import torch

import unmask
from unmask import revise

MASK, VOCAB = 1, 12


GUESS = 11


def successor(token: torch.Tensor) -> torch.Tensor:
    return (token - 2 + 1) % 8 + 2  # tokens 2..9 in a cycle


class ChainModel(torch.nn.Module):
    """A toy model of a dependency chain: position p of the answer should hold the
    successor of the token at p - 1. With p - 1 visible the model is sure of it (0.99,
    the guess 0.01); with p - 1 masked it is overconfident in a wrong guess (token 11 at
    0.6, token 3 at 0.4): threshold decoding commits the guesses in parallel, and only
    re-checking them under the canvas can tell."""

    def forward(self, ids, attention_mask=None):
        batch, length = ids.shape
        previous = torch.cat([ids[:, :1], ids[:, :-1]], dim=1)
        sure = (previous != MASK)[..., None]
        probs = torch.zeros(batch, length, VOCAB)
        probs.scatter_(2, successor(previous)[..., None], 0.99)
        probs[..., GUESS] = 0.01
        unsure = torch.zeros(batch, length, VOCAB)
        unsure[..., GUESS], unsure[..., 3] = 0.6, 0.4
        return torch.where(sure, probs, unsure).clamp(min=1e-13).log()


def chain_answer(first: int, length: int) -> list[int]:
    out, token = [], torch.tensor(first)
    for _ in range(length):
        token = successor(token)
        out.append(int(token))
    return out


def test_threshold_alone_commits_wrong_guesses_and_revision_repairs_them():
    prompt = torch.tensor([[4, 5]])
    plain = unmask.generate(ChainModel(), prompt, gen_length=6, block_length=6, threshold=0.5, mask_id=MASK,
                            stop_at_eos=False)
    assert plain.tokens[0].tolist() != chain_answer(5, 6)  # the guesses were committed in parallel
    # Six groups: every token is checked alone (WINO's leave-one-out), so a wrong token
    # whose predecessor is right is always seen.
    fixed = unmask.generate(ChainModel(), prompt, gen_length=6, block_length=6, threshold=0.5, mask_id=MASK,
                            stop_at_eos=False, revise_threshold=0.5, revise_groups=6, max_revisions=6)
    assert fixed.tokens[0].tolist() == chain_answer(5, 6)
    assert fixed.canvases == 7 * fixed.nfe - 6  # six verification canvases per call but the first


class Doubter(torch.nn.Module):
    """Sure of token 5 wherever no 5 is visible in the row, else sure of 6: every 5
    committed in parallel with another 5 is disbelieved when re-checked."""

    def forward(self, ids, attention_mask=None):
        batch, length = ids.shape
        token = torch.where((ids == 5).any(dim=1, keepdim=True), 6, 5).expand(batch, length)
        logits = torch.zeros(batch, length, VOCAB)
        logits.scatter_(2, token[..., None], 20.0)
        return logits


@pytest.mark.parametrize("max_revisions", [1, 3])
@pytest.mark.parametrize("rule", [{"threshold": 0.9}, {"factor": 1.0}])
def test_the_loop_ends_within_its_bound(max_revisions, rule):
    """Committed tokens are taken back as often as allowed; the block still ends, within
    m (2 max_revisions + 1) + 1 calls."""
    length = 8
    kwargs = dict(gen_length=length, block_length=length, mask_id=MASK, stop_at_eos=False, **rule)
    plain = unmask.generate(Doubter(), torch.tensor([[3, 4]]), **kwargs)
    out = unmask.generate(Doubter(), torch.tensor([[3, 4]]), revise_threshold=0.5, max_revisions=max_revisions,
                          **kwargs)
    assert plain.nfe == 1 and (plain.tokens == 5).all()  # all committed at once, all 5
    assert set(out.tokens[0].tolist()) <= {5, 6}
    assert plain.nfe + max_revisions <= out.nfe <= length * (2 * max_revisions + 1) + 1


def test_given_tokens_are_never_masked_again():
    """infill: the given tokens stay, even under a model that believes none of them. (A
    generate's prompt is never inside a decoded block, so it cannot be tested there.)"""
    ids = torch.tensor([[3, MASK, 4, MASK, MASK, 6, MASK, 7]])
    out = unmask.infill(Doubter(), ids, threshold=0.9, mask_id=MASK, revise_threshold=0.5, max_revisions=2)
    given = ids != MASK
    assert torch.equal(out.tokens[given], ids[given])
    assert out.nfe > 1


def small_model():
    config = unmask.ModelConfig(d_model=32, n_layers=2, n_heads=2, n_kv_heads=2, mlp_hidden_size=48, vocab_size=24,
                                embedding_size=24, mask_token_id=MASK, eos_token_id=2)
    return unmask.DiffusionTransformer.random(config, seed=3, std=0.5)


@pytest.mark.parametrize("cache", [None, "dual"])
def test_deterministic_under_a_seed_and_independent_of_the_batch(cache):
    model = small_model()
    prompts = torch.randint(3, 24, (4, 5), generator=torch.Generator().manual_seed(1))
    kwargs = dict(gen_length=12, block_length=6, threshold=0.2, stop_at_eos=False, revise_threshold=0.4,
                  revise_groups=3, max_revisions=2, cache=cache)
    noisy = dict(kwargs, temperature=0.8, seed=7)
    first = unmask.generate(model, prompts, **noisy)
    again = unmask.generate(model, prompts, **noisy)
    assert torch.equal(first.tokens, again.tokens)
    assert not torch.equal(unmask.generate(model, prompts, **{**noisy, "seed": 8}).tokens, first.tokens)
    # Greedy, each row decodes alone what it decodes in the crowd. (With noise and a
    # threshold rule, a block's draws start where the batch's slowest row left the last
    # block, as in plain threshold decoding: README, Self-correction.)
    crowd = unmask.generate(model, prompts, **kwargs)
    for row in range(4):
        alone = unmask.generate(model, prompts[row:row + 1], **kwargs)
        assert torch.equal(alone.tokens[0], crowd.tokens[row]), row


@pytest.mark.parametrize("cache", [None, "dual"])
def test_a_check_that_takes_nothing_back_gives_the_plain_tokens_at_any_temperature(cache):
    """A re-check that believes every token changes nothing: the tokens are plain threshold
    decoding's, at temperature > 0 too, over several blocks (a call that only re-checks a
    row draws no noise for it, so it must not move the row's RNG step)."""
    model = small_model()
    prompts = torch.randint(3, 24, (4, 5), generator=torch.Generator().manual_seed(2))
    kwargs = dict(gen_length=18, block_length=6, threshold=0.3, stop_at_eos=False, temperature=0.8, seed=11,
                  cache=cache)
    plain = unmask.generate(model, prompts, **kwargs)
    checked = unmask.generate(model, prompts, revise_threshold=1e-30, **kwargs)
    assert torch.equal(checked.tokens, plain.tokens)
    assert checked.steps_per_block == plain.steps_per_block and checked.nfe > plain.nfe


class MaskTwin(torch.nn.Module):
    """Sure of token 5 among the real tokens everywhere, with [MASK] as likely as 5 (a model
    may give the mask id any logit: the sampler never commits it)."""

    def forward(self, ids, attention_mask=None):
        logits = torch.zeros(*ids.shape, VOCAB)
        logits[..., 5] = logits[..., MASK] = 20.0
        return logits


def test_a_token_is_judged_against_the_real_tokens_not_the_mask():
    kwargs = dict(gen_length=4, block_length=4, threshold=0.9, mask_id=MASK, stop_at_eos=False)
    plain = unmask.generate(MaskTwin(), torch.tensor([[3]]), **kwargs)
    checked = unmask.generate(MaskTwin(), torch.tensor([[3]]), revise_threshold=0.6, max_revisions=3, **kwargs)
    assert plain.nfe == 1 and torch.equal(checked.tokens, plain.tokens)
    assert checked.nfe == 2  # the commit, then one check that believes all four (0.5 with [MASK] counted)


class NaNWhenRechecked(torch.nn.Module):
    """Sure of 5; NaN logits in a row holding both a 5 and a mask, as only a verification
    canvas does here (the canvas is all masks, then all 5s)."""

    def forward(self, ids, attention_mask=None):
        logits = torch.zeros(*ids.shape, VOCAB)
        logits[..., 5] = 20.0
        mixed = ((ids == 5).any(dim=1) & (ids == MASK).any(dim=1))[:, None, None]
        return torch.where(mixed, float("nan"), logits)


def test_nan_logits_in_a_check_are_reported_not_believed():
    with pytest.raises(unmask.ops.InvalidLogitsError):
        unmask.generate(NaNWhenRechecked(), torch.tensor([[3]]), gen_length=4, block_length=4, threshold=0.9,
                        mask_id=MASK, stop_at_eos=False, revise_threshold=0.5)


def test_groups_past_the_block_length_cost_no_more_canvases():
    prompt = torch.tensor([[4, 5]])
    kwargs = dict(gen_length=6, block_length=6, threshold=0.5, mask_id=MASK, stop_at_eos=False, revise_threshold=0.5,
                  max_revisions=6)
    exact = unmask.generate(ChainModel(), prompt, revise_groups=6, **kwargs)
    many = unmask.generate(ChainModel(), prompt, revise_groups=100, **kwargs)
    assert torch.equal(many.tokens, exact.tokens) and (many.nfe, many.canvases) == (exact.nfe, exact.canvases)


def test_every_pair_of_positions_is_seen_apart_within_the_digit_count():
    for length, groups in [(8, 2), (9, 2), (24, 2), (24, 3), (5, 4), (2, 2), (1, 2), (7, 1), (125, 5), (216, 6)]:
        digits, largest = 1, groups
        while largest < length and groups > 1:  # base-groups digits of the positions 0 .. length - 1
            digits, largest = digits + 1, largest * groups
        seen_apart = torch.zeros(length, length, dtype=torch.bool)
        for call in range(digits):
            group = revise.verification_groups(length, groups, call, "cpu")
            assert group.min() >= 0 and group.max() < groups
            seen_apart |= group[:, None] != group[None, :]
        expected = length * length - length if groups > 1 else 0
        assert seen_apart.sum() == expected, (length, groups)
        for call in range(3 * digits):  # no call masks every position at once (125 in base 5 has 3 digits, not 4)
            split = revise.verification_groups(length, groups, call, "cpu").unique().numel()
            assert split > 1 or length == 1 or groups == 1, (length, groups, call)


@pytest.mark.parametrize("bad, message", [
    ({"revise_threshold": 1.5, "threshold": 0.5}, "revise_threshold"),
    ({"revise_threshold": 0.5}, "threshold= or factor="),
    ({"revise_threshold": 0.5, "threshold": 0.5, "revise_groups": 0}, "revise_groups"),
    ({"revise_threshold": 0.5, "threshold": 0.5, "revise_groups": 1}, "revise_groups must be >= 2"),
    ({"threshold": 0.5, "revise_groups": 0}, "revise_groups"),  # checked without revise_threshold too
    ({"threshold": 0.5, "max_revisions": -1}, "max_revisions"),
    ({"revise_threshold": 0.5, "threshold": 0.5, "max_revisions": 0}, "max_revisions"),
    ({"revise_threshold": 0.5, "steps": 4, "speculate": 2}, "threshold= or factor="),
    ({"revise_threshold": 0.5, "threshold": 0.5, "speculate": 2}, "speculate"),
])
def test_arguments_are_checked(bad, message):
    with pytest.raises(ValueError, match=message):
        unmask.generate(Doubter(), torch.tensor([[3]]), gen_length=4, block_length=4, mask_id=MASK, **bad)


def test_a_revise_groups_that_is_not_an_int_is_a_type_error():
    with pytest.raises(TypeError, match="revise_groups must be an int"):
        unmask.generate(Doubter(), torch.tensor([[3]]), gen_length=4, block_length=4, mask_id=MASK, threshold=0.5,
                        revise_threshold=0.5, revise_groups=2.0)
