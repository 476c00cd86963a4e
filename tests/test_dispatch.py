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


# --------------------------------------------------------------------------- the kernel table


@pytest.fixture
def ran(monkeypatch):
    """Every backend wrapped so that running it records its name: what ran, in order."""
    import dataclasses

    from unmask import dispatch

    record = []

    def recorded(backend):
        def launch(call, out=None):
            record.append(backend.name)
            return backend.launch(call, out=out)
        return dataclasses.replace(backend, launch=launch)

    native_table = {key: recorded(entry) for key, entry in native.kernels().items()}
    monkeypatch.setattr(native, "kernels", lambda: native_table)
    monkeypatch.setattr(dispatch, "REFERENCE", {name: recorded(entry) for name, entry in dispatch.REFERENCE.items()})
    return record


def _attention_args(head_dim):
    q = torch.randn(1, 5, 2, head_dim)
    return (q, q.clone(), q.clone()), {}


CPU_CASES = [
    # (kernel, args, kwargs, native expected)
    ("attention", *_attention_args(64), True),
    ("attention", *_attention_args(1025), False),  # D > 1024: the CPU kernel's tiles
    ("sample", (torch.randn(4, 50),), dict(top_k=3, top_p=0.5, temperature=1.0), True),
    ("commit", (torch.zeros(2, 5, dtype=torch.int32), torch.ones(2, 5, dtype=torch.int64), torch.rand(2, 5),
                torch.ones(2, 5, dtype=torch.bool)), dict(k=2), True),  # an int32 canvas, through an int64 copy
]


@pytest.mark.skipif(not native.available(), reason="unmask._C not built")
@pytest.mark.parametrize("kernel,args,kwargs,native_expected", CPU_CASES,
                         ids=["attention D=64", "attention D=1025", "sample top-k top-p", "commit int32 canvas"])
def test_reported_backend_is_the_one_that_ran(ran, kernel, args, kwargs, native_expected):
    reported = ops.backend_for(kernel, *args, **kwargs)
    assert (reported != "reference") == native_expected
    getattr(ops, kernel)(*args, **kwargs)
    assert ran == [reported]


def _meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, dtype=dtype, device="meta")


# Every case the CUDA table sends to the reference, with the reason it gives (checked on
# meta tensors: the predicates read shapes and dtypes only).
CUDA_FALLBACKS = [
    ("sample", (_meta(4, 100),), dict(top_k=5, temperature=1.0), "top_k"),
    ("sample", (_meta(4, 100),), dict(top_p=0.9), "top_p"),
    ("commit", (_meta(2, 4097, dtype=torch.int64), _meta(2, 4097, dtype=torch.int64), _meta(2, 4097),
                _meta(2, 4097, dtype=torch.bool)), dict(threshold=0.5), "4097 positions"),
    ("attention", (_meta(1, 8, 2, 64),) * 3, {}, "dtype float32"),
    ("attention", (_meta(1, 8, 2, 96, dtype=torch.bfloat16),) * 3, {}, "head_dim=96"),
    ("attention", (_meta(1, 2**23, 32, 64, dtype=torch.bfloat16), _meta(1, 8, 1, 64, dtype=torch.bfloat16),
                   _meta(1, 8, 1, 64, dtype=torch.bfloat16)), {}, "gridDim.y"),
]
CUDA_TAKES = [
    ("sample", (_meta(4, 100),), dict(top_k=100, temperature=1.0)),  # top_k >= V filters nothing
    ("commit", (_meta(2, 4096, dtype=torch.int64), _meta(2, 4096, dtype=torch.int64), _meta(2, 4096),
                _meta(2, 4096, dtype=torch.bool)), dict(threshold=0.5)),
    ("attention", (_meta(1, 8, 2, 128, dtype=torch.float16),) * 3, {}),
]


@pytest.fixture
def cuda_table_on_meta(monkeypatch):
    """The CUDA backends registered for meta tensors: choose() consults their predicates."""
    table = {(entry.kernel, "meta"): entry for entry in native.KERNELS if entry.device_type == "cuda"}
    monkeypatch.setattr(native, "kernels", lambda: table)


@pytest.mark.parametrize("kernel,args,kwargs,reason", CUDA_FALLBACKS, ids=[c[3] for c in CUDA_FALLBACKS])
def test_cuda_table_sends_unsupported_calls_to_the_reference(cuda_table_on_meta, monkeypatch, kernel, args, kwargs,
                                                             reason):
    assert ops.backend_for(kernel, *args, **kwargs) == "reference"
    assert reason in ops.fallback_reason(kernel, *args, **kwargs)
    monkeypatch.setenv("UNMASK_BACKEND", "native")
    with pytest.raises(NotImplementedError, match="UNMASK_BACKEND=native"):
        ops.backend_for(kernel, *args, **kwargs)


@pytest.mark.parametrize("kernel,args,kwargs", CUDA_TAKES, ids=[c[0] for c in CUDA_TAKES])
def test_cuda_table_takes_supported_calls(cuda_table_on_meta, kernel, args, kwargs):
    assert ops.backend_for(kernel, *args, **kwargs) == "cuda"  # the CUDA entry, consulted for meta tensors
    assert ops.fallback_reason(kernel, *args, **kwargs) is None


def test_no_native_kernel_for_a_device_takes_the_reference(monkeypatch):
    assert ops.backend_for("sample", _meta(2, 10)) == "reference"
    assert "no native sample kernel for meta" in ops.fallback_reason("sample", _meta(2, 10))
    monkeypatch.setenv("UNMASK_BACKEND", "native")
    with pytest.raises(NotImplementedError, match="no native sample kernel"):
        ops.backend_for("sample", _meta(2, 10))


def test_backend_for_checks_the_call_like_the_op():
    with pytest.raises(ValueError, match="top_p must lie in"):
        ops.backend_for("sample", torch.randn(2, 5), top_p=2.0)
    with pytest.raises(ValueError, match="kernel must be one of"):
        ops.backend_for("softmax", torch.randn(2, 5))


@pytest.mark.skipif(not native.available(), reason="unmask._C not built")
def test_each_cuda_launcher_runs_under_its_device_guard():
    """The CUDA backends make the call's device current (workspace, SM count, launch)."""
    for entry in native.KERNELS:
        assert (entry.guard is native._cuda_guard) == (entry.device_type == "cuda"), entry
