"""The bidirectional transformer, its configuration and checkpoint loading."""

from unmask.models.checkpoint import from_pretrained, save_pretrained
from unmask.models.config import ModelConfig
from unmask.models.transformer import DiffusionTransformer

__all__ = ["DiffusionTransformer", "ModelConfig", "from_pretrained", "save_pretrained"]
