"""CUDA sample and commit kernels against the reference, on a GPU and under the SIMT
interpreter (the `cuda_runner` fixture), with poisoned outputs."""

import pytest
import torch

from unmask import native, ops, reference, validation
from tests.helpers import (CONF_RTOL, assert_same_tokens, reference_banned, requires_cuda_build, requires_gpu,
                           run_sample_kernel)


def run_cuda(runner, logits, rows=None, **kwargs):
    return run_sample_kernel(runner.backend("sample"), logits.to(runner.device),
                             rows=None if rows is None else rows.to(runner.device), **kwargs)


CASES = [
    (1, 17, torch.float32, {}),
    (31, 1019, torch.float16, dict(temperature=0.7, confidence="margin")),
    (32, 126464, torch.bfloat16, dict(temperature=1.0, banned=[126336], seed=2**63 + 1, offset=9)),
    (32, 126464, torch.float32, dict(confidence="entropy", conf_temperature=0.5)),
    (4097, 17, torch.bfloat16, dict(temperature=1.5, confidence="random", seed=5)),
    (3, 152064, torch.float16, dict(temperature=1.0, banned=[151666, 0])),
    (256, 1025, torch.float32, dict(temperature=0.3, confidence="margin", banned=[1024])),
]


@pytest.mark.parametrize("n_rows,vocab,dtype,kwargs", CASES, ids=[f"{c[0]}x{c[1]}-{str(c[2])[6:]}" for c in CASES])
def test_cuda_sample_equals_reference(cuda_runner, n_rows, vocab, dtype, kwargs):
    gen = torch.Generator().manual_seed(n_rows + vocab)
    logits = (torch.randn(n_rows, vocab, generator=gen) * 4).to(dtype)
    expected_tokens, expected_conf = reference.sample(logits, **reference_banned(kwargs))
    tokens, conf = run_cuda(cuda_runner, logits, **kwargs)
    assert_same_tokens(logits, expected_tokens, tokens, temperature=kwargs.get("temperature", 0.0),
                       seed=kwargs.get("seed", 0), offset=kwargs.get("offset", 0))
    same = tokens == expected_tokens
    torch.testing.assert_close(conf[same].double(), expected_conf[same].double(), rtol=CONF_RTOL, atol=1e-9)


@pytest.mark.parametrize("confidence", ["prob", "random"])
def test_cuda_offset_read_from_the_device(cuda_runner, confidence):
    """offset as a tensor (0-d, or one per row): the kernels read it from device memory (a
    captured graph replays with the values it holds) and draw as the reference does."""
    logits = torch.randn(33, 5000, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    per_row = torch.randint(0, 2**32, (33,), generator=torch.Generator().manual_seed(3))
    for offset in (torch.tensor(2**32 - 3), per_row):  # one for every row, one per row
        tokens, conf = run_cuda(cuda_runner, logits, temperature=1.0, confidence=confidence, seed=6,
                                offset=offset.to(cuda_runner.device))
        expected_tokens, expected_conf = reference.sample(logits, temperature=1.0, confidence=confidence, seed=6,
                                                          offset=offset)
        assert torch.equal(tokens, expected_tokens)
        torch.testing.assert_close(conf, expected_conf, rtol=CONF_RTOL, atol=0)


@pytest.mark.parametrize("sm_count", [1, 132])
def test_cuda_rows_and_invalid_rows(cuda_runner, simt_sm_count, sm_count):
    """Unsplit and split rows (the interpreter is told of 1 SM, or of an H100's 132)."""
    if cuda_runner.interpreted:
        simt_sm_count(sm_count)
    elif sm_count == 1:
        pytest.skip("a GPU's SM count is its own")
    logits = torch.randn(40, 9000)
    logits[5, 7] = float("nan")
    logits[6] = float("-inf")
    rows = torch.tensor([39, 0, 5, 6, 17])
    tokens, conf = run_cuda(cuda_runner, logits, rows=rows, temperature=1.0, seed=3)
    expected_tokens, expected_conf = reference.sample(logits, temperature=1.0, seed=3, rows=rows)
    assert torch.equal(tokens, expected_tokens)
    torch.testing.assert_close(conf, expected_conf, rtol=CONF_RTOL, atol=0)


def test_cuda_commit_leaves_float64_confidences_to_the_reference(cuda_runner):
    """The CUDA kernel ranks float32 confidences: float64 ones that one float32 would tie go
    elsewhere (supports() says why), and the kernel itself refuses a float64 pointer."""
    device = cuda_runner.device
    x = torch.zeros(1, 2, dtype=torch.int64, device=device)
    conf = torch.tensor([[0.9, 0.9 + 1e-9]], dtype=torch.float64, device=device)
    eligible = torch.ones(1, 2, dtype=torch.bool, device=device)
    call = validation.commit_call(x, x, conf, eligible, k=1)
    assert "float64 confidences" in cuda_runner.backend("commit").supports(call)
    if device == "cuda":
        assert ops.backend_for("commit", x, x, conf, eligible, k=1) == "reference"
    if cuda_runner.interpreted:
        committed = torch.zeros(1, 2, dtype=torch.bool)
        params = native._params(
            native._C.CommitParams, canvas=x.data_ptr(), tokens=x.data_ptr(), conf=0, conf_f64=conf.data_ptr(),
            eligible=eligible.data_ptr(), committed=committed.data_ptr(), batch=1, length=2,
            mode=native._C.CommitMode.count, k=torch.ones(1, dtype=torch.int64).data_ptr(), threshold=0.0, factor=0.0)
        with pytest.raises(NotImplementedError, match="float64 confidences: the CUDA kernel ranks float32"):
            native._C.commit_cuda_interpret(params, buffers=[])


@pytest.mark.parametrize("length", [1, 17, 99, 1025, 4096])
@pytest.mark.parametrize("mode", ["k", "threshold", "threshold with k", "factor"])
def test_cuda_commit_equals_reference(cuda_runner, length, mode):
    gen = torch.Generator().manual_seed(length)
    batch = 5
    conf = (torch.rand(batch, length, generator=gen) * 8).floor() / 8  # many exact ties
    conf[0, 0] = float("nan")
    eligible = torch.rand(batch, length, generator=gen) > 0.4
    tokens = torch.randint(0, 1000, (batch, length), generator=gen)
    counts = torch.randint(0, length + 1, (batch,), generator=gen)
    kwargs = {"k": {"k": counts}, "threshold": {"threshold": 0.6}, "factor": {"factor": 1.5},
              "threshold with k": {"k": counts // 3, "threshold": 0.6}}[mode]  # k // 3: the floor sometimes decides
    x = torch.full((batch, length), -1, dtype=torch.int64)
    expected_x = x.clone()
    expected = reference.commit(expected_x, tokens, conf, eligible, **kwargs)
    device = cuda_runner.device
    x_device = x.to(device)
    out = torch.ones(batch, length, dtype=torch.bool, device=device)  # poison
    kwargs = {name: value.to(device) if isinstance(value, torch.Tensor) else value for name, value in kwargs.items()}
    call = validation.commit_call(x_device, tokens.to(device), conf.to(device), eligible.to(device), **kwargs)
    committed = cuda_runner.backend("commit")(call, out=out)
    cuda_runner.synchronize()
    assert torch.equal(committed.cpu(), expected)
    assert torch.equal(x_device.cpu(), expected_x)


def test_cuda_draws_equal_rng_py(cuda_runner):
    from unmask import rng

    rows = 57 if cuda_runner.interpreted else 257  # on a GPU, more rows than one block's threads
    if cuda_runner.interpreted:
        draws = native.fill_draws(99, rows, 1025, row_begin=3, offset=8, stream=1, device=torch.device("cpu"),
                                  interpret=True)
    else:
        draws = ops.philox_draws(99, rows, 1025, row_begin=3, offset=8, stream=1, device="cuda").cpu()
    assert torch.equal(draws, rng.draws(99, torch.arange(3, 3 + rows), 1025, offset=8, stream=1))


@requires_gpu
@requires_cuda_build
def test_sampler_step_captures_in_a_cuda_graph():
    logits = torch.randn(2, 32, 126464, device="cuda", dtype=torch.bfloat16)
    eligible = torch.rand(2, 32, device="cuda") > 0.3
    k = torch.full((2,), 4, dtype=torch.int64, device="cuda")

    def step(canvas):
        tokens, conf = ops.sample(logits, temperature=1.0, seed=7, offset=3, check=False)
        return ops.commit(canvas, tokens, conf, eligible, k=k)

    eager_canvas = torch.zeros(2, 32, dtype=torch.int64, device="cuda")
    expected = step(eager_canvas)
    canvas = torch.zeros_like(eager_canvas)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step(torch.zeros_like(canvas))  # warm up allocations outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        committed = step(canvas)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(committed, expected) and torch.equal(canvas, eager_canvas)
