"""unmask.generate against the Fast-dLLM loops (unmask.benchmarks.fastdllm_baseline: eager
torch, SDPA attention, a float64 softmax over every position the model returns, the cache
refilled at each block), token for token, in each cache mode: the cache rules are the
same, so float32 arithmetic must not reorder a single choice of a random model. The
loop bans the mask id as unmask's sampler does (without that ban, 0.97 of the bundled
shape's tokens agree: the mask id's share of each softmax moves the confidences)."""

import pytest
import torch

import unmask
from unmask.benchmarks.fastdllm_baseline import fastdllm_generate


def bundled_shape_model(std: float) -> unmask.DiffusionTransformer:
    """The bundled model's shape (bench/generate.py --shape bundled) with random weights."""
    config = unmask.ModelConfig(d_model=128, n_layers=4, n_heads=4, n_kv_heads=4, mlp_hidden_size=384, vocab_size=46,
                                embedding_size=46, mask_token_id=1, eos_token_id=2)
    return unmask.DiffusionTransformer.random(config, seed=0, std=std, dtype=torch.float32)


def random_prompts(config: unmask.ModelConfig, batch: int, length: int) -> torch.Tensor:
    ordinary = torch.tensor([i for i in range(config.vocab_size) if i not in (config.mask_token_id, config.eos_token_id)])
    return ordinary[torch.randint(0, len(ordinary), (batch, length), generator=torch.Generator().manual_seed(batch))]


# std 0.05, bench/generate.py's weights: confidences near one another (~1/V), many within
# 1e-4 of the next, and few distinct tokens; std 0.2: 20-30 distinct tokens, where the
# loop without the ban agrees on 0.3-0.5 of them.
@pytest.mark.parametrize("std,batch", [(0.05, 2), (0.2, 1), (0.2, 2)])
@pytest.mark.parametrize("cache", [None, "prefix", "dual"])
def test_same_tokens_as_the_fastdllm_loop(cache, std, batch, cpu_isa):
    model = bundled_shape_model(std)
    prompt = random_prompts(model.config, batch, 40)
    expected, calls = fastdllm_generate(model, prompt, steps=64, gen_length=64, block_length=32, cache=cache)
    out = unmask.generate(model, prompt, gen_length=64, block_length=32, steps=64, cache=cache, stop_at_eos=False)
    assert out.nfe == calls
    assert torch.equal(out.tokens, expected)
    if std == 0.2:
        assert len(set(expected.flatten().tolist())) > 15, "the test model must not be degenerate"
