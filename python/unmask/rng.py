"""The counter-based RNG shared by every backend (docs/design.md, RNG).

Philox-4x32-10 with key = (seed low 32 bits, seed high 32 bits) and counter =
(col // 4, row, offset, stream); the draw for (row, col) is word col % 4. This
module is the readable specification in plain torch int64 arithmetic; the C++,
CUDA and Pallas kernels produce the same 32-bit words bit for bit.

u = ((w >> 8) + 0.5) / 2^24 lies in (0, 1) and is exact in float64; the Gumbel
noise is g = -log(-log(u)).
"""

from __future__ import annotations

import torch

from unmask.validation import check_seed

# The RngStream values of csrc/include/unmask/philox.h (bound as unmask._C.RngStream).
GUMBEL_STREAM = 0
RANDOM_CONFIDENCE_STREAM = 1

_MASK32 = 0xFFFFFFFF
_MUL0, _MUL1 = 0xD2511F53, 0xCD9E8D57
_WEYL0, _WEYL1 = 0x9E3779B9, 0xBB67AE85


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit words of a * b for a 32-bit constant a and int64 b < 2^32.

    The 64-bit product would overflow int64, so b is split into 16-bit halves:
    a * b = (a * b_hi) * 2^16 + a * b_lo, each part below 2^48.
    """
    with_hi = a * (b >> 16)
    with_lo = a * (b & 0xFFFF)
    hi = (with_hi + (with_lo >> 16)) >> 16
    lo = (((with_hi & 0xFFFF) << 16) + with_lo) & _MASK32
    return hi, lo


def philox4x32_10(counter: torch.Tensor, key0: int, key1: int) -> torch.Tensor:
    """Random123's philox4x32_10: counter [..., 4] int64 words -> [..., 4] words."""
    c0, c1, c2, c3 = (counter[..., i].to(torch.int64) & _MASK32 for i in range(4))
    k0, k1 = key0 & _MASK32, key1 & _MASK32
    for _ in range(10):
        hi0, lo0 = _mulhilo(_MUL0, c0)
        hi1, lo1 = _mulhilo(_MUL1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + _WEYL0) & _MASK32
        k1 = (k1 + _WEYL1) & _MASK32
    return torch.stack([c0, c1, c2, c3], dim=-1)


def draws(seed: int, rows: torch.Tensor, cols: int, *, offset: int | torch.Tensor = 0, stream: int = GUMBEL_STREAM,
          col_start: int = 0) -> torch.Tensor:
    """The 32-bit draws w[r, c] for the given row ids and columns col_start..col_start+cols-1
    (int64 tensor; col_start > 0 for one shard of a vocabulary split across devices).
    offset: an int, a 0-d int tensor (a step counter that lives on the device), or one
    offset per row id."""
    check_seed(seed)
    rows = torch.as_tensor(rows, dtype=torch.int64).reshape(-1)
    col = torch.arange(col_start, col_start + cols, dtype=torch.int64, device=rows.device)
    quad = (col // 4).expand(rows.numel(), cols)
    offset_word = torch.as_tensor(offset, dtype=torch.int64).to(rows.device) & _MASK32
    if offset_word.dim() == 1:  # one offset per row
        offset_word = offset_word[:, None]
    counter = torch.stack(
        [
            quad,
            rows[:, None].expand(-1, cols),
            offset_word.expand_as(quad),
            torch.full_like(quad, stream),
        ],
        dim=-1,
    )
    blocks = philox4x32_10(counter, seed & _MASK32, seed >> 32)
    return blocks.gather(-1, (col % 4).expand(rows.numel(), cols)[..., None]).squeeze(-1)


def uniform_from_draws(w: torch.Tensor) -> torch.Tensor:
    """u = ((w >> 8) + 0.5) / 2^24 in float64: 24 random bits, never 0 or 1."""
    return ((w >> 8).to(torch.float64) + 0.5) / 2.0**24


def gumbel_from_draws(w: torch.Tensor) -> torch.Tensor:
    return -torch.log(-torch.log(uniform_from_draws(w)))


def gumbel(seed: int, rows: torch.Tensor, cols: int, *, offset: int | torch.Tensor = 0,
           col_start: int = 0) -> torch.Tensor:
    """Gumbel noise g[r, c] in float64 for token sampling (stream 0), columns from col_start."""
    return gumbel_from_draws(draws(seed, rows, cols, offset=offset, stream=GUMBEL_STREAM, col_start=col_start))


def random_confidence(seed: int, rows: torch.Tensor, *, offset: int | torch.Tensor = 0) -> torch.Tensor:
    """One uniform per row (column 0 of stream 1), the "random" remasking score."""
    w = draws(seed, rows, 1, offset=offset, stream=RANDOM_CONFIDENCE_STREAM)
    return uniform_from_draws(w[:, 0])
