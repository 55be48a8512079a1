"""Run GGUF block-quantized matrices without dequantizing them: the CPU decode fast path.

Decoding one token reads every weight once, so on a CPU it is bound by memory bandwidth. A
`PackedLinear` keeps the file's 4-/8-bit codes next to the dense fp32 weight and, for the few rows
of a decode step, multiplies with the codes through the C kernels (kernels.py). Everything else
(prefill, training, other devices) uses the dense weight, the exact dequantization of the same codes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import cpu
from .kernels import GROUP, MAX_ROWS, fast_path, packed_matmul
from .nf4 import DequantLinear


@dataclass
class PackedWeight:
    """Codes of an [N, K] matrix in groups of 32 along K (per row and group):

    kind "q4": uint8 [N, K/2], GGML nibble order (byte j of a group: element j low, j + 16 high);
        w = code * scale + zero.
    kind "q5": uint8 [N, K/32 * 20], per group those 16 nibble bytes, then the fifth bits as 4 bytes
        (byte j, bit i: element j + 4i); w = code * scale + zero.
    kind "q6": uint8 [N, K/32 * 24], per group the 16 nibble bytes, then the top two bits as 8 bytes (byte j,
        bits 2i..2i+1: element j + 8i); scale float32 [N, K/32, 2], one per 16 elements;
        w = (code - 32) * scale, zero unused.
    kind "q8": int8 [N, K]; w = code * scale, zero unused.

    ``rest``: further rows of another kind, stacked below these (a fused q/k/v matrix whose parts the file
    stores in different types, as Q4_K_M files do); `rows` is this segment's row count.
    """

    kind: str
    codes: torch.Tensor
    scale: torch.Tensor  # float32 [N, K / 32] ("q6": [N, K / 32, 2])
    zero: torch.Tensor  # float32 [N, K / 32]
    rest: PackedWeight | None = None

    @property
    def rows(self) -> int:
        return self.codes.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        return self.rows + (self.rest.shape[0] if self.rest is not None else 0), self.scale.shape[1] * GROUP

    @property
    def nbytes(self) -> int:
        """Bytes a product reads: codes, scales and (where used) zero points."""
        used = (self.codes, self.scale) + ((self.zero,) if self.kind in ("q4", "q5") else ())
        return sum(t.numel() * t.element_size() for t in used) + (self.rest.nbytes if self.rest is not None else 0)

    @property
    def kinds(self) -> str:
        """The kinds of the segments, e.g. "q4" or "q4+q6"."""
        return self.kind + (f"+{self.rest.kinds}" if self.rest is not None else "")

    def apply(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> PackedWeight:
        """``fn`` (e.g. a move to a device) applied to every tensor of every segment."""
        rest = self.rest.apply(fn) if self.rest is not None else None
        return PackedWeight(self.kind, fn(self.codes), fn(self.scale), fn(self.zero), rest)

    def dequantize(self) -> torch.Tensor:
        if self.rest is not None:
            return torch.cat([PackedWeight(self.kind, self.codes, self.scale, self.zero).dequantize(),
                              self.rest.dequantize()])
        n, k = self.shape
        g = k // GROUP
        if self.codes.device.type != "cpu":  # the same formula in torch ops, on the codes' device
            shifts = torch.arange(8, dtype=torch.uint8, device=self.codes.device)
            q = _unpack(self.codes.view(n, g, -1), self.kind, torch.cat, shifts).float()
            scale, zero = self.scale, self.zero
        else:  # numpy: several times faster than torch's uint8 ops here, and loading does this per matrix.
            q = _unpack(self.codes.numpy().reshape(n, g, -1), self.kind, np.concatenate,
                        np.arange(8, dtype=np.uint8)).astype(np.float32)
            scale, zero = self.scale.numpy(), self.zero.numpy()
        if self.kind == "q6":
            w = (q.reshape(n, g, 2, 16) - 32) * scale[..., None]
        else:
            w = q * scale[..., None] + zero[..., None]
        return w.reshape(n, k) if isinstance(w, torch.Tensor) else torch.from_numpy(w.reshape(n, k))

    def map_rows(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> PackedWeight:
        """Apply a row permutation (e.g. undoing llama.cpp's q/k order) to every part of one segment."""
        if self.rest is not None:
            raise ValueError("a row permutation of stacked segments of different kinds")
        return self.apply(fn)

    @staticmethod
    def cat(parts: list[PackedWeight]) -> PackedWeight:
        """Stack along rows (fusing q/k/v or gate/up): runs of one kind are joined, a change of kind
        starts a new segment."""
        segments: list[PackedWeight] = []
        for p in parts:
            while p is not None:
                head = PackedWeight(p.kind, p.codes, p.scale, p.zero)
                if segments and segments[-1].kind == p.kind:
                    last = segments.pop()
                    head = PackedWeight(p.kind, *(torch.cat([getattr(last, a), getattr(head, a)])
                                                  for a in ("codes", "scale", "zero")))
                segments.append(head)
                p = p.rest
        out = segments.pop()
        while segments:
            s = segments.pop()
            out = PackedWeight(s.kind, s.codes, s.scale, s.zero, out)
        return out


def _unpack(c: Any, kind: str, cat: Callable, shifts: Any) -> Any:
    """Codes [n, groups, bytes] (numpy or torch) -> integer codes [n, groups, 32] ("q6": 0..63, before the -32)."""
    if kind == "q8":
        return c
    nib = c[..., :16]
    q = cat([nib & 0x0F, nib >> 4], -1)
    if kind == "q5":
        bits = ((c[..., 16:20, None] >> shifts) & 1).swapaxes(-1, -2)  # [n, g, bit i, byte j]: element 4i + j
        q = q | (bits.reshape(*bits.shape[:-2], 32) << 4)
    elif kind == "q6":
        top = c[..., 16:24]
        q = q | (cat([(top >> s) & 3 for s in (0, 2, 4, 6)], -1) << 4)
    return q


def _pack(q: np.ndarray, kind: str) -> np.ndarray:
    """Integer codes [n, groups, 32] (uint8) -> the kind's bytes [n, groups * (16, 20 or 24)]."""
    n, g, _ = q.shape
    parts = [(q[..., :16] & 0x0F) | ((q[..., 16:] & 0x0F) << 4)]
    if kind == "q5":  # byte j, bit i: element j + 4i
        fifth = ((q >> 4) & 1).reshape(n, g, 8, 4) << np.arange(8, dtype=np.uint8)[:, None]
        parts.append(np.bitwise_or.reduce(fifth, axis=-2))
    elif kind == "q6":
        top = (q >> 4) & 3
        parts.append(top[..., 0:8] | (top[..., 8:16] << 2) | (top[..., 16:24] << 4) | (top[..., 24:32] << 6))
    return np.concatenate(parts, -1).reshape(n, -1)


# Bytes per block of the GGUF types `from_gguf_blocks` keeps as codes.
_BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q5_0": 22, "Q5_1": 24, "Q8_0": 34, "Q4_K": 144, "Q5_K": 176, "Q6_K": 210}
QK_K = 256  # weights per K-quant super-block


def _f16(b: np.ndarray) -> np.ndarray:
    return b.copy().view(np.float16)[..., 0].astype(np.float32)


def _k_scales(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K / Q5_K: 12 bytes [..., 12] -> the 8 sub-blocks' 6-bit scales and mins [..., 8] (GGML's layout)."""
    d, m, md = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], -1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], -1)
    return sc.astype(np.float32), mn.astype(np.float32)


def from_gguf_blocks(raw: np.ndarray, qtype: str, n: int, k: int) -> PackedWeight | None:
    """Re-lay raw GGUF blocks (uint8 [n, bytes]) as codes, scales and zero points; None for other types.

    Q4_0, Q4_1 and Q4_K become "q4", Q5_0, Q5_1 and Q5_K "q5", Q6_K "q6", Q8_0 "q8". Every weight keeps its
    value: a K-quant sub-block of 32 (Q4_K, Q5_K) is one group with scale d * sc and zero -dmin * m, and
    Q6_K's sub-blocks of 16 keep their scales d * sc.
    """
    size = _BLOCK_BYTES.get(qtype)
    if size is None or k % (QK_K if qtype.endswith("_K") else GROUP):
        return None
    g = k // GROUP
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))
    if not qtype.endswith("_K"):
        b = np.asarray(raw).reshape(n, g, size)
        d = _f16(b[..., 0:2])
        if qtype == "Q4_0":  # w = d * (q - 8)
            return PackedWeight("q4", t(b[..., 2:].reshape(n, g * 16)), t(d), t(-8 * d))
        if qtype == "Q4_1":  # w = d * q + m
            return PackedWeight("q4", t(b[..., 4:].reshape(n, g * 16)), t(d), t(_f16(b[..., 2:4])))
        if qtype in ("Q5_0", "Q5_1"):  # d, [m,] 4 bytes of fifth bits (bit j: element j), 16 nibble bytes
            nib = b[..., size - 16:]
            fifth = np.unpackbits(b[..., size - 20:size - 16], axis=-1, bitorder="little")
            codes = _pack(np.concatenate([nib & 0x0F, nib >> 4], -1) | (fifth << 4), "q5")
            zero = -16 * d if qtype == "Q5_0" else _f16(b[..., 2:4])  # w = d * (q - 16) or d * q + m
            return PackedWeight("q5", t(codes), t(d), t(zero))
        return PackedWeight("q8", t(b[..., 2:].reshape(n, g * GROUP).view(np.int8)), t(d), t(np.zeros_like(d)))
    nb = k // QK_K
    b = np.asarray(raw).reshape(n, nb, size)
    if qtype == "Q6_K":  # ql [128], qh [64], int8 scales [16], d; w = d * sc * (q - 32), sub-blocks of 16
        ql = (b[..., 0:128].reshape(n, nb, 2, 1, 64) >> np.array([0, 4], np.uint8)[:, None]) & 0x0F
        qh = (b[..., 128:192].reshape(n, nb, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8)[:, None]) & 3
        q = ql.reshape(n, nb, 2, 128) | (qh.reshape(n, nb, 2, 128) << 4)
        scale = _f16(b[..., 208:210])[..., None] * b[..., 192:208].view(np.int8).astype(np.float32)
        return PackedWeight("q6", t(_pack(q.reshape(n, g, 32), "q6")), t(scale.reshape(n, g, 2)),
                            t(np.zeros((n, g), np.float32)))
    # Q4_K / Q5_K: d, dmin, 12 bytes of scales and mins, [Q5_K: 32 bytes of fifth bits], nibbles;
    # sub-block j (32 weights): w = d * sc[j] * q - dmin * m[j]
    sc, mn = _k_scales(b[..., 4:16])
    scale, zero = _f16(b[..., 0:2])[..., None] * sc, -(_f16(b[..., 2:4])[..., None] * mn)
    nib = b[..., size - 128:].reshape(n, nb, 4, 1, 32) >> np.array([0, 4], np.uint8)[:, None]
    q = (nib & 0x0F).reshape(n, nb, 8, 32)
    kind = "q4"
    if qtype == "Q5_K":  # bit j of the fifth-bit byte l belongs to sub-block j, element l
        q = q | (((b[..., None, 16:48] >> np.arange(8, dtype=np.uint8)[:, None]) & 1) << 4)
        kind = "q5"
    return PackedWeight(kind, t(_pack(q.reshape(n, g, 32), kind)), t(scale.reshape(n, g)), t(zero.reshape(n, g)))


def use_packed(x: torch.Tensor, w: PackedWeight | None) -> bool:
    """Whether this product can take the packed path: CPU fp32 inference on a few rows (cpu.packed_rows)."""
    return w is not None and x.numel() <= cpu.packed_rows(MAX_ROWS) * w.shape[1] and fast_path(x)


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
            self.packed = p.apply(fn)  # type: ignore[union-attr]
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
            if cpu.use_bf16(x, self.out_features, MAX_ROWS):
                return cpu.bf16_linear(self, x, self.weight, self.bias)
            return F.linear(x, self.weight, self.bias)
        y = packed_matmul(x, self.packed)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        if self.weight is None:
            return f"in_features={self.in_features}, out_features={self.out_features}, quant={self.packed.kinds}"  # type: ignore[union-attr]
        return super().extra_repr()
