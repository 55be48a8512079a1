"""Writing models as GGUF files that llama.cpp, Ollama, transformers and lmforge itself load.

The inverse of `formats.gguf` (T5 encoder-decoders: `formats.gguf_t5`): our fused q/k/v and gate/up
matrices are split into llama.cpp's tensors, Llama q/k rows are permuted for llama.cpp's interleaved
rope, 2-D matrices are stored in the chosen
type (norms, biases and other 1-D tensors stay F32) and the tokenizer goes into `tokenizer.ggml.*`
metadata. Tensors are encoded and written one at a time, into a temporary file renamed into place.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import (
    GGML_QUANT_SIZES,
    GGML_QUANT_VERSION,
    GGMLQuantizationType,
    GGUFWriter,
    LlamaFileType,
    RopeScalingType,
)

from ..errors import LMForgeError
from ..fsutil import atomic_file
from ..model import ModelConfig, Transformer, make_model
from ..tokenizer import (
    CHATML_TEMPLATE,
    END_OF_TURN_TOKENS,
    GPT4_SPLIT,
    LLAMA3_SPLIT,
    QWEN2_SPLIT,
    Tokenizer,
)
from .gguf_t5 import add_unigram_metadata, check_t5, t5_metadata, t5_plan, unigram_metadata

QT = GGMLQuantizationType
# name -> (type of the 2-D matrices, general.file_type)
QUANTS: dict[str, tuple[GGMLQuantizationType, LlamaFileType]] = {
    "f32": (QT.F32, LlamaFileType.ALL_F32),
    "f16": (QT.F16, LlamaFileType.MOSTLY_F16),
    "bf16": (QT.BF16, LlamaFileType.MOSTLY_BF16),
    "q8_0": (QT.Q8_0, LlamaFileType.MOSTLY_Q8_0),
    "q4_1": (QT.Q4_1, LlamaFileType.MOSTLY_Q4_1),
}
ARCHITECTURES = ("llama", "qwen2", "gpt2")
# Text the rebuilt tokenizer must split exactly as the model's own does before a file is written.
_PROBE = ("Hello world! It's 2024: 12345 apples, 3.14159 pies.\n\n    indented\ttabs  and   spaces\r\n"
          "<|im_start|>user\nhi there<|im_end|>\n<|endoftext|> ünïcödé Ελληνικά 日本語 😀 don't I'LL")


@dataclass
class GGUFResult:
    path: Path
    size: int  # bytes
    tensors: int
    tensor_types: dict[str, int]


@dataclass
class _Entry:
    name: str
    shape: tuple[int, ...]  # PyTorch order: [rows, cols], cols contiguous
    qtype: GGMLQuantizationType
    data: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        block, size = GGML_QUANT_SIZES[self.qtype]
        n = int(np.prod(self.shape))
        return n // block * size


def check_quant(quant: str) -> str:
    q = quant.lower()
    if q not in QUANTS:
        raise LMForgeError(f"unsupported GGUF quantization {quant!r} (supported: {', '.join(QUANTS)})")
    return q


def llama_cpp_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Half-split rope rows (ours, HF's) -> llama.cpp's interleaved pairs; the inverse of `gguf._unpermute`."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_arch(cfg: ModelConfig) -> str:
    """The GGUF architecture a model is written as, or a one-line error saying why it has none."""
    if cfg.family == "t5":
        check_t5(cfg)
        return "t5"
    if cfg.family not in ARCHITECTURES or not cfg.causal or cfg.head != "lm":
        raise LMForgeError(f"unsupported: cannot write a {cfg.family} model as GGUF (supported: "
                           f"{', '.join(ARCHITECTURES)} decoders and t5 encoder-decoders, as llama.cpp names them)")
    if cfg.family != "gpt2" and (cfg.out_bias or cfg.mlp_bias):
        raise LMForgeError(f"cannot write this {cfg.family} model as GGUF: attention-output or MLP biases "
                           "have no place in the llama/qwen2 GGUF layout")
    kind = (cfg.rope_scaling or {}).get("rope_type", (cfg.rope_scaling or {}).get("type"))
    if kind not in (None, "default", "linear"):
        raise LMForgeError(f"cannot write rope scaling {kind!r} to GGUF yet (supported: linear)")
    if cfg.sliding_window and (cfg.family != "llama" or cfg.sliding_layers is not None):
        raise LMForgeError("cannot write this sliding-window model as GGUF: only a llama model whose layers all "
                           "slide has a place for its window there")
    return cfg.family


def _matrix_type(qtype: GGMLQuantizationType, cols: int, head: bool) -> GGMLQuantizationType:
    if qtype == QT.Q4_1 and head:
        # The output matrix is the most sensitive to rounding; llama.cpp's quantizer keeps it at a
        # higher precision too (Q6_K there; gguf-py writes no K-quants, so Q8_0 here).
        qtype = QT.Q8_0
    if cols % GGML_QUANT_SIZES[qtype][0]:
        return QT.F16  # rows that do not split into whole blocks: F16, as llama.cpp's converter falls back
    return qtype


def _plan(model: Transformer, qtype: GGMLQuantizationType) -> list[_Entry]:
    """Every tensor of the file, with its GGUF name, shape and type, its data produced on demand."""
    cfg = model.cfg
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    with torch.device("meta"):
        expected = set(make_model(cfg).state_dict())
    odd, missing = sorted(set(sd) - expected), sorted(expected - set(sd))
    if odd:
        raise LMForgeError(f"cannot write GGUF: unexpected tensor {odd[0]!r} (merge adapters into the model first)")
    if missing:
        raise LMForgeError(f"cannot write GGUF: the model lacks tensor {missing[0]!r}")
    entries: list[_Entry] = []

    def add(name: str, fn: Callable[[], torch.Tensor], shape: tuple[int, ...], head: bool = False) -> None:
        if len(shape) == 1 or name == "position_embd.weight" or "attn_rel_b" in name:  # llama.cpp: F32 only
            t = QT.F32
        else:
            t = _matrix_type(qtype, shape[1], head)
        entries.append(_Entry(name, shape, t, fn))

    def put(name: str, key: str, start: int = 0, stop: int | None = None, heads: int = 0, head: bool = False) -> None:
        t = sd[key][start:stop]
        fn = (lambda: llama_cpp_permute(t, heads)) if heads else (lambda: t)
        add(name, fn, tuple(t.shape), head)

    if cfg.family == "t5":
        t5_plan(sd, cfg, put, add)
        return entries
    tied = cfg.tie_embeddings
    put("token_embd.weight", "tok_emb.weight", head=tied)
    if cfg.family == "gpt2":
        put("position_embd.weight", "pos_emb.weight")
    perm = cfg.family == "llama"  # qwen2 runs NEOX (half-split) rope in llama.cpp: no permutation
    q, kv = cfg.q_dim, cfg.kv_dim
    for i in range(cfg.n_layers):
        o, b = f"layers.{i}.", f"blk.{i}."
        if cfg.family == "gpt2":
            for ours, theirs in (("attn_norm", "attn_norm"), ("attn.qkv", "attn_qkv"), ("attn.o", "attn_output"),
                                 ("mlp_norm", "ffn_norm"), ("mlp.fc", "ffn_up"), ("mlp.down", "ffn_down")):
                put(f"{b}{theirs}.weight", f"{o}{ours}.weight")
                put(f"{b}{theirs}.bias", f"{o}{ours}.bias")
            continue
        put(b + "attn_norm.weight", o + "attn_norm.weight")
        for kind in ("weight", "bias") if cfg.qkv_bias else ("weight",):
            key = f"{o}attn.qkv.{kind}"
            put(f"{b}attn_q.{kind}", key, 0, q, cfg.n_heads if perm else 0)
            put(f"{b}attn_k.{kind}", key, q, q + kv, cfg.n_kv_heads if perm else 0)
            put(f"{b}attn_v.{kind}", key, q + kv, q + 2 * kv)
        put(b + "attn_output.weight", o + "attn.o.weight")
        put(b + "ffn_norm.weight", o + "mlp_norm.weight")
        put(b + "ffn_gate.weight", o + "mlp.gate_up.weight", 0, cfg.ffn_dim)
        put(b + "ffn_up.weight", o + "mlp.gate_up.weight", cfg.ffn_dim, 2 * cfg.ffn_dim)
        put(b + "ffn_down.weight", o + "mlp.down.weight")
    put("output_norm.weight", "norm.weight")
    if cfg.family == "gpt2":
        put("output_norm.bias", "norm.bias")
    if not tied:  # a tied model has no output.weight: llama.cpp and transformers reuse token_embd
        put("output.weight", "lm_head.weight", head=True)
    return entries


def _encode(e: _Entry) -> np.ndarray:
    from gguf.quants import quantize

    arr = np.ascontiguousarray(e.data().to("cpu", torch.float32).numpy())
    if e.qtype == QT.F32:
        return arr
    if e.qtype == QT.F16:
        return arr.astype(np.float16)
    return quantize(arr, e.qtype)


# -- tokenizer ----------------------------------------------------------------------------------------
def _pre_name(spec: dict[str, Any]) -> str:
    """The llama.cpp pre-tokenizer name for an HF byte-level pre-tokenizer, by its shape."""
    spec = spec or {}
    parts = spec.get("pretokenizers", []) if spec.get("type") == "Sequence" else [spec]
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not parts[1].get("use_regex", True):
        pattern = (parts[0].get("pattern") or {}).get("Regex")
        # lmforge's own GPT-4-style split behaves as Llama 3's (possessive quantifiers aside)
        for name, rx in (("llama-bpe", LLAMA3_SPLIT), ("llama-bpe", GPT4_SPLIT), ("qwen2", QWEN2_SPLIT)):
            if pattern == rx:
                return name
    raise LMForgeError(f"cannot name this tokenizer's pre-tokenizer for GGUF ({'+'.join(map(str, kinds))}); "
                       "supported: GPT-2, SmolLM, Llama-3 and Qwen2 byte-level splits")


def tokenizer_metadata(tok: Tokenizer, vocab_size: int, pre: str | None = None) -> dict[str, Any]:
    """`tokenizer.ggml.*` metadata (and the chat template) describing `tok` for a `vocab_size` model.

    Ids the tokenizer lacks up to ``vocab_size`` become unused ``[PAD{id}]`` tokens, as llama.cpp's
    converter writes them.
    """
    spec = json.loads(tok.hf.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise LMForgeError(f"GGUF export needs a byte-level BPE tokenizer; this one is {model.get('type')} "
                           f"with a {(spec.get('decoder') or {}).get('type')} decoder")
    vocab = tok.hf.get_vocab(with_added_tokens=True)
    if len(vocab) > vocab_size or max(vocab.values()) >= vocab_size:
        raise LMForgeError(f"the tokenizer has {len(vocab)} tokens, more than the model's vocabulary of {vocab_size}")
    added = {a["content"]: a.get("special", False) for a in spec.get("added_tokens", [])}
    by_id = {i: t for t, i in vocab.items()}
    tokens, types = [], []
    for i in range(vocab_size):
        t = by_id.get(i)
        tokens.append(t if t is not None else f"[PAD{i}]")
        # 1 normal, 3 control (special), 4 user-defined (added, not special), 5 unused
        types.append(5 if t is None else 1 if t not in added else 3 if added[t] else 4)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    meta: dict[str, Any] = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre or _pre_name(spec.get("pre_tokenizer")),
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges,
    }
    for key, token in (("bos_token_id", tok.bos_token), ("eos_token_id", tok.eos_token),
                       ("padding_token_id", tok.pad_token), ("unknown_token_id", tok.unk_token)):
        if token is not None and tok.token_to_id(token) is not None:
            meta[f"tokenizer.ggml.{key}"] = tok.token_to_id(token)
    probe = tok.hf.encode("x").ids
    bos = meta.get("tokenizer.ggml.bos_token_id")
    meta["tokenizer.ggml.add_bos_token"] = bool(bos is not None and probe[:1] == [bos] and len(probe) > 1)
    # Stop tokens beyond eos and the known end-of-turn spellings (e.g. from generation_config.json)
    usual = {tok.token_to_id(t) for t in END_OF_TURN_TOKENS} | {meta.get("tokenizer.ggml.eos_token_id")}
    extra = [i for i in tok.stop_token_ids if i not in usual]
    if extra:
        meta["tokenizer.ggml.eot_token_id"] = extra[0]
    # the template lmforge chats with, so llama.cpp and Ollama format turns the same way
    meta["tokenizer.chat_template"] = tok.chat_template or CHATML_TEMPLATE
    _check_tokenizer(tok, meta)
    return meta


def _check_tokenizer(tok: Tokenizer, meta: dict[str, Any]) -> None:
    """Refuse to write a tokenizer that the file's metadata would rebuild differently."""
    again = Tokenizer.from_gguf_metadata(meta)
    for special in (False, True):
        ours, theirs = tok.encode(_PROBE, special), again.encode(_PROBE, special)
        if ours != theirs:
            at = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
            raise LMForgeError(f"the tokenizer does not survive GGUF (pre-tokenizer {meta['tokenizer.ggml.pre']!r}): "
                               f"the rebuilt one differs from token {at} of a test text")


def _add_metadata(w: GGUFWriter, cfg: ModelConfig, meta: dict[str, Any], name: str, ftype: LlamaFileType) -> None:
    w.add_type("model")
    w.add_name(name)
    if cfg.family == "t5":
        t5_metadata(w, cfg)
        w.add_file_type(int(ftype))
        w.add_quantization_version(GGML_QUANT_VERSION)
        add_unigram_metadata(w, meta)
        return
    w.add_context_length(cfg.context_length)
    w.add_embedding_length(cfg.dim)
    w.add_block_count(cfg.n_layers)
    w.add_feed_forward_length(cfg.ffn_dim)
    w.add_head_count(cfg.n_heads)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(int(ftype))
    w.add_quantization_version(GGML_QUANT_VERSION)
    if cfg.family == "gpt2":
        w.add_layer_norm_eps(cfg.norm_eps)
    else:
        w.add_head_count_kv(cfg.n_kv_heads)
        w.add_layer_norm_rms_eps(cfg.norm_eps)
        w.add_rope_freq_base(cfg.rope_theta)
        w.add_rope_dimension_count(cfg.head_dim)
        if cfg.sliding_window:
            w.add_sliding_window(cfg.sliding_window)
        if cfg.head_dim != cfg.dim // cfg.n_heads:
            w.add_key_length(cfg.head_dim)
            w.add_value_length(cfg.head_dim)
        if cfg.rope_scaling and cfg.rope_scaling.get("rope_type", cfg.rope_scaling.get("type")) == "linear":
            w.add_rope_scaling_type(RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(float(cfg.rope_scaling["factor"]))
            if cfg.rope_scaling.get("original_max_position_embeddings"):
                w.add_rope_scaling_orig_ctx_len(int(cfg.rope_scaling["original_max_position_embeddings"]))
    w.add_tokenizer_model(meta["tokenizer.ggml.model"])
    w.add_tokenizer_pre(meta["tokenizer.ggml.pre"])
    w.add_token_list(meta["tokenizer.ggml.tokens"])
    w.add_token_types(meta["tokenizer.ggml.token_type"])
    w.add_token_merges(meta["tokenizer.ggml.merges"])
    for key, add in (("bos_token_id", w.add_bos_token_id), ("eos_token_id", w.add_eos_token_id),
                     ("padding_token_id", w.add_pad_token_id), ("unknown_token_id", w.add_unk_token_id),
                     ("eot_token_id", w.add_eot_token_id)):
        if f"tokenizer.ggml.{key}" in meta:
            add(meta[f"tokenizer.ggml.{key}"])
    w.add_add_bos_token(meta["tokenizer.ggml.add_bos_token"])
    w.add_chat_template(meta["tokenizer.chat_template"])


def write_gguf(model: Transformer, tokenizer: Tokenizer, out: str | Path, quant: str = "f16", *,
               name: str | None = None, pre: str | None = None, progress: bool = False) -> GGUFResult:
    """Write `model` and its tokenizer to a GGUF file `out` (replaced atomically).

    ``quant``: f32, f16, bf16, q8_0 or q4_1 for the 2-D matrices (see `QUANTS`). ``pre`` names llama.cpp's
    pre-tokenizer; by default it is read off the tokenizer (pass the source file's name to keep it).
    """
    from tqdm import tqdm

    qtype, ftype = QUANTS[check_quant(quant)]
    out = Path(out).expanduser()
    if out.suffix.lower() != ".gguf":
        raise LMForgeError(f"{out}: a GGUF output file must end in .gguf")
    cfg = model.cfg
    arch = gguf_arch(cfg)
    if arch == "t5":
        meta = unigram_metadata(tokenizer, cfg.vocab_size)
        _check_tokenizer(tokenizer, meta)
    else:
        meta = tokenizer_metadata(tokenizer, cfg.vocab_size, pre)
    entries = _plan(model, qtype)
    with atomic_file(out) as tmp:
        w = GGUFWriter(tmp, arch)
        try:
            _add_metadata(w, cfg, meta, name or out.stem, ftype)
            for e in entries:
                dtype = np.float16 if e.qtype == QT.F16 else np.float32
                w.add_tensor_info(e.name, e.shape, np.dtype(dtype), e.nbytes,
                                  raw_dtype=e.qtype if e.qtype not in (QT.F32, QT.F16) else None)
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            for e in tqdm(entries, desc=f"writing {out.name}", unit=" tensors", disable=not progress, leave=False):
                w.write_tensor_data(_encode(e))
        finally:
            w.close()
    types: dict[str, int] = {}
    for e in entries:
        types[e.qtype.name] = types.get(e.qtype.name, 0) + 1
    return GGUFResult(out, out.stat().st_size, len(entries), types)
