"""Bad input raises a clear ValueError or TypeError that names the argument."""

import re

import numpy as np
import pytest
import torch

import unmask
from unmask import ops
from tests.helpers import tiny_model

q = torch.randn(1, 4, 2, 8)
kv = torch.randn(1, 5, 2, 8)
logits = torch.randn(3, 11)
x = torch.zeros(2, 4, dtype=torch.int64)
conf = torch.rand(2, 4)
eligible = torch.ones(2, 4, dtype=torch.bool)

BAD_CALLS = [
    # (label, call, exception, message fragment)
    ("attention q dtype", lambda: ops.attention(q.double(), kv.double(), kv.double()), TypeError, "q must have dtype"),
    ("attention q int", lambda: ops.attention(q.long(), kv, kv), TypeError, "q must have dtype"),
    ("attention rank", lambda: ops.attention(q[0], kv, kv), ValueError, "q must have 4 dimensions"),
    ("attention mixed dtypes", lambda: ops.attention(q, kv.half(), kv.half()), TypeError, "share a dtype"),
    ("attention head dim", lambda: ops.attention(q, kv[..., :4], kv[..., :4]), ValueError, "k must have shape"),
    ("attention heads", lambda: ops.attention(torch.randn(1, 4, 3, 8), kv, kv), ValueError, "multiple of k/v heads"),
    ("attention no q heads", lambda: ops.attention(torch.randn(1, 4, 0, 8), kv, kv), ValueError,
     "q heads (0) must be a positive multiple of k/v heads (2)"),  # the kernels refused it after the checks
    ("attention v shape", lambda: ops.attention(q, kv, kv[:, :3]), ValueError, "v must have shape"),
    ("attention kv_len shape", lambda: ops.attention(q, kv, kv, kv_len=torch.tensor([1, 2])), ValueError, "kv_len"),
    ("attention kv_len dtype", lambda: ops.attention(q, kv, kv, kv_len=torch.tensor([1.0])), TypeError, "kv_len"),
    ("attention key_valid", lambda: ops.attention(q, kv, kv, key_valid=torch.ones(1, 5)), TypeError, "key_valid"),
    ("attention key_valid shape", lambda: ops.attention(q, kv, kv, key_valid=torch.ones(1, 4, dtype=torch.bool)),
     ValueError, "key_valid"),
    ("attention block_size", lambda: ops.attention(q, kv, kv, block_size=0), ValueError, "block_size"),
    ("attention q_offset", lambda: ops.attention(q, kv, kv, q_offset=-1), ValueError, "q_offset"),
    ("attention scale", lambda: ops.attention(q, kv, kv, scale=float("nan")), ValueError, "scale"),
    ("sample dtype", lambda: ops.sample(logits.double()), TypeError, "logits must have dtype"),
    ("sample int logits", lambda: ops.sample(logits.long()), TypeError, "logits"),
    ("sample rank", lambda: ops.sample(logits[0]), ValueError, "logits must be"),
    ("sample not a tensor", lambda: ops.sample([[1.0, 2.0]]), TypeError, "logits must be a torch.Tensor"),
    ("sample V=0", lambda: ops.sample(torch.empty(2, 0)), ValueError, "V >= 1"),
    ("sample V=1 banned", lambda: ops.sample(torch.randn(4, 1), banned=[0]), ValueError, "bans every one"),
    ("sample banned range", lambda: ops.sample(logits, banned=[11]), ValueError, "banned"),
    ("sample banned tensor range", lambda: ops.sample(logits, banned=torch.tensor([-1])), ValueError, "banned"),
    ("sample temperature", lambda: ops.sample(logits, temperature=-1.0), ValueError, "temperature"),
    ("sample temperature nan", lambda: ops.sample(logits, temperature=float("nan")), ValueError, "temperature"),
    ("sample tiny temperature", lambda: ops.sample(logits, temperature=1e-40), ValueError,
     "temperature must be 0 (greedy) or >= 1e-30, got 1e-40"),
    ("sample top_k", lambda: ops.sample(logits, top_k=-2), ValueError, "top_k"),
    ("sample top_k type", lambda: ops.sample(logits, top_k=2.5), TypeError, "top_k"),
    ("sample top_p", lambda: ops.sample(logits, top_p=0.0), ValueError, "top_p"),
    ("sample top_p above one", lambda: ops.sample(logits, top_p=1.5), ValueError, "top_p"),
    ("sample confidence", lambda: ops.sample(logits, confidence="max"), ValueError, "confidence"),
    ("sample conf_temperature", lambda: ops.sample(logits, conf_temperature=0.0), ValueError, "conf_temperature"),
    ("sample tiny conf_temperature", lambda: ops.sample(logits, conf_temperature=1e-39), ValueError,
     "conf_temperature"),
    ("sample seed", lambda: ops.sample(logits, seed=-5), ValueError, "seed"),
    ("sample offset", lambda: ops.sample(logits, offset=2**32), ValueError, "offset"),
    ("sample offset type", lambda: ops.sample(logits, offset=1.5), TypeError, "offset must be an int"),
    ("sample offset tensor range", lambda: ops.sample(logits, offset=torch.tensor(-1)), ValueError,
     "offset must lie in"),
    ("sample offset tensor shape", lambda: ops.sample(logits, offset=torch.tensor([1])), ValueError,
     "offset must have shape (3,) (one step offset per row of logits, or 0-d), got (1,)"),
    ("sample offset tensor dtype", lambda: ops.sample(logits, offset=torch.tensor(1.0)), TypeError,
     "offset must have dtype"),
    ("sample rows range", lambda: ops.sample(logits, rows=torch.tensor([3])), ValueError, "rows"),
    ("sample rows dtype", lambda: ops.sample(logits, rows=torch.tensor([0.0])), TypeError, "rows"),
    ("sample NaN logits", lambda: ops.sample(torch.full((2, 3), float("nan"))), ValueError, "NaN"),
    ("commit no mode", lambda: ops.commit(x, x, conf, eligible), ValueError, "exactly one of k, threshold, factor"),
    ("commit two modes", lambda: ops.commit(x, x, conf, eligible, k=1, factor=0.5), ValueError, "exactly one"),
    ("commit x dtype", lambda: ops.commit(x.float(), x, conf, eligible, k=1), TypeError, "x must have dtype"),
    ("commit tokens shape", lambda: ops.commit(x, x[:, :3], conf, eligible, k=1), ValueError, "tokens must have shape"),
    ("commit conf dtype", lambda: ops.commit(x, x, x, eligible, k=1), TypeError, "conf must have dtype"),
    ("commit eligible dtype", lambda: ops.commit(x, x, conf, conf, k=1), TypeError, "eligible"),
    ("commit k negative", lambda: ops.commit(x, x, conf, eligible, k=-1), ValueError, "k must be >= 0"),
    ("commit k shape", lambda: ops.commit(x, x, conf, eligible, k=torch.tensor([1])), ValueError, "k must have shape"),
    ("commit factor", lambda: ops.commit(x, x, conf, eligible, factor=0.0), ValueError, "factor"),
]


@pytest.mark.parametrize("call,exception,fragment", [c[1:] for c in BAD_CALLS], ids=[c[0] for c in BAD_CALLS])
def test_bad_kernel_arguments(call, exception, fragment):
    with pytest.raises(exception, match=re.escape(fragment)):
        call()


# --------------------------------------------------------------------------- every front end

# The same bad argument gives the same error from each front end that takes it: unmask.ops
# (torch), unmask.jax and the tensor-parallel sampler (unmask.distributed.VocabShard).


def _torch_sample(logits, **kwargs):
    return ops.sample(torch.from_numpy(logits), **kwargs)


def _jax_sample(logits, **kwargs):
    uj = pytest.importorskip("unmask.jax", reason="JAX is not installed")
    return uj.sample(_jnp().asarray(logits), **kwargs)


def _tensor_parallel_sample(logits, **kwargs):
    from unmask.distributed import VocabShard

    vocab = logits.shape[-1]  # one rank holding the whole vocabulary: nothing is gathered before the checks
    return VocabShard(0, vocab, vocab, (vocab,), group=None).sample(torch.from_numpy(logits), **kwargs)


def _jnp():
    return pytest.importorskip("jax.numpy", reason="JAX is not installed")


SAMPLE_FRONT_ENDS = {"torch": _torch_sample, "jax": _jax_sample, "tensor-parallel": _tensor_parallel_sample}

BAD_SAMPLE_OPTIONS = [
    # (label, kwargs, exception, the message every front end gives)
    ("temperature", dict(temperature=-1.0), ValueError, "temperature must be >= 0, got -1.0"),
    ("temperature nan", dict(temperature=float("nan")), ValueError, "temperature must be finite, got nan"),
    ("tiny temperature", dict(temperature=1e-40), ValueError, "temperature must be 0 (greedy) or >= 1e-30, got 1e-40"),
    ("top_k", dict(top_k=-2), ValueError, "top_k must be >= 0, got -2"),
    ("top_k type", dict(top_k=2.5), TypeError, "top_k must be an int, got float"),
    ("top_p zero", dict(top_p=0.0), ValueError, "top_p must be > 0, got 0.0"),
    ("top_p above one", dict(top_p=1.5), ValueError, "top_p must lie in (0, 1], got 1.5"),
    ("confidence", dict(confidence="max"), ValueError, "confidence must be one of ('prob', 'margin', 'entropy', "
                                                       "'random'), got 'max'"),
    ("conf_temperature", dict(conf_temperature=0.0), ValueError, "conf_temperature must be > 0, got 0.0"),
    ("tiny conf_temperature", dict(conf_temperature=1e-39), ValueError, "conf_temperature must be >= 1e-30"),
    ("seed negative", dict(seed=-5), ValueError, "seed must lie in [0, 2**64), got -5"),
    ("seed type", dict(seed=1.5), TypeError, "seed must be an int, got float"),
    ("offset", dict(offset=2**32), ValueError, "offset must be < 4294967296, got 4294967296"),
    ("offset float", dict(offset=1.5), TypeError, "offset must be an int, got float"),  # JAX took it as 1
    ("offset numpy", dict(offset=np.int64(-1)), TypeError, "offset must be an int, got int64"),  # JAX wrapped it
    ("banned outside", dict(banned=[11]), ValueError, "banned must be < 11, got 11"),
    ("banned negative", dict(banned=[-1]), ValueError, "banned must be >= 0, got -1"),
    ("banned all", dict(banned=list(range(11))), ValueError, "banned bans every one of the V=11 token ids"),
]


@pytest.mark.parametrize("front_end", list(SAMPLE_FRONT_ENDS))
@pytest.mark.parametrize("kwargs,exception,message", [c[1:] for c in BAD_SAMPLE_OPTIONS],
                         ids=[c[0] for c in BAD_SAMPLE_OPTIONS])
def test_bad_sample_arguments_give_one_message_everywhere(front_end, kwargs, exception, message):
    logits = np.random.default_rng(0).standard_normal((3, 11)).astype(np.float32)
    with pytest.raises(exception, match=re.escape(message)):
        SAMPLE_FRONT_ENDS[front_end](logits, **kwargs)


BAD_LOGITS = [
    # int32: a dtype JAX keeps (without x64 it turns float64 and int64 arrays into 32-bit ones)
    ("dtype", np.zeros((3, 11), np.int32), TypeError, "logits must have dtype in (float32, float16, bfloat16), "
                                                      "got int32"),
    ("rank", np.zeros(11, np.float32), ValueError, "logits must be [N, V] or [B, L, V], got shape (11,)"),
    ("V=0", np.zeros((2, 0), np.float32), ValueError, "logits must have a vocabulary dimension V >= 1"),
]


@pytest.mark.parametrize("front_end", list(SAMPLE_FRONT_ENDS))
@pytest.mark.parametrize("logits,exception,message", [c[1:] for c in BAD_LOGITS], ids=[c[0] for c in BAD_LOGITS])
def test_bad_logits_give_one_message_everywhere(front_end, logits, exception, message):
    with pytest.raises(exception, match=re.escape(message)):
        SAMPLE_FRONT_ENDS[front_end](logits)


def _torch_attention(q, k, v, **kwargs):
    tensors = {name: torch.from_numpy(value) for name, value in kwargs.items() if isinstance(value, np.ndarray)}
    return ops.attention(*(torch.from_numpy(t) for t in (q, k, v)), **{**kwargs, **tensors})


def _jax_attention(q, k, v, **kwargs):
    uj = pytest.importorskip("unmask.jax", reason="JAX is not installed")
    jnp = _jnp()
    arrays = {name: jnp.asarray(value) for name, value in kwargs.items() if isinstance(value, np.ndarray)}
    return uj.attention(*(jnp.asarray(t) for t in (q, k, v)), **{**kwargs, **arrays})


def _qkv(q_shape=(1, 4, 2, 8), kv_shape=(1, 5, 2, 8), dtype=np.float32):
    return np.zeros(q_shape, dtype), np.zeros(kv_shape, dtype), np.zeros(kv_shape, dtype)


BAD_ATTENTION = [
    ("rank", (np.zeros((4, 2, 8), np.float32), *_qkv()[1:]), {}, ValueError, "q must have 4 dimensions"),
    ("head dim", _qkv(kv_shape=(1, 5, 2, 4)), {}, ValueError, "k must have shape (1, 5, 2, 8)"),
    ("heads", _qkv(q_shape=(1, 4, 3, 8)), {}, ValueError, "q heads (3) must be a positive multiple of k/v heads (2)"),
    ("dtype", _qkv(dtype=np.int32), {}, TypeError, "q must have dtype in (float32, float16, bfloat16), got int32"),
    ("block_size", _qkv(), dict(block_size=0), ValueError, "block_size must be >= 1, got 0"),
    ("q_offset", _qkv(), dict(q_offset=-1), ValueError, "q_offset must be >= 0, got -1"),
    ("scale", _qkv(), dict(scale=float("nan")), ValueError, "scale must be finite, got nan"),
    ("kv_len shape", _qkv(), dict(kv_len=np.array([1, 2])), ValueError, "kv_len must have shape (1,) ([B])"),
    ("key_valid shape", _qkv(), dict(key_valid=np.ones((1, 4), bool)), ValueError,
     "key_valid must have shape (1, 5) ([B, Lk])"),
]


@pytest.mark.parametrize("front_end", ["torch", "jax"])
@pytest.mark.parametrize("qkv,kwargs,exception,message", [c[1:] for c in BAD_ATTENTION],
                         ids=[c[0] for c in BAD_ATTENTION])
def test_bad_attention_arguments_give_one_message_everywhere(front_end, qkv, kwargs, exception, message):
    attention = _torch_attention if front_end == "torch" else _jax_attention
    with pytest.raises(exception, match=re.escape(message)):
        attention(*qkv, **kwargs)


def _torch_commit(x, tokens, conf, eligible, **kwargs):
    return ops.commit(*(torch.from_numpy(a) for a in (x, tokens, conf, eligible)), **kwargs)


def _jax_commit(x, tokens, conf, eligible, **kwargs):
    uj = pytest.importorskip("unmask.jax", reason="JAX is not installed")
    return uj.commit(*(_jnp().asarray(a) for a in (x, tokens, conf, eligible)), **kwargs)


BAD_COMMIT = [
    ("no mode", {}, ValueError, "commit takes exactly one of k, threshold, factor, or k with threshold; got none"),
    ("two modes", dict(k=1, factor=0.5), ValueError, "commit takes exactly one of k, threshold, factor, or k with "
                                                     "threshold; got ['k', 'factor']"),
    ("three modes", dict(k=1, threshold=0.5, factor=0.5), ValueError, "got ['k', 'threshold', 'factor']"),
    ("floor negative", dict(k=-1, threshold=0.5), ValueError, "k must be >= 0, got -1"),
    ("k negative", dict(k=-1), ValueError, "k must be >= 0, got -1"),
    ("factor", dict(factor=0.0), ValueError, "factor must be > 0, got 0.0"),
    ("threshold nan", dict(threshold=float("nan")), ValueError, "threshold must be finite, got nan"),
]


@pytest.mark.parametrize("front_end", ["torch", "jax"])
@pytest.mark.parametrize("kwargs,exception,message", [c[1:] for c in BAD_COMMIT], ids=[c[0] for c in BAD_COMMIT])
def test_bad_commit_arguments_give_one_message_everywhere(front_end, kwargs, exception, message):
    canvas = np.zeros((2, 4), np.int32)
    args = (canvas, canvas, np.random.default_rng(0).random((2, 4), dtype=np.float32), np.ones((2, 4), bool))
    commit = _torch_commit if front_end == "torch" else _jax_commit
    with pytest.raises(exception, match=re.escape(message)):
        commit(*args, **kwargs)


# --------------------------------------------------------------------------- argument domains


def test_negative_counts_in_a_host_tensor_are_refused():
    with pytest.raises(ValueError, match="k must be >= 0, got a count of -2"):
        ops.commit(x, x, conf, eligible, k=torch.tensor([1, -2]))


def test_kv_len_beyond_the_keys_is_refused():
    with pytest.raises(ValueError, match=re.escape("kv_len must lie in [0, 6) (key counts, at most Lk), got values "
                                                   "in [9, 9]")):
        ops.attention(q, kv, kv, kv_len=torch.tensor([9]))
    assert ops.attention(q, kv, kv, kv_len=torch.tensor([5])).shape == q.shape  # Lk itself: every key


def test_rows_on_the_cpu_are_checked_even_unchecked():
    """check=False skips the NaN-row report (a synchronisation on a GPU), not the cheap
    check of CPU row ids, which would otherwise index out of bounds."""
    with pytest.raises(ValueError, match=re.escape("rows must lie in [0, 3)")):
        ops.sample(logits, rows=torch.tensor([0, 5]), check=False)


model = tiny_model()

BAD_GENERATE = [
    ("block_length does not divide", dict(gen_length=10, block_length=4), "block_length=4 must divide gen_length=10"),
    ("steps not a multiple of blocks", dict(gen_length=8, block_length=4, steps=3), "steps=3 must be a multiple"),
    ("two rules", dict(steps=8, factor=0.9), "at most one of steps, threshold, factor (or steps with threshold)"),
    ("three rules", dict(steps=8, threshold=0.5, factor=0.9), "got ['steps', 'threshold', 'factor']"),
    ("threshold and factor", dict(threshold=0.5, factor=0.9), "got ['threshold', 'factor']"),
    ("steps with threshold checks the threshold", dict(steps=8, threshold=1.5), "threshold=1.5 must lie in [0, 1)"),
    ("gen_length zero", dict(gen_length=0), "gen_length"),
    ("remasking", dict(remasking="confident"), "remasking"),
    ("temperature", dict(temperature=-0.1), "temperature"),
    ("cfg_scale", dict(cfg_scale=-1.0), "cfg_scale"),
    ("cfg_scale past its bound", dict(cfg_scale=1e308), "cfg_scale must be <= 100"),  # overflowed the guided logits
    ("conf_temperature", dict(conf_temperature=0.0), "conf_temperature must be > 0"),
    ("mask_id outside vocabulary", dict(mask_id=500, gen_length=4, block_length=4), "mask_id=500 lies outside"),
    ("seed", dict(seed=2**64), "seed"),
    ("threshold above one", dict(threshold=1.5), "threshold=1.5 must lie in [0, 1) for 'prob' confidence"),
    ("threshold one", dict(threshold=1.0), "threshold=1.0 must lie in [0, 1) for 'prob' confidence"),
    ("threshold negative margin", dict(threshold=-0.1, remasking="margin"), "threshold=-0.1 must lie in [0, 1)"),
    ("threshold entropy", dict(threshold=0.5, remasking="entropy"), "threshold=0.5 is never exceeded by 'entropy'"),
    ("eos is the mask", dict(eos_id=60), "eos_id and mask_id must differ, both are 60"),
    ("eos outside vocabulary", dict(eos_id=61), "eos_id=61 lies outside the model's vocabulary (V=61)"),
    ("an eos list holding the mask", dict(eos_id=[59, 60]), "eos_id and mask_id must differ, both are 60"),
    ("an eos list past the vocabulary", dict(eos_id=[59, 61]), "eos_id=61 lies outside the model's vocabulary"),
    ("an empty eos list", dict(eos_id=[]), "eos_id: an empty list stops at nothing"),
]


def _jax_generate(prompts, **kwargs):
    uj = pytest.importorskip("unmask.jax", reason="JAX is not installed")
    return uj.generate(uj.from_torch(model), prompts, **kwargs)


GENERATE_FRONT_ENDS = {"torch": lambda prompts, **kwargs: unmask.generate(model, prompts, **kwargs),
                       "jax": _jax_generate}


@pytest.mark.parametrize("kwargs,fragment", [
    (dict(revise_threshold=0.5), "revise_threshold does not take steps with threshold"),
    (dict(schedule="dream"), "schedule='dream' spreads the steps rule's commits; it does not apply with steps and "
                             "threshold"),
], ids=["revise", "dream schedule"])
@pytest.mark.parametrize("entry", ["generate", "infill"])
def test_steps_with_threshold_where_it_does_not_apply(kwargs, fragment, entry):
    with pytest.raises(ValueError, match=re.escape(fragment)):
        if entry == "generate":
            unmask.generate(model, [[1, 2, 3]], gen_length=8, block_length=8, steps=8, threshold=0.5, **kwargs)
        else:
            unmask.infill(model, torch.tensor([[1, 60, 60, 2]]), mask_id=60, steps=2, threshold=0.5, **kwargs)


@pytest.mark.parametrize("front_end", list(GENERATE_FRONT_ENDS))
@pytest.mark.parametrize("kwargs,fragment", [c[1:] for c in BAD_GENERATE], ids=[c[0] for c in BAD_GENERATE])
def test_bad_generate_arguments(front_end, kwargs, fragment):
    with pytest.raises(ValueError, match=re.escape(fragment)):
        GENERATE_FRONT_ENDS[front_end]([[1, 2, 3]], **kwargs)


@pytest.mark.parametrize("front_end", list(GENERATE_FRONT_ENDS))
def test_an_eos_given_as_text_is_refused(front_end):
    with pytest.raises(TypeError, match="eos_id must be an int, got str"):
        GENERATE_FRONT_ENDS[front_end]([[1, 2, 3]], eos_id=["</s>"])


@pytest.mark.parametrize("front_end", list(GENERATE_FRONT_ENDS))
def test_prompt_ids_outside_the_vocabulary(front_end):
    with pytest.raises(ValueError, match=re.escape("prompts must hold token ids in [0, 61) (the vocabulary), got ids "
                                                   "in [1, 75]")):
        GENERATE_FRONT_ENDS[front_end]([[1, 75]], gen_length=4, block_length=4)


def test_empty_prompt_list():
    with pytest.raises(ValueError, match="prompts"):
        unmask.generate(model, [])
    with pytest.raises(ValueError, match="empty batch"):
        unmask.generate(model, torch.empty(0, 3, dtype=torch.int64))


def test_prompt_with_mask_id_points_to_infill():
    with pytest.raises(ValueError, match="infill"):
        unmask.generate(model, [[1, model.mask_id, 2]], gen_length=4, block_length=4)


def test_model_without_mask_id_needs_one():
    with pytest.raises(ValueError, match="mask_id"):
        unmask.generate(lambda ids, attention_mask=None: torch.randn(*ids.shape, 5), [[1]], gen_length=4, block_length=4)


def test_model_returning_wrong_shape():
    with pytest.raises(ValueError, match="model must return logits"):
        unmask.generate(lambda ids, attention_mask=None: torch.randn(3, 5), [[1]], gen_length=4, block_length=4,
                        mask_id=2)


def test_nan_logits_from_the_model_are_reported():
    def nan_model(ids, attention_mask=None):
        return torch.full((*ids.shape, 9), float("nan"))

    with pytest.raises(ValueError, match="NaN"):
        unmask.generate(nan_model, [[1]], gen_length=4, block_length=4, mask_id=8)


def test_infill_block_length_must_divide():
    with pytest.raises(ValueError, match="block_length=3 must divide"):
        unmask.infill(model, torch.tensor([[1, 60, 60, 4]]), block_length=3)


def test_bad_backend_environment(monkeypatch):
    monkeypatch.setenv("UNMASK_BACKEND", "fastest")
    with pytest.raises(ValueError, match="UNMASK_BACKEND"):
        ops.sample(logits)


@pytest.mark.parametrize("fields,fragment", [
    (dict(d_model=30, n_heads=4), "multiple of n_heads"),
    (dict(n_heads=4, n_kv_heads=3), "multiple of n_kv_heads"),
    (dict(mask_token_id=100), "mask_token_id"),
    (dict(n_layers=0), "n_layers"),
])
def test_bad_model_config(fields, fragment):
    from tests.helpers import tiny_config

    with pytest.raises(ValueError, match=fragment):
        tiny_config(**fields)
