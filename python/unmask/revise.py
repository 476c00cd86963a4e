"""Self-correction: committed tokens of the active block can be masked again
(generate(..., threshold=..., revise_threshold=...)).

A committed token is final in plain masked diffusion decoding, so a position committed
in parallel with another that contradicts it (the same letter twice in a permutation, a
carry the next digit does not agree with) stays wrong. This follows the verification
idea of WINO (Hong et al., "Wide-In, Narrow-Out: Revokable Decoding for Efficient and
Effective DLLMs", arXiv 2507.18578): commit generously, then re-check every token
committed earlier in the block under the current canvas and take back the ones the model
no longer believes. It is chosen over ReMDM (arXiv 2503.00307), whose remasking is random
with a schedule and needs many extra steps, and over remasking by a token's confidence
at the time it was committed, which cannot see a contradiction that arrived later.

A token's own position must be masked for the model to judge it (a bidirectional model
that sees the token at its input just copies it). WINO masks it in a shadow copy of the
block with a custom attention mask; here each model call evaluates, beside the canvas,
G verification canvases per row (the same batch, so any model works): canvas g masks the
committed tokens whose position's digit number (call index mod D) in base G is g, D the
digits of the block length. A token is judged with the rest of the block visible except
the tokens masked alongside it; any two positions differ in some digit, so within D
calls every pair is seen apart and a duplicate cannot hide behind its twin forever.

A token is masked again when the model's probability of it (softmax of its logits, at
temperature 1) falls below revise_threshold. revise_groups >= the block length masks
every token alone (WINO's leave-one-out check); fewer groups cost fewer canvases per call
and judge a token with the G - 1 other groups' tokens visible. A row's block ends at the
first call that finds no mask and changes nothing (each change re-opens every token to a
check under the new canvas). Each position may be masked again at most max_revisions
times per block, which bounds the block's calls: a call with masks commits at least one,
so m masked positions see at most m (max_revisions + 1) commits and m max_revisions
revocations, and the block ends within m (2 max_revisions + 1) + 1 calls.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from unmask import speculative
from unmask.validation import Revision, Rule, Sampling


def verification_groups(length: int, groups: int, call: int, device) -> torch.Tensor:
    """int64 [length]: the verification canvas each block position is masked in at this
    call: digit (call mod D) of the position in base `groups`, D = digits of length."""
    digits = 1  # counted in integers: ceil(log(125) / log(5)) is 4 in floating point
    while groups > 1 and groups ** digits < length:
        digits += 1
    return (torch.arange(length, device=device) // groups ** (call % digits)) % groups


def decode_block(step_model, x: torch.Tensor, start: int, end: int, *, rule: Rule, sampling: Sampling,
                 sample: Callable, vocab: int | None, mask_id: int, running: torch.Tensor, invalid: torch.Tensor,
                 offset_base: torch.Tensor, revision: Revision, callback=None,
                 nfe: int = 0) -> speculative.BlockResult:
    """Decode block [start, end) of x in place, masking committed tokens again where the
    model stops believing them. Only positions that were masked at the block's start are
    ever masked again (a prompt or an infill's given text is left alone). One host read
    per call: whether any row still has masks or changed at the last call."""
    if vocab is not None:
        raise ValueError("revise_threshold needs the whole vocabulary's logits; a tensor-parallel model gives a shard")
    batch, length, device = x.shape[0], end - start, x.device
    groups = min(revision.groups, length)  # groups past the block's length would mask nothing
    mode = rule.commit_options()
    apply_rule = speculative._Rule(sample, sampling, mode, None, mask_id, vocab,
                                   torch.full((1,), mask_id, dtype=torch.int64, device=device), running, offset_base)
    positions = torch.arange(start, end, device=device)
    block = x[:, start:end].clone()
    generated = block == mask_id  # the positions this block decodes
    revisions = torch.zeros(batch, length, dtype=torch.int64, device=device)
    changed = torch.ones(batch, dtype=torch.bool, device=device)  # the last call changed the row's block
    steps = torch.zeros(batch, dtype=torch.int64, device=device)
    calls = canvases = 0
    while True:
        masked = (block == mask_id) & running[:, None]
        revisable = generated & ~masked & (revisions < revision.max_revisions) & running[:, None]
        active = masked.any(dim=1) | (changed & revisable.any(dim=1))
        any_active, any_revisable = (bool(v) for v in torch.stack([active.any(), revisable.any()]).tolist())
        if not any_active:
            break
        group = verification_groups(length, groups, calls, device)
        checks = [block.masked_fill(revisable & (group == g), mask_id) for g in range(groups)] if any_revisable else []
        n = 1 + len(checks)
        evaluated = x.repeat(n, 1)
        evaluated[:, start:end] = torch.cat([block] + checks)
        logits = step_model(evaluated, positions, canvases_per_row=n)
        logits = logits.reshape(n, batch, length, logits.shape[-1])
        after, committed, bad, _ = apply_rule(block, logits[0], steps)
        invalid.logical_or_(bad.any())
        revoked = torch.zeros_like(revisable)
        if checks:
            believed = _belief(logits[1:], block, group, mask_id)
            judged = revisable & active[:, None]
            invalid.logical_or_((judged & believed.isnan()).any())  # NaN logits are reported, not believed
            revoked = judged & (believed < revision.threshold)
        after = after.masked_fill(revoked, mask_id)
        revisions += revoked.to(revisions.dtype)
        changed = (committed | revoked).any(dim=1)
        block = torch.where(active[:, None], after, block)
        # the RNG step advances where the call sampled masks (as plain threshold decoding
        # counts it); a call that only re-checked a row's tokens drew nothing for it
        steps += (active & masked.any(dim=1)).to(steps.dtype)
        x[:, start:end] = block
        calls, canvases = calls + 1, canvases + n
        if callback is not None:
            everywhere = torch.zeros_like(x, dtype=torch.bool)
            everywhere[:, start:end] = committed | revoked
            callback(nfe + calls - 1, x, everywhere)
    return speculative.BlockResult(calls, canvases, int(steps.max()) if calls else 0, steps)


def _belief(check_logits: torch.Tensor, block: torch.Tensor, group: torch.Tensor, mask_id: int) -> torch.Tensor:
    """float32 [B, Lb]: each token's probability in the verification canvas that masks it
    (check_logits [G, B, Lb, V]; position i is judged in canvas group[i]), over the
    vocabulary without the mask id, which the sampler never commits (a model unsure
    between a token and [MASK] still believes the token). NaN where the logits are NaN
    or +inf. One canvas at a time in float32: [B, Lb, V] at once, not [G, B, Lb, V]
    (LLaDA's 126464 ids, 64 rows of 128: 4 GB a canvas)."""
    believed = torch.empty(block.shape, dtype=torch.float32, device=block.device)
    for g, logits in enumerate(check_logits):
        logits = logits.to(torch.float32, copy=True)  # a copy: the model's logits stay as they were
        logits[..., mask_id] = float("-inf")
        log_p = logits.gather(-1, block[..., None])[..., 0] - torch.logsumexp(logits, dim=-1)
        believed = torch.where(group == g, log_p.exp(), believed)
    return believed
