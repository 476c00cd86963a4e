"""unmask: kernels and sampler for masked diffusion language models.

    import unmask
    model = unmask.from_pretrained("path/to/LLaDA-8B-Instruct", dtype=torch.bfloat16, device="cuda")
    out = unmask.generate(model, [prompt_ids], gen_length=128, block_length=32, threshold=0.9)

Kernels: unmask.ops.{attention, sample, commit} (validated, dispatched to the native
kernel for the device or to unmask.reference, the specification).

The names below are imported on first use (PEP 562), so `import unmask.jax` runs
without torch (docs/design.md, JAX).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from unmask import _lazy

__version__ = "0.1.0"

# name -> the module that defines it (a module itself where the name is a submodule)
_LAZY = {
    "ops": "unmask.ops",
    "reference": "unmask.reference",
    "rng": "unmask.rng",
    "DeviceSegment": "unmask.models",
    "DiffusionTransformer": "unmask.models",
    "KVCache": "unmask.models",
    "RowSegments": "unmask.models",
    "Rows": "unmask.models",
    "ModelConfig": "unmask.models.config",
    "MoeConfig": "unmask.models.config",
    "from_pretrained": "unmask.models",
    "save_pretrained": "unmask.models",
    "GenerateOutput": "unmask.output",
    "generate": "unmask.sampler",
    "infill": "unmask.sampler",
}

__all__ = sorted(_LAZY)


__getattr__, __dir__ = _lazy.attributes(__name__, globals(), _LAZY)


if TYPE_CHECKING:  # what static checkers and IDEs see
    from unmask import ops, reference, rng
    from unmask.models import (DeviceSegment, DiffusionTransformer, KVCache, ModelConfig, MoeConfig, Rows,
                               RowSegments, from_pretrained, save_pretrained)
    from unmask.output import GenerateOutput
    from unmask.sampler import generate, infill
