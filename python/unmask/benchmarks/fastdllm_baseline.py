"""The loops of NVlabs/Fast-dLLM's LLaDA generation (arXiv 2505.22618), rewritten from
their description for benchmarking: what a user of Fast-dLLM runs, on unmask's model
weights, so that unmask's step can be timed against it at the same tokens.

What those loops do per step, and this one too:
- cache None: the whole canvas through the model, logits for every position;
- cache "prefix": at a block's first step the whole canvas (keys and values cached);
  later steps recompute the block and everything after it, over the cached prefix;
- cache "dual": later steps recompute the block alone, over the cached prefix and
  suffix (the block's own keys and values replaced in the cache every step);
- the cache is refilled by a whole-canvas forward at every block's first step, whose
  logits also make that step's choice;
- confidence: a float64 softmax over the vocabulary at every position whose logits the
  model returned (the canvas, or the block and suffix), gathered at the argmax token;
- commit: the masked positions of the current block, the k most confident per row, k from
  LLaDA's schedule (the block's masked count spread over its steps).
Eager PyTorch with torch SDPA attention, no attention mask (unpadded prompts).

One departure, so that both sides make the same choices (ban_mask=True, the default):
the mask id's logit is set to -inf before the argmax and the softmax, as unmask's sampler
does (DESIGN.md, sample: the mask id is always banned). Fast-dLLM's loops keep it: they
may commit the mask id (a position that stays masked) and their confidences include its
probability. A trained model gives the mask id next to no mass, so the two rules agree
there; a random one gives it ~1/V, which moves each confidence by its own factor and
reorders near-equal ones (the bundled shape: 0.97 of the tokens the same without the ban,
all with it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from unmask import reference
from unmask.models.transformer import DiffusionTransformer, rotary_tables


def sdpa_forward(model: DiffusionTransformer, ids: torch.Tensor, start: int = 0, cache: list | None = None) -> torch.Tensor:
    """The model's forward with torch SDPA attention and the LM head on every position it
    computes: logits of canvas positions start .. start + ids.shape[1] - 1. cache: per layer a
    (keys, values) pair over the whole canvas [B, L, H, D]; the positions computed here
    write theirs, and their queries attend over the whole cached canvas."""
    config = model.config
    if config.qk_norm or config.head_dim * config.n_heads != config.d_model:
        raise NotImplementedError("the SDPA baseline is LLaDA's and Dream's forward: no q/k norms, head dim "
                                  "d_model / n_heads (SDAR's Qwen3 layout is unmask.generate's alone)")
    batch, length = ids.shape
    cos, sin = rotary_tables(torch.arange(start, start + length, device=ids.device)[None], config.head_dim,
                             config.rope_theta)
    x = model.embed(ids)
    group = config.n_heads // config.n_kv_heads
    for index, layer in enumerate(model.layers):
        h = _norm(layer.attn_norm, x)
        q = reference.rotary(layer.q_proj(h).view(batch, length, config.n_heads, config.head_dim), cos, sin)
        k = reference.rotary(layer.k_proj(h).view(batch, length, config.n_kv_heads, config.head_dim), cos, sin)
        v = layer.v_proj(h).view(batch, length, config.n_kv_heads, config.head_dim)
        if cache is not None:
            keys, values = cache[index]
            keys[:, start:start + length], values[:, start:start + length] = k, v
            k, v = keys, values
        if group > 1:  # grouped heads only (Fast-dLLM repeats them then): repeat_interleave copies even by 1
            k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
        attn = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        x = x + layer.o_proj(attn.transpose(1, 2).reshape(batch, length, config.d_model))
        h = _norm(layer.mlp_norm, x)
        x = x + layer.down_proj(F.silu(layer.gate_proj(h)) * layer.up_proj(h))
    return model.lm_head(_norm(model.final_norm, x))


def _norm(norm, x: torch.Tensor) -> torch.Tensor:
    """The model's RMSNorm as eager torch operations (the baseline has no fused kernels)."""
    return reference.rms_norm(x, norm.weight, norm.eps)


@torch.inference_mode()
def fastdllm_generate(model: DiffusionTransformer, prompt: torch.Tensor, *, steps: int, gen_length: int,
                      block_length: int, cache: str | None = None, ban_mask: bool = True) -> tuple[torch.Tensor, int]:
    """Greedy decoding with low-confidence remasking. Returns (generated tokens
    [B, gen_length], number of model calls). ban_mask=False: Fast-dLLM's rule exactly, the
    mask id a candidate like any other."""
    config = model.config
    mask_id = config.mask_token_id
    batch, prompt_len = prompt.shape
    total = prompt_len + gen_length
    x = torch.full((batch, total), mask_id, dtype=torch.long, device=prompt.device)
    x[:, :prompt_len] = prompt
    blocks = gen_length // block_length
    steps_per_block = steps // blocks
    kv = None
    if cache is not None:
        shape = (batch, total, config.n_kv_heads, config.head_dim)
        dtype = model.embed.weight.dtype
        kv = [(x.new_empty(shape, dtype=dtype), x.new_empty(shape, dtype=dtype)) for _ in model.layers]
    calls = 0
    for block in range(blocks):
        begin, end = prompt_len + block * block_length, prompt_len + (block + 1) * block_length
        masked = (x[:, begin:end] == mask_id).sum(dim=1)
        for step in range(steps_per_block):
            counts = masked // steps_per_block + (step < masked % steps_per_block).long()
            # the positions whose logits the model returns: the canvas, or the recomputed segment
            start = 0 if cache is None or step == 0 else begin
            stop = end if cache == "dual" and step > 0 else total
            logits = sdpa_forward(model, x[:, start:stop], start, kv)
            calls += 1
            if ban_mask:
                logits[..., mask_id] = -torch.inf
            tokens = logits.argmax(dim=-1)
            probs = F.softmax(logits.to(torch.float64), dim=-1)
            confidence = probs.gather(-1, tokens[..., None]).squeeze(-1)
            segment = x[:, start:stop]
            eligible = segment == mask_id
            eligible[:, end - start:] = False  # positions after the block wait for their block
            confidence = torch.where(eligible, confidence, -torch.inf)
            chosen = torch.zeros_like(eligible)
            for row in range(batch):
                chosen[row, confidence[row].topk(int(counts[row])).indices] = True
            segment[chosen] = tokens[chosen]
    return x[:, prompt_len:], calls
