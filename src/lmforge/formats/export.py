"""Writing models as Hugging Face directories: config.json + model.safetensors + tokenizer files.

The inverse of `formats.hf`: fused q/k/v and gate/up matrices are split back into the separate
projections transformers expects, so `AutoModelForCausalLM.from_pretrained(dir)` gives the same logits.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file

from ..errors import LMForgeError
from ..fsutil import atomic_dir
from ..model import ModelConfig, Transformer
from ..tokenizer import CHATML_TEMPLATE, Tokenizer
from .hf_names import hf_names, saved_prefix

if TYPE_CHECKING:
    from . import Checkpoint

_HF_ACT = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu"}


def hf_config(cfg: ModelConfig) -> dict[str, Any]:
    """ModelConfig -> a transformers config.json dict."""
    if cfg.family == "gpt2":
        if not (cfg.qkv_bias and cfg.out_bias and cfg.mlp_bias and cfg.norm == "layernorm" and cfg.tie_embeddings):
            raise LMForgeError("an HF GPT-2 has biases, LayerNorm and tied embeddings; this model differs")
        return {
            "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": cfg.vocab_size,
            "n_embd": cfg.dim, "n_layer": cfg.n_layers, "n_head": cfg.n_heads, "n_inner": cfg.ffn_dim,
            "n_positions": cfg.context_length, "n_ctx": cfg.context_length, "layer_norm_epsilon": cfg.norm_eps,
            "activation_function": "gelu_new" if cfg.activation == "gelu_tanh" else cfg.activation,
            "tie_word_embeddings": True, "torch_dtype": "float32",
        }
    if cfg.family == "bert":
        return _bert_config(cfg)
    if cfg.family == "t5":
        return _t5_config(cfg)
    if cfg.family == "bart":
        return _bart_hf_config(cfg)
    if cfg.family not in ("llama", "qwen2"):
        raise LMForgeError(f"cannot export a {cfg.family} model to an HF directory yet")
    if cfg.family == "llama" and cfg.qkv_bias != cfg.out_bias:
        raise LMForgeError("an HF Llama config has one attention_bias for q, k, v and o; this model differs")
    out = {
        "architectures": ["Qwen2ForCausalLM" if cfg.family == "qwen2" else "LlamaForCausalLM"],
        "model_type": cfg.family, "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_dim, "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim, "hidden_act": _HF_ACT[cfg.activation],
        "max_position_embeddings": cfg.context_length, "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
        "rope_scaling": cfg.rope_scaling, "tie_word_embeddings": cfg.tie_embeddings, "torch_dtype": "float32",
    }
    if cfg.family == "llama":
        out |= {"attention_bias": cfg.qkv_bias, "mlp_bias": cfg.mlp_bias}
    if cfg.sliding_window:  # Mistral slides every layer; Qwen2 names its sliding layers
        if cfg.family == "qwen2":
            slide = set(range(cfg.n_layers) if cfg.sliding_layers is None else cfg.sliding_layers)
            out |= {"use_sliding_window": True, "sliding_window": cfg.sliding_window, "layer_types": [
                "sliding_attention" if i in slide else "full_attention" for i in range(cfg.n_layers)]}
        elif cfg.sliding_layers is not None or cfg.qkv_bias or cfg.mlp_bias:
            raise LMForgeError("an HF Mistral config slides every layer and has no biases; this model differs")
        else:
            for key in ("attention_bias", "mlp_bias"):
                out.pop(key)
            out |= {"architectures": ["MistralForCausalLM"], "model_type": "mistral",
                    "sliding_window": cfg.sliding_window}
    return out


def hf_tensors(model: Transformer, state_dict: dict[str, torch.Tensor] | None = None
               ) -> Iterator[tuple[str, torch.Tensor]]:
    """Our weights under transformers' names and layouts (from `state_dict` when given, e.g. one
    gathered from a sharded model)."""
    cfg = model.cfg
    sd = {k: v.detach() for k, v in (state_dict if state_dict is not None else model.state_dict()).items()}
    prefix = saved_prefix(cfg)
    for entry in hf_names(cfg):
        t = sd[entry.ours]
        if entry.conv1d:  # GPT-2's Conv1D: [in, out]
            t = t.t()
        if entry.kept is not None:  # rows we dropped on load come back as zeros
            t = torch.cat([t.new_zeros(entry.kept[0], t.shape[1]), t])
        for name, piece in zip(entry.hf, t.split(entry.rows) if entry.rows else (t,)):
            yield (prefix + name if entry.base else name), piece
    if cfg.family == "t5" and cfg.tie_embeddings and not cfg.output_scale:
        # A tied, unscaled output has no HF T5 form but an untied one of the same values (see _t5_config).
        yield "lm_head.weight", sd["tok_emb.weight"].clone()


def _bert_config(cfg: ModelConfig) -> dict[str, Any]:
    mt = cfg.extra.get("hf_model_type", "bert")
    if not (cfg.norm_position == "post" and cfg.position == "learned" and cfg.qkv_bias and cfg.mlp_bias
            and cfg.n_kv_heads == cfg.n_heads and not cfg.causal):
        raise LMForgeError("an HF BERT is a post-norm, bidirectional MHA encoder with biases; this model differs")
    base = {"bert": "Bert", "roberta": "Roberta", "xlm-roberta": "XLMRoberta"}[mt]
    arch = base + ("ForMaskedLM" if cfg.head == "mlm" else "Model")
    return {
        "architectures": [arch], "model_type": mt, "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads, "intermediate_size": cfg.ffn_dim,
        "hidden_act": _HF_ACT[cfg.activation], "layer_norm_eps": cfg.norm_eps,
        "max_position_embeddings": cfg.context_length + cfg.extra.get("position_offset", 0),
        "type_vocab_size": cfg.type_vocab_size, "pad_token_id": cfg.extra.get("pad_token_id", 0),
        "position_embedding_type": "absolute", "tie_word_embeddings": True, "torch_dtype": "float32",
    }


def _t5_config(cfg: ModelConfig) -> dict[str, Any]:
    if cfg.norm != "rmsnorm" or cfg.n_kv_heads != cfg.n_heads or cfg.qkv_bias or cfg.out_bias or cfg.mlp_bias:
        raise LMForgeError("an HF T5 has RMS norms, multi-head attention and no biases; this model differs")
    act = _HF_ACT[cfg.activation]
    if cfg.mlp == "swiglu":  # transformers reads "gated-gelu" as the tanh GELU, and has no gated exact GELU
        if cfg.activation == "gelu":
            raise LMForgeError("an HF T5 cannot express a gated MLP with the exact GELU "
                               "(gated-gelu is the tanh one)")
        ffp = "gated-gelu" if cfg.activation == "gelu_tanh" else f"gated-{act}"
    else:
        ffp = "gelu_new" if cfg.activation == "gelu_tanh" else act
    # transformers scales the decoder output exactly when tie_word_embeddings is true, and ties the
    # output matrix only when the file has none of its own: an unscaled model is saved untied.
    extra = cfg.extra
    return {
        "architectures": ["T5ForConditionalGeneration"], "model_type": "t5", "vocab_size": cfg.vocab_size,
        "d_model": cfg.dim, "d_kv": cfg.head_dim, "d_ff": cfg.ffn_dim, "num_layers": cfg.n_layers,
        "num_decoder_layers": cfg.decoder_layers, "num_heads": cfg.n_heads,
        "relative_attention_num_buckets": cfg.relative_buckets,
        "relative_attention_max_distance": cfg.relative_max_distance, "layer_norm_epsilon": cfg.norm_eps,
        "feed_forward_proj": ffp,
        "tie_word_embeddings": cfg.output_scale, "scale_decoder_outputs": cfg.output_scale,
        "is_encoder_decoder": True, "n_positions": cfg.context_length,
        "pad_token_id": extra.get("pad_token_id", 0), "eos_token_id": extra.get("eos_token_id", 1),
        "decoder_start_token_id": extra.get("decoder_start_token_id", 0), "torch_dtype": "float32",
        **({"task_specific_params": extra["task_specific_params"]} if "task_specific_params" in extra else {}),
    }


def _bart_hf_config(cfg: ModelConfig) -> dict[str, Any]:
    if not (cfg.qkv_bias and cfg.out_bias and cfg.mlp_bias and cfg.mlp == "gelu" and cfg.n_kv_heads == cfg.n_heads
            and cfg.head_dim * cfg.n_heads == cfg.dim and cfg.norm_eps == 1e-5):
        raise LMForgeError("an HF BART has biases, a plain MLP, multi-head attention of the model's width and "
                           "LayerNorm eps 1e-5; this model differs")
    if not cfg.tie_embeddings:
        raise LMForgeError("an HF BART's output matrix is its token embedding; this model has its own")
    e = cfg.extra
    return {
        "architectures": ["BartForConditionalGeneration"], "model_type": "bart", "vocab_size": cfg.vocab_size,
        "d_model": cfg.dim, "encoder_layers": cfg.n_layers, "decoder_layers": cfg.decoder_layers,
        "encoder_attention_heads": cfg.n_heads, "decoder_attention_heads": cfg.n_heads,
        "encoder_ffn_dim": cfg.ffn_dim, "decoder_ffn_dim": cfg.ffn_dim,
        "activation_function": _HF_ACT[cfg.activation],
        "max_position_embeddings": cfg.context_length,  # transformers adds the two unused rows
        "scale_embedding": cfg.embed_scale, "is_encoder_decoder": True, "tie_word_embeddings": True,
        **{k: e.get(k, d) for k, d in (("pad_token_id", 1), ("bos_token_id", 0), ("eos_token_id", 2),
                                       ("decoder_start_token_id", 2))},
        "torch_dtype": "float32",
    }


def save_tokenizer(tok: Tokenizer, out: Path, chat: bool = True) -> None:
    """tokenizer.json and tokenizer_config.json; ``chat``: the model is a decoder LM, whose export then
    carries the template lmforge renders with (ChatML by default), so it chats the same way elsewhere."""
    tok.hf.save(str(out / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": tok.bos_token, "eos_token": tok.eos_token,
              "pad_token": tok.pad_token, "unk_token": tok.unk_token, "mask_token": tok.mask_token,
              "chat_template": (tok.chat_template or CHATML_TEMPLATE) if chat else tok.chat_template}
    (out / "tokenizer_config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None},
                                                          indent=2, ensure_ascii=False), encoding="utf-8")


def write_hf(model: Transformer, out: Path, tokenizer: Tokenizer | None = None,
             dtype: torch.dtype = torch.float32, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Write config.json, model.safetensors (and the tokenizer files) into an existing directory."""
    config = hf_config(model.cfg) | {"torch_dtype": str(dtype).removeprefix("torch.")}  # first: it names a misfit
    tensors = {k: v.to("cpu", dtype).contiguous() for k, v in hf_tensors(model, state_dict)}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer is not None:
        for key, token in (("bos_token_id", tokenizer.bos_token), ("eos_token_id", tokenizer.eos_token)):
            if token is not None:
                config[key] = tokenizer.token_to_id(token)
        save_tokenizer(tokenizer, out, chat=model.cfg.causal and not model.cfg.decoder_layers)
    (out / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")


def save_hf(model: Transformer, out_dir: str | Path, tokenizer: Tokenizer | None = None,
            dtype: torch.dtype = torch.float32) -> Path:
    """Write an HF model directory atomically: a complete new directory replaces any old one."""
    with atomic_dir(out_dir) as tmp:
        write_hf(model, tmp, tokenizer, dtype)
    return Path(out_dir).expanduser()


# -- `lmforge export` ----------------------------------------------------------------------------------
EXPORT_FORMATS = ("hf", "gguf")


@dataclass
class ExportResult:
    path: Path
    format: str  # "hf" | "gguf"
    size: int  # bytes written
    tensors: int
    tensor_types: dict[str, int]


def export_model(source: Any, to: str, out: str | Path, quant: str | None = None,
                 progress: bool = False) -> ExportResult:
    """Write a model as an HF directory (``to="hf"``) or a GGUF file (``to="gguf"``, ``quant`` f16 by default).

    ``source`` is a registry name, a `.gguf` file or an HF directory (our training checkpoints are
    HF directories), or an already loaded `lmforge.LM` / `Checkpoint`. Everything is checked before
    anything is written, and the output replaces any old one atomically.
    """
    from .gguf_write import check_quant, gguf_arch, write_gguf

    fmt = to.lower()
    if fmt not in EXPORT_FORMATS:
        raise LMForgeError(f"unknown export format {to!r} (supported: {', '.join(EXPORT_FORMATS)})")
    if fmt == "hf" and quant is not None:
        raise LMForgeError("--quant applies to GGUF export only (an HF export is float32 safetensors)")
    q = check_quant(quant or "f16") if fmt == "gguf" else None
    dest = Path(out).expanduser()
    if fmt == "gguf" and dest.suffix.lower() != ".gguf":
        raise LMForgeError(f"{dest}: a GGUF output file must end in .gguf")
    ck = _checkpoint(source, progress)
    if fmt == "hf":
        path = save_hf(ck.model, dest, ck.tokenizer)
        size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
        n = sum(1 for _ in hf_tensors(ck.model))
        return ExportResult(path, "hf", size, n, {"F32": n})
    gguf_arch(ck.config)  # a model with no GGUF architecture is refused before anything else
    if ck.tokenizer is None:
        raise LMForgeError(f"{ck.path}: the model has no tokenizer (tokenizer.json), and a GGUF file must carry one")
    pre, name = None, ck.path.name
    if ck.format == "gguf":  # keep the source file's pre-tokenizer name and model name
        from .gguf import GGUFFile

        meta = GGUFFile(ck.path).meta
        pre, name = meta.get("tokenizer.ggml.pre"), meta.get("general.name") or ck.path.stem
    assert q is not None
    r = write_gguf(ck.model, ck.tokenizer, dest, q, name=name, pre=pre, progress=progress)
    return ExportResult(r.path, "gguf", r.size, r.tensors, r.tensor_types)


def _checkpoint(source: Any, progress: bool) -> Checkpoint:
    from . import Checkpoint, load_checkpoint

    if isinstance(source, Checkpoint):
        return source
    if isinstance(getattr(source, "checkpoint", None), Checkpoint):  # an lmforge.LM
        return source.checkpoint
    from ..registry import resolve

    # Dense fp32 weights on the CPU: re-quantizing starts from the exact values, not from packed codes.
    return load_checkpoint(resolve(str(source)), device="cpu", dtype=torch.float32, packed=False, progress=progress)
