"""Prompt scoring: the logprob of every prompt token given the tokens before it, a chunk at a time."""

from __future__ import annotations

from collections.abc import Generator

import torch

from ..model import Transformer
from .kv_cache import KVCache
from .sampling import TokenLogprob

# Prompt positions scored per chunk: what a server does between two engine steps.
SCORE_CHUNK = 256


def prompt_logprobs(model: Transformer, ids: list[int], top: int = 0, chunk: int = SCORE_CHUNK
                    ) -> Generator[None, None, list[TokenLogprob | None]]:
    """Logprob of every prompt token given the ones before it (None for the first), with the `top` most likely
    alternatives. A generator: it scores `chunk` positions at a time through its own KV cache and yields
    between chunks, so a scheduler can interleave other work; its return value is the list."""
    out: list[TokenLogprob | None] = [None]
    p = next(model.parameters())
    cache = KVCache(model.cfg, 1, len(ids), p.device, p.dtype) if model.cfg.causal else None
    tokens = torch.tensor([ids], device=p.device)
    step = chunk if cache is not None else len(ids)  # an encoder sees the whole text at once
    for start in range(0, len(ids) - 1, step):
        with torch.inference_mode():
            if cache is not None:
                hidden = model(tokens[:, start:start + step], cache=cache, start_pos=[start], slots=[0],
                               return_hidden=True)[0]
            else:
                hidden = model(tokens, return_hidden=True)[0]
            lp = torch.log_softmax(model.logits(hidden).float(), -1)
        for j in range(lp.shape[0]):
            pos = start + j + 1
            if pos >= len(ids):
                break
            alts: list[tuple[int, float]] = []
            if top:
                vals, idx = torch.topk(lp[j], top)
                alts = list(zip(idx.tolist(), vals.tolist()))
            out.append(TokenLogprob(ids[pos], float(lp[j, ids[pos]]), alts))
        yield
    return out
