"""The transformer: embeddings, a stack of shared blocks, a final norm and an output head."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import LMForgeError
from .blocks import ACTIVATIONS, Block, KVStore, Rope, Rotary, make_norm
from .config import ModelConfig


class Transformer(nn.Module):
    """Decoder LMs (Llama, Qwen2, GPT-2) and encoders (BERT, RoBERTa: ``causal`` off, post-norm, token
    types, an optional pooler, an MLM head or none) from the same switches."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.decoder_layers:  # never a decoder LM built from an encoder-decoder's switches
            raise LMForgeError(f"a {cfg.family} model is an encoder-decoder (model.EncoderDecoder), "
                               "not a Transformer")
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.pos_emb = nn.Embedding(cfg.context_length, cfg.dim) if cfg.position == "learned" else None
        self.type_emb = nn.Embedding(cfg.type_vocab_size, cfg.dim) if cfg.type_vocab_size else None
        # Post-norm models (BERT) normalise the embeddings instead of the final hidden state.
        self.emb_norm = make_norm(cfg) if cfg.norm_position == "post" else None
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = make_norm(cfg) if cfg.norm_position == "pre" else None
        self.lm_head = None if cfg.tie_embeddings or cfg.head != "lm" else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.head == "mlm":  # BERT's masked-LM head; its output matrix is the (tied) token embedding
            self.mlm_dense = nn.Linear(cfg.dim, cfg.dim)
            self.mlm_act = ACTIVATIONS[cfg.activation]
            self.mlm_norm = make_norm(cfg)
            self.mlm_bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        self.pooler = nn.Linear(cfg.dim, cfg.dim) if cfg.pooler else None
        self.rotary = Rotary(cfg) if cfg.position == "rope" else None
        self.windows = sorted({blk.attn.window for blk in self.layers} - {0})  # sliding windows in use
        # Recompute each block's activations in backward instead of storing them (training only).
        self.grad_checkpointing = False

    def pooled(self, hidden: torch.Tensor) -> torch.Tensor:
        """BERT's pooler output: tanh(dense(first token's hidden state)), [b, T, dim] -> [b, dim]."""
        if self.pooler is None:
            raise LMForgeError("this model has no pooler layer")
        return torch.tanh(self.pooler(hidden[:, 0]))

    # -- weights -----------------------------------------------------------------------------
    def init_weights(self, std: float = 0.02) -> None:
        """GPT-2 style init; residual output projections are scaled down by depth."""
        for name, p in self.named_parameters():
            if p.dim() == 1:
                nn.init.ones_(p) if name.endswith("norm.weight") else nn.init.zeros_(p)
            elif name.endswith(("attn.o.weight", "mlp.down.weight")):
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.cfg.n_layers))
            else:
                nn.init.normal_(p, 0.0, std)

    def num_params(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.tok_emb.weight.numel()
            if self.pos_emb is not None:
                n -= self.pos_emb.weight.numel()
        return n

    # -- forward -----------------------------------------------------------------------------
    def forward(
        self,
        tokens: torch.Tensor,
        *,
        cache: KVStore | None = None,
        start_pos: list[int] | None = None,
        slots: list[int] | None = None,
        attn_mask: torch.Tensor | None = None,
        token_types: torch.Tensor | None = None,
        last_index: torch.Tensor | None = None,
        return_hidden: bool = False,
    ) -> torch.Tensor:
        """Run the stack.

        tokens [b, T]. Without a cache, every row starts at position 0; ``attn_mask`` [b, T] marks real
        tokens of right-padded rows. With a cache, row r continues slot ``slots[r]`` (default r) at
        position ``start_pos[r]``; keys beyond a query's own position are masked, so right padding is
        harmless. ``last_index`` [b] selects one position per row before the head (generation).
        Returns logits [b, T, V] (or [b, V] with ``last_index``), or hidden states if ``return_hidden``.
        """
        b, t = tokens.shape
        dev = tokens.device
        steps = torch.arange(t, device=dev)
        mask, is_causal = None, False
        if cache is not None:
            start = list(start_pos) if start_pos is not None else [0] * b
            kv_len = cache.bind(slots, start, t)
            positions = torch.tensor(start, device=dev)[:, None] + steps[None, :]
            if b == 1 and start[0] == 0 and t == kv_len:
                is_causal = self.cfg.causal
            elif not (t == 1 and all(s + 1 == kv_len for s in start)):
                keys = torch.arange(kv_len, device=dev)
                mask = keys[None, None, None, :] <= positions[:, None, :, None]
        else:
            positions = steps[None, :].expand(b, t)
            if attn_mask is not None:
                mask = attn_mask.bool()[:, None, None, :]
                if self.cfg.causal:
                    mask = mask & torch.ones(t, t, dtype=torch.bool, device=dev).tril()[None, None]
            else:
                is_causal = self.cfg.causal
        # Sliding-window layers see only the last `window` positions (their own included); one mask per
        # distinct window. Until a position reaches the window, it is the plain causal mask.
        masks = {0: (mask, is_causal)}
        max_pos = max(start) + t - 1 if cache is not None else t - 1
        for w in self.windows:
            if max_pos < w:
                masks[w] = masks[0]
                continue
            if cache is not None:
                keys = torch.arange(kv_len, device=dev)[None, None, None, :]
                q = positions[:, None, :, None]
                masks[w] = ((keys <= q) & (keys > q - w), False)
            else:
                keys, q = steps[None, :], steps[:, None]
                wmask = ((keys <= q) & (keys > q - w))[None, None]
                if attn_mask is not None:  # a padding query keeps itself, so no row is all -inf (NaN)
                    wmask = (wmask & attn_mask.bool()[:, None, None, :]) | torch.eye(t, dtype=torch.bool, device=dev)
                masks[w] = (wmask, False)

        x = self.tok_emb(tokens)
        if self.pos_emb is not None:
            x = x + self.pos_emb(positions)
        if self.type_emb is not None:
            x = x + self.type_emb(token_types if token_types is not None else torch.zeros_like(tokens))
        if self.emb_norm is not None:
            x = self.emb_norm(x)
        rope = self.rotary(positions, x.dtype, max_pos) if self.rotary is not None else None
        x = self.run_layers(x, rope, masks, cache)
        if self.norm is not None:
            x = self.norm(x)
        if last_index is not None:
            x = x[torch.arange(b, device=dev), last_index]
        if return_hidden or self.cfg.head == "none":
            return x
        return self.logits(x)

    def run_layers(self, x: torch.Tensor, rope: Rope | None,
                   masks: dict[int, tuple[torch.Tensor | None, bool]], cache: KVStore | None) -> torch.Tensor:
        """The block stack on hidden states x [b, T, dim]; ``masks`` maps a sliding window (0: none) to
        its (mask, is_causal)."""
        for layer in self.layers:
            mask, is_causal = masks[layer.attn.window]
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, rope=rope, mask=mask, is_causal=is_causal, cache=cache,
                               use_reentrant=False)
            else:
                x = layer(x, rope=rope, mask=mask, is_causal=is_causal, cache=cache)
        return x

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The head on final hidden states: logits (LM or masked-LM)."""
        if self.cfg.head == "mlm":
            return F.linear(self.mlm_norm(self.mlm_act(self.mlm_dense(x))), self.tok_emb.weight, self.mlm_bias)
        if self.lm_head is not None:
            return self.lm_head(x)
        return F.linear(x, self.tok_emb.weight)
