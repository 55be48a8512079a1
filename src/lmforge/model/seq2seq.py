"""Encoder-decoders (T5, BART): a bidirectional encoder and a causal decoder with cross-attention, built
from the shared blocks, with T5's bucketed relative position bias or BART's learned positions.

`encode` runs the source once; `decode` runs target tokens against its output (the memory). With a
cache (`blocks.CrossKVStore`), the decoder's self-attention keys/values go through `update` like a
decoder LM's, and the cross-attention keys/values are made once per sequence through `cross`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LMForgeError
from .blocks import Block, CrossKVStore, DecoderBlock, make_norm
from .config import ModelConfig


def relative_buckets(rel: torch.Tensor, bidirectional: bool, buckets: int, max_distance: int) -> torch.Tensor:
    """T5's bucket of each relative position (key position - query position): exact buckets for small
    distances, logarithmically wider ones up to ``max_distance``, beyond which all share the last. A
    bidirectional bias gives keys after the query their own half of the buckets; a causal one sees
    only keys at or before the query."""
    out = torch.zeros_like(rel)
    if bidirectional:
        buckets //= 2
        out += (rel > 0).long() * buckets
        dist = rel.abs()
    else:
        dist = (-rel).clamp(min=0)
    exact = buckets // 2
    # The float arithmetic of the reference implementation, so that every distance lands in its bucket.
    large = exact + (torch.log(dist.float() / exact) / math.log(max_distance / exact) * (buckets - exact)).long()
    large = large.clamp(max=buckets - 1)
    return out + torch.where(dist < exact, dist, large)


class RelativeBias(nn.Module):
    """One stack's relative position bias: a [buckets, heads] table, computed once per forward and
    added to every layer's attention scores."""

    def __init__(self, cfg: ModelConfig, bidirectional: bool) -> None:
        super().__init__()
        self.bidirectional = bidirectional
        self.buckets, self.max_distance = cfg.relative_buckets, cfg.relative_max_distance
        self.weight = nn.Parameter(torch.zeros(cfg.relative_buckets, cfg.n_heads))

    def forward(self, queries: torch.Tensor, keys: int) -> torch.Tensor:
        """queries [b, t] (positions) -> the bias [b, heads, t, keys] for keys at positions 0..keys-1."""
        rel = torch.arange(keys, device=queries.device)[None, None, :] - queries[:, :, None]
        bucket = relative_buckets(rel, self.bidirectional, self.buckets, self.max_distance)
        return F.embedding(bucket, self.weight).permute(0, 3, 1, 2)


class Stack(nn.Module):
    """The encoder's or the decoder's blocks and positions (T5's relative bias or BART's learned
    embeddings), with its final norm (pre-norm) or embedding norm (post-norm)."""

    def __init__(self, cfg: ModelConfig, decoder: bool) -> None:
        super().__init__()
        block = DecoderBlock if decoder else Block
        self.layers = nn.ModuleList(block(cfg, i) for i in range(cfg.decoder_layers if decoder else cfg.n_layers))
        self.pos_bias = RelativeBias(cfg, bidirectional=not decoder) if cfg.position == "relative" else None
        self.pos_emb = nn.Embedding(cfg.context_length, cfg.dim) if cfg.position == "learned" else None
        self.emb_norm = make_norm(cfg) if cfg.norm_position == "post" else None
        self.norm = make_norm(cfg) if cfg.norm_position == "pre" else None

    def embed(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Token embeddings x [b, t, dim] at positions [b, t] -> the first block's input."""
        if self.pos_emb is not None:
            if int(positions.max()) >= self.pos_emb.num_embeddings:
                raise LMForgeError(f"position {int(positions.max())} is beyond the model's "
                                   f"{self.pos_emb.num_embeddings} learned positions")
            x = x + self.pos_emb(positions)
        return self.emb_norm(x) if self.emb_norm is not None else x

    def attn_mask(self, positions: torch.Tensor, keys: int, blocked: torch.Tensor | None, dtype: torch.dtype
                  ) -> torch.Tensor | None:
        """The attention mask for queries at positions [b, t] over keys 0..keys-1: the relative position
        bias with ``blocked`` entries at the lowest value, or (no bias) a boolean mask, True where allowed."""
        if self.pos_bias is None:
            return None if blocked is None else ~blocked
        bias = self.pos_bias(positions, keys).to(dtype)
        return bias if blocked is None else _blocked(bias, blocked)

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x) if self.norm is not None else x


def _blocked(bias: torch.Tensor, blocked: torch.Tensor) -> torch.Tensor:
    """The bias with blocked (True) entries at the dtype's lowest value: a row that is all blocked
    still softmaxes to finite numbers, where -inf would give NaN."""
    return bias.masked_fill(blocked, torch.finfo(bias.dtype).min)


class EncoderDecoder(nn.Module):
    """T5 (v1.0: ReLU MLP, tied output; v1.1 and flan-T5: gated-GELU MLP, untied) and BART (post-norm,
    learned positions, biases, GELU) from `ModelConfig` switches: one token embedding shared by both
    stacks and (when tied) the output."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.encoder = Stack(cfg, decoder=False)
        self.decoder = Stack(cfg, decoder=True)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.logits_bias = nn.Parameter(torch.zeros(1, cfg.vocab_size)) if cfg.logits_bias else None

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.tok_emb(ids)
        x = x * math.sqrt(self.cfg.dim) if self.cfg.embed_scale else x
        return F.dropout(x, self.cfg.dropout, self.training) if self.cfg.dropout else x

    def num_params(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.tok_emb.weight.numel() if exclude_embeddings else n

    @torch.no_grad()
    def init_weights(self) -> None:
        """A fresh model's weights, as T5 initialises them: each matrix with std fan_in**-0.5 (queries
        (dim * head_dim)**-0.5, since T5's attention is unscaled), embeddings with std 1 (std dim**-0.5
        when scaled by sqrt(dim) or used as an unscaled tied output), norms 1, biases 0."""
        cfg = self.cfg
        emb_std = cfg.dim ** -0.5 if cfg.embed_scale or (cfg.tie_embeddings and not cfg.output_scale) else 1.0
        for name, p in self.named_parameters():
            if p.dim() == 1 or name.endswith("logits_bias"):
                nn.init.ones_(p) if name.endswith("norm.weight") else nn.init.zeros_(p)
            elif name == "tok_emb.weight":
                nn.init.normal_(p, 0.0, emb_std)
            elif name.endswith(("pos_bias.weight", "pos_emb.weight")):
                nn.init.normal_(p, 0.0, cfg.dim ** -0.5)
            else:
                nn.init.normal_(p, 0.0, p.shape[1] ** -0.5)
        if cfg.position == "relative":  # the query rows of every attention: T5 folds 1/sqrt(head_dim) in
            for m in self.modules():
                q = m.qkv.weight[: cfg.q_dim] if hasattr(m, "qkv") else m.q.weight if hasattr(m, "q") else None
                if q is not None:
                    nn.init.normal_(q, 0.0, (cfg.dim * cfg.head_dim) ** -0.5)

    def encode(self, src_ids: torch.Tensor, src_mask: torch.Tensor | None = None) -> torch.Tensor:
        """src_ids [b, S] -> the memory [b, S, dim]; ``src_mask`` [b, S] marks real tokens (1) of padded rows."""
        b, s = src_ids.shape
        positions = torch.arange(s, device=src_ids.device)[None]
        x = self.encoder.embed(self.embed(src_ids), positions)
        blocked = ~src_mask.bool()[:, None, None, :] if src_mask is not None else None
        mask = self.encoder.attn_mask(positions, s, blocked, x.dtype)
        for layer in self.encoder.layers:
            x = layer(x, rope=None, mask=mask, is_causal=False, cache=None)
        return self.encoder.finish(x)

    def decode(
        self,
        tgt_ids: torch.Tensor,
        memory: torch.Tensor | None,
        src_mask: torch.Tensor | None = None,
        *,
        cache: CrossKVStore | None = None,
        start_pos: list[int] | None = None,
        slots: list[int] | None = None,
        last_index: torch.Tensor | None = None,
        return_hidden: bool = False,
    ) -> torch.Tensor:
        """Decoder logits [b, T, V] for target tokens tgt_ids [b, T] (starting with the decoder start token).

        ``memory`` [b, S, dim] is `encode`'s output and ``src_mask`` [b, S] its real tokens; with a cache
        that already holds a row's cross-attention keys/values, the memory is not read (and may be None),
        but ``src_mask`` must still match the keys the cache returns. With a cache, row r continues slot
        ``slots[r]`` (default r) at position ``start_pos[r]``; keys beyond a query's own position are
        masked. ``last_index`` [b] selects one position per row before the head; ``return_hidden``
        returns the final hidden states instead of logits.
        """
        b, t = tgt_ids.shape
        dev = tgt_ids.device
        steps = torch.arange(t, device=dev)
        if cache is not None:
            start = list(start_pos) if start_pos is not None else [0] * b
            kv_len = cache.bind(slots, start, t)
            positions = torch.tensor(start, device=dev)[:, None] + steps[None, :]
        else:
            kv_len, positions = t, steps[None, :]
        x = self.decoder.embed(self.embed(tgt_ids), positions.expand(b, t))
        keys = torch.arange(kv_len, device=dev)
        mask = self.decoder.attn_mask(positions, kv_len, keys[None, None, None, :] > positions[:, None, :, None],
                                      x.dtype)
        cross_mask = src_mask.bool()[:, None, None, :] if src_mask is not None else None
        for layer in self.decoder.layers:
            x = layer(x, memory, mask, cross_mask, cache)
        x = self.decoder.finish(x)
        if last_index is not None:
            x = x[torch.arange(b, device=dev), last_index]
        if return_hidden:
            return x
        return self.logits(x)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The output head on the decoder's final hidden states."""
        if self.cfg.output_scale:  # T5 scales before a tied head (its weights' init assumes it)
            x = x * self.cfg.dim ** -0.5
        out = self.lm_head(x) if self.lm_head is not None else F.linear(x, self.tok_emb.weight)
        return out + self.logits_bias if self.logits_bias is not None else out

    def forward(self, src_ids: torch.Tensor, tgt_ids: torch.Tensor | None = None,
                src_mask: torch.Tensor | None = None, **lm_args: Any) -> torch.Tensor:
        """Teacher forcing: logits [b, T, V] of the target tokens given the source."""
        if tgt_ids is None or lm_args:  # called as a decoder LM over one sequence (e.g. with a KV cache)
            raise LMForgeError(f"a {self.cfg.family} model is an encoder-decoder: it runs as encode(source) and "
                               "decode(target, memory), not as a decoder language model over one token sequence")
        return self.decode(tgt_ids, self.encode(src_ids, src_mask), src_mask)
