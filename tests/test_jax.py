"""The JAX path: Pallas kernels (interpret mode on CPU) against the jnp references and the
torch reference, RNG bit-exactness across torch, C++ and JAX, and unmask.jax.generate
equal to unmask.generate (tests/test_jax_generate.py).

As in JAX's own Pallas tests, one test class holds the checks and a subclass reruns
them with INTERPRET on: on a CPU-only machine only the interpret class runs; on an
accelerator the compiled class runs too.
"""

import re
import subprocess
import sys

import numpy as np
import pytest
import torch

jax = pytest.importorskip("jax", reason="JAX is not installed (pip install 'unmask[jax]')")
import jax.numpy as jnp  # noqa: E402

import unmask  # noqa: E402
import unmask.jax as uj  # noqa: E402
from unmask import native, ops, reference, rng  # noqa: E402
from unmask.jax import reference as jnp_reference  # noqa: E402
from unmask.pallas import philox  # noqa: E402
from tests.helpers import JAX_CONF_RTOL, tiny_model  # noqa: E402



def to_jax(tensor):
    return None if tensor is None else jnp.asarray(tensor.numpy())


class TestPallasCompiled:
    INTERPRET = False

    @pytest.fixture(autouse=True)
    def _needs_backend(self):
        if not self.INTERPRET and jax.default_backend() == "cpu":
            pytest.skip("compiled Pallas needs a TPU or GPU; the interpret class covers CPU")

    @pytest.mark.parametrize("vocab,rows,dtype,kwargs", [
        (1, 3, torch.float32, {}),
        (17, 5, torch.float32, dict(temperature=1.0, seed=3)),
        (1019, 9, torch.bfloat16, dict(temperature=0.7, top_k=7, confidence="margin", offset=4)),
        (1025, 4, torch.float16, dict(top_p=0.8, temperature=1.0, confidence="entropy", conf_temperature=0.5)),
        (300, 16, torch.float32, dict(confidence="random", seed=2**63 + 9, banned=[0, 299])),
        # vocabulary tiles of 128: the running statistics merge across 8 and 6 tiles
        (1000, 6, torch.float32, dict(confidence="margin", temperature=0.9, seed=1, tile_v=128)),
        (700, 5, torch.bfloat16, dict(confidence="random", top_k=40, seed=4, tile_v=128)),
        (1000, 4, torch.float32, dict(confidence="entropy", top_p=0.7, temperature=1.0, tile_v=128)),
        # the nucleus measured at the sampling temperature, far from 1 both ways
        (1019, 7, torch.float32, dict(top_p=0.9, temperature=0.25, conf_temperature=0.25, seed=8)),
        (513, 6, torch.bfloat16, dict(top_p=0.5, temperature=3.0, confidence="margin", seed=2)),
        (257, 5, torch.float32, dict(top_p=0.9, temperature=1e-30, confidence="margin", seed=2)),  # x / T overflows
    ])
    def test_sample(self, vocab, rows, dtype, kwargs):
        gen = torch.Generator().manual_seed(vocab)
        logits = (torch.randn(rows, vocab, generator=gen) * 3).to(dtype)
        logits[-1, 1 % vocab] = float("nan")  # a NaN row is reported as -1 / -inf
        kwargs = dict(kwargs)  # parametrised dicts are shared between the two classes
        banned = kwargs.pop("banned", None)
        tile = {"tile_v": kwargs.pop("tile_v")} if "tile_v" in kwargs else {}
        tokens, conf = uj.sample(jnp.asarray(logits.float().numpy()).astype(_jax_dtype(dtype)), banned=banned,
                                 interpret=self.INTERPRET, **kwargs, **tile)
        expected_tokens, expected_conf = reference.sample(
            logits, banned=None if banned is None else torch.tensor(banned), **kwargs)
        ref_tokens, ref_conf = jnp_reference.sample(jnp.asarray(logits.float().numpy()).astype(_jax_dtype(dtype)),
                                                    banned=banned, **kwargs)
        assert np.array_equal(np.asarray(tokens), expected_tokens.numpy())
        assert np.array_equal(np.asarray(tokens), np.asarray(ref_tokens))
        np.testing.assert_allclose(np.asarray(conf), expected_conf.numpy(), rtol=JAX_CONF_RTOL, atol=1e-7)
        np.testing.assert_allclose(np.asarray(conf), np.asarray(ref_conf), rtol=JAX_CONF_RTOL, atol=1e-7)
        assert int(tokens[-1]) == -1

    def test_sample_statistics_match_softmax(self):
        base = np.array([1.0, 0.5, 0.0, -0.5, -1.0, 2.0], np.float32)
        logits = jnp.asarray(np.tile(base, (4000, 1)))
        tokens, _ = uj.sample(logits, temperature=1.0, seed=5, interpret=self.INTERPRET)
        counts = np.bincount(np.asarray(tokens), minlength=6)
        probs = np.exp(base - base.max()) / np.exp(base - base.max()).sum()
        chi2 = float(((counts - probs * 4000) ** 2 / (probs * 4000)).sum())
        assert chi2 < 25.0, (counts, probs)  # 5 degrees of freedom, P < 2e-4

    @pytest.mark.parametrize("q_len,k_len,group,masks", [
        (1, 1, 1, {}),
        (17, 99, 4, dict(block_size=8)),
        (99, 17, 1, dict(key_valid=True)),
        (40, 130, 8, dict(kv_len=True, block_size=16, q_offset=32)),
        # several query tiles of 128: each tile's first query, block ends and visited keys
        (300, 700, 2, dict(kv_len=True, block_size=32, q_offset=10)),
        (129, 131, 1, dict(block_size=5, key_valid=True)),
        # head dims off the powers of two (the GPU variant pads them to one)
        (33, 70, 2, dict(block_size=8, head_dim=80)),
        (20, 40, 4, dict(head_dim=33)),
    ])
    def test_attention(self, q_len, k_len, group, masks):
        gen = torch.Generator().manual_seed(q_len + k_len)
        masks = dict(masks)
        head_dim = masks.pop("head_dim", 64)
        q = torch.randn(2, q_len, 8, head_dim, generator=gen)
        k = torch.randn(2, k_len, 8 // group, head_dim, generator=gen)
        v = torch.randn(2, k_len, 8 // group, head_dim, generator=gen)
        kwargs = dict(masks)
        if kwargs.pop("key_valid", False):
            kwargs["key_valid"] = torch.rand(2, k_len, generator=gen) > 0.3
        if kwargs.pop("kv_len", False):
            kwargs["kv_len"] = torch.tensor([0, k_len // 2])
        jax_kwargs = {name: to_jax(value) if isinstance(value, torch.Tensor) else value for name, value in kwargs.items()}
        out = uj.attention(to_jax(q), to_jax(k), to_jax(v), interpret=self.INTERPRET, **jax_kwargs)
        expected = reference.attention(q.double(), k.double(), v.double(), **kwargs).numpy()
        np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-4, atol=2e-5)
        np.testing.assert_allclose(np.asarray(jnp_reference.attention(to_jax(q), to_jax(k), to_jax(v), **jax_kwargs)),
                                   expected, rtol=1e-4, atol=2e-5)

    def test_attention_takes_a_traced_q_offset(self):
        """A cached block-causal step passes its window's start as a traced q_offset: one
        compiled call serves every offset, each equal to the reference at that offset
        (block ends straddling query tiles, the window at the canvas's end)."""
        gen = torch.Generator().manual_seed(9)
        q, k, v = (torch.randn(2, length, 4, 64, generator=gen) for length in (150, 300, 300))
        valid = torch.rand(2, 300, generator=gen) > 0.2
        attend = jax.jit(lambda q, k, v, valid, offset: uj.attention(q, k, v, key_valid=valid, block_size=16,
                                                                     q_offset=offset, interpret=self.INTERPRET))
        for offset in (0, 7, 150):
            out = attend(to_jax(q), to_jax(k), to_jax(v), to_jax(valid), jnp.int32(offset))
            expected = reference.attention(q.double(), k.double(), v.double(), key_valid=valid, block_size=16,
                                           q_offset=offset).numpy()
            np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-4, atol=2e-5)
        assert attend._cache_size() == 1
        with pytest.raises(TypeError, match="q_offset"):
            uj.attention(to_jax(q), to_jax(k), to_jax(v), block_size=16, q_offset=jnp.float32(1.0))

    @pytest.mark.parametrize("masks", [dict(key_valid=True), dict(block_size=32), dict(block_size=8, q_offset=20),
                                       dict(block_size=1, q_offset=5)])
    def test_attention_never_reads_keys_hidden_from_every_query(self, masks):
        """NaN in K and V where key_valid hides a key, or past the block of the last query
        (padding rows of the last query tile included), leaves the output bit-identical:
        a hidden key weighs 0, and 0 times NaN is NaN."""
        gen = torch.Generator().manual_seed(5)
        q, k, v = (torch.randn(1, length, 2, 64, generator=gen) for length in (40, 200, 200))
        kwargs = dict(masks)
        hidden = torch.zeros(1, 200, dtype=torch.bool)
        if kwargs.pop("key_valid", False):
            kwargs["key_valid"] = torch.rand(1, 200, generator=gen) > 0.3
            hidden = ~kwargs["key_valid"]
        else:
            block = kwargs["block_size"]
            hidden[:, ((kwargs.get("q_offset", 0) + 40 - 1) // block + 1) * block:] = True
        dirty_k, dirty_v = k.clone(), v.clone()
        dirty_k[hidden], dirty_v[hidden] = float("nan"), float("nan")
        jax_kwargs = {name: to_jax(value) if isinstance(value, torch.Tensor) else value for name, value in kwargs.items()}
        clean = np.asarray(uj.attention(to_jax(q), to_jax(k), to_jax(v), interpret=self.INTERPRET, **jax_kwargs))
        dirty = np.asarray(uj.attention(to_jax(q), to_jax(dirty_k), to_jax(dirty_v), interpret=self.INTERPRET,
                                        **jax_kwargs))
        assert not np.isnan(clean).any()
        np.testing.assert_array_equal(dirty, clean)

    @pytest.mark.parametrize("block_size,q_offset", [(16, 0), (8, 5), (32, 16)])
    def test_keys_only_later_queries_of_a_tile_see_never_reach_earlier_ones(self, block_size, q_offset):
        """Block-causal: inf, -inf and NaN in V at keys only later queries of the query tile
        see leave the earlier queries' outputs as they are with clean values, and reach
        the later ones as the reference says (NaN where a NaN or both infinities meet,
        inf where one does)."""
        gen = torch.Generator().manual_seed(9)
        q, k, v = (torch.randn(1, length, 2, 32, generator=gen) for length in (48, 96, 96))
        first_end = (q_offset // block_size + 1) * block_size
        dirty_v = v.clone()
        dirty_v[0, first_end, 0, :4] = float("inf")  # one sign: inf
        dirty_v[0, first_end + 1, 1, :4] = float("nan")
        dirty_v[0, first_end + 2, 0, 8:12] = float("inf")
        dirty_v[0, first_end + 3, 0, 8:12] = -float("inf")  # both signs: NaN
        args = dict(block_size=block_size, q_offset=q_offset)
        clean = np.asarray(uj.attention(to_jax(q), to_jax(k), to_jax(v), interpret=self.INTERPRET, **args))
        dirty = np.asarray(uj.attention(to_jax(q), to_jax(k), to_jax(dirty_v), interpret=self.INTERPRET, **args))
        expected = reference.attention(q, k, dirty_v, **args).numpy()
        sees = (np.arange(48) + q_offset) // block_size * block_size + block_size > first_end
        assert 0 < sees.sum() < 48
        np.testing.assert_allclose(dirty[:, ~sees], clean[:, ~sees], rtol=1e-5, atol=1e-6)
        assert np.array_equal(np.isnan(dirty), np.isnan(expected))
        assert np.array_equal(np.isposinf(dirty), np.isposinf(expected))
        assert np.isnan(dirty[:, sees]).any() and np.isposinf(dirty[:, sees]).any()
        finite = np.isfinite(expected)
        np.testing.assert_allclose(dirty[finite], expected[finite], rtol=1e-4, atol=1e-5)

    @pytest.mark.parametrize("mode", [dict(k=[2, 0, 5]), dict(threshold=0.5), dict(factor=1.2),
                                      dict(k=[9, 0, 1], threshold=0.5)])
    def test_commit(self, mode):
        gen = torch.Generator().manual_seed(1)
        x = torch.full((3, 37), -1, dtype=torch.long)
        tokens = torch.randint(0, 50, (3, 37), generator=gen)
        conf = (torch.rand(3, 37, generator=gen) * 4).floor() / 4  # many exact ties
        eligible = torch.rand(3, 37, generator=gen) > 0.3
        torch_mode = {name: torch.tensor(value) if isinstance(value, list) else value for name, value in mode.items()}
        jax_mode = {name: jnp.asarray(value) if isinstance(value, list) else value for name, value in mode.items()}
        expected_x = x.clone()
        expected = reference.commit(expected_x, tokens, conf, eligible, **torch_mode)
        args = (to_jax(x), to_jax(tokens), to_jax(conf), to_jax(eligible))
        new_x, committed = uj.commit(*args, interpret=self.INTERPRET, **jax_mode)
        assert np.array_equal(np.asarray(committed), expected.numpy())
        assert np.array_equal(np.asarray(new_x), expected_x.numpy())
        ref_x, ref_committed = jnp_reference.commit(*args, **jax_mode)
        assert np.array_equal(np.asarray(ref_committed), expected.numpy())

    @pytest.mark.parametrize("mode", [dict(threshold=0.8), dict(threshold=0.1), dict(factor=1.0),
                                      dict(factor=0.37)])
    def test_commit_decides_at_the_edges_as_float64_does(self, mode):
        """Confidences at the float32 edges of the rules: float32(threshold) and its
        neighbours, and the largest float32 each rank's factor rule refuses and the next.
        float32 arithmetic (the threshold rounded to float32, (n + 1)(1 - c) in float32)
        decides some of them unlike the float64 of the torch kernels; the bounds of
        unmask.jax.commit_bounds decide every one alike."""
        length = 12
        if "threshold" in mode:
            edge = np.float32(mode["threshold"])
            values = [edge, np.nextafter(edge, np.float32(-1)), np.nextafter(edge, np.float32(2))]
        else:
            bounds = uj.kernels.rank_bounds("factor", None, mode["factor"], length)
            values = list(bounds) + [np.nextafter(b, np.float32(2)) for b in bounds]
        values = np.asarray(values, np.float32)
        gen = np.random.default_rng(3)
        conf = torch.from_numpy(gen.choice(values, size=(64, length)))
        eligible = torch.from_numpy(gen.random((64, length)) > 0.2)
        x = torch.full((64, length), -1, dtype=torch.long)
        tokens = torch.arange(64 * length).reshape(64, length)
        expected = reference.commit(x.clone(), tokens, conf, eligible, **mode)
        args = (to_jax(x), to_jax(tokens), to_jax(conf), to_jax(eligible))
        _, committed = uj.commit(*args, interpret=self.INTERPRET, **mode)
        assert np.array_equal(np.asarray(committed), expected.numpy())
        _, ref_committed = jnp_reference.commit(*args, **mode)
        assert np.array_equal(np.asarray(ref_committed), expected.numpy())
        assert 0 < int(expected.sum()) < int(eligible.sum()), "the rule must both pass and refuse"

    def test_jit_and_vmap(self):
        logits = jnp.asarray(np.random.default_rng(0).normal(size=(4, 5, 40)).astype(np.float32))
        step = jax.jit(lambda lg, offset: uj.sample(lg, temperature=1.0, seed=1, offset=offset,
                                                    interpret=self.INTERPRET))
        a, b = step(logits, 3), uj.sample(logits, temperature=1.0, seed=1, offset=3, interpret=self.INTERPRET)
        assert np.array_equal(np.asarray(a[0]), np.asarray(b[0]))
        q = jnp.asarray(np.random.default_rng(1).normal(size=(3, 1, 9, 2, 64)).astype(np.float32))
        batched = jax.vmap(lambda t: uj.attention(t, t, t, interpret=self.INTERPRET))(q)
        for i in range(3):
            np.testing.assert_allclose(np.asarray(batched[i]),
                                       np.asarray(uj.attention(q[i], q[i], q[i], interpret=self.INTERPRET)),
                                       rtol=1e-6, atol=1e-6)


class TestPallasInterpret(TestPallasCompiled):
    INTERPRET = True


def _jax_dtype(dtype):
    return {torch.float32: jnp.float32, torch.float16: jnp.float16, torch.bfloat16: jnp.bfloat16}[dtype]


def test_philox_bit_exact_across_torch_cpp_and_jax():
    seed, rows, cols = 0x0123456789ABCDEF, 64, 1023
    words = philox.draws(jnp.uint32(seed & 0xFFFFFFFF), jnp.uint32(seed >> 32),
                         jnp.arange(rows, dtype=jnp.uint32)[:, None], jnp.arange(cols, dtype=jnp.uint32)[None, :], 77, 1)
    spec = rng.draws(seed, torch.arange(rows), cols, offset=77, stream=1).numpy()
    assert np.array_equal(np.asarray(words).astype(np.int64), spec)
    if native.available():
        assert np.array_equal(spec, ops.philox_draws(seed, rows, cols, offset=77, stream=1).numpy())
    kat = philox.philox4x32_10(*(jnp.uint32(c) for c in (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344)),
                               0xA4093822, 0x299F31D0)
    assert [int(w) for w in kat] == [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]


def test_gumbel_in_float32_never_overflows():
    extremes = jnp.asarray([0, 255, 0xFFFFFFFF, 0xFFFFFF00, 0x80000000], jnp.uint32)
    g = np.asarray(philox.gumbel_from_draws(extremes))
    exact = rng.gumbel_from_draws(torch.tensor([0, 255, 0xFFFFFFFF, 0xFFFFFF00, 0x80000000])).numpy()
    assert np.isfinite(g).all()
    np.testing.assert_allclose(g, exact, rtol=1e-5)


@pytest.mark.parametrize("block_size", [None, 3])
def test_jax_model_matches_torch_model_on_dream_checkpoints(tmp_path, block_size):
    # Row 0 left-padded by 2: its first real token predicted from its own position, and
    # (block-causal) its block grid starting there, in both frameworks.
    config = unmask.ModelConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden_size=48, vocab_size=40,
                                embedding_size=40, mask_token_id=39, eos_token_id=38, include_qkv_bias=True,
                                model_type="dream", block_size=block_size)
    model = unmask.DiffusionTransformer.random(config, seed=3, std=0.3)
    unmask.save_pretrained(model, tmp_path)
    jax_model = uj.from_pretrained(tmp_path)
    ids = torch.randint(0, 38, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[0, :2] = False
    with torch.no_grad():
        expected = model(ids, mask).numpy()
    np.testing.assert_allclose(np.asarray(jax_model(ids.numpy(), mask.numpy())), expected, rtol=1e-4, atol=1e-4)


def test_unmask_imports_without_jax():
    code = "import sys; sys.modules['jax'] = None; import unmask; print(unmask.generate.__name__)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "generate" in result.stdout


def test_sample_rows_outside_the_rows_select_nothing():
    # A device index cannot be checked without a read: ids outside [0, N) select nothing
    # (as the CUDA kernel skips them); JAX indexing read -1 as the last row and sampled it.
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(4, 10)).astype(np.float32))
    tokens, conf = uj.sample(logits, rows=jnp.asarray([-1, 4, 1]))
    assert np.asarray(tokens).tolist()[0] == -1 and np.asarray(tokens).tolist()[3] == -1
    assert np.asarray(tokens)[1] == int(np.argmax(np.asarray(logits)[1])) and np.isneginf(np.asarray(conf)[3])


@pytest.mark.parametrize("offset,exception", [(jnp.zeros((3,), jnp.int32), ValueError),  # not one per row
                                              (jnp.float32(1.0), TypeError), (np.asarray(-1), ValueError)])
def test_sample_offset_arrays_are_checked(offset, exception):
    logits = jnp.zeros((4, 10), jnp.float32)
    with pytest.raises(exception, match="offset"):
        uj.sample(logits, offset=offset)
    assert np.array_equal(np.asarray(uj.sample(logits, offset=jnp.int32(3))[0]),
                          np.asarray(uj.sample(logits, offset=3)[0]))


def test_host_values_are_checked_as_the_torch_ops_check_them():
    """numpy arrays hold their values on the host: kv_len and commit counts are checked
    there, with the torch ops' messages (device arrays are not read)."""
    q = np.zeros((1, 4, 2, 8), np.float32)
    kv = np.zeros((1, 5, 2, 8), np.float32)
    for kv_len in (np.array([99]), np.array([-1])):
        with pytest.raises(ValueError) as torch_error:
            ops.attention(*(torch.from_numpy(t) for t in (q, kv, kv)), kv_len=torch.from_numpy(kv_len))
        with pytest.raises(ValueError) as jax_error:
            uj.attention(jnp.asarray(q), jnp.asarray(kv), jnp.asarray(kv), kv_len=kv_len)
        assert str(jax_error.value) == str(torch_error.value)
    canvas = np.zeros((2, 4), np.int32)
    args = (canvas, canvas, np.ones((2, 4), np.float32), np.ones((2, 4), bool))
    with pytest.raises(ValueError, match=r"k must be >= 0, got a count of -2"):
        uj.commit(*args, k=np.array([1, -2]))


def test_float64_confidences_are_refused_where_the_kernel_decides_in_float32():
    # rounded to float32, 0.79999999999 would pass threshold 0.8 where the torch op (float64) does not
    canvas = np.zeros((1, 2), np.int32)
    with pytest.raises(TypeError, match="conf must have dtype"):
        uj.commit(canvas, canvas, np.array([[0.79999999999, 0.9]]), np.ones((1, 2), bool), threshold=0.8)


def test_empty_inputs_give_empty_outputs():
    assert uj.attention(*(jnp.zeros((0, 4, 2, 16), jnp.float32),) * 3).shape == (0, 4, 2, 16)
    assert uj.attention(jnp.zeros((1, 0, 2, 16)), jnp.zeros((1, 5, 2, 16)), jnp.zeros((1, 5, 2, 16))).shape == (
        1, 0, 2, 16)
    x, committed = uj.commit(*(jnp.zeros((2, 0), jnp.int32),) * 2, jnp.zeros((2, 0)), jnp.zeros((2, 0), bool), k=1)
    assert x.shape == committed.shape == (2, 0)
    tokens, conf = uj.sample(jnp.zeros((0, 3, 11)))
    assert tokens.shape == conf.shape == (0, 3)


@pytest.mark.parametrize("kwargs,message", [
    (dict(tile_v=0), "tile_v must be >= 1, got 0"),
    (dict(tile_v=-128), "tile_v must be >= 1, got -128"),
    (dict(tile_v=200), "tile_v=200 must be a positive multiple of 128"),
    (dict(row_base=2**31), "row_base must be < 2147483644"),
    (dict(row_base=-1), "row_base must be >= 0"),
])
def test_sample_tiles_and_row_base_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        uj.sample(jnp.zeros((4, 10), jnp.float32), **kwargs)


def test_query_positions_past_int32_are_refused():
    q = jnp.zeros((1, 4, 2, 8))
    with pytest.raises(ValueError, match="q_offset=2147483645 plus the 4 queries must stay below 2"):
        uj.attention(q, q, q, q_offset=2**31 - 3)


def test_sample_takes_one_offset_per_row_as_the_torch_op_does():
    logits = torch.randn(3, 5, 50, generator=torch.Generator().manual_seed(3)) * 2
    offsets = torch.tensor([[0, 1, 2, 3, 4], [7, 7, 7, 7, 7], [2**32 - 1, 0, 5, 9, 11]])
    for confidence in ("prob", "random"):
        tokens, conf = uj.sample(jnp.asarray(logits.numpy()), temperature=1.0, confidence=confidence, seed=9,
                                 offset=offsets.numpy().astype(np.uint32))
        expected_tokens, expected_conf = reference.sample(logits, temperature=1.0, confidence=confidence, seed=9,
                                                          offset=offsets)
        assert np.array_equal(np.asarray(tokens), expected_tokens.numpy())
        np.testing.assert_allclose(np.asarray(conf), expected_conf.numpy(), rtol=JAX_CONF_RTOL, atol=1e-7)
    # one offset per row is not a different scalar: a row's draws follow its own offset
    shifted = uj.sample(jnp.asarray(logits.numpy()), temperature=1.0, seed=9, offset=jnp.asarray(offsets) + 1)[0]
    assert not np.array_equal(np.asarray(shifted), np.asarray(tokens))


@pytest.mark.parametrize("rule", [{"threshold": 0.4}, {"factor": 1.0}])
def test_a_rows_noise_does_not_depend_on_its_companions(rule):
    model = uj.from_torch(tiny_model(seed=6, std=1.0))
    kwargs = dict(gen_length=16, block_length=8, temperature=1.0, seed=5, stop_at_eos=False, **rule)
    first = uj.generate(model, [[1, 2, 3], [4, 5, 6]], **kwargs)
    other = uj.generate(model, [[1, 2, 3], [40, 41, 42]], **kwargs)
    assert np.array_equal(np.asarray(first.tokens[0]), np.asarray(other.tokens[0]))


def test_the_sharded_sampler_checks_offsets_as_sample_does():
    from unmask.jax import sharding

    mesh = sharding.make_mesh()
    logits = jnp.zeros((2, 3, 10), jnp.float32)
    for bad in (np.array([[1, 2, 3], [4, 5, -1]]), np.zeros((2,), np.int32), np.array([[2**32, 0, 0], [0, 0, 0]])):
        with pytest.raises(ValueError) as sharded:
            sharding.sharded_sample(mesh, logits, offset=bad)
        with pytest.raises(ValueError) as alone:
            uj.sample(logits, offset=bad)
        assert str(sharded.value) == str(alone.value)
