"""commit as a Pallas kernel: confidence-based unmasking of 8 canvas rows per program.

TPU kernels have no general sort, so each position's rank among the eligible ones
(higher confidence first, ties to the lower position) is counted directly: one pass
per position over its row, O(L^2) comparisons per row, which for the blocks of 32 to
1024 positions a sampler commits in is cheaper than a launch of anything else. The
modes then reduce to counts: commit the positions whose rank is below n.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

ROW_BLOCK = 8


def _commit_kernel(x_ref, tokens_ref, conf_ref, eligible_ref, k_ref, out_ref, committed_ref, *, mode: str,
                   threshold: float, factor: float):
    conf = conf_ref[...].astype(jnp.float32)
    conf = jnp.where(jnp.isnan(conf), -jnp.inf, conf)  # a NaN confidence ranks as -inf
    eligible = eligible_ref[...] != 0
    length = conf.shape[1]
    position = jax.lax.broadcasted_iota(jnp.int32, conf.shape, 1)

    def count_better(i, rank):
        other = jax.lax.dynamic_slice_in_dim(conf, i, 1, axis=1)
        other_eligible = jax.lax.dynamic_slice_in_dim(eligible, i, 1, axis=1)
        better = (other > conf) | ((other == conf) & (i < position))
        return rank + (other_eligible & better).astype(jnp.int32)

    rank = jax.lax.fori_loop(0, length, count_better, jnp.zeros(conf.shape, jnp.int32))
    n_eligible = jnp.sum(eligible.astype(jnp.int32), axis=1, keepdims=True)
    at_least_one = (n_eligible > 0).astype(jnp.int32)
    if mode == "count":
        n = jnp.minimum(k_ref[...], n_eligible)
    elif mode == "threshold":
        n = jnp.maximum(jnp.sum((eligible & (conf > threshold)).astype(jnp.int32), axis=1, keepdims=True),
                        at_least_one)
    else:  # factor: the eligible position of rank r is c_{r+1}; the passing ranks form a prefix
        passes = eligible & ((rank + 2).astype(jnp.float32) * (1.0 - conf) < factor)
        n = jnp.maximum(jnp.sum(passes.astype(jnp.int32), axis=1, keepdims=True), at_least_one)
    committed = eligible & (rank < n)
    committed_ref[...] = committed.astype(jnp.int32)
    out_ref[...] = jnp.where(committed, tokens_ref[...], x_ref[...])


@functools.partial(jax.jit, static_argnames=("mode", "threshold", "factor", "interpret"))
def commit_pallas(x, tokens, conf, eligible, k, *, mode: str, threshold: float = 0.0, factor: float = 0.0,
                  interpret: bool = False):
    """x, tokens int32 [B, L], conf float32 [B, L], eligible int32 [B, L], k int32 [B, 1],
    B a multiple of 8. Returns (new canvas, committed int32)."""
    batch, length = x.shape
    spec = pl.BlockSpec((ROW_BLOCK, length), lambda i: (i, 0))
    kernel = functools.partial(_commit_kernel, mode=mode, threshold=threshold, factor=factor)
    return pl.pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct(x.shape, jnp.int32)),
        grid=(batch // ROW_BLOCK,),
        in_specs=[spec, spec, spec, spec, pl.BlockSpec((ROW_BLOCK, 1), lambda i: (i, 0))],
        out_specs=(spec, spec),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
        interpret=interpret,
    )(x, tokens, conf, eligible, k)
