"""unmask attention inside transformers models: attn_implementation="unmask".

    import unmask.integrations.transformers as unmask_hf
    unmask_hf.register()
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="unmask")

transformers hands each attention layer a mask (None, a boolean [B, 1, Lq, Lk] mask,
or an additive float one). unmask's kernel takes structured masks instead of a dense
one, so the mask is read back into key padding plus, for causal layers, a block-causal
mask with block size 1; a mask of any other shape raises NotImplementedError rather
than being silently approximated.
"""

from __future__ import annotations

import torch

from unmask import ops

NAME = "unmask"


def _visible(attention_mask: torch.Tensor) -> torch.Tensor:
    """The boolean [B, Lq, Lk] visibility of a transformers mask (bool or additive float)."""
    if attention_mask.dtype == torch.bool:
        visible = attention_mask
    else:
        visible = attention_mask == 0
    return visible[:, 0] if visible.dim() == 4 else visible


def structured_mask(attention_mask: torch.Tensor | None, batch: int, q_len: int, k_len: int, causal: bool,
                    device: torch.device) -> dict:
    """attention kwargs (key_valid, block_size, q_offset) equivalent to the given mask."""
    q_offset = k_len - q_len
    if attention_mask is None:
        return {"block_size": 1, "q_offset": q_offset} if causal and q_len > 1 else {}
    visible = _visible(attention_mask).expand(batch, q_len, k_len)
    key_valid = visible.any(dim=1)
    keys = torch.arange(k_len, device=device)
    queries = torch.arange(q_len, device=device) + q_offset
    causal_visible = keys[None, :] <= queries[:, None]
    for is_causal in ((True, False) if causal else (False, True)):
        rebuilt = key_valid[:, None, :] & causal_visible[None] if is_causal else key_valid[:, None, :].expand_as(visible)
        # Rows of padding queries are free: transformers may unmask them to avoid NaN,
        # and their outputs are never read.
        real_query = key_valid[:, q_offset:] if q_len <= k_len else torch.ones(batch, q_len, dtype=torch.bool)
        if torch.equal(rebuilt[real_query], visible[real_query]):
            kwargs = {"key_valid": key_valid}
            if is_causal:
                kwargs.update(block_size=1, q_offset=q_offset)
            return kwargs
    raise NotImplementedError(
        "unmask attention takes key-padding, causal and block-causal masks; this layer's attention_mask is neither"
    )


def attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention signature: query [B, H, Lq, D], key/value [B, Hkv, Lk, D]
    -> ([B, Lq, H, D], None)."""
    if dropout and module.training:
        raise NotImplementedError("unmask attention is for inference: dropout is not supported")
    batch, _, q_len, head_dim = query.shape
    k_len = key.shape[2]
    causal = bool(getattr(module, "is_causal", False)) if kwargs.get("is_causal") is None else bool(kwargs["is_causal"])
    masks = structured_mask(attention_mask, batch, q_len, k_len, causal, query.device)
    out = ops.attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                        scale=scaling if scaling is not None else head_dim**-0.5, **masks)
    return out, None


def register() -> None:
    """Register attn_implementation="unmask" with transformers (idempotent)."""
    try:
        from transformers import AttentionInterface
    except ImportError as error:
        raise ImportError("transformers is not installed: pip install 'unmask[hf]'") from error
    AttentionInterface.register(NAME, attention_forward)
    try:  # newer transformers pick a mask builder per implementation: use the sdpa one
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

        ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    except ImportError:
        pass
