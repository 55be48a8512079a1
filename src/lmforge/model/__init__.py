"""The model core: one config, shared blocks, one transformer for every family."""

from .config import ModelConfig
from .transformer import Transformer

__all__ = ["ModelConfig", "Transformer"]
