"""The RNG: Random123 known answers, and rng.py against the C++ header bit for bit."""

import pytest
import torch

from unmask import ops, rng

# Random123 kat_vectors, philox4x32 10 rows: counter (4 words), key (2 words) -> output.
KNOWN_ANSWERS = [
    ([0, 0, 0, 0], [0, 0], [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]),
    ([0xFFFFFFFF] * 4, [0xFFFFFFFF] * 2, [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]),
    (
        [0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344],
        [0xA4093822, 0x299F31D0],
        [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1],
    ),
]


@pytest.mark.parametrize("counter,key,expected", KNOWN_ANSWERS)
def test_rng_py_known_answers(counter, key, expected):
    assert rng.philox4x32_10(torch.tensor(counter), *key).tolist() == expected


@pytest.mark.parametrize("counter,key,expected", KNOWN_ANSWERS)
def test_header_known_answers(counter, key, expected):
    assert ops.philox_blocks(torch.tensor([counter]), *key)[0].tolist() == expected


def test_header_equals_rng_py_on_random_counters():
    generator = torch.Generator().manual_seed(0)
    counters = torch.randint(0, 2**32, (1 << 20, 4), generator=generator, dtype=torch.int64)
    key0, key1 = 0x12345678, 0x9ABCDEF0
    assert torch.equal(ops.philox_blocks(counters, key0, key1), rng.philox4x32_10(counters, key0, key1))


@pytest.mark.usefixtures("cpu_isa")
@pytest.mark.parametrize(
    "seed,offset,stream,row_begin",
    [(0, 0, 0, 0), (2**64 - 1, 2**32 - 1, 1, 7), (0x0123456789ABCDEF, 12, 0, 2**31)],
)
def test_native_draw_layout_equals_rng_py(seed, offset, stream, row_begin):
    rows, cols = 512, 1023  # 2^19 draws, odd width: the last quad is partial
    native = ops.philox_draws(seed, rows, cols, row_begin=row_begin, offset=offset, stream=stream)
    spec = rng.draws(seed, torch.arange(row_begin, row_begin + rows), cols, offset=offset, stream=stream)
    assert torch.equal(native, spec)


def test_draw_is_word_col_mod_4_of_the_counter_block():
    seed, row, offset = 0xDEADBEEFCAFEF00D, 5, 3
    w = rng.draws(seed, torch.tensor([row]), 12, offset=offset)[0]
    for col in range(12):
        block = rng.philox4x32_10(torch.tensor([col // 4, row, offset, 0]), seed & 0xFFFFFFFF, seed >> 32)
        assert w[col] == block[col % 4]


def test_uniform_is_strictly_inside_unit_interval():
    extremes = torch.tensor([0, 255, 2**32 - 1, 2**32 - 256])
    u = rng.uniform_from_draws(extremes)
    assert bool((u > 0).all() and (u < 1).all())
    assert torch.isfinite(rng.gumbel_from_draws(extremes)).all()


def test_uniforms_are_uniform():
    u = rng.uniform_from_draws(rng.draws(1, torch.arange(64), 4096))
    counts = torch.histc(u.float(), bins=16, min=0, max=1)
    expected = u.numel() / 16
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 50.0, f"chi-square {chi2:.1f} over 15 degrees of freedom"  # p < 1e-5 when uniform


def test_streams_and_offsets_differ():
    base = rng.draws(3, torch.arange(4), 16)
    assert not torch.equal(base, rng.draws(3, torch.arange(4), 16, stream=1))
    assert not torch.equal(base, rng.draws(3, torch.arange(4), 16, offset=1))
    assert not torch.equal(base, rng.draws(4, torch.arange(4), 16))


@pytest.mark.parametrize("seed", [-1, 2**64])
def test_seed_out_of_range(seed):
    with pytest.raises(ValueError, match="seed"):
        rng.draws(seed, torch.arange(2), 4)


def test_seed_type():
    with pytest.raises(TypeError, match="seed"):
        ops.philox_draws(1.5, 2, 4)
