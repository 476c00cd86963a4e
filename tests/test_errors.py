"""Bad input raises a clear ValueError or TypeError that names the argument."""

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
    ("sample rows range", lambda: ops.sample(logits, rows=torch.tensor([3])), ValueError, "rows"),
    ("sample rows dtype", lambda: ops.sample(logits, rows=torch.tensor([0.0])), TypeError, "rows"),
    ("sample NaN logits", lambda: ops.sample(torch.full((2, 3), float("nan"))), ValueError, "NaN"),
    ("commit no mode", lambda: ops.commit(x, x, conf, eligible), ValueError, "exactly one of k, threshold, factor"),
    ("commit two modes", lambda: ops.commit(x, x, conf, eligible, k=1, threshold=0.5), ValueError, "exactly one"),
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
    with pytest.raises(exception, match=fragment):
        call()


model = tiny_model()

BAD_GENERATE = [
    ("block_length does not divide", dict(gen_length=10, block_length=4), "block_length=4 must divide gen_length=10"),
    ("steps not a multiple of blocks", dict(gen_length=8, block_length=4, steps=3), "steps=3 must be a multiple"),
    ("two rules", dict(steps=8, threshold=0.9), "at most one of steps, threshold, factor"),
    ("gen_length zero", dict(gen_length=0), "gen_length"),
    ("remasking", dict(remasking="confident"), "remasking"),
    ("temperature", dict(temperature=-0.1), "temperature"),
    ("cfg_scale", dict(cfg_scale=-1.0), "cfg_scale"),
    ("mask_id outside vocabulary", dict(mask_id=500, gen_length=4, block_length=4), "mask_id=500 lies outside"),
    ("seed", dict(seed=2**64), "seed"),
]


@pytest.mark.parametrize("kwargs,fragment", [c[1:] for c in BAD_GENERATE], ids=[c[0] for c in BAD_GENERATE])
def test_bad_generate_arguments(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        unmask.generate(model, [[1, 2, 3]], **kwargs)


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
