"""Native kernels as unmask.ops implementations: tensors in, pointers to unmask._C out.

Each adapter has the reference's signature, takes arguments unmask.ops has already
validated, and registers itself in ops.NATIVE_KERNELS for the device it serves.
"""

from __future__ import annotations

import torch

from unmask import ops

_C = ops._C

SCALAR_TYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
CONFIDENCE_KINDS = {"prob": 0, "margin": 1, "entropy": 2, "random": 3}
COMMIT_MODES = {"k": 0, "threshold": 1, "factor": 2}


def _address(tensor: torch.Tensor | None) -> int:
    return 0 if tensor is None else tensor.data_ptr()


def sample_cpu(logits, *, temperature, top_k, top_p, banned, confidence, conf_temperature, seed, offset, rows,
               out=None):
    """out: optional (tokens int64 [N], conf float32 [N]) to write into (tests poison them)."""
    lead_shape, vocab = logits.shape[:-1], logits.shape[-1]
    flat = logits.reshape(-1, vocab).contiguous()
    n_rows = flat.shape[0]
    if out is None:
        out = (torch.empty(n_rows, dtype=torch.int64), torch.empty(n_rows, dtype=torch.float32))
    tokens, conf = out
    banned = None if banned is None else torch.unique(banned.to(torch.int64)).contiguous()  # sorted, unique
    rows = None if rows is None else rows.to(torch.int64).contiguous()
    _C.sample_cpu(
        flat.data_ptr(), SCALAR_TYPES[flat.dtype], n_rows, vocab, _address(rows),
        0 if rows is None else rows.numel(), _address(banned), 0 if banned is None else banned.numel(),
        temperature, top_k, top_p, CONFIDENCE_KINDS[confidence], conf_temperature, seed, offset,
        tokens.data_ptr(), conf.data_ptr(),
    )
    return tokens.reshape(lead_shape), conf.reshape(lead_shape)


def _commit_arguments(x, tokens, conf, eligible, k, threshold, factor, out):
    """The committed output and the pointer arguments shared by the CPU and CUDA commit kernels."""
    batch, length = x.shape
    committed = torch.empty(batch, length, dtype=torch.bool, device=x.device) if out is None else out
    tokens = tokens.to(torch.int64).contiguous()
    conf = conf.to(torch.float32).contiguous()
    eligible = eligible.contiguous()
    counts = None if k is None else k.to(torch.int64).contiguous()
    mode = "k" if k is not None else "threshold" if threshold is not None else "factor"
    keep_alive = (tokens, conf, eligible, counts)  # the pointers below point into these
    arguments = (x.data_ptr(), tokens.data_ptr(), conf.data_ptr(), eligible.data_ptr(), committed.data_ptr(), batch,
                 length, COMMIT_MODES[mode], _address(counts), threshold or 0.0, factor or 0.0)
    return committed, arguments, keep_alive


def _commit_on_reference(x, tokens, conf, eligible, k, threshold, factor, max_length=None):
    """The kernels write an int64, contiguous canvas in place (CUDA: rows up to max_length);
    anything else takes the reference."""
    if x.dtype == torch.int64 and x.is_contiguous() and (max_length is None or x.shape[1] <= max_length):
        return None
    from unmask import reference

    return reference.commit(x, tokens, conf, eligible, k=k, threshold=threshold, factor=factor)


def commit_cpu(x, tokens, conf, eligible, *, k=None, threshold=None, factor=None, out=None):
    """out: optional bool [B, L] to write the committed mask into (tests poison it)."""
    fallback = _commit_on_reference(x, tokens, conf, eligible, k, threshold, factor)
    if fallback is not None:
        return fallback
    committed, arguments, _keep_alive = _commit_arguments(x, tokens, conf, eligible, k, threshold, factor, out)
    _C.commit_cpu(*arguments)
    return committed


def attention_cpu(q, k, v, *, kv_len, key_valid, block_size, q_offset, scale, out=None):
    """out: optional tensor like q to write into (tests poison it)."""
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out = torch.empty_like(q, memory_format=torch.contiguous_format) if out is None else out
    kv_len = None if kv_len is None else kv_len.to(torch.int64).contiguous()
    key_valid = None if key_valid is None else key_valid.contiguous()
    batch, q_len, q_heads, head_dim = q.shape
    _C.attention_cpu(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), SCALAR_TYPES[q.dtype],
        [batch, q_len, k.shape[1], q_heads, k.shape[2], head_dim],
        list(q.stride()[:3]), list(k.stride()[:3]), list(v.stride()[:3]), list(out.stride()[:3]),
        _address(kv_len), _address(key_valid), block_size or 0, q_offset, scale,
    )
    return out


def _stream(tensor: torch.Tensor) -> int:
    return torch.cuda.current_stream(tensor.device).cuda_stream


def sample_cuda(logits, *, temperature, top_k, top_p, banned, confidence, conf_temperature, seed, offset, rows,
                out=None):
    """The fused CUDA kernel; top_k / top_p are not fused on CUDA yet and take the reference."""
    if (0 < top_k < logits.shape[-1]) or top_p < 1.0:
        from unmask import reference

        return reference.sample(logits, temperature=temperature, top_k=top_k, top_p=top_p, banned=banned,
                                confidence=confidence, conf_temperature=conf_temperature, seed=seed, offset=offset,
                                rows=rows)
    lead_shape, vocab = logits.shape[:-1], logits.shape[-1]
    flat = logits.reshape(-1, vocab).contiguous()
    n_rows, device = flat.shape[0], flat.device
    if out is None:
        out = (torch.empty(n_rows, dtype=torch.int64, device=device), torch.empty(n_rows, dtype=torch.float32, device=device))
    tokens, conf = out
    banned = None if banned is None else torch.unique(banned.to(torch.int64)).contiguous()
    rows = None if rows is None else rows.to(torch.int64).contiguous()
    work = n_rows if rows is None else rows.numel()
    workspace = torch.empty(max(1, _C.sample_cuda_workspace_bytes(work, vocab)), dtype=torch.uint8, device=device)
    _C.sample_cuda(
        flat.data_ptr(), SCALAR_TYPES[flat.dtype], n_rows, vocab, _address(rows), 0 if rows is None else rows.numel(),
        _address(banned), 0 if banned is None else banned.numel(), temperature, conf_temperature,
        CONFIDENCE_KINDS[confidence], seed, offset, 0, 0, workspace.data_ptr(), workspace.numel(),
        tokens.data_ptr(), conf.data_ptr(), _stream(flat),
    )
    return tokens.reshape(lead_shape), conf.reshape(lead_shape)


def commit_cuda(x, tokens, conf, eligible, *, k=None, threshold=None, factor=None, out=None):
    fallback = _commit_on_reference(x, tokens, conf, eligible, k, threshold, factor, max_length=4096)
    if fallback is not None:
        return fallback
    committed, arguments, _keep_alive = _commit_arguments(x, tokens, conf, eligible, k, threshold, factor, out)
    _C.commit_cuda(*arguments, _stream(x))
    return committed


CUDA_ATTENTION_HEAD_DIMS = (64, 128)


def _cuda_aligned(t: torch.Tensor) -> bool:
    """The CUDA attention kernel copies rows in 16-byte pieces: a 16-byte aligned start
    and (batch, position, head) strides that are multiples of 8 elements."""
    return t.data_ptr() % 16 == 0 and t.stride(-1) == 1 and all(s % 8 == 0 for s in t.stride()[:3])


def _aligned_for_cuda(t: torch.Tensor) -> torch.Tensor:
    """t itself where the kernel can read it in place, else a fresh contiguous copy."""
    return t if _cuda_aligned(t) else t.clone(memory_format=torch.contiguous_format)


def _aligned_output(out: torch.Tensor) -> torch.Tensor:
    if not _cuda_aligned(out):
        raise ValueError(f"out must be 16-byte aligned with strides a multiple of 8, got strides {out.stride()}")
    return out


def attention_cuda(q, k, v, *, kv_len, key_valid, block_size, q_offset, scale, out=None):
    """The tensor-core kernel for float16 / bfloat16 with head_dim 64 or 128; float32
    takes the reference. out: optional tensor like q to write into (tests poison it)."""
    head_dim = q.shape[-1]
    if q.dtype == torch.float32:
        from unmask import reference

        result = reference.attention(q, k, v, kv_len=kv_len, key_valid=key_valid, block_size=block_size,
                                     q_offset=q_offset, scale=scale)
        return result if out is None else out.copy_(result)
    if head_dim not in CUDA_ATTENTION_HEAD_DIMS:
        raise NotImplementedError(
            f"head_dim={head_dim} is not supported by the CUDA attention kernel; supported: "
            + ", ".join(str(d) for d in CUDA_ATTENTION_HEAD_DIMS))
    q, k, v = (_aligned_for_cuda(t) for t in (q, k, v))
    out = torch.empty_like(q, memory_format=torch.contiguous_format) if out is None else _aligned_output(out)
    kv_len = None if kv_len is None else kv_len.to(torch.int64).contiguous()
    key_valid = None if key_valid is None else key_valid.contiguous()
    batch, q_len, q_heads, _ = q.shape
    sizes = [batch, q_len, k.shape[1], q_heads, k.shape[2], head_dim]
    with torch.cuda.device(q.device):  # the split count and the launch use the current device
        workspace = torch.empty(max(1, _C.attention_cuda_workspace_bytes(sizes, block_size or 0, q_offset)),
                                dtype=torch.uint8, device=q.device)
        _C.attention_cuda(
            q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), SCALAR_TYPES[q.dtype], sizes,
            list(q.stride()[:3]), list(k.stride()[:3]), list(v.stride()[:3]), list(out.stride()[:3]),
            _address(kv_len), _address(key_valid), block_size or 0, q_offset, scale,
            workspace.data_ptr(), workspace.numel(), _stream(q),
        )
    return out


def register() -> None:
    if _C is None:
        return
    if _C.cuda_compiled():
        ops.NATIVE_KERNELS[("sample", "cuda")] = sample_cuda
        ops.NATIVE_KERNELS[("commit", "cuda")] = commit_cuda
        ops.NATIVE_KERNELS[("attention", "cuda")] = attention_cuda
    ops.NATIVE_KERNELS[("sample", "cpu")] = sample_cpu
    ops.NATIVE_KERNELS[("commit", "cpu")] = commit_cpu
    ops.NATIVE_KERNELS[("attention", "cpu")] = attention_cpu
