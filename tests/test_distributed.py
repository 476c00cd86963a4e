"""Tensor parallelism (unmask.distributed): the sharded sampler against the reference in
one process, and whole generations on 2 gloo processes against the single-process run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, strategies as st

from unmask import distributed, reference
from tests import distributed_worker

ROOT = Path(__file__).resolve().parents[1]


def split_sizes(vocab: int, shards: int) -> list[int]:
    """Uneven shards, as DTensor splits a dimension: ceil-sized chunks, the last one short."""
    chunk = -(-vocab // shards)
    return [max(0, min(chunk, vocab - i * chunk)) for i in range(shards) if i * chunk < vocab]


def sharded_sample(logits, shards, rows=None, banned=None, **kwargs):
    """What VocabShard.sample computes across ranks, with the all-gather done by hand."""
    flat = logits.reshape(-1, logits.shape[-1])
    row_ids = torch.arange(flat.shape[0]) if rows is None else rows
    sampling = dict(temperature=kwargs.get("temperature", 0.0), conf_temperature=kwargs.get("conf_temperature", 1.0),
                    seed=kwargs.get("seed", 0), offset=kwargs.get("offset", 0))
    stats, start = [], 0
    for size in split_sizes(flat.shape[-1], shards):
        stats.append(distributed.shard_statistics(flat[row_ids, start:start + size], row_ids, start, banned=banned,
                                                  **sampling))
        start += size
    return distributed.combine_statistics(torch.stack(stats), row_ids, confidence=kwargs.get("confidence", "prob"),
                                          **sampling)


@given(
    n_rows=st.integers(1, 9),
    vocab=st.sampled_from([2, 17, 61, 1019]),
    shards=st.integers(1, 8),
    temperature=st.sampled_from([0.0, 0.7, 1.0]),
    confidence=st.sampled_from(["prob", "margin", "entropy", "random"]),
    conf_temperature=st.sampled_from([1.0, 0.5]),
    seed=st.integers(0, 2**64 - 1),
    offset=st.integers(0, 50),
    data_seed=st.integers(0, 1000),
)
def test_sharded_sample_equals_reference(n_rows, vocab, shards, temperature, confidence, conf_temperature, seed,
                                         offset, data_seed):
    logits = torch.randn(n_rows, vocab, generator=torch.Generator().manual_seed(data_seed)) * 3
    banned = torch.tensor([vocab - 1])
    kwargs = dict(temperature=temperature, confidence=confidence, conf_temperature=conf_temperature, seed=seed,
                  offset=offset)
    expected_tokens, expected_conf = reference.sample(logits, banned=banned, **kwargs)
    tokens, conf = sharded_sample(logits, shards, banned=banned, **kwargs)
    # Tokens exactly: each id's score is the same float64 computation on every shard layout.
    assert torch.equal(tokens, expected_tokens)
    # Confidences: float64 softmax sums merged in another order differ by ~1e-16 relative,
    # which can move the float32 result by one unit in the last place (2^-23 relative).
    torch.testing.assert_close(conf, expected_conf, rtol=2.0**-22, atol=1e-30)


def test_sharded_sample_rows_and_invalid_rows():
    logits = torch.randn(6, 40, generator=torch.Generator().manual_seed(0))
    logits[1, 30] = float("nan")  # NaN in the second shard only
    logits[2] = float("-inf")
    logits[3, :39] = float("-inf")  # the only finite logit is banned
    rows = torch.tensor([5, 1, 2, 3, 0])
    banned = torch.tensor([39])
    expected_tokens, expected_conf = reference.sample(logits, banned=banned, rows=rows, temperature=1.0, seed=5)
    tokens, conf = sharded_sample(logits, 3, rows=rows, banned=banned, temperature=1.0, seed=5)
    assert torch.equal(tokens, expected_tokens[rows])
    assert tokens[1:4].tolist() == [-1, -1, -1] and torch.isneginf(conf[1:4]).all()
    torch.testing.assert_close(conf, expected_conf[rows], rtol=2.0**-22, atol=0.0)


def test_tensor_parallel_rejects_other_models():
    with pytest.raises(TypeError, match="DiffusionTransformer"):
        distributed.tensor_parallel(torch.nn.Linear(2, 2))


def torchrun(*arguments: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *arguments]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"torchrun failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("tp") / "tokens.json"
    torchrun(str(ROOT / "tests" / "distributed_worker.py"), str(out))
    return json.loads(out.read_text())


@pytest.mark.parametrize("name,overrides,arguments", distributed_worker.CASES, ids=[c[0] for c in distributed_worker.CASES])
def test_two_ranks_give_the_single_device_tokens(two_rank_results, name, overrides, arguments):
    expected = distributed_worker.run_case(distributed_worker.model_for(overrides), arguments)
    assert two_rank_results[name] == expected


def test_two_ranks_reject_heads_that_do_not_split(two_rank_results):
    assert "n_kv_heads=1 must be a multiple of the number of ranks (2)" in two_rank_results["error"]


def test_the_model_is_sharded_over_the_two_ranks(two_rank_results):
    # rank 0 holds the first 31 of 61 vocabulary ids and 2 of the 4 query heads (of 8 dims)
    assert two_rank_results["shard"] == {"sizes": [31, 30], "start": 0, "local_head_rows": 31,
                                         "local_query_rows": 16}


def test_the_experts_are_split_by_their_hidden_units(two_rank_results):
    # rank 0 holds 6 of each of the 8 experts' 12 hidden units, and 6 of the shared expert's
    assert two_rank_results["moe_shard"] == {"local_gate": [8, 6, 32], "local_down": [8, 32, 6],
                                             "local_shared_up": [6, 32]}
    # its logits are one device's to float32 rounding (a routed share left out or summed
    # twice would move them by the weights' scale, ~1)
    assert two_rank_results["moe_logits_error"] < 1e-4
    assert "for inference" in two_rank_results["moe_gradient"]


def test_a_mesh_with_its_ranks_out_of_order_is_refused(two_rank_results):
    # torch would shard the head by mesh position while the vocabulary offsets go by rank:
    # the tokens would come out wrong, silently
    assert two_rank_results["reversed-mesh"] == "mesh must list its ranks in ascending order, got [1, 0]"


def test_torchrun_cli_generate_matches_one_process(tmp_path):
    arguments = ["generate", "--prompt", "sort:8531=", "--quiet"]
    single = subprocess.run([sys.executable, "-m", "unmask", *arguments], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert single.returncode == 0, single.stderr
    both = torchrun("-m", "unmask", *arguments)
    assert both.stdout.strip().splitlines() == single.stdout.strip().splitlines()
    assert single.stdout.strip() == "1358"


def test_a_vocabulary_split_that_leaves_a_rank_empty_is_refused():
    # torch shards the LM head in chunks of ceil(V / W) ids: 17 ids over 8 ranks give
    # 3, 3, 3, 3, 3, 2, 0, 0, and a rank with none failed in its sampler while the others
    # waited for it in a collective
    distributed.check_vocab_split(16, 8)
    distributed.check_vocab_split(17, 4)  # 5, 5, 5, 2
    for vocab, world in ((17, 8), (9, 4), (2, 3)):
        with pytest.raises(ValueError, match=f"embedding_size={vocab} split over {world} ranks"):
            distributed.check_vocab_split(vocab, world)


def test_a_rank_that_fails_leaves_without_waiting_for_the_others(monkeypatch):
    # unmask generate under torchrun: a rank whose generate raised used to enter the
    # shutdown barrier, where the other ranks (failed too, or waiting in a collective it
    # will never join) may never arrive
    from unmask import cli
    import unmask

    left = []
    monkeypatch.setattr(distributed, "launched_world_size", lambda: 2)
    monkeypatch.setattr(distributed, "init", lambda device=None: None)
    monkeypatch.setattr(distributed, "tensor_parallel", lambda model, mesh: model)
    monkeypatch.setattr(distributed, "shutdown", lambda **kwargs: left.append(kwargs))
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: 1)

    def fails(*args, **kwargs):
        raise RuntimeError("out of memory on this rank")

    monkeypatch.setattr(unmask, "generate", fails)
    with pytest.raises(RuntimeError, match="out of memory"):
        cli.main(["generate", "--ids", "1,2,3", "--quiet"])
    assert left == [{"wait_for_others": False}]
