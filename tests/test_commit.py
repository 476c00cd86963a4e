"""commit: count, threshold and factor modes against a per-row implementation written here,
through the reference and the native kernel (the `backend` fixture)."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from unmask import ops

pytestmark = pytest.mark.usefixtures("backend")


def best_first(conf_row, eligible_row):
    """Eligible positions by descending conf, ties to the lower position."""
    positions = [j for j in range(len(conf_row)) if eligible_row[j]]
    return sorted(positions, key=lambda j: (-float(conf_row[j]), j))


def expected_commit(conf, eligible, *, k=None, threshold=None, factor=None):
    out = torch.zeros_like(eligible)
    for b in range(conf.shape[0]):
        order = best_first(conf[b], eligible[b])
        if k is not None:
            n = min(int(k[b]), len(order))
        elif threshold is not None:
            n = sum(1 for j in order if float(conf[b, j]) > threshold)
            n = max(n, 1) if order else 0
        else:
            n = 0
            for rank, j in enumerate(order, start=1):
                if (rank + 1) * (1 - float(conf[b, j])) < factor:
                    n = rank
            n = max(n, 1) if order else 0
        out[b, order[:n]] = True
    return out


def canvas(batch, length, seed, ties):
    gen = torch.Generator().manual_seed(seed)
    conf = torch.rand(batch, length, generator=gen)
    if ties:  # few distinct values: many exact ties
        conf = (conf * 4).floor() / 4
    eligible = torch.rand(batch, length, generator=gen) > 0.4
    tokens = torch.randint(0, 1000, (batch, length), generator=gen)
    x = torch.full((batch, length), -7, dtype=torch.int64)
    return x, tokens, conf, eligible


shapes = dict(batch=st.integers(1, 4), length=st.integers(1, 40), seed=st.integers(0, 2**20), ties=st.booleans())


def check(x, tokens, committed, expected):
    assert torch.equal(committed, expected)
    assert torch.equal(x[committed], tokens[committed])
    assert (x[~committed] == -7).all(), "positions not committed must stay as they were"


@given(**shapes, k=st.integers(0, 45))
def test_count_mode(batch, length, seed, ties, k):
    x, tokens, conf, eligible = canvas(batch, length, seed, ties)
    ks = torch.randint(0, k + 1, (batch,))
    committed = ops.commit(x, tokens, conf, eligible, k=ks)
    check(x, tokens, committed, expected_commit(conf, eligible, k=ks))
    assert torch.equal(committed.sum(1), torch.minimum(ks, eligible.sum(1)))
    assert not (committed & ~eligible).any()


@given(**shapes, threshold=st.floats(-0.5, 1.5))
def test_threshold_mode(batch, length, seed, ties, threshold):
    x, tokens, conf, eligible = canvas(batch, length, seed, ties)
    committed = ops.commit(x, tokens, conf, eligible, threshold=threshold)
    check(x, tokens, committed, expected_commit(conf, eligible, threshold=threshold))
    assert ((committed.sum(1) >= 1) == eligible.any(1)).all(), "at least one per row while any is eligible"


@given(**shapes, threshold=st.floats(-0.5, 1.5), k=st.integers(0, 45))
def test_threshold_mode_with_a_floor(batch, length, seed, ties, threshold, k):
    """k with threshold: SDAR's low_confidence_dynamic (and LLaDA 2.0's rule), written as
    they write it, row by row: the positions above the threshold when there are at
    least k of them, else the k most confident."""
    x, tokens, conf, eligible = canvas(batch, length, seed, ties)
    ks = torch.randint(0, k + 1, (batch,))
    committed = ops.commit(x, tokens, conf, eligible, k=ks, threshold=threshold)
    expected = torch.zeros_like(eligible)
    for b in range(batch):
        order = best_first(conf[b], eligible[b])
        high = [j for j in order if float(conf[b, j]) > threshold]
        expected[b, high if len(high) >= int(ks[b]) else order[:int(ks[b])]] = True
    check(x, tokens, committed, expected)


@given(**shapes, factor=st.floats(0.01, 4.0))
def test_factor_mode(batch, length, seed, ties, factor):
    x, tokens, conf, eligible = canvas(batch, length, seed, ties)
    committed = ops.commit(x, tokens, conf, eligible, factor=factor)
    check(x, tokens, committed, expected_commit(conf, eligible, factor=factor))


def test_ties_go_to_the_lower_position():
    x = torch.zeros(1, 5, dtype=torch.int64)
    conf = torch.tensor([[0.5, 0.9, 0.5, 0.9, 0.5]])
    committed = ops.commit(x, torch.arange(1, 6)[None], conf, torch.ones(1, 5, dtype=torch.bool), k=3)
    assert committed.tolist() == [[True, True, False, True, False]]
    assert x.tolist() == [[1, 2, 0, 4, 0]]


def test_int_k_broadcasts_and_nothing_eligible_commits_nothing():
    x = torch.zeros(2, 4, dtype=torch.int64)
    eligible = torch.tensor([[True, True, False, False], [False] * 4])
    committed = ops.commit(x, torch.ones(2, 4, dtype=torch.int64), torch.rand(2, 4), eligible, k=3)
    assert committed.sum(1).tolist() == [2, 0]
    for mode in ({"threshold": 2.0}, {"factor": 0.1}):
        assert ops.commit(x, x, torch.rand(2, 4), eligible, **mode).sum(1).tolist() == [1, 0]


def test_factor_rule_worked_example():
    # c = 0.99, 0.95, 0.9, 0.5: (n + 1)(1 - c_n) = 0.02, 0.15, 0.4, 2.5; factor 1 commits 3.
    conf = torch.tensor([[0.9, 0.5, 0.99, 0.95]])
    committed = ops.commit(torch.zeros(1, 4, dtype=torch.int64), torch.ones(1, 4, dtype=torch.int64), conf,
                           torch.ones(1, 4, dtype=torch.bool), factor=1.0)
    assert committed.tolist() == [[True, False, True, True]]


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_canvas_dtypes(dtype):
    x = torch.zeros(1, 3, dtype=dtype)
    ops.commit(x, torch.tensor([[4, 5, 6]], dtype=dtype), torch.tensor([[0.1, 0.8, 0.3]]),
               torch.ones(1, 3, dtype=torch.bool), k=1)
    assert x.tolist() == [[0, 5, 0]] and x.dtype == dtype


def test_inputs_of_any_dtype_and_layout():
    """tokens and k as int32 (tokens strided), conf as float64 and eligible as a transposed
    view commit as their int64 / float32 contiguous copies do (the kernels read int64,
    float32 and bool through pointers)."""
    gen = torch.Generator().manual_seed(3)
    conf = torch.rand(3, 40, generator=gen)
    eligible = torch.rand(3, 40, generator=gen) > 0.3
    tokens = torch.randint(0, 1000, (3, 40), generator=gen)
    k = torch.tensor([2, 5, 0])
    x_expected = torch.full((3, 40), -1)
    expected = ops.commit(x_expected, tokens, conf, eligible, k=k)
    x = torch.full((3, 40), -1)
    tokens32 = torch.stack([tokens, tokens], dim=-1).to(torch.int32)[..., 0]
    eligible_t = eligible.t().contiguous().t()
    assert not tokens32.is_contiguous() and not eligible_t.is_contiguous()
    got = ops.commit(x, tokens32, conf.double(), eligible_t, k=k.to(torch.int32))
    assert torch.equal(got, expected) and torch.equal(x, x_expected)
    assert got.sum().item() == 7


@pytest.mark.parametrize("mode", ["k", "threshold", "factor"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_float64_confidences_rank_as_they_are(mode, seed):
    """float64 confidences (LLaDA's loop softmaxes in float64) that differ only below
    float32's precision rank by their float64 values: rounded to float32 they would tie,
    and the tie would go to the lower position. Each row's best pair p < q holds 0.9 and
    0.9 + 1e-9 (one float32); every other position is far below."""
    gen = torch.Generator().manual_seed(seed)
    conf = 0.1 + torch.randperm(24, generator=gen).to(torch.float64).repeat(3, 1) * 1e-3
    pairs = [sorted(torch.randperm(24, generator=gen)[:2].tolist()) for _ in range(3)]
    for row, (p, q) in enumerate(pairs):
        conf[row, p], conf[row, q] = 0.9, 0.9 + 1e-9
    assert torch.tensor(0.9 + 1e-9).float() == torch.tensor(0.9).float(), "the pair is one float32"
    eligible = torch.ones(3, 24, dtype=torch.bool)
    tokens = torch.randint(0, 1000, (3, 24), generator=gen)
    # k 1, a threshold between the pair, a factor that commits one of them: (2)(0.1) < 0.25 <= (3)(0.1)
    kwargs = {"k": torch.ones(3, dtype=torch.int64)} if mode == "k" else (
        {"threshold": 0.9 + 5e-10} if mode == "threshold" else {"factor": 0.25})
    x = torch.full((3, 24), -7, dtype=torch.int64)
    committed = ops.commit(x, tokens, conf, eligible, **kwargs)
    check(x, tokens, committed, expected_commit(conf, eligible, **kwargs))
    assert committed.nonzero()[:, 1].tolist() == [q for _, q in pairs], "the float64 winner, not the lower position"


def test_tokens_in_the_canvas_memory_are_read_before_the_commit():
    """tokens a view of the memory x is: the kernels write x in place, so they read a copy
    (they used to read tokens already overwritten)."""
    buffer = torch.arange(10, 16)[None]
    expected = buffer.clone()
    reference_committed = torch.ones(1, 4, dtype=torch.bool)
    expected[:, 1:5] = torch.where(reference_committed, expected[:, 0:4], expected[:, 1:5])
    committed = ops.commit(buffer[:, 1:5], buffer[:, 0:4], torch.rand(1, 4), torch.ones(1, 4, dtype=torch.bool), k=4)
    assert committed.all() and buffer.tolist() == expected.tolist() == [[10, 10, 11, 12, 13, 15]]
