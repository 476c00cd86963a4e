"""The baseline users would otherwise run: LLaDA's published generate() loop, rewritten
from its description for benchmarking. Eager PyTorch, torch SDPA attention, logits for
the whole canvas, float64 Gumbel noise, softmax confidence, per-row top-k commit."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from unmask.benchmarks.fastdllm_baseline import sdpa_forward
from unmask.models.transformer import DiffusionTransformer


@torch.inference_mode()
def llada_generate(model: DiffusionTransformer, prompt: torch.Tensor, *, steps: int, gen_length: int,
                   block_length: int, temperature: float = 0.0) -> tuple[torch.Tensor, int]:
    """Returns (generated tokens [B, gen_length], number of model calls)."""
    mask_id = model.config.mask_token_id
    batch, prompt_len = prompt.shape
    x = torch.full((batch, prompt_len + gen_length), mask_id, dtype=torch.long, device=prompt.device)
    x[:, :prompt_len] = prompt
    num_blocks = gen_length // block_length
    steps_per_block = steps // num_blocks
    calls = 0
    for block in range(num_blocks):
        end = prompt_len + (block + 1) * block_length
        masked = (x[:, end - block_length:end] == mask_id).sum(dim=1)
        for step in range(steps_per_block):
            counts = masked // steps_per_block + (step < masked % steps_per_block).long()
            mask_index = x == mask_id
            logits = sdpa_forward(model, x)
            calls += 1
            if temperature > 0:
                logits64 = logits.to(torch.float64)
                noise = torch.rand_like(logits64)
                x0 = (logits64.exp() / (-torch.log(noise)) ** temperature).argmax(dim=-1)
            else:
                x0 = logits.argmax(dim=-1)
            p = F.softmax(logits.float(), dim=-1)
            confidence = p.gather(-1, x0[..., None]).squeeze(-1)
            confidence[:, end:] = float("-inf")
            confidence = torch.where(mask_index, confidence, float("-inf"))
            x0 = torch.where(mask_index, x0, x)
            transfer = torch.zeros_like(mask_index)
            for row in range(batch):
                transfer[row, confidence[row].topk(int(counts[row])).indices] = True
            x[transfer] = x0[transfer]
    return x[:, prompt_len:], calls
