"""sample: argmax at temperature 0, filters, confidences, and Gumbel-max statistics.

Every test runs through the reference and through the native CPU kernel (the
`backend` fixture); test_sample_kernels.py compares the two directly.
"""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from unmask import ops, reference, rng
from tests.helpers import CONF_RTOL


pytestmark = pytest.mark.usefixtures("backend")

# Confidences: the kernels form z = (x - max) / conf_temperature in float32, so each
# exponent carries |z| * 2^-24 of rounding, |z| <= 20 for the logits here: 1.2e-6
# relative, doubled for the float32 partial sums.


def random_logits(rows, vocab, seed, dtype=torch.float32, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, vocab, generator=gen) * scale).to(dtype)


@given(
    rows=st.integers(1, 9),
    vocab=st.sampled_from([1, 2, 17, 1019]),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    seed=st.integers(0, 2**20),
)
def test_temperature_zero_is_argmax(rows, vocab, dtype, seed):
    logits = random_logits(rows, vocab, seed, dtype)
    tokens, conf = ops.sample(logits)
    assert torch.equal(tokens, logits.float().argmax(dim=-1))
    expected = torch.softmax(logits.double(), dim=-1).gather(-1, tokens[:, None]).squeeze(-1)
    torch.testing.assert_close(conf.double(), expected, rtol=CONF_RTOL, atol=1e-7)


def test_ties_go_to_the_lower_id():
    logits = torch.tensor([[0.0, 2.0, 1.0, 2.0], [5.0, 5.0, 5.0, 5.0]])
    assert ops.sample(logits)[0].tolist() == [1, 0]
    assert ops.sample(logits, top_k=1, temperature=1.0)[0].tolist() == [1, 0]


@pytest.mark.parametrize("temperature", [0.0, 1.0, 5.0])
def test_banned_ids_never_come_out(temperature):
    logits = random_logits(512, 17, 0)
    banned = [int(i) for i in logits.argmax(dim=-1)[:3]] + [0]
    for seed in range(5):
        tokens, _ = ops.sample(logits, temperature=temperature, banned=banned, seed=seed)
        assert not torch.isin(tokens, torch.tensor(banned)).any()


@given(seed=st.integers(0, 2**32), temperature=st.floats(0.1, 10.0))
def test_top_k_one_is_argmax(seed, temperature):
    logits = random_logits(16, 33, seed)
    tokens, _ = ops.sample(logits, temperature=temperature, top_k=1, seed=seed)
    assert torch.equal(tokens, logits.argmax(dim=-1))


def test_top_k_samples_stay_in_the_top_k():
    logits = random_logits(256, 50, 1, scale=0.1)  # nearly flat: sampling roams everywhere it may
    top5 = logits.topk(5, dim=-1).indices
    tokens, _ = ops.sample(logits, temperature=10.0, top_k=5, seed=3)
    assert (top5 == tokens[:, None]).any(dim=-1).all()
    assert len(set(tokens.tolist())) > 5  # not stuck on a few ids


@given(seed=st.integers(0, 2**20), top_p=st.floats(0.01, 0.999), temperature=st.sampled_from([1.0, 0.2, 3.0]))
def test_top_p_keeps_the_minimal_set(seed, top_p, temperature):
    logits = random_logits(4, 23, seed).double()
    keep = reference.keep_top_p(logits, top_p, temperature)
    probs = torch.softmax(logits / temperature, dim=-1)
    for row in range(logits.shape[0]):
        kept = probs[row][keep[row]]
        assert float(kept.sum()) >= top_p - 1e-12, "kept mass must reach top_p"
        assert float(kept.sum() - kept.min()) < top_p, "dropping the least likely kept token must fall short"
        dropped = probs[row][~keep[row]]
        if dropped.numel():
            assert float(kept.min()) >= float(dropped.max()), "kept tokens are the most likely"


def test_top_p_then_samples_stay_in_the_nucleus():
    logits = random_logits(128, 40, 2)
    keep = reference.keep_top_p(logits.double(), 0.6)
    tokens, _ = ops.sample(logits, temperature=1.0, top_p=0.6, seed=9)
    assert keep.gather(-1, tokens[:, None]).all()


# Logits 2, 1, 0: at temperature 1 the probabilities are 0.665, 0.245, 0.090, so top_p 0.9
# keeps two tokens; at 0.2 they are 0.993, 0.007, 0.000 (one token); at 5, 0.402, 0.329,
# 0.269 (all three). "margin" confidence (p(top1) - p(top2) at conf_temperature 1 over the
# kept ids, whichever token is drawn) tells which: 0.4621, 1 - 0 and 0.4205.
NUCLEUS_CASES = [(0.0, 0.4621), (1.0, 0.4621), (0.2, 1.0), (5.0, 0.4205), (1e-30, 1.0)]  # 1e-30: the bound


@pytest.mark.usefixtures("cpu_isa")
@pytest.mark.parametrize("temperature,conf", NUCLEUS_CASES)
def test_top_p_nucleus_is_measured_at_the_sampling_temperature(temperature, conf):
    """As transformers, vLLM and Dream measure it: under softmax(logits / T), T the
    sampling temperature (1 for greedy rows), so a cold sampler keeps fewer tokens."""
    logits = torch.tensor([[2.0, 1.0, 0.0] + [-1e4] * 5] * 3)
    tokens, got = ops.sample(logits, temperature=temperature, top_p=0.9, confidence="margin", seed=4)
    assert (tokens >= 0).all() and (tokens < 3).all()
    expected = reference.sample(logits, temperature=temperature, top_p=0.9, confidence="margin", seed=4)[1]
    torch.testing.assert_close(expected, torch.full((3,), conf), rtol=1e-4, atol=0)
    if temperature <= 0.2:  # one kept token: every row draws it
        assert (tokens == 0).all()
    torch.testing.assert_close(got, expected, rtol=CONF_RTOL, atol=0)


def dream_probabilities(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Dream's sample_tokens up to its softmax, transcribed from its description: logits
    divided by the temperature (when above 0), then the top-p filter on those (a sorted
    token is dropped once the mass before it exceeds top_p), then the softmax."""
    if temperature > 0:
        logits = logits / temperature
    ordered, order = torch.sort(logits, descending=True)
    beyond = torch.softmax(ordered, dim=-1).cumsum(dim=-1) > top_p
    beyond = torch.cat([torch.zeros_like(beyond[..., :1]), beyond[..., :-1]], dim=-1)
    logits = logits.masked_fill(torch.zeros_like(beyond).scatter(-1, order, beyond), float("-inf"))
    return torch.softmax(logits, dim=-1)


@pytest.mark.usefixtures("cpu_isa")
@pytest.mark.parametrize("temperature", [0.0, 0.2, 0.7, 1.5])
def test_confidence_at_the_sampling_temperature_is_dreams(temperature):
    """Dream's confidences (maskgit_plus: the drawn token's probability; topk_margin;
    entropy, sum p log(p + 1e-10)) come from the distribution it samples from: with
    conf_temperature set to the sampling temperature (1 when greedy), unmask's are those,
    whatever token the RNG draws."""
    logits = random_logits(64, 151, 6).double()
    conf_temperature = temperature if temperature > 0 else 1.0
    probs = dream_probabilities(logits, temperature, 0.95)
    for kind in ("prob", "margin", "entropy"):
        tokens, conf = ops.sample(logits.float(), temperature=temperature, top_p=0.95, confidence=kind,
                                  conf_temperature=conf_temperature, seed=11)
        assert (probs.gather(-1, tokens[:, None]) > 0).all(), "drawn from Dream's nucleus"
        if kind == "prob":
            expected = probs.gather(-1, tokens[:, None]).squeeze(-1)
        elif kind == "margin":
            top2 = probs.topk(2, dim=-1).values
            expected = top2[:, 0] - top2[:, 1]
        else:
            expected = (probs * torch.log(probs + 1e-10)).sum(dim=-1)
        # float32 logits (their float32 copy here) against Dream's float64; its entropy's
        # 1e-10 inside the logarithm moves the sum by at most 151e-10.
        torch.testing.assert_close(conf.double(), expected, rtol=CONF_RTOL, atol=1e-7, msg=kind)


def test_confidence_kinds_match_their_definitions():
    logits = random_logits(7, 29, 4)
    p = torch.softmax(logits.double() / 0.7, dim=-1)
    tokens, prob = ops.sample(logits, confidence="prob", conf_temperature=0.7)
    torch.testing.assert_close(prob.double(), p.gather(-1, tokens[:, None]).squeeze(-1), rtol=CONF_RTOL, atol=0)
    _, margin = ops.sample(logits, confidence="margin", conf_temperature=0.7)
    top2 = p.topk(2, dim=-1).values
    torch.testing.assert_close(margin.double(), top2[:, 0] - top2[:, 1], rtol=CONF_RTOL, atol=1e-7)
    _, entropy = ops.sample(logits, confidence="entropy", conf_temperature=0.7)
    torch.testing.assert_close(entropy.double(), (p * p.log()).sum(dim=-1), rtol=CONF_RTOL, atol=0)
    _, random = ops.sample(logits, confidence="random", seed=11, offset=5)
    expected = rng.uniform_from_draws(rng.draws(11, torch.arange(7), 1, offset=5, stream=1)[:, 0])
    torch.testing.assert_close(random.double(), expected, rtol=1e-7, atol=0)


def test_margin_with_one_kept_token_is_its_probability():
    logits = torch.tensor([[1.0, 3.0, 2.0]])
    _, margin = ops.sample(logits, confidence="margin", top_k=1)
    assert margin.item() == 1.0


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_token_frequencies_match_softmax(temperature):
    base = torch.tensor([1.0, 0.5, 0.0, -0.5, -1.0, 2.0])
    draws = 40000
    logits = base.expand(draws, -1).contiguous()  # one row per draw: rows get independent noise
    tokens, _ = ops.sample(logits, temperature=temperature, seed=1234)
    counts = torch.bincount(tokens, minlength=6).double()
    probs = torch.softmax(base.double() / temperature, dim=0)
    # 5 degrees of freedom: P(chi2 > 25) < 2e-4 for a correct sampler.
    assert chi_square(counts, probs) < 25.0, (counts / draws, probs)
    # A sampler that ignored the temperature would fail by far.
    assert temperature == 1.0 or chi_square(counts, torch.softmax(base.double(), 0)) > 100


def test_frequencies_with_top_k_match_the_renormalised_top_k():
    base = torch.tensor([0.3, 1.2, -0.4, 0.9, 0.0, 1.1])
    tokens, _ = ops.sample(base.expand(30000, -1).contiguous(), temperature=1.0, top_k=3, seed=7)
    counts = torch.bincount(tokens, minlength=6).double()
    keep = torch.tensor([False, True, False, True, False, True])
    probs = torch.softmax(base.double().masked_fill(~keep, -math.inf), dim=0)
    assert counts[~keep].sum() == 0
    assert chi_square(counts[keep], probs[keep]) < 20.0  # 2 dof, P < 5e-5


def test_a_seed_reproduces_and_another_differs():
    logits = random_logits(64, 100, 5, scale=0.5)
    a = ops.sample(logits, temperature=1.0, seed=42, offset=3)
    b = ops.sample(logits, temperature=1.0, seed=42, offset=3)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], ops.sample(logits, temperature=1.0, seed=43, offset=3)[0])
    assert not torch.equal(a[0], ops.sample(logits, temperature=1.0, seed=42, offset=4)[0])


@pytest.mark.parametrize("confidence", ["prob", "random"])
def test_an_offset_tensor_draws_as_its_value(confidence):
    """offset as a 0-d tensor (a step counter a captured step reads) gives the draws of the
    int; int32 and int64 alike, and 2^32 - 1 (the largest) too."""
    logits = random_logits(9, 300, seed=8)
    for value, dtype in ((5, torch.int64), (7, torch.int32), (2**32 - 1, torch.int64)):
        expected = ops.sample(logits, temperature=1.0, confidence=confidence, seed=3, offset=value)
        got = ops.sample(logits, temperature=1.0, confidence=confidence, seed=3, offset=torch.tensor(value, dtype=dtype))
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


@pytest.mark.parametrize("confidence", ["prob", "random"])
def test_one_offset_per_row(confidence):
    """offset [B, L] (rows at different steps of their schedules): row r draws as a call
    with offset=offsets[r] would draw it, with rows and top-k too."""
    logits = random_logits(12, 300, seed=9).reshape(3, 4, 300)
    offsets = torch.tensor([[0, 5, 5, 2**32 - 1], [7, 0, 1, 2], [5, 5, 9, 9]])
    rows = torch.tensor([0, 1, 3, 5, 6, 11])
    for kwargs in (dict(), dict(rows=rows), dict(top_k=40)):
        tokens, conf = ops.sample(logits, temperature=1.0, confidence=confidence, seed=4, offset=offsets, **kwargs)
        for value in offsets.unique().tolist():
            expected = ops.sample(logits, temperature=1.0, confidence=confidence, seed=4, offset=value, **kwargs)
            here = offsets == value
            assert torch.equal(tokens[here], expected[0][here]) and torch.equal(conf[here], expected[1][here])


def test_rows_restricts_work_and_keeps_row_ids():
    logits = random_logits(10, 31, 6).reshape(2, 5, 31)
    full_tokens, full_conf = ops.sample(logits, temperature=1.0, seed=8)
    rows = torch.tensor([7, 0, 3])
    tokens, conf = ops.sample(logits, temperature=1.0, seed=8, rows=rows)
    flat_tokens, flat_conf = tokens.reshape(-1), conf.reshape(-1)
    assert torch.equal(flat_tokens[rows], full_tokens.reshape(-1)[rows])
    assert torch.equal(flat_conf[rows], full_conf.reshape(-1)[rows])
    others = torch.ones(10, dtype=torch.bool)
    others[rows] = False
    assert (flat_tokens[others] == -1).all() and torch.isneginf(flat_conf[others]).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_rows_are_reported(bad):
    logits = random_logits(3, 8, 7)
    logits[1, 4] = bad
    with pytest.raises(ops.InvalidLogitsError, match=r"row ids \[1\]"):
        ops.sample(logits)
    tokens, conf = ops.sample(logits, check=False)
    assert tokens[1] == -1 and torch.isneginf(conf[1])
    assert tokens[0] >= 0 and tokens[2] >= 0


def test_row_with_no_finite_kept_logit_is_reported():
    logits = random_logits(2, 5, 8)
    logits[0] = -math.inf
    with pytest.raises(ValueError, match="no finite kept logit"):
        ops.sample(logits)
    logits = random_logits(2, 5, 8)
    logits[1, :4] = -math.inf  # only id 4 is finite, and it is banned
    with pytest.raises(ValueError):
        ops.sample(logits, banned=[4])


def test_nan_on_a_banned_id_is_ignored():
    logits = random_logits(2, 5, 9)
    logits[:, 2] = float("nan")
    tokens, _ = ops.sample(logits, banned=[2])
    assert (tokens >= 0).all() and (tokens != 2).all()


def test_vocabulary_of_one():
    tokens, conf = ops.sample(torch.randn(3, 1), temperature=1.0)
    assert tokens.tolist() == [0, 0, 0] and torch.all(conf == 1.0)


def test_empty_batch():
    tokens, conf = ops.sample(torch.empty(0, 17))
    assert tokens.shape == (0,) and conf.shape == (0,)
    tokens, conf = ops.sample(torch.empty(2, 0, 17), rows=torch.empty(0, dtype=torch.int64))
    assert tokens.shape == (2, 0)


def test_shapes_follow_leading_dimensions():
    tokens, conf = ops.sample(torch.randn(2, 3, 11))
    assert tokens.shape == (2, 3) and tokens.dtype == torch.int64
    assert conf.shape == (2, 3) and conf.dtype == torch.float32


def test_index_tensors_of_any_int_dtype_and_layout():
    """rows, banned and per-row offsets as int32, strided or 2-D sample as their int64
    contiguous copies do (the kernels read int64 through pointers: an unconverted int32
    tensor would be read two ids at a time)."""
    logits = random_logits(12, 300, seed=10)
    rows64 = torch.tensor([0, 1, 3, 5, 11])
    banned64 = torch.tensor([7, 250, 3, 299])
    offsets64 = torch.arange(12) * 3 + 1
    rows32 = torch.stack([rows64, rows64], dim=1).to(torch.int32)[:, 0]  # a strided int32 view
    banned32 = banned64.to(torch.int32).reshape(2, 2)
    offsets32 = torch.stack([offsets64, offsets64], dim=1).to(torch.int32)[:, 1]
    assert not rows32.is_contiguous() and not offsets32.is_contiguous()
    for confidence in ("prob", "random"):
        expected = ops.sample(logits, temperature=1.0, confidence=confidence, seed=5, rows=rows64, banned=banned64,
                              offset=offsets64)
        got = ops.sample(logits, temperature=1.0, confidence=confidence, seed=5, rows=rows32, banned=banned32,
                         offset=offsets32)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1]), confidence
        assert not set(got[0][rows64].tolist()) & set(banned64.tolist())
