"""QLoRA's frozen base: the blocks' matrices held only as codes, NF4 (`quant.nf4.NF4Linear`) or a GGUF
file's own (`quant.PackedLinear.frozen`).

Each such layer keeps only its codes (about 0.56 bytes per weight for NF4 instead of 4) and dequantizes
the matrix for each product, in forward and again in backward, so autograd never holds a dense copy:
gradients flow to the layer's input (and on to the LoRA adapters) but never to the codes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn

from ..errors import LMForgeError
from ..model import ModelConfig, Transformer
from ..quant.nf4 import NF4Linear, nf4_quantize
from ..quant.packed import PackedLinear, PackedWeight


def packed_codes(linear: nn.Module) -> PackedWeight | None:
    """A PackedLinear's file codes while they still match its dense weight, else None."""
    if isinstance(linear, PackedLinear) and linear.weight is not None and linear.packed is not None \
            and linear.weight._version == linear._version:
        return linear.packed
    return None


def is_stored(m: nn.Module) -> bool:
    """Whether a layer holds its matrix only as codes (a frozen QLoRA base: NF4 or a GGUF file's codes)."""
    return isinstance(m, NF4Linear) or (isinstance(m, PackedLinear) and m.weight is None)


def quantize_linear(linear: nn.Linear, quant: str) -> nn.Module:
    """A frozen stand-in for a linear layer: its weight in NF4 ("nf4"), or its file codes alone ("packed";
    NF4 for a layer that has none, e.g. a GGUF tensor type without a packed kernel)."""
    if quant not in ("nf4", "packed"):
        raise LMForgeError(f"unknown quantization {quant!r} (supported: nf4, packed)")
    codes = packed_codes(linear) if quant == "packed" else None
    if codes is not None:
        return PackedLinear.frozen(codes, linear.bias, linear.weight.dtype)
    return NF4Linear.from_linear(linear)


def _quantizable(name: str) -> bool:
    # The transformer blocks' matrices; embeddings and the output head stay dense, as in QLoRA.
    return name.startswith("layers.") and name.endswith(".weight")


def quantize_model(model: nn.Module, quant: str) -> list[str]:
    """Replace every frozen linear layer inside the blocks by its quantized stand-in; returns their names."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not is_stored(m)
             and _quantizable(n + ".weight")]
    if quant == "packed" and names and not any(packed_codes(model.get_submodule(n)) is not None for n in names):
        raise LMForgeError("quant 'packed' needs a GGUF model loaded with its packed codes (Q4_0, Q4_1, Q5_0, Q5_1, "
                           "Q8_0, Q4_K, Q5_K or Q6_K matrices, fp32 on CPU); use quant 'nf4' for other models")
    for name in names:
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, quantize_linear(model.get_submodule(name), quant))
    return names


def load_quantized(path: str | Path, quant: str, device: torch.device | str | None = None,
                   dtype: torch.dtype | None = None):  # -> formats.Checkpoint
    """Load a `.gguf` file or HF directory with the blocks' matrices quantized as they stream in.

    Peak memory stays near the quantized model's size: no dense copy of the whole model ever exists
    (`load_checkpoint` followed by `quantize_model` would hold one first). The result has no LoRA yet.
    """
    from ..device import placement
    from ..formats import Checkpoint, open_source

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
    from ..formats import build_model

    def store(name: str, t: torch.Tensor | PackedWeight) -> Callable[[torch.Tensor | None], nn.Module] | None:
        if not (_quantizable(name) and len(t.shape) == 2):
            return None  # e.g. a quantized output matrix: kept dense, as in QLoRA
        if isinstance(t, PackedWeight):
            codes = t.apply(lambda a: a.to(device))
            return lambda bias: PackedLinear.frozen(codes, bias, dtype)
        out, inp = t.shape  # NF4 right away, so this matrix's dense copy is freed before the next one loads
        nf4 = nf4_quantize(t.to(device=device, dtype=dtype))
        return lambda bias: NF4Linear(out, inp, bias, dtype, *nf4)

    return build_model(cfg, weights, device, dtype, store=store)
