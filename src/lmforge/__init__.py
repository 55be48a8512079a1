"""lmforge: a complete large-language-model system on PyTorch."""

import os as _os

# MKL's and OpenMP's worker pools otherwise spin-wait against each other between small ops (a matmul,
# then attention), which makes CPU decoding several times slower. Must be set before torch loads.
_os.environ.setdefault("KMP_BLOCKTIME", "0")

from .api import LM, load  # noqa: E402
from .engine import SamplingParams  # noqa: E402
from .errors import LMForgeError  # noqa: E402

__version__ = "0.1.0"
__all__ = ["LM", "LMForgeError", "SamplingParams", "__version__", "load"]
