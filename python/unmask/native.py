"""The native kernels of unmask._C as backends of the kernel table (unmask.dispatch).

Each backend takes a checked call (unmask.validation), fills the bound params struct of
unmask._C field by field and launches. None falls back on its own: its `supports(call)`
states every case the kernel takes and returns, for any other, the reason it does not,
and unmask.dispatch sends that call to the reference. This is the only module that
turns tensors into pointers.

The CPU kernels are compiled once per instruction set (amx, avx512, avx2, portable); the
best this CPU runs is chosen at import, UNMASK_ISA=avx512|avx2|portable forces a lower one,
and use_cpu_isa() changes it at run time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import os
import types
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
import torch.autograd.forward_ad as _forward_ad

from unmask import validation
from unmask.validation import AttentionCall, CommitCall, MoeCall, RmsNormCall, RotaryCall, SampleCall

try:
    from unmask import _C
except ImportError:  # a source tree that was never built: the reference still works
    _C = None


def available() -> bool:
    return _C is not None


# --------------------------------------------------------------------------- a stale build

SOURCE_SUFFIXES = (".h", ".cpp", ".cu", ".cuh")


def source_tree_hash(csrc: Path) -> str:
    """The SHA-256 cmake/source_hash.cmake builds into unmask._C: of a listing of csrc's
    sources, each path (relative, '/'-separated) and its own SHA-256, in byte order."""
    files = sorted(p.relative_to(csrc).as_posix() for p in csrc.rglob("*")
                   if p.suffix in SOURCE_SUFFIXES and p.is_file())
    listing = "".join(f"{name} {hashlib.sha256((csrc / name).read_bytes()).hexdigest()}\n" for name in files)
    return hashlib.sha256(listing.encode()).hexdigest()


def stale_build() -> str | None:
    """Why unmask._C does not match the C++ sources beside it, or None: it matches, or
    there are no sources (an installed wheel) or no module. An editable install whose
    extension was not rebuilt after its C++ changed would run the old kernels against
    the new Python, silently."""
    csrc = Path(__file__).resolve().parents[2] / "csrc"
    if _C is None or not (csrc / "bindings.cpp").is_file():
        return None
    built = _C.source_hash() if hasattr(_C, "source_hash") else None
    if built == source_tree_hash(csrc):
        return None
    return (f"unmask._C was built from other C++ sources than {csrc} holds; rebuild it "
            f"(pip install --no-build-isolation --no-deps -e .)")


if (_stale := stale_build()) is not None:
    warnings.warn(_stale, RuntimeWarning, stacklevel=2)


def require_extension() -> None:
    if _C is None:
        raise RuntimeError("unmask._C is not built: install the package (pip install .)")


# --------------------------------------------------------------------------- CPU instruction sets


def cpu_isas() -> list[str]:
    """The instruction-set builds of the CPU kernels compiled in, best first."""
    return list(_C.cpu_isas()) if _C is not None else []


def runnable_cpu_isas() -> list[str]:
    """Those this CPU runs, best first."""
    return [isa for isa in cpu_isas() if _C.cpu_isa_supported(isa)]


@functools.cache
def cpu_vendor() -> str:
    """CPUID's vendor string: 'GenuineIntel', 'AuthenticAMD', ... ('' off x86-64 or
    without the extension)."""
    return _C.cpu_vendor() if _C is not None else ""


@functools.cache
def cpu_has_amx() -> bool:
    """Whether this CPU has AMX (the amx build runs here), whichever build runs now: torch's
    own kernels (oneDNN) multiply half precision on its tiles whatever UNMASK_ISA says."""
    return "amx" in runnable_cpu_isas()


def cpu_isa() -> str | None:
    """The build the CPU kernels run now (None without the extension)."""
    return _C.cpu_isa() if _C is not None else None


def use_cpu_isa(name: str) -> None:
    """Run the CPU kernels of build `name` from now on (ValueError naming the choices
    when it is not compiled in or this CPU lacks it)."""
    require_extension()
    if not isinstance(name, str):
        raise TypeError(f"isa must be a str, got {type(name).__name__}")
    _C.select_cpu_isa(name)


@contextlib.contextmanager
def cpu_isa_forced(name: str):
    """Run the CPU kernels of build `name` inside the block (tests run under each)."""
    previous = cpu_isa()
    use_cpu_isa(name)
    try:
        yield
    finally:
        use_cpu_isa(previous)


def _apply_isa_environment() -> None:
    forced = os.environ.get("UNMASK_ISA", "")
    if forced and _C is not None:
        try:
            use_cpu_isa(forced)
        except ValueError as error:
            raise ValueError(f"UNMASK_ISA={forced}: {error}") from None


_apply_isa_environment()


# --------------------------------------------------------------------------- the backends


@dataclasses.dataclass(frozen=True)
class NativeKernel:
    """One (kernel, device type) entry of the kernel table."""

    kernel: str
    device_type: str
    launch: Callable  # launch(call, out=None) -> the kernel's result
    supports: Callable[[object], str | None]  # None when it takes the call, else why not
    guard: Callable[[object], contextlib.AbstractContextManager]  # makes the call's device current
    label: str | None = None  # the name, where it is not the device's
    # prepare(call) -> a launch for later calls of the same signature (unmask.dispatch,
    # plans): it takes the op's tensor arguments in order, or None where the call is not
    # one it prepares for
    prepare: Callable[[object], Callable | None] | None = None

    @property
    def name(self) -> str:
        """'cpu:avx512' (the instruction set running now), 'cuda' or 'cuda-interpreter'."""
        if self.label is not None:
            return self.label
        return f"cpu:{cpu_isa()}" if self.device_type == "cpu" else self.device_type

    def __call__(self, call, out=None):
        if self.guard is _no_guard:  # the CPU: no context to enter (a small call's microsecond)
            return self.launch(call, out=out)
        with self.guard(call):
            return self.launch(call, out=out)


def _no_guard(call) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


def _cuda_guard(call) -> contextlib.AbstractContextManager:
    """The call's GPU made current: workspaces, the SM count and the launch use it."""
    return torch.cuda.device(call.device)


def _params(cls, **fields):
    """A bound params struct with every field of cls.FIELDS set by name (its keyword
    constructor raises TypeError naming any missing or unknown field)."""
    return cls(**fields)


def _address(tensor: torch.Tensor | None) -> int:
    return 0 if tensor is None else tensor.data_ptr()


@functools.cache
def _scalar_type(dtype: torch.dtype):
    return getattr(_C.ScalarType, str(dtype).removeprefix("torch."))


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def _buffers(**tensors) -> list[tuple[int, int, str]]:
    """(address, bytes, name) of each tensor's elements, first to last as laid out by its
    strides: the memory an interpreted launch may touch. (A GPU would let a kernel read the
    rest of the storage too; a kernel that does is reading what its caller never gave it.)"""
    found = []
    for name, tensor in tensors.items():
        if tensor is not None and tensor.numel() > 0:
            last = sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride()))
            found.append((tensor.data_ptr(), (last + 1) * tensor.element_size(), name))
    return found


# --------------------------------------------------------------------------- sample


def _sample_params(call: SampleCall, flat: torch.Tensor, rows, banned, offsets, tokens: torch.Tensor,
                   conf: torch.Tensor):
    """offsets: the offset tensor as contiguous int64 (one value, or one per row), read by
    the kernels; None when the offset is an int."""
    options = call.options
    return _params(
        _C.SampleParams, logits=flat.data_ptr(), dtype=_scalar_type(flat.dtype), n_rows=flat.shape[0],
        vocab=flat.shape[1], select_rows=rows is not None, rows=_address(rows),
        n_selected=0 if rows is None else rows.numel(), banned=_address(banned),
        n_banned=0 if banned is None else banned.numel(), temperature=options.temperature, top_k=options.top_k,
        top_p=options.top_p, confidence=getattr(_C.ConfidenceKind, options.confidence),
        conf_temperature=options.conf_temperature, seed=options.seed,
        offset=0 if offsets is not None else options.offset, offsets=_address(offsets),
        offsets_stride=0 if offsets is None or offsets.dim() == 0 else 1,
        tokens=tokens.data_ptr(), conf=conf.data_ptr(),
    )


def _sample_outputs(call: SampleCall, out):
    """out: optional (tokens int64 [N], conf float32 [N]) to write into (tests poison them)."""
    if out is not None:
        return out
    n_rows, device = call.n_rows, call.device
    return (torch.empty(n_rows, dtype=torch.int64, device=device),
            torch.empty(n_rows, dtype=torch.float32, device=device))


def _index_tensors(call: SampleCall):
    """rows, banned and an offset tensor as contiguous int64 (the offsets flattened to one
    per row), a no-op for unmask.ops.sample's; a direct call of torch.ops.unmask.sample may
    pass int32, which the kernels would misread."""
    offset = call.options.offset if isinstance(call.options.offset, torch.Tensor) else None
    if offset is not None and offset.dim() > 0:
        offset = offset.reshape(-1)
    return tuple(None if t is None else validation.contiguous_as(t, torch.int64)
                 for t in (call.rows, call.banned, offset))


def _launch_sample_cpu(call: SampleCall, out=None):
    flat = call.logits.reshape(-1, call.vocab).contiguous()
    tokens, conf = _sample_outputs(call, out)
    rows, banned, offsets = _index_tensors(call)
    _C.sample_cpu(_sample_params(call, flat, rows, banned, offsets, tokens, conf))
    lead = call.logits.shape[:-1]
    return tokens.reshape(lead), conf.reshape(lead)


def _launch_sample_cuda(call: SampleCall, out=None, *, interpret: bool = False):
    """interpret: run the CUDA kernels under the SIMT interpreter, on CPU tensors."""
    flat = call.logits.reshape(-1, call.vocab).contiguous()
    tokens, conf = _sample_outputs(call, out)
    rows, banned, offsets = _index_tensors(call)
    params = _sample_params(call, flat, rows, banned, offsets, tokens, conf)
    workspace_bytes = (_C.sample_cuda_interpret_workspace_bytes if interpret else _C.sample_cuda_workspace_bytes)(params)
    workspace = torch.empty(max(1, workspace_bytes), dtype=torch.uint8, device=call.device)
    extras = _params(_C.SampleCudaExtras, workspace=workspace.data_ptr(), workspace_bytes=workspace.numel())
    if interpret:
        _C.sample_cuda_interpret(params, extras=extras, buffers=_buffers(
            logits=flat, rows=rows, banned=banned, offsets=offsets, tokens=tokens, conf=conf, workspace=workspace))
    else:
        _C.sample_cuda(params, extras=extras, stream=_stream(call.device))
    lead = call.logits.shape[:-1]
    return tokens.reshape(lead), conf.reshape(lead)


def _supports_sample_cpu(call: SampleCall) -> str | None:
    return None  # every dtype, filter and confidence; non-contiguous logits are copied


def _supports_sample_cuda(call: SampleCall) -> str | None:
    if 0 < call.options.top_k < call.vocab:
        return "top_k is not fused into the CUDA sampler yet"
    if call.options.top_p < 1.0:
        return "top_p is not fused into the CUDA sampler yet"
    if call.vocab >= 2**31:
        return f"vocabulary of {call.vocab} ids: the CUDA sampler indexes a row with int32"
    return None


# --------------------------------------------------------------------------- commit


def _launch_commit(call: CommitCall, out=None, *, cuda: bool, interpret: bool = False):
    """out: optional bool [B, L] to write the committed mask into (tests poison it)."""
    x = call.x
    batch, length = x.shape
    # The kernels write an int64 contiguous canvas in place; any other canvas goes
    # through such a copy (a block of a few hundred ids) and is written back.
    canvas = validation.contiguous_as(x, torch.int64)
    committed = torch.empty(batch, length, dtype=torch.bool, device=x.device) if out is None else out
    tokens = validation.contiguous_as(call.tokens, torch.int64)
    if tokens.untyped_storage().data_ptr() == canvas.untyped_storage().data_ptr():
        tokens = tokens.clone()  # read from the memory the kernel writes: the values before the commit
    # float64 confidences rank as they are on the CPU (rounding them to float32 would tie
    # what the reference tells apart); the CUDA kernel's supports() sends them elsewhere.
    wide = call.conf.dtype == torch.float64 and not cuda
    conf = validation.contiguous_as(call.conf, torch.float64 if wide else torch.float32)
    eligible = call.eligible.contiguous()
    counts = None if call.k is None else validation.contiguous_as(call.k, torch.int64)
    params = _params(
        _C.CommitParams, canvas=canvas.data_ptr(), tokens=tokens.data_ptr(), conf=0 if wide else conf.data_ptr(),
        conf_f64=conf.data_ptr() if wide else 0,
        eligible=eligible.data_ptr(), committed=committed.data_ptr(), batch=batch, length=length,
        mode=getattr(_C.CommitMode, call.mode), k=_address(counts), threshold=call.threshold or 0.0,
        factor=call.factor or 0.0,
    )
    if interpret:
        _C.commit_cuda_interpret(params, buffers=_buffers(canvas=canvas, tokens=tokens, conf=conf, eligible=eligible,
                                                          committed=committed, k=counts))
    elif cuda:
        _C.commit_cuda(params, stream=_stream(x.device))
    else:
        _C.commit_cpu(params)
    if canvas is not x:
        x.copy_(canvas)
    return committed


def _supports_commit_cpu(call: CommitCall) -> str | None:
    return None  # any canvas dtype and layout (through an int64 copy), any row length


def _supports_commit_cuda(call: CommitCall) -> str | None:
    if call.conf.dtype == torch.float64:
        return "float64 confidences: the CUDA kernel ranks float32 ones (rounding them would tie what float64 tells apart)"
    if call.x.shape[1] > CUDA_COMMIT_MAX_LENGTH:
        return (f"rows of {call.x.shape[1]} positions: the CUDA kernel keeps a row in shared memory "
                f"(<= {CUDA_COMMIT_MAX_LENGTH})")
    if call.x.shape[0] >= 2**31:
        return f"{call.x.shape[0]} rows: the CUDA kernel launches one block per row (gridDim.x < 2^31)"
    return None


CUDA_COMMIT_MAX_LENGTH = 4096


# --------------------------------------------------------------------------- attention


def _attention_params(call: AttentionCall, q, k, v, out, kv_len, key_valid):
    shape = call.shape
    return _params(
        _C.AttentionParams, q=q.data_ptr(), k=k.data_ptr(), v=v.data_ptr(), out=out.data_ptr(),
        dtype=_scalar_type(q.dtype), batch=shape.batch, q_len=shape.q_len, k_len=shape.k_len,
        q_heads=shape.q_heads, kv_heads=shape.kv_heads, head_dim=shape.head_dim, q_stride=list(q.stride()[:3]),
        k_stride=list(k.stride()[:3]), v_stride=list(v.stride()[:3]), out_stride=list(out.stride()[:3]),
        kv_len=_address(kv_len), key_valid=_address(key_valid), block_size=call.block_size or 0,
        q_offset=call.q_offset, scale=call.scale,
    )


def _mask_tensors(call: AttentionCall):
    kv_len = None if call.kv_len is None else validation.contiguous_as(call.kv_len, torch.int64)
    key_valid = None if call.key_valid is None else call.key_valid.contiguous()
    return kv_len, key_valid


def _launch_attention_cpu(call: AttentionCall, out=None):
    """out: optional tensor like q to write into (tests poison it)."""
    q, k, v = call.q, call.k, call.v
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out = torch.empty_like(q, memory_format=torch.contiguous_format) if out is None else out
    kv_len, key_valid = _mask_tensors(call)
    _C.attention_cpu(_attention_params(call, q, k, v, out, kv_len, key_valid))
    return out


def _prepare_attention_cpu(call: AttentionCall) -> Callable | None:
    """A launch for calls of this signature with no copy to make: the params struct is
    built here once, and each call sets only its addresses (the struct took ~6 us of a
    small call's ~25 us route)."""
    q, k, v, kv_len, key_valid = call.q, call.k, call.v, call.kv_len, call.key_valid
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        return None
    if kv_len is not None and (kv_len.dtype != torch.int64 or not kv_len.is_contiguous()):
        return None
    if key_valid is not None and not key_valid.is_contiguous():
        return None
    template = _attention_params(call, q, k, v, torch.empty_like(q, memory_format=torch.contiguous_format), kv_len,
                                 key_valid)

    def launch(q, k, v, kv_len, key_valid):
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
        params = template.copy()
        params.q, params.k, params.v, params.out = q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr()
        params.kv_len, params.key_valid = _address(kv_len), _address(key_valid)
        _C.attention_cpu(params)
        return out

    return launch


CPU_ATTENTION_MAX_HEAD_DIM = 1024  # the per-task tiles of csrc/cpu/attention.cpp


def _supports_attention_cpu(call: AttentionCall) -> str | None:
    if call.shape.head_dim > CPU_ATTENTION_MAX_HEAD_DIM:
        return f"head_dim={call.shape.head_dim}: the CPU kernel takes up to {CPU_ATTENTION_MAX_HEAD_DIM}"
    return None


CUDA_ATTENTION_HEAD_DIMS = (64, 128)
CUDA_ATTENTION_DTYPES = (torch.float16, torch.bfloat16)
CUDA_ATTENTION_ROWS_PER_TILE = 128  # kBlockM of csrc/cuda/attention.cu: query rows (x heads of a group) per block


def _cuda_aligned(t: torch.Tensor) -> bool:
    """The CUDA attention kernel copies rows in 16-byte pieces: a 16-byte aligned start
    and (batch, position, head) strides that are multiples of 8 elements."""
    return t.data_ptr() % 16 == 0 and t.stride(-1) == 1 and all(s % 8 == 0 for s in t.stride()[:3])


def _aligned_for_cuda(t: torch.Tensor) -> torch.Tensor:
    """t itself where the kernel can read it in place, else a fresh contiguous copy."""
    return t if _cuda_aligned(t) else t.clone(memory_format=torch.contiguous_format)


def _launch_attention_cuda(call: AttentionCall, out=None, *, interpret: bool = False):
    """out: optional tensor like q, 16-byte aligned, to write into (tests poison it)."""
    q, k, v = (_aligned_for_cuda(t) for t in (call.q, call.k, call.v))
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    elif not _cuda_aligned(out):
        raise ValueError(f"out must be 16-byte aligned with strides a multiple of 8, got strides {out.stride()}")
    kv_len, key_valid = _mask_tensors(call)
    params = _attention_params(call, q, k, v, out, kv_len, key_valid)
    workspace_bytes = (_C.attention_cuda_interpret_workspace_bytes if interpret
                       else _C.attention_cuda_workspace_bytes)(params)
    workspace = torch.empty(max(1, workspace_bytes), dtype=torch.uint8, device=q.device)
    if interpret:
        _C.attention_cuda_interpret(params, workspace=workspace.data_ptr(), workspace_bytes=workspace.numel(),
                                    buffers=_buffers(q=q, k=k, v=v, out=out, kv_len=kv_len, key_valid=key_valid,
                                                     workspace=workspace))
    else:
        _C.attention_cuda(params, workspace=workspace.data_ptr(), workspace_bytes=workspace.numel(),
                          stream=_stream(q.device))
    return out


def _supports_attention_cuda(call: AttentionCall) -> str | None:
    shape = call.shape
    if call.q.dtype not in CUDA_ATTENTION_DTYPES:
        return f"dtype {validation.dtype_name(call.q)}: the CUDA kernel runs float16 and bfloat16 (tensor cores)"
    if shape.head_dim not in CUDA_ATTENTION_HEAD_DIMS:
        return f"head_dim={shape.head_dim}: the CUDA kernel is compiled for {CUDA_ATTENTION_HEAD_DIMS}"
    if shape.k_len >= 2**30:
        return f"{shape.k_len} keys: the CUDA kernel indexes keys with int32 (< 2^30)"
    if shape.batch * shape.kv_heads >= 2**31:
        return f"{shape.batch} x {shape.kv_heads} (batch, kv head) pairs: gridDim.x holds 2^31 - 1"
    query_tiles = -(-shape.q_len * (shape.q_heads // shape.kv_heads) // CUDA_ATTENTION_ROWS_PER_TILE)
    if query_tiles > 65535:
        return f"{shape.q_len} queries x the head group need {query_tiles} tiles: gridDim.y holds 65535"
    return None


# --------------------------------------------------------------------------- the model's pointwise kernels

CPU_POINTWISE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def needs_gradient(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd would record a call on these tensors, or a forward-mode or torch.func
    transform sees through it (transformed())."""
    return (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)) or transformed()


def transformed() -> bool:
    """Inside a forward-AD dual level (torch.autograd.forward_ad, dual tensors) or a
    torch.func transform (vmap, jvp, grad): a kernel would drop the tangent or cannot read
    the wrapped tensors, and the reference's torch operations carry both. (Private flags,
    ~0.1 us each: nothing public says whether a level is open.)"""
    return _forward_ad._current_level >= 0 or torch._C._are_functorch_transforms_active()


def _inference_only(kernel: str, *tensors: torch.Tensor) -> str | None:
    """Why a call that must record a gradient does not run the CPU kernel (None if it
    need not): the kernels are for inference; training (unmask train) takes the
    reference's torch operations, which autograd differentiates."""
    return f"a gradient is needed: the CPU {kernel} kernel is inference-only" if needs_gradient(*tensors) else None


def _rms_norm_rows(x: torch.Tensor) -> torch.Tensor:
    """x as [rows, dim], a view where it can be and the kernel can read it."""
    dim = x.shape[-1]
    rows = x if x.dim() == 2 else x.reshape(-1, dim)
    if rows.stride(-1) != 1 or (rows.shape[0] > 1 and rows.stride(0) < dim):
        rows = rows.contiguous()
    return rows


def _rms_norm_params(call: RmsNormCall, rows: torch.Tensor, weight: torch.Tensor, out: torch.Tensor):
    dim = rows.shape[1]
    return _params(
        _C.RmsNormParams, x=rows.data_ptr(), weight=weight.data_ptr(), out=out.data_ptr(),
        dtype=_scalar_type(rows.dtype), weight_dtype=_scalar_type(weight.dtype), rows=rows.shape[0], dim=dim,
        x_row_stride=rows.stride(0) if rows.shape[0] > 1 else dim, eps=call.eps)


def _launch_rms_norm_cpu(call: RmsNormCall, out=None):
    """out: optional contiguous tensor like x to write into (tests poison it)."""
    rows, weight = _rms_norm_rows(call.x), call.weight.contiguous()  # held: copies live until the kernel ran
    out = torch.empty_like(call.x, memory_format=torch.contiguous_format) if out is None else out
    _C.rms_norm_cpu(_rms_norm_params(call, rows, weight, out))
    return out


def _prepare_rms_norm_cpu(call: RmsNormCall) -> Callable | None:
    """A launch for calls of this signature whose rows the kernel reads in place (the
    rows view starts at x's first element, so x's address is the rows')."""
    rows = _rms_norm_rows(call.x)
    if rows.data_ptr() != call.x.data_ptr() or not call.weight.is_contiguous():
        return None  # copied: a view of other storage
    template = _rms_norm_params(call, rows, call.weight, rows)

    def launch(x, weight):
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
        params = template.copy()
        params.x, params.weight, params.out = x.data_ptr(), weight.data_ptr(), out.data_ptr()
        _C.rms_norm_cpu(params)
        return out

    return launch


def _supports_rms_norm_cpu(call: RmsNormCall) -> str | None:
    if call.x.dtype not in CPU_POINTWISE_DTYPES:  # validation holds weight to float32 or x's dtype
        return f"dtype {validation.dtype_name(call.x)}: the CPU rms_norm kernel runs float32, float16 and bfloat16"
    return _inference_only("rms_norm", call.x, call.weight)


def _rotary_params(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor):
    batch, length, heads, dim = x.shape
    return _params(
        _C.RotaryParams, x=x.data_ptr(), out=out.data_ptr(), dtype=_scalar_type(x.dtype), batch=batch, length=length,
        heads=heads, head_dim=dim, x_stride=list(x.stride()[:3]), out_stride=list(out.stride()[:3]),
        cos=cos.data_ptr(), sin=sin.data_ptr(), table_batch=cos.shape[0])


def _launch_rotary_cpu(call: RotaryCall, out=None):
    """out: optional contiguous tensor like x to write into (tests poison it)."""
    x = call.x if call.x.stride(-1) == 1 else call.x.contiguous()
    cos, sin = call.cos.contiguous(), call.sin.contiguous()  # held: copies live until the kernel ran
    out = torch.empty_like(x, memory_format=torch.contiguous_format) if out is None else out
    _C.rotary_cpu(_rotary_params(x, cos, sin, out))
    return out


def _prepare_rotary_cpu(call: RotaryCall) -> Callable | None:
    """A launch for calls of this signature with no copy to make."""
    x, cos, sin = call.x, call.cos, call.sin
    if x.stride(-1) != 1 or not cos.is_contiguous() or not sin.is_contiguous():
        return None
    template = _rotary_params(x, cos, sin, torch.empty_like(x, memory_format=torch.contiguous_format))

    def launch(x, cos, sin):
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
        params = template.copy()
        params.x, params.out, params.cos, params.sin = x.data_ptr(), out.data_ptr(), cos.data_ptr(), sin.data_ptr()
        _C.rotary_cpu(params)
        return out

    return launch


def _supports_rotary_cpu(call: RotaryCall) -> str | None:
    if call.x.dtype not in CPU_POINTWISE_DTYPES:
        return f"dtype {validation.dtype_name(call.x)}: the CPU rotary kernel runs float32, float16 and bfloat16"
    return _inference_only("rotary", call.x, call.cos, call.sin)


def _moe_params(call: MoeCall, out: torch.Tensor | None):
    """The launch's params and the tensors they point into (held by the caller until the
    kernel ran: some are copies). out: optional contiguous float32 [T, d] (tests poison it)."""
    x = call.x
    if x.stride(-1) != 1 or (x.shape[0] > 1 and x.stride(0) < x.shape[1]):  # e.g. a row expanded
        x = x.contiguous()
    tensors = dict(x=x, experts=validation.contiguous_as(call.experts, torch.int64),
                   weights=validation.contiguous_as(call.weights, torch.float32),
                   gate=call.gate.contiguous(), up=call.up.contiguous(), down=call.down.contiguous())  # a model's: no copy
    tokens, dim = x.shape
    tensors["out"] = torch.empty(tokens, dim, dtype=torch.float32, device=x.device) if out is None else out
    params = _params(_C.MoeParams, **{name: t.data_ptr() for name, t in tensors.items()}, dtype=_scalar_type(x.dtype),
                     tokens=tokens, per_token=call.experts.shape[1], n_experts=call.gate.shape[0], dim=dim,
                     hidden=call.gate.shape[1], x_row_stride=x.stride(0) if tokens > 1 else dim)
    return params, tensors


def _launch_moe_swiglu_cpu(call: MoeCall, out=None):
    params, tensors = _moe_params(call, out)
    _C.moe_swiglu_cpu(params)
    return tensors["out"]


def _launch_moe_swiglu_cuda(call: MoeCall, out=None, *, interpret: bool = False):
    """No host read: the kernel routes the pairs on the device (csrc/cuda/moe.cu)."""
    params, tensors = _moe_params(call, out)
    workspace_bytes = (_C.moe_swiglu_cuda_interpret_workspace_bytes if interpret
                       else _C.moe_swiglu_cuda_workspace_bytes)(params)
    workspace = torch.empty(max(1, workspace_bytes), dtype=torch.uint8, device=call.x.device)
    if interpret:
        workspace.fill_(0xFF)  # NaN floats, ids past every range: a read of a part no launch wrote shows
        _C.moe_swiglu_cuda_interpret(params, workspace=workspace.data_ptr(), workspace_bytes=workspace.numel(),
                                     buffers=_buffers(**tensors, workspace=workspace))
    else:
        _C.moe_swiglu_cuda(params, workspace=workspace.data_ptr(), workspace_bytes=workspace.numel(),
                           stream=_stream(call.x.device))
    return tensors["out"]


def _supports_moe_swiglu_cpu(call: MoeCall) -> str | None:
    if call.x.dtype not in CPU_POINTWISE_DTYPES:  # validation holds the weights to x's dtype
        return f"dtype {validation.dtype_name(call.x)}: the CPU moe_swiglu kernel runs float32, float16 and bfloat16"
    return _inference_only("moe_swiglu", call.x, call.weights, call.gate, call.up, call.down)


CUDA_MOE_MAX_EXPERTS = 1024  # kMaxExperts of csrc/cuda/moe.cu: the route scans one expert per thread
CUDA_MOE_MAX_WIDTH = 65535 * 64  # dim and hidden: 64 rows a block on the grid's y (at most 65535)


def _supports_moe_swiglu_cuda(call: MoeCall) -> str | None:
    if call.x.dtype != torch.bfloat16:
        return f"dtype {validation.dtype_name(call.x)}: the CUDA moe_swiglu kernel runs bfloat16 (tensor cores)"
    if call.gate.shape[0] > CUDA_MOE_MAX_EXPERTS:
        return f"{call.gate.shape[0]} experts: the CUDA moe_swiglu kernel takes at most {CUDA_MOE_MAX_EXPERTS}"
    if max(call.x.shape[1], call.gate.shape[1]) > CUDA_MOE_MAX_WIDTH:
        return f"dim or hidden over {CUDA_MOE_MAX_WIDTH}: the CUDA moe_swiglu kernel's grid has 64 rows a block"
    return _inference_only("moe_swiglu", call.x, call.weights, call.gate, call.up, call.down)


KERNELS = (
    NativeKernel("sample", "cpu", _launch_sample_cpu, _supports_sample_cpu, _no_guard),
    NativeKernel("commit", "cpu", lambda call, out=None: _launch_commit(call, out, cuda=False), _supports_commit_cpu,
                 _no_guard),
    NativeKernel("attention", "cpu", _launch_attention_cpu, _supports_attention_cpu, _no_guard,
                 prepare=_prepare_attention_cpu),
    NativeKernel("rms_norm", "cpu", _launch_rms_norm_cpu, _supports_rms_norm_cpu, _no_guard,
                 prepare=_prepare_rms_norm_cpu),
    NativeKernel("rotary", "cpu", _launch_rotary_cpu, _supports_rotary_cpu, _no_guard, prepare=_prepare_rotary_cpu),
    NativeKernel("moe_swiglu", "cpu", _launch_moe_swiglu_cpu, _supports_moe_swiglu_cpu, _no_guard),
    NativeKernel("sample", "cuda", _launch_sample_cuda, _supports_sample_cuda, _cuda_guard),
    NativeKernel("commit", "cuda", lambda call, out=None: _launch_commit(call, out, cuda=True), _supports_commit_cuda,
                 _cuda_guard),
    NativeKernel("attention", "cuda", _launch_attention_cuda, _supports_attention_cuda, _cuda_guard),
    NativeKernel("moe_swiglu", "cuda", _launch_moe_swiglu_cuda, _supports_moe_swiglu_cuda, _cuda_guard),
)


def kernels() -> Mapping[tuple[str, str], NativeKernel]:
    """The native backends this build has: (kernel, device type) -> backend (read-only;
    built once: it is consulted on every kernel call)."""
    return _built_kernels()


@functools.cache
def _built_kernels() -> Mapping[tuple[str, str], NativeKernel]:  # fixed for the process: once
    if _C is None:
        return types.MappingProxyType({})
    built = {"cpu"} | ({"cuda"} if _C.cuda_compiled() else set())
    return types.MappingProxyType(
        {(entry.kernel, entry.device_type): entry for entry in KERNELS if entry.device_type in built})


def interpreter_available() -> bool:
    """Whether this module holds the SIMT interpreter (GCC on x86-64 Linux builds)."""
    return _C is not None and _C.simt_available()


# The CUDA kernels run by the SIMT interpreter on CPU tensors (csrc/simt): the CUDA
# backends' launchers and predicates, host memory for device memory.
INTERPRETED_KERNELS = (
    NativeKernel("sample", "cpu", functools.partial(_launch_sample_cuda, interpret=True), _supports_sample_cuda,
                 _no_guard, label="cuda-interpreter"),
    NativeKernel("commit", "cpu", functools.partial(_launch_commit, cuda=True, interpret=True), _supports_commit_cuda,
                 _no_guard, label="cuda-interpreter"),
    NativeKernel("attention", "cpu", functools.partial(_launch_attention_cuda, interpret=True),
                 _supports_attention_cuda, _no_guard, label="cuda-interpreter"),
    NativeKernel("moe_swiglu", "cpu", functools.partial(_launch_moe_swiglu_cuda, interpret=True),
                 _supports_moe_swiglu_cuda, _no_guard, label="cuda-interpreter"),
)


def interpreted_kernels() -> dict[tuple[str, str], NativeKernel]:
    """The interpreted CUDA backends, keyed like kernels(): (kernel, "cpu") -> backend."""
    if not interpreter_available():
        return {}
    return {(entry.kernel, entry.device_type): entry for entry in INTERPRETED_KERNELS}


# --------------------------------------------------------------------------- raw Philox draws


def fill_draws(seed: int, rows: int, cols: int, *, row_begin: int, offset: int, stream: int,
               device: torch.device, interpret: bool = False) -> torch.Tensor:
    """The kernels' 32-bit draws w[r, c] (row id row_begin + r) as int64 [rows, cols].
    interpret: the CUDA kernel under the SIMT interpreter, on the CPU."""
    require_extension()
    out = torch.empty(rows, cols, dtype=torch.int32, device=device)
    params = _params(_C.DrawParams, out=out.data_ptr(), rows=rows, cols=cols, row_begin=row_begin, seed=seed,
                     offset=offset, stream=_C.RngStream(stream))
    if interpret:
        _C.fill_draws_cuda_interpret(params, buffers=_buffers(out=out))
    elif device.type == "cuda":
        with torch.cuda.device(device):
            _C.fill_draws_cuda(params, stream=_stream(device))
    elif device.type == "cpu":
        _C.fill_draws_cpu(params)
    else:
        raise NotImplementedError(f"philox_draws supports cpu and cuda devices, got {device}")
    return out.to(torch.int64) & 0xFFFFFFFF


def philox_blocks(counters: torch.Tensor, key0: int, key1: int) -> torch.Tensor:
    """The C++ header's plain philox4x32_10 over counters [n, 4] (int64 words) -> [n, 4] words."""
    require_extension()
    words = (counters.cpu() & 0xFFFFFFFF).to(torch.int32).contiguous()  # keeps the low 32 bits
    out = torch.empty_like(words)
    _C.philox_blocks_cpu(_params(_C.PhiloxBlockParams, counters=words.data_ptr(), out=out.data_ptr(),
                                 n=words.shape[0], key0=key0, key1=key1))
    return out.to(torch.int64) & 0xFFFFFFFF

