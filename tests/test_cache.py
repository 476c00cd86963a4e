"""Key/value caches in generate(): exact for block-causal models, an approximation for
bidirectional ones (docs/design.md, The sampler; Fast-dLLM's prefix and dual caches)."""

import pytest
import torch

import unmask
from tests.helpers import requires_gpu, tiny_config

MASK = 60


def block_causal_model(model_type="llada", seed=0):
    config = tiny_config(block_size=4, model_type=model_type, include_qkv_bias=model_type == "dream")
    return unmask.DiffusionTransformer.random(config, seed=seed, std=0.3)


@pytest.mark.parametrize("model_type", ["llada", "dream"])
@pytest.mark.parametrize("cache", ["prefix", "dual"])
@pytest.mark.parametrize("kwargs", [
    dict(steps=16, block_length=4),
    dict(threshold=0.3, block_length=8),
    dict(steps=8, block_length=8, temperature=1.0, seed=3),
    dict(steps=16, block_length=4, cfg_scale=1.0),
    dict(steps=16, block_length=2),  # generation blocks half the model's
], ids=["steps", "threshold", "sampled", "cfg", "half-blocks"])
@pytest.mark.parametrize("prompts", [
    [[5, 6, 7, 8, 9, 10, 11, 12], [13, 14, 15]],  # padded to 8 positions, a multiple of the model's block size
    [[5, 6, 7], [8, 9, 10, 11, 12]],  # padded to 5: every generation block straddles two model blocks
], ids=["aligned", "straddling"])
def test_block_causal_cache_is_exact(model_type, cache, kwargs, prompts):
    # The cached step recomputes whole model blocks (DiffusionTransformer.recomputed_segment):
    # a position sharing a model block with the generation block sees its tokens, so its
    # cached keys would be stale.
    model = block_causal_model(model_type)
    plain = unmask.generate(model, prompts, gen_length=16, stop_at_eos=False, **kwargs)
    cached = unmask.generate(model, prompts, gen_length=16, stop_at_eos=False, cache=cache, **kwargs)
    assert torch.equal(cached.tokens, plain.tokens)
    assert cached.nfe == plain.nfe
    assert len(set(plain.tokens.flatten().tolist())) > 2


RAGGED = [[5, 6, 7], [8, 9, 10, 11, 12], [13, 14, 15, 16, 17, 18], [19]]  # left-padded by 3, 1, 0 and 5


@pytest.mark.parametrize("model_type", ["llada", "dream"])
@pytest.mark.parametrize("cache", [None, "prefix", "dual"])
@pytest.mark.parametrize("kwargs", [
    dict(steps=16, block_length=4),
    dict(threshold=0.3, block_length=8),
    dict(steps=16, block_length=2),
], ids=["steps", "threshold", "half-blocks"])
def test_block_causal_rows_decode_as_they_do_alone(model_type, cache, kwargs):
    # Each row's block grid starts at its own first token (DiffusionTransformer._grid_rotation),
    # whatever padding the batch's longest prompt gives it: before, a row padded by other
    # than a multiple of block_size met other model blocks than alone (23 of 64 tokens
    # differed in the first case).
    model = block_causal_model(model_type)
    batch = unmask.generate(model, RAGGED, gen_length=16, stop_at_eos=False, cache=cache, **kwargs)
    alone = [unmask.generate(model, [prompt], gen_length=16, stop_at_eos=False, cache=cache, **kwargs)
             for prompt in RAGGED]
    assert torch.equal(batch.tokens, torch.cat([row.tokens for row in alone]))
    assert len(set(batch.tokens.flatten().tolist())) > 2


@pytest.mark.parametrize("cache", [None, "dual"])
def test_block_causal_sampled_row_ignores_its_companions_lengths(cache):
    # Sampled with noise, a row keeps its place in the batch (its RNG stream) while the
    # other prompts change length, so the batch's padding moves by 1, 2 and 3 positions.
    model = block_causal_model("llada")
    arguments = dict(gen_length=16, block_length=8, threshold=0.5, temperature=1.0, seed=5, stop_at_eos=False,
                     cache=cache)
    first = [5, 6, 7]
    runs = [unmask.generate(model, [first] + others, **arguments).tokens[0]
            for others in ([[8]], [[8, 9, 10, 11]], [[8, 9, 10, 11, 12]], [[8, 9, 10, 11, 12, 13]])]
    assert all(torch.equal(run, runs[0]) for run in runs[1:])


def test_block_causal_forward_sees_a_padded_row_as_alone():
    # Logits of every real position, with and without a cache segment, equal the row's
    # own unpadded forward.
    model = block_causal_model("llada")
    ids = torch.randint(0, MASK, (3, 11))
    mask = torch.ones(3, 11, dtype=torch.bool)
    mask[0, :3], mask[1, :6] = False, False
    cache = unmask.KVCache(model.config, 3, 11, dtype=torch.float32, device=torch.device("cpu"))
    with torch.no_grad():
        full = model(ids, mask, cache=cache)
        segment = model(ids, mask, cache=cache, segment=(7, 9), logit_positions=slice(7, 9))
        for row, pad in enumerate((3, 6, 0)):
            alone = model(ids[row:row + 1, pad:])
            torch.testing.assert_close(full[row, pad:], alone[0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(segment[row], alone[0, 7 - pad:9 - pad], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_bidirectional_cache_is_an_approximation_that_still_decodes(cache):
    model = unmask.DiffusionTransformer.random(tiny_config(), seed=1, std=0.3)
    prompts = [[1, 2, 3, 4], [5, 6]]
    plain = unmask.generate(model, prompts, gen_length=16, block_length=8, steps=16, stop_at_eos=False)
    cached = unmask.generate(model, prompts, gen_length=16, block_length=8, steps=16, stop_at_eos=False, cache=cache)
    assert not (cached.tokens == MASK).any()
    assert cached.nfe == plain.nfe
    # The very first step runs the full canvas on the same input as the uncached run, so
    # it commits the same tokens; later steps read stale keys and values.
    log = []
    unmask.generate(model, prompts, gen_length=16, block_length=8, steps=16, stop_at_eos=False, cache=cache,
                    callback=lambda step, canvas, committed: log.append((canvas.clone(), committed.clone())))
    plain_log = []
    unmask.generate(model, prompts, gen_length=16, block_length=8, steps=16, stop_at_eos=False,
                    callback=lambda step, canvas, committed: plain_log.append((canvas.clone(), committed.clone())))
    assert torch.equal(log[0][1], plain_log[0][1]) and torch.equal(log[0][0], plain_log[0][0])


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_bidirectional_cache_every_step_reads_its_blocks_first_keys(cache):
    # Every step of generate, replayed through the model's own cache API: each block's
    # first step fills a fresh cache from the whole canvas, later steps recompute the
    # block ("dual") or the block and all after it ("prefix") over it. The replay's
    # commits and canvases equal generate's at every step, and an uncached step would
    # have committed otherwise at several of them (so a cache refilled every step, or
    # one kept across blocks, fails here; the test above checks the first step only).
    from unmask import ops
    from unmask.sampler import left_pad

    model = unmask.DiffusionTransformer.random(tiny_config(), seed=1, std=0.3)
    prompts = [[1, 2, 3, 4], [5, 6]]
    log = []
    unmask.generate(model, prompts, gen_length=16, block_length=8, steps=16, stop_at_eos=False, cache=cache,
                    callback=lambda step, canvas, committed: log.append((canvas.clone(), committed.clone())))
    ids, mask = left_pad(prompts, model.config.eos_token_id)
    canvas = torch.cat([ids, torch.full((2, 16), MASK)], dim=1)
    canvas_mask = torch.cat([mask, torch.ones(2, 16, dtype=torch.bool)], dim=1)
    length, replayed, uncached_differs = canvas.shape[1], iter(log), 0
    with torch.no_grad():
        for start in (4, 12):
            end, kv = start + 8, model.new_cache(2, length)
            for step in range(8):
                segment = None if step == 0 else (start, end) if cache == "dual" else (start, length)
                logits = model(canvas, canvas_mask, cache=kv, segment=segment, logit_positions=slice(start, end))
                block = canvas[:, start:end].clone()
                eligible = block == MASK
                committed = ops.commit(block, *ops.sample(logits, banned=[MASK]), eligible, k=1)
                plain_block = canvas[:, start:end].clone()
                plain = model(canvas, canvas_mask, logit_positions=slice(start, end))
                ops.commit(plain_block, *ops.sample(plain, banned=[MASK]), eligible, k=1)
                uncached_differs += int(not torch.equal(plain_block, block))
                canvas[:, start:end] = block
                got_canvas, got_committed = next(replayed)
                assert torch.equal(got_committed[:, start:end], committed), (start, step)
                assert torch.equal(got_canvas, canvas), (start, step)
    assert next(replayed, None) is None
    assert uncached_differs >= 3


def test_segment_forward_equals_full_forward_when_nothing_changed():
    model = unmask.DiffusionTransformer.random(tiny_config(), seed=2, std=0.3)
    ids = torch.randint(0, 59, (2, 12), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[0, :2] = False
    cache = unmask.KVCache(model.config, 2, 12, dtype=torch.float32, device=torch.device("cpu"))
    with torch.no_grad():
        full = model(ids, mask, cache=cache)
        segment = model(ids, mask, cache=cache, segment=(4, 9), logit_positions=slice(4, 9))
    torch.testing.assert_close(segment, full[:, 4:9], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type", ["llada", "dream"])
def test_row_segments_equal_each_row_alone(model_type):
    # Three canvases of different lengths (right-padded to one width, the padding hidden),
    # each recomputing its own segment: logits and written keys/values equal each row's
    # own (start, end) segment over a cache of its own length.
    model = unmask.DiffusionTransformer.random(tiny_config(model_type=model_type, include_qkv_bias=model_type == "dream"),
                                               seed=4, std=0.3)
    lengths, starts, n, width = [12, 9, 15], [4, 1, 10], 5, 15
    gen = torch.Generator().manual_seed(7)
    rows = [torch.randint(0, 59, (length,), generator=gen) for length in lengths]
    ids, known = torch.zeros(3, width, dtype=torch.long), torch.zeros(3, width, dtype=torch.bool)
    for r, row in enumerate(rows):
        ids[r, :len(row)], known[r, :len(row)] = row, True
    shift = 1 if model.config.shift_logits else 0
    wanted = torch.tensor(starts)[:, None] + torch.arange(shift, n)  # the logits a block's segment asks for
    batch_cache = unmask.KVCache(model.config, 3, width, dtype=torch.float32, device=torch.device("cpu"))
    with torch.no_grad():
        model(ids, known, cache=batch_cache)
        for r, row in enumerate(rows):  # the segments change after the cache was filled
            ids[r, starts[r]:starts[r] + n] = torch.randint(0, 59, (n,), generator=gen)
        for k in batch_cache.keys + batch_cache.values:
            for r in range(3):
                k[r, starts[r]:starts[r] + n] = float("nan")  # must be written before any query reads it
        together = model(ids, known, cache=batch_cache, segment=unmask.RowSegments(starts, n), logit_positions=wanted)
        for r, row in enumerate(rows):
            alone_ids = ids[r:r + 1, :len(row)]
            cache = unmask.KVCache(model.config, 1, len(row), dtype=torch.float32, device=torch.device("cpu"))
            model(row[None], cache=cache)  # filled from the canvas before its segment changed, as the batch's
            alone = model(alone_ids, cache=cache, segment=(starts[r], starts[r] + n),
                          logit_positions=slice(starts[r] + shift, starts[r] + n))
            # float32 through two layers, the batch's GEMMs of 3 rows against 1: reduction
            # orders differ, and an unseeded draw once met 3e-5 relative on a logit of 0.5
            torch.testing.assert_close(together[r], alone[0], rtol=1e-4, atol=1e-5)
            for layer in range(model.config.n_layers):
                for written, own in ((batch_cache.keys, cache.keys), (batch_cache.values, cache.values)):
                    torch.testing.assert_close(written[layer][r, :len(row)], own[layer][0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_gpu)])
@pytest.mark.parametrize("model_type", ["llada", "dream"])
def test_a_packed_forward_equals_each_groups_own_forward(model_type, device):
    # Three groups in one pass: whole canvases filling a cache (one row padded), rows each
    # at its own segment over a cache, and a plain call with a logit slice. Each group's
    # logits and cache writes equal its own forward()'s.
    model = unmask.DiffusionTransformer.random(tiny_config(model_type=model_type, include_qkv_bias=model_type == "dream"),
                                               seed=5, std=0.3).to(device)
    new_cache = lambda b, n: unmask.KVCache(model.config, b, n, dtype=torch.float32, device=torch.device(device))  # noqa: E731
    fill_ids, fill_known = torch.randint(0, 59, (2, 10), device=device), torch.ones(2, 10, dtype=torch.bool, device=device)
    fill_known[1, 7:] = False
    segment_ids = torch.randint(0, 59, (3, 14), device=device)
    filled = new_cache(3, 14)
    with torch.no_grad():
        model(segment_ids, cache=filled)
        segment_ids[:, 2:12] = torch.randint(0, 59, (3, 10), device=device)
        plain_ids = torch.randint(0, 59, (1, 7), device=device)
        groups = lambda fill_cache, segment_cache: [  # noqa: E731
            unmask.Rows(fill_ids, fill_known, logit_positions=slice(3, 7), cache=fill_cache),
            unmask.Rows(segment_ids, logit_positions=torch.tensor([[3, 4], [6, 7], [10, 11]], device=device),
                        cache=segment_cache,
                        segment=unmask.RowSegments([2, 5, 9], 3)),
            unmask.Rows(plain_ids, logit_positions=slice(1, 6)),
        ]
        copy = lambda c: unmask.KVCache.stacked([c], c.shape[1])  # noqa: E731
        packed_caches, alone_caches = (new_cache(2, 10), copy(filled)), (new_cache(2, 10), copy(filled))
        packed = model.forward_packed(groups(*packed_caches))
        alone = [model(r.input_ids, r.attention_mask, logit_positions=r.logit_positions, cache=r.cache,
                       segment=r.segment) for r in groups(*alone_caches)]
    for got, want in zip(packed, alone):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for got, want in zip(packed_caches, alone_caches):
        for layer in range(model.config.n_layers):
            torch.testing.assert_close(got.keys[layer], want.keys[layer], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(got.values[layer], want.values[layer], rtol=1e-5, atol=1e-5)


def test_row_segments_are_checked():
    model = unmask.DiffusionTransformer.random(tiny_config(), seed=2)
    cache = unmask.KVCache(model.config, 2, 6, dtype=torch.float32, device=torch.device("cpu"))
    ids = torch.zeros(2, 6, dtype=torch.long)
    with pytest.raises(ValueError, match="one start per row"):
        model(ids, cache=cache, segment=unmask.RowSegments([0], 2))
    with pytest.raises(ValueError, match="segment.length <= 6"):
        model(ids, cache=cache, segment=unmask.RowSegments([0, 5], 2))
    block_causal = unmask.DiffusionTransformer.random(tiny_config(block_size=2), seed=2)
    with pytest.raises(ValueError, match="block-causal model needs the same segment.starts"):
        block_causal(ids, cache=cache, segment=unmask.RowSegments([0, 2], 2))
    shifted = unmask.DiffusionTransformer.random(tiny_config(model_type="dream", include_qkv_bias=True), seed=2)
    with pytest.raises(ValueError, match="logit_positions"):
        shifted(ids, cache=cache, segment=unmask.RowSegments([1, 3], 2))
    with pytest.raises(ValueError, match="caches"):
        unmask.KVCache.stacked([cache], 4)


def test_a_device_segment_equals_the_host_segment():
    """DeviceSegment (the start a 0-d tensor, for a captured step): the logits of its first
    positions and the cache writes of segment=(start, start + n), with padding."""
    from unmask.models import DeviceSegment

    model = unmask.DiffusionTransformer.random(tiny_config(), seed=6, std=0.3)
    ids = torch.randint(0, 59, (2, 12))
    known = torch.ones(2, 12, dtype=torch.bool)
    known[1, :3] = False  # a left-padded prompt
    caches = [unmask.KVCache(model.config, 2, 12, dtype=torch.float32, device=torch.device("cpu")) for _ in range(2)]
    with torch.no_grad():
        for cache in caches:
            model(ids, known, cache=cache)
        ids[:, 5:9] = torch.randint(0, 59, (2, 4))
        host = model(ids, known, cache=caches[0], segment=(5, 12), logit_positions=slice(5, 9))
        device = model(ids, known, cache=caches[1], segment=DeviceSegment(torch.tensor(5), 7, logits=4))
    torch.testing.assert_close(device, host, rtol=1e-6, atol=1e-6)
    for layer in range(model.config.n_layers):
        torch.testing.assert_close(caches[1].keys[layer], caches[0].keys[layer], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(caches[1].values[layer], caches[0].values[layer], rtol=1e-6, atol=1e-6)


def test_device_segments_are_checked():
    from unmask.models import DeviceSegment

    model = unmask.DiffusionTransformer.random(tiny_config(), seed=2)
    cache = unmask.KVCache(model.config, 2, 6, dtype=torch.float32, device=torch.device("cpu"))
    ids = torch.zeros(2, 6, dtype=torch.long)
    with pytest.raises(ValueError, match="0-d int64 tensor"):
        model(ids, cache=cache, segment=DeviceSegment(torch.tensor([1]), 2))
    with pytest.raises(ValueError, match="segment.length must be an int"):
        model(ids, cache=cache, segment=DeviceSegment(torch.tensor(1), 7))
    with pytest.raises(ValueError, match="start 5, length 2"):
        model(ids, cache=cache, segment=DeviceSegment(torch.tensor(5), 2))
    with pytest.raises(ValueError, match="segment.logits must be None or an int in \\[1, 2\\]"):
        model(ids, cache=cache, segment=DeviceSegment(torch.tensor(1), 2, logits=3))
    with pytest.raises(ValueError, match="logit_positions must be None"):
        model(ids, cache=cache, segment=DeviceSegment(torch.tensor(1), 2), logit_positions=slice(1, 3))
    shifted = unmask.DiffusionTransformer.random(tiny_config(model_type="dream", include_qkv_bias=True), seed=2)
    with pytest.raises(ValueError, match="block-causal mask or shifted logits"):
        shifted(ids, cache=cache, segment=DeviceSegment(torch.tensor(1), 2))


def test_cache_arguments_are_checked():
    model = unmask.DiffusionTransformer.random(tiny_config(), seed=2)
    with pytest.raises(ValueError, match="cache must be one of"):
        unmask.generate(model, [[1]], gen_length=4, block_length=4, cache="triple")
    with pytest.raises(ValueError, match="needs the unmask model"):
        unmask.generate(lambda ids, attention_mask=None: model(ids, attention_mask), [[1]], gen_length=4,
                        block_length=4, mask_id=MASK, cache="prefix")
    with pytest.raises(ValueError, match="segment needs a cache"):
        model(torch.zeros(1, 4, dtype=torch.long), segment=(0, 2))


def test_gathered_takes_the_chosen_rows_of_each_cache_cut_or_padded():
    config = tiny_config()
    def filled(batch, length, seed):
        cache = unmask.KVCache(config, batch, length, dtype=torch.float32, device=torch.device("cpu"))
        generator = torch.Generator().manual_seed(seed)
        for tensor in cache.keys + cache.values:
            tensor.copy_(torch.randn(tensor.shape, generator=generator))
        return cache

    wide, narrow = filled(5, 9, 1), filled(3, 4, 2)
    # rows with gaps and out of order (an index), then a run (a slice)
    got = unmask.KVCache.gathered([(wide, [4, 0, 2]), (narrow, range(1, 3))], 6)
    for layer in range(config.n_layers):
        for got_t, wide_t, narrow_t in ((got.keys[layer], wide.keys[layer], narrow.keys[layer]),
                                        (got.values[layer], wide.values[layer], narrow.values[layer])):
            want = torch.zeros(5, 6, *wide_t.shape[2:])
            want[:3] = wide_t[[4, 0, 2], :6]
            want[3:, :4] = narrow_t[1:3]
            assert torch.equal(got_t, want)
    with pytest.raises(ValueError, match="pieces"):
        unmask.KVCache.gathered([], 4)
    # rows past a cache's end (a run would shorten and shift the next piece's rows), or negative (would wrap)
    for rows in ([2, 3], [-1], [3, 0], [True]):
        with pytest.raises(ValueError, match=r"pieces\[0\]: rows must be ints in \[0, 3\)"):
            unmask.KVCache.gathered([(narrow, rows), (wide, [0])], 4)


def test_a_cache_made_for_another_model_is_refused_naming_it():
    model = unmask.DiffusionTransformer.random(tiny_config(), seed=1)
    ids = torch.randint(0, 59, (2, 6))
    others = {
        "fewer layers": unmask.DiffusionTransformer.random(tiny_config(n_layers=1), seed=1).new_cache(2, 6),
        "other heads": unmask.DiffusionTransformer.random(tiny_config(n_kv_heads=4), seed=1).new_cache(2, 6),
        "bfloat16": model.to(torch.bfloat16).new_cache(2, 6),
        "other canvas": model.float().new_cache(2, 7),
    }
    model = model.float()
    for what, cache in others.items():
        with pytest.raises(ValueError, match="cache") as error:
            model(ids, cache=cache)
        assert "model" in str(error.value) or "canvas" in str(error.value), what
    model(ids, cache=model.new_cache(2, 6))  # its own
