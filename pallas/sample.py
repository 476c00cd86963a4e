"""sample as a Pallas kernel: one pass over the vocabulary in tiles, with a running
reduction per row (docs/design.md, sample).

Grid (row blocks, vocabulary tiles); the vocabulary axis is "arbitrary" (sequential)
and carries, per row, in VMEM scratch: the running max and first argmax, the
softmax sums under conf_temperature (rescaled online when the max grows), the two
largest kept logits (margin), the best Gumbel score and its id, and a NaN/+inf flag.
The last tile writes token and confidence. Tiles are (8, tile_v) with tile_v a
multiple of 128: the TPU's (sublane, lane) tiling.

top_k / top_p arrive as a per-row kept prefix (value, last tied id) computed by the
caller (unmask.jax.sample, with lax.top_k and a sort): a single streaming pass cannot
find the k-th largest logit before it has seen the row. seed and offset are scalar
prefetch operands, so a new step does not recompile the kernel.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from unmask.pallas import philox

ROW_BLOCK = 8
_BIG_ID = jnp.iinfo(jnp.int32).max


def _as_uint32(value):
    """Scalar prefetch operands are int32: reinterpret the bits."""
    return jax.lax.bitcast_convert_type(value, jnp.uint32)


def _row_ids(scalars_ref, row_block, shape):
    """The RNG row id of each row of a tile: its index in the caller's flattened rows,
    plus the row base (scalars[3]) when the rows are one device's slice of a larger batch."""
    local = row_block * ROW_BLOCK + jax.lax.broadcasted_iota(jnp.int32, shape, 0)
    return (local + scalars_ref[3]).astype(jnp.uint32)


def _sample_kernel(scalars_ref, logits_ref, banned_ref, kept_value_ref, kept_last_ref,  # inputs
                   tokens_ref, conf_ref,  # outputs
                   max_ref, arg_ref, sum_ref, weighted_ref, kept_max_ref, runner_ref, best_ref, best_id_ref, best_x_ref,
                   bad_ref,
                   *, tile_v: int, temperature: float, conf_temperature: float, confidence: str):
    row_block, tile = pl.program_id(0), pl.program_id(1)
    neg_inf = jnp.float32(-jnp.inf)

    @pl.when(tile == 0)
    def _init():
        max_ref[...] = jnp.full(max_ref.shape, neg_inf)
        arg_ref[...] = jnp.zeros(arg_ref.shape, jnp.int32)
        sum_ref[...] = jnp.zeros(sum_ref.shape, jnp.float32)
        weighted_ref[...] = jnp.zeros(weighted_ref.shape, jnp.float32)
        kept_max_ref[...] = jnp.full(kept_max_ref.shape, neg_inf)
        runner_ref[...] = jnp.full(runner_ref.shape, neg_inf)
        best_ref[...] = jnp.full(best_ref.shape, neg_inf)
        best_id_ref[...] = jnp.zeros(best_id_ref.shape, jnp.int32)
        best_x_ref[...] = jnp.full(best_x_ref.shape, neg_inf)
        bad_ref[...] = jnp.zeros(bad_ref.shape, jnp.int32)

    x = logits_ref[...].astype(jnp.float32)
    cols = tile * tile_v + jax.lax.broadcasted_iota(jnp.int32, x.shape, 1)
    x = jnp.where(banned_ref[...] != 0, neg_inf, x)
    bad = jnp.isnan(x) | (x == jnp.inf)
    bad_ref[...] = bad_ref[...] | jnp.any(bad, axis=1, keepdims=True).astype(jnp.int32)
    x = jnp.where(jnp.isnan(x), neg_inf, x)
    kept_value, kept_last = kept_value_ref[...], kept_last_ref[...]
    kept = (x > kept_value) | ((x == kept_value) & (cols <= kept_last))
    kept_x = jnp.where(kept, x, neg_inf)

    # Max and first argmax: the global maximum is always kept (the kept set is a prefix).
    tile_max = jnp.max(x, axis=1, keepdims=True)
    tile_arg = jnp.min(jnp.where(x == tile_max, cols, _BIG_ID), axis=1, keepdims=True)
    old_max = max_ref[...]
    new_max = jnp.maximum(old_max, tile_max)
    raised = tile_max > old_max
    arg_ref[...] = jnp.where(raised, tile_arg, arg_ref[...])
    max_ref[...] = new_max

    # Online softmax sums under conf_temperature, relative to the running max.
    inv_t = jnp.float32(1.0 / conf_temperature)
    shift = jnp.where(old_max == neg_inf, 0.0, (old_max - new_max) * inv_t)
    rescale = jnp.where(old_max == neg_inf, 0.0, jnp.exp(shift))
    counts = kept_x > neg_inf
    z = jnp.where(counts, (kept_x - new_max) * inv_t, 0.0)
    e = jnp.where(counts, jnp.exp(z), 0.0)
    old_sum = sum_ref[...]
    sum_ref[...] = old_sum * rescale + jnp.sum(e, axis=1, keepdims=True)
    weighted_ref[...] = rescale * (weighted_ref[...] + shift * old_sum) + jnp.sum(e * z, axis=1, keepdims=True)

    # Runner-up kept logit (margin): the top two kept values, merged tile by tile. The
    # first argmax is the first kept maximum, so the second value is the runner-up.
    kept_max = jnp.max(kept_x, axis=1, keepdims=True)
    kept_arg = jnp.min(jnp.where(kept_x == kept_max, cols, _BIG_ID), axis=1, keepdims=True)
    kept_second = jnp.max(jnp.where(cols == kept_arg, neg_inf, kept_x), axis=1, keepdims=True)
    old_kept_max = kept_max_ref[...]
    runner_ref[...] = jnp.where(kept_max > old_kept_max, jnp.maximum(old_kept_max, kept_second),
                                jnp.maximum(runner_ref[...], kept_max))
    kept_max_ref[...] = jnp.maximum(old_kept_max, kept_max)

    if temperature > 0.0:
        rows = _row_ids(scalars_ref, row_block, x.shape)
        seed_lo, seed_hi, offset = (_as_uint32(scalars_ref[i]) for i in range(3))
        words = philox.draws(seed_lo, seed_hi, rows, cols.astype(jnp.uint32), offset, 0)
        score = jnp.where(counts, kept_x / jnp.float32(temperature) + philox.gumbel_from_draws(words), neg_inf)
        tile_best = jnp.max(score, axis=1, keepdims=True)
        tile_best_id = jnp.min(jnp.where(score == tile_best, cols, _BIG_ID), axis=1, keepdims=True)
        tile_best_x = jnp.max(jnp.where(cols == tile_best_id, x, neg_inf), axis=1, keepdims=True)
        better = tile_best > best_ref[...]
        best_ref[...] = jnp.where(better, tile_best, best_ref[...])
        best_id_ref[...] = jnp.where(better, tile_best_id, best_id_ref[...])
        best_x_ref[...] = jnp.where(better, tile_best_x, best_x_ref[...])

    @pl.when(tile == pl.num_programs(1) - 1)
    def _finish():
        row_max, total = max_ref[...], sum_ref[...]
        if temperature > 0.0:
            token, token_x = best_id_ref[...], best_x_ref[...]
        else:
            token, token_x = arg_ref[...], row_max
        if confidence == "prob":
            conf = jnp.exp((token_x - row_max) * inv_t) / total
        elif confidence == "margin":
            runner_up = runner_ref[...]
            second = jnp.where(runner_up == neg_inf, 0.0, jnp.exp((runner_up - row_max) * inv_t))
            conf = (1.0 - second) / total
        elif confidence == "entropy":
            conf = weighted_ref[...] / total - jnp.log(total)
        else:
            rows = _row_ids(scalars_ref, row_block, token.shape)
            words = philox.draws(_as_uint32(scalars_ref[0]), _as_uint32(scalars_ref[1]), rows, jnp.zeros_like(rows),
                                 _as_uint32(scalars_ref[2]), 1)
            conf = philox.uniform_from_draws(words)
        invalid = (bad_ref[...] != 0) | (row_max == neg_inf)
        tokens_ref[...] = jnp.where(invalid, -1, token)
        conf_ref[...] = jnp.where(invalid, neg_inf, conf).astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("temperature", "confidence", "conf_temperature", "tile_v", "interpret"))
def sample_pallas(logits, banned_mask, kept_value, kept_last, scalars, *, temperature: float, confidence: str,
                  conf_temperature: float, tile_v: int = 2048, interpret: bool = False):
    """logits [N, V] (N a multiple of 8, V of tile_v), banned_mask [1, V] int32 (1 = never
    sampled, padding included), kept_value / kept_last [N, 1], scalars int32 [4] =
    (seed low, seed high, offset, row base) as two's complement. Returns tokens int32 [N, 1] and
    conf float32 [N, 1]."""
    n_rows, vocab = logits.shape
    grid = (n_rows // ROW_BLOCK, vocab // tile_v)
    row_spec = pl.BlockSpec((ROW_BLOCK, 1), lambda i, j, s: (i, 0))
    kernel = functools.partial(_sample_kernel, tile_v=tile_v, temperature=temperature,
                               conf_temperature=conf_temperature, confidence=confidence)
    scratch = [pltpu.VMEM((ROW_BLOCK, 1), dtype) for dtype in
               (jnp.float32, jnp.int32, jnp.float32, jnp.float32, jnp.float32, jnp.float32, jnp.float32, jnp.int32,
                jnp.float32, jnp.int32)]
    return pl.pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct((n_rows, 1), jnp.int32), jax.ShapeDtypeStruct((n_rows, 1), jnp.float32)),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=grid,
            in_specs=[
                pl.BlockSpec((ROW_BLOCK, tile_v), lambda i, j, s: (i, j)),
                pl.BlockSpec((1, tile_v), lambda i, j, s: (0, j)),
                row_spec,
                row_spec,
            ],
            out_specs=(row_spec, row_spec),
            scratch_shapes=scratch,
        ),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        interpret=interpret,
    )(scalars, logits, banned_mask, kept_value, kept_last)
