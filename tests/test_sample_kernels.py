"""The native CPU sample and commit kernels against the reference, element by element,
on odd and real vocabulary sizes, with poisoned outputs, under every instruction-set
build this CPU runs."""

import math

import pytest
import torch

from unmask import native, reference, rng, validation
from tests.helpers import (CONF_RTOL, assert_same_tokens, reference_banned, requires_extension,
                           run_sample_kernel, sample_backend)

pytestmark = [requires_extension, pytest.mark.usefixtures("cpu_isa")]


def run_native(logits, rows=None, **kwargs):
    return run_sample_kernel(sample_backend("cpu"), logits, rows=rows, **kwargs)


CASES = [
    # rows, V, dtype, kwargs
    (1, 1, torch.float32, {}),
    (3, 2, torch.float32, dict(temperature=1.0)),
    (31, 17, torch.float16, dict(temperature=0.7, confidence="margin")),
    (33, 1019, torch.bfloat16, dict(temperature=1.5, top_k=7)),
    (17, 1023, torch.float32, dict(top_p=0.9, confidence="entropy")),
    (5, 1024, torch.float16, dict(temperature=1.0, top_k=50, top_p=0.8, conf_temperature=0.5)),
    (9, 1025, torch.bfloat16, dict(temperature=0.3, banned=[0, 1024, 500], confidence="random", seed=77)),
    (4, 2049, torch.float32, dict(temperature=2.0, top_k=1)),
    (3, 126464, torch.bfloat16, dict(temperature=1.0, banned=[126336], offset=12, seed=2**63 + 5)),
    (2, 152064, torch.float32, dict(top_p=0.95, temperature=0.8, confidence="margin", banned=[151666])),
    (2, 152064, torch.float16, dict(confidence="entropy", conf_temperature=2.0)),
    # top_p's nucleus at a temperature far from 1 (measured under softmax(x / T)).
    (13, 1019, torch.float32, dict(temperature=0.25, top_p=0.9, conf_temperature=0.25)),
    (7, 3001, torch.bfloat16, dict(temperature=3.0, top_k=200, top_p=0.5, confidence="margin")),
    # Greedy with prob confidence streams the row through one chunk slot (no row buffer).
    (6, 5001, torch.float32, dict()),
    (5, 4100, torch.bfloat16, dict(banned=[4099, 2048, 7])),
]


@pytest.mark.parametrize("n_rows,vocab,dtype,kwargs", CASES, ids=[f"{c[0]}x{c[1]}-{str(c[2])[6:]}-{i}" for i, c in enumerate(CASES)])
def test_native_sample_equals_reference(n_rows, vocab, dtype, kwargs):
    gen = torch.Generator().manual_seed(vocab + n_rows)
    logits = (torch.randn(n_rows, vocab, generator=gen) * 4).to(dtype)
    expected_tokens, expected_conf = reference.sample(logits, **reference_banned(kwargs))
    tokens, conf = run_native(logits, **kwargs)
    assert_same_tokens(logits, expected_tokens, tokens, temperature=kwargs.get("temperature", 0.0),
                       seed=kwargs.get("seed", 0), offset=kwargs.get("offset", 0))
    same = tokens == expected_tokens
    torch.testing.assert_close(conf[same].double(), expected_conf[same].double(), rtol=CONF_RTOL, atol=1e-9)


@pytest.mark.parametrize("confidence", ["prob", "entropy", "margin"])
def test_confidence_of_large_logits(confidence):
    """Logits near 3000: an exponent x * a - max * a carries the rounding of max * a
    (2^-13 here, 1e-4 relative in every term of the sum); the kernel must subtract the
    maximum first, or take that rounding out exactly (the single pass's hi + lo)."""
    gen = torch.Generator().manual_seed(8)
    logits = torch.randn(7, 3001, generator=gen) * 2 + 3000.0
    expected = reference.sample(logits, confidence=confidence)
    got = run_native(logits, confidence=confidence)
    assert torch.equal(got[0], expected[0])
    torch.testing.assert_close(got[1].double(), expected[1].double(), rtol=CONF_RTOL, atol=0)


def _rows_for_single_pass_chunks(vocab, gen):
    """Rows whose later chunks (the kernel reads 2048 ids at a time, each after the first
    in one pass against the maximum so far) raise the maximum a little (the pass's sums
    are rescaled), raise it so far that the pass must be redone, repeat it (first id
    wins), or hold NaN or +inf."""
    logits = torch.randn(12, vocab, generator=gen) * 3
    logits[0, 5000] = 40.0                      # a modest rise in chunk 2
    logits[1, 4500] = 400.0                     # a rise far beyond 2^64: the chunk is redone
    logits[2, 100] = logits[2, 4100] = 30.0     # the maximum twice: the first id wins
    logits[3, 4200] = logits[3, 4201] = 30.0    # first seen in a later chunk, twice
    logits[4, 2048:4096] = float("-inf")        # a chunk of -inf only
    logits[5, vocab - 1] = 50.0                 # the maximum in the short last chunk
    logits[6, 4097] = float("nan")
    logits[7, 5500] = float("inf")
    logits[8, 0] = -300.0                       # and nothing special: 8 is a plain row
    logits[9, vocab - 1] = float("nan")         # in the scalar tail of the last chunk
    logits[10, vocab - 1] = logits[10].max() + 1.5  # a small rise in the scalar tail
    logits[11, 4500] = logits[11].max() + 2.5       # a small rise in a vector step
    return logits


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kwargs", [dict(), dict(confidence="entropy"), dict(conf_temperature=0.05),
                                    dict(temperature=1.0, seed=4), dict(confidence="entropy", conf_temperature=3.0)])
def test_single_pass_chunks(dtype, kwargs):
    vocab = 3 * 2048 + 17
    logits = _rows_for_single_pass_chunks(vocab, torch.Generator().manual_seed(21)).to(dtype)
    expected_tokens, expected_conf = reference.sample(logits, **kwargs)
    tokens, conf = run_native(logits, **kwargs)
    invalid = [6, 7, 9]
    assert tokens[invalid].tolist() == [-1, -1, -1] and torch.isneginf(conf[invalid]).all(), "NaN, +inf: invalid"
    assert_same_tokens(logits, expected_tokens, tokens, temperature=kwargs.get("temperature", 0.0),
                       seed=kwargs.get("seed", 0), offset=0)
    if not kwargs.get("temperature"):
        assert tokens[2] == 100 and tokens[3] == 4200 and tokens[10] == vocab - 1 and tokens[11] == 4500
    torch.testing.assert_close(conf.double(), expected_conf.double(), rtol=CONF_RTOL, atol=1e-9)


def test_sums_when_the_scaled_maximum_leaves_the_float_range():
    """max * log2(e) / conf_temperature past 3.4e38: the single pass, which forms it,
    must give way to two passes (ties at the maximum set the confidence: 1/3, then 1)."""
    logits = torch.full((2, 3 * 2048 + 17), 3e8)
    logits[:, 5000:5003] += 32.0  # three ties at the maximum, in a chunk after the first
    logits[1, 100] += 64.0        # a single maximum in the first chunk
    expected = reference.sample(logits, conf_temperature=1e-30)
    got = run_native(logits, conf_temperature=1e-30)
    assert got[0].tolist() == [5000, 100] and torch.equal(got[0], expected[0])
    torch.testing.assert_close(got[1], expected[1], rtol=CONF_RTOL, atol=0)
    torch.testing.assert_close(got[1], torch.tensor([1 / 3, 1.0]), rtol=CONF_RTOL, atol=0)


def test_rows_subset_writes_every_row():
    logits = torch.randn(40, 333)
    rows = torch.tensor([39, 0, 17, 5])
    tokens, conf = run_native(logits, rows=rows, temperature=1.0, seed=3)
    expected_tokens, expected_conf = reference.sample(logits, temperature=1.0, seed=3, rows=rows)
    assert torch.equal(tokens, expected_tokens)
    torch.testing.assert_close(conf, expected_conf, rtol=CONF_RTOL, atol=0)


def test_ties_and_signed_zeros():
    logits = torch.tensor([[0.0, -0.0, 0.0, -1.0], [-0.0, 0.0, -0.0, -0.0], [2.0, 3.0, 3.0, 1.0]])
    for kwargs in ({}, {"top_k": 2}, {"top_k": 1, "temperature": 1.0}, {"top_p": 0.5}):
        expected = reference.sample(logits, **kwargs)
        got = run_native(logits, **kwargs)
        assert torch.equal(got[0], expected[0]), kwargs
        torch.testing.assert_close(got[1], expected[1], rtol=CONF_RTOL, atol=0)


def _rows_for_each_filter_path(vocab, gen):
    """Rows that send top_k and top_p down each of the kernel's paths (sample_filter.h):
    few candidates, a nucleus of thousands found by the mass passes, ties across the
    boundary, too many -inf ids or candidates for anything but radix selection."""
    flat = torch.randn(3, vocab, generator=gen)             # at T = 1: a nucleus of ~1/3 of the ids
    peaked = torch.randn(3, vocab, generator=gen) * 3
    peaked[:, 7] += 25.0                                    # one id holds nearly all the mass
    ties = torch.randint(0, 6, (3, vocab), generator=gen).float()  # six values, thousands of ties each
    mostly_inf = torch.full((2, vocab), float("-inf"))
    mostly_inf[:, ::97] = torch.randn(2, (vocab + 96) // 97, generator=gen)  # fewer finite ids than top_k
    wide = torch.randn(2, vocab, generator=gen) * 20        # spread far beyond the Gumbel reach
    return torch.cat([flat, peaked, ties, mostly_inf, wide])


FILTER_PATHS = [
    dict(top_k=50, temperature=1.0),
    dict(top_k=3000, temperature=0.7),                      # more candidates than sorting pays for: radix
    dict(top_p=0.9, temperature=1.0, confidence="entropy"),
    dict(top_p=0.95, confidence="margin"),                  # greedy: the nucleus at T = 1
    dict(top_p=0.5, temperature=0.3, conf_temperature=0.3),
    dict(top_p=0.999999, temperature=1.0),                  # within 1e-5 of 1: radix
    dict(top_k=400, top_p=0.8137, temperature=2.0),         # the nucleus of top_k's sorted ids (a top_p that no
                                                            # count of equal masses reaches exactly)
    dict(top_k=100, top_p=0.3, confidence="entropy"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kwargs", FILTER_PATHS, ids=[str(k) for k in FILTER_PATHS])
def test_filters_on_every_path(kwargs, dtype):
    """Tokens and confidences (sums over the kept ids, so a kept set off by one id shows)
    equal the reference's on rows built for each selection path."""
    vocab = 20011
    logits = _rows_for_each_filter_path(vocab, torch.Generator().manual_seed(5)).to(dtype)
    kwargs = dict(kwargs, seed=13)
    expected_tokens, expected_conf = reference.sample(logits, **kwargs)
    tokens, conf = run_native(logits, **kwargs)
    assert_same_tokens(logits, expected_tokens, tokens, temperature=kwargs.get("temperature", 0.0), seed=13, offset=0)
    same = tokens == expected_tokens
    torch.testing.assert_close(conf[same].double(), expected_conf[same].double(), rtol=CONF_RTOL, atol=1e-9)


def test_invalid_rows():
    logits = torch.randn(5, 64)
    logits[0, 3] = float("nan")
    logits[1, 9] = float("inf")
    logits[2] = float("-inf")
    logits[3, :] = float("-inf")
    logits[3, 10] = 1.0  # only id 10 is finite, and it is banned below
    tokens, conf = run_native(logits, banned=[10])
    assert tokens[:4].tolist() == [-1, -1, -1, -1] and torch.isneginf(conf[:4]).all()
    assert tokens[4] >= 0


def test_near_tie_may_flip_only_within_rounding():
    """Two ids whose exact Gumbel scores tie to float64 rounding: either may win, and the
    comparison helper accepts exactly that."""
    seed, vocab, temperature = 5, 64, 1.0
    g = rng.gumbel(seed, torch.tensor([0]), vocab)[0]
    logits = torch.full((1, vocab), -30.0)
    logits[0, 3] = 1.0
    logits[0, 40] = float(torch.tensor(1.0 + float(g[3]) - float(g[40]), dtype=torch.float32))
    expected = reference.sample(logits, temperature=temperature, seed=seed)[0]
    got = run_native(logits, temperature=temperature, seed=seed)[0]
    assert int(got) in (3, 40) and int(expected) in (3, 40)
    score_3 = 1.0 + float(g[3])
    score_40 = float(logits[0, 40]) + float(g[40])
    assert math.isclose(score_3, score_40, rel_tol=1e-6), "the case must really be a near-tie"
    assert_same_tokens(logits, expected, got, temperature=temperature, seed=seed, offset=0)


def test_native_commit_writes_every_element():
    gen = torch.Generator().manual_seed(0)
    for batch, length in [(1, 1), (3, 17), (5, 99), (2, 1025)]:
        conf = torch.rand(batch, length, generator=gen)
        conf[0, 0] = float("nan")
        eligible = torch.rand(batch, length, generator=gen) > 0.5
        tokens = torch.randint(0, 100, (batch, length), generator=gen)
        for mode in ({"k": torch.randint(0, length + 1, (batch,), generator=gen)}, {"threshold": 0.7}, {"factor": 1.5}):
            x_native = torch.full((batch, length), -1, dtype=torch.int64)
            x_reference = x_native.clone()
            out = torch.ones(batch, length, dtype=torch.bool)  # poison: every False must be written
            call = validation.commit_call(x_native, tokens, conf, eligible, **mode)
            committed = native.kernels()[("commit", "cpu")](call, out=out)
            expected = reference.commit(x_reference, tokens, conf, eligible, **mode)
            assert torch.equal(committed, expected), mode
            assert torch.equal(x_native, x_reference), mode


@pytest.mark.parametrize("temperature", [0.05, 1.0, 50.0])
@pytest.mark.parametrize("scale", [0.01, 3.0, 30.0])
def test_gumbel_bound_never_drops_the_winner(temperature, scale):
    """The native kernel draws exact noise only for ids that pass a float bound; over many
    rows of flat and of peaked logits, at low and high temperature, the winner must match."""
    gen = torch.Generator().manual_seed(int(temperature * 100 + scale))
    logits = torch.randn(256, 4099, generator=gen) * scale
    expected = reference.sample(logits, temperature=temperature, seed=99, offset=4)[0]
    got = run_native(logits, temperature=temperature, seed=99, offset=4)[0]
    assert_same_tokens(logits, expected, got, temperature=temperature, seed=99, offset=4)
