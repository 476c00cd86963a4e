"""The decode loop keeps its decisions on the device: at most one host synchronisation per
block, for every commit rule, with CFG, ragged batches, EOS stopping and the caches.

On the CPU a synchronisation is a call that would wait for a device: Tensor.item,
__bool__, tolist and .cpu(), counted for the duration of generate. On a GPU, torch's own
sync debug mode turns any synchronising call into an error."""

import contextlib

import pytest
import torch

import unmask
from tests.helpers import requires_gpu, tiny_model

SYNCHRONISING = ("item", "__bool__", "tolist", "cpu")


@contextlib.contextmanager
def counted_synchronisations():
    """Counts the calls of the decode loop. Calls inside a kernel backend running on CPU
    tensors are not counted: a backend reads its CPU inputs directly (the native kernels
    in C++, the SDPA backend's finiteness checks in Python), and on a device it reads
    nothing (unmask.sdpa guards every read by the device; the GPU test below checks it)."""
    from unmask import dispatch

    calls: list[str] = []
    in_kernel = [0]
    originals = {name: getattr(torch.Tensor, name) for name in SYNCHRONISING}
    original_run = dispatch.run

    def counting(name):
        original = originals[name]

        def call(self, *args, **kwargs):
            if not in_kernel[0]:
                calls.append(name)
            return original(self, *args, **kwargs)
        return call

    def run(kernel, call, **kwargs):
        in_kernel[0] += call.device.type == "cpu"
        try:
            return original_run(kernel, call, **kwargs)
        finally:
            in_kernel[0] -= call.device.type == "cpu"

    try:
        for name in SYNCHRONISING:
            setattr(torch.Tensor, name, counting(name))
        dispatch.run = run
        yield calls
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
        dispatch.run = original_run


PROMPTS = [[5, 9, 3, 7, 1], [11, 2], [4, 4, 8]]  # ragged: left-padded inside generate
CASES = [
    dict(steps=16),
    dict(steps=8, temperature=1.0, seed=3),  # two tokens per step
    dict(threshold=0.5),
    dict(factor=1.0, remasking="margin"),
    dict(steps=16, cfg_scale=1.0),
    dict(threshold=0.3, cache="prefix"),
    dict(steps=16, cache="dual", remasking="entropy"),
    dict(steps=16, stop_at_eos=True),
    dict(threshold=0.9, top_k=5, top_p=0.9, temperature=0.7),
    dict(steps=16, threshold=0.2),  # the plan's counts as floors: blocks end early
]


@pytest.mark.parametrize("kwargs", CASES, ids=[",".join(f"{k}={v}" for k, v in c.items()) for c in CASES])
def test_at_most_one_synchronisation_per_block(kwargs):
    model = tiny_model(seed=4)
    arguments = {"gen_length": 16, "block_length": 4, "stop_at_eos": False, **kwargs}
    expected = unmask.generate(model, PROMPTS, **arguments)
    with counted_synchronisations() as calls:
        out = unmask.generate(model, PROMPTS, **arguments)
    blocks = arguments["gen_length"] // arguments["block_length"]
    assert len(calls) <= blocks, f"{len(calls)} synchronising calls for {blocks} blocks: {calls}"
    assert torch.equal(out.tokens, expected.tokens)


def test_infill_synchronises_once_for_its_plan_and_once_at_the_end():
    model = tiny_model(seed=4)
    ids = torch.tensor([[1, 60, 60, 4, 60, 60, 7, 8], [60, 2, 3, 60, 60, 60, 60, 9]])
    with counted_synchronisations() as calls:
        unmask.infill(model, ids, block_length=4, threshold=0.5)
    assert len(calls) == 2, calls


def test_the_counter_sees_a_synchronisation():
    with counted_synchronisations() as calls:
        bool(torch.ones(1).any())
        torch.ones(2).tolist()
    assert calls == ["__bool__", "tolist"]


def test_invalid_logits_are_reported_after_the_block():
    def nan_model(ids, attention_mask=None):
        return torch.full((*ids.shape, 9), float("nan"))

    with pytest.raises(unmask.ops.InvalidLogitsError, match="NaN"):
        unmask.generate(nan_model, [[1]], gen_length=8, block_length=4, mask_id=8, threshold=0.5)


@requires_gpu
@pytest.mark.parametrize("cuda_graph", [False, True], ids=["eager", "cuda_graph"])
@pytest.mark.parametrize("kwargs", CASES, ids=[",".join(f"{k}={v}" for k, v in c.items()) for c in CASES])
def test_at_most_one_synchronisation_per_block_on_a_gpu(kwargs, cuda_graph):
    """torch.cuda.set_sync_debug_mode("warn") warns at every synchronising call."""
    import warnings

    if cuda_graph and "cache" in kwargs:
        pytest.skip("a cached step is not captured")
    model = tiny_model(seed=4).cuda()
    arguments = {"gen_length": 16, "block_length": 4, "stop_at_eos": False, "cuda_graph": cuda_graph, **kwargs}
    expected = unmask.generate(model, PROMPTS, **{**arguments, "cuda_graph": False})
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = unmask.generate(model, PROMPTS, **arguments)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    synchronisations = [w for w in caught if "synchroniz" in str(w.message)]
    blocks = arguments["gen_length"] // arguments["block_length"]
    assert len(synchronisations) <= blocks, [str(w.message) for w in synchronisations]
    assert torch.equal(out.tokens.cpu(), expected.tokens.cpu())
