"""The bidirectional transformer, its configuration and checkpoint loading.

Imported on first use (PEP 562): unmask.models.config, which the JAX model reads, needs
no torch."""

from __future__ import annotations

from typing import TYPE_CHECKING

from unmask import _lazy

_LAZY = {
    "from_pretrained": "unmask.models.checkpoint",
    "save_pretrained": "unmask.models.checkpoint",
    "ModelConfig": "unmask.models.config",
    "MoeConfig": "unmask.models.config",
    "DeviceSegment": "unmask.models.transformer",
    "DiffusionTransformer": "unmask.models.transformer",
    "KVCache": "unmask.models.transformer",
    "RowSegments": "unmask.models.transformer",
    "Rows": "unmask.models.transformer",
}

__all__ = sorted(_LAZY)


__getattr__, __dir__ = _lazy.attributes(__name__, globals(), _LAZY)


if TYPE_CHECKING:
    from unmask.models.checkpoint import from_pretrained, save_pretrained
    from unmask.models.config import ModelConfig, MoeConfig
    from unmask.models.transformer import DeviceSegment, DiffusionTransformer, KVCache, Rows, RowSegments
