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
    monkeypatch.setattr(dispatch, "TORCH", {name: recorded(entry) for name, entry in dispatch.TORCH.items()})
    return record


def _attention_args(head_dim, q_len=5, dtype=torch.float32, heads=2, **kwargs):
    q = torch.randn(1, q_len, heads, head_dim).to(dtype)
    return (q, q.clone(), q.clone()), kwargs


def _moe_args(tokens, dtype, n_experts=8, per_token=2, dim=24, hidden=8):
    experts = torch.stack([torch.randperm(n_experts)[:per_token] for _ in range(tokens)])
    return (torch.randn(tokens, dim).to(dtype), experts, torch.rand(tokens, per_token),
            *(torch.randn(n_experts, *shape).to(dtype) for shape in ((hidden, dim), (hidden, dim), (dim, hidden))))


CPU_CASES = [
    # (kernel, args, kwargs, the backend expected: "cpu" for the native kernel)
    ("attention", *_attention_args(64, q_len=1024), "cpu"),  # float32, 2^27 multiply-adds: native
    ("attention", *_attention_args(64), "cpu"),  # a small call: the native kernel's fixed cost is lower
    ("attention", *_attention_args(64, q_len=256, heads=16), "cpu"),  # 2^26 multiply-adds, 256 rows over 256 keys
    ("attention", *_attention_args(64, q_len=64, heads=16), "torch-sdpa"),  # 2^22, unmasked over 64 keys: SDPA
    ("attention", *_attention_args(16, q_len=1024, heads=8), "cpu"),  # D = 16, 2^27 multiply-adds
    # bfloat16: native on a CPU without AMX and under the amx build; SDPA (on AMX tiles) under another build
    ("attention", *_attention_args(64, q_len=512, dtype=torch.bfloat16),
     "cpu" if native.available() and (native.cpu_isa() == "amx" or not native.cpu_has_amx()) else "torch-sdpa"),
    ("attention", *_attention_args(1025), "torch-sdpa"),  # D > 1024: not the CPU kernel's tiles
    ("attention", *_attention_args(32, q_len=96, heads=16, block_size=4), "torch-sdpa"),  # block-causal, finite
    ("sample", (torch.randn(4, 50),), dict(top_k=3, top_p=0.5, temperature=1.0), "cpu"),
    ("commit", (torch.zeros(2, 5, dtype=torch.int32), torch.ones(2, 5, dtype=torch.int64), torch.rand(2, 5),
                torch.ones(2, 5, dtype=torch.bool)), dict(k=2), "cpu"),  # an int32 canvas, through an int64 copy
    ("moe_swiglu", _moe_args(16, torch.bfloat16), {}, "cpu"),  # 4 pairs per expert: the kernel
    ("moe_swiglu", _moe_args(128, torch.bfloat16), {}, "cpu"),  # 32 per expert: still the kernel
    ("moe_swiglu", _moe_args(16, torch.float64), {}, "torch-experts"),  # float64: not the kernel's
]


@pytest.mark.skipif(not native.available(), reason="unmask._C not built")
@pytest.mark.parametrize("kernel,args,kwargs,expected", CPU_CASES,
                         ids=["attention native", "attention small", "attention 256 queries", "attention 64 keys",
                              "attention D=16 native",
                              "attention bf16", "attention D=1025", "attention block-causal", "sample top-k top-p",
                              "commit int32 canvas", "moe few per expert", "moe many per expert", "moe float64"])
def test_reported_backend_is_the_one_that_ran(monkeypatch, ran, kernel, args, kwargs, expected):
    monkeypatch.setattr(native, "cpu_vendor", lambda: "GenuineIntel")  # the routes the cases name
    reported = ops.backend_for(kernel, *args, **kwargs)
    assert reported.split(":")[0] == expected
    getattr(ops, kernel)(*args, **kwargs)
    assert ran == [reported]


def test_sdpa_is_not_preferred_under_a_block_mask_with_non_finite_keys(monkeypatch):
    """SDPA adds the mask to the scores, so NaN in a key that the block-causal mask hides
    from some queries would reach them: the native kernel takes that call (the shapes are
    SDPA's by the rule for Intel CPUs)."""
    monkeypatch.setattr(native, "cpu_vendor", lambda: "GenuineIntel")
    (q, k, v), _ = _attention_args(32, q_len=96, heads=16)  # SDPA's: 48K key elements over fewer than 128 keys
    k[0, 4, 1] = float("nan")  # in block 1: seen by queries 4 on, hidden from queries 0-3
    assert ops.backend_for("attention", q, k, v, block_size=4).startswith("cpu:")
    assert ops.backend_for("attention", q, k, v) == "torch-sdpa"  # every query sees key 4: NaN rows anyway
    assert ops.backend_for("attention", q, k, v, block_size=4, q_offset=4) == "torch-sdpa"  # all see it
    hidden = torch.ones(1, 96, dtype=torch.bool)
    hidden[0, 4] = False  # key 4 hidden by key_valid: zeroed, never read
    few = q[:, :6]  # 6 queries in blocks 0 and 1: with a key mask, fewer than 8 query rows still prefer SDPA
    assert ops.backend_for("attention", few, k, v, key_valid=hidden, block_size=4) == "torch-sdpa"
    k[0, 2, 0] = float("nan")  # in block 0, which every query sees
    assert ops.backend_for("attention", few, k, v, key_valid=hidden, block_size=4) == "torch-sdpa"
    assert ops.backend_for("attention", q, k, v, key_valid=hidden).startswith("cpu:")  # 96 masked queries


def _meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, dtype=dtype, device="meta")


# Every case the CUDA table sends to the reference, with the reason it gives (checked on
# meta tensors: the predicates read shapes and dtypes only).
CUDA_FALLBACKS = [
    ("sample", (_meta(4, 100),), dict(top_k=5, temperature=1.0), "top_k"),
    ("sample", (_meta(4, 100),), dict(top_p=0.9), "top_p"),
    ("commit", (_meta(2, 4097, dtype=torch.int64), _meta(2, 4097, dtype=torch.int64), _meta(2, 4097),
                _meta(2, 4097, dtype=torch.bool)), dict(threshold=0.5), "4097 positions"),
    ("attention", (_meta(1, 8, 2, 64),) * 3, dict(block_size=4), "dtype float32"),
    ("attention", (_meta(1, 8, 2, 96, dtype=torch.bfloat16),) * 3, dict(block_size=4), "head_dim=96"),
]
# Attention the CUDA kernel does not take runs in torch SDPA when no block-causal mask asks
# for a check of the keys (SDPA would spread a hidden non-finite key).
CUDA_TO_SDPA = [
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


@pytest.mark.parametrize("kernel,args,kwargs,reason,expected",
                         [(*c, "reference") for c in CUDA_FALLBACKS] + [(*c, "torch-sdpa") for c in CUDA_TO_SDPA],
                         ids=[f"{c[3]} -> reference" for c in CUDA_FALLBACKS] + [f"{c[3]} -> sdpa" for c in CUDA_TO_SDPA])
def test_cuda_table_sends_calls_it_does_not_take_elsewhere(cuda_table_on_meta, monkeypatch, kernel, args, kwargs,
                                                           reason, expected):
    assert ops.backend_for(kernel, *args, **kwargs) == expected
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


def test_eager_calls_run_the_custom_ops_body_directly(monkeypatch):
    """Without a gradient to record, torch.compile or a dispatch mode, ops.* skip the
    custom op's wrapping and run its body: the same backend, the same results. A call
    that records a gradient, or one under a dispatch mode (tracing, FLOP counting), still
    goes through the custom op."""
    from torch.utils._python_dispatch import TorchDispatchMode

    through_op = []
    original = ops._attention_op
    monkeypatch.setattr(ops, "_attention_op", lambda *args: through_op.append(1) or original(*args))
    q = torch.randn(1, 40, 2, 16)
    k, v = torch.randn(1, 40, 1, 16), torch.randn(1, 40, 1, 16)
    eager = ops.attention(q, k, v, block_size=8)
    assert through_op == []
    assert torch.equal(eager, torch.ops.unmask.attention(q, k, v, None, None, 8, 0, 16**-0.5))

    class Passthrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Passthrough():
        assert torch.equal(ops.attention(q, k, v, block_size=8), eager)
    assert through_op == [1]
    q.requires_grad_()
    ops.attention(q, k, v, block_size=8).sum().backward()
    assert through_op == [1, 1] and q.grad is not None
    with torch.no_grad():
        ops.attention(q, k, v, block_size=8)
    assert through_op == [1, 1]

    logits = torch.randn(3, 50)
    tokens, conf = ops.sample(logits, temperature=1.0, seed=5)
    op_tokens, op_conf = torch.ops.unmask.sample(logits, 1.0, 0, 1.0, None, "prob", 1.0, 5, 0, None, None, True)
    assert torch.equal(tokens, op_tokens) and torch.equal(conf, op_conf)

    canvas, op_canvas = torch.zeros(3, 50, dtype=torch.int64), torch.zeros(3, 50, dtype=torch.int64)
    proposals, confidence = torch.randint(1, 9, (3, 50)), torch.rand(3, 50)
    eligible = torch.rand(3, 50) > 0.3
    committed = ops.commit(canvas, proposals, confidence, eligible, k=2)
    op_committed = torch.ops.unmask.commit(op_canvas, proposals, confidence, eligible, torch.full((3,), 2), None, None)
    assert torch.equal(committed, op_committed) and torch.equal(canvas, op_canvas)
    assert int(committed.sum()) == 6
