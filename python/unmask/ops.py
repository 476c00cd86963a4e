"""Public kernels: checked (unmask.validation), then run where unmask.dispatch says.

`unmask.ops.attention`, `.sample` and `.commit` (and the model's pointwise kernels,
`.rms_norm` and `.rotary`, below) check every argument (raising ValueError
or TypeError that names it) and call the torch.library custom ops
torch.ops.unmask.{attention, sample, commit}. The custom ops have fake implementations,
so torch.compile(fullgraph=True) traces through them. Eager calls that record no
gradient skip the custom op's wrapping and run its body directly (_runs_eagerly).
Inside each op, unmask.dispatch picks the native kernel of the tensors' device or the
reference; backend_for() names the backend a call would use without running it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from unmask import dispatch, native, reference, validation
from unmask import experts as experts_backend

CALL_BUILDERS = {
    "attention": validation.attention_call,
    "sample": validation.sample_call,
    "commit": validation.commit_call,
    "rms_norm": validation.rms_norm_call,
    "rotary": validation.rotary_call,
    "moe_swiglu": validation.moe_swiglu_call,
}


def backend_for(kernel: str, *args, **kwargs) -> str:
    """The backend unmask.ops.<kernel>(*args, **kwargs) runs: 'cpu:avx512' (the C++
    kernels and the instruction set they run), 'cuda' or 'reference'. The arguments are
    checked as the call would check them; nothing runs."""
    validation.check_choice("kernel", kernel, tuple(CALL_BUILDERS))
    backend, _ = dispatch.choose(kernel, CALL_BUILDERS[kernel](*args, **kwargs))
    return backend.name


def fallback_reason(kernel: str, *args, **kwargs) -> str | None:
    """Why the native kernel would not run this call (None when it would)."""
    validation.check_choice("kernel", kernel, tuple(CALL_BUILDERS))
    return dispatch.choose(kernel, CALL_BUILDERS[kernel](*args, **kwargs))[1]


def _traced(*tensors: torch.Tensor | None) -> bool:
    """Whether the call is being traced or intercepted rather than run: inside
    torch.compile or a dispatch mode (fake tensors, tracing, FLOP counters), or on a
    tensor subclass (nn.Parameter aside) or a device other than cpu and cuda."""
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0:
        return True
    for t in tensors:  # a loop, not any(<generator>): this runs on every kernel call
        if t is not None and (type(t) not in _PLAIN_TENSORS or not (t.is_cpu or t.is_cuda)):
            return True
    return False


# nn.Parameter overrides nothing of Tensor's behaviour: a model's weights are plain here.
_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def _runs_eagerly(*tensors: torch.Tensor | None) -> bool:
    """Whether a call may skip the custom op and run unmask.dispatch directly: plain CPU or
    CUDA tensors, not traced (_traced), and no gradient to record. The custom op's own
    body runs the same dispatch; its wrapping (schema checks, autograd and backend
    redispatch) cost ~20 us a call, a third of a small attention call's time and more
    than SDPA took for it."""
    if _traced(*tensors):
        return False
    return not native.needs_gradient(*tensors)


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
    # Checked here too: torch.ops.unmask.attention is public, and a compiled graph calls
    # it without the wrapper's checks (a bf16 k beside a float32 q, read as float32, runs
    # past k's end).
    call = validation.attention_call(q, k, v, kv_len=kv_len, key_valid=key_valid, block_size=block_size or None,
                                     q_offset=q_offset, scale=scale)
    return dispatch.run("attention", call).contiguous()  # the fake below promises contiguous strides


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
    """Fused masked bidirectional attention (docs/design.md, attention).

    q [B, Lq, Hq, D], k and v [B, Lk, Hkv, D] with Hq a multiple of Hkv; fp32, fp16
    or bf16. kv_len [B] (values in [0, Lk]) hides keys j >= kv_len[b]; key_valid
    [B, Lk] hides keys marked False; block_size b lets query p = q_offset + i see key j
    only when j // b <= p // b. A query that sees no key returns zeros.
    """
    plan_key = None
    if _runs_eagerly(q, k, v, kv_len, key_valid):
        plan_key = dispatch.signature(q, k, v, kv_len, key_valid, block_size, q_offset, scale)
        launch = dispatch.planned("attention", plan_key)
        if launch is not None:  # a call of this signature passed the checks and was decided before
            validation.check_kv_len_values(kv_len, k.shape[1])
            return launch(q, k, v, kv_len, key_valid)
    call = validation.attention_call(q, k, v, kv_len=kv_len, key_valid=key_valid, block_size=block_size,
                                     q_offset=q_offset, scale=scale)
    if plan_key is not None:
        return dispatch.run("attention", call, plan_key=plan_key).contiguous()
    if native.transformed():  # the custom op has no forward-mode or vmap rule: the reference's operations
        return reference.attention(call.q, call.k, call.v, kv_len=call.kv_len, key_valid=call.key_valid,
                                   block_size=call.block_size, q_offset=call.q_offset, scale=call.scale)
    return _attention_op(call.q, call.k, call.v, call.kv_len, call.key_valid, call.block_size or 0, call.q_offset,
                         call.scale)


# --------------------------------------------------------------------------- sample


InvalidLogitsError = validation.InvalidLogitsError


def _seed_to_int64(seed: int) -> int:
    """Custom-op schemas carry int64: a seed in [2^63, 2^64) travels as its two's complement."""
    return seed - 2**64 if seed >= 2**63 else seed


def _seed_from_int64(seed: int) -> int:
    return seed + 2**64 if seed < 0 else seed


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
    offset_tensor: torch.Tensor | None,
    rows: torch.Tensor | None,
    check: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    call = validation.sample_call(logits, temperature=temperature, top_k=top_k, top_p=top_p, banned=banned,
                                  confidence=confidence, conf_temperature=conf_temperature,
                                  seed=_seed_from_int64(seed), offset=offset if offset_tensor is None else offset_tensor,
                                  rows=rows, check=check)  # as in attention's body: the op is public
    tokens, conf = dispatch.run("sample", call)
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
def _(logits, temperature, top_k, top_p, banned, confidence, conf_temperature, seed, offset, offset_tensor, rows, check):
    lead = logits.shape[:-1]
    return (
        logits.new_empty(lead, dtype=torch.int64),
        logits.new_empty(lead, dtype=torch.float32),
    )


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
    offset: int | torch.Tensor = 0,
    rows: torch.Tensor | None = None,
    check: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Parallel token sampling with confidence (docs/design.md, sample).

    offset, the step counter of the RNG, is an int or a 0-d int tensor on the logits'
    device: the kernels read the tensor, so a step captured in a CUDA graph or traced by
    torch.compile replays with the counter it holds then.

    logits [..., V] in fp32, fp16 or bf16 (fp32 math). Returns tokens (int64) and
    conf (float32) of shape logits.shape[:-1]. rows, an int index into the flattened
    leading dimensions, restricts the work to those rows (none when empty); the others
    get token -1 and conf -inf. Row ids are checked when they are on the CPU or
    check=True; an id outside [0, N) that reaches the CUDA kernel unchecked is skipped.
    With check=True
    (the default) a sampled row with NaN or +inf logits or no finite kept logit raises
    InvalidLogitsError (a ValueError); check=False returns token -1 and conf -inf for
    it and never synchronises with the device.
    """
    call = validation.sample_call(logits, temperature=temperature, top_k=top_k, top_p=top_p, banned=banned,
                                  confidence=confidence, conf_temperature=conf_temperature, seed=seed, offset=offset,
                                  rows=rows, check=check)
    o = call.options
    offset_tensor = o.offset if isinstance(o.offset, torch.Tensor) else None
    if _runs_eagerly(call.logits, call.banned, call.rows, offset_tensor):
        tokens, conf = dispatch.run("sample", call)
        if call.check:
            raise_on_invalid_rows(tokens, call.rows)
        return tokens, conf
    return _sample_op(call.logits, o.temperature, o.top_k, o.top_p, call.banned, o.confidence, o.conf_temperature,
                      _seed_to_int64(o.seed), 0 if offset_tensor is not None else o.offset, offset_tensor, call.rows,
                      call.check)


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
    # as in attention's body: the op is public (mismatched shapes wrote heap memory into x)
    call = validation.commit_call(x, tokens, conf, eligible, k=k, threshold=threshold, factor=factor)
    return dispatch.run("commit", call)


@_commit_op.register_fake
def _(x, tokens, conf, eligible, k, threshold, factor):
    return torch.empty(eligible.shape, dtype=torch.bool, device=eligible.device)  # the kernels' contiguous [B, L]


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
    """Confidence-based unmasking (docs/design.md, commit), in place on the canvas x [B, L].

    Exactly one mode: k (int >= 0 or int tensor [B]) commits the k most confident
    eligible positions per row (a negative count in a device tensor commits nothing);
    threshold commits those with conf > threshold, and at least one (with k too, at
    least min(k, eligible) instead, none for k = 0: SDAR's low_confidence_dynamic and
    LLaDA 2.0's rule); factor
    commits the largest n with (n + 1) * (1 - c_n) < factor (at least one). Returns
    committed [B, L] bool.
    """
    call = validation.commit_call(x, tokens, conf, eligible, k=k, threshold=threshold, factor=factor)
    if _runs_eagerly(call.x, call.tokens, call.conf, call.eligible, call.k):
        return dispatch.run("commit", call)
    return _commit_op(call.x, call.tokens, call.conf, call.eligible, call.k, call.threshold, call.factor)


# --------------------------------------------------------------------------- the model's pointwise kernels
# No custom ops: traced (torch.compile), these are the reference's torch operations,
# which the compiler fuses itself; eager, the kernel table decides (a call that needs a
# gradient takes the reference, whose operations autograd differentiates).


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight over x's last dimension, in float32 arithmetic,
    returned in x's dtype. x [..., d] float32, float16, bfloat16 (or float64, by the
    reference); weight [d], float32 or x's dtype; eps >= 0."""
    plan_key = None
    if _runs_eagerly(x, weight):
        plan_key = dispatch.signature(x, weight, eps)
        launch = dispatch.planned("rms_norm", plan_key)
        if launch is not None:
            return launch(x, weight)
    call = validation.rms_norm_call(x, weight, eps)
    if plan_key is None and _traced(call.x, call.weight):  # (a plan key: found eager above)
        return reference.rms_norm(call.x, call.weight, call.eps)
    return dispatch.run("rms_norm", call, plan_key=plan_key)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embeddings in the rotate-half form: x cos + (-x2, x1) sin, for x
    [B, L, H, D] (halves x1, x2 of D) and float32 tables cos, sin [1 or B, L, 1, D]
    (unmask.models.rotary_tables), computed in float32 and returned in x's dtype. The
    native kernel rounds as the reference's operations do: the results are equal."""
    plan_key = None
    if _runs_eagerly(x, cos, sin):
        plan_key = dispatch.signature(x, cos, sin)
        launch = dispatch.planned("rotary", plan_key)
        if launch is not None:
            return launch(x, cos, sin)
    call = validation.rotary_call(x, cos, sin)
    if plan_key is None and _traced(call.x, call.cos, call.sin):  # (a plan key: found eager above)
        return reference.rotary(call.x, call.cos, call.sin)
    return dispatch.run("rotary", call, plan_key=plan_key)


def moe_swiglu(x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor, gate: torch.Tensor,
               up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """The routed sum of a mixture of SwiGLU experts (LLaDA 2.0's MoE MLP without its
    shared experts), float32 [T, d] (float64 for float64 x):
    out[t] = sum over j of weights[t, j] * down_e(silu(gate_e x[t]) * up_e x[t]), e = experts[t, j].
    x [T, d]; experts [T, k] ids in [0, E); weights [T, k] float32; the experts' weights
    stacked in nn.Linear's [out, in] layout, x's dtype: gate and up [E, f, d], down
    [E, d, f]. The CPU kernel reads each chosen expert's weights once for all its tokens;
    so does the CUDA kernel (bfloat16), which reads nothing on the host: a CUDA graph may
    hold it, and a token with an id outside [0, E) gets NaN outputs there instead of the
    ValueError the other backends raise. Elsewhere torch's products run (unmask.experts).
    Each kernel takes every call it supports, however many tokens share it, so a token's
    result is the same bits whatever its companions.
    Traced (torch.compile), torch's products run, with a graph break where they read
    the expert counts."""
    call = validation.moe_swiglu_call(x, experts, weights, gate, up, down)
    if _traced(call.x, call.experts, call.weights, call.gate, call.up, call.down):
        return experts_backend.launch(call)
    return dispatch.run("moe_swiglu", call)


# --------------------------------------------------------------------------- raw RNG draws


def philox_draws(
    seed: int,
    rows: int,
    cols: int,
    *,
    row_begin: int = 0,
    offset: int = 0,
    stream: int = 0,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """The native kernels' 32-bit draws w[r, c] (row id row_begin + r) as int64 [rows, cols].
    stream: 0 (Gumbel noise) or 1 (random confidences), the two the kernels draw."""
    validation.check_seed(seed)
    for name, value, high in (("rows", rows, None), ("cols", cols, None), ("row_begin", row_begin, 2**32),
                              ("offset", offset, 2**32), ("stream", stream, 2)):
        validation.check_int(name, value, low=0, high=high)
    return native.fill_draws(seed, rows, cols, row_begin=row_begin, offset=offset, stream=stream,
                             device=torch.device(device))


def philox_blocks(counters: torch.Tensor, key0: int, key1: int) -> torch.Tensor:
    """The C++ header's plain philox4x32_10 over counters [n, 4] (int64 words) -> [n, 4] words."""
    validation.check_tensor("counters", counters, dtypes=("int64",), ndim=2)
    if counters.shape[1] != 4:
        raise ValueError(f"counters must be [n, 4], got shape {tuple(counters.shape)}")
    validation.check_int("key0", key0, low=0, high=2**32)
    validation.check_int("key1", key1, low=0, high=2**32)
    return native.philox_blocks(counters, key0, key1)
