"""Dream and Fast-dLLM v2 checkpoints written here in the published on-disk formats (Qwen2
names, qkv bias, logits shifted by one; Fast-dLLM v2's block-causal attention over bd_size),
loaded by unmask and checked against a plain forward."""

import json
import math
import re

import pytest
import torch
from safetensors.torch import save_file

import unmask
from tests.helpers import tiny_model

DREAM_CONFIG = {
    "architectures": ["DreamModel"],
    "model_type": "Dream",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
    "vocab_size": 50,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
    "mask_token_id": 49,
    "eos_token_id": 48,
    "pad_token_id": 48,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "torch_dtype": "bfloat16",
}


def dream_tensors(config, seed=0, qwen3=False):
    """Qwen2's tensors (Dream's); qwen3: no biases, q/k norms, q and o sized by head_dim."""
    gen = torch.Generator().manual_seed(seed)
    d, f, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    head_dim = config.get("head_dim") or d // config["num_attention_heads"]
    q, kv = config["num_attention_heads"] * head_dim, config["num_key_value_heads"] * head_dim

    def rand(*shape):
        return torch.randn(*shape, generator=gen) * 0.3

    tensors = {"model.embed_tokens.weight": rand(v, d), "model.norm.weight": 1 + rand(d), "lm_head.weight": rand(v, d)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        tensors.update({
            p + "input_layernorm.weight": 1 + rand(d),
            p + "post_attention_layernorm.weight": 1 + rand(d),
            p + "self_attn.q_proj.weight": rand(q, d), p + "self_attn.k_proj.weight": rand(kv, d),
            p + "self_attn.v_proj.weight": rand(kv, d), p + "self_attn.o_proj.weight": rand(d, q),
            p + "mlp.gate_proj.weight": rand(f, d), p + "mlp.up_proj.weight": rand(f, d),
            p + "mlp.down_proj.weight": rand(d, f),
        })
        if qwen3:
            tensors.update({p + "self_attn.q_norm.weight": 1 + rand(head_dim),
                            p + "self_attn.k_norm.weight": 1 + rand(head_dim)})
        else:
            tensors.update({p + "self_attn.q_proj.bias": rand(q), p + "self_attn.k_proj.bias": rand(kv),
                            p + "self_attn.v_proj.bias": rand(kv)})
    return tensors


def plain_dream_forward(t, config, ids, attention_mask, block_size=None, shift=True):
    """Qwen2 blocks (Qwen3's where the tensors are: no biases, per-head q/k norms before
    rotary, config's head_dim), bidirectional (or block-causal over blocks of block_size
    counted from the row's first real token), positions counted over real tokens, logits
    shifted right (shift)."""
    t = {name: value.double() for name, value in t.items()}
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    positions = (attention_mask.long().cumsum(1) - 1).clamp(min=0).double()

    def rms(x, w):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + config["rms_norm_eps"]) * w

    def rope(x):
        freqs = 1.0 / config["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        angle = positions[..., None] * freqs
        cos, sin = angle.cos().repeat(1, 1, 2)[:, :, None], angle.sin().repeat(1, 1, 2)[:, :, None]
        half = head_dim // 2
        return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin

    h = t["model.embed_tokens.weight"][ids]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        a = rms(h, t[p + "input_layernorm.weight"])

        def project(name, n):
            out = a @ t[p + f"self_attn.{name}.weight"].T
            return (out + t[p + f"self_attn.{name}.bias"] if p + f"self_attn.{name}.bias" in t else out).view(
                *ids.shape, n, head_dim)

        q, k, v = project("q_proj", heads), project("k_proj", kv_heads), project("v_proj", kv_heads)
        if p + "self_attn.q_norm.weight" in t:
            q, k = rms(q, t[p + "self_attn.q_norm.weight"]), rms(k, t[p + "self_attn.k_norm.weight"])
        q, k = rope(q), rope(k)
        k, v = (z.repeat_interleave(heads // kv_heads, dim=2) for z in (k, v))
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(head_dim)
        hidden = ~attention_mask[:, None, None, :]
        if block_size is not None:  # query block >= key block, on the real tokens' positions
            blocks = positions.long() // block_size
            hidden = hidden | (blocks[:, None, :, None] < blocks[:, None, None, :])
        scores = scores.masked_fill(hidden, float("-inf"))
        h = h + torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(*ids.shape, -1) @ t[p + "self_attn.o_proj.weight"].T
        m = rms(h, t[p + "post_attention_layernorm.weight"])
        h = h + (torch.nn.functional.silu(m @ t[p + "mlp.gate_proj.weight"].T) * (m @ t[p + "mlp.up_proj.weight"].T)) @ t[p + "mlp.down_proj.weight"].T
    logits = rms(h, t["model.norm.weight"]) @ t["lm_head.weight"].T
    if not shift:
        return logits
    shifted = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
    # A left-padded row's first real token keeps its own state, as position 0 does: unmask's
    # choice (README, model), where Dream's code predicts it from the pad before it and a
    # padded row decodes otherwise than alone. Every other position is Dream's.
    rows, first = torch.arange(ids.shape[0]), attention_mask.to(torch.int32).argmax(dim=1)
    shifted[rows, first] = logits[rows, first]
    return shifted


def write_dream(directory, tensors, config=DREAM_CONFIG, shards=2):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    names = sorted(tensors)
    weight_map = {}
    for shard in range(shards):
        file_name = f"model-{shard + 1:05d}-of-{shards:05d}.safetensors"
        part = {name: tensors[name].to(torch.bfloat16).contiguous() for name in names[shard::shards]}
        save_file(part, directory / file_name, metadata={"format": "pt"})
        weight_map.update({name: file_name for name in part})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_dream_checkpoint_matches_plain_forward(tmp_path):
    tensors = dream_tensors(DREAM_CONFIG)
    write_dream(tmp_path, tensors)
    model = unmask.from_pretrained(tmp_path)
    assert model.config.model_type == "dream" and model.config.include_qkv_bias
    assert model.embed.weight.dtype == torch.bfloat16, "bf16 weights load as bf16"
    model = model.float()
    ids = torch.randint(0, 48, (2, 11))
    mask = torch.ones(2, 11, dtype=torch.bool)
    mask[1, :3] = False
    stored = {name: value.to(torch.bfloat16).float() for name, value in tensors.items()}
    expected = plain_dream_forward(stored, DREAM_CONFIG, ids, mask)
    with torch.no_grad():
        got = model(ids, mask)
        torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(model(ids, mask, logit_positions=slice(4, 9)), got[:, 4:9])


# Fast-dLLM v2 (Efficient-Large-Model/Fast_dLLM_v2_7B) at a tiny size: its config.json's
# fields (model_type, bd_size, its training-only "conplemenrary_mask" as it spells it);
# mask_token_id is set because 151665 lies outside this vocabulary.
FAST_DLLM_V2_CONFIG = {**DREAM_CONFIG, "architectures": ["Fast_dLLM_QwenForCausalLM"], "model_type": "Fast_dLLM_Qwen",
                       "bd_size": 4, "conplemenrary_mask": True, "use_sliding_window": False,
                       "auto_map": {"AutoConfig": "configuration.Fast_dLLM_QwenConfig"}}


def test_fast_dllm_v2_checkpoint_matches_plain_forward(tmp_path):
    tensors = dream_tensors(FAST_DLLM_V2_CONFIG, seed=2)
    write_dream(tmp_path, tensors, config=FAST_DLLM_V2_CONFIG)
    model = unmask.from_pretrained(tmp_path, dtype=torch.float32)
    assert model.config.block_size == 4 and model.config.shift_logits and model.config.include_qkv_bias
    ids = torch.randint(0, 48, (2, 13))
    mask = torch.ones(2, 13, dtype=torch.bool)
    mask[1, :3] = False  # a padded row: its blocks count from its first real token
    stored = {name: value.to(torch.bfloat16).float() for name, value in tensors.items()}
    expected = plain_dream_forward(stored, FAST_DLLM_V2_CONFIG, ids, mask, block_size=4)
    with torch.no_grad():
        # (a pad's own logits are nobody's: compared where tokens are real)
        torch.testing.assert_close(model(ids, mask).double()[mask], expected[mask], rtol=1e-4, atol=1e-4)
    bidirectional = plain_dream_forward(stored, FAST_DLLM_V2_CONFIG, ids, mask)
    assert not torch.allclose(bidirectional, expected, rtol=1e-3, atol=1e-3)  # the mask is seen


def test_fast_dllm_v2_config_reads_as_the_7b_model(tmp_path):
    # config.json of Fast_dLLM_v2_7B (the fields that shape the model; no mask id in it)
    fields = {"architectures": ["Fast_dLLM_QwenForCausalLM"], "model_type": "Fast_dLLM_Qwen", "bd_size": 32,
              "conplemenrary_mask": True, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
              "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064, "rope_theta": 1000000.0,
              "rms_norm_eps": 1e-06, "tie_word_embeddings": False, "bos_token_id": 151643, "eos_token_id": 151645,
              "hidden_act": "silu", "use_sliding_window": False, "rope_scaling": None}
    (tmp_path / "config.json").write_text(json.dumps(fields))
    config = unmask.models.checkpoint.skeleton(tmp_path).config  # on the meta device: no 7B in memory
    assert (config.block_size, config.mask_token_id, config.eos_token_id) == (32, 151665, 151645)
    assert (config.d_model, config.n_heads, config.n_kv_heads, config.head_dim) == (3584, 28, 4, 128)
    assert config.shift_logits and config.include_qkv_bias and not config.weight_tying
    (tmp_path / "config.json").write_text(json.dumps({**fields, "bd_size": None, "mask_token_id": None}))
    config = unmask.models.checkpoint.skeleton(tmp_path).config  # null reads as absent
    assert (config.block_size, config.mask_token_id) == (32, 151665)


# SDAR (JetLM/SDAR-4B-Chat) at a tiny size: Qwen3's config fields, a head dim (16) apart
# from hidden_size / heads (8), and the block size and mask id its config.json lacks.
SDAR_CONFIG = {"architectures": ["SDARForCausalLM"], "model_type": "sdar", "hidden_size": 32, "intermediate_size": 64,
               "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
               "vocab_size": 50, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
               "attention_bias": False, "hidden_act": "silu", "use_sliding_window": False, "rope_scaling": None,
               "bos_token_id": 48, "eos_token_id": 48, "block_size": 4, "mask_token_id": 49,
               "fuse_cross_entropy": True, "torch_dtype": "bfloat16"}


def test_sdar_checkpoint_matches_plain_forward(tmp_path):
    tensors = dream_tensors(SDAR_CONFIG, seed=3, qwen3=True)
    write_dream(tmp_path / "a", tensors, config=SDAR_CONFIG)
    model = unmask.from_pretrained(tmp_path / "a", dtype=torch.float32)
    assert (model.config.block_size, model.config.head_dim, model.config.qk_norm) == (4, 16, True)
    assert not model.config.shift_logits and not model.config.include_qkv_bias
    ids = torch.randint(0, 48, (2, 13))
    mask = torch.ones(2, 13, dtype=torch.bool)
    mask[1, :3] = False
    stored = {name: value.to(torch.bfloat16).float() for name, value in tensors.items()}
    expected = plain_dream_forward(stored, SDAR_CONFIG, ids, mask, block_size=4, shift=False)
    with torch.no_grad():
        got = model(ids, mask).double()
        torch.testing.assert_close(got[mask], expected[mask], rtol=1e-4, atol=1e-4)
    without_norms = {name: value for name, value in stored.items() if "_norm" not in name or "layernorm" in name}
    unnormed = plain_dream_forward(without_norms, SDAR_CONFIG, ids, mask, block_size=4, shift=False)
    assert not torch.allclose(unnormed[mask], expected[mask], rtol=1e-3, atol=1e-3)  # the q/k norms are read
    unmask.save_pretrained(model, tmp_path / "b")
    assert json.loads((tmp_path / "b" / "config.json").read_text())["model_type"] == "sdar"
    with torch.no_grad():
        torch.testing.assert_close(unmask.from_pretrained(tmp_path / "b")(ids, mask), model(ids, mask))


def test_sdar_config_reads_as_the_4b_model(tmp_path):
    # config.json of SDAR-4B-Chat (the fields that shape the model): no block size, no mask id
    fields = {"architectures": ["SDARForCausalLM"], "model_type": "sdar", "hidden_size": 2560,
              "intermediate_size": 9728, "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8,
              "head_dim": 128, "vocab_size": 151936, "rope_theta": 1000000, "rms_norm_eps": 1e-06,
              "tie_word_embeddings": False, "attention_bias": False, "hidden_act": "silu", "bos_token_id": 151643,
              "eos_token_id": 151643, "use_sliding_window": False, "rope_scaling": None}
    (tmp_path / "config.json").write_text(json.dumps(fields))
    config = unmask.models.checkpoint.skeleton(tmp_path).config
    assert (config.block_size, config.mask_token_id, config.head_dim, config.d_model) == (4, 151669, 128, 2560)
    assert (config.n_layers, config.n_heads, config.n_kv_heads, config.mlp_hidden_size) == (36, 32, 8, 9728)
    assert config.qk_norm and not config.shift_logits and not config.include_qkv_bias
    fields.update(block_size=None, mask_token_id=None)  # null as absent
    (tmp_path / "config.json").write_text(json.dumps(fields))
    assert unmask.models.checkpoint.skeleton(tmp_path).config.block_size == 4
    fields.update(block_size=0)
    (tmp_path / "config.json").write_text(json.dumps(fields))
    with pytest.raises(ValueError, match="config.block_size must be None or >= 1, got 0"):
        unmask.models.checkpoint.skeleton(tmp_path)


@pytest.mark.parametrize("overrides,fragment", [
    (dict(model_type="sdar", qk_norm=True), "config.block_size must be set for model_type 'sdar'"),
    (dict(model_type="sdar", block_size=4), "config.qk_norm must be True for model_type 'sdar'"),
    (dict(model_type="sdar", qk_norm=True, block_size=4, include_qkv_bias=True), "config.include_qkv_bias must be"),
    (dict(qk_norm=True), "config.qk_norm needs model_type 'sdar'"),
    (dict(model_type="dream", qk_norm=True), "config.qk_norm needs model_type 'sdar'"),
    (dict(model_type="dream", attention_head_dim=16), "config.attention_head_dim must be d_model / n_heads (8)"),
])
def test_layouts_a_checkpoint_format_cannot_hold_are_refused(overrides, fragment):
    # each would save a checkpoint that loads as another model, or not at all
    with pytest.raises(ValueError, match=re.escape(fragment)):
        unmask.ModelConfig(d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, mlp_hidden_size=64, vocab_size=50,
                           embedding_size=50, mask_token_id=49, eos_token_id=48, **overrides)


def test_a_llada_layout_keeps_its_own_head_dim(tmp_path):
    model = tiny_model(seed=3, attention_head_dim=16)
    unmask.save_pretrained(model, tmp_path)
    ids = torch.randint(0, 59, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(unmask.from_pretrained(tmp_path)(ids), model(ids))


def test_dream_round_trip_and_generate(tmp_path):
    write_dream(tmp_path / "a", dream_tensors(DREAM_CONFIG, seed=1))
    model = unmask.from_pretrained(tmp_path / "a", dtype=torch.float32)
    unmask.save_pretrained(model, tmp_path / "b")
    assert json.loads((tmp_path / "b" / "config.json").read_text())["model_type"] == "Dream"
    again = unmask.from_pretrained(tmp_path / "b")
    ids = torch.randint(0, 48, (1, 6))
    with torch.no_grad():
        torch.testing.assert_close(again(ids), model(ids))
    out = unmask.generate(model, [[1, 2, 3]], gen_length=8, block_length=4, steps=8)
    assert not (out.tokens == 49).any()


def test_generation_configs_eos_list_is_where_rows_stop(tmp_path):
    """generation_config.json's eos_token_id (one id or a list, as a Qwen-based chat model
    lists <|im_end|> and <|endoftext|>) is the model's stop list: generate stops a row at
    any of them by default; save_pretrained writes it back."""
    write_dream(tmp_path / "a", dream_tensors(DREAM_CONFIG, seed=1))
    model = unmask.from_pretrained(tmp_path / "a", dtype=torch.float32)
    assert model.stop_ids is None and model.eos_ids == (model.eos_id,)
    free = unmask.generate(model, [[1, 2, 3]], gen_length=8, block_length=4, steps=8, stop_at_eos=False)
    end = int(free.tokens[0, 1])  # a token of the first block, taken for <|im_end|>
    (tmp_path / "a" / "generation_config.json").write_text(json.dumps({"eos_token_id": [end, model.eos_id]}))
    listed = unmask.from_pretrained(tmp_path / "a", dtype=torch.float32)
    assert listed.stop_ids == (end, model.eos_id)
    assert listed.eos_ids == (model.eos_id, end)  # the config's EOS first: it pads and fills, as before
    out = unmask.generate(listed, [[1, 2, 3]], gen_length=8, block_length=4, steps=8)
    first = free.tokens[0].tolist().index(end)
    assert out.tokens[0].tolist() == free.tokens[0].tolist()[:first + 1] + [model.eos_id] * (7 - first)
    assert out.nfe == 4  # the second block never ran
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "generation_config.json").write_text(json.dumps({"eos_token_id": 3, "top_p": 0.95}))
    unmask.save_pretrained(listed, tmp_path / "b")  # into a directory with another generation_config
    assert unmask.from_pretrained(tmp_path / "b").stop_ids == (end, model.eos_id)
    assert json.loads((tmp_path / "b" / "generation_config.json").read_text())["top_p"] == 0.95  # kept
    unmask.save_pretrained(model, tmp_path / "b")  # no list: the stale one goes, the rest stays
    assert unmask.from_pretrained(tmp_path / "b").stop_ids is None
    assert json.loads((tmp_path / "b" / "generation_config.json").read_text()) == {"top_p": 0.95}
    (tmp_path / "a" / "generation_config.json").write_text(json.dumps({"eos_token_id": end, "do_sample": False}))
    assert unmask.models.checkpoint.skeleton(tmp_path / "a").eos_ids == (end,)
    (tmp_path / "a" / "generation_config.json").write_text(json.dumps({"eos_token_id": None}))
    assert unmask.models.checkpoint.skeleton(tmp_path / "a").stop_ids is None
    mask = model.mask_id
    for bad in ("[]", '{"eos_token_id": []}', '{"eos_token_id": "</s>"}', '{"eos_token_id": [1, -2]}', "{",
                f'{{"eos_token_id": [1, {mask}]}}', '{"eos_token_id": 100000}'):  # the mask id, past the vocabulary
        (tmp_path / "a" / "generation_config.json").write_text(bad)
        with pytest.raises(ValueError, match="generation_config.json"):
            unmask.models.checkpoint.skeleton(tmp_path / "a")


def test_dream_mismatched_tensor_is_named(tmp_path):
    tensors = dream_tensors(DREAM_CONFIG)
    tensors["model.layers.1.self_attn.k_proj.bias"] = torch.zeros(5)
    write_dream(tmp_path, tensors, shards=1)
    with pytest.raises(ValueError, match="layers.1.self_attn.k_proj.bias has shape"):
        unmask.from_pretrained(tmp_path)


@pytest.mark.parametrize("field,value", [("layer_norm_type", "gemma_rms"), ("activation_type", "gelu"),
                                         ("scale_logits", True), ("alibi", True), ("input_emb_norm", True),
                                         ("clip_qkv", 8.0)])
def test_llada_config_fields_the_model_does_not_implement_are_refused(tmp_path, field, value):
    # each changes the forward pass without changing a tensor's name: the checkpoint would
    # load and run wrongly
    from tests.helpers import tiny_model

    unmask.save_pretrained(tiny_model(), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    unmask.from_pretrained(tmp_path)  # as saved: every field supported
    (tmp_path / "config.json").write_text(json.dumps({**config, field: value}))
    with pytest.raises(ValueError, match=f"config.json: {field}="):
        unmask.from_pretrained(tmp_path)


@pytest.mark.parametrize("field,value", [("rope_scaling", {"type": "linear", "factor": 2.0}),
                                         ("use_sliding_window", True), ("hidden_act", "gelu")])
def test_dream_config_fields_the_model_does_not_implement_are_refused(tmp_path, field, value):
    write_dream(tmp_path, dream_tensors(DREAM_CONFIG), config={**DREAM_CONFIG, field: value}, shards=1)
    with pytest.raises(ValueError, match=f"config.json: {field}="):
        unmask.from_pretrained(tmp_path)


@pytest.mark.parametrize("field,value", [("attention_bias", True), ("rope_scaling", {"type": "yarn", "factor": 4.0}),
                                         ("use_sliding_window", True)])
def test_sdar_config_fields_the_model_does_not_implement_are_refused(tmp_path, field, value):
    write_dream(tmp_path, dream_tensors(SDAR_CONFIG, qwen3=True), config={**SDAR_CONFIG, field: value}, shards=1)
    with pytest.raises(ValueError, match=f"config.json: {field}="):
        unmask.from_pretrained(tmp_path)


def test_dream_tokenizer_files_without_tokenizer_json_give_a_tokenizer(tmp_path):
    # Dream ships vocab.json and merges.txt with a tokenizer written as code (and no
    # tokenizer.json): the checkpoint's text in and out used to be unavailable
    # (generate --prompt and serve need a tokenizer). Built as Qwen2's byte-level BPE,
    # the checkpoint's code left alone.
    pytest.importorskip("transformers", reason="the hf extra")
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    write_dream(tmp_path, dream_tensors(DREAM_CONFIG), shards=1)
    vocab = {symbol: i for i, symbol in enumerate(bytes_to_unicode().values())}
    merges = [("h", "e"), ("l", "l"), ("he", "ll"), ("hell", "o"), ("Ġ", "w"), ("o", "r"), ("Ġw", "or"), ("l", "d"),
              ("Ġwor", "ld"), ("1", "2")]
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    special = {"special": True, "lstrip": False, "rstrip": False, "normalized": False, "single_word": False}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "DreamTokenizer", "auto_map": {"AutoTokenizer": ["tokenization_dream.DreamTokenizer", None]},
        "added_tokens_decoder": {str(len(vocab)): {"content": "<|mask|>", **special}}}))
    (tmp_path / "tokenization_dream.py").write_text("raise RuntimeError('the checkpoint code ran')\n")
    tokenizer = unmask.from_pretrained(tmp_path).tokenizer
    ids = tokenizer.encode("hello world 12<|mask|>").ids
    # Qwen2's pre-tokenization: digits one by one (the "1 2" merge never applies), the
    # added token whole
    assert ids == [vocab["hello"], vocab["Ġworld"], vocab["Ġ"], vocab["1"], vocab["2"], len(vocab)]
    assert tokenizer.decode(ids[:5]) == "hello world 12"
