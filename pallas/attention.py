"""Masked bidirectional attention as a Pallas kernel (FlashAttention-2 tiling).

Grid (batch, query head, query tile); each program keeps its query tile and walks the
key tiles with an online softmax in float32. The key/value block of a program is the
whole (padded) sequence of its kv head, chosen by the index map h // group: GQA
without copying keys. Masks are never materialised: key validity (key_valid and
kv_len, folded by the caller) is one int32 per key, the block-causal mask compares
key positions with each query's block end (one int32 per query, computed by the caller
from q_offset, which may therefore be traced: a cached step's window passes its start),
key tiles past a query tile's last visible block are not visited (a loop bound read from
the tile's block ends), and key tiles with no valid key are skipped.

Matrix products take the input dtype (bf16 runs the TPU MXU and GPU tensor cores at
their bf16 rate) and accumulate in float32 (preferred_element_type).

One body, two pallas_calls (unmask.pallas.platform): Mosaic on TPU, Triton on GPU. The
block specs are the same; only the compiler params differ. Tile shapes: queries
(tile_q, D), keys (tile_k, D), D whole; tile_q and tile_k powers of two from 16 to
128 serve both: TPU wants multiples of (8, 128) on the last two block dims (or the
whole dim), Triton wants power-of-two loads and at least 16 rows for a dot.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from unmask.pallas import platform

_MIB = 1 << 20
# Scoped VMEM defaults are 16 MiB on v5e and 32 MiB on v6e; physical VMEM per
# TensorCore is 128 MiB on both and 64 MiB on v7x, hence the cap.
_VMEM_FLOOR, _VMEM_CAP = 16 * _MIB, 64 * _MIB


def _div(a, b):
    """a // b for non-negative int32 operands. lax.div truncates, which equals floor here;
    Python's // goes through jnp.sign, whose Mosaic rule asks for the TPU generation
    and so cannot be lowered on a machine without a TPU (jax.export from a CPU)."""
    return jax.lax.div(a, b)


def block_ends(q_offset, q_len: int, padded_len: int, block_size: int):
    """int32 [padded_len, 1]: for each query i, the first key position of the block after
    query position q_offset + i, (floor((q_offset + i) / block_size) + 1) * block_size. Rows
    past the q_len real queries repeat the last one's, so a tile's padding rows widen
    neither its visited keys nor its partly visible ones. Plain XLA, outside the kernel:
    q_offset may be traced, and the integer division (no TPU vector instruction) runs
    once per call instead of once per program."""
    rows = jnp.minimum(jnp.arange(padded_len, dtype=jnp.int32), q_len - 1)
    position = jnp.asarray(q_offset, jnp.int32) + rows
    return ((position // block_size + 1) * block_size)[:, None]


def _weighted_values(probs, v):
    """P V in v's dtype, accumulated in float32. P is rounded to v's dtype, as FlashAttention
    does: probabilities lie in [0, 1], where bf16 keeps 8 bits relative precision, and a
    float32 operand would take the matrix unit off its bf16 rate."""
    return jax.lax.dot_general(probs.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _weighted_values_exactly(probs, v, visible):
    """P V where V may hold an inf or NaN at keys some rows do not see: each row meets only
    the keys it sees (a plain product multiplies the others' zero weights by them: 0 times
    NaN is NaN). The finite part is the plain product with those entries zeroed; the rest
    follows IEEE arithmetic as the reference's product does (unmask.reference), counted
    with three 0/1 products: a row that sees a NaN, or an infinity with weight 0, or infinities
    of both signs, gets NaN; one that sees infinities of one sign gets that infinity."""
    v32 = v.astype(jnp.float32)  # Mosaic tests finiteness in float32 only
    finite = jnp.isfinite(v32)
    product = _weighted_values(probs, jnp.where(finite, v, 0))
    weighted = visible & (probs.astype(v.dtype) > 0)  # the weights the product takes, as rounded

    def count(rows, where):  # 0/1 operands are exact in v's dtype; the counts accumulate in float32
        return jax.lax.dot_general(rows.astype(v.dtype), where.astype(v.dtype), (((1,), (0,)), ((), ())),
                                   preferred_element_type=jnp.float32)

    positive, negative = count(weighted, v32 == jnp.inf), count(weighted, v32 == -jnp.inf)
    nan = count(visible, ~finite) > positive + negative  # NaNs or 0 x inf among what is seen
    extra = jnp.where(nan | ((positive > 0) & (negative > 0)), jnp.nan,
                      jnp.where(positive > 0, jnp.inf, jnp.where(negative > 0, -jnp.inf, 0.0)))
    return product + extra


def _attention_kernel(q_ref, k_ref, v_ref, valid_ref, *refs, tile_q: int, tile_k: int, key_tiles: int,
                      block_causal: bool, scale: float):
    ends_ref, out_ref = refs if block_causal else (None, refs[0])
    q = q_ref[...]
    if block_causal:
        # Block ends grow with the query: the tile's last row bounds the keys it visits (keys
        # of later blocks are invisible to the whole tile) and its first row sees every key
        # before its own end.
        block_end = ends_ref[...]  # (tile_q, 1)
        last_visible, first_visible = jnp.max(block_end), jnp.min(block_end)
        visited = jnp.minimum(key_tiles, _div(last_visible + tile_k - 1, tile_k))
    else:
        visited = key_tiles

    def step(j, carry):
        start = pl.multiple_of(j * tile_k, tile_k)
        valid = valid_ref[:, pl.ds(start, tile_k)] != 0  # (1, tile_k)

        def attend(carry):
            row_max, row_sum, acc = carry
            k = k_ref[pl.ds(start, tile_k), :]
            # Hidden keys weigh 0, and 0 times a NaN or inf V is NaN: V is zeroed where
            # kv_len or key_valid hides a key, or past the block of the tile's last query.
            # A key only later queries of the tile see is handled below.
            key_ok = valid.reshape(tile_k, 1)
            if block_causal:
                key_col = start + jax.lax.broadcasted_iota(jnp.int32, (tile_k, 1), 0)
                key_ok &= key_col < last_visible
            v = jnp.where(key_ok, v_ref[pl.ds(start, tile_k), :], 0)
            # The scale is applied to the float32 scores rather than to q: scaling q in
            # bf16 would round every query element once more.
            scores = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())),
                                         preferred_element_type=jnp.float32) * jnp.float32(scale)
            visible = jnp.broadcast_to(valid, scores.shape)
            if block_causal:
                key_pos = start + jax.lax.broadcasted_iota(jnp.int32, scores.shape, 1)
                visible &= key_pos < block_end
            scores = jnp.where(visible, scores, -jnp.inf)
            new_max = jnp.maximum(row_max, jnp.max(scores, axis=1, keepdims=True))
            safe_max = jnp.where(new_max == -jnp.inf, 0.0, new_max)  # rows that have seen nothing yet
            alpha = jnp.exp(row_max - safe_max)
            probs = jnp.where(visible, jnp.exp(scores - safe_max), 0.0)
            row_sum = alpha * row_sum + jnp.sum(probs, axis=1, keepdims=True)  # float32, unrounded
            if block_causal:
                # A key the block-causal mask shows some rows of the tile and hides from
                # others, whose V is not finite: the exact product (rare; one more pass over
                # the tile's V decides).
                shown_to_some = key_ok & (key_col >= first_visible)
                risky = jnp.max((shown_to_some & ~jnp.isfinite(v.astype(jnp.float32))).astype(jnp.int32)) > 0
                product = jax.lax.cond(risky, lambda: _weighted_values_exactly(probs, v, visible),
                                       lambda: _weighted_values(probs, v))
            else:
                product = _weighted_values(probs, v)
            acc = alpha * acc + product
            return new_max, row_sum, acc

        # max, not any: Triton Pallas lowers no boolean reduction.
        return jax.lax.cond(jnp.max(valid.astype(jnp.int32)) > 0, attend, lambda c: c, carry)

    init = (jnp.full((tile_q, 1), -jnp.inf, jnp.float32), jnp.zeros((tile_q, 1), jnp.float32),
            jnp.zeros(q.shape, jnp.float32))
    _, row_sum, acc = jax.lax.fori_loop(0, visited, step, init)
    out = jnp.where(row_sum > 0, acc / jnp.where(row_sum > 0, row_sum, 1.0), 0.0)  # no visible key: zeros
    out_ref[...] = out.astype(out_ref.dtype)


def vmem_bytes(k_len: int, head_dim: int, itemsize: int, tile_q: int, tile_k: int) -> int:
    """VMEM a TPU program holds: the pipeline double-buffers every block.

    K and V: 2 x 2 x Lk x D x itemsize; at Lk 8192, D 128 that is 8 MiB in bf16 (fits
    the 16 MiB v5e default with room) and 16 MiB in float32 (does not, hence an
    explicit limit). The key mask block (1, Lk) int32 pads to 8 sublanes: 2 x 8 x Lk x 4
    (0.5 MiB at 8k). Query and output tiles 2 x 2 x tile_q x D x itemsize, and about six
    float32 (tile_q, tile_k) temporaries (scores, probabilities, masks) plus the
    float32 accumulator.
    """
    kv = 2 * 2 * k_len * head_dim * itemsize
    mask = 2 * 8 * k_len * 4
    q_out = 2 * 2 * tile_q * head_dim * itemsize
    temporaries = 6 * tile_q * tile_k * 4 + tile_q * head_dim * 4
    return kv + mask + q_out + temporaries


def _tpu_params(k_len: int, head_dim: int, itemsize: int, tile_q: int, tile_k: int):
    """The whole key sequence of a kv head is one block rather than a grid axis: its
    block index does not change along the query-tile axis (innermost), so Mosaic copies
    K and V once per (batch, head) instead of once per query tile. The price is VMEM
    linear in Lk; the limit is raised to what the block needs plus 4 MiB of headroom,
    capped at 64 MiB: about 60k keys at D 128 in bf16, 30k in float32. Longer
    sequences would need the key axis as an "arbitrary" grid dimension."""
    need = vmem_bytes(k_len, head_dim, itemsize, tile_q, tile_k) + 4 * _MIB
    return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel"),
                                vmem_limit_bytes=min(max(need, _VMEM_FLOOR), _VMEM_CAP))


def _gpu_params(head_dim: int):
    """On GPU the kv "block" is only a pointer (Triton loads the tile_k slices the loop
    asks for), so no size limit applies. Warps from register arithmetic, not measured
    (no GPU run yet): the float32 accumulator tile_q x D at 128 x 128 is 64 values per
    thread over 8 warps but 128 over 4, before the float32 scores tile of the same size."""
    return pltriton.CompilerParams(num_warps=4 if head_dim <= 64 else 8, num_stages=2)


@functools.partial(jax.jit, static_argnames=("scale", "tile_q", "tile_k", "interpret", "variant"))
def attention_pallas(q, k, v, key_valid, query_block_ends=None, *, scale: float, tile_q: int, tile_k: int,
                     interpret: bool = False, variant: str | None = None):
    """q [B, Hq, Lq, D], k and v [B, Hkv, Lk, D] with Lq a multiple of tile_q and Lk of
    tile_k; key_valid int32 [B, 1, Lk]. Returns [B, Hq, Lq, D]. query_block_ends: None, or
    the block-causal mask as int32 [Lq, 1] (block_ends): query i sees keys before entry i.

    variant None picks Mosaic on TPU and Triton on GPU when the call is lowered; "tpu"
    or "gpu" forces one (unmask.pallas.platform.by_platform)."""
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads, k_len = k.shape[1], k.shape[2]
    group = q_heads // kv_heads
    block_causal = query_block_ends is not None
    if block_causal and (query_block_ends.shape != (q_len, 1) or query_block_ends.dtype != jnp.int32):
        raise ValueError(f"query_block_ends must be int32 [{q_len}, 1] (block_ends), got "
                         f"{query_block_ends.dtype} {tuple(query_block_ends.shape)}")
    kernel = functools.partial(_attention_kernel, tile_q=tile_q, tile_k=tile_k, key_tiles=k_len // tile_k,
                               block_causal=block_causal, scale=scale)
    # (tile_q, 1): the last dim whole (TPU blocks need it a multiple of 128 or whole)
    ends_spec = [pl.BlockSpec((tile_q, 1), lambda b, h, i: (i, 0))] if block_causal else []
    ends = (query_block_ends,) if block_causal else ()

    def call(compiler_params, width: int):
        kv_spec = pl.BlockSpec((None, None, k_len, width), lambda b, h, i: (b, _div(h, group), 0, 0))
        return lambda *args: pl.pallas_call(
            kernel,
            out_shape=jax.ShapeDtypeStruct(q.shape[:3] + (width,), q.dtype),
            grid=(batch, q_heads, q_len // tile_q),
            in_specs=[
                pl.BlockSpec((None, None, tile_q, width), lambda b, h, i: (b, h, i, 0)),
                kv_spec,
                kv_spec,
                pl.BlockSpec((None, 1, k_len), lambda b, h, i: (b, 0, 0)),
            ] + ends_spec,
            out_specs=pl.BlockSpec((None, None, tile_q, width), lambda b, h, i: (b, h, i, 0)),
            compiler_params=compiler_params,
            interpret=interpret,
        )(*args)

    tpu = call(_tpu_params(k_len, head_dim, q.dtype.itemsize, tile_q, tile_k), head_dim)
    # Triton lowers power-of-two arrays only: a head dim such as 80 or 96 runs zero-padded
    # to the next power of two (zeros add nothing to q.k, and the padded columns of P V
    # are dropped), at the cost of the padded width's loads and products.
    width = 1 << (head_dim - 1).bit_length()
    gpu_padded = call(_gpu_params(width), width)

    def gpu(q, k, v, key_valid, *ends):
        if width == head_dim:
            return gpu_padded(q, k, v, key_valid, *ends)
        pad = ((0, 0), (0, 0), (0, 0), (0, width - head_dim))
        return gpu_padded(jnp.pad(q, pad), jnp.pad(k, pad), jnp.pad(v, pad), key_valid, *ends)[..., :head_dim]

    return platform.by_platform((q, k, v, key_valid) + ends, tpu=tpu, gpu=gpu, interpret=interpret, variant=variant)
