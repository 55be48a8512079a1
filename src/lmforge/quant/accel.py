"""CPU acceleration, installed into a built model by one call: `accelerate`.

The model core computes in plain PyTorch. For CPU inference, `accelerate` swaps in subclasses of its
modules whose forward takes the C kernels (kernels.py) where they apply and falls back to the plain
forward otherwise (training, torch.compile, other devices or dtypes, no C compiler): RMSNorm, SwiGLU
and rotary embeddings in one C call each, a decode step's attention written straight into the KV cache,
linear layers with a GGUF file's packed codes, and the whole block stack of a decode step in one C call
(fused.py). Outputs equal the plain forward's (the int16 activations of packed products aside, see
`kernels.act16`). The swaps keep every parameter, so LoRA wrappers, optimizers and state dicts see the
same tensors.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..model import Transformer
from ..model.blocks import MLP, Attention, KVStore, RMSNorm, Rope
from . import cpu, fused, kernels
from .packed import PackedLinear, PackedWeight, use_packed


class DecodeKVStore(KVStore, Protocol):
    """A KV cache the C decode attention writes into in place (the engine's `KVCache`)."""

    k: torch.Tensor  # [layers, slots, kv heads, capacity, head dim], fp32 on CPU
    v: torch.Tensor
    # (slots, positions) of the bound forward's rows when it is a one-token CPU fp32 step, else None.
    decode_rows: tuple[torch.Tensor, torch.Tensor] | None


class FastRMSNorm(RMSNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if kernels.fast_path(x):  # one C call instead of several dispatched ops
            return kernels.rms_norm(x, self.weight, self.eps)
        return super().forward(x)


class FastAttention(Attention):
    def forward(self, x: torch.Tensor, rope: Rope | None, mask: torch.Tensor | None, is_causal: bool,
                cache: DecodeKVStore | None) -> torch.Tensor:
        proj = self.qkv(x)
        if not kernels.fast_path(proj):
            return self.attend(proj, rope, mask, is_causal, cache)
        if rope is not None:  # q and k rotate in place, in one C call
            kernels.rope_(proj, rope[0], rope[1], self.n_heads + self.n_kv_heads, self.head_dim)
        rows = cache.decode_rows if cache is not None and x.shape[1] == 1 else None
        if rows is not None:  # decode: store this token's key/value and attend, every row in one C call
            y = kernels.attn_decode_rows(proj, cache.k[self.layer], cache.v[self.layer], *rows, self.n_heads,
                                         self.n_kv_heads, self.head_dim, self.window)
            return self.o(y)
        return self.attend(proj, None, mask, is_causal, cache)


class FastMLP(MLP):
    """A SwiGLU MLP with silu (the only kind `accelerate` installs it for)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.gate_up(x)
        if h.numel() <= kernels.MAX_ROWS * 2 * self.ffn_dim and kernels.fast_path(h):
            return self.down(kernels.swiglu(h))
        return self.down(self.act(h[..., : self.ffn_dim]) * h[..., self.ffn_dim:])


class FastLinear(nn.Linear):
    """A linear layer whose CPU inference products of many rows run in bf16 where bf16 is fast (cpu.py)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if cpu.use_bf16(x, self.out_features, kernels.MAX_ROWS):
            return cpu.bf16_linear(self, x, self.weight, self.bias)
        return super().forward(x)


class FastTransformer(Transformer):
    """Runs a one-token CPU step's blocks in one C call where they qualify (fused.plan), and a tied output
    matrix from its packed codes (`head_packed`) while the embeddings are unchanged."""

    head_packed: PackedWeight | None = None
    _head_version = 0

    def set_head_packed(self, packed: PackedWeight) -> None:
        self.head_packed, self._head_version = packed, self.tok_emb.weight._version

    def run_layers(self, x: torch.Tensor, rope: Rope | None,
                   masks: dict[int, tuple[torch.Tensor | None, bool]], cache: DecodeKVStore | None
                   ) -> torch.Tensor:
        b, t, _ = x.shape
        if t == 1 and rope is not None and cache is not None and cache.decode_rows is not None \
                and b <= cpu.packed_rows(kernels.MAX_ROWS) and kernels.fast_path(x):
            stack = fused.plan(self)
            if stack is not None:
                return fused.decode_stack(self, stack, x.contiguous(), rope, cache)
        return super().run_layers(x, rope, masks, cache)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        if self.head_packed is not None and self.tok_emb.weight._version != self._head_version:
            self.head_packed = None  # the embeddings were changed (e.g. fine-tuned): the codes are stale
        if self.cfg.head == "lm" and self.lm_head is None:
            if use_packed(x, self.head_packed):
                return kernels.packed_matmul(x, self.head_packed)  # type: ignore[arg-type]
            if cpu.use_bf16(x, self.cfg.vocab_size, kernels.MAX_ROWS):
                return cpu.bf16_linear(self, x, self.tok_emb.weight, None)
        return super().logits(x)


def exact_rows(model: Transformer) -> int:
    """How many rows a one-token step may have while each row's logits equal those of its own one-row step,
    bit for bit (0: no such guarantee). That holds where the whole step runs the packed C kernels, whose
    per-row arithmetic never depends on the batch: the fused block stack (fused.plan) and a packed output
    matrix. Speculative decoding verifies its guesses only there (engine/speculative.py)."""
    if not isinstance(model, FastTransformer) or fused.plan(model) is None:
        return 0
    p = next(model.parameters())
    head = model.head_packed if model.lm_head is None else getattr(model.lm_head, "packed", None)
    if head is None or p.device.type != "cpu" or p.dtype != torch.float32:
        return 0
    return cpu.packed_rows(kernels.MAX_ROWS)


def accelerate(model: Transformer, kernel_dir: Path, packed: dict[str, PackedWeight] | None = None
               ) -> Transformer:
    """Install the CPU fast paths into a built model, in place, and return it.

    ``kernel_dir``: where the C kernels are compiled and cached on first use. ``packed``: a GGUF file's
    codes by module name ("layers.0.attn.qkv"; "lm_head" for a tied output matrix); each such linear
    layer becomes a `PackedLinear` over its dense weight.
    """
    # OpenMP's and MKL's worker pools otherwise spin-wait against each other between small ops (a
    # matmul, then attention), which makes CPU decoding several times slower.
    os.environ.setdefault("KMP_BLOCKTIME", "0")
    cpu.fast_bf16()  # a bad LMFORGE_CPU_BF16 / LMFORGE_EXACT is refused here, at load, not at a first request
    kernels.use_build_dir(kernel_dir)
    for name, pw in (packed or {}).items():
        if name == "lm_head" and model.lm_head is None:
            continue
        parent, _, attr = name.rpartition(".")
        old = model.get_submodule(name)
        setattr(model.get_submodule(parent), attr, PackedLinear(old.weight, old.bias, pw))
    for m in model.modules():
        if type(m) is nn.Linear:
            m.__class__ = FastLinear
        elif type(m) is RMSNorm:
            m.__class__ = FastRMSNorm
        elif type(m) is Attention:
            m.__class__ = FastAttention
        elif type(m) is MLP and m.kind == "swiglu" and m.act is F.silu:
            m.__class__ = FastMLP
    if type(model) is Transformer:
        model.__class__ = FastTransformer
        head = (packed or {}).get("lm_head")
        if head is not None and model.lm_head is None:
            model.set_head_packed(head)
    return model
