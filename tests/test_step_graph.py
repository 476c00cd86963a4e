"""The denoising step as one graph: unmask.sampler.DenoiseStep is a function of its
StepState's device tensors only (block start, RNG offset, per-row counts, running rows),
so torch.compile(fullgraph=True) traces it once for every step and block on the CPU, and
generate(cuda_graph=True) captures it once and replays it on a GPU. Both must give the
tokens of the eager step."""

import functools

import pytest
import torch

import unmask
from unmask import sampler, validation
from tests.helpers import requires_gpu, tiny_mixture, tiny_model

BLOCK, PROMPT, BLOCKS = 6, 5, 2
RULES = {
    "count": dict(steps=3 * BLOCKS),  # two tokens per step
    "threshold": dict(threshold=0.4),
    "factor": dict(factor=1.0),
    "count with threshold": dict(steps=3 * BLOCKS, threshold=0.4),  # the counts as floors
}


def make_step(model, x, attention_mask, rule, *, cfg_scale=0.0, temperature=1.0, remasking="low_confidence",
              cache=None):
    """(state, step) without a cache; with a cache, (state, fill step, recompute step(s)):
    one recompute step for the dual cache, one per block for the prefix cache (its segment
    runs from the block's start to the canvas's end)."""
    state = sampler.StepState.new(x)
    prompt_positions = torch.zeros_like(x, dtype=torch.bool)
    prompt_positions[:, :PROMPT] = True
    step_model = sampler._StepModel(model, cache, attention_mask, prompt_positions, model.mask_id, cfg_scale)
    sampling = validation.sampling(temperature=temperature, top_k=0, top_p=1.0, remasking=remasking, seed=11)
    rule = validation.rule(rule.get("steps"), rule.get("threshold"), rule.get("factor"), num_blocks=BLOCKS,
                           default_steps=BLOCK * BLOCKS, confidence=sampling.confidence)
    functions = [step_model] if cache is None else [step_model.fill, step_model.recompute]
    if cache == "prefix":
        width = x.shape[1]
        functions = [step_model.fill] + [functools.partial(step_model.recompute, length=width - PROMPT - b * BLOCK)
                                         for b in range(BLOCKS)]
    if cache is not None:
        step_model._cache_for(x)  # allocated before the first call, as the eager warm-up of a capture does
    steps = [sampler.DenoiseStep(state, BLOCK, functools.partial(f, x), rule=rule, sampling=sampling,
                                 mask_id=model.mask_id) for f in functions]
    return (state, steps[0], steps[1:]) if cache == "prefix" else (state, *steps)


def canvas(model, padded: bool):
    gen = torch.Generator().manual_seed(5)
    prompt = torch.randint(0, model.mask_id, (3, PROMPT), generator=gen)
    x = torch.cat([prompt, torch.full((3, BLOCK * BLOCKS), model.mask_id)], dim=1)
    attention_mask = None
    if padded:
        attention_mask = torch.ones_like(x, dtype=torch.bool)
        attention_mask[1, :3] = False  # a left-padded prompt
        x[1, :3] = 0
    return x, attention_mask


def run_blocks(steps, states, later_steps=None):
    """Both steps over every block, three steps each, on the same starting canvas: the
    commits, canvases and RNG offsets must agree after every step. later_steps: the
    steps of a block's second and third calls (a cache's recompute), if others; a
    function of the block for steps that differ from block to block."""
    for block in range(BLOCKS):
        for state in states:
            state.start.fill_(PROMPT + block * BLOCK)
            state.k.fill_(2)
        later = later_steps(block) if callable(later_steps) else later_steps
        for call in range(3):
            outputs = [step() for step in (steps if call == 0 or later is None else later)]
            for committed, remaining in outputs[1:]:
                assert torch.equal(committed, outputs[0][0]) and torch.equal(remaining, outputs[0][1])
            for state in states[1:]:
                assert torch.equal(state.x, states[0].x) and torch.equal(state.offset, states[0].offset)
    assert bool(((states[0].x >= 0) & (states[0].x < 61)).all()), "only vocabulary ids are committed"


@pytest.mark.parametrize("rule", list(RULES))
@pytest.mark.parametrize("cfg_scale,padded", [(0.0, False), (1.5, True)])
def test_the_step_traces_once_for_every_step_and_block(rule, cfg_scale, padded):
    """torch.compile(fullgraph=True): no graph break and a single graph for all steps and
    blocks (start, offset and k are tensors, not constants of the trace). aot_eager runs
    the traced graph op for op, so its tokens must equal the eager step's exactly."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = tiny_model(seed=3)
    x, attention_mask = canvas(model, padded)
    eager_state, eager = make_step(model, x.clone(), attention_mask, RULES[rule], cfg_scale=cfg_scale)
    traced_state, traced = make_step(model, x.clone(), attention_mask, RULES[rule], cfg_scale=cfg_scale)
    compiled = torch.compile(traced, fullgraph=True, backend="aot_eager")
    with torch.inference_mode():
        run_blocks([eager, compiled], [eager_state, traced_state])
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    # each row's RNG offset counts the steps in which it had masks: every one under the
    # steps rule here (two of a block's six masks a step), at least the first of each block else
    offsets = traced_state.offset.tolist()
    if rule == "count":
        assert offsets == [3 * BLOCKS] * len(offsets)
    else:
        assert BLOCKS <= min(offsets) <= max(offsets) <= 3 * BLOCKS
    assert (traced_state.x[:, PROMPT:] != model.mask_id).sum() > 0, "the steps committed tokens"


@pytest.mark.parametrize("rule", ["count", "threshold"])
@pytest.mark.parametrize("cfg_scale,padded", [(0.0, False), (1.5, True)])
def test_the_dual_cache_step_traces_as_two_graphs(rule, cfg_scale, padded):
    """With the dual cache a block's first call (the whole canvas, filling the cache) and
    its later calls (the block alone, at a DeviceSegment over the cached rest) are each
    one graph for every block; aot_eager's tokens equal the eager steps'."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = tiny_model(seed=3)
    x, attention_mask = canvas(model, padded)
    eager_state, eager_fill, eager_recompute = make_step(model, x.clone(), attention_mask, RULES[rule],
                                                         cfg_scale=cfg_scale, cache="dual")
    traced_state, traced_fill, traced_recompute = make_step(model, x.clone(), attention_mask, RULES[rule],
                                                            cfg_scale=cfg_scale, cache="dual")
    fill = torch.compile(traced_fill, fullgraph=True, backend="aot_eager")
    recompute = torch.compile(traced_recompute, fullgraph=True, backend="aot_eager")
    with torch.inference_mode():
        run_blocks([eager_fill, fill], [eager_state, traced_state], later_steps=[eager_recompute, recompute])
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2
    assert (traced_state.x[:, PROMPT:] != model.mask_id).sum() > 0, "the steps committed tokens"


def test_the_prefix_cache_step_traces_as_a_graph_per_block_and_one_to_fill():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = tiny_model(seed=3)
    x, attention_mask = canvas(model, padded=True)
    eager_state, eager_fill, eager_recompute = make_step(model, x.clone(), attention_mask, RULES["count"],
                                                         cfg_scale=1.5, cache="prefix")
    traced_state, traced_fill, traced_recompute = make_step(model, x.clone(), attention_mask, RULES["count"],
                                                            cfg_scale=1.5, cache="prefix")
    compile = functools.partial(torch.compile, fullgraph=True, backend="aot_eager")
    fill, recompute = compile(traced_fill), [compile(step) for step in traced_recompute]
    with torch.inference_mode():
        run_blocks([eager_fill, fill], [eager_state, traced_state],
                   later_steps=lambda block: [eager_recompute[block], recompute[block]])
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1 + BLOCKS
    assert (traced_state.x[:, PROMPT:] != model.mask_id).sum() > 0, "the steps committed tokens"


@pytest.mark.parametrize("cache", ["dual", "prefix"])
def test_the_cached_steps_give_generates_tokens(cache):
    """The fill and recompute steps, run as generate(cache=...) runs its block's calls,
    give the tokens of generate's own eager cached loop (host-picked segments)."""
    model = tiny_model(seed=3)
    x, _ = canvas(model, padded=False)
    state, fill, recompute = make_step(model, x.clone(), None, RULES["count"], temperature=0.0, cache=cache)
    with torch.inference_mode():
        for block in range(BLOCKS):
            state.start.fill_(PROMPT + block * BLOCK)
            for call in range(3):
                state.k.fill_(2)
                later = recompute[block] if cache == "prefix" else recompute
                (fill if call == 0 else later)()
    out = unmask.generate(model, x[:, :PROMPT], gen_length=BLOCK * BLOCKS, block_length=BLOCK, steps=3 * BLOCKS,
                          cache=cache, stop_at_eos=False, temperature=0.0, seed=11)
    assert torch.equal(state.x[:, PROMPT:], out.tokens)


@pytest.mark.parametrize("cache", ["dual", "prefix"])
@pytest.mark.parametrize("rule", [dict(steps=3 * BLOCKS), dict(threshold=0.4)])
def test_the_decode_loop_picks_fill_then_recompute_steps(monkeypatch, cache, rule):
    """The loop's side of captured cached steps, on the CPU: with the capture itself
    replaced by the plain step, generate(cuda_graph=True) runs each block's first model
    call as the fill step and the rest as recompute steps, and gives the eager loop's
    tokens and model calls."""
    model = tiny_model(seed=3)
    x, _ = canvas(model, padded=False)
    arguments = dict(gen_length=BLOCK * BLOCKS, block_length=BLOCK, cache=cache, stop_at_eos=False, temperature=0.0,
                     **rule)
    eager = unmask.generate(model, x[:, :PROMPT], **arguments)
    kinds = []
    for kind in ("fill", "recompute"):
        original = getattr(sampler._StepModel, kind)
        monkeypatch.setattr(sampler._StepModel, kind,
                            lambda self, *a, _f=original, _k=kind, **kw: (kinds.append(_k), _f(self, *a, **kw))[1])
    monkeypatch.setattr(sampler, "_CudaGraphStep", lambda step: step)
    monkeypatch.setattr(sampler, "_use_cuda_graph", lambda *args: True)
    graphed = unmask.generate(model, x[:, :PROMPT], **arguments)
    assert torch.equal(graphed.tokens, eager.tokens) and graphed.nfe == eager.nfe
    block_starts, calls = set(), 0
    for steps in eager.steps_per_block:  # on the CPU a block's steps are its model calls
        block_starts.add(calls)
        calls += steps
    assert len(kinds) == eager.nfe == calls
    assert [i for i, kind in enumerate(kinds) if kind == "fill"] == sorted(block_starts)


def test_the_step_compiles_with_inductor():
    """The default backend generates code for the whole step (about 20 s on 2 cores); at
    temperature 0 with the count rule its commits are the eager step's."""
    torch._dynamo.reset()
    model = tiny_model(seed=3)
    x, attention_mask = canvas(model, padded=True)
    eager_state, eager = make_step(model, x.clone(), attention_mask, RULES["count"], temperature=0.0)
    traced_state, traced = make_step(model, x.clone(), attention_mask, RULES["count"], temperature=0.0)
    with torch.inference_mode():
        run_blocks([eager, torch.compile(traced, fullgraph=True)], [eager_state, traced_state])


def test_the_step_model_is_graphable_without_a_cache_and_with_one_on_llada_style_models():
    model = tiny_model(seed=3)
    x, _ = canvas(model, padded=False)
    positions = torch.zeros_like(x, dtype=torch.bool)
    for cache in (None, "dual", "prefix"):
        assert sampler._StepModel(model, cache, None, positions, model.mask_id, 0.0).graphable
    for other in (tiny_model(seed=3, model_type="dream"), tiny_model(seed=3, block_size=4)):
        assert sampler._StepModel(other, None, None, positions, other.mask_id, 0.0).graphable
        for cache in ("dual", "prefix"):
            assert not sampler._StepModel(other, cache, None, positions, other.mask_id, 0.0).graphable
    plain = lambda ids, attention_mask=None: torch.zeros(*ids.shape, 61)  # noqa: E731 - any callable model
    assert not sampler._StepModel(plain, None, None, positions, 60, 0.0).graphable


def test_cuda_graph_argument_is_checked():
    model = tiny_model(seed=3)
    with pytest.raises(TypeError, match="cuda_graph must be a bool or None, got str"):
        unmask.generate(model, [[1, 2]], gen_length=4, block_length=4, cuda_graph="yes")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="cuda_graph=True needs the unmask model on a CUDA device"):
            unmask.generate(model, [[1, 2]], gen_length=4, block_length=4, cuda_graph=True)
    # None on the CPU: eager, and the same tokens as False
    a = unmask.generate(model, [[1, 2]], gen_length=4, block_length=4, cuda_graph=None)
    b = unmask.generate(model, [[1, 2]], gen_length=4, block_length=4, cuda_graph=False)
    assert torch.equal(a.tokens, b.tokens)


def test_compile_argument_is_checked():
    model = tiny_model(seed=3)
    arguments = dict(gen_length=4, block_length=4)
    with pytest.raises(TypeError, match="compile must be a bool, got str"):
        unmask.generate(model, [[1, 2]], compile="yes", **arguments)
    with pytest.raises(ValueError, match="compile=True and cuda_graph=True do not combine"):
        unmask.generate(model, [[1, 2]], compile=True, cuda_graph=True, **arguments)
    with pytest.raises(ValueError, match="compile=True and speculate do not combine"):
        unmask.generate(model, [[1, 2]], compile=True, speculate=2, **arguments)
    with pytest.raises(ValueError, match="compile=True needs the unmask model.*cache='dual', model"):
        unmask.generate(tiny_model(seed=4, model_type="dream"), [[1, 2]], compile=True, cache="dual", **arguments)
    plain = lambda ids, attention_mask=None: torch.zeros(*ids.shape, 61)  # noqa: E731 - any callable model
    with pytest.raises(ValueError, match="compile=True needs the unmask model"):
        unmask.generate(plain, [[1, 2]], compile=True, mask_id=60, **arguments)
    step_model = sampler._StepModel(model, None, None, torch.zeros(1, 4, dtype=torch.bool), model.mask_id, 0.0)
    with pytest.raises(ValueError, match="compile=True runs on the CPU"):  # a model on a GPU: cuda_graph's place
        sampler._traced_step(None, True, step_model, torch.device("cuda"), "")


def test_generate_compiled_gives_the_eager_tokens_and_compiles_a_shape_once():
    """compile=True with the dual cache (a fill and a recompute graph) at temperature 0:
    the eager tokens, model calls and steps; a second generate of the same shapes, with
    other prompts, generates no new code (dynamo's guards test the step's types, shapes
    and constants, none of which belongs to one generate)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    compiled_before = counters["stats"]["unique_graphs"]  # the counters outlive reset()
    model = tiny_model(seed=4, d_model=64, n_heads=2, n_kv_heads=1, mlp_hidden_size=64)
    arguments = dict(gen_length=12, block_length=6, steps=12, cache="dual", stop_at_eos=False)
    runs = []
    for prompts in ([[5, 9, 3, 7, 1], [11, 2, 8, 8, 3]], [[4, 4, 8, 1, 2], [6, 1, 9, 9, 9]]):
        eager = unmask.generate(model, prompts, **arguments)
        compiled = unmask.generate(model, prompts, compile=True, **arguments)
        assert torch.equal(compiled.tokens, eager.tokens)
        assert compiled.nfe == eager.nfe and compiled.steps_per_block == eager.steps_per_block
        runs.append(counters["stats"]["unique_graphs"] - compiled_before)
    assert runs == [2, 2]  # fill and recompute, compiled by the first generate only


GPU_CASES = [
    dict(steps=16),
    dict(steps=16, cache="dual"),
    dict(threshold=0.5, cache="dual", cfg_scale=1.0),
    dict(factor=1.0, cache="dual", temperature=1.0, seed=5, stop_at_eos=True),
    dict(steps=16, cache="prefix"),
    dict(threshold=0.5, cache="prefix", cfg_scale=1.0),
    dict(steps=8, temperature=1.0, seed=3),
    dict(threshold=0.5),
    dict(factor=1.0, remasking="margin", temperature=0.5),
    dict(steps=16, cfg_scale=1.0),
    dict(threshold=0.3, stop_at_eos=True),
    dict(steps=16, remasking="random", temperature=1.0),
    dict(steps=16, threshold=0.3, cache="dual"),  # a block may end before its plan (one step later)
]


@requires_gpu
@pytest.mark.parametrize("kwargs", GPU_CASES, ids=[",".join(f"{k}={v}" for k, v in c.items()) for c in GPU_CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_graph_replay_gives_the_eager_tokens(kwargs, dtype):
    """Ragged prompts (padding), two blocks; graph replay against the eager loop on the
    same GPU: the same tokens, model calls and steps per block."""
    model = tiny_model(seed=4, d_model=128, n_heads=2, n_kv_heads=1, mlp_hidden_size=64).to(dtype).cuda()
    prompts = [[5, 9, 3, 7, 1], [11, 2], [4, 4, 8]]
    arguments = {"gen_length": 16, "block_length": 8, "stop_at_eos": False, **kwargs}
    eager = unmask.generate(model, prompts, cuda_graph=False, **arguments)
    graphed = unmask.generate(model, prompts, cuda_graph=True, **arguments)
    assert torch.equal(graphed.tokens, eager.tokens)
    assert graphed.nfe == eager.nfe and graphed.steps_per_block == eager.steps_per_block


@requires_gpu
def test_a_mixture_of_experts_in_bfloat16_replays_as_a_graph():
    """The CUDA moe_swiglu kernel routes on the device: a bfloat16 MoE model's step is
    captured, and replay gives the eager tokens; in float32 (torch's products, a host
    read per layer) cuda_graph=True is refused."""
    model = tiny_mixture().to(torch.bfloat16).cuda()
    arguments = {"gen_length": 16, "block_length": 8, "steps": 8, "stop_at_eos": False}
    eager = unmask.generate(model, [[5, 9, 3, 7, 1], [11, 2]], cuda_graph=False, **arguments)
    graphed = unmask.generate(model, [[5, 9, 3, 7, 1], [11, 2]], cuda_graph=True, **arguments)
    assert torch.equal(graphed.tokens, eager.tokens)
    with pytest.raises(ValueError, match="experts"):
        unmask.generate(model.float(), [[5, 9]], cuda_graph=True, **arguments)


def test_a_mixture_of_experts_on_the_cpu_is_not_graphable():
    """On the CPU torch.compile would meet the experts' host read (compile=True is refused)."""
    for dtype in (torch.float32, torch.bfloat16):
        model = tiny_mixture().to(dtype)
        x, _ = canvas(model, padded=False)
        assert not sampler._StepModel(model, None, None, torch.zeros_like(x, dtype=torch.bool), model.mask_id,
                                      0.0).graphable


@requires_gpu
def test_cuda_graph_refuses_a_cache_with_shifted_logits():
    shifted = tiny_model(seed=4, model_type="dream").cuda()
    with pytest.raises(ValueError, match="shifted logits.*cache='dual', model"):
        unmask.generate(shifted, [[1, 2]], gen_length=4, block_length=4, cache="dual", cuda_graph=True)


@requires_gpu
def test_cuda_graph_captures_the_reference_kernels(monkeypatch):
    """UNMASK_BACKEND=reference: the plain torch kernels must be capturable too (the
    reference commit writes with torch.where, no boolean index that synchronises)."""
    model = tiny_model(seed=4).cuda()
    arguments = dict(gen_length=8, block_length=4, threshold=0.5, temperature=1.0, stop_at_eos=False)
    monkeypatch.setenv("UNMASK_BACKEND", "reference")
    eager = unmask.generate(model, [[5, 9, 3], [2]], cuda_graph=False, **arguments)
    graphed = unmask.generate(model, [[5, 9, 3], [2]], cuda_graph=True, **arguments)
    assert torch.equal(graphed.tokens, eager.tokens)


def test_a_compiled_step_follows_float_options_that_change():
    """A float that changes between compiled generates (a temperature or threshold sweep)
    is traced by dynamo as a symbol: the argument checks let it through (math.isfinite of
    it stopped the fullgraph trace) and the op bodies check its values when they run. Each
    value gives the eager tokens."""
    torch._dynamo.reset()
    model = tiny_model(seed=2)
    arguments = dict(gen_length=4, block_length=4, stop_at_eos=False)
    for options in (dict(steps=4, temperature=0.5), dict(steps=4, temperature=0.7, top_p=0.9),
                    dict(steps=4, temperature=0.7, top_p=0.8), dict(threshold=0.5), dict(threshold=0.6),
                    dict(steps=4, threshold=0.2)):
        compiled = unmask.generate(model, [[1, 2, 3], [4]], compile=True, **options, **arguments)
        eager = unmask.generate(model, [[1, 2, 3], [4]], **options, **arguments)
        assert torch.equal(compiled.tokens, eager.tokens), options
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        unmask.generate(model, [[1, 2, 3]], compile=True, steps=4, temperature=-0.5, **arguments)
