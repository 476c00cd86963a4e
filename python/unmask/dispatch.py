"""Where a kernel call runs: the one decision, made from the kernel table.

The table (unmask.native.kernels()) holds one native backend per (kernel, device type),
each with a `supports(call)` that states every case it takes. Attention also has torch's
SDPA under unmask's contract (unmask.sdpa): it runs the calls where it is measured to be
faster than the native kernel (`preferred(call)`, a rule on the shape and dtype), and
those the native kernel does not take. choose() picks, in order: SDPA where preferred,
the native backend of the call's device when it takes the call, SDPA, the reference
(unmask.reference, the specification); what it picks is what runs and what
backend_for() reports. UNMASK_BACKEND (read at each call):
  unset or "auto"  as above;
  "reference"      the reference everywhere;
  "native"         the native backend or NotImplementedError saying why not (no
                   silent fallback: for tests and benchmarks of the kernels themselves);
  "interpret"      CPU tensors run the CUDA kernels under the SIMT interpreter (slowly,
                   with its checks) where they take the call, else the reference.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable

from unmask import native, reference, sdpa
from unmask.validation import AttentionCall, CommitCall, RmsNormCall, RotaryCall, SampleCall

BACKEND_MODES = ("auto", "native", "reference", "interpret")


def _reference_attention(call: AttentionCall, out=None):
    return reference.attention(call.q, call.k, call.v, kv_len=call.kv_len, key_valid=call.key_valid,
                               block_size=call.block_size, q_offset=call.q_offset, scale=call.scale)


def _reference_sample(call: SampleCall, out=None):
    o = call.options
    return reference.sample(call.logits, temperature=o.temperature, top_k=o.top_k, top_p=o.top_p,
                            banned=call.banned, confidence=o.confidence, conf_temperature=o.conf_temperature,
                            seed=o.seed, offset=o.offset, rows=call.rows)


def _reference_commit(call: CommitCall, out=None):
    return reference.commit(call.x, call.tokens, call.conf, call.eligible, k=call.k, threshold=call.threshold,
                            factor=call.factor)


def _reference_rms_norm(call: RmsNormCall, out=None):
    return reference.rms_norm(call.x, call.weight, call.eps)


def _reference_rotary(call: RotaryCall, out=None):
    return reference.rotary(call.x, call.cos, call.sin)


@dataclasses.dataclass(frozen=True)
class ReferenceKernel:
    """The specification as a backend: any device, any case."""

    kernel: str
    launch: Callable
    name: str = "reference"

    def supports(self, call) -> str | None:
        return None

    def __call__(self, call, out=None):
        return self.launch(call, out=out)


REFERENCE = {
    "attention": ReferenceKernel("attention", _reference_attention),
    "sample": ReferenceKernel("sample", _reference_sample),
    "commit": ReferenceKernel("commit", _reference_commit),
    "rms_norm": ReferenceKernel("rms_norm", _reference_rms_norm),
    "rotary": ReferenceKernel("rotary", _reference_rotary),
}
# Backends built on torch's own kernels, by kernel name (any device).
TORCH = {"attention": sdpa.SDPA}


def backend_mode() -> str:
    mode = os.environ.get("UNMASK_BACKEND", "") or "auto"
    if mode not in BACKEND_MODES:
        raise ValueError(f"UNMASK_BACKEND must be one of {BACKEND_MODES} or unset, got {mode!r}")
    return mode


def choose(kernel: str, call) -> tuple[native.NativeKernel | sdpa.SdpaKernel | ReferenceKernel, str | None]:
    """The backend that runs `call`, and why the native one does not (None if it does)."""
    mode = backend_mode()
    if mode == "reference":
        return REFERENCE[kernel], "UNMASK_BACKEND=reference"
    table = native.interpreted_kernels() if mode == "interpret" else native.kernels()
    entry = table.get((kernel, call.device.type))
    torch_backend = TORCH.get(kernel) if mode == "auto" else None
    if torch_backend is not None and torch_backend.supports(call) is not None:
        torch_backend = None
    reason = f"no native {kernel} kernel for {call.device.type} tensors in this build" if entry is None \
        else entry.supports(call)
    if reason is None:
        preferred = torch_backend.preferred(call) if torch_backend is not None else None
        return (torch_backend, preferred) if preferred is not None else (entry, None)
    if mode == "native":
        raise NotImplementedError(f"UNMASK_BACKEND=native: {reason}")
    return (torch_backend if torch_backend is not None else REFERENCE[kernel]), reason


def run(kernel: str, call):
    backend, _ = choose(kernel, call)
    return backend(call)


@contextlib.contextmanager
def forced(mode: str):
    """UNMASK_BACKEND=mode inside the block."""
    if mode not in BACKEND_MODES:
        raise ValueError(f"mode must be one of {BACKEND_MODES}, got {mode!r}")
    previous = os.environ.get("UNMASK_BACKEND")
    os.environ["UNMASK_BACKEND"] = mode
    try:
        yield
    finally:
        if previous is None:
            del os.environ["UNMASK_BACKEND"]
        else:
            os.environ["UNMASK_BACKEND"] = previous
