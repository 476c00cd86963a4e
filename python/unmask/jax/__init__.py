"""unmask for JAX: the Pallas kernels (attention, sample, commit) behind jit-able
functions, and a functional model and sampler that mirror unmask.generate.

Needs the jax extra (pip install 'unmask[jax]'); `import unmask` works without it.
"""

from unmask.jax.kernels import attention, commit, sample
from unmask.jax.model import JaxModel, from_pretrained, from_torch
from unmask.jax.sampler import generate

__all__ = ["JaxModel", "attention", "commit", "from_pretrained", "from_torch", "generate", "sample"]
