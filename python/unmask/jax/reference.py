"""Plain jnp references of the three kernels (the contracts of docs/design.md), for testing the
Pallas kernels without torch. Readable before fast: full-row sorts and dense masks."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from unmask.jax import kernels
from unmask.jax.kernels import kept_prefix
from unmask.pallas import philox


def attention(q, k, v, *, kv_len=None, key_valid=None, block_size=None, q_offset=0, scale=None):
    batch, q_len, q_heads, head_dim = q.shape
    k_len, kv_heads = k.shape[1], k.shape[2]
    scale = head_dim**-0.5 if scale is None else scale
    k = jnp.repeat(k.astype(jnp.float32), q_heads // kv_heads, axis=2)
    v = jnp.repeat(v.astype(jnp.float32), q_heads // kv_heads, axis=2)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k) * scale
    keys = jnp.arange(k_len)
    visible = jnp.ones((batch, q_len, k_len), bool)
    if kv_len is not None:
        visible &= (keys[None, :] < jnp.asarray(kv_len)[:, None])[:, None, :]
    if key_valid is not None:
        visible &= jnp.asarray(key_valid, bool)[:, None, :]
    if block_size is not None:
        queries = q_offset + jnp.arange(q_len)
        visible &= (keys[None, :] // block_size <= queries[:, None] // block_size)[None]
    scores = jnp.where(visible[:, None], scores, -jnp.inf)
    probs = jnp.where(visible[:, None].any(-1, keepdims=True), jax.nn.softmax(scores, axis=-1), 0.0)
    probs = jnp.nan_to_num(probs)
    return _weighted_values(probs, v, jnp.broadcast_to(visible[:, None], probs.shape)).astype(q.dtype)


def _weighted_values(probs, v, visible):
    """probs [B, H, Lq, Lk] times v [B, Lk, H, D], each query meeting only the keys it sees
    (unmask.reference._weighted_values: 0 times a hidden inf or NaN must not reach it)."""
    finite = jnp.isfinite(v)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, jnp.where(finite, v, 0.0))
    seen, weighted = visible.astype(v.dtype), (visible & (probs > 0)).astype(v.dtype)

    def count(rows, where):
        return jnp.einsum("bhqk,bkhd->bqhd", rows, where.astype(v.dtype))

    positive, negative = count(weighted, v == jnp.inf), count(weighted, v == -jnp.inf)
    nan = count(seen, ~finite) > positive + negative  # NaNs or 0 x inf among what is seen
    extra = jnp.where(nan | ((positive > 0) & (negative > 0)), jnp.nan,
                      jnp.where(positive > 0, jnp.inf, jnp.where(negative > 0, -jnp.inf, 0.0)))
    return out + extra


def sample(logits, *, temperature=0.0, top_k=0, top_p=1.0, banned=None, confidence="prob", conf_temperature=1.0,
           seed=0, offset=0):
    lead, vocab = logits.shape[:-1], logits.shape[-1]
    x = logits.reshape(-1, vocab).astype(jnp.float32)
    if banned is not None:
        x = x.at[:, jnp.asarray(banned)].set(-jnp.inf)
    bad = jnp.any(jnp.isnan(x) | (x == jnp.inf), axis=-1)
    x = jnp.where(jnp.isnan(x), -jnp.inf, x)
    kept_value, kept_last = kept_prefix(x, top_k, top_p, temperature if temperature > 0 else 1.0)
    ids = jnp.arange(vocab)[None, :]
    kept = (x > kept_value[:, None]) | ((x == kept_value[:, None]) & (ids <= kept_last[:, None]))
    x = jnp.where(kept, x, -jnp.inf)
    rows = jnp.arange(x.shape[0], dtype=jnp.uint32)[:, None]
    seed_lo, seed_hi = jnp.uint32(seed & 0xFFFFFFFF), jnp.uint32(seed >> 32)
    if temperature > 0:
        g = philox.gumbel_from_draws(philox.draws(seed_lo, seed_hi, rows, ids.astype(jnp.uint32), offset, 0))
        tokens = jnp.argmax(x / temperature + g, axis=-1)
    else:
        tokens = jnp.argmax(x, axis=-1)
    probs = jax.nn.softmax(x / conf_temperature, axis=-1)
    if confidence == "prob":
        conf = jnp.take_along_axis(probs, tokens[:, None], axis=-1)[:, 0]
    elif confidence == "margin":
        top2 = jax.lax.top_k(probs, min(2, vocab))[0]
        conf = top2[:, 0] - (top2[:, 1] if vocab > 1 else 0.0)
    elif confidence == "entropy":
        conf = jnp.sum(jnp.where(probs > 0, probs * jnp.log(jnp.where(probs > 0, probs, 1.0)), 0.0), axis=-1)
    else:
        conf = philox.uniform_from_draws(philox.draws(seed_lo, seed_hi, rows[:, 0], jnp.zeros_like(rows[:, 0]), offset, 1))
    invalid = bad | ~jnp.any(jnp.isfinite(x), axis=-1)
    tokens = jnp.where(invalid, -1, tokens).astype(jnp.int32)
    conf = jnp.where(invalid, -jnp.inf, conf).astype(jnp.float32)
    return tokens.reshape(lead), conf.reshape(lead)


def commit(x, tokens, conf, eligible, *, k=None, threshold=None, factor=None):
    conf = jnp.where(jnp.isnan(conf), -jnp.inf, conf.astype(jnp.float32))
    length = x.shape[1]
    # Sort key: eligible first, then conf descending, then position ascending (a stable sort).
    order = jnp.lexsort((jnp.arange(length)[None, :].repeat(x.shape[0], 0), -conf, ~eligible), axis=-1)
    rank = jnp.argsort(order, axis=-1)
    n_eligible = jnp.sum(eligible, axis=-1)
    # count mode commits min(k, eligible); the others at least that many (k = 1 unless
    # threshold mode is given one) and whatever else passes
    floor = jnp.minimum(jnp.maximum(jnp.asarray(1 if k is None else k), 0), n_eligible)
    if threshold is None and factor is None:
        n = floor
    else:  # float32 bounds per rank that decide as float64 arithmetic does (commit_bounds)
        mode = "threshold" if threshold is not None else "factor"
        bounds = jnp.asarray(kernels.rank_bounds(mode, threshold, factor, length))
        passes = eligible & (conf > bounds[rank])
        n = jnp.maximum(jnp.sum(passes, axis=-1), floor)
    committed = eligible & (rank < n[:, None])
    return jnp.where(committed, tokens, x), committed
