"""The specification of unmask's kernels, in plain PyTorch: the three of a denoising
step (attention, sample, commit), the model's pointwise ones (rms_norm, rotary) and a
mixture's routed experts (moe_swiglu).

Readable before fast: every C++, CUDA and Pallas kernel is tested against these
functions (docs/design.md, Contracts). They take already-validated arguments; the public
entry points in unmask.ops validate and then dispatch here or to a native kernel.

Precision: attention computes in float32 (float64 for float64 inputs), so a test
that wants a high-precision answer passes float64 tensors. sample computes the
filters and confidences in float64 from the float32 value of each logit, and the
Gumbel noise in float64 from the exact uniform of rng.py. rms_norm and rotary compute
in float32 (float64 for float64 inputs) and return x's dtype; moe_swiglu computes and
returns float32 (float64 for float64 inputs).
"""

from __future__ import annotations

import math

import torch

from unmask import rng, validation
from unmask.validation import CONFIDENCE_KINDS


# --------------------------------------------------------------------------- attention


def visibility(
    batch: int,
    q_len: int,
    k_len: int,
    *,
    kv_len: torch.Tensor | None = None,
    key_valid: torch.Tensor | None = None,
    block_size: int | None = None,
    q_offset: int = 0,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """visible[b, i, j]: may query i of batch b see key j? Bool [B, Lq, Lk]."""
    keys = torch.arange(k_len, device=device)
    visible = torch.ones(batch, q_len, k_len, dtype=torch.bool, device=device)
    if kv_len is not None:
        visible &= (keys[None, :] < kv_len.to(device)[:, None])[:, None, :]
    if key_valid is not None:
        visible &= key_valid.to(device=device, dtype=torch.bool)[:, None, :]
    if block_size is not None:
        query_pos = q_offset + torch.arange(q_len, device=device)
        # Block diffusion: a query sees every key of its own block and of earlier ones.
        visible &= ((keys[None, :] // block_size) <= (query_pos[:, None] // block_size))[None]
    return visible


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
    """Masked bidirectional attention. q [B, Lq, Hq, D], k and v [B, Lk, Hkv, D] -> [B, Lq, Hq, D].

    Query head h reads key/value head h // (Hq // Hkv) (GQA). A query that sees no
    key gets zeros.
    """
    batch, q_len, q_heads, head_dim = q.shape
    k_len, kv_heads = k.shape[1], k.shape[2]
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale

    group = q_heads // kv_heads
    k = k.to(compute).repeat_interleave(group, dim=2)
    v = v.to(compute).repeat_interleave(group, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.to(compute), k) * scale

    visible = visibility(
        batch, q_len, k_len, kv_len=kv_len, key_valid=key_valid,
        block_size=block_size, q_offset=q_offset, device=q.device,
    )[:, None]  # broadcast over heads
    scores = scores.masked_fill(~visible, float("-inf"))
    sees_a_key = visible.any(dim=-1, keepdim=True)
    probs = torch.where(sees_a_key, torch.softmax(scores, dim=-1), 0.0)
    return _weighted_values(probs, v, visible.expand_as(probs)).to(q.dtype)


def _weighted_values(probs: torch.Tensor, v: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """probs [B, H, Lq, Lk] times v [B, Lk, H, D], each query meeting only the keys it sees:
    a hidden key's weight is 0, but 0 times an inf or NaN in V is NaN, and a hidden key
    must not reach the output at all (docs/design.md, attention). The finite part is the
    plain product with V's non-finite entries zeroed; the rest follows IEEE arithmetic
    over the keys each query sees, counted with 0/1 products: a query that sees a NaN, an
    infinity with weight 0, or infinities of both signs gets NaN; one that sees
    infinities of one sign gets that infinity. On a device the three counts always run
    (skipping them where V is finite would cost a sync): the reference is the CUDA
    fallback of float32 block-causal calls, and of every gradient (unmask.ops)."""
    finite = torch.isfinite(v)
    out = torch.einsum("bhqk,bkhd->bqhd", probs, torch.where(finite, v, 0.0))
    # read for free on the CPU (on a device: a sync); never while torch.compile traces (the
    # gradient of a compiled attention runs this), where the value is the graph's data
    if v.device.type == "cpu" and not torch.compiler.is_compiling() and bool(finite.all()):
        return out
    seen, weighted = visible.to(v.dtype), (visible & (probs > 0)).to(v.dtype)

    def count(rows, where):
        return torch.einsum("bhqk,bkhd->bqhd", rows, where.to(v.dtype))

    positive, negative = count(weighted, v == float("inf")), count(weighted, v == -float("inf"))
    nan = count(seen, ~finite) > positive + negative  # NaNs or 0 x inf among what is seen
    extra = torch.where(nan | ((positive > 0) & (negative > 0)), float("nan"),
                        torch.where(positive > 0, float("inf"), torch.where(negative > 0, -float("inf"), 0.0)))
    return out + extra


# --------------------------------------------------------------------------- sample


def keep_top_k(x: torch.Tensor, top_k: int) -> torch.Tensor:
    """Bool [N, V]: the top_k largest entries of each row, ties to the lower id."""
    vocab = x.shape[-1]
    if top_k <= 0 or top_k >= vocab:
        return torch.ones_like(x, dtype=torch.bool)
    # A stable descending sort keeps equal values in id order, so ties go to the lower id.
    order = torch.sort(x, dim=-1, descending=True, stable=True).indices
    keep = torch.zeros_like(x, dtype=torch.bool)
    return keep.scatter(-1, order[:, :top_k], True)


def keep_top_p(x: torch.Tensor, top_p: float, temperature: float = 1.0) -> torch.Tensor:
    """Bool [N, V]: the smallest most-likely set whose mass under softmax(x / temperature)
    reaches top_p (the distribution tokens are drawn from, as transformers, vLLM and Dream
    measure the nucleus).

    x holds -inf where earlier filters removed a token. A token is kept when the mass
    of the tokens ranked before it is still below top_p, so the most likely token is
    always kept and the last kept token is the one that crosses top_p.
    """
    if top_p >= 1.0:
        return torch.ones_like(x, dtype=torch.bool)
    probs = torch.softmax(x.double() / temperature, dim=-1)
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    keep_sorted = mass_before < top_p
    keep_sorted[:, 0] = True
    keep = torch.zeros_like(x, dtype=torch.bool)
    return keep.scatter(-1, order, keep_sorted)


def confidence_of(
    kept: torch.Tensor,
    tokens: torch.Tensor,
    kind: str,
    conf_temperature: float,
    *,
    seed: int,
    offset: int | torch.Tensor,
    row_ids: torch.Tensor,
) -> torch.Tensor:
    """Float64 confidence per row of the kept logits (-inf where removed)."""
    if kind == "random":
        return rng.random_confidence(seed, row_ids, offset=offset)
    probs = torch.softmax(kept.double() / conf_temperature, dim=-1)
    if kind == "prob":
        return probs.gather(-1, tokens.clamp(min=0)[:, None]).squeeze(-1)
    if kind == "margin":
        top2 = probs.topk(min(2, probs.shape[-1]), dim=-1).values
        second = top2[:, 1] if top2.shape[-1] > 1 else torch.zeros_like(top2[:, 0])
        return top2[:, 0] - second
    if kind == "entropy":
        # sum p log p (negative entropy, higher is more confident), with 0 log 0 = 0.
        return torch.where(probs > 0, probs * torch.log(probs), 0.0).sum(dim=-1)
    raise ValueError(f"confidence must be one of {CONFIDENCE_KINDS}, got {kind!r}")


def banned_and_invalid(logits: torch.Tensor, banned: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The float32 value of each logit in float64, with banned columns and NaN / +inf at
    -inf, and bad: where a NaN or +inf stood outside the banned columns (the row is invalid)."""
    x = logits.float().double()
    if banned is not None and banned.numel() > 0:
        x[:, banned] = float("-inf")
    bad = torch.isnan(x) | torch.isposinf(x)
    return x.masked_fill(bad, float("-inf")), bad


def sample(
    logits: torch.Tensor,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    banned: torch.Tensor | None = None,
    confidence: str = "prob",
    conf_temperature: float = 1.0,
    seed: int = 0,
    offset: int | torch.Tensor = 0,
    rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token and its confidence per row of logits [..., V]. offset: an int, a 0-d int
    tensor (the step counter of a captured step) or one offset per row (logits.shape[:-1]).

    Returns tokens (int64) and conf (float32) of shape logits.shape[:-1]. Rows not in
    `rows` (ids in it outside [0, N) are skipped), and rows with no finite kept logit or with a NaN or +inf kept logit, get
    token -1 and conf -inf. The RNG row id of a row is its index in the flattened
    leading dimensions.
    """
    lead_shape, vocab = logits.shape[:-1], logits.shape[-1]
    flat = logits.reshape(-1, vocab)
    device = logits.device
    row_ids = torch.arange(flat.shape[0], device=device) if rows is None else rows.to(device).reshape(-1)
    if rows is not None:  # ids outside [0, N) are skipped, as the kernels skip them
        row_ids = row_ids[(row_ids >= 0) & (row_ids < flat.shape[0])]

    if isinstance(offset, torch.Tensor) and offset.dim() > 0:  # one offset per row
        offset = offset.reshape(-1).to(device)[row_ids]
    x, bad = banned_and_invalid(flat[row_ids], None if banned is None else banned.to(device))

    x = x.masked_fill(~keep_top_k(x, top_k), float("-inf"))
    # Greedy rows measure the nucleus at temperature 1 (it only shapes their confidence).
    x = x.masked_fill(~keep_top_p(x, top_p, temperature if temperature > 0 else 1.0), float("-inf"))

    if temperature == 0.0:
        scores = x
    else:
        scores = x / temperature + rng.gumbel(seed, row_ids, vocab, offset=offset).to(device)
    tokens = scores.argmax(dim=-1)  # first maximum: ties go to the lower id
    conf = confidence_of(x, tokens, confidence, conf_temperature, seed=seed, offset=offset, row_ids=row_ids)

    invalid = bad.any(dim=-1) | ~torch.isfinite(x).any(dim=-1)
    tokens = tokens.masked_fill(invalid, -1)
    conf = conf.masked_fill(invalid, float("-inf"))

    all_tokens = torch.full((flat.shape[0],), -1, dtype=torch.int64, device=device)
    all_conf = torch.full((flat.shape[0],), float("-inf"), dtype=torch.float32, device=device)
    all_tokens[row_ids] = tokens
    all_conf[row_ids] = conf.float()
    return all_tokens.reshape(lead_shape), all_conf.reshape(lead_shape)


# --------------------------------------------------------------------------- commit


def ranking_confidence(conf: torch.Tensor) -> torch.Tensor:
    """conf in float64 with NaN ranked as -inf: a NaN confidence is never preferred."""
    conf = conf.double()
    return conf.masked_fill(torch.isnan(conf), float("-inf"))


def rank_by_confidence(conf: torch.Tensor, eligible: torch.Tensor) -> torch.Tensor:
    """rank[b, j]: 0 for the best eligible position of row b, then 1, ...; ineligible last.

    Best means highest conf, ties to the lower position: a stable descending sort by
    conf, then a stable sort that moves the eligible positions first.
    """
    by_conf = torch.sort(ranking_confidence(conf), dim=-1, descending=True, stable=True).indices
    eligible_first = torch.sort((~eligible.gather(-1, by_conf)).to(torch.uint8), dim=-1, stable=True).indices
    order = by_conf.gather(-1, eligible_first)
    positions = torch.arange(conf.shape[-1], device=conf.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, positions)


def commit_counts(
    conf: torch.Tensor,
    eligible: torch.Tensor,
    *,
    k: torch.Tensor | None = None,
    threshold: float | None = None,
    factor: float | None = None,
) -> torch.Tensor:
    """How many positions each row commits (int64 [B]): k alone, the k most confident
    (none for a negative k); threshold, those above it, and at least min(k, eligible)
    with k given (SDAR's and LLaDA 2.0's rule: a step's planned count, or more where
    more pass), else at least one; factor, the factor rule's prefix, at least one."""
    n_eligible = eligible.sum(dim=-1)
    floor = None if k is None else torch.minimum(k.to(n_eligible.device, torch.int64).clamp(min=0), n_eligible)
    if k is not None and threshold is None:
        return floor
    conf = ranking_confidence(conf)
    ranked = torch.sort(torch.where(eligible, conf, float("-inf")), dim=-1, descending=True).values
    at_least_one = (n_eligible > 0).to(torch.int64)
    if threshold is not None:
        passing = (eligible & (conf > threshold)).sum(dim=-1)
        return torch.maximum(passing, at_least_one if floor is None else floor)
    # Factor rule: (n + 1) * (1 - c_n) grows with n, so the n that satisfy it form a prefix.
    n = torch.arange(1, conf.shape[-1] + 1, device=conf.device, dtype=torch.float64)
    passes = ((n + 1) * (1 - ranked) < factor) & (n <= n_eligible[:, None])
    return torch.maximum(passes.sum(dim=-1), at_least_one)


def commit(
    x: torch.Tensor,
    tokens: torch.Tensor,
    conf: torch.Tensor,
    eligible: torch.Tensor,
    *,
    k: torch.Tensor | None = None,
    threshold: float | None = None,
    factor: float | None = None,
) -> torch.Tensor:
    """Confidence-based unmasking of the canvas x [B, L], in place; returns committed [B, L]."""
    counts = commit_counts(conf, eligible, k=k, threshold=threshold, factor=factor)
    committed = (rank_by_confidence(conf, eligible) < counts[:, None]) & eligible
    x.copy_(torch.where(committed, tokens.to(x.dtype), x))  # no boolean index: nothing synchronises
    return committed


# --------------------------------------------------------------------------- the model's pointwise kernels


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2 over the last dim) + eps) * weight, computed in float32: bf16
    sums of squares lose the small components."""
    wide = x.to(_compute_dtype(x))
    wide = wide * torch.rsqrt(wide.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (wide * weight.to(wide.dtype)).to(x.dtype)


def moe_swiglu(x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor, gate: torch.Tensor,
               up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """The routed sum of a mixture of SwiGLU experts, in float32 (float64 for float64 x):
    out[t] = sum over j, in j order, of weights[t, j] * down_e(silu(gate_e x[t]) * up_e x[t])
    for e = experts[t, j]; gate, up [E, f, d] and down [E, d, f] stacked [out, in]."""
    wide = _compute_dtype(x)
    if experts.numel():
        validation.check_expert_ids(int(experts.min()), int(experts.max()), gate.shape[0])
    xs = x.to(wide)
    each = torch.zeros(*experts.shape, x.shape[1], dtype=wide, device=x.device)  # [T, k, d]: each choice's output
    for expert in experts.unique().tolist():
        token, choice = (experts == expert).nonzero(as_tuple=True)
        rows = xs[token]
        hidden = torch.nn.functional.silu(rows @ gate[expert].to(wide).T) * (rows @ up[expert].to(wide).T)
        each[token, choice] = hidden @ down[expert].to(wide).T
    out = torch.zeros(x.shape, dtype=wide, device=x.device)
    for j in range(experts.shape[1]):
        out = out + weights[:, j, None].to(wide) * each[:, j]
    return out


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embeddings, rotate-half form: x [B, L, H, D] times cos plus its
    halves swapped (the first negated) times sin; cos and sin [1 or B, L, 1, D]."""
    half = x.shape[-1] // 2
    wide = x.to(_compute_dtype(x))
    rotated = torch.cat([-wide[..., half:], wide[..., :half]], dim=-1)
    return (wide * cos + rotated * sin).to(x.dtype)
