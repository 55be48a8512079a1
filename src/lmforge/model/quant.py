"""Weight-only 4-bit linear layers that run GGUF block-quantized weights without dequantizing them.

Every weight is stored as one or more terms of group-wise 4-bit codes, w = sum_t (q_t - 8) * scale_t +
zero_t, with 32 weights per group, which PyTorch's int4 CPU kernel multiplies directly. GGUF's Q4_0
and Q4_1 are one such term exactly, and Q8_0 is two (its high and low nibbles), so the model computes
with exactly the weights in the file while reading 1/8 (4-bit) or 1/4 (8-bit) of the fp32 bytes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

GROUP = 32


@dataclass
class QuantWeight:
    """Codes [N, K] (0..15), scales and zeros [N, K / GROUP] for each term; rows are output features."""

    terms: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.terms[0][0].shape)  # type: ignore[return-value]

    def dequantize(self) -> torch.Tensor:
        out = torch.zeros(self.shape, dtype=torch.float32)
        for q, s, z in self.terms:
            out += (q.float() - 8) * s.repeat_interleave(GROUP, 1) + z.repeat_interleave(GROUP, 1)
        return out

    def map_rows(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> QuantWeight:
        """Apply a row permutation/reshape (e.g. undoing llama.cpp's q/k order) to every part."""
        return QuantWeight([(fn(q), fn(s), fn(z)) for q, s, z in self.terms])

    @staticmethod
    def cat(parts: list[QuantWeight]) -> QuantWeight | None:
        """Stack along rows (fusing q/k/v or gate/up); None if the parts have different layouts."""
        if len({len(p.terms) for p in parts}) != 1:
            return None
        return QuantWeight([tuple(torch.cat([p.terms[i][j] for p in parts]) for j in range(3))  # type: ignore[misc]
                            for i in range(len(parts[0].terms))])


def _f16(blocks: np.ndarray, start: int) -> np.ndarray:
    return blocks[..., start:start + 2].copy().view(np.float16)[..., 0].astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    # GGML packs element j in the low nibble and element j + 16 in the high nibble of byte j.
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def from_gguf_blocks(raw: np.ndarray, qtype: str, n: int, k: int) -> QuantWeight | None:
    """Decode raw Q4_0 / Q4_1 / Q8_0 blocks (uint8 [n, bytes]) into 4-bit terms; None for other types."""
    if k % GROUP:
        return None
    nb = k // GROUP
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    if qtype == "Q4_0":
        b = raw.reshape(n, nb, 18)
        d = _f16(b, 0)
        q = _nibbles(b[..., 2:]).reshape(n, k)
        return QuantWeight([(t(q), t(d), t(np.zeros_like(d)))])
    if qtype == "Q4_1":
        b = raw.reshape(n, nb, 20)
        d, m = _f16(b, 0), _f16(b, 2)
        q = _nibbles(b[..., 4:]).reshape(n, k)
        return QuantWeight([(t(q), t(d), t(m + 8 * d))])
    if qtype == "Q8_0":
        b = raw.reshape(n, nb, 34)
        d = _f16(b, 0)
        u = (b[..., 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8).reshape(n, k)
        # q8 = 16 (hi - 8) + (lo - 8) + 8, so w = 16d (hi - 8) + d (lo - 8) + 8d: two exact 4-bit terms.
        return QuantWeight([(t(u >> 4), t(16 * d), t(np.zeros_like(d))), (t(u & 0x0F), t(d), t(8 * d))])
    return None


def int4_supported(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cpu" and dtype == torch.float32 and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")


class Int4Linear(nn.Module):
    """A frozen linear layer whose weight stays 4-bit packed (weight-only quantization)."""

    def __init__(self, qw: QuantWeight, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = qw.shape
        self.n_terms = len(qw.terms)
        for i, (q, s, z) in enumerate(qw.terms):
            self.register_buffer(f"packed{i}", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.int(), 1))
            self.register_buffer(f"scales_zeros{i}", torch.stack([s.t(), z.t()], -1).contiguous().float())
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        y = None
        for i in range(self.n_terms):
            part = torch.ops.aten._weight_int4pack_mm_for_cpu(
                x2, getattr(self, f"packed{i}"), GROUP, getattr(self, f"scales_zeros{i}"))
            y = part if y is None else y + part
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, terms={self.n_terms}"
