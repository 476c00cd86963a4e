"""LLaDA's commit schedule, in plain Python: the torch loop (unmask.sampler), the server's
engine and the JAX loop (unmask.jax.sampler, which runs without torch) plan from it."""

from __future__ import annotations

from collections.abc import Sequence


def schedule_counts(masked: Sequence[int], steps: int) -> list[list[int]]:
    """counts[b][i]: tokens row b commits at the i-th step where some row commits, for
    masked[b] positions over `steps` steps.

    m // s each step plus one for the first m % s steps (LLaDA's schedule), so the counts
    of a row sum to m. The steps where no row commits are left out (they cost no model
    call): those are the steps past the largest m when s exceeds it, so the plan holds at
    most max(masked) steps however large `steps` is (steps=10**9 plans as fast as steps=m).
    Host data: the loop plans a block's steps from it.
    """
    steps = min(steps, max(masked, default=0))
    return [[m // steps + (i < m % steps) for i in range(steps)] for m in masked]
