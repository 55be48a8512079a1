"""Hugging Face model directories: config.json + safetensors (single or sharded) <-> our model core."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from ..errors import LMForgeError
from ..fsutil import read_json
from ..model.config import ModelConfig

_LLAMA_LIKE = {"llama", "mistral", "qwen2"}
_BERT_LIKE = {"bert", "roberta", "xlm-roberta"}
_ACT = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
        "gelu_fast": "gelu_tanh", "relu": "relu"}


def _act(name: str) -> str:
    if name not in _ACT:
        raise LMForgeError(f"unsupported activation {name!r} in config.json")
    return _ACT[name]


def config_from_hf(hf: dict[str, Any], tensor_names: set[str] | None = None) -> ModelConfig:
    """Map a transformers config.json onto ModelConfig. ``tensor_names`` (the checkpoint's) settles which
    optional encoder parts (pooler, MLM head) are present; without them the architecture name decides."""
    mt = hf.get("model_type")
    if mt in _BERT_LIKE:
        return _bert_config(hf, tensor_names)
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
    raise LMForgeError(f"unsupported model_type {mt!r} in config.json "
                       "(supported: llama, mistral, qwen2, gpt2, bert, roberta)")


def _bert_config(hf: dict[str, Any], names: set[str] | None) -> ModelConfig:
    mt = hf["model_type"]
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise LMForgeError(f"unsupported position_embedding_type {hf['position_embedding_type']!r} "
                           "(supported: absolute)")
    arch = (hf.get("architectures") or [""])[0]
    if names is not None:
        mlm = any(n.endswith(("cls.predictions.transform.dense.weight", "lm_head.dense.weight")) for n in names)
        pooler = any(n.endswith("pooler.dense.weight") for n in names)
    else:
        mlm = arch.endswith(("ForMaskedLM", "ForPreTraining"))
        pooler = arch.endswith(("Model", "ForPreTraining", "ForSequenceClassification")) or not arch
    # RoBERTa numbers positions from pad_token_id + 1; we drop the unused rows and count from 0.
    offset = hf.get("pad_token_id", 1) + 1 if mt != "bert" else 0
    return ModelConfig(
        family="bert",
        vocab_size=hf["vocab_size"],
        dim=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        n_heads=hf["num_attention_heads"],
        ffn_dim=hf["intermediate_size"],
        norm="layernorm",
        norm_eps=hf.get("layer_norm_eps", 1e-12),
        norm_position="post",
        mlp="gelu",
        activation=_act(hf.get("hidden_act", "gelu")),
        position="learned",
        qkv_bias=True,
        out_bias=True,
        mlp_bias=True,
        tie_embeddings=True,
        context_length=hf.get("max_position_embeddings", 512) - offset,
        causal=False,
        type_vocab_size=hf.get("type_vocab_size", 2),
        head="mlm" if mlm else "none",
        pooler=pooler,
        extra={"hf_model_type": mt, "pad_token_id": hf.get("pad_token_id", 0), "position_offset": offset},
    )


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
    if cfg.family == "bert":
        prefix = "bert." if cfg.extra.get("hf_model_type", "bert") == "bert" else "roberta."
        yield from _bert_tensors(cfg, _strip_prefix(src, (prefix, "")))
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


def _bert_tensors(cfg: ModelConfig, get: Callable[[str], torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    e = "embeddings."
    yield "tok_emb.weight", get(e + "word_embeddings.weight")
    off = cfg.extra.get("position_offset", 0)
    yield "pos_emb.weight", get(e + "position_embeddings.weight")[off:off + cfg.context_length]
    if cfg.type_vocab_size:
        yield "type_emb.weight", get(e + "token_type_embeddings.weight")
    yield "emb_norm.weight", get(e + "LayerNorm.weight")
    yield "emb_norm.bias", get(e + "LayerNorm.bias")
    for i in range(cfg.n_layers):
        p, o = f"encoder.layer.{i}.", f"layers.{i}."
        for kind in ("weight", "bias"):
            yield o + f"attn.qkv.{kind}", torch.cat([get(p + f"attention.self.{x}.{kind}")
                                                      for x in ("query", "key", "value")])
            for ours, theirs in (("attn.o", "attention.output.dense"), ("attn_norm", "attention.output.LayerNorm"),
                                 ("mlp.fc", "intermediate.dense"), ("mlp.down", "output.dense"),
                                 ("mlp_norm", "output.LayerNorm")):
                yield o + f"{ours}.{kind}", get(p + f"{theirs}.{kind}")
    if cfg.pooler:
        yield "pooler.weight", get("pooler.dense.weight")
        yield "pooler.bias", get("pooler.dense.bias")
    if cfg.head == "mlm":
        roberta = cfg.extra.get("hf_model_type", "bert") != "bert"
        h = "lm_head." if roberta else "cls.predictions."
        dense, norm = ("dense", "layer_norm") if roberta else ("transform.dense", "transform.LayerNorm")
        for kind in ("weight", "bias"):
            yield f"mlm_dense.{kind}", get(f"{h}{dense}.{kind}")
            yield f"mlm_norm.{kind}", get(f"{h}{norm}.{kind}")
        yield "mlm_bias", get(h + "bias")


def tensor_names(path: Path) -> set[str]:
    """Names of the tensors in an HF directory's safetensors files (headers only)."""
    return set(TensorSource(_safetensors_files(path)).where)


def load_hf_weights(path: Path, cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    return hf_state_dict(cfg, TensorSource(_safetensors_files(path)))
