"""transformers integration: attn_implementation="unmask" inside a transformers model,
and unmask.generate driving a transformers model."""

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers not installed (the hf extra)")

import unmask  # noqa: E402
from unmask.integrations import transformers as unmask_hf  # noqa: E402


def tiny_qwen2(attn_implementation):
    config = transformers.Qwen2Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, attn_implementation=attn_implementation,
    )
    torch.manual_seed(0)
    return transformers.Qwen2ForCausalLM(config).eval()


def test_unmask_attention_matches_eager_in_a_causal_model(monkeypatch):
    unmask_hf.register()
    calls = []
    real_attention = unmask_hf.ops.attention

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real_attention(*args, **kwargs)

    monkeypatch.setattr(unmask_hf.ops, "attention", spy)
    eager = tiny_qwen2("eager")
    ours = tiny_qwen2("unmask")
    ours.load_state_dict(eager.state_dict())
    ids = torch.randint(0, 64, (2, 13))
    mask = torch.ones(2, 13, dtype=torch.long)
    mask[1, :4] = 0  # left padding
    with torch.no_grad():
        expected = eager(input_ids=ids, attention_mask=mask).logits
        got = ours(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], rtol=1e-4, atol=1e-4)
    assert len(calls) == 2, "one unmask attention call per layer"
    assert calls[0]["block_size"] == 1 and calls[0]["key_valid"].tolist() == real.tolist()


def test_structured_mask_rejects_arbitrary_masks():
    visible = torch.rand(1, 1, 5, 5) > 0.5
    visible[..., 0] = True
    with pytest.raises(NotImplementedError, match="key-padding, causal and block-causal"):
        unmask_hf.structured_mask(visible, 1, 5, 5, causal=False, device=torch.device("cpu"))


def test_generate_accepts_a_transformers_model():
    model = tiny_qwen2("eager")
    out = unmask.generate(model, [[1, 2, 3], [4, 5]], gen_length=8, block_length=4, steps=8, mask_id=63,
                          stop_at_eos=False)
    assert out.tokens.shape == (2, 8) and not (out.tokens == 63).any()
