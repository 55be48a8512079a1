"""Stored-weight formats and CPU acceleration, beside the model core.

packed.py: a GGUF file's block codes (`PackedWeight`: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and the K-quants Q4_K,
Q5_K, Q6_K) and the linear layer that keeps them (`PackedLinear`). nf4.py: QLoRA's 4-bit NormalFloat
codes. kernels.py + csrc/kernels.c: the C kernels for CPU decoding, compiled on first use. fused.py: a
decode step's whole block stack in one C call. accel.py: `accelerate`, the one call that installs all of
it into a built model.
"""

from .accel import DecodeKVStore, accelerate, exact_rows
from .packed import PackedLinear, PackedWeight, from_gguf_blocks

__all__ = ["DecodeKVStore", "PackedLinear", "PackedWeight", "accelerate", "exact_rows", "from_gguf_blocks"]
