"""The bidirectional transformer, its configuration and checkpoint loading.

Imported on first use (PEP 562): unmask.models.config, which the JAX model reads, needs
no torch."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_LAZY = {
    "from_pretrained": "unmask.models.checkpoint",
    "save_pretrained": "unmask.models.checkpoint",
    "ModelConfig": "unmask.models.config",
    "DiffusionTransformer": "unmask.models.transformer",
    "KVCache": "unmask.models.transformer",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'unmask.models' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:
    from unmask.models.checkpoint import from_pretrained, save_pretrained
    from unmask.models.config import ModelConfig
    from unmask.models.transformer import DiffusionTransformer, KVCache
