"""What generate returns, for torch and JAX alike (no framework import: unmask.jax
uses it without torch)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any


@dataclasses.dataclass
class GenerateOutput:
    """tokens [B, gen_length]; sequences [B, P + gen_length] (left-padded prompt, then
    output): torch tensors from unmask.generate, JAX arrays from unmask.jax.generate."""

    tokens: Any
    sequences: Any
    nfe: int  # model calls; with cfg_scale > 0 each runs on a doubled batch
    steps_per_block: list[int]  # steps of the schedule (speculate > 0 takes several per call)
    seconds: float
    canvases: int = 0  # canvases evaluated per row over all calls: nfe, or more with speculate > 0

    @property
    def tokens_per_second(self) -> float:
        count = math.prod(self.tokens.shape)
        return count / self.seconds if self.seconds > 0 else float("inf")
