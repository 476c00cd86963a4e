"""unmask: kernels and sampler for masked diffusion language models."""

__version__ = "0.1.0"
