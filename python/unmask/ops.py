"""Public kernels: validation, then dispatch to a native kernel or the reference.

`unmask.ops.attention`, `.sample` and `.commit` check every argument (raising
ValueError or TypeError that names it) and call the torch.library custom ops
torch.ops.unmask.{attention, sample, commit}. The custom ops have fake
implementations, so torch.compile(fullgraph=True) traces through them.

Dispatch: the native kernel registered for the tensor's device type, else the
reference (unmask.reference). UNMASK_BACKEND=reference forces the reference.
This is the only module that turns tensors into pointers for unmask._C.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence

import torch

from unmask import reference, rng
from unmask.reference import CONFIDENCE_KINDS

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INT_DTYPES = (torch.int32, torch.int64)

try:
    from unmask import _C
except ImportError:  # a source tree that was never built: the reference still works
    _C = None

# (kernel name, device type) -> implementation with the reference's signature.
# Native kernels register themselves here; nothing registered means the reference.
NATIVE_KERNELS: dict[tuple[str, str], Callable] = {}


def backend_for(kernel: str, device: torch.device) -> str:
    """The backend a kernel would use on this device: "native" or "reference"."""
    forced = os.environ.get("UNMASK_BACKEND", "")
    if forced not in ("", "auto", "native", "reference"):
        raise ValueError(f"UNMASK_BACKEND must be 'reference', 'native' or unset, got {forced!r}")
    if forced == "reference" or (kernel, device.type) not in NATIVE_KERNELS:
        return "reference"
    return "native"


def _implementation(kernel: str, device: torch.device) -> Callable:
    if backend_for(kernel, device) == "native":
        return NATIVE_KERNELS[(kernel, device.type)]
    return getattr(reference, kernel)


# --------------------------------------------------------------------------- validation helpers


def _check_tensor(name: str, value, *, dtypes: Sequence[torch.dtype], ndim: int | None = None) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got {value.dtype}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(value.shape)}")


def _check_shape(name: str, value: torch.Tensor, expected: tuple[int, ...], what: str) -> None:
    if tuple(value.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)} ({what}), got {tuple(value.shape)}")


def _check_device(name: str, value: torch.Tensor, device: torch.device) -> None:
    if value.device != device:
        raise ValueError(f"{name} must be on {device} like the other inputs, got {value.device}")


def _check_int(name: str, value, *, low: int | None = None, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    if high is not None and value >= high:
        raise ValueError(f"{name} must be < {high}, got {value}")


def _check_float(name: str, value, *, positive: bool = False, nonnegative: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    if nonnegative and value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")


def _seed_to_int64(seed: int) -> int:
    """Custom-op schemas carry int64: a seed in [2^63, 2^64) travels as its two's complement."""
    return seed - 2**64 if seed >= 2**63 else seed


def _seed_from_int64(seed: int) -> int:
    return seed + 2**64 if seed < 0 else seed


# --------------------------------------------------------------------------- attention


@torch.library.custom_op("unmask::attention", mutates_args=())
def _attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_len: torch.Tensor | None,
    key_valid: torch.Tensor | None,
    block_size: int,
    q_offset: int,
    scale: float,
) -> torch.Tensor:
    impl = _implementation("attention", q.device)
    out = impl(
        q, k, v, kv_len=kv_len, key_valid=key_valid,
        block_size=block_size or None, q_offset=q_offset, scale=scale,
    )
    return out.contiguous()  # the fake below promises contiguous strides, whatever q's are


@_attention_op.register_fake
def _(q, k, v, kv_len, key_valid, block_size, q_offset, scale):
    return q.new_empty(q.shape)


def _attention_setup_context(ctx, inputs, output):
    q, k, v, kv_len, key_valid, block_size, q_offset, scale = inputs
    ctx.save_for_backward(q, k, v)
    ctx.masks = dict(kv_len=kv_len, key_valid=key_valid, block_size=block_size or None, q_offset=q_offset, scale=scale)


def _attention_backward(ctx, grad_out):
    """Gradients through the reference (recomputing the forward): the kernels are for
    inference, and training small models (unmask train) only needs correct gradients."""
    q, k, v = ctx.saved_tensors
    with torch.enable_grad():
        inputs = [t.detach().requires_grad_() for t in (q, k, v)]
        out = reference.attention(*inputs, **ctx.masks)
        grads = torch.autograd.grad(out, inputs, grad_out)
    return (*grads, None, None, None, None, None)


_attention_op.register_autograd(_attention_backward, setup_context=_attention_setup_context)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    kv_len: torch.Tensor | None = None,
    key_valid: torch.Tensor | None = None,
    block_size: int | None = None,
    q_offset: int = 0,
    scale: float | None = None,
) -> torch.Tensor:
    """Fused masked bidirectional attention (DESIGN.md, attention).

    q [B, Lq, Hq, D], k and v [B, Lk, Hkv, D] with Hq a multiple of Hkv; fp32, fp16
    or bf16. kv_len [B] hides keys j >= kv_len[b]; key_valid [B, Lk] hides keys
    marked False; block_size b lets query p = q_offset + i see key j only when
    j // b <= p // b. A query that sees no key returns zeros.
    """
    _check_tensor("q", q, dtypes=FLOAT_DTYPES, ndim=4)
    _check_tensor("k", k, dtypes=FLOAT_DTYPES, ndim=4)
    _check_tensor("v", v, dtypes=FLOAT_DTYPES, ndim=4)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share a dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    _check_device("k", k, q.device)
    _check_device("v", v, q.device)
    batch, _, q_heads, head_dim = q.shape
    k_len, kv_heads = k.shape[1], k.shape[2]
    _check_shape("k", k, (batch, k_len, kv_heads, head_dim), "[B, Lk, Hkv, D] with q's B and D")
    _check_shape("v", v, tuple(k.shape), "the shape of k")
    if kv_heads == 0 or q_heads % kv_heads != 0:
        raise ValueError(f"q heads ({q_heads}) must be a multiple of k/v heads ({kv_heads})")
    if head_dim == 0:
        raise ValueError("q, k, v must have a head dimension D > 0, got D = 0")
    if kv_len is not None:
        _check_tensor("kv_len", kv_len, dtypes=INT_DTYPES, ndim=1)
        _check_shape("kv_len", kv_len, (batch,), "[B]")
        _check_device("kv_len", kv_len, q.device)
    if key_valid is not None:
        _check_tensor("key_valid", key_valid, dtypes=(torch.bool,), ndim=2)
        _check_shape("key_valid", key_valid, (batch, k_len), "[B, Lk]")
        _check_device("key_valid", key_valid, q.device)
    if block_size is not None:
        _check_int("block_size", block_size, low=1)
    _check_int("q_offset", q_offset, low=0)
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    _check_float("scale", scale)
    return _attention_op(q, k, v, kv_len, key_valid, block_size or 0, q_offset, float(scale))


# --------------------------------------------------------------------------- sample


class InvalidLogitsError(ValueError):
    """A sampled row had no finite kept logit, or a NaN or +inf one."""


@torch.library.custom_op("unmask::sample", mutates_args=())
def _sample_op(
    logits: torch.Tensor,
    temperature: float,
    top_k: int,
    top_p: float,
    banned: torch.Tensor | None,
    confidence: str,
    conf_temperature: float,
    seed: int,
    offset: int,
    rows: torch.Tensor | None,
    check: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    impl = _implementation("sample", logits.device)
    tokens, conf = impl(
        logits, temperature=temperature, top_k=top_k, top_p=top_p, banned=banned,
        confidence=confidence, conf_temperature=conf_temperature,
        seed=_seed_from_int64(seed), offset=offset, rows=rows,
    )
    if check:
        raise_on_invalid_rows(tokens, rows)
    return tokens, conf


def raise_on_invalid_rows(tokens: torch.Tensor, rows: torch.Tensor | None) -> None:
    """InvalidLogitsError if a sampled row came back as token -1 (synchronises with the device)."""
    flat = tokens.reshape(-1)
    sampled = flat if rows is None else flat[rows]
    bad = torch.nonzero(sampled < 0).flatten()
    if bad.numel() > 0:
        row_ids = bad if rows is None else rows[bad]
        raise InvalidLogitsError(
            f"logits: {bad.numel()} row(s) have NaN or +inf logits or no finite kept logit "
            f"(flattened row ids {row_ids[:8].tolist()}); pass check=False to get token -1 instead"
        )


@_sample_op.register_fake
def _(logits, temperature, top_k, top_p, banned, confidence, conf_temperature, seed, offset, rows, check):
    lead = logits.shape[:-1]
    return (
        logits.new_empty(lead, dtype=torch.int64),
        logits.new_empty(lead, dtype=torch.float32),
    )


def _banned_tensor(banned, vocab: int, device: torch.device) -> torch.Tensor | None:
    if banned is None:
        return None
    if isinstance(banned, int) and not isinstance(banned, bool):
        banned = [banned]
    if isinstance(banned, (list, tuple)):
        for token in banned:
            _check_int("banned", token, low=0, high=vocab)
        banned = torch.tensor(banned, dtype=torch.int64, device=device)
    else:
        _check_tensor("banned", banned, dtypes=INT_DTYPES)
        _check_device("banned", banned, device)
        banned = banned.reshape(-1).to(torch.int64)
        if banned.device.type == "cpu" and banned.numel() > 0:
            low, high = int(banned.min()), int(banned.max())
            if low < 0 or high >= vocab:
                raise ValueError(f"banned ids must lie in [0, {vocab}) (the vocabulary), got range [{low}, {high}]")
    if banned.numel() >= vocab and torch.unique(banned).numel() >= vocab:
        raise ValueError(f"banned bans every one of the V={vocab} token ids: no token could be sampled")
    return banned


def sample(
    logits: torch.Tensor,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    banned: int | Sequence[int] | torch.Tensor | None = None,
    confidence: str = "prob",
    conf_temperature: float = 1.0,
    seed: int = 0,
    offset: int = 0,
    rows: torch.Tensor | None = None,
    check: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Parallel token sampling with confidence (DESIGN.md, sample).

    logits [..., V] in fp32, fp16 or bf16 (fp32 math). Returns tokens (int64) and
    conf (float32) of shape logits.shape[:-1]. rows, an int index into the flattened
    leading dimensions, restricts the work to those rows; the others get token -1 and
    conf -inf. With check=True (the default) a sampled row with NaN or +inf logits or
    no finite kept logit raises InvalidLogitsError (a ValueError); check=False returns
    token -1 and conf -inf for it and never synchronises with the device.
    """
    _check_tensor("logits", logits, dtypes=FLOAT_DTYPES)
    if logits.dim() < 2:
        raise ValueError(f"logits must be [N, V] or [B, L, V], got shape {tuple(logits.shape)}")
    vocab = logits.shape[-1]
    if vocab < 1:
        raise ValueError(f"logits must have a vocabulary dimension V >= 1, got shape {tuple(logits.shape)}")
    _check_float("temperature", temperature, nonnegative=True)
    _check_int("top_k", top_k, low=0)
    _check_float("top_p", top_p, positive=True)
    if top_p > 1:
        raise ValueError(f"top_p must lie in (0, 1], got {top_p}")
    if confidence not in CONFIDENCE_KINDS:
        raise ValueError(f"confidence must be one of {CONFIDENCE_KINDS}, got {confidence!r}")
    _check_float("conf_temperature", conf_temperature, positive=True)
    if conf_temperature < 1e-30:  # the kernels scale by 1 / conf_temperature in float32
        raise ValueError(f"conf_temperature must be >= 1e-30, got {conf_temperature}")
    rng.check_seed(seed)
    _check_int("offset", offset, low=0, high=2**32)
    banned = _banned_tensor(banned, vocab, logits.device)
    n_rows = logits.numel() // vocab
    if rows is not None:
        _check_tensor("rows", rows, dtypes=INT_DTYPES, ndim=1)
        _check_device("rows", rows, logits.device)
        rows = rows.to(torch.int64)
        if check and rows.numel() > 0:
            low, high = int(rows.min()), int(rows.max())
            if low < 0 or high >= n_rows:
                raise ValueError(f"rows must index the {n_rows} rows of logits, got range [{low}, {high}]")
    return _sample_op(
        logits, float(temperature), top_k, float(top_p), banned, confidence,
        float(conf_temperature), _seed_to_int64(seed), offset, rows, check,
    )


# --------------------------------------------------------------------------- commit


@torch.library.custom_op("unmask::commit", mutates_args=("x",))
def _commit_op(
    x: torch.Tensor,
    tokens: torch.Tensor,
    conf: torch.Tensor,
    eligible: torch.Tensor,
    k: torch.Tensor | None,
    threshold: float | None,
    factor: float | None,
) -> torch.Tensor:
    impl = _implementation("commit", x.device)
    return impl(x, tokens, conf, eligible, k=k, threshold=threshold, factor=factor)


@_commit_op.register_fake
def _(x, tokens, conf, eligible, k, threshold, factor):
    return torch.empty_like(eligible)


def commit(
    x: torch.Tensor,
    tokens: torch.Tensor,
    conf: torch.Tensor,
    eligible: torch.Tensor,
    *,
    k: int | torch.Tensor | None = None,
    threshold: float | None = None,
    factor: float | None = None,
) -> torch.Tensor:
    """Confidence-based unmasking (DESIGN.md, commit), in place on the canvas x [B, L].

    Exactly one mode: k (int or int tensor [B]) commits the k most confident eligible
    positions per row; threshold commits those with conf > threshold (at least one);
    factor commits the largest n with (n + 1) * (1 - c_n) < factor (at least one).
    Returns committed [B, L] bool.
    """
    _check_tensor("x", x, dtypes=INT_DTYPES, ndim=2)
    _check_tensor("tokens", tokens, dtypes=INT_DTYPES)
    _check_tensor("conf", conf, dtypes=FLOAT_DTYPES + (torch.float64,))
    _check_tensor("eligible", eligible, dtypes=(torch.bool,))
    for name, value in (("tokens", tokens), ("conf", conf), ("eligible", eligible)):
        _check_shape(name, value, tuple(x.shape), "the shape of x, [B, L]")
        _check_device(name, value, x.device)
    modes = [name for name, value in (("k", k), ("threshold", threshold), ("factor", factor)) if value is not None]
    if len(modes) != 1:
        raise ValueError(f"commit takes exactly one of k, threshold, factor; got {modes or 'none'}")
    if k is not None:
        if isinstance(k, torch.Tensor):
            _check_tensor("k", k, dtypes=INT_DTYPES, ndim=1)
            _check_shape("k", k, (x.shape[0],), "[B]")
            _check_device("k", k, x.device)
        else:
            _check_int("k", k, low=0)
            k = torch.full((x.shape[0],), k, dtype=torch.int64, device=x.device)
    if threshold is not None:
        _check_float("threshold", threshold)
        threshold = float(threshold)
    if factor is not None:
        _check_float("factor", factor, positive=True)
        factor = float(factor)
    return _commit_op(x, tokens, conf, eligible, k, threshold, factor)


# --------------------------------------------------------------------------- raw RNG draws


def philox_draws(
    seed: int,
    rows: int,
    cols: int,
    *,
    row_begin: int = 0,
    offset: int = 0,
    stream: int = rng.GUMBEL_STREAM,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """The native kernels' 32-bit draws w[r, c] (row id row_begin + r) as int64 [rows, cols]."""
    rng.check_seed(seed)
    for name, value, high in (("rows", rows, None), ("cols", cols, None), ("row_begin", row_begin, 2**32),
                              ("offset", offset, 2**32), ("stream", stream, 2**32)):
        _check_int(name, value, low=0, high=high)
    if _C is None:
        raise RuntimeError("unmask._C is not built: install the package (pip install .)")
    device = torch.device(device)
    out = torch.empty(rows, cols, dtype=torch.int32, device=device)
    if device.type == "cuda":
        cuda_stream = torch.cuda.current_stream(device).cuda_stream
        _C.fill_draws_cuda(out.data_ptr(), rows, cols, row_begin, seed, offset, stream, cuda_stream)
    elif device.type == "cpu":
        _C.fill_draws_cpu(out.data_ptr(), rows, cols, row_begin, seed, offset, stream)
    else:
        raise NotImplementedError(f"philox_draws supports cpu and cuda devices, got {device}")
    return out.to(torch.int64) & 0xFFFFFFFF


def philox_blocks(counters: torch.Tensor, key0: int, key1: int) -> torch.Tensor:
    """The C++ header's plain philox4x32_10 over counters [n, 4] (int64 words) -> [n, 4] words."""
    _check_tensor("counters", counters, dtypes=(torch.int64,), ndim=2)
    if counters.shape[1] != 4:
        raise ValueError(f"counters must be [n, 4], got shape {tuple(counters.shape)}")
    _check_int("key0", key0, low=0, high=2**32)
    _check_int("key1", key1, low=0, high=2**32)
    if _C is None:
        raise RuntimeError("unmask._C is not built: install the package (pip install .)")
    words = (counters.cpu() & 0xFFFFFFFF).to(torch.int32).contiguous()  # keeps the low 32 bits
    out = torch.empty_like(words)
    _C.philox_blocks_cpu(words.data_ptr(), out.data_ptr(), words.shape[0], key0, key1)
    return out.to(torch.int64) & 0xFFFFFFFF


def _register_native_kernels() -> None:
    from unmask import native

    native.register()


_register_native_kernels()
