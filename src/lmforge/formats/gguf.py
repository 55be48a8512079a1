"""GGUF files: metadata -> ModelConfig and Tokenizer, tensors -> our weights (dequantized one at a time)."""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType

from ..errors import LMForgeError
from ..model.config import ModelConfig
from ..quant.packed import PackedWeight, from_gguf_blocks

Weight = torch.Tensor | PackedWeight

ARCHITECTURES = ("llama", "qwen2", "gpt2", "t5")
_MISSING = object()
TENSOR_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # GGML order: shape[0] is the contiguous (input) dimension
    tensor_type: GGMLQuantizationType
    data: np.ndarray  # raw bytes, uint8 [rows, bytes per row]

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape))


# GGUF value types: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


class _Cursor:
    """Reads the GGUF header from an in-memory buffer. gguf's own reader builds a numpy view per
    array element, which takes seconds on a 50k-token vocabulary; this takes tens of milliseconds."""

    def __init__(self, buf: memoryview) -> None:
        self.buf, self.pos = buf, 0

    def scalar(self, fmt: str) -> Any:
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return v

    def string(self) -> str:
        n = self.scalar("<Q")
        if self.pos + n > len(self.buf):
            raise ValueError("string runs past the end of the file")
        s = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def value(self, vtype: int) -> Any:
        if vtype == 8:
            return self.string()
        if vtype == 9:
            etype, n = self.scalar("<I"), self.scalar("<Q")
            if etype in _SCALARS:  # numeric arrays in one unpack
                fmt = _SCALARS[etype]
                size = struct.calcsize(fmt)
                out = list(struct.unpack_from(f"<{n}{fmt[1]}", self.buf, self.pos))
                self.pos += n * size
                return out
            return [self.value(etype) for _ in range(n)]
        if vtype not in _SCALARS:
            raise ValueError(f"unknown metadata value type {vtype}")
        return self.scalar(_SCALARS[vtype])


class GGUFFile:
    """A memory-mapped GGUF file: its metadata decoded, its tensors as raw byte views."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self._parse()
        except (ValueError, struct.error, OSError, OverflowError) as e:
            raise LMForgeError(f"{self.path}: not a valid GGUF file ({e}); is it truncated or corrupt?") from None
        self.arch = self.meta.get("general.architecture")
        if self.arch not in ARCHITECTURES:
            raise LMForgeError(f"{self.path}: unsupported GGUF architecture {self.arch!r} "
                               f"(supported: {', '.join(ARCHITECTURES)})")

    def _parse(self) -> None:
        from gguf import GGML_QUANT_SIZES

        self.mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        cur = _Cursor(memoryview(self.mmap))
        if bytes(cur.buf[:4]) != b"GGUF":
            raise ValueError("bad magic number")
        cur.pos = 4
        version, n_tensors, n_kv = cur.scalar("<I"), cur.scalar("<Q"), cur.scalar("<Q")
        if version not in (2, 3):
            raise ValueError(f"unsupported GGUF version {version}")
        self.meta: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cur.string()
            self.meta[key] = cur.value(cur.scalar("<I"))
        infos = []
        for _ in range(n_tensors):
            name = cur.string()
            dims = tuple(cur.scalar("<Q") for _ in range(cur.scalar("<I")))
            infos.append((name, dims, cur.scalar("<I"), cur.scalar("<Q")))
        align = int(self.meta.get("general.alignment", 32))
        start = -(-cur.pos // align) * align
        self.tensors: dict[str, TensorInfo] = {}
        for name, dims, tcode, offset in infos:
            try:
                ttype = GGMLQuantizationType(tcode)
            except ValueError:
                raise LMForgeError(f"{self.path}: unknown GGUF tensor type {tcode} in {name}") from None
            if ttype.name not in TENSOR_TYPES:
                raise LMForgeError(f"{self.path}: unsupported GGUF tensor type {ttype.name} in {name} "
                                   f"(supported: {', '.join(TENSOR_TYPES)})")
            block, size = GGML_QUANT_SIZES[ttype]
            row_bytes = dims[0] // block * size
            rows = int(np.prod(dims[1:])) if len(dims) > 1 else 1
            lo = start + offset
            if lo + rows * row_bytes > len(self.mmap):
                raise ValueError(f"tensor {name} runs past the end of the file")
            self.tensors[name] = TensorInfo(name, dims, ttype, self.mmap[lo:lo + rows * row_bytes].reshape(rows, row_bytes))

    def arch_key(self, key: str, default: Any = None) -> Any:
        return self.meta.get(f"{self.arch}.{key}", default)

    def _key(self, key: str, kind: str, default: Any = _MISSING) -> Any:
        """Metadata ``{arch}.{key}`` checked against its type ("size": a positive integer, "number", "text"):
        a one-line error naming the key, not a TypeError later."""
        full = f"{self.arch}.{key}"
        value = self.meta.get(full)
        if value is None:
            if default is _MISSING:
                raise LMForgeError(f"{self.path}: GGUF metadata lacks {full}")
            return default
        integer = isinstance(value, int) and not isinstance(value, bool)
        ok = {"size": integer and value > 0, "number": isinstance(value, (int, float)) and not isinstance(value, bool),
              "text": isinstance(value, str)}[kind]
        if not ok:
            want = {"size": "a positive integer", "number": "a number", "text": "a string"}[kind]
            raise LMForgeError(f"{self.path}: GGUF metadata {full} must be {want}, got {value!r}")
        return value

    def config(self) -> ModelConfig:
        if self.arch == "t5":
            from .gguf_t5 import t5_config

            return t5_config(self)
        k = self._key
        n_heads = k("attention.head_count", "size")
        dim = k("embedding_length", "size")
        vocab = self.meta.get(f"{self.arch}.vocab_size") or len(self.meta.get("tokenizer.ggml.tokens", [])) or None
        if vocab is None:
            vocab = self.tensors["token_embd.weight"].shape[1] if "token_embd.weight" in self.tensors else 0
        common = dict(
            vocab_size=int(vocab) if isinstance(vocab, int) else vocab, dim=dim, n_layers=k("block_count", "size"),
            n_heads=n_heads, ffn_dim=k("feed_forward_length", "size"), context_length=k("context_length", "size", 2048),
        )
        # llama.cpp writes a sliding window for Mistral-style models; qwen2 files do not say which layers
        # slide, and GPT-2 has none: refused rather than dropped.
        if self.meta.get(f"{self.arch}.expert_count"):
            raise LMForgeError(f"{self.path}: mixture-of-experts models ({self.arch}.expert_count) are not supported")
        window = k("attention.sliding_window", "size", 0)
        if window and self.arch != "llama":
            raise LMForgeError(f"{self.path}: {self.arch}.attention.sliding_window is not supported for "
                               f"architecture {self.arch} (supported: llama)")
        if self.arch == "gpt2":
            return ModelConfig(family="gpt2", norm="layernorm", norm_eps=float(k("attention.layer_norm_epsilon", "number",
                                                                                 1e-5)),
                               mlp="gelu", activation="gelu_tanh", position="learned", qkv_bias=True, out_bias=True,
                               mlp_bias=True, tie_embeddings="output.weight" not in self.tensors, **common)
        scaling = None
        kind = k("rope.scaling.type", "text", None)
        if kind and kind != "none":
            scaling = {"type": kind, "factor": float(k("rope.scaling.factor", "number", 1.0))}
            if self.meta.get(f"{self.arch}.rope.scaling.original_context_length"):
                scaling["original_max_position_embeddings"] = k("rope.scaling.original_context_length", "size")
        if k("rope.dimension_count", "size", None) not in (None, k("attention.key_length", "size", dim // n_heads)):
            raise LMForgeError(f"{self.path}: {self.arch}.rope.dimension_count differs from the head size: partial "
                               "rotary embeddings are not supported")
        return ModelConfig(
            family="qwen2" if self.arch == "qwen2" else "llama",
            n_kv_heads=k("attention.head_count_kv", "size", n_heads),
            head_dim=k("attention.key_length", "size", None) or k("rope.dimension_count", "size", None) or dim // n_heads,
            norm="rmsnorm", norm_eps=float(k("attention.layer_norm_rms_epsilon", "number", 1e-6)),
            mlp="swiglu", activation="silu", position="rope", rope_theta=float(k("rope.freq_base", "number", 10000.0)),
            rope_scaling=scaling, qkv_bias="blk.0.attn_q.bias" in self.tensors,
            tie_embeddings="output.weight" not in self.tensors, sliding_window=window, **common,
        )

    def tensor(self, name: str) -> torch.Tensor:
        """Dequantize one tensor to fp32, in PyTorch's [out, in] layout."""
        from gguf.quants import dequantize

        if name not in self.tensors:
            raise LMForgeError(f"{self.path}: tensor {name!r} missing")
        t = self.tensors[name]
        shape = tuple(int(x) for x in reversed(t.shape))
        try:
            if t.tensor_type == GGMLQuantizationType.F32:
                arr = t.data.view(np.float32)
            else:
                arr = dequantize(t.data, t.tensor_type)
            return torch.from_numpy(np.array(arr, dtype=np.float32).reshape(shape))  # copy: the mmap is read-only
        except (ValueError, IndexError, OSError) as e:
            raise LMForgeError(f"{self.path}: cannot read tensor {name!r} ({e}); is the file truncated?") from None

    def weight(self, name: str, packed: bool) -> Weight:
        """A linear weight: with ``packed``, blocks of a type with packed codes (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0,
        Q4_K, Q5_K, Q6_K: `quant.packed.from_gguf_blocks`) stay as codes, else dense fp32."""
        t = self.tensors.get(name)
        if packed and t is not None and len(t.shape) == 2:
            qw = from_gguf_blocks(np.asarray(t.data), t.tensor_type.name, int(t.shape[1]), int(t.shape[0]))
            if qw is not None:
                return qw
        return self.tensor(name)

    def header_tensor(self, name: str) -> torch.Tensor:
        """A meta tensor of one tensor's shape ([out, in] layout), from the header: no data read."""
        if name not in self.tensors:
            raise LMForgeError(f"{self.path}: tensor {name!r} missing")
        return torch.empty(tuple(int(x) for x in reversed(self.tensors[name].shape)), device="meta")

    def state_dict(self, cfg: ModelConfig, packed: bool = False, headers_only: bool = False
                   ) -> Iterator[tuple[str, Weight]]:
        """Yield our (name, weight) pairs one at a time; with ``packed``, matrices may stay as codes; with
        ``headers_only``, meta tensors of the right shapes (a layout check that reads no weights)."""
        get = self.header_tensor if headers_only else self.tensor
        if cfg.family == "t5":  # dense: the packed CPU kernels serve decoder LMs
            from .gguf_t5 import t5_state_dict

            yield from t5_state_dict(self, cfg, headers_only)
            return
        w = get if headers_only else lambda name: self.weight(name, packed)
        yield "tok_emb.weight", get("token_embd.weight")
        if cfg.family == "gpt2":
            yield "pos_emb.weight", get("position_embd.weight")
        for i in range(cfg.n_layers):
            b, o = f"blk.{i}.", f"layers.{i}."
            yield o + "attn_norm.weight", get(b + "attn_norm.weight")
            yield o + "mlp_norm.weight", get(b + "ffn_norm.weight")
            yield o + "attn.o.weight", w(b + "attn_output.weight")
            yield o + "mlp.down.weight", w(b + "ffn_down.weight")
            if cfg.family == "gpt2":
                for ours, theirs in (("attn_norm", "attn_norm"), ("mlp_norm", "ffn_norm"), ("attn.o", "attn_output"),
                                     ("mlp.down", "ffn_down"), ("attn.qkv", "attn_qkv"), ("mlp.fc", "ffn_up")):
                    yield o + f"{ours}.bias", get(b + f"{theirs}.bias")
                yield o + "attn.qkv.weight", w(b + "attn_qkv.weight")
                yield o + "mlp.fc.weight", w(b + "ffn_up.weight")
                continue
            q, k, v = w(b + "attn_q.weight"), w(b + "attn_k.weight"), w(b + "attn_v.weight")
            if self.arch == "llama":  # llama.cpp permutes q/k rows for its interleaved rope; undo it
                q = _rows(q, lambda x: _unpermute(x, cfg.n_heads))
                k = _rows(k, lambda x: _unpermute(x, cfg.n_kv_heads))
            yield o + "attn.qkv.weight", _cat([q, k, v])
            if cfg.qkv_bias:
                qb, kb, vb = get(b + "attn_q.bias"), get(b + "attn_k.bias"), get(b + "attn_v.bias")
                if self.arch == "llama":
                    qb, kb = _unpermute(qb, cfg.n_heads), _unpermute(kb, cfg.n_kv_heads)
                yield o + "attn.qkv.bias", torch.cat([qb, kb, vb])
            yield o + "mlp.gate_up.weight", _cat([w(b + "ffn_gate.weight"), w(b + "ffn_up.weight")])
        yield "norm.weight", get("output_norm.weight")
        if cfg.family == "gpt2":
            yield "norm.bias", get("output_norm.bias")
        if not cfg.tie_embeddings:
            yield "lm_head.weight", w("output.weight")
        elif packed and not headers_only:
            head = w("token_embd.weight")
            if isinstance(head, PackedWeight):  # codes of the tied matrix, for the output layer
                yield "lm_head.weight", head


def _rows(x: Weight, fn: Callable[[torch.Tensor], torch.Tensor]) -> Weight:
    return x.map_rows(fn) if isinstance(x, PackedWeight) else fn(x)


def _cat(parts: list[Weight]) -> Weight:
    if all(isinstance(p, PackedWeight) for p in parts):
        return PackedWeight.cat(parts)  # type: ignore[arg-type]
    return torch.cat([p.dequantize() if isinstance(p, PackedWeight) else p for p in parts])


def _unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of llama.cpp's q/k permutation: interleaved rope pairs back to the half-split layout."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)
