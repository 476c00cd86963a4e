"""unmask.jax.attention / sample / commit: the Pallas kernels behind validated, jit-able
functions with the contracts of docs/design.md. interpret=None runs the kernels in Pallas's
interpreter on CPU (no accelerator needed) and compiled elsewhere."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from unmask import validation
from unmask.jax import commit_bounds
from unmask.pallas import attention as attention_kernel
from unmask.pallas import commit as commit_kernel
from unmask.pallas import sample as sample_kernel

_INT32_MAX = jnp.iinfo(jnp.int32).max
ARRAY_TYPES = (jax.Array, np.ndarray)


def check_array(name, value, *, dtypes=None, ndim=None) -> None:
    """unmask.validation.check_array for JAX (and numpy) arrays."""
    validation.check_array(name, value, array_types=ARRAY_TYPES, kind="a JAX or numpy array", dtypes=dtypes,
                           ndim=ndim)


def _banned_ids(banned, vocab: int) -> list[int] | None:
    if isinstance(banned, ARRAY_TYPES):  # concrete ids: checked as a list
        check_array("banned", banned, dtypes=validation.INT_DTYPES)
        banned = [int(i) for i in np.asarray(banned).reshape(-1)]
    return validation.banned_ids(banned, vocab)


def default_interpret(interpret: bool | None) -> bool:
    return jax.default_backend() == "cpu" if interpret is None else interpret


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _int32_bits(value: int) -> int:
    """A uint32 value as the int32 with the same bits (scalar prefetch operands are int32)."""
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >= (1 << 31) else value


def kept_prefix(x: jnp.ndarray, top_k: int, top_p: float,
                temperature: float = 1.0) -> tuple[jnp.ndarray, jnp.ndarray]:
    """The kept ids of each row as a prefix of the order (value desc, id asc): the value of
    the last kept id and that id. x: float32 [N, V], -inf where banned. top_p's nucleus is
    measured under softmax(x / temperature), as reference.keep_top_p measures it."""
    n_rows, vocab = x.shape
    if (top_k <= 0 or top_k >= vocab) and top_p >= 1.0:
        return jnp.full((n_rows,), -jnp.inf, jnp.float32), jnp.full((n_rows,), _INT32_MAX, jnp.int32)
    order = jnp.argsort(-x, axis=-1, stable=True)  # stable: equal values stay in id order
    ordered = jnp.take_along_axis(x, order, axis=-1)
    last = jnp.full((n_rows,), vocab - 1, jnp.int32)
    if 0 < top_k < vocab:
        last = jnp.minimum(last, top_k - 1)
    if top_p < 1.0:
        in_top_k = jnp.arange(vocab)[None, :] <= last[:, None]
        # Shifted by the row's maximum before the division: x / T overflows float32 for a
        # small T where (x - max) / T only underflows to -inf.
        scaled = (ordered - ordered[:, :1]) / temperature
        probs = jax.nn.softmax(jnp.where(in_top_k, scaled, -jnp.inf), axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        last = jnp.minimum(last, jnp.maximum(jnp.sum(mass_before < top_p, axis=-1) - 1, 0).astype(jnp.int32))
    rows = jnp.arange(n_rows)
    return ordered[rows, last], order[rows, last].astype(jnp.int32)


def seed_words(seed) -> jnp.ndarray:
    """A sample seed as int32 [2] (the low and high 32 bits), the form the kernel reads.
    seed: an int in [0, 2^64), or such a pair already (uint32 or int32 [2], possibly
    traced: one compilation then serves every seed)."""
    if isinstance(seed, ARRAY_TYPES):
        check_array("seed", seed, dtypes=("uint32", "int32"), ndim=1)
        validation.check_shape("seed", seed.shape, (2,), "the low and high 32-bit words")
        return jax.lax.bitcast_convert_type(jnp.asarray(seed), jnp.int32) if seed.dtype == jnp.uint32 else seed
    validation.check_seed(seed)
    return jnp.asarray([_int32_bits(seed), _int32_bits(seed >> 32)], jnp.int32)


def sample(logits, *, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, banned=None,
           confidence: str = "prob", conf_temperature: float = 1.0, seed: int = 0, offset=0, rows=None,
           interpret: bool | None = None, tile_v: int = 2048, row_base=0):
    """One token (int32) and its confidence (float32) per row of logits [..., V].

    Rows with NaN or +inf kept logits, or no finite kept logit, get -1 and -inf (this
    function does not raise on them: under jit it cannot look at the values). offset may
    be a traced integer, or one per row of logits (an integer array of logits.shape[:-1],
    as the torch op takes it: each row's own RNG step), and seed a traced pair of words
    (seed_words); everything else that shapes the kernel is static. row_base
    (traced too) is added to each row's RNG row id: a device sampling rows
    row_base.. of a batch split across devices draws that batch's noise.
    """
    check_array("logits", logits, dtypes=validation.FLOAT_DTYPES)
    vocab = validation.check_logits_shape(logits.shape)
    words = seed_words(seed)
    per_row = check_offset(offset, logits.shape[:-1])
    validation.sample_options(temperature=temperature, top_k=top_k, top_p=top_p, confidence=confidence,
                              conf_temperature=conf_temperature, seed=0, offset=0 if per_row else offset)
    banned = _banned_ids(banned, vocab)
    if rows is not None:
        check_array("rows", rows, dtypes=validation.INT_DTYPES, ndim=1)
        if isinstance(rows, np.ndarray):
            validation.check_index_range("rows", rows, logits.size // vocab,
                                         "the flattened rows of logits")
    validation.check_int("tile_v", tile_v, low=1)
    sample_kernel.check_tile_v(tile_v)  # before it rounds the vocabulary (sample_pallas checks only what is left)
    _check_row_base(row_base, logits.size // vocab)
    lead, vocab = logits.shape[:-1], logits.shape[-1]
    flat = logits.reshape(-1, vocab)
    n_rows = flat.shape[0]
    tile_v = min(tile_v, _round_up(vocab, 128))
    padded_rows, padded_vocab = _round_up(max(n_rows, 1), sample_kernel.ROW_BLOCK), _round_up(vocab, tile_v)

    banned_mask = jnp.zeros((1, padded_vocab), jnp.int32).at[0, vocab:].set(1)
    if banned is not None:
        banned_mask = banned_mask.at[0, jnp.asarray(banned, jnp.int32)].set(1)
    x = flat.astype(jnp.float32)
    x = jnp.where(banned_mask[:, :vocab] != 0, -jnp.inf, x)
    kept_value, kept_last = kept_prefix(jnp.where(jnp.isnan(x), -jnp.inf, x), top_k, top_p,
                                        temperature if temperature > 0 else 1.0)

    pad = ((0, padded_rows - n_rows), (0, padded_vocab - vocab))
    # One offset per row rides in a column beside the kept prefix; a single offset in the
    # scalars (the kernel adds the two).
    row_offsets = jnp.asarray(offset).reshape(-1) if per_row else jnp.zeros((n_rows,), jnp.uint32)
    row_offsets = jax.lax.bitcast_convert_type(row_offsets.astype(jnp.uint32), jnp.int32)
    scalar_offset = jnp.asarray(0 if per_row else offset, jnp.uint32)
    scalars = jnp.concatenate([words, jnp.stack([
        jax.lax.bitcast_convert_type(scalar_offset, jnp.int32), jnp.asarray(row_base, jnp.int32)])])
    tokens, conf = sample_kernel.sample_pallas(
        jnp.pad(flat, pad, constant_values=-jnp.inf), banned_mask,
        jnp.pad(kept_value, (0, padded_rows - n_rows))[:, None],
        jnp.pad(kept_last, (0, padded_rows - n_rows))[:, None],
        jnp.pad(row_offsets, (0, padded_rows - n_rows))[:, None], scalars,
        temperature=float(temperature), confidence=confidence, conf_temperature=float(conf_temperature),
        tile_v=tile_v, interpret=default_interpret(interpret),
    )
    return only_rows(tokens[:n_rows, 0].reshape(lead), conf[:n_rows, 0].reshape(lead), rows)


def _check_row_base(row_base, rows: int) -> None:
    """row_base, where it is an int: the kernel adds the flattened row index to it in
    int32, so base + rows must stay below 2^31 (a traced value is not read)."""
    if isinstance(row_base, ARRAY_TYPES) and not isinstance(row_base, np.ndarray):
        return
    row_base = int(row_base) if isinstance(row_base, np.ndarray) and row_base.ndim == 0 else row_base
    validation.check_int("row_base", row_base, low=0, high=2**31 - rows)


def check_offset(offset, rows_shape) -> bool:
    """sample()'s offset: an int in [0, 2^32), as the torch op takes it (a float or a numpy
    integer scalar is refused there too), a 0-d integer array (a traced loop's step
    counter; its value, on the device, is not read: it is taken modulo 2^32), or one per
    row of logits (an integer array of shape logits.shape[:-1]). Returns whether it is
    one per row."""
    if not isinstance(offset, ARRAY_TYPES):
        validation.check_int("offset", offset, low=0, high=validation.OFFSET_LIMIT)
        return False
    check_array("offset", offset, dtypes=validation.INT_DTYPES + ("uint32",))
    if offset.ndim != 0:
        validation.check_shape("offset", offset.shape, tuple(rows_shape), "one step offset per row of logits, or 0-d")
    if isinstance(offset, np.ndarray):
        validation.check_index_range("offset", offset, validation.OFFSET_LIMIT, "32-bit step offsets")
    return offset.ndim != 0


def only_rows(tokens, conf, rows):
    """Token -1 and conf -inf outside rows (indices into the flattened leading dims), as the
    torch op returns them; every row is computed (TPU grids cover whole tiles). Ids outside
    [0, N) select nothing, as the CUDA kernel skips them (concrete ids were refused above):
    JAX indexing would read a negative id from the end and sample another row."""
    if rows is None:
        return tokens, conf
    rows = jnp.asarray(rows)
    inside = jnp.where((rows >= 0) & (rows < tokens.size), rows, tokens.size)
    selected = jnp.zeros((tokens.size,), bool).at[inside].set(True, mode="drop").reshape(tokens.shape)
    return jnp.where(selected, tokens, -1), jnp.where(selected, conf, -jnp.inf)


def attention(q, k, v, *, kv_len=None, key_valid=None, block_size: int | None = None, q_offset=0,
              scale: float | None = None, interpret: bool | None = None):
    """Masked bidirectional attention: q [B, Lq, Hq, D], k and v [B, Lk, Hkv, D] -> [B, Lq, Hq, D].

    q_offset: an int, or a 0-d integer array that may be traced (one compiled call serves
    every offset: a cached step's window of queries at its place in the canvas). A traced
    offset's value is not checked: it must be >= 0 with q_offset + Lq below 2^31."""
    for name, value in (("q", q), ("k", k), ("v", v)):
        check_array(name, value, dtypes=validation.FLOAT_DTYPES, ndim=4)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share a dtype, got q {validation.dtype_name(q)}, "
                        f"k {validation.dtype_name(k)}, v {validation.dtype_name(v)}")
    shape = validation.attention_shape(q.shape, k.shape, v.shape)
    batch, q_len, k_len = shape.batch, shape.q_len, shape.k_len
    if kv_len is not None:
        check_array("kv_len", kv_len, dtypes=validation.INT_DTYPES, ndim=1)
        validation.check_shape("kv_len", kv_len.shape, (batch,), "[B]")
        if isinstance(kv_len, np.ndarray):  # values on the host: checked as the torch op checks them
            validation.check_index_range("kv_len", kv_len, k_len + 1, "key counts, at most Lk")
    if key_valid is not None:
        check_array("key_valid", key_valid, dtypes=("bool",), ndim=2)
        validation.check_shape("key_valid", key_valid.shape, (batch, k_len), "[B, Lk]")
    if isinstance(q_offset, (jax.Array, np.ndarray)):  # its type checked always, its value where readable
        check_array("q_offset", q_offset, dtypes=validation.INT_DTYPES, ndim=0)
        if not isinstance(q_offset, jax.core.Tracer):
            q_offset = int(q_offset)
    traced = isinstance(q_offset, jax.core.Tracer)
    block_size, checked, scale = validation.attention_scalars(shape, block_size=block_size,
                                                              q_offset=0 if traced else q_offset, scale=scale)
    if not traced:
        q_offset = checked
        if q_offset + q_len >= 2**31:  # query positions are int32 in the kernel
            raise ValueError(f"q_offset={q_offset} plus the {q_len} queries must stay below 2^31")
    if batch == 0 or q_len == 0:  # nothing to compute
        return jnp.zeros(q.shape, q.dtype)
    # Powers of two from 16 to 128 are valid tiles for both variants (unmask.pallas.attention).
    tile_q = min(128, 1 << (max(q_len, 16) - 1).bit_length())
    tile_k = 128
    padded_q, padded_k = _round_up(max(q_len, 1), tile_q), _round_up(max(k_len, 1), tile_k)
    valid = jnp.ones((batch, k_len), bool) if key_valid is None else jnp.asarray(key_valid, bool)
    if kv_len is not None:
        valid &= jnp.arange(k_len)[None, :] < jnp.asarray(kv_len)[:, None]
    valid = jnp.pad(valid, ((0, 0), (0, padded_k - k_len))).astype(jnp.int32)[:, None, :]

    def heads_first(x, length):
        return jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, 0))).transpose(0, 2, 1, 3)

    ends = None if block_size is None else attention_kernel.block_ends(q_offset, q_len, padded_q, block_size)
    out = attention_kernel.attention_pallas(
        heads_first(q, padded_q), heads_first(k, padded_k), heads_first(v, padded_k), valid, ends,
        scale=scale, tile_q=tile_q, tile_k=tile_k, interpret=default_interpret(interpret),
    )
    return out.transpose(0, 2, 1, 3)[:, :q_len]


def rank_bounds(mode: str, threshold: float | None, factor: float | None, length: int) -> np.ndarray:
    """float32 [length]: an eligible position of rank r passes the threshold or factor rule
    where its float32 confidence exceeds entry r, exactly where the float64 rule of the
    torch kernels passes it (unmask.jax.commit_bounds). Zeros in count mode (unread)."""
    if mode == "threshold":
        return np.full((length,), commit_bounds.threshold_bound(float(threshold)), np.float32)
    if mode == "factor":
        return commit_bounds.factor_bounds(float(factor), length)
    return np.zeros((length,), np.float32)


def commit(x, tokens, conf, eligible, *, k=None, threshold: float | None = None, factor: float | None = None,
           interpret: bool | None = None):
    """Confidence-based unmasking of canvas x [B, L]; returns (new canvas, committed bool).
    JAX arrays are immutable: the new canvas is returned instead of written in place."""
    mode = validation.commit_mode(k, threshold, factor)
    for name, value in (("x", x), ("tokens", tokens)):
        check_array(name, value, dtypes=validation.INT_DTYPES)
    # not float64: the kernel decides in float32, where its rank bounds are exact (a float64
    # confidence would be rounded first and could commit where the torch op does not)
    check_array("conf", conf, dtypes=validation.FLOAT_DTYPES)
    check_array("eligible", eligible, dtypes=("bool",))
    if x.ndim != 2:
        raise ValueError(f"x must have 2 dimensions, got shape {tuple(x.shape)}")
    for name, value in (("tokens", tokens), ("conf", conf), ("eligible", eligible)):
        validation.check_shape(name, value.shape, tuple(x.shape), "the shape of x, [B, L]")
    if isinstance(k, int):
        validation.check_counts(k, None)
    elif k is not None:
        check_array("k", k, dtypes=validation.INT_DTYPES, ndim=1)
        validation.check_shape("k", k.shape, (x.shape[0],), "[B]")
        if isinstance(k, np.ndarray):  # counts on the host: checked as the torch op checks them
            validation.check_counts(k, k)
    batch, length = x.shape
    if batch == 0 or length == 0:  # no position: nothing commits
        return jnp.asarray(x), jnp.zeros(x.shape, bool)
    padded = _round_up(max(batch, 1), commit_kernel.ROW_BLOCK)
    # count mode's counts, or the other modes' floor (at least min(k, eligible) commit;
    # one unless threshold mode is given k)
    counts = jnp.broadcast_to(jnp.asarray(1 if k is None else k, jnp.int32), (batch,))

    def pad(a, dtype):
        return jnp.pad(jnp.asarray(a).astype(dtype), ((0, padded - batch), (0, 0)))

    new_x, committed = commit_kernel.commit_pallas(
        pad(x, jnp.int32), pad(tokens, jnp.int32), pad(conf, jnp.float32), pad(eligible, jnp.int32),
        pad(counts[:, None], jnp.int32), jnp.broadcast_to(jnp.asarray(rank_bounds(mode, threshold, factor, length)),
                                                          (padded, length)),
        mode=mode, interpret=default_interpret(interpret),
    )
    return new_x[:batch].astype(x.dtype), committed[:batch] != 0
