"""Frozen 4-bit base weights for QLoRA: NF4 codes, or a GGUF file's own packed codes.

A `QuantLinear` stands in for a frozen nn.Linear. It keeps only the codes (about 0.56 bytes per weight for
NF4 instead of 4) and dequantizes the matrix for each product, in forward and again in backward, so
autograd never holds a dense copy: gradients flow to the layer's input (and on to the LoRA adapters)
but never to the codes.

NF4 is the 4-bit NormalFloat of the QLoRA paper (Dettmers et al., 2023), laid out as bitsandbytes does:
the flattened matrix in blocks of 64, one fp32 absmax scale per block, each weight the index of the
nearest of 16 levels (quantiles of a standard normal, scaled to [-1, 1], with an exact zero), two
indices per byte, the first in the high nibble.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LMForgeError
from ..model import ModelConfig, Transformer
from ..model.kernels import GROUP, packed_matmul
from ..model.quant import PackedLinear, PackedWeight, use_packed

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


def _packed_dequantize(p: PackedWeight) -> torch.Tensor:
    if p.codes.device.type == "cpu":
        return p.dequantize()
    n, k = p.shape  # the same formula on other devices, in torch ops
    c = p.codes.view(n, k // GROUP, -1)
    q = torch.cat([c & 0x0F, c >> 4], dim=-1) if p.kind == "q4" else c
    return (q.float() * p.scale[..., None] + p.zero[..., None]).view(n, k)


class _DequantLinear(torch.autograd.Function):
    """x @ W.T where W is rebuilt from codes in forward and again in backward: no dense W is kept."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: QuantLinear) -> torch.Tensor:  # type: ignore[override]
        ctx.layer = layer
        return F.linear(x, layer.dequantize().to(x.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, None]:  # type: ignore[override]
        if not ctx.needs_input_grad[0]:
            return None, None
        return grad @ ctx.layer.dequantize().to(grad.dtype), None


class QuantLinear(nn.Module):
    """A frozen linear layer stored as NF4 codes ("nf4") or a GGUF file's Q4/Q8 codes ("packed")."""

    def __init__(self, out_features: int, in_features: int, bias: torch.Tensor | None, dtype: torch.dtype,
                 *, nf4: tuple[torch.Tensor, torch.Tensor] | None = None, packed: PackedWeight | None = None) -> None:
        super().__init__()
        if (nf4 is None) == (packed is None):
            raise ValueError("QuantLinear takes exactly one of nf4 codes or packed codes")
        self.out_features, self.in_features, self.dtype = out_features, in_features, dtype
        self.quant = "nf4" if nf4 is not None else "packed"
        self.kind = "nf4" if nf4 is not None else packed.kind  # type: ignore[union-attr]
        # Buffers, so .to(device) moves them; not persistent: the state dict is for dense weights.
        parts = {"codes": nf4[0], "absmax": nf4[1]} if nf4 is not None else \
            {"codes": packed.codes, "scale": packed.scale, "zero": packed.zero}  # type: ignore[union-attr]
        for name, t in parts.items():
            self.register_buffer(name, t, persistent=False)
        self.bias = nn.Parameter(bias.detach(), requires_grad=False) if bias is not None else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, quant: str) -> QuantLinear:
        """Quantize a linear layer's weight ("nf4"), or keep its file codes ("packed"; falls back to NF4
        for a layer that has none, e.g. a GGUF tensor type without a packed kernel)."""
        w, bias = linear.weight.detach(), linear.bias
        out, inp = w.shape
        if quant == "packed" and packed_codes(linear) is not None:
            return cls(out, inp, bias, w.dtype, packed=packed_codes(linear))
        if quant not in ("nf4", "packed"):
            raise LMForgeError(f"unknown quantization {quant!r} (supported: nf4, packed)")
        return cls(out, inp, bias, w.dtype, nf4=nf4_quantize(w))

    @property
    def packed(self) -> PackedWeight | None:
        if self.quant != "packed":
            return None
        return PackedWeight(self.kind, self.codes, self.scale, self.zero)

    def dequantize(self) -> torch.Tensor:
        """The dense [out, in] weight these codes stand for, in the layer's compute dtype."""
        if self.quant == "nf4":
            return nf4_dequantize(self.codes, self.absmax, (self.out_features, self.in_features), self.dtype)
        return _packed_dequantize(self.packed).to(self.dtype)  # type: ignore[arg-type]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packed = self.packed
        if use_packed(x, packed):  # few-row CPU inference: the C kernel straight from the codes
            y = packed_matmul(x, packed)  # type: ignore[arg-type]
        else:
            y = _DequantLinear.apply(x, self)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, quant={self.kind}"


def packed_codes(linear: nn.Module) -> PackedWeight | None:
    """A PackedLinear's file codes while they still match its dense weight, else None."""
    if isinstance(linear, PackedLinear) and linear.packed is not None and linear.weight._version == linear._version:
        return linear.packed
    return None


def _quantizable(name: str) -> bool:
    # The transformer blocks' matrices; embeddings and the output head stay dense, as in QLoRA.
    return name.startswith("layers.") and name.endswith(".weight")


def quantize_model(model: nn.Module, quant: str) -> list[str]:
    """Replace every frozen linear layer inside the blocks by a QuantLinear; returns their names."""
    names = [n for n, m in model.named_modules() if type(m) in (nn.Linear, PackedLinear) and _quantizable(n + ".weight")]
    if quant == "packed" and names and not any(packed_codes(model.get_submodule(n)) is not None for n in names):
        raise LMForgeError("quant 'packed' needs a GGUF model loaded with its packed codes (Q4_0, Q4_1 or Q8_0 "
                           "matrices, fp32 on CPU); use quant 'nf4' for other models")
    for name in names:
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, QuantLinear.from_linear(model.get_submodule(name), quant))
    return names


def load_quantized(path: str | Path, quant: str, device: torch.device | str | None = None,
                   dtype: torch.dtype | None = None):  # -> formats.Checkpoint
    """Load a `.gguf` file or HF directory with the blocks' matrices quantized as they stream in.

    Peak memory stays near the quantized model's size: no dense copy of the whole model ever exists
    (`load_checkpoint` followed by `quantize_model` would hold one first). The result has no LoRA yet.
    """
    from ..formats import Checkpoint, open_source, placement

    if quant not in ("nf4", "packed"):
        raise LMForgeError(f"unknown quantization {quant!r} (supported: nf4, packed)")
    dev, dt = placement(device, dtype)
    src = open_source(path)
    if quant == "packed" and src.fmt != "gguf":
        raise LMForgeError(f"{src.path}: quant 'packed' keeps a GGUF file's codes; use quant 'nf4' for HF directories")
    model = _build_quantized(src.config, src.weights(packed=quant == "packed"), quant, dev, dt)
    return Checkpoint(model, src.tokenizer, src.config, src.path, src.fmt, {f"quant:{quant}": 1})


def _build_quantized(cfg: ModelConfig, weights: Iterable[tuple[str, torch.Tensor | PackedWeight]], quant: str,
                     device: torch.device, dtype: torch.dtype) -> Transformer:
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = dict(model.state_dict())
    state: dict[str, torch.Tensor] = {}
    quantized: dict[str, PackedWeight | tuple[torch.Tensor, torch.Tensor]] = {}
    for name, t in weights:
        if name not in expected:
            if isinstance(t, PackedWeight):  # codes of a tied output matrix: the decode path only
                continue
            raise LMForgeError(f"unexpected tensor {name!r} for a {cfg.family} model")
        shape = tuple(t.shape)
        if shape != tuple(expected[name].shape):
            raise LMForgeError(f"tensor {name!r} has shape {shape}, config expects {tuple(expected[name].shape)}")
        if _quantizable(name) and len(shape) == 2:
            if isinstance(t, PackedWeight):
                quantized[name] = PackedWeight(t.kind, *(a.to(device) for a in (t.codes, t.scale, t.zero)))
            else:  # NF4 right away, so this matrix's dense copy is freed before the next one loads
                quantized[name] = nf4_quantize(t.to(device=device, dtype=dtype))
            continue
        if isinstance(t, PackedWeight):  # e.g. a quantized output matrix: kept dense, as in QLoRA
            t = t.dequantize()
        state[name] = t.to(device=device, dtype=dtype)
    missing = sorted(set(expected) - set(state) - set(quantized))
    if missing:
        raise LMForgeError(f"checkpoint lacks {len(missing)} tensors, e.g. {missing[0]!r}")
    model.load_state_dict(state, assign=True, strict=False)
    for name, q in quantized.items():
        mod = name.removesuffix(".weight")
        parent, _, attr = mod.rpartition(".")
        out, inp = expected[name].shape
        kw = {"packed": q} if isinstance(q, PackedWeight) else {"nf4": q}
        setattr(model.get_submodule(parent), attr, QuantLinear(out, inp, state.get(mod + ".bias"), dtype, **kw))
    return model.eval()
