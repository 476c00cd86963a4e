"""unmask.jax.generate, the compiled block loop: the tokens, model calls and steps of
unmask.generate for every commit rule, remasking kind, sampling setting, CFG, ragged
batch and EOS stop; one compilation per canvas shape; the callback; invalid logits; and
the JAX path without torch."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

jax = pytest.importorskip("jax", reason="JAX is not installed (pip install 'unmask[jax]')")

import unmask  # noqa: E402
import unmask.jax as uj  # noqa: E402
from unmask import validation  # noqa: E402
from unmask.jax import sampler as jax_sampler  # noqa: E402
from tests.helpers import tiny_model  # noqa: E402

PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]  # ragged: left-padded
DREAM = {"model_type": "dream", "include_qkv_bias": True}
SDAR = {"model_type": "sdar", "qk_norm": True, "attention_head_dim": 16, "block_size": 4, "norm_std": 0.3}

CASES = [
    # (model overrides, generate arguments)
    ({}, {"steps": 8, "block_length": 4}),  # one token per step, two blocks
    ({}, {"steps": 4, "block_length": 4}),  # two per step
    ({}, {"steps": 16, "block_length": 4}),  # more steps than positions: steps that commit nothing are skipped
    ({}, {"steps": 6, "block_length": 8, "gen_length": 8}),  # 8 over 6 steps: 2, 2, 1, 1, 1, 1
    ({}, {"threshold": 0.3, "block_length": 8}),
    ({}, {"factor": 1.0, "block_length": 4}),
    ({}, {"steps": 8, "block_length": 4, "cfg_scale": 1.0, "remasking": "margin"}),
    ({}, {"steps": 8, "block_length": 4, "temperature": 1.0, "seed": 3}),
    ({}, {"threshold": 0.5, "block_length": 4, "temperature": 0.7, "top_k": 5, "top_p": 0.9, "seed": 11}),
    ({}, {"threshold": -0.5, "block_length": 4, "remasking": "entropy"}),
    ({}, {"steps": 8, "block_length": 4, "remasking": "random", "temperature": 1.0, "seed": 5}),
    (DREAM, {"steps": 8, "block_length": 4}),
    ({"block_size": 4}, {"threshold": 0.3, "block_length": 4}),  # block-causal attention
    ({}, {"steps": 8, "block_length": 4, "cache": "prefix"}),
    ({}, {"threshold": 0.3, "block_length": 4, "cache": "dual"}),
    ({}, {"steps": 8, "block_length": 4, "cache": "dual", "cfg_scale": 1.0, "temperature": 1.0, "seed": 2}),
    (DREAM, {"steps": 8, "block_length": 4, "cache": "prefix"}),
    (DREAM, {"factor": 1.0, "block_length": 4, "cache": "dual"}),
    ({"block_size": 4}, {"steps": 8, "block_length": 4, "cache": "dual"}),
    ({"block_size": 4}, {"threshold": 0.3, "block_length": 4, "cache": "prefix"}),
    (DREAM, {"steps": 6, "block_length": 8, "schedule": "dream"}),  # Dream: 1, 1, 1, 1, 1, 3 (LLaDA: 2, 2, 1, 1, 1, 1)
    ({}, {"steps": 4, "block_length": 4, "schedule": "dream", "cache": "dual"}),
    # SDAR's Qwen3 layout: q/k norms, a head dim (16) apart from d_model / heads (8)
    (SDAR, {"threshold": 0.3, "block_length": 4}),
    (SDAR, {"steps": 8, "block_length": 4, "cache": "dual"}),
    # steps with threshold (SDAR's low_confidence_dynamic): the plan's counts as floors,
    # a block ending with its masks (0.2 decides on these models: fewer calls, or other tokens)
    ({}, {"steps": 4, "block_length": 8, "threshold": 0.2}),
    (SDAR, {"steps": 8, "block_length": 4, "threshold": 0.2, "cache": "dual"}),
    ({}, {"steps": 8, "block_length": 4, "threshold": 0.2, "temperature": 0.8, "seed": 4}),
    # Dream's sampling: confidence at the sampling temperature, the nucleus measured there
    (DREAM, {"steps": 8, "block_length": 8, "schedule": "dream", "temperature": 0.3, "top_p": 0.9,
             "conf_temperature": 0.3, "remasking": "entropy", "seed": 6}),
    # Dream's alg_temp: positions drawn by Gumbel-top-k with torch's noise
    (DREAM, {"steps": 4, "block_length": 8, "temperature": 0.5, "alg_temp": 0.3, "seed": 7}),
    ({}, {"steps": 4, "block_length": 4, "alg_temp": 1.0, "seed": 8, "cache": "dual"}),
]


GRID_PROMPTS = [[5, 6, 7, 8, 9, 1], [10, 11], [12, 13, 14, 15, 16, 17, 18, 19, 20, 21]]  # lengths 2 modulo 4
GRID_CASES = [
    # block_grid="model": blocks on the model's grid from each row's first token, the
    # prompts' partial block first (planned as a whole block capped by its masks), the tail
    # decoded then dropped; with shifted logits each model block's first position alone
    (SDAR, {"steps": 12, "block_length": 4}),
    (SDAR, {"steps": 12, "block_length": 4, "threshold": 0.2}),
    (SDAR, {"threshold": 0.3, "block_length": 2, "temperature": 0.8, "seed": 3}),
    ({"block_size": 4}, {"factor": 1.0, "block_length": 4, "gen_length": 8}),
    ({**DREAM, "block_size": 4}, {"threshold": 0.25, "block_length": 2}),  # Fast-dLLM v2's layout
    ({**DREAM, "block_size": 4}, {"steps": 8, "block_length": 2, "gen_length": 8}),
    # with caches: a prompt's partial block starts before the generated text, but its
    # masks do not, so the recomputed window covers every position decoded
    (SDAR, {"steps": 12, "block_length": 4, "threshold": 0.2, "cache": "prefix"}),
    (SDAR, {"threshold": 0.3, "block_length": 2, "cache": "dual"}),
    (SDAR, {"steps": 8, "block_length": 8, "gen_length": 16, "cache": "prefix",  # blocks of two model blocks
            "prompts": [[(3 * i + 1) % 50 for i in range(13)], [7, 8, 9, 10, 11]]}),  # lengths 5 modulo 8
    ({**DREAM, "block_size": 4}, {"threshold": 0.25, "block_length": 2, "cache": "dual"}),
    ({**DREAM, "block_size": 4}, {"steps": 8, "block_length": 2, "gen_length": 8, "cache": "prefix"}),
]


@pytest.mark.parametrize("overrides,kwargs", GRID_CASES, ids=[str(i) for i in range(len(GRID_CASES))])
def test_the_model_grid_decodes_as_torch(overrides, kwargs):
    model = tiny_model(seed=5, std=0.5, **overrides)
    arguments = {"gen_length": 12, "stop_at_eos": False, "block_grid": "model", **kwargs}
    prompts = arguments.pop("prompts", GRID_PROMPTS)
    expected = unmask.generate(model, prompts, **arguments)
    seen = []
    got = uj.generate(uj.from_torch(model), prompts, callback=lambda step, x, committed: seen.append(x.shape),
                      **arguments)
    assert np.array_equal(np.asarray(got.tokens), expected.tokens.numpy())
    assert np.array_equal(np.asarray(got.sequences), expected.sequences.numpy())
    assert got.nfe == expected.nfe and got.steps_per_block == expected.steps_per_block
    assert set(seen) == {tuple(expected.sequences.shape)}, "the callback sees the canvas the result holds"


@pytest.mark.parametrize("overrides,kwargs", CASES, ids=[str(i) for i in range(len(CASES))])
def test_generate_equals_torch_generate(overrides, kwargs):
    model = tiny_model(seed=2, **overrides)
    arguments = {"gen_length": 8, "stop_at_eos": False, **kwargs}
    expected = unmask.generate(model, PROMPTS, **arguments)
    got = uj.generate(uj.from_torch(model), PROMPTS, **arguments)
    assert np.array_equal(np.asarray(got.tokens), expected.tokens.numpy())
    assert np.array_equal(np.asarray(got.sequences), expected.sequences.numpy())
    assert got.nfe == expected.nfe and got.steps_per_block == expected.steps_per_block


@pytest.mark.parametrize("rule", [{"threshold": 0.4}, {"factor": 1.0}], ids=["threshold", "factor"])
def test_rows_that_step_apart_draw_as_in_torch(rule):
    """Sampled threshold / factor decoding where rows take different numbers of steps per
    block (a confident model): each row's RNG offset counts its own steps, in both."""
    model = tiny_model(seed=6, std=1.0)
    arguments = {"gen_length": 24, "block_length": 8, "temperature": 1.0, "seed": 5, "stop_at_eos": False, **rule}
    prompts = [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    expected = unmask.generate(model, prompts, **arguments)
    got = uj.generate(uj.from_torch(model), prompts, **arguments)
    assert np.array_equal(np.asarray(got.tokens), expected.tokens.numpy())
    assert got.nfe == expected.nfe and got.steps_per_block == expected.steps_per_block


@pytest.mark.parametrize("kwargs", [{"steps": 12}, {"threshold": 0.3}], ids=["steps", "threshold"])
def test_eos_stops_rows_as_torch_does(kwargs):
    """EOS is a token the model writes in the first block: rows stop there, the rest of
    their text becomes EOS, and decoding ends when no row runs (fewer blocks, fewer calls)."""
    model = tiny_model(seed=2)
    arguments = {"gen_length": 12, "block_length": 4, **kwargs}
    free = unmask.generate(model, PROMPTS, stop_at_eos=False, **arguments)
    eos_id = int(free.tokens[0, 1])  # written by row 0 in its first block
    expected = unmask.generate(model, PROMPTS, eos_id=eos_id, **arguments)
    got = uj.generate(uj.from_torch(model), PROMPTS, eos_id=eos_id, **arguments)
    assert np.array_equal(np.asarray(got.tokens), expected.tokens.numpy())
    assert got.nfe == expected.nfe and got.steps_per_block == expected.steps_per_block
    assert (expected.tokens[0, 2:] == eos_id).all()  # the case holds what it means to test
    # a list (generation_config.json's): a row stops at any, the rest is the first listed
    other = int(free.tokens[1, 0])  # row 1's first token
    expected = unmask.generate(model, PROMPTS, eos_id=[other, eos_id], **arguments)
    got = uj.generate(uj.from_torch(model), PROMPTS, eos_id=[other, eos_id], **arguments)
    assert np.array_equal(np.asarray(got.tokens), expected.tokens.numpy())
    assert got.nfe == expected.nfe and got.steps_per_block == expected.steps_per_block
    assert (expected.tokens[1, 1:] == other).all() and int(expected.tokens[0, 1]) in (other, eos_id)


@pytest.mark.parametrize("cache", ["prefix", "dual"])
@pytest.mark.parametrize("prompts,block_length", [
    ([[5, 6, 7, 9], [10, 11, 12, 13]], 4),  # generation blocks on the model's blocks
    ([[5, 6, 7], [10, 11, 12, 13, 14]], 4),  # every generation block straddles two model blocks
    ([[5, 6, 7], [10]], 2),  # generation blocks half the model's
], ids=["aligned", "straddling", "half-blocks"])
def test_block_causal_cached_equals_uncached(cache, prompts, block_length):
    """A block-causal model's finished blocks never see later ones, so their cached keys
    and values are what a full forward computes: the cache changes nothing (the window
    recomputes whole model blocks where generation blocks do not line up with them)."""
    model = uj.from_torch(tiny_model(seed=2, block_size=4))
    arguments = {"gen_length": 12, "block_length": block_length, "steps": 12, "stop_at_eos": False}
    uncached = uj.generate(model, prompts, **arguments)
    cached = uj.generate(model, prompts, cache=cache, **arguments)
    assert np.array_equal(np.asarray(cached.tokens), np.asarray(uncached.tokens))


@pytest.mark.parametrize("cache", [None, "prefix", "dual"])
@pytest.mark.parametrize("block_length", [4, 2, 6])
def test_block_causal_ragged_batch_equals_torch(cache, block_length):
    """Rows left-padded by 3, 1, 0 and 5 positions: each row's block grid starts at its own
    first token (the torch model's _GridRotation), with and without a cache window."""
    torch_model = tiny_model(seed=2, block_size=4)
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12], [13, 14, 15, 16, 17, 18], [19]]
    arguments = {"gen_length": 12, "block_length": block_length, "steps": 12, "stop_at_eos": False, "cache": cache}
    expected = unmask.generate(torch_model, prompts, **arguments)
    got = uj.generate(uj.from_torch(torch_model), prompts, **arguments)
    assert np.array_equal(np.asarray(got.tokens), expected.tokens.numpy())
    alone = unmask.generate(torch_model, prompts[:1], **arguments)
    assert np.array_equal(expected.tokens[:1].numpy(), alone.tokens.numpy())


def test_one_compilation_serves_every_block_and_call():
    """The block start and the seed are traced: a canvas shape compiles once, whatever the
    block, the prompt values or the seed."""
    model = uj.from_torch(tiny_model(seed=2))
    arguments = {"gen_length": 12, "block_length": 4, "steps": 12, "stop_at_eos": False, "temperature": 1.0}
    first = uj.generate(model, PROMPTS, seed=1, **arguments)
    other = uj.generate(model, [[1, 2, 3, 4, 5], [6, 7], [8]], seed=2**64 - 1, **arguments)  # same padded shape
    again = uj.generate(model, PROMPTS, seed=1, **arguments)
    assert np.array_equal(np.asarray(again.tokens), np.asarray(first.tokens))
    assert not np.array_equal(np.asarray(other.tokens), np.asarray(first.tokens))
    (decoder,) = model.__dict__["_block_decoders"].values()
    assert decoder._cache_size() == 1


def test_a_traced_seed_draws_the_int_seeds_noise():
    logits = jax.random.normal(jax.random.PRNGKey(0), (6, 300))
    seed = 0x0123456789ABCDEF
    expected = uj.sample(logits, temperature=1.0, seed=seed)
    words = np.array([seed & 0xFFFFFFFF, seed >> 32], np.uint32)
    traced = jax.jit(lambda lg, w: uj.sample(lg, temperature=1.0, seed=w))(logits, words)
    assert np.array_equal(np.asarray(traced[0]), np.asarray(expected[0]))
    assert np.array_equal(np.asarray(uj.kernels.seed_words(seed)), words.view(np.int32))
    with pytest.raises(ValueError, match="seed"):
        uj.sample(logits, seed=np.zeros(3, np.uint32))


def test_dual_cache_with_a_shifted_model_and_an_empty_prompt():
    """Dream's window is the block and the position before it: it must fit a canvas that
    is one block with no prompt (torch handles that case)."""
    torch_model = tiny_model(seed=2, **DREAM)
    arguments = {"gen_length": 4, "block_length": 4, "steps": 4, "stop_at_eos": False, "cache": "dual"}
    expected = unmask.generate(torch_model, [[]], **arguments)
    got = uj.generate(uj.from_torch(torch_model), [[]], **arguments)
    assert np.array_equal(np.asarray(got.tokens), expected.tokens.numpy())


def test_a_new_callback_compiles_nothing_new():
    model = uj.from_torch(tiny_model(seed=2))
    seen = []
    for tag in ("a", "b"):
        uj.generate(model, PROMPTS, gen_length=4, block_length=4, steps=4, stop_at_eos=False,
                    callback=lambda step, x, committed, tag=tag: seen.append(tag))
    (decoder,) = model.__dict__["_block_decoders"].values()
    assert decoder._cache_size() == 1 and seen == ["a"] * 4 + ["b"] * 4


def test_callback_sees_the_steps_torch_reports():
    model = tiny_model(seed=2)
    arguments = {"gen_length": 8, "block_length": 4, "threshold": 0.3, "stop_at_eos": False}
    seen_torch, seen_jax = [], []
    unmask.generate(model, PROMPTS, callback=lambda step, x, committed: seen_torch.append(
        (step, x.numpy().copy(), committed.numpy().copy())), **arguments)
    uj.generate(uj.from_torch(model), PROMPTS, callback=lambda step, x, committed: seen_jax.append(
        (step, np.array(x), np.array(committed))), **arguments)
    assert [s for s, _, _ in seen_jax] == [s for s, _, _ in seen_torch]
    for (_, x_torch, c_torch), (_, x_jax, c_jax) in zip(seen_torch, seen_jax):
        assert np.array_equal(x_jax, x_torch) and np.array_equal(c_jax, c_torch)


def test_invalid_logits_raise_the_torch_error():
    model = uj.from_torch(tiny_model(seed=2))
    model.params["lm_head"] = model.params["lm_head"].at[7].set(np.nan)  # every logit row gets a NaN
    with pytest.raises(validation.InvalidLogitsError, match="NaN"):
        uj.generate(model, PROMPTS, gen_length=4, block_length=4, steps=4)


def test_bad_arguments_are_named():
    model = uj.from_torch(tiny_model(seed=2))
    with pytest.raises(ValueError, match="prompts"):
        uj.generate(model, [])
    with pytest.raises(ValueError, match="attention_mask"):
        uj.generate(model, np.ones((2, 3), np.int32), attention_mask=np.ones((2, 4), bool))
    with pytest.raises(TypeError, match="callback"):
        uj.generate(model, PROMPTS, callback=3)
    with pytest.raises(ValueError, match="cache"):
        uj.generate(model, PROMPTS, cache="suffix")
    with pytest.raises(TypeError, match="model must be an unmask.jax.JaxModel"):
        uj.generate(tiny_model(seed=2), PROMPTS)  # a torch model: its params were read at trace time before


def test_a_model_whose_interpret_changes_gets_the_kernels_it_asks_for():
    # The forward and the block loop are traced per interpret setting; they were kept after
    # the first call whatever the setting became. On this CPU compiled Pallas does not
    # lower, so a model switched to compiled kernels must fail, not run the interpreted ones.
    if jax.default_backend() != "cpu":
        pytest.skip("compiled Pallas lowers on an accelerator")
    model = uj.from_torch(tiny_model(seed=2), interpret=True)
    ids = np.asarray([[1, 2, 3]])
    model(ids)
    uj.generate(model, PROMPTS, gen_length=4, block_length=4)
    model.interpret = False
    with pytest.raises(NotImplementedError):
        model(ids)
    with pytest.raises(NotImplementedError):
        uj.generate(model, PROMPTS, gen_length=4, block_length=4)


def test_block_program_schedule_matches_torch():
    for length, steps in ((4, 4), (4, 2), (8, 6), (4, 16), (32, 5)):
        program = jax_sampler.BlockProgram(length, 0, validation.Rule(steps), None, 0.0, None, 0, None, False)
        plan = unmask.sampler.schedule_counts([length], steps)[0]
        assert program.step_counts().tolist() == [c for c in plan if c > 0]


NO_TORCH = textwrap.dedent("""
    import sys
    sys.modules["torch"] = None  # any import of torch now fails
    import numpy as np
    import unmask.jax as uj
    from unmask.models.config import ModelConfig

    config = ModelConfig(d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, mlp_hidden_size=48, vocab_size=61,
                         embedding_size=61, mask_token_id=60, eos_token_id=59)
    rng = np.random.default_rng(0)
    def weight(*shape):
        return (rng.standard_normal(shape) * 0.3).astype(np.float32)
    layer = {"attn_norm": np.ones(32, np.float32), "mlp_norm": np.ones(32, np.float32),
             "q_proj": weight(32, 32), "k_proj": weight(16, 32), "v_proj": weight(16, 32), "o_proj": weight(32, 32),
             "gate_proj": weight(48, 32), "up_proj": weight(48, 32), "down_proj": weight(32, 48)}
    embed = weight(61, 32)
    model = uj.JaxModel({"embed": embed, "layers": [layer], "final_norm": np.ones(32, np.float32),
                         "lm_head": embed}, config)
    out = uj.generate(model, [[5, 6, 7], [8]], gen_length=8, block_length=4, steps=8, temperature=1.0, seed=1)
    assert "torch" not in sys.modules or sys.modules["torch"] is None
    print("tokens", np.asarray(out.tokens).tolist(), "nfe", out.nfe)
""")


def test_the_jax_path_runs_without_torch():
    result = subprocess.run([sys.executable, "-c", NO_TORCH], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "nfe 8" in result.stdout
