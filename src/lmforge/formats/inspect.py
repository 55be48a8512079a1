"""`lmforge info`: describe a model from its headers, without loading the weights."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

from ..errors import LMForgeError


def _fmt_params(n: int) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.2f}B"
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def describe(path: Path) -> dict[str, Any]:
    if path.is_dir():
        return _describe_hf(path)
    from .gguf import GGUFFile

    g = GGUFFile(path)
    cfg = g.config()
    n = sum(t.n_elements for t in g.tensors.values())
    types = Counter(t.tensor_type.name for t in g.tensors.values())
    tokens = g.meta.get("tokenizer.ggml.tokens", [])

    def tok(key: str) -> str | None:
        i = g.meta.get(f"tokenizer.ggml.{key}")
        return tokens[i] if i is not None and i < len(tokens) else None

    return _common(path, "gguf", cfg, n, types) | {
        "name": g.meta.get("general.name", path.stem),
        "tokenizer": f"{g.meta.get('tokenizer.ggml.model')} (pre: {g.meta.get('tokenizer.ggml.pre', 'default')}), "
                     f"{len(tokens)} tokens, bos {tok('bos_token_id')}, eos {tok('eos_token_id')}",
        "chat template": g.meta.get("tokenizer.chat_template"),
    }


def _describe_hf(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    from ..fsutil import read_json
    from .hf import config_from_hf, safetensors_files

    if not (path / "config.json").exists():
        raise LMForgeError(f"{path}: not a model directory (no config.json)")
    cfg = config_from_hf(read_json(path / "config.json"))
    n, types = 0, Counter()
    for f in safetensors_files(path):
        try:
            with safe_open(str(f), framework="pt") as h:
                for k in h.keys():
                    sl = h.get_slice(k)
                    n += math.prod(sl.get_shape())
                    types[sl.get_dtype()] += 1
        except Exception as e:  # safetensors raises its own error type for damaged headers
            raise LMForgeError(f"{f}: not a valid safetensors file ({e})") from None
    from ..tokenizer import read_chat_template

    tc = path / "tokenizer_config.json"
    template = read_chat_template(path, read_json(tc) if tc.exists() else {})
    return _common(path, "hf", cfg, n, types) | {"name": path.name, "chat template": template}


def _common(path: Path, fmt: str, cfg: Any, n: int, types: Counter) -> dict[str, Any]:
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size
    window = {}
    if cfg.sliding_window:
        which = "all layers" if cfg.sliding_layers is None else f"layers {', '.join(map(str, cfg.sliding_layers))}"
        window = {"sliding window": f"{cfg.sliding_window} ({which})"}
    return {
        "path": str(path),
        "format": fmt,
        "architecture": cfg.family,
        "parameters": f"{_fmt_params(n)} ({n:,})",
        "layers": f"{cfg.n_layers} encoder, {cfg.decoder_layers} decoder" if cfg.decoder_layers else cfg.n_layers,
        "hidden size": cfg.dim,
        "heads": f"{cfg.n_heads} (kv {cfg.n_kv_heads}, head dim {cfg.head_dim})",
        "ffn": f"{cfg.ffn_dim} ({cfg.mlp}, {cfg.activation})",
        "norm": f"{cfg.norm} (eps {cfg.norm_eps:g})",
        "positions": f"{cfg.position}" + (f" (theta {cfg.rope_theta:g})" if cfg.position == "rope" else ""),
        "context length": cfg.context_length,
        **window,
        "vocab size": cfg.vocab_size,
        "tied embeddings": cfg.tie_embeddings,
        "tensor types": ", ".join(f"{k} x{v}" for k, v in sorted(types.items())),
        "file size": f"{size / 2**20:.1f} MB",
    }


def describe_system() -> dict[str, Any]:
    """This machine as lmforge sees it: CPU features, the compute path each kind of work takes, devices."""
    import torch

    from ..quant import cpu, kernels
    from . import kernel_dir

    f = cpu.features()
    kernels.use_build_dir(kernel_dir())
    so = kernels.lib()
    info: dict[str, Any] = {
        "cpu": f"{f.model}, {kernels.THREADS} threads",
        "cpu features": ", ".join(f.names) or "none of AVX2, AVX-512, VNNI, BF16, AMX",
        "torch": f"{torch.__version__} (CPU capability {torch.backends.cpu.get_cpu_capability()})",
        "C kernels": f"{Path(so._name).name} ({' '.join(cpu.compile_flags())})" if so is not None
        else "unavailable (needs Linux, AVX2 + FMA and a C compiler; plain PyTorch is used)",
    }
    info |= {f"path ({k})": v for k, v in cpu.paths(kernels.MAX_ROWS, kernels.act16(), kernels.dot_path(so)).items()}
    cuda = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    info["cuda"] = ", ".join(cuda) if cuda else "none"
    return info
