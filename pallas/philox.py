"""Philox-4x32-10 in 32-bit integer operations (TPU has no 64-bit multiply).

The same generator as csrc/include/unmask/philox.h and python/unmask/rng.py: key =
(seed low, seed high), counter = (col // 4, row, offset, stream), word col % 4. The
32x32 -> 64 products are assembled from 16-bit halves, so every intermediate fits a
uint32 and the words equal the other backends' bit for bit.
"""

from __future__ import annotations

import jax.numpy as jnp

MUL0, MUL1 = 0xD2511F53, 0xCD9E8D57
WEYL0, WEYL1 = 0x9E3779B9, 0xBB67AE85
_LOW16 = 0xFFFF


def mulhilo(constant: int, b: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """High and low words of constant * b (uint32 arrays), from four 16x16 products."""
    a_hi, a_lo = jnp.uint32(constant >> 16), jnp.uint32(constant & _LOW16)
    b_hi, b_lo = b >> 16, b & _LOW16
    low_low = a_lo * b_lo
    low_high = a_lo * b_hi
    high_low = a_hi * b_lo
    middle = (low_low >> 16) + (low_high & _LOW16) + (high_low & _LOW16)
    lo = (low_low & _LOW16) | (middle << 16)
    hi = a_hi * b_hi + (low_high >> 16) + (high_low >> 16) + (middle >> 16)
    return hi, lo


def philox4x32_10(c0, c1, c2, c3, key0, key1):
    """Ten rounds on uint32 arrays (broadcasting); keys are uint32 scalars or arrays."""
    k0, k1 = jnp.uint32(key0), jnp.uint32(key1)
    for _ in range(10):
        hi0, lo0 = mulhilo(MUL0, c0)
        hi1, lo1 = mulhilo(MUL1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = k0 + jnp.uint32(WEYL0)
        k1 = k1 + jnp.uint32(WEYL1)
    return c0, c1, c2, c3


def draws(seed_lo, seed_hi, rows, cols, offset, stream: int):
    """Word col % 4 of block (col // 4, row, offset, stream) for uint32 rows and cols arrays."""
    rows, cols = jnp.broadcast_arrays(rows.astype(jnp.uint32), cols.astype(jnp.uint32))
    c0 = cols >> 2
    c2 = jnp.broadcast_to(jnp.asarray(offset, jnp.uint32), c0.shape)
    c3 = jnp.full(c0.shape, stream, jnp.uint32)
    w0, w1, w2, w3 = philox4x32_10(c0, rows, c2, c3, seed_lo, seed_hi)
    word = cols & 3
    return jnp.where(word == 0, w0, jnp.where(word == 1, w1, jnp.where(word == 2, w2, w3)))


def gumbel_from_draws(w: jnp.ndarray) -> jnp.ndarray:
    """g = -log(-log(u)), u = ((w >> 8) + 0.5) / 2^24, in float32 without rounding u to 1.

    (w >> 8) + 0.5 needs 25 bits; for the upper half of the range -log(u) is computed
    as -log1p(-v) with v = 1 - u = ((2^24 - 1 - m) + 0.5) / 2^24, exact in float32.
    """
    m = (w >> 8).astype(jnp.int32)
    upper = m >= (1 << 23)
    u = (m.astype(jnp.float32) + 0.5) * (1.0 / (1 << 24))
    v = (((1 << 24) - 1 - m).astype(jnp.float32) + 0.5) * (1.0 / (1 << 24))
    neg_log_u = jnp.where(upper, -jnp.log1p(-v), -jnp.log(u))
    return -jnp.log(neg_log_u)


def uniform_from_draws(w: jnp.ndarray) -> jnp.ndarray:
    """u in float32 (the "random" confidence; a rounding of the exact float64 value)."""
    return ((w >> 8).astype(jnp.float32) + 0.5) * (1.0 / (1 << 24))
