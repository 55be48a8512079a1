"""Model files: HF directories and GGUF files read into the one model core, and written back.

`hf` and `gguf` read, `export` and `gguf_write` write, `gguf_t5` holds llama.cpp's T5 layout for both,
`hf_names` is the one table of HF tensor names (loading, export and PEFT adapters), `inspect` describes a
file without loading it.
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..device import placement, prepare_inference
from ..errors import LMForgeError
from ..model import ModelConfig, Transformer, make_model
from ..quant import PackedWeight, accelerate, kernels
from ..registry import home
from ..tokenizer import Tokenizer


@dataclass
class Checkpoint:
    model: Transformer
    tokenizer: Tokenizer | None
    config: ModelConfig
    path: Path
    format: str  # "gguf" | "hf"
    tensor_types: dict[str, int] = field(default_factory=dict)


# A stored format for some of a model's matrices (QLoRA): (tensor name, dense tensor or file codes) -> a
# builder of the layer that holds the matrix in that format, given the layer's bias; None keeps it dense.
StoreAs = Callable[[str, torch.Tensor | PackedWeight], Callable[[torch.Tensor | None], nn.Module] | None]


def kernel_dir() -> Path:
    """Where the CPU kernels are compiled and cached."""
    return home() / "kernels"


def build_model(cfg: ModelConfig, weights: Iterable[tuple[str, torch.Tensor | PackedWeight]], device: torch.device,
                dtype: torch.dtype, progress: bool = False, store: StoreAs | None = None) -> Transformer:
    """Build on the meta device and assign weights as they stream in: at most one model's worth of memory.

    A `PackedWeight` gives its layer a `PackedLinear`, which keeps the codes for fast CPU decoding. With
    ``store``, the matrices it takes are held in its format instead (no dense copy is ever kept) and the
    other file codes are dequantized. The CPU fast paths are installed (`quant.accelerate`).
    """
    from tqdm import tqdm

    with torch.device("meta"):
        model = make_model(cfg)
    expected = dict(model.state_dict())
    state: dict[str, torch.Tensor] = {}
    packed: dict[str, PackedWeight] = {}
    stored: dict[str, Callable[[torch.Tensor | None], nn.Module]] = {}
    for name, t in tqdm(weights, desc="loading", unit=" tensors", disable=not progress, leave=False):
        if isinstance(t, PackedWeight):
            packed[name.removesuffix(".weight")] = t
            if name not in expected:  # codes of a tied output matrix: no dense copy of its own
                continue
        if name not in expected:
            raise LMForgeError(f"unexpected tensor {name!r} for a {cfg.family} model")
        if tuple(t.shape) != tuple(expected[name].shape):
            raise LMForgeError(f"tensor {name!r} has shape {tuple(t.shape)}, config expects {tuple(expected[name].shape)}")
        make = store(name, t) if store is not None else None
        if make is not None:
            stored[name.removesuffix(".weight")] = make
            continue
        if isinstance(t, PackedWeight):
            t = t.dequantize()
        state[name] = t.to(device=device, dtype=dtype)
    missing = sorted(set(expected) - set(state) - {m + ".weight" for m in stored})
    if missing:
        raise LMForgeError(f"checkpoint lacks {len(missing)} tensors, e.g. {missing[0]!r}")
    model.load_state_dict(state, assign=True, strict=not stored)
    for mod, make in stored.items():
        parent, _, attr = mod.rpartition(".")
        setattr(model.get_submodule(parent), attr, make(state.get(mod + ".bias")))
    prepare_inference(device)
    return accelerate(model.eval(), kernel_dir(), packed if store is None else None)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Just the tokenizer of a `.gguf` file or a directory with tokenizer.json (no weights read)."""
    path = Path(path)
    if path.is_dir():
        return Tokenizer.from_dir(path)
    if path.suffix.lower() == ".gguf":
        from .gguf import GGUFFile

        return Tokenizer.from_gguf_metadata(GGUFFile(path).meta)
    raise LMForgeError(f"{path}: not a .gguf file or a directory with tokenizer.json")


@dataclass
class Source:
    """A model file or directory, opened: its config and tokenizer read, its weights not yet."""

    path: Path
    fmt: str  # "hf" or "gguf"
    config: ModelConfig
    tokenizer: Tokenizer | None
    gguf: Any = None  # the GGUFFile of a .gguf source

    def weights(self, packed: bool = False) -> Iterable[tuple[str, torch.Tensor | PackedWeight]]:
        """Stream the weights, tensor by tensor (``packed``: keep GGUF block codes where supported)."""
        if self.fmt == "hf":
            from .hf import load_hf_weights

            return load_hf_weights(self.path, self.config)
        return self.gguf.state_dict(self.config, packed=packed)


def open_source(path: str | Path) -> Source:
    """Open a `.gguf` file or an HF-style directory (config.json + safetensors [+ tokenizer.json])."""
    path = Path(path)
    if not path.exists():
        raise LMForgeError(f"no such file or directory: {path}")
    if path.is_dir():
        from ..fsutil import read_json
        from .hf import config_from_hf, header_state_dict, tensor_shapes

        if not (path / "config.json").exists():
            raise LMForgeError(f"{path}: not a model directory (no config.json)")
        shapes = tensor_shapes(path)
        cfg = config_from_hf(read_json(path / "config.json"), set(shapes))
        layer_key = "n_layer" if cfg.family == "gpt2" else "num_hidden_layers"
        check_layout(cfg, set(shapes), lambda: header_state_dict(cfg, shapes), f"{path}: config.json", layer_key)
        tok = Tokenizer.from_dir(path) if (path / "tokenizer.json").exists() else None
        return Source(path, "hf", cfg, tok)
    if path.suffix.lower() != ".gguf":
        raise LMForgeError(f"{path}: not a .gguf file or a model directory")
    from .gguf import GGUFFile

    g = GGUFFile(path)
    cfg = g.config()
    check_layout(cfg, set(g.tensors), lambda: g.state_dict(cfg, headers_only=True), f"{path}: GGUF metadata",
                 f"{g.arch}.block_count")
    return Source(path, "gguf", cfg, Tokenizer.from_gguf_metadata(g.meta), g)


# The tensor-name piece that numbers layers: "model.layers.3.", "transformer.h.3.", "encoder.layer.3.", "blk.3.".
_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|h|layer|blk)\.(\d+)\.")


def check_layout(cfg: ModelConfig, names: set[str], header_weights: Callable[[], Iterable[tuple[str, Any]]],
                 where: str, layer_key: str) -> None:
    """The file's tensors against its config, from headers alone and before any model is built: a
    config that disagrees with the weights (a layer count, a width) is refused at once, not after
    building every layer it names. ``header_weights`` yields our (name, meta tensor) pairs."""
    layers = {int(m.group(1)) for n in names if (m := _LAYER_INDEX.search(n))}
    # An encoder-decoder's two stacks are counted where its config.json is read.
    if len(layers) != cfg.n_layers and not cfg.decoder_layers:
        n = len(layers)
        raise LMForgeError(f"{where} gives {layer_key}={cfg.n_layers}, but the weights hold {n} layer{'s' * (n != 1)}")
    with torch.device("meta"):  # one block stands for all: every block has the same shapes
        one = make_model(dataclasses.replace(cfg, n_layers=1, decoder_layers=min(cfg.decoder_layers, 1),
                                             sliding_layers=None))
    expected = {k: tuple(v.shape) for k, v in one.state_dict().items()}
    for name, t in header_weights():
        key = _LAYER_INDEX.sub(".layers.0.", "." + name, count=1).lstrip(".")
        if key not in expected:
            raise LMForgeError(f"unexpected tensor {name!r} for a {cfg.family} model")
        if tuple(t.shape) != expected[key]:
            raise LMForgeError(f"{where} does not match the weights: tensor {name!r} has shape {tuple(t.shape)}, "
                               f"the config expects {expected[key]}")


def load_checkpoint(path: str | Path, device: torch.device | str | None = None,
                    dtype: torch.dtype | None = None, packed: bool | None = None,
                    progress: bool = False) -> Checkpoint:
    """Load a `.gguf` file or an HF-style directory (config.json + safetensors [+ tokenizer.json]).

    ``packed`` keeps the codes of GGUF Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/Q4_K/Q5_K/Q6_K matrices for the CPU decode
    kernels (default: on where they run, i.e. fp32 on a CPU with AVX2 and a C compiler); results equal the
    dense path's.
    """
    dev, dt = placement(device, dtype)
    src = open_source(path)
    if src.fmt == "hf":
        model = build_model(src.config, src.weights(), dev, dt, progress)
        types = Counter(str(p.dtype).replace("torch.", "") for p in model.parameters())
        return Checkpoint(model, src.tokenizer, src.config, src.path, "hf", dict(types))
    if packed is None:
        kernels.use_build_dir(kernel_dir())
        packed = dev.type == "cpu" and dt == torch.float32 and kernels.lib() is not None
    model = build_model(src.config, src.weights(packed), dev, dt, progress)
    types = Counter(t.tensor_type.name for t in src.gguf.tensors.values())
    return Checkpoint(model, src.tokenizer, src.config, src.path, "gguf", dict(types))
