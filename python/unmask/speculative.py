"""Lossless speculative decoding of one block (docs/design.md, speculative decoding).

The step-by-step schedule is deterministic: canvas C(j+1) is the commit rule applied at
step j to C(j) and to the model's logits of C(j), with the Philox draws addressed by the
row, the position and the step. So a model call can check several future steps at once:

1. draft: from the logits the last call gave (those of the current canvas's
   predecessor), apply the rule for the next steps j, j+1, ..., j+n-2 with the draws of
   those steps, each to the previous draft: drafts D(1), ..., D(n-1) of C(j+1), ...;
2. evaluate C(j), D(1), ..., D(n-1) in one batched model call;
3. verify: apply the true rule at step j + t to canvas t and its logits; while that
   reproduces draft t + 1, draft t + 1 is C(j+t+1) and its logits are true logits. At
   the first mismatch (or after the last draft) the true commit is taken.

Every committed canvas is the rule applied to the model's logits of its predecessor, so
the tokens are those of one step per call, and every call advances each unfinished row
by at least one step. Rows advance independently: each row's draws are addressed by its
own step index (sample's per-row offsets). This is the self-speculative scheme of
FreeDave (arXiv 2510.00294) and SSD (arXiv 2510.04147), made exact at any temperature
by the counter-based noise.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import torch.nn.functional as F

from unmask import ops
from unmask.validation import Rule, Sampling


@dataclasses.dataclass
class BlockResult:
    calls: int     # model calls
    canvases: int  # canvases evaluated per row, summed over the calls
    steps: int     # schedule steps the block took (its slowest row's)
    row_steps: torch.Tensor  # int64 [B]: each row's own steps (its RNG offset advances by this much)


@dataclasses.dataclass
class _Rule:
    """The commit rule at a row's step: sample with that step's draws, then commit."""

    sample: Callable
    sampling: Sampling
    mode: dict             # Rule.commit_options(): with a plan, its k is filled in per step
    plan: torch.Tensor | None  # int64 [B, S + depth]: tokens row b commits at step j (0 past S); a floor with a threshold
    mask_id: int
    vocab: int | None
    banned: torch.Tensor
    running: torch.Tensor
    offset_base: torch.Tensor  # int64 [B]: each row's RNG offset at the block's step 0

    def sampled(self, block: torch.Tensor, logits: torch.Tensor, steps: torch.Tensor):
        """(eligible, tokens, conf) of block [B, Lb] at step `steps` [B] with its logits."""
        eligible = (block == self.mask_id) & self.running[:, None]
        if self.mask_id >= (logits.shape[-1] if self.vocab is None else self.vocab):
            raise ValueError(f"mask_id={self.mask_id} lies outside the model's vocabulary (V={logits.shape[-1]})")
        s = self.sampling
        offsets = (self.offset_base + steps)[:, None].expand(block.shape)
        tokens, conf = self.sample(logits, **s.options, banned=self.banned, seed=s.seed, offset=offsets, check=False)
        return eligible, tokens, conf

    @staticmethod
    def runner_up(block: torch.Tensor, draft: torch.Tensor, samples: tuple) -> torch.Tensor:
        """A second draft of the step from block: draft with its least confident new
        commit swapped for the most confident position it left masked, by the samples
        (eligible, tokens, conf) the draft was made from (the same stale logits and
        draws). Where the stale logits rank the true commit second, this is the true
        canvas. Rows with nothing to swap get the draft itself."""
        eligible, tokens, conf = samples
        conf = torch.nan_to_num(conf.float(), nan=-torch.inf)
        new = draft != block
        left = eligible & ~new
        rows = torch.arange(block.shape[0], device=block.device)
        weakest = torch.where(new, conf, torch.inf).argmin(dim=1)
        best = torch.where(left, conf, -torch.inf).argmax(dim=1)
        swap = new.any(dim=1) & left.any(dim=1)
        sibling = draft.clone()
        sibling[rows, weakest] = torch.where(swap, block[rows, weakest], draft[rows, weakest])
        sibling[rows, best] = torch.where(swap, tokens[rows, best].to(draft.dtype), draft[rows, best])
        return sibling

    def __call__(self, block: torch.Tensor, logits: torch.Tensor, steps: torch.Tensor, samples: list | None = None):
        """block [B, Lb] at step `steps` [B] (per row) with its logits [B, Lb, V] ->
        (next block, committed, a sampled eligible row was invalid [B], had masks [B]).
        samples: a list the (eligible, tokens, conf) of the step are appended to."""
        eligible, tokens, conf = self.sampled(block, logits, steps)
        if samples is not None:
            samples.append((eligible, tokens, conf))
        mode = self.mode
        if self.plan is not None:  # a row's step count is its plan index while it has masks
            mode = {**mode, "k": self.plan.gather(1, steps.clamp(max=self.plan.shape[1] - 1)[:, None])[:, 0]}
        after = block.clone()
        committed = ops.commit(after, tokens, conf, eligible, **mode)
        return after, committed, ((tokens < 0) & eligible).any(dim=1), eligible.any(dim=1)


def decode_block(step_model, x: torch.Tensor, start: int, end: int, *, depth: int, rule: Rule, sampling: Sampling,
                 sample: Callable, vocab: int | None, mask_id: int, running: torch.Tensor, invalid: torch.Tensor,
                 offset_base: torch.Tensor, plan: list[list[int]] | None, callback=None, nfe: int = 0,
                 siblings: bool = True) -> BlockResult:
    """Decode block [start, end) of x in place with up to `depth` steps per model call.

    plan: the steps rule's tokens per row and step (host lists, the steps where no row
    commits already left out, as the step-by-step loop skips them); None for threshold
    and factor, whose rows step until their block has no mask, as rows do under a plan
    with a threshold (its counts floors: a row may finish ahead of it). invalid (bool 0-d) is
    or-ed in place with whether a true step sampled an invalid row. One synchronisation
    per call: the rows' remaining steps, to pick how many canvases the next call needs.
    siblings: each drafted step also drafts its runner-up (_Rule.runner_up): up to 2d - 1
    canvases per call instead of d, and one more step where the chain breaks on the
    commit the stale logits ranked second.
    """
    batch, length, device = x.shape[0], end - start, x.device
    plan_tensor = None
    if plan is not None:
        plan_tensor = F.pad(torch.tensor(plan, dtype=torch.int64).reshape(batch, -1), (0, depth)).to(device)
        total = len(plan[0])
    mode = rule.commit_options()  # a plan's count k is filled in per step (_Rule.__call__)
    # Under a plan alone a row steps through its plan; with a threshold (alone, beside a
    # plan, or the factor rule) until its block has no mask: a step without one counts
    # for nothing (no commit, no RNG step), as in the step-by-step loop.
    until_unmasked = plan is None or rule.threshold is not None
    apply_rule = _Rule(sample, sampling, mode, plan_tensor, mask_id, vocab,
                       torch.full((1,), mask_id, dtype=torch.int64, device=device), running, offset_base)
    positions = torch.arange(start, end, device=device)
    steps = torch.zeros(batch, dtype=torch.int64, device=device)  # steps each row has taken
    block = x[:, start:end].clone()
    draft_logits = None  # [B, Lb, V]: the logits of the current canvas's predecessor
    calls = canvases = 0
    while True:
        masks_left = ((block == mask_id) & running[:, None]).sum(dim=1)
        if plan_tensor is None:  # every step commits at least one eligible position
            remaining = masks_left
        else:  # the plan's steps left (none once a row's masks are gone under a threshold)
            remaining = (total - steps).clamp(min=0)
            if until_unmasked:
                remaining = torch.where(masks_left > 0, remaining, 0)
        most = max(remaining.tolist())
        if most == 0:
            break
        n = 1 if draft_logits is None else min(depth, most)
        drafts, samples = [block], []
        for t in range(1, n):
            drafts.append(apply_rule(drafts[-1], draft_logits, steps + t - 1, samples)[0])
        sibs = [_Rule.runner_up(drafts[t - 1], drafts[t], samples[t - 1]) for t in range(1, n)] if siblings else []
        evaluated = x.repeat(n + len(sibs), 1)
        evaluated[:, start:end] = torch.cat(drafts + sibs)
        logits = step_model(evaluated, positions, canvases_per_row=n + len(sibs))
        logits = logits.reshape(n + len(sibs), batch, length, logits.shape[-1])
        truths, _, bad, had_masks = zip(*(apply_rule(drafts[t], logits[t], steps + t) for t in range(n)))
        # Accepted drafts: the leading run of levels whose true successor is the next draft.
        matches = [(truths[t] == drafts[t + 1]).all(dim=1) for t in range(n - 1)]
        accepted = torch.stack(matches).to(torch.int64).cumprod(dim=0).sum(dim=0) if matches else steps.new_zeros(batch)
        taken = torch.arange(n, device=device)[:, None] <= accepted  # [n, B]: the levels that were true steps
        rows = torch.arange(batch, device=device)
        if until_unmasked:  # a row whose block has no mask left takes no more steps
            advance = (torch.stack(had_masks) & taken).sum(dim=0)
            if plan_tensor is not None:
                advance = torch.minimum(advance, remaining)
        else:
            advance = torch.minimum(accepted + 1, remaining)
        new_block = torch.stack(truths)[accepted, rows]
        next_logits = logits[accepted, rows]
        step_bad = (torch.stack(bad) & taken).any()
        if sibs:
            # Where the chain broke after `accepted` levels, the runner-up of the next level
            # may be the true canvas: then its logits are true too, and one more step is taken.
            level = (accepted + 1).clamp(max=n - 1)  # the sibling level (1 .. n-1) in play
            sibling = torch.stack(sibs)[level - 1, rows]
            rescued = (accepted < n - 1) & (new_block == sibling).all(dim=1)
            if plan_tensor is not None:
                rescued &= accepted + 2 <= remaining
            sibling_logits = logits[n - 1 + level, rows]
            s_truth, _, s_bad, s_had = apply_rule(sibling, sibling_logits, steps + level)
            if until_unmasked:
                rescued &= s_had
            new_block = torch.where(rescued[:, None], s_truth, new_block)
            next_logits = torch.where(rescued[:, None, None], sibling_logits, next_logits)
            advance = advance + rescued.to(advance.dtype)
            step_bad = step_bad | (s_bad & rescued).any()
        changed = new_block != block
        block = torch.where((advance > 0)[:, None], new_block, block)
        invalid.logical_or_(step_bad)
        draft_logits = next_logits
        steps += advance
        x[:, start:end] = block
        calls, canvases = calls + 1, canvases + n + len(sibs)
        if callback is not None:
            everywhere = torch.zeros_like(x, dtype=torch.bool)
            everywhere[:, start:end] = changed & (advance > 0)[:, None]
            callback(nfe + calls - 1, x, everywhere)
    taken_steps = int(steps.max()) if calls else 0
    if not until_unmasked:  # a row steps while it has masks: its plan's leading nonzero counts
        taken_steps = total
        steps = (plan_tensor > 0).sum(dim=1) * running
    return BlockResult(calls, canvases, taken_steps, steps)
