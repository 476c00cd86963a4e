"""The bidirectional transformer behind LLaDA and Dream (DESIGN.md, Models).

Pre-norm RMSNorm, rotary embeddings (rotate-half form), SwiGLU, grouped-query
attention with optional qkv bias, untied (or tied) LM head. Attention runs through
unmask.ops.attention, so the fused kernels serve the model directly.
"""

from __future__ import annotations

import torch
from torch import nn

from unmask import ops
from unmask.models.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32: bf16 sums of squares lose the small components.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (x32 * self.weight.float()).to(x.dtype)


def rotary_tables(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [B or 1, L, 1, head_dim] for integer positions [B or 1, L], in float32."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.float()[..., None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1)[:, :, None, :]
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    x32 = x.float()
    rotated = torch.cat([-x32[..., half:], x32[..., :half]], dim=-1)
    return (x32 * cos + rotated * sin).to(x.dtype)


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        d, hidden = config.d_model, config.mlp_hidden_size
        kv_dim = config.n_kv_heads * config.head_dim
        self.config = config
        self.attn_norm = RMSNorm(d, config.rms_norm_eps)
        self.q_proj = nn.Linear(d, d, bias=config.include_qkv_bias)
        self.k_proj = nn.Linear(d, kv_dim, bias=config.include_qkv_bias)
        self.v_proj = nn.Linear(d, kv_dim, bias=config.include_qkv_bias)
        self.o_proj = nn.Linear(d, d, bias=False)
        self.mlp_norm = RMSNorm(d, config.rms_norm_eps)
        self.gate_proj = nn.Linear(d, hidden, bias=False)
        self.up_proj = nn.Linear(d, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, key_valid: torch.Tensor | None) -> torch.Tensor:
        batch, length, _ = x.shape
        c = self.config
        h = self.attn_norm(x)
        q = self.q_proj(h).view(batch, length, c.n_heads, c.head_dim)
        k = self.k_proj(h).view(batch, length, c.n_kv_heads, c.head_dim)
        v = self.v_proj(h).view(batch, length, c.n_kv_heads, c.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        attn = ops.attention(q, k, v, key_valid=key_valid, block_size=c.block_size)
        x = x + self.o_proj(attn.reshape(batch, length, c.d_model))
        h = self.mlp_norm(x)
        return x + self.down_proj(nn.functional.silu(self.gate_proj(h)) * self.up_proj(h))


class DiffusionTransformer(nn.Module):
    """model(input_ids [B, L], attention_mask [B, L] | None) -> logits [B, L, V]."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.embedding_size, config.d_model)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.final_norm = RMSNorm(config.d_model, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.embedding_size, bias=False)
        if config.weight_tying:
            self.lm_head.weight = self.embed.weight
        self.tokenizer = None  # a tokenizers.Tokenizer when loaded from a directory that has one

    @property
    def mask_id(self) -> int:
        return self.config.mask_token_id

    @property
    def eos_id(self) -> int:
        return self.config.eos_token_id

    @classmethod
    def random(cls, config: ModelConfig, *, seed: int = 0, dtype: torch.dtype = torch.float32,
               device: torch.device | str | None = None, std: float = 0.02) -> DiffusionTransformer:
        """A randomly initialised model: normal(0, std) weights and biases, unit norms."""
        model = cls(config)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("norm.weight"):
                    param.fill_(1.0)
                else:  # projections, embeddings and qkv biases alike
                    param.normal_(0.0, std, generator=generator)
        return model.to(device=device, dtype=dtype).eval()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        logit_positions: slice | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [B, L, V]; with logit_positions (a slice or index over L) only those positions.

        attention_mask [B, L] marks real tokens: keys at False positions are invisible
        (left padding). Positions stay 0..L-1, as in LLaDA.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, L], got shape {tuple(input_ids.shape)}")
        batch, length = input_ids.shape
        key_valid = None
        if attention_mask is not None:
            if tuple(attention_mask.shape) != (batch, length):
                raise ValueError(f"attention_mask must have shape {(batch, length)}, got {tuple(attention_mask.shape)}")
            key_valid = attention_mask.to(device=input_ids.device, dtype=torch.bool)
        positions = torch.arange(length, device=input_ids.device)[None]
        cos, sin = rotary_tables(positions, self.config.head_dim, self.config.rope_theta)
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x, cos, sin, key_valid)
        if logit_positions is not None:
            x = x[:, logit_positions]
        return self.lm_head(self.final_norm(x))
