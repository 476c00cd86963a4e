"""Checkpoints in the published on-disk formats of LLaDA, Dream, Fast-dLLM v2, SDAR and LLaDA 2.0:
config.json plus safetensors (one file, or shards with model.safetensors.index.json),
with each family's own tensor names."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from unmask import validation
from unmask.models.config import ModelConfig
from unmask.models.transformer import DiffusionTransformer

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
GENERATION_CONFIG = "generation_config.json"

_LAYER_PATTERN = re.compile(r"layers\.(\d+)\.(.+)")


@dataclasses.dataclass(frozen=True)
class CheckpointFormat:
    """A family's on-disk names: config.json's model_type and its tensor names."""

    model_type: str  # as config.json spells it
    global_names: dict[str, str]  # our parameter name -> the checkpoint's
    layer_prefix: str  # "{i}" stands for the layer index
    layer_names: dict[str, str]
    config_from_json: Callable[[dict], ModelConfig]
    config_to_json: Callable[[ModelConfig], dict]
    # The checkpoint's layer tensors that hold several of ours, concatenated along dim 0
    # in this order (LLaDA 2.0's query_key_value: q, k, v).
    fused: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    # Our layer tensors stacked from one checkpoint tensor per index along dim 0: our name ->
    # the checkpoint's, with "{e}" for the index (LLaDA 2.0's experts, one tensor each).
    stacked: dict[str, str] = dataclasses.field(default_factory=dict)

    def tensor_name(self, ours: str) -> str:
        if ours in self.global_names:
            return self.global_names[ours]
        match = _LAYER_PATTERN.fullmatch(ours)
        if match is not None:
            prefix, name = self.layer_prefix.format(i=match.group(1)), match.group(2)
            if name in self.layer_names:
                return prefix + self.layer_names[name]
            for theirs, parts in self.fused.items():
                if name in parts:
                    return prefix + theirs
        raise KeyError(f"no {self.model_type} name for parameter {ours!r}")

    def stacked_name(self, ours: str) -> str | None:
        """The checkpoint's name of each slice of `ours` ("{e}" for the index), or None
        when `ours` is not stacked."""
        match = _LAYER_PATTERN.fullmatch(ours)
        if match is None or match.group(2) not in self.stacked:
            return None
        return self.layer_prefix.format(i=match.group(1)) + self.stacked[match.group(2)]

    def parts_of(self, ours: str) -> tuple[str, ...]:
        """Our names in the checkpoint tensor that holds `ours`, in their order along dim 0:
        `ours` alone, or the names sharing a fused tensor with it."""
        match = _LAYER_PATTERN.fullmatch(ours)
        for parts in self.fused.values():
            if match is not None and match.group(2) in parts:
                return tuple(f"layers.{match.group(1)}.{part}" for part in parts)
        return (ours,)


LLADA = CheckpointFormat(
    model_type="llada",
    global_names={
        "embed.weight": "model.transformer.wte.weight",
        "final_norm.weight": "model.transformer.ln_f.weight",
        "lm_head.weight": "model.transformer.ff_out.weight",
    },
    layer_prefix="model.transformer.blocks.{i}.",
    layer_names={
        "attn_norm.weight": "attn_norm.weight",
        "q_proj.weight": "q_proj.weight",
        "q_proj.bias": "q_proj.bias",
        "k_proj.weight": "k_proj.weight",
        "k_proj.bias": "k_proj.bias",
        "v_proj.weight": "v_proj.weight",
        "v_proj.bias": "v_proj.bias",
        "o_proj.weight": "attn_out.weight",
        "mlp_norm.weight": "ff_norm.weight",
        "gate_proj.weight": "ff_proj.weight",
        "up_proj.weight": "up_proj.weight",
        "down_proj.weight": "ff_out.weight",
    },
    config_from_json=ModelConfig.from_llada_json,
    config_to_json=ModelConfig.to_llada_json,
)

DREAM = CheckpointFormat(
    model_type="Dream",
    global_names={
        "embed.weight": "model.embed_tokens.weight",
        "final_norm.weight": "model.norm.weight",
        "lm_head.weight": "lm_head.weight",
    },
    layer_prefix="model.layers.{i}.",
    layer_names={
        "attn_norm.weight": "input_layernorm.weight",
        "q_proj.weight": "self_attn.q_proj.weight",
        "q_proj.bias": "self_attn.q_proj.bias",
        "k_proj.weight": "self_attn.k_proj.weight",
        "k_proj.bias": "self_attn.k_proj.bias",
        "v_proj.weight": "self_attn.v_proj.weight",
        "v_proj.bias": "self_attn.v_proj.bias",
        "o_proj.weight": "self_attn.o_proj.weight",
        "mlp_norm.weight": "post_attention_layernorm.weight",
        "gate_proj.weight": "mlp.gate_proj.weight",
        "up_proj.weight": "mlp.up_proj.weight",
        "down_proj.weight": "mlp.down_proj.weight",
    },
    config_from_json=ModelConfig.from_dream_json,
    config_to_json=ModelConfig.to_dream_json,
)

# Fast-dLLM v2: Dream's tensor names, its own config.json (bd_size; no mask id). Saved
# back in Dream's format (model_type "Dream" with block_size), which loads the same model.
FAST_DLLM_V2 = dataclasses.replace(DREAM, model_type="Fast_dLLM_Qwen",
                                   config_from_json=ModelConfig.from_fast_dllm_v2_json)

# SDAR: Qwen3's names (Qwen2's without biases, plus each layer's q_norm and k_norm).
SDAR = CheckpointFormat(
    model_type="sdar",
    global_names=DREAM.global_names,
    layer_prefix=DREAM.layer_prefix,
    layer_names={**{ours: theirs for ours, theirs in DREAM.layer_names.items() if not ours.endswith(".bias")},
                 "q_norm.weight": "self_attn.q_norm.weight", "k_norm.weight": "self_attn.k_norm.weight"},
    config_from_json=ModelConfig.from_sdar_json,
    config_to_json=ModelConfig.to_sdar_json,
)

# LLaDA 2.0 (LLaDA2MoeModelLM): Ling's names, one query_key_value tensor per layer (q's
# heads, then k's, then v's rows), mixture-of-experts MLPs (mlp.gate is the router, with
# its expert_bias) after the first dense ones.
LLADA2 = CheckpointFormat(
    model_type="llada2_moe",
    global_names={"embed.weight": "model.word_embeddings.weight", "final_norm.weight": "model.norm.weight",
                  "lm_head.weight": "lm_head.weight"},
    layer_prefix="model.layers.{i}.",
    layer_names={
        "attn_norm.weight": "input_layernorm.weight",
        "q_norm.weight": "attention.query_layernorm.weight",
        "k_norm.weight": "attention.key_layernorm.weight",
        "o_proj.weight": "attention.dense.weight",
        "mlp_norm.weight": "post_attention_layernorm.weight",
        "gate_proj.weight": "mlp.gate_proj.weight",
        "up_proj.weight": "mlp.up_proj.weight",
        "down_proj.weight": "mlp.down_proj.weight",
        "moe.router.weight": "mlp.gate.weight",
        "moe.expert_bias": "mlp.gate.expert_bias",
        **{f"moe.shared.{name}.weight": f"mlp.shared_experts.{name}.weight"
           for name in ("gate_proj", "up_proj", "down_proj")},
    },
    fused={"attention.query_key_value.weight": ("q_proj.weight", "k_proj.weight", "v_proj.weight")},
    stacked={f"moe.expert_{name}": f"mlp.experts.{{e}}.{name}_proj.weight" for name in ("gate", "up", "down")},
    config_from_json=ModelConfig.from_llada2_json,
    config_to_json=ModelConfig.to_llada2_json,
)

FORMATS = {"llada": LLADA, "Dream": DREAM, "Fast_dLLM_Qwen": FAST_DLLM_V2, "sdar": SDAR, "llada2_moe": LLADA2}
_FORMAT_OF_FAMILY = {"llada": LLADA, "dream": DREAM, "sdar": SDAR, "llada2": LLADA2}


def llada_name(ours: str) -> str:
    return LLADA.tensor_name(ours)


# One of our tensors, whole (None) or the slice [index] of a stacked one.
_Piece = tuple[str, "int | None"]


def _expected_names(model: DiffusionTransformer) -> dict[str, tuple[_Piece, ...]]:
    """Checkpoint name -> the pieces of ours it holds (one, or a fused tensor's,
    concatenated along dim 0 in that order), for every tensor the checkpoint must hold."""
    checkpoint_format = _FORMAT_OF_FAMILY[model.config.model_type]
    names = {}
    for ours, tensor in model.state_dict().items():
        if ours == "lm_head.weight" and model.config.weight_tying:
            continue  # tied to the embedding: no separate head is stored
        stacked = checkpoint_format.stacked_name(ours)
        if stacked is not None:
            names.update({stacked.format(e=index): ((ours, index),) for index in range(tensor.shape[0])})
        else:
            names[checkpoint_format.tensor_name(ours)] = tuple((part, None) for part in checkpoint_format.parts_of(ours))
    return names


def _piece(state: dict[str, torch.Tensor], piece: _Piece) -> torch.Tensor:
    name, index = piece
    return state[name] if index is None else state[name][index]


def save_pretrained(model: DiffusionTransformer, directory: str | Path, *, max_shard_bytes: int = 5 * 2**30) -> None:
    """Write config.json and the weights (sharded above max_shard_bytes) in the model
    family's published format (LLaDA's or Dream's names), and generation_config.json's
    eos_token_id: the model's stop list (model.stop_ids), set in the directory's file
    (its other fields kept) or a new one; without a list, a file already there loses its
    eos_token_id, so the saved model loads with the stops it has."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = _FORMAT_OF_FAMILY[model.config.model_type].config_to_json(model.config)
    config["torch_dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    _write_generation_eos(directory / GENERATION_CONFIG, model.stop_ids)

    state = model.state_dict()
    tensors = {name: (_piece(state, parts[0]) if len(parts) == 1 else torch.cat([_piece(state, p) for p in parts]))
               .detach().contiguous().cpu() for name, parts in _expected_names(model).items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    shard_bytes = 0
    for name, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        if shards[-1] and shard_bytes + size > max_shard_bytes:
            shards.append({})
            shard_bytes = 0
        shards[-1][name] = tensor
        shard_bytes += size
    if len(shards) == 1:
        save_file(shards[0], directory / SINGLE_FILE, metadata={"format": "pt"})
        return
    weight_map = {}
    for index, shard in enumerate(shards, start=1):
        file_name = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, directory / file_name, metadata={"format": "pt"})
        weight_map.update({name: file_name for name in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index_json = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / INDEX_FILE).write_text(json.dumps(index_json, indent=2) + "\n")


def _weight_files(directory: Path) -> dict[str, list[str]]:
    """safetensors file -> the tensor names it holds."""
    if (directory / INDEX_FILE).exists():
        weight_map = json.loads((directory / INDEX_FILE).read_text())["weight_map"]
        files: dict[str, list[str]] = {}
        for name, file_name in weight_map.items():
            files.setdefault(file_name, []).append(name)
        return files
    if (directory / SINGLE_FILE).exists():
        with safe_open(directory / SINGLE_FILE, framework="pt") as handle:
            return {SINGLE_FILE: list(handle.keys())}
    raise FileNotFoundError(f"{directory} holds neither {SINGLE_FILE} nor {INDEX_FILE}")


def from_pretrained(
    path: str | Path,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> DiffusionTransformer:
    """Load a LLaDA or Dream checkpoint directory (config.json, safetensors, optional
    tokenizer: tokenizer.json, or Dream's vocab.json and merges.txt; load_tokenizer).

    Tensors go straight from the file to `device` in their stored dtype (or `dtype`):
    a bf16 checkpoint never passes through float32.
    """
    directory = Path(path)
    model = skeleton(directory)
    config = model.config
    device = torch.device(device) if device is not None else torch.device("cpu")
    expected = _expected_names(model)
    meta_state = model.state_dict()
    state: dict[str, torch.Tensor] = {}
    found, unexpected = set(), []
    for file_name, names in _weight_files(directory).items():
        with safe_open(directory / file_name, framework="pt", device=str(device)) as handle:
            for name in names:
                if name not in expected:
                    unexpected.append(name)
                    continue
                tensor = handle.get_tensor(name)
                parts = expected[name]
                shapes = [tuple(_piece(meta_state, part).shape) for part in parts]
                implied = (sum(shape[0] for shape in shapes), *shapes[0][1:])
                if tuple(tensor.shape) != implied:
                    raise ValueError(
                        f"checkpoint tensor {name} has shape {tuple(tensor.shape)}, "
                        f"the config implies {implied}"
                    )
                if dtype is not None and not name.endswith("expert_bias"):  # routing scores stay float32
                    tensor = tensor.to(dtype)
                for (part, index), piece in zip(parts, tensor.split([shape[0] for shape in shapes])):
                    if index is None:
                        state[part] = piece
                    else:  # a slice of a stacked tensor, made where the first slice arrives
                        if part not in state:
                            state[part] = torch.empty(meta_state[part].shape, dtype=piece.dtype, device=piece.device)
                        elif piece.dtype != state[part].dtype:  # not cast silently into its neighbours' dtype
                            raise ValueError(f"checkpoint tensor {name} is {piece.dtype}, the other slices of its "
                                             f"stack are {state[part].dtype}; pass dtype= to load them as one")
                        state[part][index].copy_(piece)
                found.add(name)
    missing = sorted(set(expected) - found)
    if missing:
        raise ValueError(f"checkpoint {directory} is missing tensors: {missing[:10]}{' ...' if len(missing) > 10 else ''}")
    if unexpected:
        raise ValueError(f"checkpoint {directory} has unexpected tensors: {sorted(unexpected)[:10]}")
    if config.weight_tying:
        state["lm_head.weight"] = state["embed.weight"]
    model.load_state_dict(state, assign=True)
    if config.weight_tying:
        model.lm_head.weight = model.embed.weight
    return model.eval()


def skeleton(path: str | Path) -> DiffusionTransformer:
    """A checkpoint's model without its weights (on the meta device), with its config and
    tokenizer: for a process that needs to know the model but not run it (the HTTP front
    of unmask serve, whose engine runs in another process)."""
    directory = Path(path)
    if not (directory / "config.json").exists():
        raise FileNotFoundError(f"path: no config.json in {directory}")
    fields = json.loads((directory / "config.json").read_text())
    model_type = fields.get("model_type")
    if model_type not in FORMATS:
        raise ValueError(f"config.json model_type must be one of {sorted(FORMATS)}, got {model_type!r}")
    with torch.device("meta"):
        model = DiffusionTransformer(FORMATS[model_type].config_from_json(fields))
    model.tokenizer = load_tokenizer(directory)
    model.stop_ids = generation_eos_ids(directory)
    if model.stop_ids is not None:  # checked at load, not at a generate that may not stop at EOS at all
        try:
            validation.special_ids(mask_id=model.mask_id, eos_id=model.stop_ids,
                                   vocab=validation.model_vocab(model))
        except (TypeError, ValueError) as error:
            raise ValueError(f"{directory / GENERATION_CONFIG}: eos_token_id {list(model.stop_ids)}: {error}") from None
    return model.eval()


def _write_generation_eos(path: Path, stop_ids: tuple[int, ...] | None) -> None:
    fields = {}
    if path.exists():
        with contextlib.suppress(ValueError):
            fields = json.loads(path.read_text())
        if not isinstance(fields, dict):  # not ours to mend: a new file in its place
            fields = {}
    if stop_ids is None:
        if "eos_token_id" not in fields:
            return
        del fields["eos_token_id"]
    else:
        fields["eos_token_id"] = stop_ids[0] if len(stop_ids) == 1 else list(stop_ids)
    path.write_text(json.dumps(fields, indent=2) + "\n")


def generation_eos_ids(directory: Path) -> tuple[int, ...] | None:
    """generation_config.json's eos_token_id as a tuple (one id or a list), or None where
    the checkpoint has no such file or field (skeleton checks the ids)."""
    path = directory / GENERATION_CONFIG
    if not path.exists():
        return None
    try:
        eos = json.loads(path.read_text()).get("eos_token_id")
    except (ValueError, AttributeError) as error:
        raise ValueError(f"{path} is not a JSON object: {error}") from None
    if eos is None:
        return None
    return tuple(eos) if isinstance(eos, list) else (eos,)


def encode_text(tokenizer, text: str, name: str) -> list[int]:
    """tokenizer's ids of text; a piece the tokenizer only knows as its unknown token (the
    bundled character tokenizer's <pad> for a space) is an error naming the argument, not
    a silent id the model reads as real input."""
    encoding = tokenizer.encode(text)
    unknown_token = getattr(getattr(tokenizer, "model", None), "unk_token", None)
    if unknown_token is not None:
        unknown = [text[start:end] for token, (start, end) in zip(encoding.tokens, encoding.offsets)
                   if token == unknown_token and text[start:end] != unknown_token]
        if unknown:
            raise ValueError(f"{name} holds text the model's tokenizer does not know: {sorted(set(unknown))!r}")
    return list(encoding.ids)


def load_tokenizer(directory: Path):
    """The checkpoint's tokenizer as a tokenizers.Tokenizer, or None when it has none.
    tokenizer.json where there is one (LLaDA's); else vocab.json and merges.txt, the files
    of Dream's tokenizer (Qwen2's byte-level BPE and its pre-tokenization, shipped as code
    with a slow tokenizer and no tokenizer.json), built through transformers'
    Qwen2TokenizerFast (which reads the files' added tokens, <|mask|> included, from
    tokenizer_config.json) without running the checkpoint's code. Without transformers
    that second form is None (pip install 'unmask[hf]')."""
    from tokenizers import Tokenizer

    if (directory / "tokenizer.json").exists():
        return Tokenizer.from_file(str(directory / "tokenizer.json"))
    if not ((directory / "vocab.json").exists() and (directory / "merges.txt").exists()):
        return None
    try:
        from transformers import Qwen2TokenizerFast
    except ImportError:
        return None
    return Qwen2TokenizerFast.from_pretrained(str(directory)).backend_tokenizer
