"""Plans (unmask.dispatch): a call whose signature was decided before runs the launch the
native backend prepared for it, skipping the checks and the decision. It must give what
the unplanned route gives, bit for bit, and must never stand in for a call the route
would refuse or send elsewhere."""

import dataclasses

import pytest
import torch

from unmask import dispatch, native, ops, validation
from tests.helpers import MASKS, make_masks, random_inputs

pytestmark = pytest.mark.skipif(not native.available(), reason="unmask._C not built")


@pytest.fixture
def route_calls(monkeypatch):
    """How many calls went through the checks and the decision, by kernel."""
    counts = {}

    def counted(kernel, function):
        def wrapper(*args, **kwargs):
            counts[kernel] = counts.get(kernel, 0) + 1
            return function(*args, **kwargs)
        return wrapper

    for kernel, name in (("attention", "attention_call"), ("rms_norm", "rms_norm_call"), ("rotary", "rotary_call")):
        monkeypatch.setattr(validation, name, counted(kernel, getattr(validation, name)))
    return counts


def native_route(kernel, *args, **kwargs):
    """What the unplanned route runs for the call: its checks, then the native CPU backend
    (ops.CALL_BUILDERS holds the checks themselves, not route_calls' counters)."""
    call = ops.CALL_BUILDERS[kernel](*args, **kwargs)
    return native.kernels()[(kernel, "cpu")](call)


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("q_len,k_len,q_heads,kv_heads,head_dim", [(1, 77, 4, 4, 32), (17, 99, 6, 2, 16),
                                                                     (32, 130, 2, 1, 64)])
def test_planned_attention_equals_the_route(route_calls, mask, dtype, q_len, k_len, q_heads, kv_heads, head_dim):
    with dispatch.forced("native"):  # every shape here, whatever SDPA's rule
        for seed in range(4):  # the first call plans; the others run the plan on new data
            q, k, v, gen = random_inputs(2, q_len, k_len, q_heads, kv_heads, head_dim, dtype, seed=seed)
            masks = make_masks(mask, 2, k_len, gen)
            assert torch.equal(ops.attention(q, k, v, **masks), native_route("attention", q, k, v, **masks)), seed
    assert route_calls["attention"] == 1


def test_planned_pointwise_kernels_equal_the_route(route_calls):
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        for _ in range(3):
            x = torch.randn(3, 17, 40, generator=gen).to(dtype)
            weight = torch.randn(40, generator=gen).to(dtype)
            rotated = torch.randn(2, 17, 3, 24, generator=gen).to(dtype)
            cos, sin = torch.randn(2, 2, 17, 1, 24, generator=gen).unbind(0)
            assert torch.equal(ops.rms_norm(x, weight, 1e-5), native_route("rms_norm", x, weight, 1e-5))
            assert torch.equal(ops.rotary(rotated, cos, sin), native_route("rotary", rotated, cos, sin))
    assert route_calls == {"rms_norm": 2, "rotary": 2}  # one per dtype


def test_a_planned_call_reads_its_own_views():
    """A view of a larger tensor (rows of a cache) has the signature of any such view: the
    plan takes each call's addresses, not the first one's."""
    gen = torch.Generator().manual_seed(1)
    cache = torch.randn(1, 300, 4, 32, generator=gen)
    q = torch.randn(1, 8, 4, 32, generator=gen)
    with dispatch.forced("native"):
        for start in (0, 100, 200, 0):
            k, v = cache[:, start:start + 90], cache[:, start + 10:start + 100]
            assert torch.equal(ops.attention(q, k, v), native_route("attention", q, k, v)), start


def test_a_planned_call_still_checks_kv_len_values(route_calls):
    q, k, v, _ = random_inputs(2, 8, 64, 2, 2, 16, torch.float32, seed=0)
    with dispatch.forced("native"):
        ops.attention(q, k, v, kv_len=torch.tensor([64, 10]))
        with pytest.raises(ValueError, match="kv_len"):
            ops.attention(q, k, v, kv_len=torch.tensor([65, 10]))
        with pytest.raises(ValueError, match="kv_len"):
            ops.attention(q, k, v, kv_len=torch.tensor([-1, 10]))
    assert route_calls["attention"] == 1  # the refusals came from the plan's own check


@pytest.mark.parametrize("changed", ["block_size=True", "q_offset=1.0", "dtype", "strides", "heads", "key_valid dtype"])
def test_a_different_signature_takes_the_route(route_calls, changed):
    """Arguments equal as dict keys but not as arguments (True == 1, 1.0 == 1), or a
    different dtype, layout or shape: the checks and the decision run again."""
    q, k, v, _ = random_inputs(1, 8, 64, 2, 2, 16, torch.float32, seed=0)
    valid = torch.ones(1, 64, dtype=torch.bool)
    with dispatch.forced("native"):
        ops.attention(q, k, v, block_size=1, q_offset=1, key_valid=valid)
        arguments = dict(q=q, k=k, v=v, block_size=1, q_offset=1, key_valid=valid)
        if changed == "block_size=True":
            arguments["block_size"] = True
        elif changed == "q_offset=1.0":
            arguments["q_offset"] = 1.0
        elif changed == "dtype":
            arguments.update(q=q.double(), k=k.double(), v=v.double())
        elif changed == "strides":
            arguments["k"] = k.transpose(1, 2).contiguous().transpose(1, 2)
        elif changed == "heads":
            arguments["q"] = torch.randn(1, 8, 4, 16)
        else:
            arguments["key_valid"] = valid.to(torch.uint8)
        q, k, v = arguments.pop("q"), arguments.pop("k"), arguments.pop("v")
        if changed in ("block_size=True", "q_offset=1.0", "dtype", "key_valid dtype"):
            with pytest.raises(TypeError):
                ops.attention(q, k, v, **arguments)
        else:
            assert torch.equal(ops.attention(q, k, v, **arguments), native_route("attention", q, k, v, **arguments))
    assert route_calls["attention"] >= 2


def test_the_backend_mode_and_instruction_set_are_part_of_the_plan(route_calls, monkeypatch):
    q, k, v, _ = random_inputs(1, 8, 64, 2, 2, 16, torch.float32, seed=0)
    with dispatch.forced("native"):
        ops.attention(q, k, v)
    ran = []
    monkeypatch.setitem(dispatch.REFERENCE, "attention", dataclasses.replace(
        dispatch.REFERENCE["attention"], launch=lambda call, out=None: ran.append("reference") or call.q))
    with dispatch.forced("reference"):
        ops.attention(q, k, v)
    assert ran == ["reference"]
    lower = [isa for isa in native.runnable_cpu_isas() if isa != native.cpu_isa()]
    if lower:
        with native.cpu_isa_forced(lower[-1]), dispatch.forced("native"):
            before = route_calls["attention"]
            ops.attention(q, k, v)
            assert route_calls["attention"] == before + 1


def test_a_plan_is_kept_under_the_mode_it_was_decided_in(monkeypatch):
    """The mode is read once per routed call: another thread switching UNMASK_BACKEND
    between the decision and the keeping used to file a native launch under "reference",
    which later reference calls then replayed."""
    q, k, v, _ = random_inputs(1, 8, 64, 2, 2, 16, torch.float32, seed=1)
    modes = iter(["native", "reference", "reference", "reference"])
    monkeypatch.setattr(dispatch, "backend_mode", lambda: next(modes))
    ops.attention(q, k, v, q_offset=3)
    kept = [key[2] for key in dispatch._plans if key[0] == "attention"]
    assert kept == ["native"]


def test_an_unhashable_argument_is_named_not_hashed():
    q, k, v, _ = random_inputs(1, 8, 64, 2, 2, 16, torch.float32, seed=1)
    with pytest.raises(TypeError, match="block_size must be an int"):
        ops.attention(q, k, v, block_size=[2])
    with pytest.raises(TypeError, match="eps must be a float"):
        ops.rms_norm(torch.randn(2, 8), torch.ones(8), [1e-6])


def test_calls_decided_by_their_data_are_not_planned(monkeypatch):
    """The native kernel takes a block-causal call SDPA is preferred for only when a key
    the mask hides from some queries is not finite: that decision reads the data, so it
    is made call by call."""
    monkeypatch.setattr(native, "cpu_vendor", lambda: "GenuineIntel")  # where SDPA is preferred for these
    q, k, v, _ = random_inputs(1, 96, 96, 16, 16, 32, torch.float32, seed=0)
    dirty = k.clone()
    dirty[0, 4, 1] = float("nan")  # hidden from queries 0-3, seen by 4 on
    assert ops.backend_for("attention", q, dirty, v, block_size=4).startswith("cpu:")
    ops.attention(q, dirty, v, block_size=4)
    assert ops.backend_for("attention", q, k, v, block_size=4) == "torch-sdpa"
    ran = []
    monkeypatch.setitem(dispatch.TORCH, "attention", dataclasses.replace(
        dispatch.TORCH["attention"], launch=lambda call, out=None: ran.append("sdpa") or call.q))
    ops.attention(q, k, v, block_size=4)
    assert ran == ["sdpa"]


def test_gradients_and_copies_are_not_planned(route_calls):
    x = torch.randn(4, 32)
    weight = torch.randn(32, requires_grad=True)
    for _ in range(2):
        out = ops.rms_norm(x, weight, 1e-6)
        assert out.requires_grad  # the reference ran, recording the gradient
    assert route_calls["rms_norm"] == 2
    strided = torch.randn(4, 64)[:, ::2]  # rows the kernel cannot read in place: copied, each call
    for _ in range(2):
        assert torch.equal(ops.rms_norm(strided, weight.detach(), 1e-6),
                           native_route("rms_norm", strided, weight.detach(), 1e-6))
    assert route_calls["rms_norm"] == 2 + 2


def test_each_planned_call_fills_its_own_params(monkeypatch):
    """The plan's params struct is a template copied per call: a call that set the shared
    one's addresses could send another thread's launch to its tensors (the kernel copies
    its params only once it runs)."""
    launched = []
    monkeypatch.setattr(native._C, "attention_cpu", lambda params: launched.append((params, params.q, params.out)))
    inputs = [random_inputs(1, 16, 200, 4, 4, 32, torch.float32, seed=seed)[:3] for seed in range(3)]
    with dispatch.forced("native"):
        outs = [ops.attention(*qkv) for qkv in inputs]  # the first plans, the others run the plan
    assert len(launched) == 3
    for (params, q, out), (q_in, _, _), result in zip(launched, inputs, outs):
        assert (params.q, params.out) == (q, out) == (q_in.data_ptr(), result.data_ptr())
