"""The bidirectional transformer, its configuration and checkpoint loading."""

from unmask.models.checkpoint import from_pretrained, save_pretrained
from unmask.models.config import ModelConfig
from unmask.models.transformer import DiffusionTransformer, KVCache

__all__ = ["DiffusionTransformer", "KVCache", "ModelConfig", "from_pretrained", "save_pretrained"]
