"""sample as a Pallas kernel: one pass over the vocabulary in tiles, with a running
reduction per row (docs/design.md, sample).

The running state of each row (a _State of (8, 1) columns): the max and first argmax,
the softmax sums under conf_temperature (rescaled online when the max grows), the two
largest kept logits (margin), the best Gumbel score with its id and logit, and a
NaN/+inf flag. _update folds one (8, tile_v) tile into it; _finish turns it into token
and confidence. Both variants run these same functions:

- TPU (Mosaic): grid (row blocks, vocabulary tiles), the vocabulary axis "arbitrary"
  (sequential) with the state in VMEM scratch; seed and offset are scalar prefetch
  operands (SMEM), so a new step does not recompile the kernel, and each row's own
  offset (added to the scalar one) is an (8, 1) column beside the kept prefix. tile_v is a multiple
  of 128 (the lane width; the caller rounds to it) and the row block 8 (sublanes).
  VMEM per program at tile_v 2048: logits 2 x 8 x 2048 x 4 B = 128 KiB double-buffered
  in float32, the banned mask (1, 2048) int32 padded to 8 sublanes 128 KiB, and the
  Philox words and Gumbel scores, some twenty (8, 2048) 32-bit temporaries, about
  1.3 MiB: far below the 16 MiB scoped default of v5e, so no limit is set.
- GPU (Triton): Triton has no scalar prefetch, no scratch that persists across grid
  steps and no sequential grid axis (programs run concurrently), so the grid is the
  row blocks alone and each program walks its vocabulary tiles in a fori_loop with the
  state as the loop carry; seed and offset are a plain int32 [4] operand (the rows'
  own offsets a column, as on TPU). Triton loads
  power-of-two shapes only: its tile is the largest power of two dividing tile_v (at
  least 128, since tile_v is a multiple of 128), which divides the padded vocabulary.

top_k / top_p arrive as a per-row kept prefix (value, last tied id) computed by the
caller (unmask.jax.sample, with lax.top_k and a sort): a single streaming pass cannot
find the k-th largest logit before it has seen the row.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from unmask.pallas import philox, platform

ROW_BLOCK = 8
LANES = 128
_BIG_ID = jnp.iinfo(jnp.int32).max
_NEG_INF = float("-inf")


class _State(NamedTuple):
    max: jnp.ndarray  # float32: running max of the (unbanned, non-NaN) logits
    arg: jnp.ndarray  # int32: its first id
    sum: jnp.ndarray  # float32: sum of exp((kept - max) / conf_temperature)
    weighted: jnp.ndarray  # float32: the same terms weighted by their exponent (entropy)
    kept_max: jnp.ndarray  # float32: largest kept logit
    runner: jnp.ndarray  # float32: second largest kept logit (margin)
    best: jnp.ndarray  # float32: best Gumbel score
    best_id: jnp.ndarray  # int32: its id
    best_x: jnp.ndarray  # float32: its logit
    bad: jnp.ndarray  # int32: 1 once a NaN or +inf logit was seen


def _initial_state(rows: int) -> _State:
    neg, zero_f, zero_i = (jnp.full((rows, 1), _NEG_INF, jnp.float32), jnp.zeros((rows, 1), jnp.float32),
                           jnp.zeros((rows, 1), jnp.int32))
    return _State(neg, zero_i, zero_f, zero_f, neg, neg, neg, zero_i, neg, zero_i)


class _Scalars(NamedTuple):
    """seed low, seed high, offset (uint32) and the row base (int32). Inside a kernel,
    offset becomes each row's: the scalar plus the row's own (_with_row_offsets)."""
    seed_lo: jnp.ndarray
    seed_hi: jnp.ndarray
    offset: jnp.ndarray
    row_base: jnp.ndarray


def _read_scalars(scalars_ref) -> _Scalars:
    """The operand is int32 (scalar prefetch operands are); reinterpret the bits."""
    seed_lo, seed_hi, offset = (jax.lax.bitcast_convert_type(scalars_ref[i], jnp.uint32) for i in range(3))
    return _Scalars(seed_lo, seed_hi, offset, scalars_ref[3])


def _with_row_offsets(scalars: _Scalars, row_offsets) -> _Scalars:
    """The row block's offsets (8, 1): the scalar offset plus each row's own (int32 bits of
    a uint32; the sum wraps as the uint32 counter word does)."""
    return scalars._replace(offset=scalars.offset + jax.lax.bitcast_convert_type(row_offsets, jnp.uint32))


def _row_ids(scalars: _Scalars, row_block, shape):
    """The RNG row id of each row of a tile: its index in the caller's flattened rows,
    plus the row base when the rows are one device's slice of a larger batch."""
    local = row_block * ROW_BLOCK + jax.lax.broadcasted_iota(jnp.int32, shape, 0)
    return (local + scalars.row_base).astype(jnp.uint32)


def _update(state: _State, logits, banned, kept_value, kept_last, first_col, row_block, scalars: _Scalars, *,
            temperature: float, conf_temperature: float) -> _State:
    """state after the tile logits [8, T] whose first id is first_col; banned [1, T]."""
    neg_inf = jnp.float32(_NEG_INF)
    x = logits.astype(jnp.float32)
    cols = first_col + jax.lax.broadcasted_iota(jnp.int32, x.shape, 1)
    x = jnp.where(banned != 0, neg_inf, x)
    bad = (jnp.isnan(x) | (x == jnp.inf)).astype(jnp.int32)
    bad = jnp.maximum(state.bad, jnp.max(bad, axis=1, keepdims=True))  # max, not any: Triton has no bool reduction
    x = jnp.where(jnp.isnan(x), neg_inf, x)
    kept = (x > kept_value) | ((x == kept_value) & (cols <= kept_last))
    kept_x = jnp.where(kept, x, neg_inf)

    # Max and first argmax: the global maximum is always kept (the kept set is a prefix).
    tile_max = jnp.max(x, axis=1, keepdims=True)
    tile_arg = jnp.min(jnp.where(x == tile_max, cols, _BIG_ID), axis=1, keepdims=True)
    old_max = state.max
    new_max = jnp.maximum(old_max, tile_max)
    arg = jnp.where(tile_max > old_max, tile_arg, state.arg)

    # Online softmax sums under conf_temperature, relative to the running max.
    inv_t = jnp.float32(1.0 / conf_temperature)
    shift = jnp.where(old_max == neg_inf, 0.0, (old_max - new_max) * inv_t)
    rescale = jnp.where(old_max == neg_inf, 0.0, jnp.exp(shift))
    counts = kept_x > neg_inf
    z = jnp.where(counts, (kept_x - new_max) * inv_t, 0.0)
    e = jnp.where(counts, jnp.exp(z), 0.0)
    total = state.sum * rescale + jnp.sum(e, axis=1, keepdims=True)
    weighted = rescale * (state.weighted + shift * state.sum) + jnp.sum(e * z, axis=1, keepdims=True)

    # Runner-up kept logit (margin): the top two kept values, merged tile by tile. The
    # first argmax is the first kept maximum, so the second value is the runner-up.
    kept_max = jnp.max(kept_x, axis=1, keepdims=True)
    kept_arg = jnp.min(jnp.where(kept_x == kept_max, cols, _BIG_ID), axis=1, keepdims=True)
    kept_second = jnp.max(jnp.where(cols == kept_arg, neg_inf, kept_x), axis=1, keepdims=True)
    runner = jnp.where(kept_max > state.kept_max, jnp.maximum(state.kept_max, kept_second),
                       jnp.maximum(state.runner, kept_max))
    best, best_id, best_x = state.best, state.best_id, state.best_x
    if temperature > 0.0:
        rows = _row_ids(scalars, row_block, x.shape)
        words = philox.draws(scalars.seed_lo, scalars.seed_hi, rows, cols.astype(jnp.uint32), scalars.offset, 0)
        score = jnp.where(counts, kept_x / jnp.float32(temperature) + philox.gumbel_from_draws(words), neg_inf)
        tile_best = jnp.max(score, axis=1, keepdims=True)
        tile_best_id = jnp.min(jnp.where(score == tile_best, cols, _BIG_ID), axis=1, keepdims=True)
        tile_best_x = jnp.max(jnp.where(cols == tile_best_id, x, neg_inf), axis=1, keepdims=True)
        better = tile_best > best
        best = jnp.where(better, tile_best, best)
        best_id = jnp.where(better, tile_best_id, best_id)
        best_x = jnp.where(better, tile_best_x, best_x)
    return _State(new_max, arg, total, weighted, jnp.maximum(state.kept_max, kept_max), runner, best, best_id,
                  best_x, bad)


def _finish(state: _State, row_block, scalars: _Scalars, *, temperature: float, conf_temperature: float,
            confidence: str):
    """(token int32, confidence float32) columns from the state after the last tile."""
    neg_inf = jnp.float32(_NEG_INF)
    inv_t = jnp.float32(1.0 / conf_temperature)
    row_max, total = state.max, state.sum
    if temperature > 0.0:
        token, token_x = state.best_id, state.best_x
    else:
        token, token_x = state.arg, row_max
    if confidence == "prob":
        conf = jnp.exp((token_x - row_max) * inv_t) / total
    elif confidence == "margin":
        second = jnp.where(state.runner == neg_inf, 0.0, jnp.exp((state.runner - row_max) * inv_t))
        conf = (1.0 - second) / total
    elif confidence == "entropy":
        conf = state.weighted / total - jnp.log(total)
    else:
        rows = _row_ids(scalars, row_block, token.shape)
        words = philox.draws(scalars.seed_lo, scalars.seed_hi, rows, jnp.zeros_like(rows), scalars.offset, 1)
        conf = philox.uniform_from_draws(words)
    invalid = (state.bad != 0) | (row_max == neg_inf)
    return jnp.where(invalid, -1, token), jnp.where(invalid, neg_inf, conf).astype(jnp.float32)


def _tpu_kernel(scalars_ref, logits_ref, banned_ref, kept_value_ref, kept_last_ref, row_offsets_ref, tokens_ref,
                conf_ref, *state_refs, tile_v: int, options: dict):
    row_block, tile = pl.program_id(0), pl.program_id(1)
    scalars = _with_row_offsets(_read_scalars(scalars_ref), row_offsets_ref[...])

    @pl.when(tile == 0)
    def _init():
        for ref, value in zip(state_refs, _initial_state(ROW_BLOCK)):
            ref[...] = value

    state = _State(*(ref[...] for ref in state_refs))
    state = _update(state, logits_ref[...], banned_ref[...], kept_value_ref[...], kept_last_ref[...], tile * tile_v,
                    row_block, scalars, temperature=options["temperature"],
                    conf_temperature=options["conf_temperature"])
    for ref, value in zip(state_refs, state):
        ref[...] = value

    @pl.when(tile == pl.num_programs(1) - 1)
    def _write():
        tokens_ref[...], conf_ref[...] = _finish(state, row_block, scalars, **options)


def _gpu_kernel(scalars_ref, logits_ref, banned_ref, kept_value_ref, kept_last_ref, row_offsets_ref, tokens_ref,
                conf_ref, *, tile_v: int, options: dict):
    row_block = pl.program_id(0)
    scalars = _with_row_offsets(_read_scalars(scalars_ref), row_offsets_ref[...])
    kept_value, kept_last = kept_value_ref[...], kept_last_ref[...]

    def step(tile, state):
        start = pl.multiple_of(tile * tile_v, tile_v)
        return _update(state, logits_ref[:, pl.ds(start, tile_v)], banned_ref[:, pl.ds(start, tile_v)], kept_value,
                       kept_last, start, row_block, scalars, temperature=options["temperature"],
                       conf_temperature=options["conf_temperature"])

    state = jax.lax.fori_loop(0, logits_ref.shape[1] // tile_v, step, _initial_state(ROW_BLOCK))
    tokens_ref[...], conf_ref[...] = _finish(state, row_block, scalars, **options)


def _out_shape(n_rows: int):
    return (jax.ShapeDtypeStruct((n_rows, 1), jnp.int32), jax.ShapeDtypeStruct((n_rows, 1), jnp.float32))


def _tpu_call(n_rows: int, vocab: int, tile_v: int, options: dict, interpret: bool):
    row_spec = pl.BlockSpec((ROW_BLOCK, 1), lambda i, j, s: (i, 0))
    scratch = [pltpu.VMEM((ROW_BLOCK, 1), value.dtype) for value in _initial_state(ROW_BLOCK)]
    return pl.pallas_call(
        functools.partial(_tpu_kernel, tile_v=tile_v, options=options),
        out_shape=_out_shape(n_rows),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(n_rows // ROW_BLOCK, vocab // tile_v),
            in_specs=[
                pl.BlockSpec((ROW_BLOCK, tile_v), lambda i, j, s: (i, j)),
                pl.BlockSpec((1, tile_v), lambda i, j, s: (0, j)),
                row_spec,
                row_spec,
                row_spec,
            ],
            out_specs=(row_spec, row_spec),
            scratch_shapes=scratch,
        ),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        interpret=interpret,
    )


def _gpu_call(n_rows: int, vocab: int, tile_v: int, options: dict, interpret: bool):
    tile = tile_v & -tile_v  # the largest power of two dividing tile_v (module docstring)
    row_spec = pl.BlockSpec((ROW_BLOCK, 1), lambda i: (i, 0))
    return pl.pallas_call(
        functools.partial(_gpu_kernel, tile_v=tile, options=options),
        out_shape=_out_shape(n_rows),
        grid=(n_rows // ROW_BLOCK,),
        in_specs=[
            pl.BlockSpec((4,), lambda i: (0,)),
            # Whole rows: on GPU a block is a pointer, and the loop loads (8, tile) slices.
            pl.BlockSpec((ROW_BLOCK, vocab), lambda i: (i, 0)),
            pl.BlockSpec((1, vocab), lambda i: (0, 0)),
            row_spec,
            row_spec,
            row_spec,
        ],
        out_specs=(row_spec, row_spec),
        # 4 warps hold an (8, 2048) float32 tile at 128 values per thread (not measured).
        compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
    )


def check_tile_v(tile_v: int) -> None:
    if tile_v <= 0 or tile_v % LANES:
        raise ValueError(f"{tile_v=} must be a positive multiple of {LANES} (the TPU lane width)")


@functools.partial(jax.jit, static_argnames=("temperature", "confidence", "conf_temperature", "tile_v", "interpret",
                                             "variant"))
def sample_pallas(logits, banned_mask, kept_value, kept_last, row_offsets, scalars, *, temperature: float,
                  confidence: str, conf_temperature: float, tile_v: int = 2048, interpret: bool = False,
                  variant: str | None = None):
    """logits [N, V] (N a multiple of 8, V of tile_v, tile_v of 128), banned_mask [1, V]
    int32 (1 = never sampled, padding included), kept_value / kept_last [N, 1], row_offsets
    int32 [N, 1] (each row's RNG offset, added to the scalar one), scalars int32 [4] =
    (seed low, seed high, offset, row base) as two's complement. Returns tokens int32
    [N, 1] and conf float32 [N, 1].

    variant None picks Mosaic on TPU and Triton on GPU when the call is lowered; "tpu"
    or "gpu" forces one (unmask.pallas.platform.by_platform)."""
    check_tile_v(tile_v)
    n_rows, vocab = logits.shape
    options = dict(temperature=temperature, conf_temperature=conf_temperature, confidence=confidence)
    tpu_call = _tpu_call(n_rows, vocab, tile_v, options, interpret)
    gpu_call = _gpu_call(n_rows, vocab, tile_v, options, interpret)

    def tpu(logits, banned_mask, kept_value, kept_last, row_offsets, scalars):
        return tpu_call(scalars, logits, banned_mask, kept_value, kept_last, row_offsets)

    def gpu(logits, banned_mask, kept_value, kept_last, row_offsets, scalars):
        return gpu_call(scalars, logits, banned_mask, kept_value, kept_last, row_offsets)

    return platform.by_platform((logits, banned_mask, kept_value, kept_last, row_offsets, scalars), tpu=tpu,
                                gpu=gpu, interpret=interpret, variant=variant)
