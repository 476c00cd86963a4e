"""Where a kernel call runs: the one decision, made from the kernel table.

The table (unmask.native.kernels()) holds one native backend per (kernel, device type),
each with a `supports(call)` that states every case it takes. Attention also has torch's
SDPA under unmask's contract (unmask.sdpa): it runs the calls where it is measured to be
faster than the native kernel (`preferred(call)`, a rule on the shape and dtype), and
those the native kernel does not take; so do a mixture's experts (unmask.experts). choose() picks, in order: SDPA where preferred,
the native backend of the call's device when it takes the call, SDPA, the reference
(unmask.reference, the specification); what it picks is what runs and what
backend_for() reports. UNMASK_BACKEND (read at each call):
  unset or "auto"  as above;
  "reference"      the reference everywhere;
  "native"         the native backend or NotImplementedError saying why not (no
                   silent fallback: for tests and benchmarks of the kernels themselves);
  "interpret"      CPU tensors run the CUDA kernels under the SIMT interpreter (slowly,
                   with its checks) where they take the call, else the reference.

Plans. A small kernel call's route cost more than its kernel: the checks ~5 us, this
decision ~3.5, the params struct ~6, of a 32 x 32 attention call whose kernel takes 40-60
(torch SDPA's whole fixed cost is lower). When the native backend takes a call, the
decision follows from the call's signature alone (the shapes, strides, dtypes and
devices of its tensors, its other arguments, UNMASK_BACKEND and the instruction set):
`supports` and `preferred` read nothing else (SDPA's `supports` reads data, so a call
it is preferred for is never planned). So unmask.ops keeps, per signature, the
launch the backend prepared for the first such call (`run(..., plan_key=...)`) and
runs later calls of that signature through it (`planned`), after the checks a
signature does not decide (values, such as kv_len's). A call the native backend does
not take, or takes only after reading its data, is decided call by call.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable

import torch

from unmask import experts, native, reference, sdpa
from unmask.validation import AttentionCall, CommitCall, MoeCall, RmsNormCall, RotaryCall, SampleCall

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


def _reference_moe_swiglu(call: MoeCall, out=None):
    return reference.moe_swiglu(call.x, call.experts, call.weights, call.gate, call.up, call.down)


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
    "moe_swiglu": ReferenceKernel("moe_swiglu", _reference_moe_swiglu),
}
# Backends built on torch's own kernels, by kernel name (any device).
TORCH = {"attention": sdpa.SDPA, "moe_swiglu": experts.EXPERTS}


def _mode_setting() -> str:
    """UNMASK_BACKEND as set ("auto" when unset or empty), not yet checked."""
    return os.environ.get("UNMASK_BACKEND", "") or "auto"


def backend_mode() -> str:
    mode = _mode_setting()
    if mode not in BACKEND_MODES:
        raise ValueError(f"UNMASK_BACKEND must be one of {BACKEND_MODES} or unset, got {mode!r}")
    return mode


def choose(kernel: str, call, mode: str | None = None
           ) -> tuple[native.NativeKernel | sdpa.SdpaKernel | ReferenceKernel, str | None]:
    """The backend that runs `call` under `mode` (UNMASK_BACKEND's, read now where None),
    and why the native one does not (None if it does)."""
    mode = backend_mode() if mode is None else mode
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


def run(kernel: str, call, plan_key: tuple | None = None):
    """Runs `call` where choose() says; with plan_key (signature(...) of the op's
    arguments), keeps the launch the chosen native backend prepares for that signature."""
    # The mode and instruction set are read once: the plan is kept under those it was
    # decided for, even if another thread changes them meanwhile.
    mode, isa = backend_mode(), native.cpu_isa()
    backend, reason = choose(kernel, call, mode)
    prepare = getattr(backend, "prepare", None)
    if plan_key is not None and reason is None and prepare is not None and _native_by_signature(kernel, call, mode):
        launch = prepare(call)
        if launch is not None:
            if len(_plans) >= MAX_PLANS:
                _plans.clear()  # a server's shapes vary without bound; a step's are a few dozen
            _plans[(kernel, plan_key, mode, isa)] = launch
    return backend(call)


def _native_by_signature(kernel: str, call, mode: str) -> bool:
    """Whether the native backend, having taken `call`, takes every call of its signature:
    not when torch's backend was preferred and passed over for what the data held (a
    non-finite key under the block-causal mask, SdpaKernel.supports)."""
    torch_backend = TORCH.get(kernel) if mode == "auto" else None
    return torch_backend is None or torch_backend.preferred(call) is None


MAX_PLANS = 1024
_plans: dict[tuple, Callable] = {}


def signature(*arguments) -> tuple:
    """What the checks and the decision read of a call's arguments: each tensor's shape,
    strides, dtype and device (not its values); each other argument with its type (1 and
    True are equal keys but not the same argument)."""
    # get_device(): -1 on the CPU, the index on a GPU (calls on other devices are not planned)
    return tuple([(a.shape, a.stride(), a.dtype, a.get_device()) if isinstance(a, torch.Tensor) else (type(a), a)
                  for a in arguments])


def planned(kernel: str, plan_key: tuple) -> Callable | None:
    """The launch kept for calls of this signature under the current UNMASK_BACKEND and
    instruction set, or None (an invalid UNMASK_BACKEND matches no plan: the route raises;
    so does an unhashable argument, which the checks then name)."""
    try:
        return _plans.get((kernel, plan_key, _mode_setting(), native.cpu_isa()))
    except TypeError:  # e.g. block_size=[2]
        return None


def clear_plans() -> None:
    """Forgets every kept launch (tests that stand in another CPU's facts start here)."""
    _plans.clear()


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
