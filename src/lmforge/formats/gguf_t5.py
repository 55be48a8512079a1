"""T5 encoder-decoders in GGUF files, as llama.cpp names them (architecture ``t5``).

llama.cpp keeps the two stacks under ``enc.blk.N.`` and ``dec.blk.N.``, each stack's relative position
bias table in its first block (``attn_rel_b``), and computes buckets up to a fixed distance of 128.
Its T5 has no output scaling: a model that scales before a tied output matrix is written with an
output matrix of its own, the embedding times ``d_model ** -0.5``, which gives the same logits. A gated
MLP is llama.cpp's gated tanh-GELU and a plain one its ReLU; other activations have no place there.
The tokenizer is SentencePiece Unigram (``tokenizer.ggml.model = "t5"``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch

from ..errors import LMForgeError
from ..model.config import ModelConfig
from ..tokenizer import Tokenizer

if TYPE_CHECKING:
    from .gguf import GGUFFile

MAX_DISTANCE = 128  # llama.cpp's fixed relative_attention_max_distance
_STACKS = (("encoder", "enc"), ("decoder", "dec"))
# (our name in a layer, llama.cpp's name in a block), beside the fused matrices handled below
_NORMS = (("attn_norm", "attn_norm"), ("mlp_norm", "ffn_norm"), ("attn.o", "attn_o"), ("mlp.down", "ffn_down"))
_CROSS = (("cross_norm", "cross_attn_norm"), ("cross.q", "cross_attn_q"), ("cross.o", "cross_attn_o"))


def check_t5(cfg: ModelConfig) -> None:
    """Refuse, by name, a T5 model that llama.cpp's `t5` architecture cannot express."""
    act = {"swiglu": "gelu_tanh", "gelu": "relu"}.get(cfg.mlp)
    if cfg.activation != act:
        raise LMForgeError(f"unsupported: a GGUF t5 model has a gated tanh-GELU or a plain ReLU MLP; this one is "
                           f"{cfg.mlp} with {cfg.activation}")
    if cfg.relative_max_distance != MAX_DISTANCE:
        raise LMForgeError(f"unsupported: llama.cpp's t5 fixes relative_attention_max_distance at {MAX_DISTANCE}; "
                           f"this model's is {cfg.relative_max_distance}")
    if cfg.norm != "rmsnorm" or cfg.n_kv_heads != cfg.n_heads or cfg.qkv_bias or cfg.out_bias or cfg.mlp_bias:
        raise LMForgeError("unsupported: a GGUF t5 model has RMS norms, multi-head attention and no biases")


def t5_tensor_names(cfg: ModelConfig) -> list[str]:
    """Every tensor llama.cpp's t5 file of this shape holds (the gated MLP's ffn_gate, an own output)."""
    names = ["token_embd.weight"]
    for stack, short in _STACKS:
        names.append(f"{short}.blk.0.attn_rel_b.weight")
        for i in range(cfg.n_layers if stack == "encoder" else cfg.decoder_layers):
            b = f"{short}.blk.{i}."
            parts = [theirs for _, theirs in _NORMS] + ["attn_q", "attn_k", "attn_v", "ffn_up"]
            parts += ["ffn_gate"] if cfg.mlp == "swiglu" else []
            parts += [t for _, t in _CROSS] + ["cross_attn_k", "cross_attn_v"] if stack == "decoder" else []
            names += [f"{b}{p}.weight" for p in parts]
        names.append(f"{short}.output_norm.weight")
    return names + ([] if cfg.tie_embeddings else ["output.weight"])


def t5_config(g: GGUFFile) -> ModelConfig:
    """ModelConfig of a `t5` GGUF, its tensors checked against it by name and block count."""
    k = g._key
    n_heads = k("attention.head_count", "size")
    dim = k("embedding_length", "size")
    head_dim = k("attention.key_length", "size", dim // n_heads)
    if k("attention.value_length", "size", head_dim) != head_dim or k("attention.head_count_kv", "size",
                                                                        n_heads) != n_heads:
        raise LMForgeError(f"{g.path}: unsupported t5 attention: value length or key/value heads differ from "
                           "the key length and heads")
    n_layers = k("block_count", "size")
    meta = g.meta
    start = meta.get("t5.decoder_start_token_id", 0)
    if not isinstance(start, int) or isinstance(start, bool) or start < 0:
        raise LMForgeError(f"{g.path}: GGUF metadata t5.decoder_start_token_id must be a token id, got {start!r}")
    eps = k("attention.layer_norm_rms_epsilon", "number", None)
    eps = k("attention.layer_norm_epsilon", "number", 1e-6) if eps is None else eps
    vocab = meta.get("t5.vocab_size") or len(meta.get("tokenizer.ggml.tokens", []))
    if not vocab and "token_embd.weight" in g.tensors:
        vocab = int(g.tensors["token_embd.weight"].shape[1])
    cfg = ModelConfig(
        family="t5", vocab_size=int(vocab), dim=dim, n_layers=n_layers,
        decoder_layers=k("decoder_block_count", "size", n_layers), n_heads=n_heads, head_dim=head_dim,
        ffn_dim=k("feed_forward_length", "size"), norm="rmsnorm", norm_eps=float(eps),
        mlp="swiglu" if "enc.blk.0.ffn_gate.weight" in g.tensors else "gelu",
        activation="gelu_tanh" if "enc.blk.0.ffn_gate.weight" in g.tensors else "relu",
        position="relative", relative_buckets=k("attention.relative_buckets_count", "size", 32),
        relative_max_distance=MAX_DISTANCE, tie_embeddings="output.weight" not in g.tensors, output_scale=False,
        context_length=k("context_length", "size", 512),
        extra={"hf_model_type": "t5", "pad_token_id": int(meta.get("tokenizer.ggml.padding_token_id", 0)),
               "eos_token_id": int(meta.get("tokenizer.ggml.eos_token_id", 1)),
               "decoder_start_token_id": start},
    )
    for stack, short in _STACKS:
        want = cfg.n_layers if stack == "encoder" else cfg.decoder_layers
        blocks = {int(m.group(1)) for n in g.tensors if (m := re.match(rf"{short}\.blk\.(\d+)\.", n))}
        if len(blocks) != want:
            key = "t5.block_count" if stack == "encoder" else "t5.decoder_block_count"
            raise LMForgeError(f"{g.path}: GGUF metadata gives {key}={want}, but the file holds {len(blocks)} "
                               f"{stack} blocks")
    expected = set(t5_tensor_names(cfg))
    odd = sorted(set(g.tensors) - expected)
    if odd:  # e.g. a relative bias in every block (UMT5) or in the cross-attention
        raise LMForgeError(f"{g.path}: unsupported tensor {odd[0]!r} in a t5 GGUF")
    missing = [n for n in t5_tensor_names(cfg) if n not in g.tensors]
    if missing:
        raise LMForgeError(f"{g.path}: tensor {missing[0]!r} missing from a t5 GGUF")
    return cfg


def t5_state_dict(g: GGUFFile, cfg: ModelConfig, headers_only: bool = False
                  ) -> Iterator[tuple[str, torch.Tensor]]:
    """Our (name, tensor) pairs of a `t5` GGUF, dense fp32 (or meta tensors of their shapes)."""
    get = g.header_tensor if headers_only else g.tensor
    yield "tok_emb.weight", get("token_embd.weight")
    for stack, short in _STACKS:
        yield f"{stack}.pos_bias.weight", get(f"{short}.blk.0.attn_rel_b.weight")
        for i in range(cfg.n_layers if stack == "encoder" else cfg.decoder_layers):
            o, b = f"{stack}.layers.{i}.", f"{short}.blk.{i}."
            for ours, theirs in _NORMS + (_CROSS if stack == "decoder" else ()):
                yield f"{o}{ours}.weight", get(f"{b}{theirs}.weight")
            yield o + "attn.qkv.weight", torch.cat([get(f"{b}attn_{x}.weight") for x in "qkv"])
            if stack == "decoder":
                yield o + "cross.kv.weight", torch.cat([get(f"{b}cross_attn_{x}.weight") for x in "kv"])
            if cfg.mlp == "swiglu":
                yield o + "mlp.gate_up.weight", torch.cat([get(b + "ffn_gate.weight"), get(b + "ffn_up.weight")])
            else:
                yield o + "mlp.fc.weight", get(b + "ffn_up.weight")
        yield f"{stack}.norm.weight", get(f"{short}.output_norm.weight")
    if not cfg.tie_embeddings:
        yield "lm_head.weight", get("output.weight")


Put = Callable[..., None]


def t5_plan(sd: dict[str, torch.Tensor], cfg: ModelConfig, put: Put, add: Put) -> None:
    """Every tensor of a `t5` file, through `gguf_write`'s ``put(name, key, start, stop, head=)`` (a slice
    of our tensor) and ``add(name, fn, shape, head=)`` (a computed one); `check_t5` has passed."""
    put("token_embd.weight", "tok_emb.weight", head=cfg.tie_embeddings and not cfg.output_scale)
    q, kv = cfg.q_dim, cfg.kv_dim
    for stack, short in _STACKS:
        put(f"{short}.blk.0.attn_rel_b.weight", f"{stack}.pos_bias.weight")
        for i in range(cfg.n_layers if stack == "encoder" else cfg.decoder_layers):
            o, b = f"{stack}.layers.{i}.", f"{short}.blk.{i}."
            for ours, theirs in _NORMS + (_CROSS if stack == "decoder" else ()):
                put(f"{b}{theirs}.weight", f"{o}{ours}.weight")
            for x, lo in zip("qkv", (0, q, q + kv)):
                put(f"{b}attn_{x}.weight", o + "attn.qkv.weight", lo, lo + (q if x == "q" else kv))
            if stack == "decoder":
                put(b + "cross_attn_k.weight", o + "cross.kv.weight", 0, kv)
                put(b + "cross_attn_v.weight", o + "cross.kv.weight", kv, 2 * kv)
            if cfg.mlp == "swiglu":
                put(b + "ffn_gate.weight", o + "mlp.gate_up.weight", 0, cfg.ffn_dim)
                put(b + "ffn_up.weight", o + "mlp.gate_up.weight", cfg.ffn_dim, 2 * cfg.ffn_dim)
            else:
                put(b + "ffn_up.weight", o + "mlp.fc.weight")
        put(f"{short}.output_norm.weight", f"{stack}.norm.weight")
    head = sd["tok_emb.weight"] if cfg.tie_embeddings else sd["lm_head.weight"]
    if cfg.output_scale:  # llama.cpp does not scale: fold T5's d_model ** -0.5 into an output matrix
        add("output.weight", lambda: head * cfg.dim ** -0.5, tuple(head.shape), head=True)
    elif not cfg.tie_embeddings:
        put("output.weight", "lm_head.weight", head=True)


def t5_metadata(w: Any, cfg: ModelConfig) -> None:
    """The `t5.*` keys llama.cpp's converter writes."""
    w.add_context_length(cfg.context_length)
    w.add_embedding_length(cfg.dim)
    w.add_feed_forward_length(cfg.ffn_dim)
    w.add_block_count(cfg.n_layers)
    w.add_decoder_block_count(cfg.decoder_layers)
    w.add_head_count(cfg.n_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_layer_norm_eps(cfg.norm_eps)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_relative_attn_buckets_count(cfg.relative_buckets)
    w.add_decoder_start_token_id(int(cfg.extra.get("decoder_start_token_id", 0)))
    w.add_vocab_size(cfg.vocab_size)


# -- tokenizer ----------------------------------------------------------------------------------------
def unigram_metadata(tok: Tokenizer, vocab_size: int) -> dict[str, Any]:
    """`tokenizer.ggml.*` metadata of a SentencePiece Unigram tokenizer (T5's), as llama.cpp's converter
    writes it: pieces, scores and types; ids the tokenizer lacks become unused ``[PAD{id}]`` tokens."""
    spec = json.loads(tok.hf.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "Unigram":
        raise LMForgeError(f"a GGUF t5 model needs a SentencePiece Unigram tokenizer; this one is {model.get('type')}")
    norm = spec.get("normalizer")
    charsmap = None
    if norm is not None:
        if norm.get("type") != "Precompiled":
            raise LMForgeError(f"cannot write this Unigram tokenizer as GGUF: its {norm.get('type')} normalizer has "
                               "no place there (supported: none, or SentencePiece's precompiled charsmap)")
        import base64

        charsmap = base64.b64decode(norm.get("precompiled_charsmap") or "")
    pre = spec.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    if kinds != ["WhitespaceSplit", "Metaspace"] or parts[1].get("replacement") != "\u2581":
        raise LMForgeError(f"cannot write this Unigram tokenizer as GGUF: pre-tokenizer {'+'.join(map(str, kinds))} "
                           "(supported: T5's WhitespaceSplit + Metaspace)")
    vocab = tok.hf.get_vocab(with_added_tokens=True)
    if len(vocab) > vocab_size or max(vocab.values()) >= vocab_size:
        raise LMForgeError(f"the tokenizer has {len(vocab)} tokens, more than the model's vocabulary of {vocab_size}")
    scores = {p: s for p, s in model.get("vocab", [])}
    added = {a["content"]: a.get("special", False) for a in spec.get("added_tokens", [])}
    by_id = {i: t for t, i in vocab.items()}
    unk = model.get("unk_id")
    tokens, types, values = [], [], []
    for i in range(vocab_size):
        t = by_id.get(i)
        tokens.append(t if t is not None else f"[PAD{i}]")
        values.append(float(scores.get(t, 0.0)) if t is not None else -10000.0)
        # 1 normal, 2 unknown, 3 control (special), 4 user-defined (added, not special), 5 unused
        types.append(5 if t is None else 2 if i == unk else 1 if t not in added else 3 if added[t] else 4)
    meta: dict[str, Any] = {
        "tokenizer.ggml.model": "t5", "tokenizer.ggml.pre": "default", "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": values, "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.add_space_prefix": parts[1].get("prepend_scheme", "always") != "never",
        "tokenizer.ggml.remove_extra_whitespaces": True,
        "tokenizer.ggml.add_bos_token": False,
    }
    if charsmap:
        meta["tokenizer.ggml.precompiled_charsmap"] = charsmap
    for key, token in (("bos_token_id", tok.bos_token), ("eos_token_id", tok.eos_token),
                       ("padding_token_id", tok.pad_token), ("unknown_token_id", tok.unk_token)):
        if token is not None and tok.token_to_id(token) is not None:
            meta[f"tokenizer.ggml.{key}"] = tok.token_to_id(token)
    # The token the post-processor appends (T5's `</s>`) is the EOS the file names, added to every text.
    plain, full = tok.hf.encode("x", add_special_tokens=False).ids, tok.hf.encode("x").ids
    if full[:-1] != plain and full != plain:
        raise LMForgeError("cannot write this Unigram tokenizer as GGUF: its post-processor adds tokens other than "
                           "one at the end")
    appended = full[-1] if len(full) == len(plain) + 1 else None
    if appended is not None and meta.setdefault("tokenizer.ggml.eos_token_id", appended) != appended:
        raise LMForgeError("cannot write this Unigram tokenizer as GGUF: it appends a token other than its EOS")
    meta["tokenizer.ggml.add_eos_token"] = appended is not None
    if tok.chat_template:
        meta["tokenizer.chat_template"] = tok.chat_template
    return meta


def add_unigram_metadata(w: Any, meta: dict[str, Any]) -> None:
    w.add_tokenizer_model(meta["tokenizer.ggml.model"])
    w.add_tokenizer_pre(meta["tokenizer.ggml.pre"])
    w.add_token_list(meta["tokenizer.ggml.tokens"])
    w.add_token_scores(meta["tokenizer.ggml.scores"])
    w.add_token_types(meta["tokenizer.ggml.token_type"])
    w.add_add_space_prefix(meta["tokenizer.ggml.add_space_prefix"])
    w.add_remove_extra_whitespaces(meta["tokenizer.ggml.remove_extra_whitespaces"])
    if "tokenizer.ggml.precompiled_charsmap" in meta:
        w.add_precompiled_charsmap(meta["tokenizer.ggml.precompiled_charsmap"])
    for key, add in (("bos_token_id", w.add_bos_token_id), ("eos_token_id", w.add_eos_token_id),
                     ("padding_token_id", w.add_pad_token_id), ("unknown_token_id", w.add_unk_token_id)):
        if f"tokenizer.ggml.{key}" in meta:
            add(meta[f"tokenizer.ggml.{key}"])
    w.add_add_bos_token(meta["tokenizer.ggml.add_bos_token"])
    w.add_add_eos_token(meta["tokenizer.ggml.add_eos_token"])
    if "tokenizer.chat_template" in meta:
        w.add_chat_template(meta["tokenizer.chat_template"])
