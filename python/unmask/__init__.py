"""unmask: kernels and sampler for masked diffusion language models.

    import unmask
    model = unmask.from_pretrained("path/to/LLaDA-8B-Instruct", dtype=torch.bfloat16, device="cuda")
    out = unmask.generate(model, [prompt_ids], gen_length=128, block_length=32, threshold=0.9)

Kernels: unmask.ops.{attention, sample, commit} (validated, dispatched to the native
kernel for the device or to unmask.reference, the specification).
"""

from unmask import ops, reference, rng
from unmask.models import DiffusionTransformer, KVCache, ModelConfig, from_pretrained, save_pretrained
from unmask.sampler import GenerateOutput, generate, infill

__version__ = "0.1.0"

__all__ = [
    "DiffusionTransformer",
    "GenerateOutput",
    "KVCache",
    "ModelConfig",
    "from_pretrained",
    "generate",
    "infill",
    "ops",
    "reference",
    "rng",
    "save_pretrained",
]
