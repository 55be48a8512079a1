"""The model core: one config, shared blocks, one transformer for every family.

Plain PyTorch, one forward path per block type; it imports nothing from lmforge but the error type.
Stored-weight formats and CPU acceleration are installed into a built model from outside (`lmforge.quant`).
"""

from .config import ModelConfig
from .transformer import Transformer

__all__ = ["ModelConfig", "Transformer"]
