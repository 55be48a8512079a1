"""Run GGUF block-quantized matrices without dequantizing them: the CPU decode fast path.

Decoding one token reads every weight once, so on a CPU it is bound by memory bandwidth. A
`PackedLinear` keeps the file's 4-/8-bit codes next to the dense fp32 weight and, for the few rows
of a decode step, multiplies with the codes through the C kernels (kernels.py). Everything else
(prefill, training, other devices) uses the dense weight, the exact dequantization of the same codes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .kernels import GROUP, MAX_ROWS, fast_path, packed_matmul
from .nf4 import DequantLinear


@dataclass
class PackedWeight:
    """Codes of an [N, K] matrix in groups of 32 along K: w = code * scale + zero (per row and group).

    kind "q4": uint8 [N, K/2], GGML nibble order (byte j of a group: element j low, j + 16 high).
    kind "q8": int8 [N, K], zero unused.
    """

    kind: str
    codes: torch.Tensor
    scale: torch.Tensor  # float32 [N, K / 32]
    zero: torch.Tensor  # float32 [N, K / 32]

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes.shape[0], self.scale.shape[1] * GROUP

    def dequantize(self) -> torch.Tensor:
        n, k = self.shape
        if self.codes.device.type != "cpu":  # the same formula in torch ops, on the codes' device
            t = self.codes.view(n, k // GROUP, -1)
            q = torch.cat([t & 0x0F, t >> 4], dim=-1) if self.kind == "q4" else t
            return (q.float() * self.scale[..., None] + self.zero[..., None]).view(n, k)
        # numpy: several times faster than torch's uint8 ops here, and loading does this per matrix.
        c = self.codes.numpy().reshape(n, k // GROUP, -1)
        q = np.concatenate([c & 0x0F, c >> 4], axis=-1) if self.kind == "q4" else c
        w = q.astype(np.float32) * self.scale.numpy()[..., None] + self.zero.numpy()[..., None]
        return torch.from_numpy(w.reshape(n, k))

    def map_rows(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> PackedWeight:
        """Apply a row permutation (e.g. undoing llama.cpp's q/k order) to every part."""
        return PackedWeight(self.kind, fn(self.codes), fn(self.scale), fn(self.zero))

    @staticmethod
    def cat(parts: list[PackedWeight]) -> PackedWeight | None:
        """Stack along rows (fusing q/k/v or gate/up); None when the parts are of different kinds."""
        if len({p.kind for p in parts}) != 1:
            return None
        return PackedWeight(parts[0].kind, *(torch.cat([getattr(p, a) for p in parts]) for a in ("codes", "scale", "zero")))


def from_gguf_blocks(raw: np.ndarray, qtype: str, n: int, k: int) -> PackedWeight | None:
    """Split raw Q4_0 / Q4_1 / Q8_0 blocks (uint8 [n, bytes]) into codes, scales, zeros; None for other types."""
    if k % GROUP:
        return None
    nb = k // GROUP
    size = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}.get(qtype)
    if size is None:
        return None
    b = np.asarray(raw).reshape(n, nb, size)
    d = b[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))
    if qtype == "Q4_0":  # w = d * (q - 8)
        return PackedWeight("q4", t(b[..., 2:].reshape(n, nb * 16)), t(d), t(-8 * d))
    if qtype == "Q4_1":  # w = d * q + m
        m = b[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        return PackedWeight("q4", t(b[..., 4:].reshape(n, nb * 16)), t(d), t(m))
    return PackedWeight("q8", t(b[..., 2:].reshape(n, nb * GROUP).view(np.int8)), t(d), t(np.zeros_like(d)))


def use_packed(x: torch.Tensor, w: PackedWeight | None) -> bool:
    """Whether this product can take the packed path: CPU fp32 inference on a few rows."""
    return w is not None and x.numel() <= MAX_ROWS * w.shape[1] and fast_path(x)


class PackedLinear(nn.Linear):
    """nn.Linear (same parameters and state dict) that also holds the file's packed codes.

    With a dense weight (what loading gives), the codes serve the few-row CPU products and the dense
    weight everything else. Without one (`frozen`: QLoRA's base, no dense copy held), the layer is frozen
    and every other product dequantizes the codes, in forward and again in backward.
    """

    def __init__(self, weight: torch.Tensor | None, bias: torch.Tensor | None, packed: PackedWeight,
                 dtype: torch.dtype | None = None) -> None:
        nn.Module.__init__(self)
        self.out_features, self.in_features = packed.shape
        if weight is None:
            self.weight = None
            self.bias = nn.Parameter(bias.detach(), requires_grad=False) if bias is not None else None
        else:
            self.weight = nn.Parameter(weight, requires_grad=weight.requires_grad)
            self.bias = nn.Parameter(bias) if bias is not None else None
        self.dtype = dtype if weight is None or dtype is not None else weight.dtype
        self.packed: PackedWeight | None = packed
        self._version = self.weight._version if self.weight is not None else 0

    @classmethod
    def frozen(cls, packed: PackedWeight, bias: torch.Tensor | None, dtype: torch.dtype) -> PackedLinear:
        """A frozen layer that holds only the codes, computing in ``dtype``."""
        return cls(None, bias, packed, dtype)

    @property
    def device(self) -> torch.device:
        return self.weight.device if self.weight is not None else self.packed.codes.device  # type: ignore[union-attr]

    def dequantize(self) -> torch.Tensor:
        """The dense [out, in] weight this layer computes with, in its compute dtype."""
        if self.weight is not None:
            return self.weight.detach()
        return self.packed.dequantize().to(self.dtype)  # type: ignore[union-attr]

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> PackedLinear:
        super()._apply(fn, recurse)
        if self.weight is None:  # the codes are the weight: .to(device) moves them
            p = self.packed
            self.packed = PackedWeight(p.kind, fn(p.codes), fn(p.scale), fn(p.zero))  # type: ignore[union-attr]
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is None:
            if use_packed(x, self.packed):  # few-row CPU inference: the C kernel straight from the codes
                y = packed_matmul(x, self.packed)  # type: ignore[arg-type]
            else:
                y = DequantLinear.apply(x, self)
            return y + self.bias if self.bias is not None else y
        if self.packed is not None and self.weight._version != self._version:
            self.packed = None  # the dense weight was changed (e.g. fine-tuned): the codes are stale
        if not use_packed(x, self.packed):
            return F.linear(x, self.weight, self.bias)
        y = packed_matmul(x, self.packed)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        if self.weight is None:
            return f"in_features={self.in_features}, out_features={self.out_features}, quant={self.packed.kind}"  # type: ignore[union-attr]
        return super().extra_repr()
