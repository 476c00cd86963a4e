"""LLaDA 2.0 checkpoints (model_type "llada2_moe"): a tiny checkpoint in its on-disk format
against a plain forward written here from its modeling code's description (fused
query_key_value, per-head q/k norms, rotary over half of each head, block-causal
attention, mixture-of-experts MLPs routed DeepSeek-V3's way), and its decoding loop
(SDAR's low_confidence_dynamic rule on the model's grid)."""

import copy
import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import unmask
from unmask import experts as experts_backend
from unmask import validation
from tests.helpers import requires_gpu
from tests.test_block_grid import MASK, sdar

D, HEADS, KV_HEADS, HEAD_DIM, ROTARY, BLOCK = 32, 4, 2, 16, 8, 4
MOE = unmask.MoeConfig(n_experts=8, experts_per_token=3, expert_hidden_size=12, n_shared_experts=1, n_groups=4,
                top_groups=2, routed_scaling=2.5, dense_layers=1)


def tiny_llada2(seed: int = 3) -> unmask.DiffusionTransformer:
    config = unmask.ModelConfig(d_model=D, n_layers=3, n_heads=HEADS, n_kv_heads=KV_HEADS, mlp_hidden_size=40,
                                vocab_size=61, embedding_size=61, rope_theta=600000.0, rms_norm_eps=1e-6,
                                mask_token_id=MASK, eos_token_id=59, block_size=BLOCK, model_type="llada2",
                                attention_head_dim=HEAD_DIM, qk_norm=True, rotary_dim=ROTARY, moe=MOE)
    model = unmask.DiffusionTransformer.random(config, seed=seed, std=0.3)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):  # norms other than 1, so a misplaced one shows
                param.copy_(1.0 + 0.3 * torch.randn(param.shape, generator=gen))
        for layer in model.layers[MOE.dense_layers:]:
            layer.moe.expert_bias.copy_(torch.randn(MOE.n_experts, generator=gen) * 0.3)  # it changes the choice
    return model


def rms_norm(x, weight, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps) * weight


def swiglu(h, tensors, prefix):
    gate, up, down = (tensors[f"{prefix}{name}.weight"] for name in ("gate_proj", "up_proj", "down_proj"))
    return torch.nn.functional.silu(h @ gate.T) * (h @ up.T) @ down.T


def routed(h, tensors, prefix):
    """One token's MoE output, routed as LLaDA2MoeGate routes it."""
    scores = torch.sigmoid(tensors[f"{prefix}gate.weight"] @ h)
    biased = scores + tensors[f"{prefix}gate.expert_bias"]
    per_group = MOE.n_experts // MOE.n_groups
    group_score = [float(biased[g * per_group:(g + 1) * per_group].topk(2).values.sum()) for g in range(MOE.n_groups)]
    groups = sorted(range(MOE.n_groups), key=lambda g: -group_score[g])[:MOE.top_groups]
    allowed = torch.full_like(biased, float("-inf"))
    for g in groups:
        allowed[g * per_group:(g + 1) * per_group] = biased[g * per_group:(g + 1) * per_group]
    chosen = allowed.topk(MOE.experts_per_token).indices
    weights = scores[chosen] / (scores[chosen].sum() + 1e-20) * MOE.routed_scaling
    out = sum(w * swiglu(h[None], tensors, f"{prefix}experts.{int(e)}.")[0] for e, w in zip(chosen, weights))
    return out + swiglu(h[None], tensors, f"{prefix}shared_experts.")[0]


def plain_forward(directory, ids: torch.Tensor) -> torch.Tensor:
    """Logits [L, V] of one row from the checkpoint's own tensors (float32)."""
    with safe_open(directory / "model.safetensors", framework="pt") as handle:
        tensors = {name: handle.get_tensor(name).float() for name in handle.keys()}
    length = ids.shape[0]
    x = tensors["model.word_embeddings.weight"][ids]
    positions = torch.arange(length, dtype=torch.float32)
    inv_freq = 600000.0 ** (-torch.arange(0, ROTARY, 2, dtype=torch.float32) / ROTARY)
    angles = torch.cat([positions[:, None] * inv_freq] * 2, dim=-1)[:, None, :]
    cos, sin = angles.cos(), angles.sin()

    def rope(t):  # NeoX (rotate-half) over the first ROTARY dims of each head
        rot, rest = t[..., :ROTARY], t[..., ROTARY:]
        half = ROTARY // 2
        turned = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1)
        return torch.cat([rot * cos + turned * sin, rest], dim=-1)

    blocks = torch.arange(length) // BLOCK
    visible = blocks[None, :] <= blocks[:, None]  # query row sees key column
    for i in range(3):
        p = f"model.layers.{i}."
        h = rms_norm(x, tensors[p + "input_layernorm.weight"])
        qkv = h @ tensors[p + "attention.query_key_value.weight"].T
        q, k, v = qkv.split([HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM], dim=-1)
        q = rms_norm(q.view(length, HEADS, HEAD_DIM), tensors[p + "attention.query_layernorm.weight"])
        k = rms_norm(k.view(length, KV_HEADS, HEAD_DIM), tensors[p + "attention.key_layernorm.weight"])
        q, k, v = rope(q), rope(k), v.view(length, KV_HEADS, HEAD_DIM)
        k, v = k.repeat_interleave(HEADS // KV_HEADS, dim=1), v.repeat_interleave(HEADS // KV_HEADS, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, k) / HEAD_DIM ** 0.5
        attn = torch.einsum("hqk,khd->qhd", scores.masked_fill(~visible, float("-inf")).softmax(-1), v)
        x = x + attn.reshape(length, -1) @ tensors[p + "attention.dense.weight"].T
        h = rms_norm(x, tensors[p + "post_attention_layernorm.weight"])
        if i < MOE.dense_layers:
            x = x + swiglu(h, tensors, p + "mlp.")
        else:
            x = x + torch.stack([routed(h[t], tensors, p + "mlp.") for t in range(length)])
    return rms_norm(x, tensors["model.norm.weight"]) @ tensors["lm_head.weight"].T


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llada2")
    model = tiny_llada2()
    unmask.save_pretrained(model, directory)
    return directory, model


def test_saved_in_llada2s_format(checkpoint):
    directory, _ = checkpoint
    fields = json.loads((directory / "config.json").read_text())
    assert fields["model_type"] == "llada2_moe" and fields["partial_rotary_factor"] == 0.5
    assert fields["num_experts"] == 8 and fields["first_k_dense_replace"] == 1 and fields["n_group"] == 4
    with safe_open(directory / "model.safetensors", framework="pt") as handle:
        names = set(handle.keys())
        assert tuple(handle.get_tensor("model.layers.0.attention.query_key_value.weight").shape) == (
            (HEADS + 2 * KV_HEADS) * HEAD_DIM, D)
    assert {"model.word_embeddings.weight", "model.layers.0.mlp.gate_proj.weight", "model.layers.1.mlp.gate.weight",
            "model.layers.1.mlp.gate.expert_bias", "model.layers.2.mlp.experts.7.down_proj.weight",
            "model.layers.2.mlp.shared_experts.up_proj.weight", "model.layers.1.attention.key_layernorm.weight",
            "lm_head.weight"} <= names
    assert not any(".q_proj" in name or "moe." in name for name in names), "only LLaDA 2.0's names"


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_gpu)])
@pytest.mark.parametrize("length", [5, 11])
def test_forward_equals_a_plain_llada2_forward(checkpoint, length, device):
    directory, model = checkpoint
    loaded = unmask.from_pretrained(directory, device=device)
    ids = torch.randint(0, 59, (length,), generator=torch.Generator().manual_seed(length))
    expected = plain_forward(directory, ids)
    with torch.no_grad():
        got = loaded(ids[None].to(device))[0].float().cpu()
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        if device == "cpu":
            torch.testing.assert_close(model(ids[None])[0].float(), got, rtol=0, atol=0)


def test_routing_is_load_bearing(checkpoint):
    """The plain forward without the expert bias (or with every group kept) disagrees:
    the case tests the choice, not only the experts' sums."""
    directory, model = checkpoint
    ids = torch.randint(0, 59, (11,), generator=torch.Generator().manual_seed(11))
    layer = model.layers[1].moe
    h = torch.randn(64, D, generator=torch.Generator().manual_seed(0))
    experts, _ = layer.route(h)
    saved = layer.expert_bias.clone()
    with torch.no_grad():
        layer.expert_bias.zero_()
        unbiased, _ = layer.route(h)
        layer.expert_bias.copy_(saved)
    assert not torch.equal(experts.sort(dim=1).values, unbiased.sort(dim=1).values)
    assert experts.unique().numel() > MOE.experts_per_token, "tokens go to different experts"


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_gpu)])
@pytest.mark.parametrize("threshold", [None, 0.1])
def test_decodes_as_llada2s_loop(checkpoint, threshold, device):
    """LLaDA 2.0's generate(): blocks of 32 on the grid from position 0, the prompt's partial
    block first, each step the plan's count or every mask above the threshold (SDAR's
    dynamic rule) — here with blocks of BLOCK."""
    _, model = checkpoint
    prompt = [(5 * i + 1) % 50 for i in range(6)]
    calls = []
    expected = sdar(model, prompt, 12, BLOCK, 2, threshold=threshold, calls=calls)
    model = copy.deepcopy(model).to(device) if device != "cpu" else model
    for cache in (None, "prefix", "dual"):
        out = unmask.generate(model, [prompt], gen_length=12, block_length=BLOCK, steps=6, threshold=threshold,
                              block_grid="model", stop_at_eos=False, cache=cache)
        assert out.tokens[0].tolist() == expected.tolist(), cache
        if device == "cpu":  # on CUDA the block's end is read a step late: one commit-free call may follow
            assert out.nfe == len(calls)


@pytest.mark.parametrize("length", [5, 11])
def test_the_jax_port_equals_a_plain_llada2_forward(checkpoint, length):
    """unmask.jax runs LLaDA 2.0: partial rotary, and the experts as grouped products
    (ragged_dot) over the routed pairs, within the float32 tolerance of the torch test."""
    uj = pytest.importorskip("unmask.jax", reason="JAX is not installed")
    import jax.numpy as jnp

    directory, _ = checkpoint
    ids = torch.randint(0, 59, (2, length), generator=torch.Generator().manual_seed(length))
    got = np.asarray(uj.from_pretrained(directory)(ids.numpy()))
    for row in range(2):
        np.testing.assert_allclose(got[row], plain_forward(directory, ids[row]).numpy(), rtol=1e-4, atol=1e-4)
    params = uj.from_pretrained(directory, dtype=jnp.bfloat16).params["layers"]
    assert "router" not in params[0] and params[1]["experts_gate"].shape == (MOE.n_experts, D, MOE.expert_hidden_size)
    assert params[1]["expert_bias"].dtype == np.float32 and params[1]["router"].dtype != np.float32


@pytest.mark.parametrize("cache", [None, "prefix", "dual"])
@pytest.mark.parametrize("threshold", [None, 0.1])
def test_the_jax_loop_decodes_llada2_as_torch(checkpoint, threshold, cache):
    """unmask.jax.generate on LLaDA 2.0's grid and rule (rows left-padded by a grid block):
    torch's tokens and model calls."""
    uj = pytest.importorskip("unmask.jax", reason="JAX is not installed")
    _, model = checkpoint
    prompt = [(5 * i + 1) % 50 for i in range(6)]
    rows = [prompt, [9, 8, 7, 6] + prompt]
    arguments = dict(gen_length=12, block_length=BLOCK, steps=6, threshold=threshold, block_grid="model",
                     cache=cache, stop_at_eos=False)
    expected = unmask.generate(model, rows, **arguments)
    got = uj.generate(uj.from_torch(model), rows, **arguments)
    assert np.asarray(got.tokens).tolist() == expected.tokens.tolist()
    assert got.nfe == expected.nfe


def test_the_jax_experts_in_bfloat16_err_as_torchs_do(checkpoint):
    """The MoE layer on bfloat16 weights and tokens: the same experts as torch (the
    router in float32 from the same tokens), and an error against the float32 layer of
    the same weights within twice torch's own bfloat16 error (STYLE.md 6), max and mean."""
    uj = pytest.importorskip("unmask.jax", reason="JAX is not installed")
    import jax.numpy as jnp
    from unmask.jax import model as jax_model

    _, model = checkpoint
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    exact = copy.deepcopy(bf16).float().layers[1].moe  # the bfloat16 weights, in float32
    layer, params = bf16.layers[1].moe, uj.from_torch(bf16, dtype=jnp.bfloat16).params["layers"][1]
    h = torch.randn(64, D, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    h_jax = jnp.asarray(h.float().numpy(), jnp.bfloat16)
    experts, _ = jax_model._route(h_jax, params["router"], params["expert_bias"], MOE)
    assert np.array_equal(np.sort(np.asarray(experts), 1), np.sort(layer.route(h)[0].numpy(), 1))
    with torch.no_grad():  # torch's bfloat16 error: its products in bfloat16 (unmask.experts), as LLaDA 2.0's
        expected = exact(h.float()).numpy()
        chosen, weights = layer.route(h)
        call = validation.moe_swiglu_call(h, chosen, weights, layer.expert_gate, layer.expert_up, layer.expert_down)
        torch_bf16 = (experts_backend.launch(call).to(h.dtype) + layer.shared(h)).float().numpy()
    got = np.asarray(jax_model._mixture_of_experts(h_jax, params, MOE).astype(jnp.float32))
    ours, theirs = np.abs(got - expected), np.abs(torch_bf16 - expected)
    assert ours.max() <= 2 * theirs.max() + 1e-3 and ours.mean() <= 2 * theirs.mean() + 1e-4, (
        f"max {ours.max():.3g} vs torch {theirs.max():.3g}, mean {ours.mean():.3g} vs {theirs.mean():.3g}")


def test_the_real_config_builds_the_real_shapes(tmp_path):
    """LLaDA2.0-mini's config.json (its published fields) on the meta device."""
    fields = {"architectures": ["LLaDA2MoeModelLM"], "model_type": "llada2_moe", "hidden_size": 2048,
              "intermediate_size": 5120, "moe_intermediate_size": 512, "num_experts": 256, "num_shared_experts": 1,
              "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4, "routed_scaling_factor": 2.5,
              "norm_topk_prob": True, "score_function": "sigmoid", "moe_router_enable_expert_bias": True,
              "first_k_dense_replace": 1, "num_hidden_layers": 20, "num_attention_heads": 16,
              "num_key_value_heads": 4, "head_dim": 128, "partial_rotary_factor": 0.5, "rope_theta": 600000,
              "rms_norm_eps": 1e-6, "vocab_size": 157184, "tie_word_embeddings": False, "use_qk_norm": True,
              "use_qkv_bias": False, "use_bias": False, "hidden_act": "silu", "rope_scaling": None,
              "max_position_embeddings": 32768, "pad_token_id": 156892}
    (tmp_path / "config.json").write_text(json.dumps(fields))
    model = unmask.models.checkpoint.skeleton(tmp_path)
    c = model.config
    assert (c.mask_token_id, c.eos_token_id, c.block_size, c.rotated_dims, c.head_dim) == (156895, 156892, 32, 64, 128)
    assert model.layers[0].moe is None and model.layers[0].gate_proj.weight.shape == (5120, 2048)
    assert model.layers[5].moe.expert_gate.shape == (256, 512, 2048) and model.layers[5].moe.shared.gate_proj.weight.shape == (512, 2048)
    total = sum(p.numel() for p in model.parameters())
    assert 16.0e9 < total < 16.5e9, f"LLaDA2.0-mini has ~16B parameters, got {total / 1e9:.2f}B"
    with pytest.raises(ValueError, match="use_bias=True is not supported"):
        unmask.ModelConfig.from_llada2_json({**fields, "use_bias": True})
    # what its modeling code does whatever these say (it does not read them), unmask does
    same = unmask.ModelConfig.from_llada2_json({**fields, "norm_topk_prob": False, "use_qk_norm": False})
    assert same == c
    # absent fields take LLaDA2MoeConfig's defaults: half the head rotated, 16 experts
    trimmed = {name: value for name, value in fields.items()
               if name not in ("partial_rotary_factor", "num_experts", "n_group", "topk_group")}
    defaults = unmask.ModelConfig.from_llada2_json(trimmed)
    assert (defaults.rotated_dims, defaults.moe.n_experts, defaults.moe.n_groups, defaults.moe.top_groups) == (
        64, 16, 8, 4)


def test_a_dense_llada2_round_trips(tmp_path):
    """num_experts null: dense MLPs (written as null, which its config class reads so too)."""
    model = tiny_llada2()
    config = unmask.ModelConfig(**{**model.config.__dict__, "moe": None})
    dense = unmask.DiffusionTransformer.random(config, seed=2, std=0.3)
    unmask.save_pretrained(dense, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["num_experts"] is None
    loaded = unmask.from_pretrained(tmp_path)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        assert torch.equal(loaded(ids), dense(ids))


def test_the_stacked_experts_load_from_one_tensor_each(checkpoint, tmp_path):
    """Our experts are stacked [E, out, in]; the checkpoint holds one tensor per expert and
    projection. A load puts each in its slice; one missing or misshapen is named."""
    directory, model = checkpoint
    loaded = unmask.from_pretrained(directory)
    for name in ("expert_gate", "expert_up", "expert_down"):
        assert torch.equal(getattr(loaded.layers[2].moe, name), getattr(model.layers[2].moe, name)), name
    with safe_open(directory / "model.safetensors", framework="pt") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    torch.testing.assert_close(tensors["model.layers.2.mlp.experts.5.up_proj.weight"], model.layers[2].moe.expert_up[5],
                               rtol=0, atol=0)
    (tmp_path / "config.json").write_text((directory / "config.json").read_text())
    missing = {name: t for name, t in tensors.items() if name != "model.layers.1.mlp.experts.6.gate_proj.weight"}
    save_file(missing, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing tensors: \['model.layers.1.mlp.experts.6.gate_proj.weight'\]"):
        unmask.from_pretrained(tmp_path)
    misshapen = {**tensors, "model.layers.1.mlp.experts.3.down_proj.weight": torch.zeros(D, MOE.expert_hidden_size + 1)}
    save_file(misshapen, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"experts.3.down_proj.weight has shape \(32, 13\), the config implies \(32, 12\)"):
        unmask.from_pretrained(tmp_path)
    name = "model.layers.1.mlp.experts.5.up_proj.weight"
    save_file({**tensors, name: tensors[name].half()}, tmp_path / "model.safetensors")  # one slice in float16
    with pytest.raises(ValueError, match=f"{name} is torch.float16, the other slices of its stack are torch.float32"):
        unmask.from_pretrained(tmp_path)
    assert unmask.from_pretrained(tmp_path, dtype=torch.bfloat16).layers[1].moe.expert_up.dtype == torch.bfloat16


def test_the_expert_bias_stays_float32(checkpoint):
    directory, _ = checkpoint
    loaded = unmask.from_pretrained(directory, dtype=torch.bfloat16)
    assert loaded.layers[1].moe.expert_bias.dtype == torch.float32
    assert loaded.layers[1].moe.router.weight.dtype == torch.bfloat16


def test_where_llada2_does_not_run_yet(checkpoint):
    _, model = checkpoint
    with pytest.raises(ValueError, match="cuda_graph=True needs"):
        unmask.generate(model, [[1, 2]], gen_length=4, block_length=4, cuda_graph=True)
    with pytest.raises(ValueError, match="config.moe needs model_type 'llada2'"):
        unmask.ModelConfig(model_type="sdar", qk_norm=True, block_size=4, moe=MOE)
