"""Model configuration: one dataclass for the bidirectional transformer.

Field names follow LLaDA's config.json (d_model, n_layers, ...), so a LLaDA
checkpoint's config maps onto it directly.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from unmask import validation

# LLaDA-8B's token ids (its tokenizer): the mask token and <|endoftext|>.
LLADA_MASK_ID = 126336
LLADA_EOS_ID = 126081
# Dream-v0's (Qwen2.5 tokenizer): <|mask|> and <|endoftext|>.
DREAM_MASK_ID = 151666
DREAM_EOS_ID = 151643
# Fast-dLLM v2's |<MASK>|, added to Qwen2.5's tokenizer; its config.json carries no mask
# id (its code, and SGLang's, use this constant), and its blocks are config.json's bd_size.
FAST_DLLM_V2_MASK_ID = 151665
FAST_DLLM_V2_BLOCK_SIZE = 32
# SDAR's <|MASK|> (added to Qwen3's tokenizer) and its blocks of 4: SDAR-*-Chat's
# config.json names neither (SGLang and LMDeploy use these constants); the -b16 and -b64
# variants need "block_size" written into their config.json.
SDAR_MASK_ID = 151669
SDAR_BLOCK_SIZE = 4
QWEN3_HEAD_DIM = 128  # Qwen3Config's head_dim where config.json has none
# LLaDA 2.0's <|mask|> and <|endoftext|> (its config.json names neither: its generate()'s
# defaults, and SGLang's constants) and the blocks its generate() decodes in.
LLADA2_MASK_ID = 156895
LLADA2_EOS_ID = 156892
LLADA2_BLOCK_SIZE = 32

# Layouts: "llada" (logits at their own position), "dream" (logits shifted right by one,
# positions over real tokens), "sdar" (LLaDA's layout in Qwen3's names, with q/k norms),
# "llada2" (LLaDA's layout in LLaDA 2.0's names: q/k norms, a fused qkv projection,
# partial rotary, mixture-of-experts MLPs).
MODEL_TYPES = ("llada", "dream", "sdar", "llada2")


def stop_list(listed: tuple[int, ...] | None, eos_id: int) -> tuple[int, ...]:
    """A model's EOS ids (where generate stops a row): listed (generation_config.json's),
    the config's eos_id first where it is among them (the first pads and fills), or
    (eos_id,) where nothing is listed."""
    if listed is None:
        return (eos_id,)
    return (eos_id, *(i for i in listed if i != eos_id)) if eos_id in listed else listed


@dataclasses.dataclass(frozen=True)
class MoeConfig:
    """Mixture-of-experts MLPs (LLaDA 2.0's, after DeepSeek-V3's routing): each token's
    router scores sigmoid(W h) in float32; experts are chosen by score + expert_bias
    (the bias balances load and only selects) within the top_groups of n_groups groups
    (a group ranked by the sum of its two best biased scores); the chosen experts'
    unbiased scores, normalised to sum to 1 and times routed_scaling, weight their SwiGLU
    outputs; n_shared_experts more (one MLP of n_shared_experts * expert_hidden_size)
    see every token. The first dense_layers layers keep the dense MLP."""

    n_experts: int
    experts_per_token: int
    expert_hidden_size: int
    n_shared_experts: int = 0
    n_groups: int = 1
    top_groups: int = 1
    routed_scaling: float = 1.0
    dense_layers: int = 0

    def __post_init__(self) -> None:
        for name in ("n_experts", "experts_per_token", "expert_hidden_size", "n_groups", "top_groups"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"config.moe.{name} must be a positive int, got {value!r}")
        for name in ("n_shared_experts", "dense_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"config.moe.{name} must be an int >= 0, got {value!r}")
        if self.n_experts % self.n_groups != 0:
            raise ValueError(f"config.moe.n_experts ({self.n_experts}) must be a multiple of n_groups ({self.n_groups})")
        if self.top_groups > self.n_groups:
            raise ValueError(f"config.moe.top_groups ({self.top_groups}) must be <= n_groups ({self.n_groups})")
        if self.experts_per_token > self.top_groups * (self.n_experts // self.n_groups):
            raise ValueError(f"config.moe.experts_per_token ({self.experts_per_token}) must be at most the experts of "
                             f"top_groups groups ({self.top_groups * (self.n_experts // self.n_groups)})")
        if self.n_experts // self.n_groups < 2:
            raise ValueError("config.moe needs at least 2 experts per group (a group is ranked by its best two)")
        if not (isinstance(self.routed_scaling, (int, float)) and self.routed_scaling > 0):
            raise ValueError(f"config.moe.routed_scaling must be > 0, got {self.routed_scaling!r}")

    def is_moe_layer(self, layer: int) -> bool:
        return layer >= self.dense_layers


@dataclasses.dataclass
class ModelConfig:
    d_model: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 32
    mlp_hidden_size: int = 12288
    vocab_size: int = 126464
    embedding_size: int = 126464
    rope_theta: float = 500000.0
    rms_norm_eps: float = 1e-5
    mask_token_id: int = LLADA_MASK_ID
    eos_token_id: int = LLADA_EOS_ID
    weight_tying: bool = False
    include_qkv_bias: bool = False
    # Block diffusion: attention lets position p see key j when j // block_size <= p // block_size.
    block_size: int | None = None
    model_type: str = "llada"  # "dream": logits shifted right by one, positions over real tokens
    # Qwen3: a head dim set apart from d_model / n_heads, and RMS norms of each head's
    # query and key (over head_dim, weights shared by the heads) before rotary.
    attention_head_dim: int | None = None
    qk_norm: bool = False
    # Rotary embeddings over each head's first rotary_dim dims only (LLaDA 2.0: half of
    # them); None: all of them.
    rotary_dim: int | None = None
    moe: MoeConfig | None = None  # mixture-of-experts MLPs (model_type "llada2")

    def __post_init__(self) -> None:
        for name in ("d_model", "n_layers", "n_heads", "n_kv_heads", "mlp_hidden_size", "vocab_size", "embedding_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"config.{name} must be a positive int, got {value!r}")
        if self.attention_head_dim is not None and (not isinstance(self.attention_head_dim, int)
                                                    or isinstance(self.attention_head_dim, bool)
                                                    or self.attention_head_dim < 1):
            raise ValueError(f"config.attention_head_dim must be None or a positive int, got "
                             f"{self.attention_head_dim!r}")
        if self.attention_head_dim is None and self.d_model % self.n_heads != 0:
            raise ValueError(f"config.d_model ({self.d_model}) must be a multiple of n_heads ({self.n_heads})")
        if self.n_heads % self.n_kv_heads != 0:
            raise ValueError(f"config.n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2 != 0:
            raise ValueError(f"the head dim (attention_head_dim, else d_model / n_heads) must be even for rotary "
                             f"embeddings, got {self.head_dim}")
        if self.embedding_size < self.vocab_size:
            raise ValueError(f"config.embedding_size ({self.embedding_size}) must be >= vocab_size ({self.vocab_size})")
        for name in ("mask_token_id", "eos_token_id"):
            value = getattr(self, name)
            if not 0 <= value < self.embedding_size:
                raise ValueError(f"config.{name} ({value}) must lie in [0, embedding_size={self.embedding_size})")
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"config.model_type must be one of {MODEL_TYPES}, got {self.model_type!r}")
        if self.block_size is not None and self.block_size < 1:
            raise ValueError(f"config.block_size must be None or >= 1, got {self.block_size}")
        if self.rotary_dim is not None and (not isinstance(self.rotary_dim, int) or isinstance(self.rotary_dim, bool)
                                            or not 2 <= self.rotary_dim <= self.head_dim or self.rotary_dim % 2):
            raise ValueError(f"config.rotary_dim must be None or an even int in [2, head_dim={self.head_dim}], got "
                             f"{self.rotary_dim!r}")
        if isinstance(self.moe, dict):  # as dataclasses.asdict and JSON give it back
            self.moe = MoeConfig(**self.moe)
        if self.moe is not None and not isinstance(self.moe, MoeConfig):
            raise ValueError(f"config.moe must be None or a MoeConfig, got {type(self.moe).__name__}")
        self._check_layout()

    def _check_layout(self) -> None:
        """What each layout's checkpoint format can hold: a model it could not save and
        load back as the same model is refused, naming the field."""
        if self.model_type != "llada2":
            for name in ("moe", "rotary_dim"):
                if getattr(self, name) is not None:
                    raise ValueError(f"config.{name} needs model_type 'llada2' (LLaDA 2.0's names); "
                                     f"{self.model_type!r} checkpoints cannot hold it")
        if self.model_type in ("sdar", "llada2"):  # q/k norms, no biases; both are block-causal
            for name, wanted in (("qk_norm", True), ("include_qkv_bias", False)):
                if getattr(self, name) != wanted:
                    raise ValueError(f"config.{name} must be {wanted} for model_type {self.model_type!r}, got "
                                     f"{getattr(self, name)}")
            if self.block_size is None:
                raise ValueError(f"config.block_size must be set for model_type {self.model_type!r} (a block "
                                 "diffusion model)")
            return
        if self.qk_norm:
            raise ValueError(f"config.qk_norm needs model_type 'sdar' or 'llada2'; {self.model_type!r} "
                             "checkpoints have no q/k norm weights")
        if self.model_type == "dream" and self.attention_head_dim not in (None, self.d_model // self.n_heads):
            raise ValueError(f"config.attention_head_dim must be d_model / n_heads ({self.d_model // self.n_heads}) "
                             f"for model_type 'dream' (Qwen2 has no head_dim of its own), got "
                             f"{self.attention_head_dim}")

    @property
    def head_dim(self) -> int:
        return self.attention_head_dim if self.attention_head_dim is not None else self.d_model // self.n_heads

    @property
    def rotated_dims(self) -> int:
        """The dims of each head that rotary embeddings turn (the first ones)."""
        return self.head_dim if self.rotary_dim is None else self.rotary_dim

    @property
    def shift_logits(self) -> bool:
        """Dream predicts the token at position i from the hidden state at i - 1."""
        return self.model_type == "dream"

    @property
    def positions_over_real_tokens(self) -> bool:
        return self.model_type == "dream"

    def _qwen_json(self) -> dict[str, Any]:
        """The config.json fields Dream's (Qwen2) and SDAR's (Qwen3) formats share."""
        return {
            "hidden_size": self.d_model,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "intermediate_size": self.mlp_hidden_size,
            "vocab_size": self.vocab_size,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "mask_token_id": self.mask_token_id,
            "eos_token_id": self.eos_token_id,
            "tie_word_embeddings": self.weight_tying,
            "hidden_act": "silu",
        }

    @staticmethod
    def _qwen_fields(fields: dict[str, Any], mask_id: int, eos_id: int) -> dict[str, Any]:
        """ModelConfig's arguments from the config.json fields Qwen2 and Qwen3 share."""
        n_heads = fields["num_attention_heads"]
        return dict(
            d_model=fields["hidden_size"],
            n_layers=fields["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=fields.get("num_key_value_heads") or n_heads,
            mlp_hidden_size=fields["intermediate_size"],
            vocab_size=fields["vocab_size"],
            embedding_size=fields["vocab_size"],
            rope_theta=fields.get("rope_theta", 1000000.0),
            rms_norm_eps=fields.get("rms_norm_eps", 1e-6),
            mask_token_id=_given(fields, "mask_token_id", mask_id),
            eos_token_id=_given(fields, "eos_token_id", eos_id),
            weight_tying=fields.get("tie_word_embeddings", False),
        )

    def to_dream_json(self) -> dict[str, Any]:
        """config.json in Dream's (Qwen2) field names."""
        fields = {"architectures": ["DreamModel"], "model_type": "Dream", **self._qwen_json(),
                  "pad_token_id": self.eos_token_id}
        if self.block_size is not None:
            fields["block_size"] = self.block_size
        return fields

    @classmethod
    def from_dream_json(cls, fields: dict[str, Any]) -> ModelConfig:
        _check_supported(fields, DREAM_SUPPORTED)
        return cls(**cls._qwen_fields(fields, DREAM_MASK_ID, DREAM_EOS_ID), include_qkv_bias=True,
                   block_size=fields.get("block_size"), model_type="dream")

    @classmethod
    def from_fast_dllm_v2_json(cls, fields: dict[str, Any]) -> ModelConfig:
        """Fast-dLLM v2 (model_type "Fast_dLLM_Qwen"): Qwen2.5 turned block diffusion model,
        Dream's layout (Qwen2 names, qkv bias, logits shifted right by one) with
        block-causal attention over blocks of bd_size (bidirectional inside a block)."""
        return cls.from_dream_json({**fields, "block_size": _given(fields, "bd_size", FAST_DLLM_V2_BLOCK_SIZE),
                                    "mask_token_id": _given(fields, "mask_token_id", FAST_DLLM_V2_MASK_ID)})

    def to_sdar_json(self) -> dict[str, Any]:
        """config.json in SDAR's (Qwen3) field names, with block_size and mask_token_id."""
        return {"architectures": ["SDARForCausalLM"], "model_type": "sdar", **self._qwen_json(),
                "head_dim": self.head_dim, "attention_bias": False, "block_size": self.block_size}

    @classmethod
    def from_sdar_json(cls, fields: dict[str, Any]) -> ModelConfig:
        """SDAR (model_type "sdar", JetLM/SDAR-*-Chat): Qwen3 (per-head q/k norms, head_dim
        apart from hidden size / heads, no biases), block-causal over blocks of
        block_size (4 where config.json names none), logits at their own position."""
        _check_supported(fields, SDAR_SUPPORTED)
        return cls(**cls._qwen_fields(fields, SDAR_MASK_ID, DREAM_EOS_ID),
                   block_size=_given(fields, "block_size", SDAR_BLOCK_SIZE), model_type="sdar",
                   attention_head_dim=_given(fields, "head_dim", QWEN3_HEAD_DIM), qk_norm=True)

    def to_llada2_json(self) -> dict[str, Any]:
        """config.json in LLaDA 2.0's (LLaDA2MoeConfig's) field names."""
        moe = self.moe
        factor = self.rotated_dims / self.head_dim
        if int(self.head_dim * factor) != self.rotated_dims:  # its loader truncates head_dim * factor
            raise ValueError(f"config.rotary_dim={self.rotary_dim} has no partial_rotary_factor that LLaDA 2.0's "
                             f"loader reads back for head_dim {self.head_dim}")
        fields = {"architectures": ["LLaDA2MoeModelLM"], "model_type": "llada2_moe", **self._qwen_json(),
                  "head_dim": self.head_dim, "partial_rotary_factor": factor, "use_qk_norm": True,
                  "use_qkv_bias": False, "use_bias": False, "block_size": self.block_size,
                  "pad_token_id": self.eos_token_id, "num_experts": None}
        if moe is not None:
            fields.update(num_experts=moe.n_experts, num_experts_per_tok=moe.experts_per_token,
                          moe_intermediate_size=moe.expert_hidden_size, num_shared_experts=moe.n_shared_experts,
                          n_group=moe.n_groups, topk_group=moe.top_groups, routed_scaling_factor=moe.routed_scaling,
                          first_k_dense_replace=moe.dense_layers, score_function="sigmoid", norm_topk_prob=True,
                          moe_router_enable_expert_bias=True)
        return fields

    @classmethod
    def from_llada2_json(cls, fields: dict[str, Any]) -> ModelConfig:
        """LLaDA 2.0 (model_type "llada2_moe", inclusionAI/LLaDA2.0-mini and -flash):
        LLaDA's layout (logits at their own position) with per-head q/k norms, a fused
        query_key_value projection, rotary over the first partial_rotary_factor of each
        head, and mixture-of-experts MLPs (MoeConfig) after first_k_dense_replace dense
        layers; block-causal over blocks of 32 (its generate()'s; config.json names none)."""
        _check_supported(fields, LLADA2_SUPPORTED)
        # absent fields as LLaDA2MoeConfig fills them (num_experts null: dense MLPs)
        fields = {**{name: value for name, value in LLADA2_DEFAULTS.items() if name not in fields}, **fields}
        base = cls._qwen_fields(fields, LLADA2_MASK_ID, LLADA2_EOS_ID)
        head_dim = _given(fields, "head_dim", base["d_model"] // base["n_heads"])
        rotary_dim = int(head_dim * fields["partial_rotary_factor"])  # truncated, as its rotary init does
        moe = None
        if fields["num_experts"] is not None:
            moe = MoeConfig(
                n_experts=fields["num_experts"], experts_per_token=fields["num_experts_per_tok"],
                expert_hidden_size=fields["moe_intermediate_size"],
                n_shared_experts=_given(fields, "num_shared_experts", 0), n_groups=fields["n_group"],
                top_groups=fields["topk_group"], routed_scaling=float(fields["routed_scaling_factor"]),
                dense_layers=_given(fields, "first_k_dense_replace", 0))
        return cls(**base, block_size=_given(fields, "block_size", LLADA2_BLOCK_SIZE), model_type="llada2",
                   attention_head_dim=head_dim, qk_norm=True, rotary_dim=None if rotary_dim == head_dim else rotary_dim,
                   moe=moe)

    def to_llada_json(self) -> dict[str, Any]:
        """config.json in LLaDA's field names (plus the fields its loader expects)."""
        fields = dataclasses.asdict(self)
        fields.pop("block_size")
        for name, default in (("attention_head_dim", None), ("qk_norm", False), ("rotary_dim", None),
                              ("moe", None)):  # LLaDA has none of them
            if fields[name] == default:
                fields.pop(name)
        if self.block_size is not None:
            fields["block_size"] = self.block_size
        fields.update(
            architectures=["LLaDAModelLM"],
            block_type="llama",
            activation_type="silu",
            layer_norm_type="rms",
            rope=True,
            include_bias=False,
            pad_token_id=self.eos_token_id,
        )
        return fields

    @classmethod
    def from_llada_json(cls, fields: dict[str, Any]) -> ModelConfig:
        _check_supported(fields, LLADA_SUPPORTED)
        names = {f.name for f in dataclasses.fields(cls)}
        known = {key: value for key, value in fields.items() if key in names}
        if known.get("n_kv_heads") is None:
            known["n_kv_heads"] = fields.get("n_heads", cls.n_heads)
        if known.get("mlp_hidden_size") is None and "mlp_ratio" in fields:
            known["mlp_hidden_size"] = fields["mlp_ratio"] * fields["d_model"]
        if known.get("embedding_size") is None:
            known["embedding_size"] = fields.get("vocab_size", cls.vocab_size)
        return cls(**known)


# config.json fields that change the forward pass without changing a tensor's name, and
# the values this model implements (a field that is absent takes the first). A checkpoint
# with another value would load and run, wrongly: it is refused, naming the field.
# LLaDA's names are its modeling code's (configuration_llada.py); LLaDA-8B and LLaDA-1.5
# set every one to a supported value. rope_full_precision False (rotary in the weights'
# dtype) is taken: unmask computes rotary in float32 either way, a last-bit difference.
LLADA_SUPPORTED = {
    "block_type": ("llama",),
    "layer_norm_type": ("rms",),
    "activation_type": ("silu",),
    "rope": (True,),
    "alibi": (False,),
    "scale_logits": (False,),
    "input_emb_norm": (False,),
    "attention_layer_norm": (False,),
    "include_bias": (False,),
    "bias_for_layer_norm": (False, None),
    "layer_norm_with_affine": (True,),
    "clip_qkv": (None,),
}
# Dream's (Qwen2's) names; Dream-v0 sets each to a supported value.
DREAM_SUPPORTED = {
    "hidden_act": ("silu",),
    "rope_scaling": (None,),
    "use_sliding_window": (False,),
}
# SDAR's (Qwen3's): its attention_bias would add biases to q, k, v and o alike.
SDAR_SUPPORTED = {**DREAM_SUPPORTED, "attention_bias": (False,)}
# LLaDA 2.0's (LLaDA2MoeConfig). Its modeling code applies the q/k norms, scores experts
# by sigmoid and normalises the chosen ones' weights whatever use_qk_norm, score_function
# and norm_topk_prob say, and so does unmask (those fields are not read); biases (which
# use_bias and use_qkv_bias would add) are not implemented.
LLADA2_SUPPORTED = {"hidden_act": ("silu", None), "rope_scaling": (None,), "use_qkv_bias": (False, None),
                    "use_bias": (False,), "moe_router_enable_expert_bias": (True, None)}
# LLaDA2MoeConfig's defaults, for fields a config.json leaves out.
LLADA2_DEFAULTS = {"num_experts": 16, "num_experts_per_tok": 2, "n_group": 8, "topk_group": 4,
                   "routed_scaling_factor": 2.5, "partial_rotary_factor": 0.5, "rope_theta": 10000.0,
                   "rms_norm_eps": 1e-5, "num_shared_experts": 0, "first_k_dense_replace": 0}


def _given(fields: dict[str, Any], name: str, default):
    """config.json's value of a field, or default where it is absent or null."""
    value = fields.get(name)
    return default if value is None else value


def _check_supported(fields: dict[str, Any], supported: dict[str, tuple]) -> None:
    for name, values in supported.items():
        if name in fields and not any(validation.same_value(fields[name], v) for v in values):
            raise ValueError(f"config.json: {name}={fields[name]!r} is not supported (unmask implements "
                             f"{' or '.join(repr(v) for v in values)})")
