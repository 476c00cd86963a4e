"""Dispatch and torch.compile: the custom ops trace whole and pick a backend per device."""

import pytest
import torch

import unmask
from unmask import native, ops, reference


def sampler_step(logits, canvas, eligible):
    tokens, conf = ops.sample(logits, temperature=0.7, top_k=8, seed=3, offset=1)
    return ops.commit(canvas, tokens, conf, eligible, k=2)


def test_compiled_sampler_step_equals_eager():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 33, generator=gen)
    eligible = torch.rand(2, 6, generator=gen) > 0.3
    eager_canvas = torch.full((2, 6), -1, dtype=torch.int64)
    compiled_canvas = eager_canvas.clone()
    expected = sampler_step(logits, eager_canvas, eligible)
    compiled = torch.compile(sampler_step, fullgraph=True, backend="eager")
    got = compiled(logits, compiled_canvas, eligible)
    assert torch.equal(got, expected)
    assert torch.equal(compiled_canvas, eager_canvas)


def test_compiled_attention_equals_eager():
    q, k, v = torch.randn(1, 5, 4, 8), torch.randn(1, 7, 2, 8), torch.randn(1, 7, 2, 8)
    valid = torch.tensor([[True] * 5 + [False] * 2])
    compiled = torch.compile(lambda q, k, v: ops.attention(q, k, v, key_valid=valid, block_size=3), fullgraph=True,
                             backend="eager")
    torch.testing.assert_close(compiled(q, k, v), reference.attention(q, k, v, key_valid=valid, block_size=3))


def test_ops_are_registered_custom_ops():
    assert hasattr(torch.ops.unmask, "attention")
    assert hasattr(torch.ops.unmask, "sample")
    assert hasattr(torch.ops.unmask, "commit")


def test_backend_environment_forces_the_reference(monkeypatch):
    logits = torch.randn(3, 9)
    assert ops.backend_for("sample", logits) == f"cpu:{native.cpu_isa()}"
    monkeypatch.setenv("UNMASK_BACKEND", "reference")
    assert ops.backend_for("sample", logits) == "reference"
    assert ops.fallback_reason("sample", logits) == "UNMASK_BACKEND=reference"


def test_public_api():
    for name in ("generate", "infill", "from_pretrained", "ops", "reference", "ModelConfig"):
        assert hasattr(unmask, name)


def test_attention_strides_match_its_fake():
    """torch.compile plans with the fake's strides: the real op must return the same
    (contiguous) layout, also for head-major q and on the reference path."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    q = torch.randn(2, 4, 5, 16).transpose(1, 2)  # [B, L, H, D] stored head-major
    k, v = torch.randn(2, 5, 2, 16), torch.randn(2, 5, 2, 16)
    args = (None, None, 0, 0, 0.25)
    for backend in ("reference", "native"):
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("UNMASK_BACKEND", backend)
            out = torch.ops.unmask.attention(q, k, v, *args)
        assert out.is_contiguous(), backend
    with FakeTensorMode() as mode:
        fake = torch.ops.unmask.attention(mode.from_tensor(q), mode.from_tensor(k), mode.from_tensor(v), *args)
    assert fake.stride() == out.stride()
