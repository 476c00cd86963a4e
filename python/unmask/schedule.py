"""Commit schedules of the steps rule, in plain Python: the torch loop (unmask.sampler), the
server's engine and the JAX loop (unmask.jax.sampler, which runs without torch) plan from
them. "llada" (LLaDA's even split, the default) and "dream" (Dream's time schedule)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

SCHEDULES = ("llada", "dream")
# Dream's generation config: timesteps run from 1 down to eps.
DREAM_EPS = 1e-3
# The Dream schedule is planned step by step (each count depends on what is left), so its
# plan costs time linear in the steps: far past any block's positions, this bounds it.
MAX_DREAM_STEPS = 1 << 16


def step_counts(masked: Sequence[int], steps: int, schedule: str = "llada") -> list[list[int]]:
    """counts[b][i]: tokens row b commits at the i-th step where some row commits, for
    masked[b] positions over `steps` steps of `schedule`. The steps where no row commits
    are left out (they cost no model call; a step that commits nothing changes nothing)."""
    if schedule == "dream":
        return _without_empty_steps(dream_counts(masked, steps))
    return schedule_counts(masked, steps)


def schedule_counts(masked: Sequence[int], steps: int) -> list[list[int]]:
    """LLaDA's schedule: m // s each step plus one for the first m % s steps, so the counts
    of a row sum to m. The steps where no row commits are those past the largest m when s
    exceeds it, so the plan holds at most max(masked) steps however large `steps` is
    (steps=10**9 plans as fast as steps=m). Host data: the loop plans a block's steps from it.
    """
    steps = min(steps, max(masked, default=0))
    return [[m // steps + (i < m % steps) for i in range(steps)] for m in masked]


def dream_timesteps(steps: int, eps: float = DREAM_EPS) -> np.ndarray:
    """float32 [steps + 1]: torch.linspace(1, eps, steps + 1) as torch computes it (each value
    from the nearer end, start + step * i or end - step * (n - 1 - i), in one fused rounding,
    step rounded to float32), bit for bit, without torch (the JAX loop plans from it too).
    The products are exact in float64 (24-bit step times i < 2^29) and so are the sums
    with 1 or eps (under 53 bits), so a single float32 rounding of the float64 result is
    the fused multiply-add's."""
    n = steps + 1
    start, end = np.float32(1.0), np.float32(eps)
    step = (end - start) / np.float32(max(n - 1, 1))
    i = np.arange(n, dtype=np.float64)
    from_start = np.float64(start) + np.float64(step) * i
    from_end = np.float64(end) - np.float64(step) * (n - 1 - i)
    return np.where(np.arange(n) < n // 2, from_start, from_end).astype(np.float32)


def dream_counts(masked: Sequence[int], steps: int, eps: float = DREAM_EPS) -> list[list[int]]:
    """Dream's schedule (its generation loop's step counts): at step i of s, with t and s'
    the timesteps i and i + 1, a row with m masks left commits int(m * (1 - s' / t)) in
    float32 (Dream averages m over its batch; here each row counts its own, which is the
    same in generate, whose rows share their masks), and the last step commits what is left.
    Early steps often commit none: m (1 - s'/t) is just under 1 where m = steps."""
    t = dream_timesteps(steps, eps)
    fractions = np.float32(1.0) - t[1:] / t[:-1]  # float32, as Dream's 1 - s / t
    plans = []
    for m in masked:
        left, counts = m, []
        for i in range(steps - 1):
            count = int(np.float32(left) * fractions[i])
            counts.append(count)
            left -= count
        counts.append(left)
        plans.append(counts)
    return plans


def capped_step_counts(masked: Sequence[int], capacity: int, steps: int, schedule: str = "llada") -> list[list[int]]:
    """step_counts of a block of `capacity` positions, each row committing at a step what
    that plan says or what it has left, whichever is less: how SDAR's and LLaDA 2.0's
    loops spread a partly given block (the prompt's last one) over their steps, where
    step_counts spreads the masks present."""
    if max(masked, default=0) > capacity:
        raise ValueError(f"masked={list(masked)}: a block of {capacity} positions holds at most {capacity} masks")
    full = step_counts([capacity], steps, schedule)[0]
    plans = []
    for m in masked:
        plan, left = [], m
        for count in full:
            plan.append(min(count, left))
            left -= plan[-1]
        plans.append(plan)
    return _without_empty_steps(plans)


def block_plans(masked: Sequence[int], length: int, steps: int, schedule: str = "llada", *,
                full_block: bool) -> list[list[int]]:
    """The steps rule's commits of a block of `length` positions whose rows hold masked[b]
    masks: [B][steps where some row commits]. full_block (block_grid="model"): planned as
    a whole block, each row capped by its masks (capped_step_counts); else the masks
    present spread over the steps (step_counts)."""
    if full_block:
        return capped_step_counts(masked, length, steps, schedule)
    return step_counts(masked, steps, schedule)


def _without_empty_steps(plans: list[list[int]]) -> list[list[int]]:
    kept = [i for i in range(len(plans[0]) if plans else 0) if any(row[i] for row in plans)]
    return [[row[i] for i in kept] for row in plans]


def grid_blocks(block_size: int | None, shifted: bool, prompt_lengths: Sequence[int], width: int, gen_length: int,
                block_length: int, *, model_name: str) -> tuple[list[tuple[int, int]], list[list[int]], int]:
    """generate's blocks on a block-causal model's grid (block_grid="model"): (blocks as
    canvas [start, end), masks per block and row, canvas length after the prompt), for rows
    of prompt_lengths real tokens left-padded to width.

    With b = block_size, l = block_length and L = max(b, l) (the other must divide it), a
    row with P real prompt tokens decodes the blocks of l that start at multiples of l
    counted from its first token, from the one holding its prompt's end (its prompt tokens
    stay) to the end of the grid block of L holding the (P + gen_length)-th token: SDAR's,
    LLaDA 2.0's and Fast-dLLM v2's loops decode so. Rows of a batch share their blocks, so
    their P must agree modulo L (a ragged batch's rows still decode each as alone). With
    shifted logits (Dream's layout, Fast-dLLM v2; l <= b) a model block's first position
    is predicted from the previous position, which the block-causal mask keeps from seeing
    its own block: it is decoded alone first (a block of one), as Fast-dLLM v2 takes the
    token after a finished block before the next block's steps."""
    from unmask import validation

    grid = validation.model_grid(block_size, block_length, prompt_lengths, shifted=shifted, model_name=model_name)
    length = prompt_lengths[0]
    decoded = -(-(length + gen_length) // grid) * grid - length  # to the end of the grid block
    blocks = []
    for start in range(width - length % block_length, width + decoded, block_length):
        # a model block's first position (counted from the rows' first tokens), not the prompt's
        alone_first = shifted and start >= width and (start - width + length) % block_size == 0 and block_length > 1
        blocks.extend([(start, start + 1), (start + 1, start + block_length)] if alone_first
                      else [(start, start + block_length)])
    masked_counts = [[end - max(start, width)] * len(prompt_lengths) for start, end in blocks]
    return blocks, masked_counts, decoded
