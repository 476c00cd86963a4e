"""Masked bidirectional attention as a Pallas kernel (FlashAttention-2 tiling).

Grid (batch, query head, query tile); each program keeps its query tile and walks the
key tiles with an online softmax in float32. The key/value block of a program is the
whole (padded) sequence of its kv head, chosen by the index map h // group: GQA
without copying keys. Masks are never materialised: key validity (key_valid and
kv_len, folded by the caller) is one int32 per key, the block-causal mask comes from
iotas, key tiles past a query tile's last visible block are not visited (a loop bound
computed from the program id), and key tiles with no valid key are skipped.

Tile shapes: queries (tile_q, D) and keys (tile_k, D), tile_q and tile_k multiples of
8 and 128, D whole: the (8, 128) tiling TPU requires.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu


def _attention_kernel(q_ref, k_ref, v_ref, valid_ref, out_ref, *, tile_q: int, tile_k: int, key_tiles: int,
                      block_size: int, q_offset: int, scale: float):
    q_tile = pl.program_id(2)
    q = q_ref[...].astype(jnp.float32) * jnp.float32(scale)
    query_pos = q_offset + q_tile * tile_q + jax.lax.broadcasted_iota(jnp.int32, (tile_q, tile_k), 0)
    if block_size:
        # Keys of blocks after the last query's block are invisible to the whole tile.
        last_visible = ((q_offset + (q_tile + 1) * tile_q - 1) // block_size + 1) * block_size
        visited = jnp.minimum(key_tiles, (last_visible + tile_k - 1) // tile_k)
    else:
        visited = key_tiles

    def step(j, carry):
        row_max, row_sum, acc = carry
        start = pl.multiple_of(j * tile_k, tile_k)
        valid = valid_ref[0, pl.ds(start, tile_k)] != 0

        def attend(carry):
            row_max, row_sum, acc = carry
            k = k_ref[pl.ds(start, tile_k), :].astype(jnp.float32)
            v = v_ref[pl.ds(start, tile_k), :].astype(jnp.float32)
            scores = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
            visible = jnp.broadcast_to(valid[None, :], scores.shape)
            if block_size:
                key_pos = start + jax.lax.broadcasted_iota(jnp.int32, scores.shape, 1)
                visible &= key_pos // block_size <= query_pos // block_size
            scores = jnp.where(visible, scores, -jnp.inf)
            new_max = jnp.maximum(row_max, jnp.max(scores, axis=1, keepdims=True))
            safe_max = jnp.where(new_max == -jnp.inf, 0.0, new_max)  # rows that have seen nothing yet
            alpha = jnp.exp(row_max - safe_max)
            probs = jnp.where(visible, jnp.exp(scores - safe_max), 0.0)
            row_sum = alpha * row_sum + jnp.sum(probs, axis=1, keepdims=True)
            acc = alpha * acc + jax.lax.dot_general(probs, v, (((1,), (0,)), ((), ())),
                                                    preferred_element_type=jnp.float32)
            return new_max, row_sum, acc

        return jax.lax.cond(jnp.any(valid), attend, lambda c: c, carry)

    init = (jnp.full((tile_q, 1), -jnp.inf, jnp.float32), jnp.zeros((tile_q, 1), jnp.float32),
            jnp.zeros(q.shape, jnp.float32))
    _, row_sum, acc = jax.lax.fori_loop(0, visited, step, init)
    out = jnp.where(row_sum > 0, acc / jnp.where(row_sum > 0, row_sum, 1.0), 0.0)  # no visible key: zeros
    out_ref[...] = out.astype(out_ref.dtype)


@functools.partial(jax.jit, static_argnames=("block_size", "q_offset", "scale", "tile_q", "tile_k", "interpret"))
def attention_pallas(q, k, v, key_valid, *, block_size: int, q_offset: int, scale: float, tile_q: int,
                     tile_k: int, interpret: bool = False):
    """q [B, Hq, Lq, D], k and v [B, Hkv, Lk, D] with Lq a multiple of tile_q and Lk of
    tile_k; key_valid int32 [B, 1, Lk]. Returns [B, Hq, Lq, D]."""
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads, k_len = k.shape[1], k.shape[2]
    group = q_heads // kv_heads
    kernel = functools.partial(_attention_kernel, tile_q=tile_q, tile_k=tile_k, key_tiles=k_len // tile_k,
                               block_size=block_size, q_offset=q_offset, scale=scale)
    kv_spec = pl.BlockSpec((None, None, k_len, head_dim), lambda b, h, i: (b, h // group, 0, 0))
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        grid=(batch, q_heads, q_len // tile_q),
        in_specs=[
            pl.BlockSpec((None, None, tile_q, head_dim), lambda b, h, i: (b, h, i, 0)),
            kv_spec,
            kv_spec,
            pl.BlockSpec((None, 1, k_len), lambda b, h, i: (b, 0, 0)),
        ],
        out_specs=pl.BlockSpec((None, None, tile_q, head_dim), lambda b, h, i: (b, h, i, 0)),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel")),
        interpret=interpret,
    )(q, k, v, key_valid)
