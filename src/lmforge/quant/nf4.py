"""NF4, the 4-bit NormalFloat of the QLoRA paper (Dettmers et al., 2023), laid out as bitsandbytes does:
the flattened matrix in blocks of 64, one fp32 absmax scale per block, each weight the index of the
nearest of 16 levels (quantiles of a standard normal, scaled to [-1, 1], with an exact zero), two
indices per byte, the first in the high nibble.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

NF4_BLOCK = 64
# The 16 NF4 levels, as in the paper's appendix and bitsandbytes.
NF4_LEVELS = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
])
# Largest distance from any value in [-1, 1] to its nearest level: a bound on the error / absmax.
NF4_MAX_ERROR = float((NF4_LEVELS[1:] - NF4_LEVELS[:-1]).max() / 2)
_MIDPOINTS = (NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2
# Byte -> its two levels (high nibble first), so dequantizing is one lookup per byte.
_BYTE_LEVELS = torch.stack([NF4_LEVELS.repeat_interleave(16), NF4_LEVELS.repeat(16)], dim=1)
_CHUNK = 1 << 20  # weights quantized at a time: bounds the temporaries for large matrices


def nf4_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Any float tensor -> (uint8 codes [ceil(n/64)*32], fp32 absmax [ceil(n/64)]) over its flattened values."""
    flat = w.detach().reshape(-1).float()
    n = flat.numel()
    pad = -n % NF4_BLOCK
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    blocks = flat.view(-1, NF4_BLOCK)
    absmax = blocks.abs().amax(dim=1)
    codes = torch.empty(blocks.numel() // 2, dtype=torch.uint8, device=w.device)
    mids = _MIDPOINTS.to(w.device)
    step = _CHUNK // NF4_BLOCK
    for s in range(0, blocks.shape[0], step):
        b, a = blocks[s:s + step], absmax[s:s + step]
        # All-zero blocks divide by 1 and land on the exact zero level.
        idx = torch.bucketize(b / torch.where(a > 0, a, 1.0)[:, None], mids).to(torch.uint8).view(-1, 2)
        codes[s * NF4_BLOCK // 2:(s + step) * NF4_BLOCK // 2] = (idx[:, 0] << 4) | idx[:, 1]
    return codes, absmax


def nf4_dequantize(codes: torch.Tensor, absmax: torch.Tensor, shape: tuple[int, ...],
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The inverse of `nf4_quantize` (up to rounding to the nearest level)."""
    levels = F.embedding(codes.int(), _BYTE_LEVELS.to(codes.device))  # [bytes, 2]
    w = (levels.view(-1, NF4_BLOCK) * absmax[:, None]).view(-1)
    n = int(np.prod(shape))
    return w[:n].view(shape).to(dtype)


class DequantLinear(torch.autograd.Function):
    """x @ W.T where W is rebuilt from codes (`layer.dequantize()`) in forward and again in backward: no
    dense W is kept, and gradients flow to x but never to the codes."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: nn.Module) -> torch.Tensor:  # type: ignore[override]
        ctx.layer = layer
        return F.linear(x, layer.dequantize().to(x.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, None]:  # type: ignore[override]
        if not ctx.needs_input_grad[0]:
            return None, None
        return grad @ ctx.layer.dequantize().to(grad.dtype), None


class NF4Linear(nn.Module):
    """A frozen linear layer stored as NF4 codes (QLoRA's base): about 0.56 bytes per weight instead of 4."""

    kind = "nf4"

    def __init__(self, out_features: int, in_features: int, bias: torch.Tensor | None, dtype: torch.dtype,
                 codes: torch.Tensor, absmax: torch.Tensor) -> None:
        super().__init__()
        self.out_features, self.in_features, self.dtype = out_features, in_features, dtype
        # Buffers, so .to(device) moves them; not persistent: the state dict is for dense weights.
        self.register_buffer("codes", codes, persistent=False)
        self.register_buffer("absmax", absmax, persistent=False)
        self.bias = nn.Parameter(bias.detach(), requires_grad=False) if bias is not None else None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> NF4Linear:
        w = linear.weight.detach()
        return cls(w.shape[0], w.shape[1], linear.bias, w.dtype, *nf4_quantize(w))

    @property
    def device(self) -> torch.device:
        return self.codes.device

    def dequantize(self) -> torch.Tensor:
        """The dense [out, in] weight these codes stand for, in the layer's compute dtype."""
        return nf4_dequantize(self.codes, self.absmax, (self.out_features, self.in_features), self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = DequantLinear.apply(x, self)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, quant={self.kind}"
