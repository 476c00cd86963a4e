"""The CUDA moe_swiglu kernel (csrc/cuda/moe.cu) on a GPU and under the SIMT interpreter
(the `cuda_runner` fixture), against the float64 reference with test_moe.py's tolerance
(float32 arithmetic on bfloat16 inputs), into poisoned outputs: odd shapes, a token's
bits whatever shares its call, the two load paths, inf and NaN, ids out of range, and
on a GPU a CUDA graph replayed with new routing."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from unmask import dispatch, native, ops, reference, validation
import unmask
from tests.helpers import CudaRunner, requires_cuda_build, requires_gpu, tiny_mixture
from tests.test_moe import check_against_reference, random_call


GPU = CudaRunner("gpu")


def to(runner, arguments):
    return tuple(a.to(runner.device) for a in arguments)


def run_kernel(runner, *arguments) -> torch.Tensor:
    """The CUDA backend itself (no dispatch) into NaN-poisoned outputs, back on the CPU."""
    call = validation.moe_swiglu_call(*to(runner, arguments))
    out = torch.full(call.x.shape, float("nan"), device=runner.device)
    runner.backend("moe_swiglu")(call, out=out)
    return out.cpu()


@settings(deadline=None)
@given(tokens=st.integers(1, 40), dim=st.sampled_from([1, 3, 16, 17, 33, 100, 136]),
       hidden=st.sampled_from([1, 5, 16, 31, 48, 70]), n_experts=st.integers(1, 9), per_token=st.integers(1, 9),
       seed=st.integers(0, 2**16), repeats=st.booleans())
def test_the_kernel_matches_the_reference(cuda_runner, tokens, dim, hidden, n_experts, per_token, seed, repeats):
    """Widths off the 8-input loads and the 32-input steps, one and two blocks of 64 rows
    (hidden 70, dim 100 and 136), experts chosen by 1 to 40 tokens (tiles of 16 in one
    and two 8-token mma blocks, and their remainders), experts nobody chose, a token
    choosing an expert twice."""
    arguments = random_call(tokens, dim, hidden, n_experts, min(per_token, n_experts), torch.bfloat16, seed,
                            repeats=repeats)
    check_against_reference(run_kernel(cuda_runner, *arguments), arguments)


def test_many_tokens_per_expert(cuda_runner):
    """100 and 75 pairs on two experts: seven and five tiles each, the last partial."""
    arguments = random_call(100, 64, 96, 2, 2, torch.bfloat16, seed=5)
    arguments[1][:25, 1] = arguments[1][:25, 0]  # 25 tokens choose one expert twice: 125 and 75 pairs
    check_against_reference(run_kernel(cuda_runner, *arguments), arguments)


def test_calls_past_4096_tokens_run_in_ranges(cuda_runner):
    """4100 tokens: a range of 4096 and one of 4 through one workspace; every token as it
    comes out alone."""
    arguments = random_call(4100, 8, 8, 3, 2, torch.bfloat16, seed=8)
    got = run_kernel(cuda_runner, *arguments)
    check_against_reference(got, arguments)
    x, chosen, weights, gate, up, down = arguments
    for token in (0, 4095, 4096, 4099):
        alone = run_kernel(cuda_runner, x[token:token + 1], chosen[token:token + 1], weights[token:token + 1],
                           gate, up, down)
        assert torch.equal(alone[0], got[token]), token


def test_a_tokens_result_does_not_depend_on_its_companions(cuda_runner):
    """Each token comes out bit for bit as it does alone, and so does a subset."""
    for dim, hidden in ((128, 64), (100, 31)):  # the 16-byte loads, then the element loads
        arguments = random_call(48, dim, hidden, 6, 3, torch.bfloat16, seed=7)
        together = run_kernel(cuda_runner, *arguments)
        check_against_reference(together, arguments)
        x, chosen, weights, gate, up, down = arguments
        for token in (0, 29, 47):
            alone = run_kernel(cuda_runner, x[token:token + 1], chosen[token:token + 1], weights[token:token + 1],
                               gate, up, down)
            assert torch.equal(alone[0], together[token]), (dim, token)
        some = slice(10, 23)
        assert torch.equal(run_kernel(cuda_runner, x[some], chosen[some], weights[some], gate, up, down), together[some])


def misaligned(t: torch.Tensor) -> torch.Tensor:
    """t's values in contiguous storage that starts 2 bytes past a 16-byte boundary."""
    storage = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    view = storage[1:].view(t.shape)
    view.copy_(t)
    return view


def test_unaligned_rows_give_the_same_bits(cuda_runner):
    """x with a row stride that is not a multiple of 8, and weights 2 bytes off a 16-byte
    boundary, take the element loads: the same bits as the 16-byte loads."""
    x, chosen, weights, gate, up, down = random_call(20, 64, 40, 5, 2, torch.bfloat16, seed=9)
    aligned = run_kernel(cuda_runner, x, chosen, weights, gate, up, down)
    wide = torch.zeros(20, 75, dtype=torch.bfloat16)
    wide[:, 3:67] = x
    strided = wide[:, 3:67]
    assert strided.stride(0) % 8 != 0
    shifted = [misaligned(w.to(cuda_runner.device)) for w in (gate, up, down)]
    assert all(w.data_ptr() % 16 for w in shifted)
    got = run_kernel(cuda_runner, strided, chosen, weights, *shifted)
    assert torch.equal(got, aligned)


def test_inf_and_nan_reach_the_outputs_the_reference_gives_them(cuda_runner):
    """As test_moe.py's for the CPU kernels: a NaN weight, an inf input, an activation
    past float32's range (the down product's pieces keep an inf whole), a gate sum of -inf."""
    x, chosen, weights, gate, up, down = random_call(40, 40, 20, 4, 2, torch.bfloat16, seed=11)
    gate[0, 3, 5] = float("nan")
    x[7, 2] = float("inf")
    gate[1, 0] = up[1, 0] = 1e20
    x[9] = x[9].abs()
    chosen[9, 0] = 1
    arguments = (x, chosen, weights, gate, up, down)
    got = run_kernel(cuda_runner, *arguments)
    expected = reference.moe_swiglu(x.float(), chosen, weights, gate.float(), up.float(), down.float())
    assert torch.isnan(expected).any() and torch.isinf(expected[9]).any()
    assert torch.equal(torch.isnan(got), torch.isnan(expected))
    assert torch.equal(got[torch.isinf(expected)], expected[torch.isinf(expected)])

    # An infinite down weight: inf times each token's activation, as in float32. Expert 2's
    # hidden unit 4 is silu(100) * 100 = 10000 for every token (bits past bfloat16's 8, so
    # its third piece is 0, which must not meet the inf).
    x, chosen, weights, gate, up, down = random_call(30, 40, 20, 4, 2, torch.bfloat16, seed=13)
    x[:, 0] = 100.0
    gate[2, 4], up[2, 4] = 0.0, 0.0
    gate[2, 4, 0] = up[2, 4, 0] = 1.0
    down[2, 1, 4] = float("inf")
    down[3, 5, 0] = -float("inf")
    got = run_kernel(cuda_runner, x, chosen, weights, gate, up, down)
    expected = reference.moe_swiglu(x.float(), chosen, weights, gate.float(), up.float(), down.float())
    assert torch.isinf(expected).sum() > 10
    assert torch.equal(torch.isnan(got), torch.isnan(expected))
    assert torch.equal(got[torch.isinf(expected)], expected[torch.isinf(expected)])

    x, chosen, weights, gate, up, down = random_call(3, 40, 20, 4, 2, torch.bfloat16, seed=12)
    x[0, 2] = float("inf")
    gate[:, :, 2], up[:, :, 2], down = -gate[:, :, 2].abs(), up[:, :, 2].abs(), down.abs()
    got = run_kernel(cuda_runner, x, chosen, weights, gate, up, down)
    assert torch.isnan(got[0]).all() and not torch.isnan(got[1:]).any()


@pytest.mark.parametrize("bad", [-1, 6, 2**40])
def test_an_id_out_of_range_makes_its_token_nan(cuda_runner, bad):
    """The kernel reads no id on the host (a graph may hold it), so it cannot raise: the
    token with a bad id gets NaN outputs, the others their own bits, and nothing is read
    or written out of bounds (the interpreter checks every access)."""
    x, chosen, weights, gate, up, down = random_call(9, 24, 16, 6, 2, torch.bfloat16, seed=2)
    good = run_kernel(cuda_runner, x, chosen, weights, gate, up, down)
    chosen[4, 1] = bad
    got = run_kernel(cuda_runner, x, chosen, weights, gate, up, down)
    assert torch.isnan(got[4]).all()
    others = torch.arange(9) != 4
    assert torch.equal(got[others], good[others])


def test_what_the_cuda_kernel_takes(cuda_runner):
    """bfloat16 only (the products' pieces are bfloat16), at most 1024 experts, no gradient."""
    backend = cuda_runner.backend("moe_swiglu")
    x, chosen, weights, gate, up, down = to(cuda_runner, random_call(4, 16, 8, 4, 2, torch.bfloat16, seed=1))
    assert backend.supports(validation.moe_swiglu_call(x, chosen, weights, gate, up, down)) is None
    half = validation.moe_swiglu_call(x.half(), chosen, weights, gate.half(), up.half(), down.half())
    assert "runs bfloat16" in backend.supports(half)
    many = [w[:1].expand(1025, *w.shape[1:]) for w in (gate, up, down)]
    assert "at most 1024" in backend.supports(validation.moe_swiglu_call(x, chosen, weights, *many))
    grad = validation.moe_swiglu_call(x, chosen, weights, gate.clone().requires_grad_(), up, down)
    assert backend.supports(grad) is not None


def test_the_launcher_checks_its_workspace(cuda_runner):
    x, chosen, weights, gate, up, down = to(cuda_runner, random_call(4, 16, 8, 4, 2, torch.bfloat16, seed=1))
    params, tensors = native._moe_params(validation.moe_swiglu_call(x, chosen, weights, gate, up, down), None)
    interpreted = cuda_runner.interpreted
    needed = (native._C.moe_swiglu_cuda_interpret_workspace_bytes if interpreted
              else native._C.moe_swiglu_cuda_workspace_bytes)(params)
    workspace = torch.empty(needed + 16, dtype=torch.uint8, device=cuda_runner.device)
    for offset, size, message in ((0, needed - 1, "params.workspace_bytes"), (1, needed, "params.workspace ")):
        with pytest.raises(ValueError, match=message):
            if interpreted:
                native._C.moe_swiglu_cuda_interpret(params, workspace=workspace.data_ptr() + offset,
                                                    workspace_bytes=size,
                                                    buffers=native._buffers(**tensors, workspace=workspace))
            else:
                native._C.moe_swiglu_cuda(params, workspace=workspace.data_ptr() + offset, workspace_bytes=size,
                                          stream=torch.cuda.current_stream().cuda_stream)


def test_interpret_mode_routes_bfloat16_calls_to_it():
    if not native.interpreter_available():
        pytest.skip("this build has no SIMT interpreter")
    arguments = random_call(4, 16, 8, 4, 2, torch.bfloat16, seed=1)
    with dispatch.forced("interpret"):
        assert ops.backend_for("moe_swiglu", *arguments) == "cuda-interpreter"
        check_against_reference(ops.moe_swiglu(*arguments), arguments)
        x, chosen, weights, gate, up, down = arguments
        assert ops.backend_for("moe_swiglu", x.half(), chosen, weights, gate.half(), up.half(), down.half()) == "reference"


def test_a_mixture_decodes_the_same_tokens_through_the_cuda_kernel(monkeypatch):
    """A bfloat16 LLaDA 2.0-style model under UNMASK_BACKEND=interpret (its experts, sampling
    and commits through the CUDA kernels on the interpreter) decodes the CPU kernels'
    tokens."""
    if not native.interpreter_available():
        pytest.skip("this build has no SIMT interpreter")
    model = tiny_mixture().to(torch.bfloat16)
    arguments = dict(gen_length=16, block_length=8, steps=8, stop_at_eos=False)
    on_the_cpu = unmask.generate(model, [[5, 9, 3, 7, 1], [11, 2]], **arguments)
    calls = []
    launch = native._C.moe_swiglu_cuda_interpret
    monkeypatch.setattr(native._C, "moe_swiglu_cuda_interpret", lambda *a, **k: calls.append(1) or launch(*a, **k))
    with dispatch.forced("interpret"):
        interpreted = unmask.generate(model, [[5, 9, 3, 7, 1], [11, 2]], **arguments)
    assert len(calls) == 8  # one mixture layer (the first is dense), eight steps
    assert torch.equal(interpreted.tokens, on_the_cpu.tokens)


@requires_gpu
@requires_cuda_build
def test_dispatch_sends_bfloat16_cuda_calls_to_the_kernel():
    arguments = to(GPU, random_call(4, 16, 8, 4, 2, torch.bfloat16, seed=1))
    assert ops.backend_for("moe_swiglu", *arguments) == "cuda"


@requires_gpu
@requires_cuda_build
def test_llada2_mini_shapes_on_the_gpu():
    """LLaDA2.0-mini's widths (d 2048, 256 experts of 512, 8 a token) at a block step and a
    prompt's 512 tokens (16 pairs an expert): the reference on the GPU, twice the same bits."""
    for tokens in (32, 512):
        arguments = to(GPU, random_call(tokens, 2048, 512, 256, 8, torch.bfloat16,
                                                                        seed=tokens))
        first = ops.moe_swiglu(*arguments)
        assert torch.equal(ops.moe_swiglu(*arguments), first)  # the route's atomic slot order does not show
        check_against_reference(first.cpu(), tuple(a.cpu() for a in arguments))


@requires_gpu
@requires_cuda_build
def test_a_cuda_graph_replays_with_new_routing():
    """Captured once, replayed after the ids, weights and x changed in place: the eager
    call's bits (no host read of the routing inside the graph)."""
    x, chosen, weights, gate, up, down = to(GPU, random_call(64, 256, 128, 16, 4, torch.bfloat16, seed=3))
    out = ops.moe_swiglu(x, chosen, weights, gate, up, down)  # warm-up outside the capture
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.cuda.graph(graph):
        out = ops.moe_swiglu(x, chosen, weights, gate, up, down)
    torch.cuda.current_stream().wait_stream(stream)
    for seed in (4, 5):
        fresh = to(GPU, random_call(64, 256, 128, 16, 4, torch.bfloat16, seed=seed))
        for static, new in zip((x, chosen, weights), fresh[:3]):
            static.copy_(new)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, ops.moe_swiglu(x, chosen, weights, gate, up, down)), seed
