"""Dream's alg_temp (generate(alg_temp=T)): each step's positions drawn without replacement
with probabilities softmax(confidence / T), by Gumbel-top-k with unmask's Philox noise
(stream 1, the random-remasking draw): the limits are the top-k (T -> 0) and random
remasking (T -> inf); the draw's distribution is the softmax; the checks name alg_temp."""

import copy

import pytest
import torch

import unmask
from unmask import dispatch, ops, sampler
from tests.helpers import requires_gpu, tiny_model

PROMPTS = [[5, 9, 3, 7, 1], [11, 2, 8]]
ARGS = dict(gen_length=16, block_length=8, steps=8)  # two positions a step


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=2)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_the_limits_are_the_top_k_and_random_remasking(model, temperature):
    top_k = unmask.generate(model, PROMPTS, temperature=temperature, seed=3, **ARGS).tokens
    for tiny in (0, 0.0, 1e-9):
        assert torch.equal(unmask.generate(model, PROMPTS, temperature=temperature, seed=3, alg_temp=tiny,
                                           **ARGS).tokens, top_k)
    random = unmask.generate(model, PROMPTS, temperature=temperature, seed=3, remasking="random", **ARGS).tokens
    assert not torch.equal(random, top_k), "the case must tell the two limits apart"
    huge = unmask.generate(model, PROMPTS, temperature=temperature, seed=3, alg_temp=1e12, **ARGS).tokens
    assert torch.equal(huge, random)


def test_a_seed_draws_the_same_positions_on_every_backend(model):
    """Greedy tokens: only the drawn positions depend on the seed."""
    arguments = dict(ARGS, alg_temp=0.3, seed=11)
    native = unmask.generate(model, PROMPTS, **arguments).tokens
    assert not torch.equal(native, unmask.generate(model, PROMPTS, **ARGS).tokens), "the draw must move the tokens"
    with dispatch.forced("reference"):
        assert torch.equal(unmask.generate(model, PROMPTS, **arguments).tokens, native)
    moderate = [unmask.generate(model, PROMPTS, **{**arguments, "seed": seed}).tokens for seed in range(4)]
    assert any(not torch.equal(m, moderate[0]) for m in moderate[1:]), "the draw must depend on the seed"


def test_a_traced_step_draws_the_eager_positions(model):
    """The noise is torch operations inside the step: torch.compile(fullgraph=True) traces
    them (compile=True) and gives the eager tokens."""
    arguments = dict(ARGS, alg_temp=0.3, seed=11)
    eager = unmask.generate(model, PROMPTS, **arguments).tokens
    assert not torch.equal(eager, unmask.generate(model, PROMPTS, **ARGS).tokens)
    assert torch.equal(unmask.generate(model, PROMPTS, compile=True, **arguments).tokens, eager)


@requires_gpu
def test_a_cuda_graph_draws_the_eager_positions(model):
    device_model = copy.deepcopy(model).cuda()
    arguments = dict(ARGS, alg_temp=0.3, seed=11)
    eager = unmask.generate(device_model, PROMPTS, cuda_graph=False, **arguments).tokens
    assert not torch.equal(eager, unmask.generate(device_model, PROMPTS, cuda_graph=False, **ARGS).tokens)
    assert torch.equal(unmask.generate(device_model, PROMPTS, cuda_graph=True, **arguments).tokens, eager)


def drawn_commits(conf, eligible, k, rows, alg_temp, seed):
    """What `rows` independent draws of k positions commit: rows of the same confidences
    through drawn_positions (each row its own row id) and the commit's top-k."""
    def fixed(logits, **_):
        return torch.zeros(rows, conf.numel(), dtype=torch.int64), conf.expand(rows, -1).clone()

    offsets = torch.zeros(rows, conf.numel(), dtype=torch.int64)
    _, drawn = sampler.drawn_positions(fixed, alg_temp)(None, seed=seed, offset=offsets)
    return ops.commit(torch.zeros_like(offsets), torch.ones_like(offsets), drawn, eligible.expand(rows, -1), k=k)


def test_the_first_position_drawn_follows_the_softmax():
    """Rows of the same six confidences, each drawing its first position: the frequencies
    are softmax(conf / T) within four standard deviations (a binomial's, per position)."""
    conf = torch.tensor([0.9, 0.7, 0.5, 0.3, 0.2, 0.1])
    rows, alg_temp = 6000, 0.2
    committed = drawn_commits(conf, torch.ones(6, dtype=torch.bool), 1, rows, alg_temp, seed=5)
    assert bool((committed.sum(dim=1) == 1).all())
    frequency = committed.double().mean(dim=0)
    expected = torch.softmax(conf.double() / alg_temp, dim=0)
    bound = 4 * torch.sqrt(expected * (1 - expected) / rows)
    assert bool(((frequency - expected).abs() <= bound).all()), (frequency.tolist(), expected.tolist())
    # not the top-k: the most confident position is drawn first ~62% of the time
    # (e^4.5 / (e^4.5 + e^3.5 + e^2.5 + e^1.5 + e^1 + e^0.5))
    assert frequency[0] < 0.7


def test_two_drawn_positions_follow_plackett_luce_among_the_eligible():
    """k = 2 with two of six positions not eligible (the most confident among them): those
    are never drawn, and each eligible position's chance of being among the two is the
    Plackett-Luce inclusion probability of softmax(conf / T) over the eligible ones."""
    conf = torch.tensor([0.9, 0.8, 0.7, 0.5, 0.3, 0.1])
    eligible = torch.tensor([False, True, True, True, False, True])
    rows, alg_temp = 6000, 0.25
    committed = drawn_commits(conf, eligible, 2, rows, alg_temp, seed=9)
    assert bool((committed.sum(dim=1) == 2).all()) and not bool(committed[:, ~eligible].any())
    weights = torch.where(eligible, torch.exp(conf.double() / alg_temp), torch.zeros(()))
    p = weights / weights.sum()
    included = torch.stack([p[i] + sum(p[j] * p[i] / (1 - p[j]) for j in range(6) if j != i) for i in range(6)])
    included = torch.where(eligible, included, torch.zeros(()))
    frequency = committed.double().mean(dim=0)
    bound = 4 * torch.sqrt(included * (1 - included) / rows)
    assert bool(((frequency - included).abs() <= bound).all()), (frequency.tolist(), included.tolist())


@pytest.mark.parametrize("arguments,message", [
    (dict(alg_temp=-1.0), "alg_temp must be >= 0"),
    (dict(alg_temp="hot"), "alg_temp must be"),
    (dict(alg_temp=1e-40), "alg_temp must be 0 or at least"),
    (dict(alg_temp=0.5, steps=None, threshold=0.5), "needs steps= alone"),
    (dict(alg_temp=0.5, threshold=0.5), "needs steps= alone"),
    (dict(alg_temp=0.5, steps=None, factor=1.0), "needs steps= alone"),
    (dict(alg_temp=0.5, remasking="random"), "remasking='random' ranks them at random"),
    (dict(alg_temp=0.5, speculate=2), "alg_temp and speculate"),
])
def test_the_checks_name_alg_temp(model, arguments, message):
    with pytest.raises((TypeError, ValueError), match=message):
        unmask.generate(model, PROMPTS, **{**ARGS, **arguments})
