"""Hugging Face model directories: config.json + safetensors (single or sharded) <-> our model core."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from ..errors import LMForgeError
from ..fsutil import read_json
from ..model.config import ModelConfig
from .hf_names import base_prefix, hf_names

_LLAMA_LIKE = {"llama", "mistral", "qwen2"}
_BERT_LIKE = {"bert", "roberta", "xlm-roberta"}
_ACT = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
        "gelu_fast": "gelu_tanh", "relu": "relu"}


# GPT-2 and BERT share one shape: LayerNorm, a GELU MLP, learned positions, biases everywhere, a tied output.
_CLASSIC: dict[str, Any] = {"norm": "layernorm", "mlp": "gelu", "position": "learned", "qkv_bias": True,
                            "out_bias": True, "mlp_bias": True, "tie_embeddings": True}

_MISSING = object()
_KINDS = {"size": "a positive integer", "count": "a non-negative integer", "number": "a number",
          "flag": "true or false", "text": "a string"}


def _get(hf: dict[str, Any], key: str, kind: str, default: Any = _MISSING) -> Any:
    """config.json's ``key``, checked against its JSON type: a one-line error naming it, not a TypeError
    deep inside the model. A null value counts as absent."""
    value = hf.get(key)
    if value is None:
        if default is _MISSING:
            raise LMForgeError(f"config.json lacks {key!r}")
        return default
    integer = isinstance(value, int) and not isinstance(value, bool)
    ok = {"size": integer and value > 0, "count": integer and value >= 0,
          "number": isinstance(value, (int, float)) and not isinstance(value, bool),
          "flag": isinstance(value, bool), "text": isinstance(value, str)}[kind]
    if not ok:
        raise LMForgeError(f"config.json: {key} must be {_KINDS[kind]}, got {value!r}")
    return value


def _act(hf: dict[str, Any], key: str, default: str) -> str:
    name = _get(hf, key, "text", default)
    if name not in _ACT:
        raise LMForgeError(f"unsupported {key} {name!r} in config.json (supported: {', '.join(sorted(_ACT))})")
    return _ACT[name]


def _refuse(hf: dict[str, Any], key: str, honoured: Any, why: str) -> None:
    """An option that changes the math and that lmforge does not implement: refused, never dropped."""
    if key in hf and hf[key] is not None and hf[key] != honoured:
        raise LMForgeError(f"unsupported config.json option {key}={hf[key]!r}: {why}")


def config_from_hf(hf: dict[str, Any], tensor_names: set[str] | None = None) -> ModelConfig:
    """Map a transformers config.json onto ModelConfig. ``tensor_names`` (the checkpoint's) settles which
    optional encoder parts (pooler, MLM head) are present; without them the architecture name decides.
    An option that changes the computation and is not implemented is refused, naming it."""
    if not isinstance(hf, dict):
        raise LMForgeError("config.json must hold a JSON object")
    mt = _get(hf, "model_type", "text", None)
    if hf.get("quantization_config"):  # e.g. fp8 or GPTQ weights, whose scales the loader would drop
        method = hf["quantization_config"].get("quant_method") if isinstance(hf["quantization_config"], dict) else None
        raise LMForgeError(f"unsupported config.json option quantization_config (quant_method {method!r}): "
                           "lmforge loads unquantized safetensors; convert the model or use a GGUF file")
    if mt in _BERT_LIKE:
        return _bert_config(hf, tensor_names)
    if mt == "t5":
        return _t5_config(hf, tensor_names)
    if mt == "bart":
        return _bart_config(hf, tensor_names)
    if mt in _LLAMA_LIKE:
        n_heads = _get(hf, "num_attention_heads", "size")
        dim = _get(hf, "hidden_size", "size")
        n_layers = _get(hf, "num_hidden_layers", "size")
        rope = hf.get("rope_parameters") if isinstance(hf.get("rope_parameters"), dict) else {}
        partial = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor"))
        if partial not in (None, 1, 1.0):
            raise LMForgeError(f"unsupported config.json option partial_rotary_factor={partial!r}: "
                               "lmforge rotates whole heads")
        window, sliding = _sliding_window(hf, mt, n_layers)
        attention_bias = _get(hf, "attention_bias", "flag", False)
        return ModelConfig(
            family="qwen2" if mt == "qwen2" else "llama",
            vocab_size=_get(hf, "vocab_size", "size"),
            dim=dim,
            n_layers=n_layers,
            n_heads=n_heads,
            n_kv_heads=_get(hf, "num_key_value_heads", "size", n_heads),
            head_dim=_get(hf, "head_dim", "size", dim // n_heads),
            ffn_dim=_get(hf, "intermediate_size", "size"),
            norm="rmsnorm",
            norm_eps=float(_get(hf, "rms_norm_eps", "number", 1e-6)),
            mlp="swiglu",
            activation=_act(hf, "hidden_act", "silu"),
            position="rope",
            rope_theta=float(_get(hf, "rope_theta", "number", None) or _get(rope, "rope_theta", "number", 10000.0)),
            rope_scaling=_rope_scaling(hf),
            qkv_bias=mt == "qwen2" or attention_bias,
            out_bias=attention_bias,
            mlp_bias=_get(hf, "mlp_bias", "flag", False),
            tie_embeddings=_get(hf, "tie_word_embeddings", "flag", False),
            context_length=_get(hf, "max_position_embeddings", "size", 2048),
            sliding_window=window,
            sliding_layers=sliding,
        )
    if mt == "gpt2":
        _refuse(hf, "scale_attn_weights", True, "lmforge always scales attention scores by 1/sqrt(head_dim)")
        _refuse(hf, "scale_attn_by_inverse_layer_idx", False, "lmforge does not scale attention by layer index")
        _refuse(hf, "tie_word_embeddings", True, "lmforge's GPT-2 ties its output matrix to the token embedding")
        dim = _get(hf, "n_embd", "size")
        return ModelConfig(
            family="gpt2",
            vocab_size=_get(hf, "vocab_size", "size"),
            dim=dim,
            n_layers=_get(hf, "n_layer", "size"),
            n_heads=_get(hf, "n_head", "size"),
            ffn_dim=_get(hf, "n_inner", "size", 4 * dim),
            norm_eps=float(_get(hf, "layer_norm_epsilon", "number", 1e-5)),
            activation=_act(hf, "activation_function", "gelu_new"),
            context_length=_get(hf, "n_positions", "size", 1024),
            **_CLASSIC,
        )
    raise LMForgeError(f"unsupported model_type {mt!r} in config.json "
                       "(supported: llama, mistral, qwen2, gpt2, bert, roberta, xlm-roberta, t5, bart)")


def _sliding_window(hf: dict[str, Any], mt: str, n_layers: int) -> tuple[int, list[int] | None]:
    """(window, sliding layers) as transformers reads them: Mistral slides every layer when
    ``sliding_window`` is set; Qwen2 only with ``use_sliding_window``, in the layers ``layer_types`` names
    (by default those from ``max_window_layers`` on); Llama has no sliding window."""
    types = hf.get("layer_types")
    if types is not None:
        if not isinstance(types, list) or len(types) != n_layers:
            raise LMForgeError(f"config.json: layer_types must list one type per layer ({n_layers}), got {types!r}")
        bad = [t for t in types if t not in ("full_attention", "sliding_attention")]
        if bad:
            raise LMForgeError(f"unsupported config.json layer type {bad[0]!r} "
                               "(supported: full_attention, sliding_attention)")
    if mt == "llama":
        if types is not None and "sliding_attention" in types:
            raise LMForgeError("config.json: layer_types asks for sliding attention, which a llama model has not")
        return 0, None
    # transformers' default window (4096) applies when the key is absent; an explicit null turns it off.
    window = _get(hf, "sliding_window", "size", 0) if "sliding_window" in hf else 4096
    if mt == "mistral":
        if window and types is not None and "full_attention" in types:
            raise LMForgeError("config.json: layer_types asks for full attention in some layers, but model_type "
                               "mistral slides every layer")
        return window, None
    # qwen2
    if not window or not _get(hf, "use_sliding_window", "flag", False):
        return 0, None
    if types is None:
        first = _get(hf, "max_window_layers", "count", 28)
        types = ["sliding_attention" if i >= first else "full_attention" for i in range(n_layers)]
    sliding = [i for i, t in enumerate(types) if t == "sliding_attention"]
    if not sliding:
        return 0, None
    return window, None if len(sliding) == n_layers else sliding


def _bert_config(hf: dict[str, Any], names: set[str] | None) -> ModelConfig:
    mt = hf["model_type"]
    if _get(hf, "position_embedding_type", "text", "absolute") != "absolute":
        raise LMForgeError(f"unsupported position_embedding_type {hf['position_embedding_type']!r} "
                           "(supported: absolute)")
    _refuse(hf, "is_decoder", False, "lmforge runs BERT-family models as bidirectional encoders")
    archs = hf.get("architectures") or [""]
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise LMForgeError(f"config.json: architectures must be a list of strings, got {archs!r}")
    arch = archs[0]
    if names is not None:
        mlm = any(n.endswith(("cls.predictions.transform.dense.weight", "lm_head.dense.weight")) for n in names)
        pooler = any(n.endswith("pooler.dense.weight") for n in names)
    else:
        mlm = arch.endswith(("ForMaskedLM", "ForPreTraining"))
        pooler = arch.endswith(("Model", "ForPreTraining", "ForSequenceClassification")) or not arch
    # RoBERTa numbers positions from pad_token_id + 1; we drop the unused rows and count from 0.
    pad = _get(hf, "pad_token_id", "count", 1 if mt != "bert" else 0)
    offset = pad + 1 if mt != "bert" else 0
    return ModelConfig(
        family="bert",
        vocab_size=_get(hf, "vocab_size", "size"),
        dim=_get(hf, "hidden_size", "size"),
        n_layers=_get(hf, "num_hidden_layers", "size"),
        n_heads=_get(hf, "num_attention_heads", "size"),
        ffn_dim=_get(hf, "intermediate_size", "size"),
        norm_eps=float(_get(hf, "layer_norm_eps", "number", 1e-12)),
        norm_position="post",
        activation=_act(hf, "hidden_act", "gelu"),
        **_CLASSIC,
        context_length=_get(hf, "max_position_embeddings", "size", 512) - offset,
        causal=False,
        type_vocab_size=_get(hf, "type_vocab_size", "count", 2),
        head="mlm" if mlm else "none",
        pooler=pooler,
        extra={"hf_model_type": mt, "pad_token_id": _get(hf, "pad_token_id", "count", 0), "position_offset": offset},
    )


def _t5_config(hf: dict[str, Any], names: set[str] | None) -> ModelConfig:
    """T5 v1.0 (ReLU MLP) and v1.1 / flan-T5 (gated-GELU MLP). ``names`` (the checkpoint's tensors)
    settle whether the output matrix is its own, and count each stack's blocks."""
    ffp = _get(hf, "feed_forward_proj", "text", "relu")
    parts = ffp.split("-")
    act = "gelu_new" if ffp == "gated-gelu" else parts[-1]  # transformers' reading of the name
    if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated") or act not in _ACT:
        raise LMForgeError(f"unsupported feed_forward_proj {ffp!r} in config.json (supported: an activation "
                           f"of {', '.join(sorted(_ACT))}, optionally gated-, e.g. relu or gated-gelu)")
    n_layers = _get(hf, "num_layers", "size")
    decoder_layers = _get(hf, "num_decoder_layers", "size", n_layers)
    # transformers reads tie_word_embeddings as "scale the decoder output" (and may save that choice as
    # scale_decoder_outputs); whether the output matrix is the embedding is what the file holds.
    tied_flag = _get(hf, "tie_word_embeddings", "flag", True)
    scale = _get(hf, "scale_decoder_outputs", "flag", tied_flag)
    tied = tied_flag if names is None else "lm_head.weight" not in names
    _check_depths(names, "{}.block.", (("encoder", n_layers, "num_layers"),
                                       ("decoder", decoder_layers, "num_decoder_layers")))
    n_heads = _get(hf, "num_heads", "size")
    dim = _get(hf, "d_model", "size")
    return ModelConfig(
        family="t5",
        vocab_size=_get(hf, "vocab_size", "size"),
        dim=dim,
        n_layers=n_layers,
        decoder_layers=decoder_layers,
        n_heads=n_heads,
        head_dim=_get(hf, "d_kv", "size", 64),
        ffn_dim=_get(hf, "d_ff", "size"),
        norm="rmsnorm",
        norm_eps=float(_get(hf, "layer_norm_epsilon", "number", 1e-6)),
        mlp="swiglu" if parts[0] == "gated" else "gelu",
        activation=_ACT[act],
        position="relative",
        relative_buckets=_get(hf, "relative_attention_num_buckets", "size", 32),
        relative_max_distance=_get(hf, "relative_attention_max_distance", "size", 128),
        tie_embeddings=tied,
        output_scale=scale,
        context_length=_get(hf, "n_positions", "size", 512),
        extra={"hf_model_type": "t5", "pad_token_id": _get(hf, "pad_token_id", "count", 0),
               "eos_token_id": _get(hf, "eos_token_id", "count", 1),
               "decoder_start_token_id": _get(hf, "decoder_start_token_id", "count", 0),
               # the tasks the model was trained for, with their prefixes (`lmforge translate` reads them)
               **({"task_specific_params": hf["task_specific_params"]}
                  if isinstance(hf.get("task_specific_params"), dict) else {})},
    )


def _check_depths(names: set[str] | None, pattern: str, stacks: tuple[tuple[str, int, str], ...]) -> None:
    """Each stack's block count in the checkpoint (``names``; blocks named ``pattern`` of the stack,
    then the index) against config.json's, naming the key."""
    if names is None:
        return
    for stack, want, key in stacks:
        start = pattern.format(stack)
        blocks = {n.split(start, 1)[1].split(".")[0] for n in names if start in n}
        if len(blocks) != want:
            raise LMForgeError(f"config.json gives {key}={want}, "
                               f"but the weights hold {len(blocks)} {stack} blocks")


def _bart_config(hf: dict[str, Any], names: set[str] | None) -> ModelConfig:
    """BART: post-norm encoder and decoder of one width, learned positions numbered from 2."""
    for a, b in (("encoder_attention_heads", "decoder_attention_heads"), ("encoder_ffn_dim", "decoder_ffn_dim")):
        if _get(hf, a, "size") != _get(hf, b, "size"):
            raise LMForgeError(f"unsupported config.json: {a}={hf[a]} differs from {b}={hf[b]} "
                               "(lmforge's encoder and decoder blocks share one shape)")
    for key in ("normalize_before", "add_final_layer_norm"):  # mBART-style pre-norm: another model
        _refuse(hf, key, False, "lmforge runs BART as the post-norm model")
    n_layers, decoder_layers = _get(hf, "encoder_layers", "size"), _get(hf, "decoder_layers", "size")
    _check_depths(names, "{}.layers.", (("encoder", n_layers, "encoder_layers"),
                                        ("decoder", decoder_layers, "decoder_layers")))
    ids = {k: _get(hf, k, "count", d) for k, d in (("pad_token_id", 1), ("bos_token_id", 0), ("eos_token_id", 2),
                                                    ("decoder_start_token_id", 2))}
    return ModelConfig(
        family="bart",
        vocab_size=_get(hf, "vocab_size", "size"),
        dim=_get(hf, "d_model", "size"),
        n_layers=n_layers,
        decoder_layers=decoder_layers,
        n_heads=_get(hf, "encoder_attention_heads", "size"),
        ffn_dim=_get(hf, "encoder_ffn_dim", "size"),
        norm_eps=1e-5,  # torch's LayerNorm default, which BART uses
        norm_position="post",
        activation=_act(hf, "activation_function", "gelu"),
        # The output matrix is the embedding unless the file holds one of its own (as transformers reads it).
        **(_CLASSIC | {"tie_embeddings": names is None or "lm_head.weight" not in names}),
        context_length=_get(hf, "max_position_embeddings", "size", 1024),
        embed_scale=_get(hf, "scale_embedding", "flag", False),
        logits_bias=names is None or "final_logits_bias" in names,
        extra={"hf_model_type": "bart", "position_offset": 2, **ids},
    )


def _rope_scaling(hf: dict[str, Any]) -> dict[str, Any] | None:
    sc = hf.get("rope_scaling") or hf.get("rope_parameters")
    if not sc:
        return None
    if not isinstance(sc, dict):
        raise LMForgeError(f"config.json: rope_scaling must be an object, got {sc!r}")
    kind = sc.get("rope_type", sc.get("type"))
    return None if kind in (None, "default") else dict(sc)


# -- weights ---------------------------------------------------------------------------------------
def safetensors_files(path: Path) -> list[Path]:
    """The safetensors files of an HF directory: its shards (all present) or its one model.safetensors."""
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


def hf_state_dict(cfg: ModelConfig, src: TensorSource) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (our_name, tensor) one at a time, so loading never holds two copies of the model."""
    prefix = base_prefix(cfg)

    def get(name: str, base: bool) -> torch.Tensor:
        # A base-model checkpoint has no prefix; a task model's keeps its heads outside the prefix.
        tries = (prefix + name, name) if base else (name, prefix + name)
        for key in tries:
            if key in src:
                return src.get(key)
        return src.get(tries[0])

    for entry in hf_names(cfg):
        pieces = [get(n, entry.base) for n in entry.hf]
        t = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
        if entry.conv1d:  # nn.Linear wants [out, in]
            t = t.t().contiguous()
        if entry.kept is not None:
            t = t[entry.kept[0]:entry.kept[1]]
        yield entry.ours, t


class _HeaderSource:
    """A checkpoint's tensors as shapes only (from the safetensors headers): meta tensors, no data read."""

    def __init__(self, shapes: dict[str, tuple[int, ...]]) -> None:
        self.shapes = shapes

    def __contains__(self, key: str) -> bool:
        return key in self.shapes

    def get(self, key: str) -> torch.Tensor:
        if key not in self.shapes:
            raise LMForgeError(f"tensor {key!r} missing from the checkpoint")
        return torch.empty(self.shapes[key], device="meta")


def tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the tensors in an HF directory's safetensors files (headers only)."""
    src = TensorSource(safetensors_files(path))
    return {k: tuple(src._handles[f].get_slice(k).get_shape()) for k, f in src.where.items()}


def header_state_dict(cfg: ModelConfig, shapes: dict[str, tuple[int, ...]]) -> Iterator[tuple[str, torch.Tensor]]:
    """`hf_state_dict` over meta tensors of the headers' shapes: checks the layout without reading weights."""
    return hf_state_dict(cfg, _HeaderSource(shapes))  # type: ignore[arg-type]


def tensor_names(path: Path) -> set[str]:
    """Names of the tensors in an HF directory's safetensors files (headers only)."""
    return set(TensorSource(safetensors_files(path)).where)


def load_hf_weights(path: Path, cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    return hf_state_dict(cfg, TensorSource(safetensors_files(path)))
