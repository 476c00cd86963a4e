"""unmask._C: params structs set field by field, enums that cannot be swapped with ints,
and launchers that refuse a bad field by name and value."""

import re

import pytest
import torch

from unmask import native, ops, validation
from tests.helpers import requires_cuda_build, requires_extension

pytestmark = requires_extension
_C = native._C


def sample_params(logits_buffer, tokens_buffer, conf_buffer, **overrides):
    fields = dict(
        logits=logits_buffer.data_ptr(), dtype=_C.ScalarType.float32, n_rows=logits_buffer.shape[0],
        vocab=logits_buffer.shape[1],
        select_rows=False, rows=0, n_selected=0, banned=0, n_banned=0, temperature=0.0, top_k=0, top_p=1.0,
        confidence=_C.ConfidenceKind.prob, conf_temperature=1.0, seed=0, offset=0, offsets=0, offsets_stride=0,
        tokens=tokens_buffer.data_ptr(), conf=conf_buffer.data_ptr(),
    )
    fields.update(overrides)
    return native._params(_C.SampleParams, **fields)


def buffers(rows=3, vocab=7):
    return torch.randn(rows, vocab), torch.empty(rows, dtype=torch.int64), torch.empty(rows)


def test_enums_are_the_validation_names():
    assert tuple(_C.ConfidenceKind.__members__) == validation.CONFIDENCE_KINDS
    assert tuple(_C.CommitMode.__members__) == validation.COMMIT_MODES
    assert tuple(_C.ScalarType.__members__) == validation.FLOAT_DTYPES


def test_every_field_must_be_given_by_name():
    logits, tokens, conf = buffers()
    with pytest.raises(TypeError, match=r"missing fields \['vocab'\]"):
        fields = {name: getattr(sample_params(logits, tokens, conf), name) for name in _C.SampleParams.FIELDS}
        del fields["vocab"]
        native._params(_C.SampleParams, **fields)
    with pytest.raises(TypeError, match=r"unknown fields \['vocabulary'\]"):
        sample_params(logits, tokens, conf, vocabulary=7)


def test_the_keyword_constructor_names_a_field_of_the_wrong_type():
    logits, tokens, conf = buffers()
    with pytest.raises(TypeError, match=r"SampleParams\.confidence: cannot take 2 \(a int\)"):
        sample_params(logits, tokens, conf, confidence=2)
    with pytest.raises(TypeError, match=r"SampleParams\.n_rows: cannot take 2\.5 \(a float\)"):
        sample_params(logits, tokens, conf, n_rows=2.5)
    for not_a_bool in (None, 2, 1.0):
        with pytest.raises(TypeError, match=r"SampleParams\.select_rows: cannot take"):
            sample_params(logits, tokens, conf, select_rows=not_a_bool)
    with pytest.raises(TypeError, match=r"SampleParams\.n_rows: cannot take True"):
        sample_params(logits, tokens, conf, n_rows=True)
    with pytest.raises(TypeError, match=r"SampleParams\.logits: cannot take True"):
        sample_params(logits, tokens, conf, logits=True)
    with pytest.raises(TypeError, match=r"SampleParams\.logits: cannot take -1"):
        sample_params(logits, tokens, conf, logits=-1)
    assert sample_params(logits, tokens, conf, temperature=1).temperature == 1.0  # an int for a float field
    with pytest.raises(TypeError, match=r"AttentionParams: missing fields \['batch',"):
        _C.AttentionParams(q=0)


def test_an_int_is_not_an_enum():
    params = _C.SampleParams()
    with pytest.raises(TypeError):
        params.confidence = 2
    with pytest.raises(TypeError):
        params.dtype = _C.ConfidenceKind.entropy  # the enum of another field
    with pytest.raises(TypeError):
        params.n_rows = 2.5


def test_a_bound_struct_shows_its_fields():
    logits, tokens, conf = buffers()
    text = repr(sample_params(logits, tokens, conf, seed=9))
    assert text.startswith("SampleParams(") and "seed=9" in text and "confidence=<ConfidenceKind.prob" in text


@pytest.mark.parametrize("overrides,message", [
    (dict(vocab=0), "params.vocab = 0 must be >= 1"),
    (dict(n_rows=-2), "params.n_rows = -2 must be >= 0"),
    (dict(top_p=1.5), "params.top_p = 1.5 must lie in (0, 1]"),
    (dict(conf_temperature=1e-35), "params.conf_temperature"),
    (dict(temperature=float("nan")), "params.temperature = nan must be finite"),
    (dict(select_rows=True, n_selected=2), "params.rows = 0 must not be null when n_selected > 0"),
    (dict(tokens=0), "params.tokens = 0 must not be null"),
    (dict(offsets_stride=2), "params.offsets_stride = 2 must be 0 or 1"),
])
def test_launcher_names_the_field_and_value(overrides, message):
    logits, tokens, conf = buffers()
    with pytest.raises(ValueError, match=re.escape("unmask._C.sample_cpu: " + message)):
        _C.sample_cpu(sample_params(logits, tokens, conf, **overrides))


def test_rows_and_banned_ids_are_checked_before_anything_is_written():
    logits, tokens, conf = buffers()
    tokens.fill_(-7)
    bad_rows = torch.tensor([0, 3], dtype=torch.int64)
    with pytest.raises(ValueError, match=r"params.rows\[i\] = 3 must lie in \[0, n_rows\)"):
        _C.sample_cpu(sample_params(logits, tokens, conf, select_rows=True, rows=bad_rows.data_ptr(), n_selected=2))
    assert (tokens == -7).all(), "a refused call writes nothing"
    outside = torch.tensor([5, 7], dtype=torch.int64)
    with pytest.raises(ValueError, match=r"params.banned\[i\] = 7 must lie in \[0, vocab\)"):
        _C.sample_cpu(sample_params(logits, tokens, conf, banned=outside.data_ptr(), n_banned=2))
    assert (tokens == -7).all()


def test_banned_ids_in_any_order():
    logits, tokens, conf = buffers(rows=4, vocab=9)
    logits[:, 6] = 50.0  # the argmax, unless banned
    logits[:, 2] = 40.0
    banned = torch.tensor([6, 1, 6, 0], dtype=torch.int64)  # unsorted, repeated
    _C.sample_cpu(sample_params(logits, tokens, conf, banned=banned.data_ptr(), n_banned=4))
    assert tokens.tolist() == [2, 2, 2, 2]


def test_custom_ops_take_int32_indices():
    """torch.ops.unmask.* called directly (not through unmask.ops) with int32 ids: the
    backends widen them, never read them as int64."""
    logits = torch.randn(6, 40)
    tokens, _ = torch.ops.unmask.sample(logits, 0.0, 0, 1.0, torch.tensor([3], dtype=torch.int32), "prob", 1.0, 0,
                                        0, None, torch.tensor([1, 4], dtype=torch.int32), False)
    assert tokens[[0, 2, 3, 5]].tolist() == [-1] * 4 and (tokens[[1, 4]] >= 0).all()
    tokens, _ = torch.ops.unmask.sample(logits, 1.0, 0, 1.0, None, "prob", 1.0, 9, 0, torch.tensor(5, dtype=torch.int32),
                                        None, False)
    assert torch.equal(tokens, ops.sample(logits, temperature=1.0, seed=9, offset=5)[0])
    canvas = torch.zeros(1, 4, dtype=torch.int64)
    committed = torch.ops.unmask.commit(canvas, torch.ones(1, 4, dtype=torch.int64), torch.rand(1, 4),
                                        torch.ones(1, 4, dtype=torch.bool), torch.tensor([1], dtype=torch.int32),
                                        None, None)
    assert int(committed.sum()) == 1


def test_empty_row_selection_samples_nothing():
    """An empty index tensor has a null data pointer: select_rows, not the pointer, says
    that a subset was asked for (the bug was: every row sampled)."""
    logits, tokens, conf = buffers()
    _C.sample_cpu(sample_params(logits, tokens, conf, select_rows=True, rows=0, n_selected=0))
    assert (tokens == -1).all() and torch.isneginf(conf).all()


@requires_cuda_build
def test_unsupported_case_raises_not_implemented_with_the_field():
    logits, tokens, conf = buffers()
    extras = native._params(_C.SampleCudaExtras, workspace=0, workspace_bytes=0)
    with pytest.raises(NotImplementedError, match="params.top_k = 5"):
        _C.sample_cuda(sample_params(logits, tokens, conf, top_k=5), extras=extras, stream=0)


def test_commit_and_attention_launchers_name_their_fields():
    canvas = torch.zeros(2, 4, dtype=torch.int64)
    params = native._params(_C.CommitParams, canvas=canvas.data_ptr(), tokens=canvas.data_ptr(), conf=0,
                            conf_f64=0, eligible=0, committed=0, batch=2, length=4, mode=_C.CommitMode.count, k=0,
                            threshold=0.0, factor=0.0)
    with pytest.raises(ValueError, match="params.conf = 0 exactly one of conf and conf_f64 must be set"):
        _C.commit_cpu(params)
    attention = _C.AttentionParams()
    attention.batch, attention.q_len, attention.q_heads, attention.kv_heads, attention.head_dim = 1, 2, 3, 2, 8
    with pytest.raises(ValueError, match="params.q_heads = 3 must be a positive multiple of kv_heads"):
        _C.attention_cpu(attention)


def test_negative_counts_commit_nothing_in_the_kernel():
    """A count on the device cannot be checked without a synchronisation: the kernels read
    a negative one as zero."""
    canvas = torch.full((2, 4), -1, dtype=torch.int64)
    tokens = torch.arange(8).reshape(2, 4)
    conf = torch.rand(2, 4)
    eligible = torch.ones(2, 4, dtype=torch.bool)
    counts = torch.tensor([-3, 2])
    committed = torch.ones(2, 4, dtype=torch.bool)
    _C.commit_cpu(native._params(
        _C.CommitParams, canvas=canvas.data_ptr(), tokens=tokens.data_ptr(), conf=conf.data_ptr(),
        conf_f64=0, eligible=eligible.data_ptr(), committed=committed.data_ptr(), batch=2, length=4, mode=_C.CommitMode.count,
        k=counts.data_ptr(), threshold=0.0, factor=0.0))
    assert committed.sum(dim=1).tolist() == [0, 2] and (canvas[0] == -1).all()
