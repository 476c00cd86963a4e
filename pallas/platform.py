"""One kernel, a variant per accelerator family, chosen when the call is lowered.

pallas_call (JAX 0.10.2) takes a single compiler_params object and has no backend
argument; its GPU lowering rejects TPU params ("Compiler params for platform tpu
cannot be used for gpu lowering") and the TPU one rejects Triton params. So each
kernel builds two pallas_calls (Mosaic TPU params, Triton params) from the same body
and jax.lax.platform_dependent stages both out: cond's lowering keeps only the branch
of the platform being lowered, so jax.export(..., platforms=["tpu"]) lowers only the
Mosaic call and platforms=["cuda"] only the Triton one, from any machine, a CPU-only
one included. jax.default_backend() would be the wrong test: it names the machine
that traces, not the one an exported or AOT-compiled program runs on.
"""

from __future__ import annotations

from collections.abc import Callable

import jax

VARIANTS = ("tpu", "gpu")


def check_variant(variant: str | None) -> None:
    if variant is not None and variant not in VARIANTS:
        raise ValueError(f"variant must be None or one of {VARIANTS}, got {variant!r}")


def by_platform(args: tuple, *, tpu: Callable, gpu: Callable, interpret: bool, variant: str | None):
    """tpu(*args) on TPU and gpu(*args) on CUDA and ROCm, decided at lowering.

    variant forces one of them; interpret mode runs on the machine that traces (CPU
    in the tests), where neither platform applies, so it takes the TPU variant unless
    variant says "gpu" (how the tests check the GPU variant without a GPU).
    """
    check_variant(variant)
    if interpret or variant is not None:
        return (gpu if variant == "gpu" else tpu)(*args)
    return jax.lax.platform_dependent(*args, tpu=tpu, cuda=gpu, rocm=gpu)
