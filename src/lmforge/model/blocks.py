"""Blocks shared by every family: norms, rotary positions, self- and cross-attention, MLP, residual blocks.

Weights are fused where the math allows (q/k/v in one matrix, gate/up in one matrix) so a decode
step runs fewer, larger matmuls; the loaders fuse at load time and exporters split again.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LMForgeError
from .config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 whatever the activation dtype, as the reference implementations do.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.dim, cfg.norm_eps)
    return nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)


ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies for rotary embeddings, with optional linear or Llama-3 scaling."""
    hd = cfg.head_dim
    # Explicit CPU device: models are built under a meta-device context.
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64, device="cpu").float() / hd))
    sc = cfg.rope_scaling or {}
    kind = sc.get("rope_type", sc.get("type"))
    if kind in (None, "default"):
        return inv
    if kind == "linear":
        return inv / float(sc["factor"])
    if kind == "llama3":
        factor = float(sc["factor"])
        low, high = float(sc.get("low_freq_factor", 1.0)), float(sc.get("high_freq_factor", 4.0))
        old_ctx = float(sc["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled)
    raise LMForgeError(f"unsupported rope scaling type {kind!r} (supported: linear, llama3)")


class Rotary:
    """cos/sin tables for rotary embeddings (half-split layout), grown on demand, looked up by position."""

    def __init__(self, cfg: ModelConfig) -> None:
        self.inv_freq = rope_inv_freq(cfg)
        self.cos: torch.Tensor | None = None
        self.sin: torch.Tensor | None = None

    def _build(self, n: int, device: torch.device) -> None:
        pos = torch.arange(n, device=device, dtype=torch.float32)
        freqs = pos[:, None] * self.inv_freq.to(device)[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos, self.sin = emb.cos(), emb.sin()

    def __call__(self, positions: torch.Tensor, dtype: torch.dtype, max_pos: int | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [b, T] -> cos, sin of shape [b, 1, T, head_dim]. ``max_pos`` spares a device sync."""
        need = (max_pos if max_pos is not None else int(positions.max()) if positions.numel() else 0) + 1
        if self.cos is None or self.cos.shape[0] < need or self.cos.device != positions.device:
            self._build(max(need, 1024 if self.cos is None else 2 * self.cos.shape[0]), positions.device)
        cos, sin = self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)
        return (cos, sin) if dtype == torch.float32 else (cos.to(dtype), sin.to(dtype))


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


Rope = tuple[torch.Tensor, torch.Tensor]  # (cos, sin) for the positions of a forward


class KVStore(Protocol):
    """What the model needs from a KV cache: where a forward's tokens go (`bind`, called once per forward),
    then, per layer, store this step's keys/values and return all to attend to (`update`)."""

    def bind(self, slots: list[int] | None, start: list[int], t: int) -> int: ...

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


class CrossKVStore(KVStore, Protocol):
    """A decoder's KV store that also keeps the encoder-side keys/values of cross-attention, made once
    per sequence: `cross` returns those of the bound rows for one layer, calling ``make`` (which
    projects the memory given to that forward) for rows that have none yet."""

    def cross(self, layer: int, make: Callable[[], tuple[torch.Tensor, torch.Tensor]]
              ) -> tuple[torch.Tensor, torch.Tensor]: ...


class Attention(nn.Module):
    scale: float | None = None  # None: SDPA's 1/sqrt(head_dim)

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.window = cfg.window(layer)  # 0: the whole context
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_dim, self.kv_dim = cfg.q_dim, cfg.kv_dim
        self.qkv = nn.Linear(cfg.dim, cfg.q_dim + 2 * cfg.kv_dim, bias=cfg.qkv_bias)
        self.o = nn.Linear(cfg.q_dim, cfg.dim, bias=cfg.out_bias)

    def forward(self, x: torch.Tensor, rope: Rope | None, mask: torch.Tensor | None, is_causal: bool,
                cache: KVStore | None) -> torch.Tensor:
        return self.attend(self.qkv(x), rope, mask, is_causal, cache)

    def attend(self, proj: torch.Tensor, rope: Rope | None, mask: torch.Tensor | None, is_causal: bool,
               cache: KVStore | None) -> torch.Tensor:
        """Attention and output projection from the q/k/v projection proj [b, t, (nh + 2 nkv) * hd]; q and
        k are rotated here unless ``rope`` is None."""
        b, t, _ = proj.shape
        q, k, v = self.heads(proj, rope)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, scale=self.scale,
            enable_gqa=self.n_heads != self.n_kv_heads,
        )
        return self.o(y.transpose(1, 2).reshape(b, t, self.q_dim))

    def heads(self, proj: torch.Tensor, rope: Rope | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k and v as [b, heads, t, hd] views of proj, q and k rotated unless ``rope`` is None."""
        b, t, _ = proj.shape
        # Slicing rather than split(): on the decode path every dispatched op costs microseconds.
        nq, nqk = self.n_heads, self.n_heads + self.n_kv_heads
        heads = proj.view(b, t, -1, self.head_dim).transpose(1, 2)  # [b, q+k+v heads, t, hd]
        qk, v = heads[:, :nqk], heads[:, nqk:]
        if rope is not None:  # q and k rotate together: half the ops of rotating each
            qk = apply_rotary(qk, *rope)
        return qk[:, :nq], qk[:, nq:], v


class UnscaledAttention(Attention):
    """T5's self-attention: scores are not scaled (its init folds 1/sqrt(head_dim) into the weights) and
    the relative position bias arrives in the additive ``mask``. A type of its own, so CPU fast paths
    written for scaled, bias-free attention pass it by."""

    scale = 1.0


class CrossAttention(nn.Module):
    """Decoder queries attending to the encoder's output (the memory): q from the decoder, k/v from the
    memory; unscaled with relative positions (T5), as its self-attention."""

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.scale = UnscaledAttention.scale if cfg.position == "relative" else None
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q = nn.Linear(cfg.dim, cfg.q_dim, bias=cfg.qkv_bias)
        self.kv = nn.Linear(cfg.dim, 2 * cfg.kv_dim, bias=cfg.qkv_bias)
        self.o = nn.Linear(cfg.q_dim, cfg.dim, bias=cfg.out_bias)

    def keys_values(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The memory [b, S, dim] projected to keys and values, each [b, kv heads, S, head_dim]."""
        b, s, _ = memory.shape
        kv = self.kv(memory).view(b, s, -1, self.head_dim).transpose(1, 2)
        return kv[:, : self.n_kv_heads], kv[:, self.n_kv_heads:]

    def forward(self, x: torch.Tensor, memory: torch.Tensor | None, mask: torch.Tensor | None,
                cache: CrossKVStore | None) -> torch.Tensor:
        """x [b, t, dim]; ``mask`` [b, 1, 1, S] (True: a real source token) or None; with a cache, the
        memory is projected only for rows whose keys/values it does not hold yet."""
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        if cache is not None:
            k, v = cache.cross(self.layer, lambda: self.keys_values(_need(memory)))
        else:
            k, v = self.keys_values(_need(memory))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale,
                                           enable_gqa=self.n_heads != self.n_kv_heads)
        return self.o(y.transpose(1, 2).reshape(b, t, -1))


def _need(memory: torch.Tensor | None) -> torch.Tensor:
    if memory is None:
        raise LMForgeError("cross-attention needs the encoder's output: no memory given and none cached")
    return memory


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.kind = cfg.mlp
        self.act = ACTIVATIONS[cfg.activation]
        self.ffn_dim = cfg.ffn_dim
        if cfg.mlp == "swiglu":
            self.gate_up = nn.Linear(cfg.dim, 2 * cfg.ffn_dim, bias=cfg.mlp_bias)
        else:
            self.fc = nn.Linear(cfg.dim, cfg.ffn_dim, bias=cfg.mlp_bias)
        self.down = nn.Linear(cfg.ffn_dim, cfg.dim, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "swiglu":
            h = self.gate_up(x)
            return self.down(self.act(h[..., : self.ffn_dim]) * h[..., self.ffn_dim:])
        return self.down(self.act(self.fc(x)))


class Block(nn.Module):
    """One residual block. Pre-norm (GPT, Llama, T5) or post-norm (BERT) by config switch."""

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.pre_norm = cfg.norm_position == "pre"
        self.attn_norm = make_norm(cfg)
        self.attn = (UnscaledAttention if cfg.position == "relative" else Attention)(cfg, layer)
        self.mlp_norm = make_norm(cfg)
        self.mlp = MLP(cfg)
        self.dropout = cfg.dropout

    def drop(self, x: torch.Tensor) -> torch.Tensor:
        """Residual dropout (training only; a no-op unless the config sets dropout)."""
        return F.dropout(x, self.dropout, self.training) if self.dropout else x

    def forward(self, x: torch.Tensor, **attn_kwargs: Any) -> torch.Tensor:
        if self.pre_norm:
            x = x + self.drop(self.attn(self.attn_norm(x), **attn_kwargs))
            return x + self.drop(self.mlp(self.mlp_norm(x)))
        x = self.attn_norm(x + self.drop(self.attn(x, **attn_kwargs)))
        return self.mlp_norm(x + self.drop(self.mlp(x)))


class DecoderBlock(Block):
    """An encoder-decoder's decoder block: causal self-attention, cross-attention to the encoder's output,
    then the MLP; pre-norm (T5) or post-norm (BART)."""

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__(cfg, layer)
        self.cross_norm = make_norm(cfg)
        self.cross = CrossAttention(cfg, layer)

    def forward(self, x: torch.Tensor, memory: torch.Tensor | None, mask: torch.Tensor,  # type: ignore[override]
                cross_mask: torch.Tensor | None, cache: CrossKVStore | None) -> torch.Tensor:
        if self.pre_norm:
            x = x + self.drop(self.attn(self.attn_norm(x), rope=None, mask=mask, is_causal=False, cache=cache))
            x = x + self.drop(self.cross(self.cross_norm(x), memory, cross_mask, cache))
            return x + self.drop(self.mlp(self.mlp_norm(x)))
        x = self.attn_norm(x + self.drop(self.attn(x, rope=None, mask=mask, is_causal=False, cache=cache)))
        x = self.cross_norm(x + self.drop(self.cross(x, memory, cross_mask, cache)))
        return self.mlp_norm(x + self.drop(self.mlp(x)))
