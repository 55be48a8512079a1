"""Hugging Face model directories: config.json + safetensors (single or sharded) <-> our model core."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from ..errors import LMForgeError
from ..model.config import ModelConfig

_LLAMA_LIKE = {"llama", "mistral", "qwen2"}
_ACT = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
        "gelu_fast": "gelu_tanh", "relu": "relu"}


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise LMForgeError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None


def _act(name: str) -> str:
    if name not in _ACT:
        raise LMForgeError(f"unsupported activation {name!r} in config.json")
    return _ACT[name]


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """Map a transformers config.json onto ModelConfig."""
    mt = hf.get("model_type")
    if mt in _LLAMA_LIKE:
        n_heads = hf["num_attention_heads"]
        return ModelConfig(
            family="qwen2" if mt == "qwen2" else "llama",
            vocab_size=hf["vocab_size"],
            dim=hf["hidden_size"],
            n_layers=hf["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=hf.get("num_key_value_heads") or n_heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads,
            ffn_dim=hf["intermediate_size"],
            norm="rmsnorm",
            norm_eps=hf.get("rms_norm_eps", 1e-6),
            mlp="swiglu",
            activation=_act(hf.get("hidden_act", "silu")),
            position="rope",
            rope_theta=float(hf.get("rope_theta") or (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0)),
            rope_scaling=_rope_scaling(hf),
            qkv_bias=mt == "qwen2" or bool(hf.get("attention_bias", False)),
            out_bias=bool(hf.get("attention_bias", False)),
            mlp_bias=bool(hf.get("mlp_bias", False)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            context_length=hf.get("max_position_embeddings", 2048),
        )
    if mt == "gpt2":
        return ModelConfig(
            family="gpt2",
            vocab_size=hf["vocab_size"],
            dim=hf["n_embd"],
            n_layers=hf["n_layer"],
            n_heads=hf["n_head"],
            ffn_dim=hf.get("n_inner") or 4 * hf["n_embd"],
            norm="layernorm",
            norm_eps=hf.get("layer_norm_epsilon", 1e-5),
            mlp="gelu",
            activation=_act(hf.get("activation_function", "gelu_new")),
            position="learned",
            qkv_bias=True,
            out_bias=True,
            mlp_bias=True,
            tie_embeddings=True,
            context_length=hf.get("n_positions", 1024),
        )
    raise LMForgeError(f"unsupported model_type {mt!r} in config.json (supported: llama, mistral, qwen2, gpt2)")


def _rope_scaling(hf: dict[str, Any]) -> dict[str, Any] | None:
    sc = hf.get("rope_scaling") or hf.get("rope_parameters")
    if not sc:
        return None
    kind = sc.get("rope_type", sc.get("type"))
    return None if kind in (None, "default") else dict(sc)


# -- weights ---------------------------------------------------------------------------------------
def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(read_json(index)["weight_map"].values()))
        missing = [s for s in shards if not (path / s).exists()]
        if missing:
            raise LMForgeError(f"{path}: shard {missing[0]} listed in the index is missing")
        return [path / s for s in shards]
    single = path / "model.safetensors"
    if single.exists():
        return [single]
    if (path / "pytorch_model.bin").exists():
        raise LMForgeError(f"{path}: only pytorch_model.bin found; lmforge loads safetensors only (never pickles)")
    raise LMForgeError(f"{path}: no model.safetensors or model.safetensors.index.json")


class TensorSource:
    """Lazy, memory-mapped access to the tensors of one or more safetensors files."""

    def __init__(self, files: list[Path]) -> None:
        self.where: dict[str, Path] = {}
        self._handles: dict[Path, Any] = {}
        for f in files:
            try:
                h = safe_open(str(f), framework="pt")
            except (SafetensorError, OSError) as e:
                raise LMForgeError(f"{f}: not a valid safetensors file ({e})") from None
            self._handles[f] = h
            for k in h.keys():
                self.where[k] = f

    def __contains__(self, key: str) -> bool:
        return key in self.where

    def get(self, key: str) -> torch.Tensor:
        if key not in self.where:
            raise LMForgeError(f"tensor {key!r} missing from the checkpoint")
        try:
            return self._handles[self.where[key]].get_tensor(key)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise LMForgeError(f"{self.where[key]}: cannot read tensor {key!r} ({e}); is the file truncated?") from None


def _strip_prefix(src: TensorSource, prefixes: tuple[str, ...]) -> Callable[[str], torch.Tensor]:
    def get(name: str) -> torch.Tensor:
        for p in prefixes:
            if p + name in src:
                return src.get(p + name)
        return src.get(prefixes[0] + name)

    return get


def hf_state_dict(cfg: ModelConfig, src: TensorSource) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (our_name, tensor) one at a time, so loading never holds two copies of the model."""
    if cfg.family == "gpt2":
        yield from _gpt2_tensors(cfg, _strip_prefix(src, ("transformer.", "")))
        return
    get = _strip_prefix(src, ("model.", ""))
    yield "tok_emb.weight", get("embed_tokens.weight")
    for i in range(cfg.n_layers):
        p, o = f"layers.{i}.", f"layers.{i}."
        yield o + "attn_norm.weight", get(p + "input_layernorm.weight")
        yield o + "mlp_norm.weight", get(p + "post_attention_layernorm.weight")
        a = p + "self_attn."
        yield o + "attn.qkv.weight", torch.cat([get(a + f"{x}_proj.weight") for x in "qkv"])
        if cfg.qkv_bias:
            yield o + "attn.qkv.bias", torch.cat([get(a + f"{x}_proj.bias") for x in "qkv"])
        yield o + "attn.o.weight", get(a + "o_proj.weight")
        if cfg.out_bias:
            yield o + "attn.o.bias", get(a + "o_proj.bias")
        m = p + "mlp."
        yield o + "mlp.gate_up.weight", torch.cat([get(m + "gate_proj.weight"), get(m + "up_proj.weight")])
        yield o + "mlp.down.weight", get(m + "down_proj.weight")
        if cfg.mlp_bias:
            yield o + "mlp.gate_up.bias", torch.cat([get(m + "gate_proj.bias"), get(m + "up_proj.bias")])
            yield o + "mlp.down.bias", get(m + "down_proj.bias")
    yield "norm.weight", get("norm.weight")
    if not cfg.tie_embeddings:
        yield "lm_head.weight", src.get("lm_head.weight")


def _gpt2_tensors(cfg: ModelConfig, get: Callable[[str], torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    yield "tok_emb.weight", get("wte.weight")
    yield "pos_emb.weight", get("wpe.weight")
    for i in range(cfg.n_layers):
        p, o = f"h.{i}.", f"layers.{i}."
        for ours, theirs in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
            yield o + f"{ours}.weight", get(p + f"{theirs}.weight")
            yield o + f"{ours}.bias", get(p + f"{theirs}.bias")
        # GPT-2 stores Conv1D weights as [in, out]; nn.Linear wants [out, in].
        for ours, theirs in (("attn.qkv", "attn.c_attn"), ("attn.o", "attn.c_proj"),
                             ("mlp.fc", "mlp.c_fc"), ("mlp.down", "mlp.c_proj")):
            yield o + f"{ours}.weight", get(p + f"{theirs}.weight").t().contiguous()
            yield o + f"{ours}.bias", get(p + f"{theirs}.bias")
    yield "norm.weight", get("ln_f.weight")
    yield "norm.bias", get("ln_f.bias")


def load_hf_weights(path: Path, cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    return hf_state_dict(cfg, TensorSource(_safetensors_files(path)))
