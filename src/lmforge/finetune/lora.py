"""LoRA adapters (Hu et al., 2021) and QLoRA (a frozen 4-bit base, see qlora.py).

`apply_lora` wraps the targeted linear layers in `LoraLinear`: y = base(x) + (dropout(x) @ A.T @ B.T) * alpha/r,
with A [r, in] kaiming-uniform and B [out, r] zero, so the wrapped model starts out computing exactly what
the base does. Every base parameter is frozen; only A and B train.

Adapters are saved in PEFT's layout (`adapter_model.safetensors` + `adapter_config.json`), so transformers
+ peft load them on the HF export of the same base. Our fused layers map exactly onto PEFT's separate
projections: a fused q/k/v (or gate/up) adapter is exported as one shared A with B split by rows, and
separate PEFT adapters are imported into a fused layer by stacking their A's and making B block-diagonal.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LMForgeError
from ..formats.hf_names import HF_TARGETS, base_prefix, hf_names
from ..fsutil import atomic_dir, read_json
from ..quant.nf4 import NF4Linear
from ..quant.packed import PackedLinear
from .qlora import is_stored, packed_codes, quantize_model

QUANTS = (None, "nf4", "packed")
PREFIX = "base_model.model."  # PEFT's prefix for the wrapped model's tensors
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"

@dataclass
class LoraConfig:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("qkv", "o", "gate_up", "down")  # matched against module-name suffixes
    quant: str | None = None  # None (LoRA), "nf4" (QLoRA: frozen base in NF4) or "packed" (keep GGUF codes)

    def __post_init__(self) -> None:
        self.targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        if int(self.r) < 1:
            raise LMForgeError(f"LoRA rank r must be at least 1, got {self.r}")
        if self.alpha <= 0:
            raise LMForgeError(f"LoRA alpha must be positive, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise LMForgeError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if self.quant not in QUANTS:
            raise LMForgeError(f"unknown LoRA quantization {self.quant!r} (supported: nf4, packed)")
        if not self.targets:
            raise LMForgeError("LoRA targets are empty")


class LoraLinear(nn.Module):
    """A frozen linear layer (nn.Linear, PackedLinear or NF4Linear) plus a trainable low-rank update."""

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        device, dtype = _device_dtype(base)
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear and PEFT initialise A
        self.scale = alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.disabled = False

    @property
    def r(self) -> int:
        return self.lora_A.shape[0]

    def delta_weight(self) -> torch.Tensor:
        """The update this adapter adds to the base weight: B @ A * scale, in fp32."""
        return (self.lora_B.detach().float() @ self.lora_A.detach().float()) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.disabled:
            return y
        a = self.dropout(x).to(self.lora_A.dtype)
        return y + (F.linear(F.linear(a, self.lora_A), self.lora_B) * self.scale).to(y.dtype)

    def extra_repr(self) -> str:
        return f"r={self.r}, scale={self.scale:g}"


def _device_dtype(base: nn.Module) -> tuple[torch.device, torch.dtype]:
    if is_stored(base):
        return base.device, base.dtype
    return base.weight.device, base.weight.dtype


def _wrappable(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear | NF4Linear)


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLinear]]:
    for name, m in model.named_modules():
        if isinstance(m, LoraLinear):
            yield name, m


def resolve_targets(model: nn.Module, targets: tuple[str, ...]) -> list[str]:
    """Names of the linear layers the targets select (our suffixes, HF names, or "all-linear")."""
    names = [n for n, m in model.named_modules() if _wrappable(m)]
    if "all-linear" in targets:  # PEFT's shorthand: every linear layer but the output head
        return [n for n in names if n != "lm_head"]
    ours = [o for t in targets for o in HF_TARGETS.get(t, (t,))]
    return [n for n in names if any(_matches(n, t) for t in ours)]


def apply_lora(model: nn.Module, cfg: LoraConfig) -> list[str]:
    """Freeze every base parameter, quantize the blocks' matrices if `cfg.quant`, and wrap the targeted
    linear layers in LoraLinear; returns the wrapped module names. The output is unchanged at first."""
    if any(True for _ in lora_layers(model)):
        raise LMForgeError("the model already has LoRA adapters")
    names = resolve_targets(model, cfg.targets)
    if not names:
        some = [n for n, m in model.named_modules() if _wrappable(m)][:6]
        raise LMForgeError(f"no linear layer matches the LoRA targets {', '.join(cfg.targets)} "
                           f"(this model's are named like {', '.join(some)})")
    model.requires_grad_(False)
    if cfg.quant:
        quantize_model(model, cfg.quant)
    for name in names:
        _set(model, name, LoraLinear(model.get_submodule(name), cfg.r, cfg.alpha, cfg.dropout))
    model.lora_config = cfg
    return names


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable adapter parameters (A and B of every LoRA layer)."""
    return [p for _, m in lora_layers(model) for p in (m.lora_A, m.lora_B)]


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Within the block the model computes what its base does (e.g. DPO's reference model)."""
    layers = [m for _, m in lora_layers(model)]
    before = [m.disabled for m in layers]
    for m in layers:
        m.disabled = True
    try:
        yield
    finally:
        for m, d in zip(layers, before):
            m.disabled = d


def _dense(base: nn.Module) -> nn.Linear:
    """A plain nn.Linear computing what `base` does (a PackedLinear's codes go stale once merged into)."""
    if isinstance(base, nn.Linear) and not isinstance(base, PackedLinear):
        return base  # nn.Linear, or its CPU-accelerated subclass: the weight is all it computes with
    device, dtype = _device_dtype(base)
    with torch.device("meta"):
        out = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None)
    w = base.dequantize() if is_stored(base) else base.weight.detach()
    out.weight = nn.Parameter(w.to(device, dtype), requires_grad=False)
    if base.bias is not None:
        out.bias = nn.Parameter(base.bias.detach(), requires_grad=False)
    return out


@torch.no_grad()
def merge_lora(model: nn.Module) -> None:
    """Fold every adapter into its base weight (W += B @ A * scale) and unwrap it, in place.

    Quantized bases (QLoRA) are dequantized first, and the remaining quantized layers too: the result is
    an ordinary dense model (its weights stay frozen)."""
    for name, m in list(lora_layers(model)):
        dense = _dense(m.base)
        dense.weight += m.delta_weight().to(dense.weight.dtype)
        _set(model, name, dense)
    for name, m in [(n, m) for n, m in model.named_modules() if is_stored(m)]:
        _set(model, name, _dense(m))
    if hasattr(model, "lora_config"):
        del model.lora_config


# -- PEFT names --------------------------------------------------------------------------------------------------
def _peft_layout(model: nn.Module) -> dict[str, list[tuple[str, int, int]]]:
    """Our linear layer -> the PEFT/HF modules it holds, as (name, first row, end row).

    Fused layers list several parts (q/k/v, gate/up); families without an HF mapping keep our names."""
    cfg = getattr(model, "cfg", None)
    out: dict[str, list[tuple[str, int, int]]] = {}
    inner = {n + ".base" for n, _ in lora_layers(model)}
    for name, m in model.named_modules():
        if (_wrappable(m) or isinstance(m, LoraLinear)) and name not in inner:
            out[name] = [(name, 0, m.out_features)]
    if cfg is None or cfg.family not in ("llama", "qwen2", "gpt2", "t5", "bart"):
        return out
    prefix = base_prefix(cfg)
    for entry in hf_names(cfg):
        ours = entry.ours.removesuffix(".weight")
        if entry.ours.endswith(".weight") and ours in out:
            out[ours] = [((prefix if entry.base else "") + n.removesuffix(".weight"), a, b)
                         for n, a, b in entry.spans(out[ours][0][2])]
    return out


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors under PEFT's names (what `save_adapter` writes), detached copies."""
    layout = _peft_layout(model)
    sd: dict[str, torch.Tensor] = {}
    for name, m in lora_layers(model):
        for peft, start, stop in layout[name]:
            sd[f"{PREFIX}{peft}.lora_A.weight"] = m.lora_A.detach().clone()
            sd[f"{PREFIX}{peft}.lora_B.weight"] = m.lora_B.detach()[start:stop].clone()
    return sd


def _peft_targets(layout: dict[str, list[tuple[str, int, int]]], wrapped: set[str]) -> list[str]:
    """PEFT `target_modules` selecting exactly the wrapped parts: short suffixes when they do, else full names."""
    every = {p for parts in layout.values() for p, _, _ in parts}
    for depth in (1, 2):
        short = sorted({".".join(p.split(".")[-depth:]) for p in wrapped})
        if {p for p in every if any(_matches(p, t) for t in short)} == wrapped:
            return short
    return sorted(wrapped)


def adapter_config(model: nn.Module, base_model: str) -> dict[str, Any]:
    """PEFT's adapter_config.json for this model's adapters (per-layer ranks beyond r go to rank_pattern)."""
    layers = list(lora_layers(model))
    if not layers:
        raise LMForgeError("the model has no LoRA adapters to save")
    layout = _peft_layout(model)
    cfg: LoraConfig | None = getattr(model, "lora_config", None)
    r, alpha = (cfg.r, cfg.alpha) if cfg else Counter((m.r, m.scale * m.r) for _, m in layers).most_common(1)[0][0]
    dropout = cfg.dropout if cfg else next((m.dropout.p for _, m in layers if isinstance(m.dropout, nn.Dropout)), 0.0)
    rank_pattern, alpha_pattern = {}, {}
    for name, m in layers:
        for peft, _, _ in layout[name]:
            if m.r != r:
                rank_pattern[peft] = m.r
            if not math.isclose(m.scale * m.r, alpha, rel_tol=1e-6):
                alpha_pattern[peft] = m.scale * m.r
    model_cfg = getattr(model, "cfg", None)
    causal = model_cfg is None or (model_cfg.causal and model_cfg.head == "lm")
    task = "SEQ_2_SEQ_LM" if model_cfg is not None and model_cfg.decoder_layers else "CAUSAL_LM" if causal else None
    return {
        "peft_type": "LORA", "task_type": task, "base_model_name_or_path": base_model,
        "r": r, "lora_alpha": alpha, "lora_dropout": dropout,
        "target_modules": _peft_targets(layout, {p for n, _ in layers for p, _, _ in layout[n]}),
        "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern, "bias": "none",
        # GPT-2's HF layers are Conv1D ([in, out] weights); the adapters' shapes are the same either way.
        "fan_in_fan_out": bool(model_cfg is not None and model_cfg.family == "gpt2"),
        "use_rslora": False, "use_dora": False, "init_lora_weights": True, "inference_mode": True,
        "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None, "revision": None,
    }


def write_adapter(model: nn.Module, out: Path, base_model: str) -> None:
    """Write adapter_model.safetensors and adapter_config.json into an existing directory."""
    from safetensors.torch import save_file

    config = adapter_config(model, base_model)
    tensors = {k: v.cpu().contiguous() for k, v in adapter_state_dict(model).items()}
    save_file(tensors, str(Path(out) / WEIGHTS_FILE), metadata={"format": "pt"})
    (Path(out) / CONFIG_FILE).write_text(json.dumps(config, indent=2), encoding="utf-8")


def save_adapter(model: nn.Module, out_dir: str | Path, base_model: str) -> Path:
    """Save the adapters as a PEFT directory, atomically (a complete new directory replaces an old one)."""
    with atomic_dir(out_dir, marker=CONFIG_FILE) as tmp:
        write_adapter(model, tmp, base_model)
    return Path(out_dir).expanduser()


# -- loading ------------------------------------------------------------------------------------------------------
def _pattern(patterns: dict[str, Any], module: str, default: Any) -> Any:
    for key, value in patterns.items():  # PEFT's rule: the key matches the end of the module's name
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def read_adapter(adapter_dir: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """adapter_config.json and the tensors of a PEFT LoRA directory (safetensors only: no pickles)."""
    d = Path(adapter_dir).expanduser()
    if not (d / CONFIG_FILE).is_file():
        raise LMForgeError(f"{d}: not an adapter directory (no {CONFIG_FILE})")
    config = read_json(d / CONFIG_FILE)
    if not isinstance(config, dict) or config.get("peft_type", "LORA") != "LORA":
        raise LMForgeError(f"{d}: not a LoRA adapter (peft_type {config.get('peft_type')!r})")
    for key in ("use_dora", "lora_bias", "modules_to_save", "trainable_token_indices"):
        if config.get(key):
            raise LMForgeError(f"{d}: adapters with {key} are not supported")
    if not (d / WEIGHTS_FILE).is_file():
        other = " (adapter_model.bin is a pickle, which lmforge does not load)" if (d / "adapter_model.bin").exists() else ""
        raise LMForgeError(f"{d}: no {WEIGHTS_FILE}{other}")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(d / WEIGHTS_FILE))
    except (SafetensorError, OSError) as e:
        raise LMForgeError(f"{d / WEIGHTS_FILE}: cannot read ({e})") from None
    return config, tensors


def _fused_adapters(model: nn.Module, config: dict[str, Any], tensors: dict[str, torch.Tensor], where: Path
                    ) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """Our layer name -> (A, B, scale), fusing separate PEFT projections into our fused layers."""
    layout = _peft_layout(model)
    owner = {p: (ours, a, b) for ours, parts in layout.items() for p, a, b in parts}
    r, alpha = int(config.get("r", 8)), float(config.get("lora_alpha", 8))
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.default)?\.weight", key)
        if m is None:
            raise LMForgeError(f"{where}: unsupported adapter tensor {key!r} (only LoRA A/B matrices are read)")
        if m.group(1) not in owner:
            raise LMForgeError(f"{where}: adapter tensor {key!r} names a layer this model does not have")
        pairs.setdefault(m.group(1), {})[m.group(2)] = t
    grouped: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor, float]]] = {}
    for peft, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise LMForgeError(f"{where}: {peft} has lora_{next(iter(ab))} but no lora_{'B' if 'A' in ab else 'A'}")
        ours, start, stop = owner[peft]
        a, b = ab["A"], ab["B"]
        rank = a.shape[0] if a.dim() == 2 else -1
        inp = model.get_submodule(ours).in_features
        for t, want, which in ((a, (rank, inp), "A"), (b, (stop - start, rank), "B")):
            if tuple(t.shape) != want:
                raise LMForgeError(f"{where}: adapter is for a different base model: {PREFIX}{peft}.lora_{which}.weight "
                                   f"has shape {tuple(t.shape)}, this model's {peft} needs {want}")
        r_p = _pattern(config.get("rank_pattern") or {}, peft, r)
        a_p = _pattern(config.get("alpha_pattern") or {}, peft, alpha)
        scale = a_p / (math.sqrt(r_p) if config.get("use_rslora") else r_p)
        grouped.setdefault(ours, {})[peft] = (a, b, scale)
    fused: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
    for ours, found in grouped.items():
        parts = layout[ours]
        first = found[next(p for p, _, _ in parts if p in found)]
        same = len(found) == len(parts) and all(
            torch.equal(found[p][0], first[0]) and found[p][2] == first[2] for p, _, _ in parts)
        if same:  # one shared A (as we export): B is the parts' rows stacked, the same rank r
            fused[ours] = (first[0], torch.cat([found[p][1] for p, _, _ in parts]), first[2])
            continue
        # Separate adapters: A's rows stacked, B block-diagonal, each block rescaled to the first part's scale.
        a_all = torch.cat([found[p][0] for p, _, _ in parts if p in found])
        b_all = a_all.new_zeros(parts[-1][2], a_all.shape[0])
        col = 0
        for p, start, stop in parts:
            if p in found:
                a, b, s = found[p]
                b_all[start:stop, col:col + a.shape[0]] = b.to(b_all.dtype) * (s / first[2])
                col += a.shape[0]
        fused[ours] = (a_all, b_all, first[2])
    return fused


def load_adapter(model: nn.Module, adapter_dir: str | Path, quant: str | None = None) -> LoraConfig:
    """Apply a saved adapter (ours or PEFT's) to `model` and load its weights; returns its LoraConfig.

    On a model without adapters this freezes it, quantizes it if `quant`, and wraps the adapter's layers;
    on one that already has adapters on the same layers (resuming), the weights are copied in place."""
    d = Path(adapter_dir).expanduser()
    config, tensors = read_adapter(d)
    fused = _fused_adapters(model, config, tensors, d)
    if not fused:
        raise LMForgeError(f"{d}: the adapter has no LoRA tensors")
    existing = dict(lora_layers(model))
    dropout = float(config.get("lora_dropout") or 0.0)
    cfg = LoraConfig(r=int(config.get("r", 8)), alpha=float(config.get("lora_alpha", 8)), dropout=dropout,
                     targets=tuple(sorted({n.rsplit(".", 1)[-1] for n in fused})), quant=quant)
    if existing:
        if set(existing) != set(fused):
            raise LMForgeError(f"{d}: the model's LoRA layers differ from the adapter's")
    else:
        model.requires_grad_(False)
        if quant:
            quantize_model(model, quant)
    with torch.no_grad():
        for name, (a, b, scale) in fused.items():
            layer = existing.get(name)
            if layer is None or layer.r != a.shape[0]:
                base = layer.base if layer is not None else model.get_submodule(name)
                layer = LoraLinear(base, a.shape[0], scale * a.shape[0], dropout)
                _set(model, name, layer)
            layer.lora_A.copy_(a)
            layer.lora_B.copy_(b)
            layer.scale = scale
    if not existing:
        model.lora_config = cfg
    return cfg


def adapter_base(path: str | Path) -> str | None:
    """The base model an adapter directory names (base_model_name_or_path), or None for anything else."""
    d = Path(path).expanduser()
    if not d.is_dir() or not (d / CONFIG_FILE).is_file() or (d / "config.json").exists():
        return None
    config = read_json(d / CONFIG_FILE)
    base = config.get("base_model_name_or_path") if isinstance(config, dict) else None
    if not base:
        raise LMForgeError(f"{d}: the adapter does not name its base model (base_model_name_or_path); "
                           "load the base with --adapter instead")
    return str(base)


def attach_adapter(model: nn.Module, adapter_dir: str | Path) -> bool:
    """Load an adapter for inference; returns whether it was merged.

    Merged into dense weights it costs nothing per token. A layer that decodes from a GGUF file's packed
    codes would lose them on merging, so such models keep the adapters beside the codes instead: the
    packed kernel plus a rank-r product is faster per token than a dense fp32 matrix."""
    load_adapter(model, adapter_dir)
    if any(packed_codes(m.base) is not None for _, m in lora_layers(model)):
        return False
    merge_lora(model)
    return True


def merge_to_hf(base: str | Path, adapter_dir: str | Path, out_dir: str | Path,
                device: str | torch.device | None = None) -> Path:
    """Load a base model, fold an adapter into it and write an HF directory (atomically)."""
    from ..formats import load_checkpoint
    from ..formats.export import save_hf
    from ..registry import resolve

    read_adapter(adapter_dir)  # fail on a bad adapter before loading the model
    path = resolve(str(base))
    if Path(out_dir).expanduser().resolve() in (Path(adapter_dir).expanduser().resolve(), path.resolve()):
        raise LMForgeError(f"{out_dir} is the adapter or the base model; write the merged model elsewhere")
    ck = load_checkpoint(path, device=device or "cpu", dtype=torch.float32, packed=False)
    load_adapter(ck.model, adapter_dir)
    merge_lora(ck.model)
    return save_hf(ck.model, out_dir, ck.tokenizer)
