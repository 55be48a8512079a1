"""lmforge: a complete large-language-model system on PyTorch."""

from .api import LM, load
from .engine import SamplingParams
from .errors import LMForgeError

__version__ = "0.1.0"
__all__ = ["LM", "LMForgeError", "SamplingParams", "__version__", "load"]
