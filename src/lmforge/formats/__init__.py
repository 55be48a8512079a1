"""Reading models from disk: HF directories and GGUF files, into the one model core."""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import LMForgeError
from ..model import ModelConfig, Transformer
from ..model.kernels import lib
from ..model.quant import PackedLinear, PackedWeight
from ..tokenizer import Tokenizer


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def parse_device(device: torch.device | str) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise LMForgeError(f"invalid device {device!r} (use cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LMForgeError(f"device {device!r} requested, but CUDA is not available")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise LMForgeError(f"device {device!r} requested, but only {torch.cuda.device_count()} CUDA devices exist")
    return dev


def default_dtype(device: torch.device) -> torch.dtype:
    # bf16 on GPUs; fp32 on CPU, where bf16 matmuls are far slower.
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


@dataclass
class Checkpoint:
    model: Transformer
    tokenizer: Tokenizer | None
    config: ModelConfig
    path: Path
    format: str  # "gguf" | "hf"
    tensor_types: dict[str, int] = field(default_factory=dict)


def build_model(cfg: ModelConfig, weights: Iterable[tuple[str, torch.Tensor | PackedWeight]], device: torch.device,
                dtype: torch.dtype, progress: bool = False) -> Transformer:
    """Build on the meta device and assign weights as they stream in: at most one model's worth of memory.

    A `PackedWeight` gives its layer a `PackedLinear`, which keeps the codes for fast CPU decoding.
    """
    from tqdm import tqdm

    with torch.device("meta"):
        model = Transformer(cfg)
    expected = dict(model.state_dict())
    state: dict[str, torch.Tensor] = {}
    packed: dict[str, PackedWeight] = {}
    for name, t in tqdm(weights, desc="loading", unit=" tensors", disable=not progress, leave=False):
        if isinstance(t, PackedWeight):
            packed[name.removesuffix(".weight")] = t
            if name not in expected:  # codes of a tied output matrix: no dense copy of its own
                continue
            t = t.dequantize()
        if name not in expected:
            raise LMForgeError(f"unexpected tensor {name!r} for a {cfg.family} model")
        if tuple(t.shape) != tuple(expected[name].shape):
            raise LMForgeError(f"tensor {name!r} has shape {tuple(t.shape)}, config expects {tuple(expected[name].shape)}")
        state[name] = t.to(device=device, dtype=dtype)
    missing = sorted(set(expected) - set(state))
    if missing:
        raise LMForgeError(f"checkpoint lacks {len(missing)} tensors, e.g. {missing[0]!r}")
    model.load_state_dict(state, assign=True, strict=True)
    for mod, pw in packed.items():
        if mod == "lm_head" and model.lm_head is None:
            model.set_head_packed(pw)
            continue
        parent, _, attr = mod.rpartition(".")
        old = model.get_submodule(mod)
        setattr(model.get_submodule(parent), attr, PackedLinear(old.weight, old.bias, pw))
    return model.eval()


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
    if len(layers) != cfg.n_layers:
        n = len(layers)
        raise LMForgeError(f"{where} gives {layer_key}={cfg.n_layers}, but the weights hold {n} layer{'s' * (n != 1)}")
    with torch.device("meta"):  # one block stands for all: every block has the same shapes
        one = Transformer(dataclasses.replace(cfg, n_layers=1, sliding_layers=None))
    expected = {k: tuple(v.shape) for k, v in one.state_dict().items()}
    for name, t in header_weights():
        key = _LAYER_INDEX.sub(".layers.0.", "." + name, count=1).lstrip(".")
        if key not in expected:
            raise LMForgeError(f"unexpected tensor {name!r} for a {cfg.family} model")
        if tuple(t.shape) != expected[key]:
            raise LMForgeError(f"{where} does not match the weights: tensor {name!r} has shape {tuple(t.shape)}, "
                               f"the config expects {expected[key]}")


def placement(device: torch.device | str | None = None, dtype: torch.dtype | None = None
              ) -> tuple[torch.device, torch.dtype]:
    """The device (default: CUDA when present) and dtype (default: that device's) to load onto."""
    dev = parse_device(device) if device is not None else default_device()
    return dev, dtype or default_dtype(dev)


def load_checkpoint(path: str | Path, device: torch.device | str | None = None,
                    dtype: torch.dtype | None = None, packed: bool | None = None,
                    progress: bool = False) -> Checkpoint:
    """Load a `.gguf` file or an HF-style directory (config.json + safetensors [+ tokenizer.json]).

    ``packed`` keeps the codes of GGUF Q4_0/Q4_1/Q8_0 matrices for the CPU decode kernel (default: on
    where it runs, i.e. fp32 on a CPU with AVX2 and a C compiler); results equal the dense path's.
    """
    dev, dt = placement(device, dtype)
    src = open_source(path)
    if src.fmt == "hf":
        model = build_model(src.config, src.weights(), dev, dt, progress)
        types = Counter(str(p.dtype).replace("torch.", "") for p in model.parameters())
        return Checkpoint(model, src.tokenizer, src.config, src.path, "hf", dict(types))
    if packed is None:
        packed = dev.type == "cpu" and dt == torch.float32 and lib() is not None
    model = build_model(src.config, src.weights(packed), dev, dt, progress)
    types = Counter(t.tensor_type.name for t in src.gguf.tensors.values())
    return Checkpoint(model, src.tokenizer, src.config, src.path, "gguf", dict(types))
