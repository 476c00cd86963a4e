"""Every rule on the arguments of unmask's public functions, in one module.

The front ends (unmask.ops for torch tensors, unmask.jax, the tensor-parallel sampler of
unmask.distributed, unmask.generate / unmask.infill) call these functions before they do
anything else, so the same bad argument gives the same error from each of them: a
ValueError or TypeError that names the argument, what was expected and what came.

Values that live on an accelerator are checked only where that costs no host
synchronisation (a CPU tensor, a Python list); the kernels are safe on any value the
checks cannot see (docs/design.md, Errors). The kinds, modes and limits below are the
one definition every module uses.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
import typing
from collections.abc import Sequence

CONFIDENCE_KINDS = ("prob", "margin", "entropy", "random")
# generate(remasking=...) names LLaDA's; each is one confidence kind.
REMASKING_TO_CONFIDENCE = {"low_confidence": "prob", "margin": "margin", "entropy": "entropy", "random": "random"}
COMMIT_MODES = ("count", "threshold", "factor")
CACHE_MODES = (None, "prefix", "dual")
# Where generate's blocks lie: from the prompt's end ("prompt"), or on a block-causal
# model's own block grid, counted from each row's first token ("model").
BLOCK_GRIDS = ("prompt", "model")
FLOAT_DTYPES = ("float32", "float16", "bfloat16")
INT_DTYPES = ("int32", "int64")
# The kernels scale by 1 / temperature and 1 / conf_temperature in float32, which
# overflows below ~3e-39 (and a logit of 0 times inf is NaN, not the 0 of 0 / T).
MIN_TEMPERATURE = 1e-30
FLOAT32_MAX = 3.4028234663852886e38
# The RNG takes a 64-bit seed and a 32-bit step offset (docs/design.md, RNG).
SEED_LIMIT = 2**64
OFFSET_LIMIT = 2**32


# --------------------------------------------------------------------------- scalars


def check_int(name: str, value, *, low: int | None = None, high: int | None = None) -> int:
    """value is an int (not a bool) in [low, high)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    if high is not None and value >= high:
        raise ValueError(f"{name} must be < {high}, got {value}")
    return value


def check_float(name: str, value, *, positive: bool = False, nonnegative: bool = False) -> float:
    """value is a finite real number (int or float, not a bool); returned as a float.
    Inside torch.compile, a float that changed between calls is traced as a symbol, with
    no value to check (math.isfinite of it stops a fullgraph trace): it passes here, and
    the op's body checks the value it gets when the compiled code runs."""
    if _traced_by_torch_compile():
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    if nonnegative and value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return float(value)


# Classifier-free guidance multiplies a difference of two logits by cfg_scale + 1. LLaDA
# and Dream use scales of 0 to a few; up to 100 a finite float32 or bfloat16 difference
# cannot overflow (it would take one over 3e36; float16 logits are guided in float32),
# where 1e308 made the guided logits infinite: an error that blamed the model (a server
# answered 500 for a request's value).
MAX_CFG_SCALE = 100.0


def check_cfg_scale(value) -> float:
    """cfg_scale: a finite float in [0, MAX_CFG_SCALE]."""
    value = check_float("cfg_scale", value, nonnegative=True)
    if not _traced_by_torch_compile() and value > MAX_CFG_SCALE:
        raise ValueError(f"cfg_scale must be <= {MAX_CFG_SCALE:g} (guidance scales the logits' differences by "
                         f"cfg_scale + 1; past that they can overflow), got {value}")
    return value


def _traced_by_torch_compile() -> bool:
    torch = sys.modules.get("torch")  # not imported: nothing traces
    return torch is not None and torch.compiler.is_compiling()


def check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def same_value(value, expected) -> bool:
    """value is expected, type for type: a bool is not taken for 0 or 1, nor 1.5 for 1, nor
    "1" for 1; an int and a float of one value are the same (JSON writes 0 or 0.0)."""
    if value is None or expected is None:
        return value is expected
    if isinstance(expected, bool) or isinstance(value, bool):
        return value is expected
    if isinstance(expected, (int, float)):
        return isinstance(value, (int, float)) and value == expected
    return type(value) is type(expected) and value == expected


def check_choice(name: str, value, choices: Sequence) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"seed must lie in [0, 2**64), got {seed}")
    return seed


# --------------------------------------------------------------------------- arrays


_DTYPE_NAMES: dict = {}  # dtype object -> name: every kernel call names three or more


def dtype_name(value) -> str:
    """'float32', 'bfloat16', 'int64', ... for a torch tensor, a numpy or a JAX array."""
    dtype = value.dtype
    try:
        return _DTYPE_NAMES[dtype]
    except (KeyError, TypeError):  # TypeError: a dtype that cannot be hashed
        pass
    if type(dtype).__module__ == "torch":
        name = str(dtype).removeprefix("torch.")
    else:
        name = getattr(dtype, "name", str(dtype))
    try:
        _DTYPE_NAMES[dtype] = name
    except TypeError:
        pass
    return name


def _is_torch_tensor(value) -> bool:
    """Without importing torch (the JAX front end validates without it): a value cannot be
    a torch tensor if torch was never imported."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


def check_array(name: str, value, *, array_types: tuple[type, ...], kind: str, dtypes: Sequence[str] | None = None,
                ndim: int | None = None) -> None:
    """value is one of array_types (`kind` names them in the message) with a dtype in
    dtypes and ndim dimensions."""
    if not isinstance(value, array_types):
        raise TypeError(f"{name} must be {kind}, got {type(value).__name__}")
    if dtypes is not None and dtype_name(value) not in dtypes:
        raise TypeError(f"{name} must have dtype in ({', '.join(dtypes)}), got {dtype_name(value)}")
    if ndim is not None and len(value.shape) != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(value.shape)}")


def check_tensor(name: str, value, *, dtypes: Sequence[str] | None = None, ndim: int | None = None) -> None:
    torch = sys.modules.get("torch")  # not imported: value cannot be a tensor (and no import per call)
    check_array(name, value, array_types=() if torch is None else (torch.Tensor,), kind="a torch.Tensor",
                dtypes=dtypes, ndim=ndim)


def contiguous_as(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """tensor itself when it already has dtype and is contiguous (the usual case: an index
    tensor's .to(dtype).contiguous() costs ~1 us of dispatch even then, several per small
    sample or commit call), else a contiguous copy in dtype."""
    if tensor.dtype == dtype and tensor.is_contiguous():
        return tensor
    return tensor.to(dtype).contiguous()


def check_shape(name: str, shape, expected, what: str) -> None:
    if tuple(shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)} ({what}), got {tuple(shape)}")


def check_device(name: str, value: torch.Tensor, device: torch.device) -> None:
    if value.device != device:
        raise ValueError(f"{name} must be on {device} like the other inputs, got {value.device}")


def host_values(value) -> torch.Tensor | None:
    """The values of an int tensor when reading them costs no synchronisation (on the
    CPU), else None. While torch.compile traces, None: the values are data of the graph
    (reading them would break it), and the kernels' answer to any value is defined."""
    if not _is_torch_tensor(value) or sys.modules["torch"].compiler.is_compiling():
        return None
    return value if value.device.type == "cpu" else None


def check_index_range(name: str, values: torch.Tensor | None, size: int, what: str) -> None:
    """Every value in [0, size); values None means they are not readable for free."""
    if values is None or math.prod(values.shape) == 0:
        return
    if _is_torch_tensor(values):  # one reduction, or none for one value: min() and max() took ~2.7 us
        low, high = (int(values),) * 2 if values.numel() == 1 else (int(v) for v in values.aminmax())
    else:  # numpy and JAX arrays (unmask.jax)
        low, high = int(values.min()), int(values.max())
    if low < 0 or high >= size:
        raise ValueError(f"{name} must lie in [0, {size}) ({what}), got values in [{low}, {high}]")


class InvalidLogitsError(ValueError):
    """A sampled row had no finite kept logit, or a NaN or +inf one."""


INVALID_MODEL_LOGITS = ("logits: the model gave NaN or +inf logits, or no finite logit but the mask, "
                        "for a masked position")


# --------------------------------------------------------------------------- sample


@dataclasses.dataclass(frozen=True)
class SampleOptions:
    """The scalar arguments of sample, checked. offset: an int; an int64 torch tensor on the
    logits' device, 0-d or one offset per row (logits.shape[:-1]), read by the kernels (a
    captured step replays with the values it holds then; rows may sit at different steps);
    or a traced JAX value."""

    temperature: float
    top_k: int
    top_p: float
    confidence: str
    conf_temperature: float
    seed: int
    offset: object


def sample_options(*, temperature, top_k, top_p, confidence, conf_temperature, seed, offset) -> SampleOptions:
    temperature = check_float("temperature", temperature, nonnegative=True)
    if 0 < temperature < MIN_TEMPERATURE:
        raise ValueError(f"temperature must be 0 (greedy) or >= {MIN_TEMPERATURE}, got {temperature}")
    check_int("top_k", top_k, low=0)
    top_p = check_float("top_p", top_p, positive=True)
    if top_p > 1:
        raise ValueError(f"top_p must lie in (0, 1], got {top_p}")
    check_choice("confidence", confidence, CONFIDENCE_KINDS)
    conf_temperature = check_float("conf_temperature", conf_temperature, positive=True)
    if conf_temperature < MIN_TEMPERATURE:
        raise ValueError(f"conf_temperature must be >= {MIN_TEMPERATURE}, got {conf_temperature}")
    check_seed(seed)
    if isinstance(offset, (int, bool)):  # a traced offset (JAX) is checked by its type there
        check_int("offset", offset, low=0, high=OFFSET_LIMIT)
    return SampleOptions(temperature, top_k, top_p, confidence, conf_temperature, seed, offset)


def check_logits_shape(shape) -> int:
    """logits [..., V] with at least one leading dimension and V >= 1; returns V."""
    if len(shape) < 2:
        raise ValueError(f"logits must be [N, V] or [B, L, V], got shape {tuple(shape)}")
    if shape[-1] < 1:
        raise ValueError(f"logits must have a vocabulary dimension V >= 1, got shape {tuple(shape)}")
    return shape[-1]


def banned_ids(banned, vocab: int) -> list[int] | None:
    """banned given as an int or a sequence of ints, checked against the vocabulary:
    sorted unique ids, or None."""
    if banned is None:
        return None
    if isinstance(banned, int) and not isinstance(banned, bool):
        banned = [banned]
    if not isinstance(banned, (list, tuple)):
        raise TypeError(f"banned must be an int, a sequence of ints or an int tensor, got {type(banned).__name__}")
    for token in banned:
        check_int("banned", token, low=0, high=vocab)
    ids = sorted(set(banned))
    check_not_all_banned(len(ids), vocab)
    return ids


def check_not_all_banned(unique_banned: int, vocab: int) -> None:
    if unique_banned >= vocab:
        raise ValueError(f"banned bans every one of the V={vocab} token ids: no token could be sampled")


@dataclasses.dataclass(frozen=True)
class SampleCall:
    """A checked sample call (torch): banned ids and rows as int64, contiguous (the kernels
    read them through their pointers)."""

    logits: torch.Tensor
    options: SampleOptions
    banned: torch.Tensor | None
    rows: torch.Tensor | None
    check: bool

    @property
    def device(self) -> torch.device:
        return self.logits.device

    @property
    def vocab(self) -> int:
        return self.logits.shape[-1]

    @property
    def n_rows(self) -> int:
        return self.logits.numel() // self.vocab


def sample_call(logits, *, temperature=0.0, top_k=0, top_p=1.0, banned=None, confidence="prob",
                conf_temperature=1.0, seed=0, offset=0, rows=None, check=True, vocab: int | None = None) -> SampleCall:
    """unmask.ops.sample's arguments, checked. vocab: the full vocabulary when logits hold
    one shard of it (tensor parallelism); banned ids are checked against it."""
    import torch

    check_tensor("logits", logits, dtypes=FLOAT_DTYPES)
    shard_vocab = check_logits_shape(logits.shape)
    vocab = shard_vocab if vocab is None else vocab
    device = logits.device
    if isinstance(offset, torch.Tensor):
        check_tensor("offset", offset, dtypes=INT_DTYPES)
        if offset.dim() != 0:
            check_shape("offset", offset.shape, logits.shape[:-1], "one step offset per row of logits, or 0-d")
        check_device("offset", offset, device)
        offset = contiguous_as(offset, torch.int64)
        check_index_range("offset", host_values(offset), OFFSET_LIMIT, "32-bit step offsets")
    else:
        check_int("offset", offset, low=0, high=OFFSET_LIMIT)
    options = sample_options(temperature=temperature, top_k=top_k, top_p=top_p, confidence=confidence,
                             conf_temperature=conf_temperature, seed=seed, offset=offset)
    if not isinstance(check, bool):
        raise TypeError(f"check must be a bool, got {type(check).__name__}")
    if isinstance(banned, torch.Tensor):
        check_tensor("banned", banned, dtypes=INT_DTYPES)
        check_device("banned", banned, device)
        banned_tensor = contiguous_as(banned.reshape(-1), torch.int64)  # any order: the kernels sort if they need to
        check_index_range("banned", host_values(banned_tensor), vocab, "the vocabulary")
        if banned_tensor.numel() >= vocab:  # only then can it ban every id; unique synchronises on a GPU
            check_not_all_banned(torch.unique(banned_tensor).numel(), vocab)
    else:
        ids = banned_ids(banned, vocab)
        banned_tensor = None if ids is None else torch.tensor(ids, dtype=torch.int64, device=device)
    if options.top_k >= vocab:  # keeps every id: the same as no filter, for every backend
        options = dataclasses.replace(options, top_k=0)
    n_rows = logits.numel() // shard_vocab
    if rows is not None:
        check_tensor("rows", rows, dtypes=INT_DTYPES, ndim=1)
        check_device("rows", rows, device)
        rows = contiguous_as(rows, torch.int64)
        # On a GPU the check synchronises: done when check=True, which synchronises anyway;
        # never while torch.compile traces (the values are the graph's data: the op's body
        # checks them when the graph runs).
        readable = host_values(rows) if not check or torch.compiler.is_compiling() else rows
        check_index_range("rows", readable, n_rows, "the flattened rows of logits")
    return SampleCall(logits, options, banned_tensor, rows, check)


# --------------------------------------------------------------------------- attention


class AttentionShape(typing.NamedTuple):  # a tuple: built on every attention call, in a third of a dataclass's time
    batch: int
    q_len: int
    k_len: int
    q_heads: int
    kv_heads: int
    head_dim: int


def attention_shape(q_shape, k_shape, v_shape) -> AttentionShape:
    """q [B, Lq, Hq, D], k and v [B, Lk, Hkv, D] with Hq a multiple of Hkv."""
    for name, shape in (("q", q_shape), ("k", k_shape), ("v", v_shape)):
        if len(shape) != 4:
            raise ValueError(f"{name} must have 4 dimensions, got shape {tuple(shape)}")
    batch, q_len, q_heads, head_dim = q_shape
    k_len, kv_heads = k_shape[1], k_shape[2]
    if k_shape[0] != batch or k_shape[3] != head_dim:
        check_shape("k", k_shape, (batch, k_len, kv_heads, head_dim), "[B, Lk, Hkv, D] with q's B and D")
    if v_shape != k_shape:
        check_shape("v", v_shape, tuple(k_shape), "the shape of k")
    if kv_heads == 0 or q_heads == 0 or q_heads % kv_heads != 0:
        raise ValueError(f"q heads ({q_heads}) must be a positive multiple of k/v heads ({kv_heads})")
    if head_dim == 0:
        raise ValueError("q, k, v must have a head dimension D > 0, got D = 0")
    return AttentionShape(batch, q_len, k_len, q_heads, kv_heads, head_dim)


def attention_scalars(shape: AttentionShape, *, block_size, q_offset, scale) -> tuple[int | None, int, float]:
    """block_size (None or >= 1), q_offset (>= 0) and scale (finite; default 1 / sqrt(D))."""
    if block_size is not None:
        check_int("block_size", block_size, low=1)
    check_int("q_offset", q_offset, low=0)
    scale = 1.0 / math.sqrt(shape.head_dim) if scale is None else check_float("scale", scale)
    return block_size, q_offset, scale


@dataclasses.dataclass(frozen=True)
class AttentionCall:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    kv_len: torch.Tensor | None
    key_valid: torch.Tensor | None
    block_size: int | None
    q_offset: int
    scale: float

    @property
    def device(self) -> torch.device:
        return self.q.device

    @functools.cached_property
    def shape(self) -> AttentionShape:  # read several times per call by the dispatch and launchers
        return attention_shape(self.q.shape, self.k.shape, self.v.shape)


def check_kv_len_values(kv_len, k_len: int) -> None:
    """kv_len's values lie in [0, Lk] where they can be read for free (on the CPU); None passes."""
    if kv_len is not None:
        check_index_range("kv_len", host_values(kv_len), k_len + 1, "key counts, at most Lk")


def attention_call(q, k, v, *, kv_len=None, key_valid=None, block_size=None, q_offset=0, scale=None) -> AttentionCall:
    """unmask.ops.attention's arguments, checked. kv_len values lie in [0, Lk] (checked
    when they are on the CPU; on a device a larger value shows every key)."""
    for name, value in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, value, dtypes=FLOAT_DTYPES, ndim=4)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share a dtype, got q {dtype_name(q)}, k {dtype_name(k)}, v {dtype_name(v)}")
    check_device("k", k, q.device)
    check_device("v", v, q.device)
    shape = attention_shape(q.shape, k.shape, v.shape)
    if kv_len is not None:
        check_tensor("kv_len", kv_len, dtypes=INT_DTYPES, ndim=1)
        check_shape("kv_len", kv_len.shape, (shape.batch,), "[B]")
        check_device("kv_len", kv_len, q.device)
        check_kv_len_values(kv_len, shape.k_len)
    if key_valid is not None:
        check_tensor("key_valid", key_valid, dtypes=("bool",), ndim=2)
        check_shape("key_valid", key_valid.shape, (shape.batch, shape.k_len), "[B, Lk]")
        check_device("key_valid", key_valid, q.device)
    block_size, q_offset, scale = attention_scalars(shape, block_size=block_size, q_offset=q_offset, scale=scale)
    call = AttentionCall(q, k, v, kv_len, key_valid, block_size, q_offset, scale)
    call.__dict__["shape"] = shape  # the cached property, already checked here
    return call


# --------------------------------------------------------------------------- commit


def commit_mode(k, threshold, factor) -> str:
    """Exactly one of k, threshold, factor, or k with threshold (k is then the floor: at
    least min(k, eligible) commit); the checked scalar ones. Returns the mode."""
    given = [name for name, value in (("k", k), ("threshold", threshold), ("factor", factor)) if value is not None]
    if len(given) != 1 and given != ["k", "threshold"]:
        raise ValueError(f"commit takes exactly one of k, threshold, factor, or k with threshold; got "
                         f"{given or 'none'}")
    if threshold is not None:
        check_float("threshold", threshold)
        return "threshold"
    if factor is not None:
        check_float("factor", factor, positive=True)
        return "factor"
    return "count"


def check_counts(k, host: torch.Tensor | None) -> None:
    """Commit counts are >= 0 where they can be read for free (a negative count on a
    device commits nothing). host: the counts on the host (a CPU tensor, or a numpy array
    from unmask.jax), or None."""
    if isinstance(k, int):
        check_int("k", k, low=0)
    elif host is not None and math.prod(host.shape) > 0:
        one = _is_torch_tensor(host) and host.numel() == 1  # int() of one element: cheaper than a reduction
        if (low := int(host) if one else int(host.min())) < 0:
            raise ValueError(f"k must be >= 0, got a count of {low}")


@dataclasses.dataclass(frozen=True)
class CommitCall:
    x: torch.Tensor
    tokens: torch.Tensor
    conf: torch.Tensor
    eligible: torch.Tensor
    mode: str
    k: torch.Tensor | None  # int64 [B]: count mode's counts, or threshold mode's floor
    threshold: float | None
    factor: float | None

    @property
    def device(self) -> torch.device:
        return self.x.device


def commit_call(x, tokens, conf, eligible, *, k=None, threshold=None, factor=None) -> CommitCall:
    """unmask.ops.commit's arguments, checked."""
    import torch

    check_tensor("x", x, dtypes=INT_DTYPES, ndim=2)
    # 1: overlap for sure (an expanded or broadcast view); not traceable, so not while
    # torch.compile traces (the op's body checks when the graph runs)
    if not torch.compiler.is_compiling() and torch._debug_has_internal_overlap(x) == 1:
        raise ValueError("x must not overlap itself (an expanded view): commit writes into it in place; pass "
                         "x.contiguous() and read the result from it")
    check_tensor("tokens", tokens, dtypes=INT_DTYPES)
    check_tensor("conf", conf, dtypes=FLOAT_DTYPES + ("float64",))
    check_tensor("eligible", eligible, dtypes=("bool",))
    for name, value in (("tokens", tokens), ("conf", conf), ("eligible", eligible)):
        check_shape(name, value.shape, tuple(x.shape), "the shape of x, [B, L]")
        check_device(name, value, x.device)
    mode = commit_mode(k, threshold, factor)
    if isinstance(k, torch.Tensor):
        check_tensor("k", k, dtypes=INT_DTYPES, ndim=1)
        check_shape("k", k.shape, (x.shape[0],), "[B]")
        check_device("k", k, x.device)
        check_counts(k, host_values(k))
        k = contiguous_as(k, torch.int64)
    elif k is not None:
        check_counts(k, None)
        k = torch.full((x.shape[0],), k, dtype=torch.int64, device=x.device)
    return CommitCall(x, tokens, conf, eligible, mode, k,
                      None if threshold is None else float(threshold), None if factor is None else float(factor))


# --------------------------------------------------------------------------- the model's pointwise kernels


@dataclasses.dataclass(frozen=True)
class RmsNormCall:
    x: torch.Tensor
    weight: torch.Tensor
    eps: float

    @property
    def device(self) -> torch.device:
        return self.x.device


def rms_norm_call(x, weight, eps) -> RmsNormCall:
    """unmask.ops.rms_norm's arguments, checked: x [..., d], weight [d] (float32 or x's
    dtype), eps a finite float >= 0."""
    check_tensor("x", x, dtypes=FLOAT_DTYPES + ("float64",))
    check_tensor("weight", weight, dtypes=FLOAT_DTYPES + ("float64",), ndim=1)
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"x must have a last dimension of at least 1, got shape {tuple(x.shape)}")
    check_shape("weight", weight.shape, (x.shape[-1],), "[d], the last dimension of x")
    check_device("weight", weight, x.device)
    if weight.dtype != x.dtype and dtype_name(weight) != "float32":
        raise TypeError(f"weight must be float32 or x's dtype {dtype_name(x)}, got {dtype_name(weight)}")
    eps = check_float("eps", eps, nonnegative=True)
    if eps > FLOAT32_MAX:  # the kernels add it in float32
        raise ValueError(f"eps must be at most {FLOAT32_MAX:.7g} (a finite float32), got {eps}")
    return RmsNormCall(x, weight, eps)


@dataclasses.dataclass(frozen=True)
class RotaryCall:
    x: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor

    @property
    def device(self) -> torch.device:
        return self.x.device


def rotary_call(x, cos, sin) -> RotaryCall:
    """unmask.ops.rotary's arguments, checked: x [B, L, H, D] with D even; cos and sin
    float32 (float64 beside a float64 x) [1 or B, L, 1, D] (unmask.models.rotary_tables)."""
    check_tensor("x", x, dtypes=FLOAT_DTYPES + ("float64",), ndim=4)
    batch, length, _, dim = x.shape
    if dim < 2 or dim % 2:
        raise ValueError(f"x's last dimension (the head dim) must be even and at least 2, got {dim}")
    for name, table in (("cos", cos), ("sin", sin)):
        check_tensor(name, table, dtypes=("float32", "float64") if dtype_name(x) == "float64" else ("float32",), ndim=4)
        if table.shape[0] not in (1, batch) or tuple(table.shape[1:]) != (length, 1, dim):
            raise ValueError(f"{name} must have shape (1 or {batch}, {length}, 1, {dim}) ([1 or B, L, 1, D]), "
                             f"got {tuple(table.shape)}")
        check_device(name, table, x.device)
    if cos.shape != sin.shape or cos.dtype != sin.dtype:
        raise ValueError(f"cos and sin must have one shape and dtype, got {tuple(cos.shape)} {dtype_name(cos)} and "
                         f"{tuple(sin.shape)} {dtype_name(sin)}")
    return RotaryCall(x, cos, sin)


@dataclasses.dataclass(frozen=True)
class MoeCall:
    x: torch.Tensor
    experts: torch.Tensor
    weights: torch.Tensor
    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor

    @property
    def device(self) -> torch.device:
        return self.x.device


def moe_swiglu_call(x, experts, weights, gate, up, down) -> MoeCall:
    """unmask.ops.moe_swiglu's arguments, checked: tokens x [T, d]; each token's experts
    [T, k] (int32 or int64, 1 <= k <= E) and weights [T, k] (float32; float64 beside a
    float64 x); the experts' stacked weights in nn.Linear's [out, in] layout, x's dtype:
    gate and up [E, f, d], down [E, d, f]. The ids' range is checked where they are
    read (a check here would read them on the host)."""
    check_tensor("x", x, dtypes=FLOAT_DTYPES + ("float64",), ndim=2)
    check_tensor("experts", experts, dtypes=INT_DTYPES, ndim=2)
    wide = dtype_name(x) == "float64"
    check_tensor("weights", weights, dtypes=("float32", "float64") if wide else ("float32",), ndim=2)
    for name, value in (("gate", gate), ("up", up), ("down", down)):
        check_tensor(name, value, dtypes=FLOAT_DTYPES + ("float64",), ndim=3)
        if value.dtype != x.dtype:
            raise TypeError(f"{name} must have x's dtype {dtype_name(x)}, got {dtype_name(value)}")
    tokens, dim = x.shape
    n_experts, hidden = gate.shape[0], gate.shape[1]
    if dim == 0 or hidden == 0 or n_experts == 0:
        raise ValueError(f"x [T, d] and gate [E, f, d] need d, E and f of at least 1, got x {tuple(x.shape)} "
                         f"and gate {tuple(gate.shape)}")
    check_shape("gate", gate.shape, (n_experts, hidden, dim), "[E, f, d], d of x")
    check_shape("up", up.shape, (n_experts, hidden, dim), "[E, f, d], gate's")
    check_shape("down", down.shape, (n_experts, dim, hidden), "[E, d, f], gate's E and f")
    per_token = experts.shape[1]
    if experts.shape[0] != tokens or not 1 <= per_token <= n_experts:
        raise ValueError(f"experts must have shape ({tokens}, k) with 1 <= k <= {n_experts} ([T, k], T of x, at "
                         f"most E experts), got {tuple(experts.shape)}")
    check_shape("weights", weights.shape, experts.shape, "[T, k], experts'")
    for name, value in (("experts", experts), ("weights", weights), ("gate", gate), ("up", up), ("down", down)):
        check_device(name, value, x.device)
    return MoeCall(x, experts, weights, gate, up, down)


def check_expert_ids(low: int, high: int, n_experts: int) -> None:
    """The smallest and largest expert id of a moe_swiglu call, read where the ids are
    (the reference and the torch backend; the CPU kernel checks them as it counts; the
    CUDA kernel, which reads nothing on the host, gives such a token NaN outputs)."""
    if low < 0 or high >= n_experts:
        raise ValueError(f"experts must hold ids in [0, n_experts) = [0, {n_experts}), got {low if low < 0 else high}")


# --------------------------------------------------------------------------- decoding


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How generate samples each step: the kernel's options (offset set per step)."""

    temperature: float
    top_k: int
    top_p: float
    confidence: str
    seed: int
    conf_temperature: float = 1.0

    @property
    def options(self) -> dict:
        """The sample kernel's arguments that every step of a decoding shares (each call
        adds its seed words, offsets and banned ids): one place for every loop to read."""
        return dict(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, confidence=self.confidence,
                    conf_temperature=self.conf_temperature)


def sampling(*, temperature, top_k, top_p, remasking, seed, conf_temperature=1.0) -> Sampling:
    check_choice("remasking", remasking, tuple(REMASKING_TO_CONFIDENCE))
    confidence = REMASKING_TO_CONFIDENCE[remasking]
    options = sample_options(temperature=temperature, top_k=top_k, top_p=top_p, confidence=confidence,
                             conf_temperature=conf_temperature, seed=seed, offset=0)
    return Sampling(options.temperature, options.top_k, options.top_p, confidence, options.seed,
                    options.conf_temperature)


def model_grid(block_size, block_length: int, prompt_lengths: Sequence[int], *, shifted: bool,
               model_name: str) -> int:
    """generate(block_grid="model")'s grid, max(block_size, block_length), checked: a
    block-causal model, one of the two lengths dividing the other (a model with shifted
    logits: block_length dividing block_size, so that every model block begins a block),
    and prompt lengths that agree modulo the grid (rows share their blocks)."""
    if block_size is None:
        raise ValueError("block_grid='model' needs a block-causal model (the unmask model with config.block_size); "
                         f"got {model_name} without one")
    grid = max(block_size, block_length)
    if shifted and block_size % block_length:
        raise ValueError(f"block_grid='model' needs block_length={block_length} to divide the model's block_size="
                         f"{block_size} (its logits are shifted: each model block's first position is decoded "
                         "alone, first)")
    if grid % min(block_size, block_length):
        raise ValueError(f"block_grid='model' needs block_length={block_length} to divide the model's block_size="
                         f"{block_size} or be a multiple of it")
    if len({length % grid for length in prompt_lengths}) > 1:
        raise ValueError(f"prompts: with block_grid='model' the prompt lengths of a batch must agree modulo {grid} "
                         f"(their blocks lie on each row's own grid), got lengths {list(prompt_lengths)}; decode "
                         "them in separate calls")
    return grid


@dataclasses.dataclass(frozen=True)
class Rule:
    """How a block decides how many positions to commit each step: steps_per_block,
    threshold or factor; or steps_per_block with threshold, where each step commits its
    planned count and whatever else passes the threshold, and the block ends when its
    masks do (SDAR's low_confidence_dynamic, LLaDA 2.0's rule)."""

    steps_per_block: int | None = None
    threshold: float | None = None
    factor: float | None = None
    schedule: str = "llada"  # how the steps rule spreads a block's commits (unmask.schedule)

    def commit_options(self, k=None) -> dict:
        """unmask.ops.commit's mode arguments for a step of this rule: the steps rule's
        count k (with a threshold, as its floor), or the threshold or the factor (k unread)."""
        if self.steps_per_block is not None:
            return {"k": k} if self.threshold is None else {"k": k, "threshold": self.threshold}
        return {"threshold": self.threshold} if self.threshold is not None else {"factor": self.factor}


# The values each confidence kind takes: a threshold outside can never be passed, or is
# always passed, and would silently turn parallel decoding into one token per step.
CONFIDENCE_RANGES = {"prob": (0.0, 1.0), "margin": (0.0, 1.0), "random": (0.0, 1.0), "entropy": (-math.inf, 0.0)}


def rule(steps, threshold, factor, *, num_blocks: int, default_steps: int, confidence: str,
         schedule: str = "llada") -> Rule:
    """One of steps (default default_steps), threshold, factor, or steps with threshold
    (Rule); schedule (the steps rule's, unmask.schedule) is "llada" without steps."""
    given = [name for name, value in (("steps", steps), ("threshold", threshold), ("factor", factor)) if value is not None]
    if len(given) > 1 and given != ["steps", "threshold"]:
        raise ValueError(f"give at most one of steps, threshold, factor (or steps with threshold); got {given}")
    from unmask.schedule import MAX_DREAM_STEPS, SCHEDULES

    check_choice("schedule", schedule, SCHEDULES)
    if schedule != "llada" and given and given != ["steps"]:
        # (with steps and threshold: Dream plans each step from the masks left, which a
        # threshold committing ahead of the plan would change; no published loop does both)
        raise ValueError(f"schedule={schedule!r} spreads the steps rule's commits; it does not apply with "
                         f"{' and '.join(given)}")
    if threshold is not None:
        threshold = check_float("threshold", threshold)
        low, high = CONFIDENCE_RANGES[confidence]
        if confidence == "entropy" and threshold >= high:
            raise ValueError(f"threshold={threshold} is never exceeded by 'entropy' confidence (sum p log p, "
                             f"values <= 0); pass a negative threshold")
        if confidence != "entropy" and not low <= threshold < high:
            raise ValueError(f"threshold={threshold} must lie in [0, 1) for {confidence!r} confidence (values in "
                             f"[0, 1]); a threshold >= 1 is never exceeded")
        if steps is None:
            return Rule(threshold=threshold)
    if factor is not None:
        return Rule(factor=check_float("factor", factor, positive=True))
    steps = default_steps if steps is None else steps
    check_positive_int("steps", steps)
    if steps % num_blocks != 0:
        raise ValueError(f"steps={steps} must be a multiple of the number of blocks ({num_blocks})")
    if schedule == "dream" and steps // num_blocks > MAX_DREAM_STEPS:
        raise ValueError(f"steps={steps} gives {steps // num_blocks} steps per block; schedule='dream' plans them one "
                         f"by one and takes at most {MAX_DREAM_STEPS}")
    return Rule(steps_per_block=steps // num_blocks, threshold=threshold, schedule=schedule)


@dataclasses.dataclass(frozen=True)
class Revision:
    """Self-correction (unmask.revise): committed tokens of the active block whose
    probability, with their position masked, falls below threshold are masked again."""

    threshold: float
    groups: int          # verification canvases per row per model call
    max_revisions: int   # times one position may be masked again per block (bounds the steps)


def revision(threshold, groups, max_revisions, *, rule: Rule, speculate: int) -> Revision | None:
    """None when revise_threshold is None (no self-correction). revise_groups and
    max_revisions are checked either way (a bad one is an error, not silently unread)."""
    # one group would judge every token with every other committed token masked beside it:
    # a contradiction between two of them would never be seen
    groups = check_int("revise_groups", groups, low=2)
    max_revisions = check_int("max_revisions", max_revisions, low=1)
    if threshold is None:
        return None
    threshold = check_float("revise_threshold", threshold)
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"revise_threshold={threshold} must lie in (0, 1): it is compared with a probability")
    if rule.steps_per_block is not None and rule.threshold is not None:
        raise ValueError("revise_threshold does not take steps with threshold: the plan's counts are floors that "
                         "masking tokens again would outrun; pass threshold= alone")
    if rule.steps_per_block is not None:
        raise ValueError("revise_threshold needs threshold= or factor= decoding: the steps rule plans each block's "
                         "commits up front, and masking tokens again would break the plan")
    if speculate:
        raise ValueError("revise_threshold and speculate cannot be combined")
    return Revision(threshold, groups, max_revisions)


def position_temperature(alg_temp, *, rule: Rule, confidence: str, speculate: int) -> float | None:
    """generate's alg_temp (Dream's): None or 0 commits each step's most confident
    positions (top-k); a positive temperature draws them, without replacement, with
    probabilities softmax(confidence / alg_temp). Only beside the steps rule alone (its
    count is what is drawn), a confidence to temper (not remasking="random") and no
    speculation (whose drafts assume the top-k)."""
    if alg_temp is None:
        return None
    alg_temp = check_float("alg_temp", alg_temp, nonnegative=True)
    if alg_temp == 0.0:  # Dream's alg_temp=0: the top-k
        return None
    if alg_temp < MIN_TEMPERATURE:  # confidence / alg_temp stays finite in float64
        raise ValueError(f"alg_temp must be 0 or at least {MIN_TEMPERATURE:g}, got {alg_temp}")
    if rule.steps_per_block is None or rule.threshold is not None:
        raise ValueError("alg_temp draws each step's planned count of positions: it needs steps= alone, not "
                         "threshold= or factor=")
    if confidence == "random":
        raise ValueError("alg_temp tempers the confidence that ranks positions; remasking='random' ranks them at "
                         "random already")
    if speculate:
        raise ValueError("alg_temp and speculate cannot be combined (the drafts take each step's top-k)")
    return alg_temp


def check_even_split(config, parts: int, unit: str) -> None:
    """What tensor parallelism splits into equal shares over `parts` ranks or devices
    (unit names them) is a multiple of it: heads, key/value heads, the MLP's hidden units
    and, in a mixture, each expert's (torch's unmask.distributed and unmask.jax.sharding)."""
    sizes = {"n_heads": config.n_heads, "n_kv_heads": config.n_kv_heads, "mlp_hidden_size": config.mlp_hidden_size}
    if config.moe is not None:
        sizes["moe.expert_hidden_size"] = config.moe.expert_hidden_size
    for name, value in sizes.items():
        if value % parts != 0:
            raise ValueError(f"config.{name}={value} must be a multiple of the number of {unit} ({parts})")


def block_count(gen_length, block_length) -> int:
    check_positive_int("gen_length", gen_length)
    check_positive_int("block_length", block_length)
    if gen_length % block_length != 0:
        raise ValueError(f"block_length={block_length} must divide gen_length={gen_length}")
    return gen_length // block_length


def special_ids(*, mask_id, eos_id, vocab: int | None) -> tuple[int, ...] | None:
    """mask_id (required) is a token id of the model's vocabulary; eos_id (optional) one
    too, or a non-empty list or tuple of them (a row stops at any: generation_config.json's
    list, say <|im_end|> and <|endoftext|>), none of them the mask id. Returns the EOS ids
    as a tuple (None for none); the first is the one padding and filling writes."""
    if mask_id is None:
        raise ValueError("mask_id: the model does not name its mask token; pass mask_id=")
    check_int("mask_id", mask_id, low=0)
    if vocab is not None and mask_id >= vocab:
        raise ValueError(f"mask_id={mask_id} lies outside the model's vocabulary (V={vocab})")
    if eos_id is None:
        return None
    ids = tuple(eos_id) if isinstance(eos_id, (list, tuple)) else (eos_id,)
    if not ids:
        raise ValueError("eos_id: an empty list stops at nothing; pass None (or stop_at_eos=False) for no EOS")
    for one in ids:
        check_int("eos_id", one, low=0)
        if vocab is not None and one >= vocab:
            raise ValueError(f"eos_id={one} lies outside the model's vocabulary (V={vocab})")
        if one == mask_id:
            raise ValueError(f"eos_id and mask_id must differ, both are {mask_id}")
    return ids


def model_vocab(model) -> int | None:
    """The model's vocabulary size where its config says (embedding rows first)."""
    config = getattr(model, "config", None)
    vocab = getattr(config, "embedding_size", None) or getattr(config, "vocab_size", None)
    return vocab if isinstance(vocab, int) else None


def model_special_id(model, given: int | None, attr: str, config_attr: str) -> int | None:
    """A special token id: given, else the model's attribute, else its config's."""
    if given is not None:
        return given
    if hasattr(model, attr):
        return getattr(model, attr)
    return getattr(getattr(model, "config", None), config_attr, None)


def model_special_ids(model, mask_id: int | None, eos_id) -> tuple[int, tuple[int, ...] | None]:
    """The mask id and the EOS ids (a tuple, or None): given, else the model's (mask_id,
    and eos_ids, its stop list, or eos_id; else its config's mask_token_id and
    eos_token_id); checked against its vocabulary (special_ids)."""
    mask_id = model_special_id(model, mask_id, "mask_id", "mask_token_id")
    if eos_id is None and getattr(model, "eos_ids", None) is not None:
        eos_id = model.eos_ids
    eos_id = model_special_id(model, eos_id, "eos_id", "eos_token_id")
    return mask_id, special_ids(mask_id=mask_id, eos_id=eos_id, vocab=model_vocab(model))


def prompt_list_batch(prompts, attention_mask) -> None:
    """Prompts given as token-id lists (padded by generate): a non-empty list of lists of
    non-negative ints, and no attention_mask (that goes with an array of prompts)."""
    if attention_mask is not None:
        raise ValueError("attention_mask goes with a prompts tensor; lists of token ids are padded here")
    if not isinstance(prompts, (list, tuple)) or len(prompts) == 0:
        raise ValueError(f"prompts must be a non-empty list of token-id lists or an int tensor [B, P], got {prompts!r}")
    for row, prompt in enumerate(prompts):
        if not isinstance(prompt, (list, tuple)) or not all(isinstance(t, int) and t >= 0 for t in prompt):
            raise ValueError(f"prompts[{row}] must be a list of non-negative token ids")


def prompt_lists(prompts, *, mask_id: int, vocab: int | None) -> None:
    """prompt_ids for token-id lists (prompt_batch checked their type), without tensors."""
    tokens = [token for prompt in prompts for token in prompt]
    if not tokens:
        return
    low, high = min(tokens), max(tokens)
    if low < 0 or (vocab is not None and high >= vocab):
        allowed = f"[0, {vocab}) (the vocabulary)" if vocab is not None else ">= 0"
        raise ValueError(f"prompts must hold token ids in {allowed}, got ids in [{low}, {high}]")
    if mask_id in tokens:
        raise ValueError(f"prompts contain mask_id={mask_id}; use unmask.infill to fill masks inside a text")


def prompt_ids(ids: torch.Tensor, known: torch.Tensor, *, mask_id: int, vocab: int | None,
               name: str = "prompts") -> None:
    """The real (known) tokens are ids of the vocabulary and none is the mask."""
    real = ids[known]
    if math.prod(real.shape) == 0:
        return
    id_range(int(real.min()), int(real.max()), vocab=vocab, name=name)
    if bool((real == mask_id).any()):
        raise ValueError(f"{name} contain mask_id={mask_id}; use unmask.infill to fill masks inside a text")


def id_range(low: int, high: int, *, vocab: int | None, name: str) -> None:
    """The smallest and largest given token ids lie in the vocabulary (low > high: none given)."""
    if low > high:
        return
    if low < 0 or (vocab is not None and high >= vocab):
        allowed = f"[0, {vocab}) (the vocabulary)" if vocab is not None else ">= 0"
        raise ValueError(f"{name} must hold token ids in {allowed}, got ids in [{low}, {high}]")


def left_padded(attention_mask: torch.Tensor) -> None:
    """Each row's padding comes before its real tokens: generate continues every row at
    the canvas's end, so a right-padded row would continue after its pads."""
    holes = attention_mask[:, :-1] & ~attention_mask[:, 1:]
    if bool(holes.any()):
        row = int(holes.any(dim=1).nonzero()[0, 0])
        raise ValueError(f"attention_mask must be left-padded (padding before the prompt; generation continues "
                         f"after the last position): row {row} has padding after a real token")
