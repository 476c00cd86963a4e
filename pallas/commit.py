"""commit as a Pallas kernel: confidence-based unmasking of 8 canvas rows per program.

Neither TPU nor Triton kernels have a general sort, so each position's rank among the
eligible ones (higher confidence first, ties to the lower position) is counted
directly: one pass per position over its row, O(L^2) comparisons per row, which for
the blocks of 32 to 1024 positions a sampler commits in is cheaper than a launch of
anything else. The modes then reduce to counts: commit the positions whose rank is
below n. The threshold and factor rules compare each confidence with a float32 bound of
its rank (unmask.jax.commit_bounds: the host works them out so that float32 decides as
the float64 arithmetic of the other backends does).

One body, two pallas_calls (unmask.pallas.platform): Mosaic on TPU with the row as one
block (any L: a block dim equal to the array dim is always legal there); Triton on GPU
with L padded to a power of two (Triton loads power-of-two shapes only), the padding
ineligible so it changes no rank and is never committed.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from unmask.pallas import platform

ROW_BLOCK = 8


def _column(values, position, i, fill):
    """values[:, i] as a (rows, 1) column. A masked lane reduction rather than a
    dynamic_slice, which Mosaic does not lower for a traced index; it costs O(L) per
    position, the same order as the comparisons that use it."""
    return jnp.max(jnp.where(position == i, values, fill), axis=1, keepdims=True)


def _commit_kernel(x_ref, tokens_ref, conf_ref, eligible_ref, k_ref, bounds_ref, out_ref, committed_ref, *,
                   mode: str):
    conf = conf_ref[...].astype(jnp.float32)
    conf = jnp.where(jnp.isnan(conf), -jnp.inf, conf)  # a NaN confidence ranks as -inf
    eligible_int = eligible_ref[...]
    eligible = eligible_int != 0
    length = conf.shape[1]
    position = jax.lax.broadcasted_iota(jnp.int32, conf.shape, 1)

    def count_better(i, rank):
        other = _column(conf, position, i, -jnp.inf)
        other_eligible = _column(eligible_int, position, i, 0) != 0
        better = (other > conf) | ((other == conf) & (i < position))
        return rank + (other_eligible & better).astype(jnp.int32)

    rank = jax.lax.fori_loop(0, length, count_better, jnp.zeros(conf.shape, jnp.int32))
    n_eligible = jnp.sum(eligible.astype(jnp.int32), axis=1, keepdims=True)
    # count mode commits min(k, eligible); the other modes at least that many and whatever
    # else passes (k is 1 there unless threshold mode is given a floor)
    floor = jnp.minimum(jnp.maximum(k_ref[...], 0), n_eligible)
    if mode == "count":
        n = floor
    else:
        bounds = bounds_ref[...]  # a position of rank r passes where conf > bounds[:, r]
        if mode == "threshold":
            bound = bounds  # one bound for every rank
        else:  # factor: the eligible position of rank r is c_{r+1}; the passing ranks form a prefix

            def bound_of_rank(r, bound):
                return jnp.where(rank == r, _column(bounds, position, r, -jnp.inf), bound)

            bound = jax.lax.fori_loop(0, length, bound_of_rank, jnp.full(conf.shape, jnp.inf, jnp.float32))
        passes = eligible & (conf > bound)
        n = jnp.maximum(jnp.sum(passes.astype(jnp.int32), axis=1, keepdims=True), floor)
    committed = eligible & (rank < n)
    committed_ref[...] = committed.astype(jnp.int32)
    out_ref[...] = jnp.where(committed, tokens_ref[...], x_ref[...])


def _call(kernel, batch: int, length: int, compiler_params, interpret: bool):
    spec = pl.BlockSpec((ROW_BLOCK, length), lambda i: (i, 0))
    shape = jax.ShapeDtypeStruct((batch, length), jnp.int32)
    return pl.pallas_call(
        kernel,
        out_shape=(shape, shape),
        grid=(batch // ROW_BLOCK,),
        in_specs=[spec, spec, spec, spec, pl.BlockSpec((ROW_BLOCK, 1), lambda i: (i, 0)), spec],
        out_specs=(spec, spec),
        compiler_params=compiler_params,
        interpret=interpret,
    )


@functools.partial(jax.jit, static_argnames=("mode", "interpret", "variant"))
def commit_pallas(x, tokens, conf, eligible, k, bounds, *, mode: str, interpret: bool = False,
                  variant: str | None = None):
    """x, tokens int32 [B, L], conf float32 [B, L], eligible int32 [B, L], k int32 [B, 1]
    (count mode's counts; the other modes' floor, 1 for plain threshold and factor),
    bounds float32 [B, L] (threshold and factor: the bound of each rank, the same in
    every row; unread in count mode), B a multiple of 8. Returns (new canvas, committed
    int32).

    variant None picks Mosaic on TPU and Triton on GPU when the call is lowered; "tpu"
    or "gpu" forces one (unmask.pallas.platform.by_platform)."""
    batch, length = x.shape
    kernel = functools.partial(_commit_kernel, mode=mode)

    def tpu(*args):
        return _call(kernel, batch, length, pltpu.CompilerParams(dimension_semantics=("parallel",)), interpret)(*args)

    def gpu(x, tokens, conf, eligible, k, bounds):
        padded = 1 << max(length - 1, 0).bit_length()

        def pad(a):
            return jnp.pad(a, ((0, 0), (0, padded - length)))

        # 4 warps: a program holds 8 rows of at most a few thousand positions.
        new_x, committed = _call(kernel, batch, padded, pltriton.CompilerParams(num_warps=4, num_stages=1),
                                 interpret)(pad(x), pad(tokens), pad(conf), pad(eligible), k, pad(bounds))
        return new_x[:, :length], committed[:, :length]

    return platform.by_platform((x, tokens, conf, eligible, k, bounds), tpu=tpu, gpu=gpu, interpret=interpret,
                                variant=variant)
