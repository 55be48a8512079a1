"""Causal self-attention for bf16 training on CPU with short sequences, installed into a built model.

There PyTorch's CPU attention kernels cost several times the work they do: the flash kernel's bf16
backward, and the math kernel's checks for fully masked rows. Measured on a Zen 5 core pair (AVX-512
BF16), forward and backward of 12 sequences x 4 heads of 32 at 64 positions: flash bf16 3.5 ms, math
bf16 1.6 ms, these few ops (a batched matmul, the causal mask, a softmax) 0.8 ms; flash in fp32 1.1 ms.
From about 192 positions the flash kernel is the faster one, so longer blocks keep it.
"""

from __future__ import annotations

import torch
from torch import nn

from ..model.blocks import Attention, KVStore, Rope

SHORT_ATTENTION_MAX_POSITIONS = 128


class ShortAttention(Attention):
    """The model's attention, computed as matmul, mask and softmax for causal training and evaluation
    forwards; a cache or a padding mask takes the model's own path."""

    def attend(self, proj: torch.Tensor, rope: Rope | None, mask: torch.Tensor | None, is_causal: bool,
               cache: KVStore | None) -> torch.Tensor:
        if cache is not None or mask is not None or not is_causal:
            return super().attend(proj, rope, mask, is_causal, cache)
        b, t, _ = proj.shape
        q, k, v = self.heads(proj, rope)
        scores = (q @ k.transpose(-1, -2)) * (self.head_dim**-0.5 if self.scale is None else self.scale)
        future = torch.ones(t, t, dtype=torch.bool, device=proj.device).triu(1)
        y = scores.masked_fill(future, float("-inf")).softmax(-1) @ v
        return self.o(y.transpose(1, 2).reshape(b, t, self.q_dim))


def use_short_attention(model: nn.Module, device: torch.device, bf16: bool, block_size: int) -> int:
    """Install `ShortAttention` into the plain multi-head, full-context attention modules of a model that
    trains in bf16 on CPU with blocks of at most SHORT_ATTENTION_MAX_POSITIONS; returns how many."""
    if not (bf16 and device.type == "cpu" and block_size <= SHORT_ATTENTION_MAX_POSITIONS):
        return 0
    n = 0
    for m in model.modules():
        if type(m) is Attention and m.n_kv_heads == m.n_heads and not m.window:
            m.__class__ = ShortAttention
            n += 1
    return n
