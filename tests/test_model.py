"""The transformer and LLaDA-format checkpoints, against a plain forward written here
from the LLaDA tensor names."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

import unmask
from tests.helpers import requires_gpu, tiny_config, tiny_model


def plain_llada_forward(tensors, config, ids, attention_mask=None):
    """LLaDA's forward from its checkpoint tensors, one operation per line, float64."""
    t = {name: value.double() for name, value in tensors.items()}
    pre = "model.transformer."
    heads, kv_heads = config["n_heads"], config["n_kv_heads"]
    head_dim = config["d_model"] // heads
    length = ids.shape[1]

    def rms(x, weight):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + config["rms_norm_eps"]) * weight

    def rope(x):  # x [B, L, H, D]; rotate-half with positions 0..L-1
        freqs = 1.0 / config["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        angle = torch.arange(length, dtype=torch.float64)[:, None] * freqs[None, :]
        cos, sin = angle.cos().repeat(1, 2)[None, :, None], angle.sin().repeat(1, 2)[None, :, None]
        first, second = x[..., : head_dim // 2], x[..., head_dim // 2:]
        return x * cos + torch.cat([-second, first], dim=-1) * sin

    h = t[pre + "wte.weight"][ids]
    for i in range(config["n_layers"]):
        b = f"{pre}blocks.{i}."
        a = rms(h, t[b + "attn_norm.weight"])
        q = (a @ t[b + "q_proj.weight"].T).view(*ids.shape, heads, head_dim)
        k = (a @ t[b + "k_proj.weight"].T).view(*ids.shape, kv_heads, head_dim)
        v = (a @ t[b + "v_proj.weight"].T).view(*ids.shape, kv_heads, head_dim)
        q, k = rope(q), rope(k)
        k = k.repeat_interleave(heads // kv_heads, dim=2)
        v = v.repeat_interleave(heads // kv_heads, dim=2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(head_dim)
        if attention_mask is not None:
            scores = scores.masked_fill(~attention_mask[:, None, None, :], float("-inf"))
        attn = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(*ids.shape, -1)
        h = h + attn @ t[b + "attn_out.weight"].T
        f = rms(h, t[b + "ff_norm.weight"])
        gate, up = f @ t[b + "ff_proj.weight"].T, f @ t[b + "up_proj.weight"].T
        h = h + (torch.nn.functional.silu(gate) * up) @ t[b + "ff_out.weight"].T
    return rms(h, t[pre + "ln_f.weight"]) @ t[pre + "ff_out.weight"].T


def test_loaded_model_matches_plain_llada_forward(tmp_path):
    unmask.save_pretrained(tiny_model(seed=3), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "llada"
    for field in ("d_model", "n_layers", "n_heads", "n_kv_heads", "mlp_hidden_size", "vocab_size",
                  "embedding_size", "rope_theta", "rms_norm_eps", "mask_token_id", "eos_token_id", "weight_tying"):
        assert field in config
    tensors = load_file(tmp_path / "model.safetensors")
    assert "model.transformer.blocks.1.ff_proj.weight" in tensors
    model = unmask.from_pretrained(tmp_path)
    ids = torch.randint(0, 61, (2, 13))
    mask = torch.ones(2, 13, dtype=torch.bool)
    mask[1, :4] = False
    expected = plain_llada_forward(tensors, config, ids, mask)
    with torch.no_grad():
        got = model(ids, mask)
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-4)


def test_sharded_round_trip_and_bf16_stays_bf16(tmp_path):
    model = tiny_model(seed=4).to(torch.bfloat16)
    unmask.save_pretrained(model, tmp_path, max_shard_bytes=4096)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    loaded = unmask.from_pretrained(tmp_path)
    assert all(p.dtype == torch.bfloat16 for p in loaded.parameters())
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    as_fp32 = unmask.from_pretrained(tmp_path, dtype=torch.float32)
    assert as_fp32.embed.weight.dtype == torch.float32


def test_weight_tying(tmp_path):
    model = unmask.DiffusionTransformer.random(tiny_config(weight_tying=True), seed=2)
    assert model.lm_head.weight is model.embed.weight
    unmask.save_pretrained(model, tmp_path)
    assert "model.transformer.ff_out.weight" not in load_file(tmp_path / "model.safetensors")
    loaded = unmask.from_pretrained(tmp_path)
    assert loaded.lm_head.weight is loaded.embed.weight
    ids = torch.randint(0, 61, (1, 5))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids))


def test_left_padding_is_invisible():
    # Rotary attention depends on relative positions only, so a left-padded prompt gives
    # the same logits for its real tokens as the unpadded one.
    model = tiny_model(seed=5)
    ids = torch.randint(0, 59, (1, 9))
    padded = torch.cat([torch.full((1, 4), 7), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 4, dtype=torch.bool), torch.ones(1, 9, dtype=torch.bool)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(model(padded, mask)[:, 4:], model(ids), rtol=1e-4, atol=1e-5)


def test_logit_positions_select_the_head_rows():
    model = tiny_model(seed=6)
    ids = torch.randint(0, 59, (2, 10))
    with torch.no_grad():
        full = model(ids)
        torch.testing.assert_close(model(ids, logit_positions=slice(3, 7)), full[:, 3:7])
        torch.testing.assert_close(model(ids, logit_positions=torch.tensor([9, 0])), full[:, [9, 0]])
        per_row = torch.tensor([[1, 2], [5, 6]])  # each row its own positions
        torch.testing.assert_close(model(ids, logit_positions=per_row), torch.stack([full[0, 1:3], full[1, 5:7]]))
        # other shapes indexed into other layouts than [B, n, V] ([1, n]: row 0's logits alone)
        for bad in (torch.tensor([[1, 2]]), torch.zeros(2, 2, 2, dtype=torch.int64), torch.tensor(3),
                    torch.tensor([1.0, 2.0]), torch.tensor([True, False]), 3, [1, 2]):
            with pytest.raises(ValueError, match="logit_positions must be a slice, or an integer tensor"):
                model(ids, logit_positions=bad)


def test_block_causal_model_hides_later_blocks():
    model = unmask.DiffusionTransformer.random(tiny_config(block_size=4), seed=7, std=0.3)
    ids = torch.randint(0, 59, (1, 12))
    changed = ids.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % 59
    with torch.no_grad():
        a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :8], b[:, :8])
    assert not torch.allclose(a[:, 8:], b[:, 8:])


@pytest.mark.parametrize("block_size", [None, 4])
@pytest.mark.parametrize("model_type", ["llada", "dream"])
def test_a_left_padded_row_has_the_logits_it_has_alone(model_type, block_size):
    # Left padding is invisible: every real position's logits are the row's own, alone.
    # Two cases needed the model to know where a row starts: a block-causal model's grid
    # (it met the blocks shifted by the padding), and a shifted (Dream) model's first real
    # token (predicted from the pad before it; alone, position 0 keeps its own state).
    model = tiny_model(seed=5, model_type=model_type, include_qkv_bias=model_type == "dream", block_size=block_size)
    ids = torch.randint(0, 59, (3, 11))
    pads = (3, 6, 0)
    mask = torch.arange(11) >= torch.tensor(pads)[:, None]
    with torch.no_grad():
        full = model(ids, mask)
        picked = model(ids, mask, logit_positions=torch.tensor([[3, 4], [6, 10], [0, 5]]))
        for row, pad in enumerate(pads):
            alone = model(ids[row:row + 1, pad:])[0]
            torch.testing.assert_close(full[row, pad:], alone, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(picked[row, 0], alone[0], rtol=1e-5, atol=1e-5)


def test_a_segment_gives_a_padded_rows_first_token_its_own_logits():
    # Dream layout, row 0 padded by 5: position 5 is predicted from itself in a cached
    # segment as in the full forward. Row 2, padded by 8, starts past the segment: its
    # position 8 keeps the pad before it (its state is not computed; the index into the
    # segment's rows ran off their end).
    model = tiny_model(seed=1, model_type="dream", include_qkv_bias=True)
    ids = torch.randint(0, 59, (3, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.arange(12) >= torch.tensor([5, 0, 8])[:, None]
    cache = model.new_cache(3, 12)
    with torch.no_grad():
        full = model(ids, mask, cache=cache)
        segment = model(ids, mask, cache=cache, segment=(4, 8), logit_positions=slice(5, 9))
        alone = model(ids[:1, 5:])
    torch.testing.assert_close(segment[:2], full[:2, 5:9], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(segment[0, 0], alone[0, 0], rtol=1e-5, atol=1e-5)


def test_tokenizer_is_loaded_when_present(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    unmask.save_pretrained(tiny_model(), tmp_path)
    tokenizer = Tokenizer(models.WordLevel({"hello": 0, "world": 1, "[UNK]": 2}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    loaded = unmask.from_pretrained(tmp_path)
    assert loaded.tokenizer.encode("hello world").ids == [0, 1]


def test_checkpoint_errors_name_the_tensor(tmp_path):
    unmask.save_pretrained(tiny_model(), tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    missing = dict(tensors)
    del missing["model.transformer.blocks.0.q_proj.weight"]
    save_file(missing, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="missing tensors.*blocks.0.q_proj.weight"):
        unmask.from_pretrained(tmp_path)
    wrong = dict(tensors)
    wrong["model.transformer.ln_f.weight"] = torch.ones(7)
    save_file(wrong, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="ln_f.weight has shape"):
        unmask.from_pretrained(tmp_path)
    extra = dict(tensors)
    extra["model.transformer.extra.weight"] = torch.ones(1)
    save_file(extra, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="unexpected tensors.*extra.weight"):
        unmask.from_pretrained(tmp_path)


def test_unknown_model_type(tmp_path):
    unmask.save_pretrained(tiny_model(), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["model_type"] = "gpt2"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="model_type"):
        unmask.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        unmask.from_pretrained(tmp_path / "nowhere")


@requires_gpu
@pytest.mark.parametrize("tied", [False, True])
def test_random_model_is_drawn_on_the_gpu(tied):
    """DiffusionTransformer.random on an accelerator builds on the meta device and draws the
    weights there: every parameter written (no uninitialised memory), ties kept, norms 1."""
    config = tiny_config(weight_tying=tied)
    model = unmask.DiffusionTransformer.random(config, seed=4, dtype=torch.bfloat16, device="cuda")
    again = unmask.DiffusionTransformer.random(config, seed=4, dtype=torch.bfloat16, device="cuda")
    assert (model.lm_head.weight is model.embed.weight) == tied
    for (name, param), other in zip(model.named_parameters(), again.parameters()):
        assert param.device.type == "cuda" and param.dtype == torch.bfloat16
        assert torch.equal(param, other), f"{name}: the same seed gives the same weights"
        if name.endswith("norm.weight"):
            assert bool((param == 1).all())
        else:
            assert 0.015 < float(param.float().std()) < 0.025, name


@pytest.mark.parametrize("model_type", ["llada", "dream"])
def test_logits_asked_for_outside_the_segment_are_an_error(model_type):
    # The segment computes positions 4..7; the logits of a position come from its hidden
    # state (LLaDA) or the one before it (Dream). Anything else used to wrap round to
    # other positions' rows and come back as wrong logits, with no error.
    model = tiny_model(seed=1, model_type=model_type)
    ids = torch.randint(0, 59, (2, 12), generator=torch.Generator().manual_seed(0))
    cache = model.new_cache(2, 12)
    with torch.no_grad():
        full = model(ids, cache=cache)
        inside = slice(5, 9) if model_type == "dream" else slice(4, 8)
        assert torch.equal(model(ids, logit_positions=inside, cache=cache, segment=(4, 8)), full[:, inside])
        for outside in (slice(2, 6), slice(inside.start - 1, inside.stop - 1), slice(inside.start + 1, inside.stop + 1),
                        torch.tensor([inside.stop]),
                        torch.tensor([[inside.start] * 2, [inside.start - 1] * 2])):
            with pytest.raises(ValueError, match="logit_positions"):
                model(ids, logit_positions=outside, cache=cache, segment=(4, 8))
        if model_type == "dream":
            with pytest.raises(ValueError, match="logit_positions"):
                model(ids, cache=cache, segment=(4, 8))


def test_bad_input_ids_and_groups_are_refused_naming_them():
    model = tiny_model(seed=6)
    for bad, error, message in ((torch.zeros(0, 4, dtype=torch.int64), ValueError, "input_ids must be"),
                                (torch.zeros(2, 0, dtype=torch.int64), ValueError, "input_ids must be"),
                                (torch.zeros(2, 4), TypeError, "input_ids must hold integer token ids"),
                                (torch.zeros(2, 4, dtype=torch.bool), TypeError, "input_ids must hold integer")):
        with pytest.raises(error, match=message):
            model(bad)
    with pytest.raises(ValueError, match="groups: one or more Rows"):
        model.forward_packed([])
