"""Log-likelihood scoring: continuations given contexts, batched, with shared prefixes computed once.

A multiple-choice item is a group of (context ids, continuation ids) requests. The longest prefix the
group's requests share is run once into a KV cache slot, its keys and values are copied to the other
requests' slots, and every request then continues from there in one batched forward over right-padded
rows. Log-softmax is taken only at the positions that predict continuation tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..engine import KVCache
from ..errors import LMForgeError
from ..model import Transformer


@dataclass
class Score:
    """Sum of the continuation's token log-probs, and whether greedy decoding would have produced it."""

    logprob: float
    greedy: bool
    tokens: int


Request = tuple[list[int], list[int]]  # (context ids, continuation ids)


def head_logits(model: Transformer, hidden: torch.Tensor) -> torch.Tensor:
    """The LM head on selected final hidden states [n, dim] -> logits [n, V] (fp32)."""
    w = model.lm_head.weight if model.lm_head is not None else model.tok_emb.weight
    return F.linear(hidden, w).float()


def _token_logprobs(model: Transformer, hidden: torch.Tensor, targets: torch.Tensor, chunk: int = 256
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of ``targets`` [n] under the head at ``hidden`` [n, dim], and whether each is the argmax.

    Chunked so the [n, vocab] logits of a big batch never exist at once."""
    lps, hits = [], []
    for i in range(0, hidden.shape[0], chunk):
        logits = head_logits(model, hidden[i:i + chunk])
        t = targets[i:i + chunk]
        lps.append(logits.log_softmax(-1).gather(1, t[:, None])[:, 0])
        hits.append(logits.argmax(-1) == t)
    return torch.cat(lps), torch.cat(hits)


def _fit(ctx: list[int], cont: list[int], max_len: int) -> tuple[list[int], list[int]]:
    """Left-truncate the context so context + continuation fits the window (as lm-eval-harness does)."""
    if not cont:
        raise LMForgeError("a continuation encodes to no tokens")
    if len(cont) > max_len:
        raise LMForgeError(f"a continuation of {len(cont)} tokens does not fit the {max_len}-token context window")
    room = max_len - len(cont)
    return ctx[max(0, len(ctx) - room):], cont


def _common_prefix(seqs: Sequence[list[int]]) -> int:
    n = min(len(s) for s in seqs)
    for i in range(n):
        t = seqs[0][i]
        if any(s[i] != t for s in seqs[1:]):
            return i
    return n


def _forward_rows(model: Transformer, cache: KVCache, rows: list[tuple[int, int, list[int]]], token_budget: int,
                  pad_id: int, dev: torch.device) -> dict[int, torch.Tensor]:
    """Run (slot, start position, tokens) rows through the model in length-sorted, right-padded chunks of
    about ``token_budget`` tokens; returns each slot's final hidden states [len, dim]."""
    out: dict[int, torch.Tensor] = {}
    rows = sorted(rows, key=lambda r: len(r[2]))
    i = 0
    while i < len(rows):
        j = i + 1  # the chunk grows while its padded size (count x longest) fits the budget
        while j < len(rows) and (j + 1 - i) * len(rows[j][2]) <= token_budget:
            j += 1
        chunk = rows[i:j]
        t = len(chunk[-1][2])
        toks = torch.full((len(chunk), t), pad_id, dtype=torch.long)
        for r, (_, _, ids) in enumerate(chunk):
            toks[r, :len(ids)] = torch.tensor(ids)
        hidden = model(toks.to(dev), cache=cache, start_pos=[s for _, s, _ in chunk], slots=[sl for sl, _, _ in chunk],
                       return_hidden=True)
        for r, (sl, _, ids) in enumerate(chunk):
            out[sl] = hidden[r, :len(ids)]
        i = j
    return out


@torch.inference_mode()
def score_groups(model: Transformer, groups: Sequence[Sequence[Request]], batch_size: int = 16,
                 max_len: int | None = None, pad_id: int = 0, progress: bool = False, desc: str = "scoring",
                 token_budget: int = 768, done: dict[int, list[Score]] | None = None,
                 on_batch: Callable[[dict[int, list[Score]]], None] | None = None) -> list[list[Score]]:
    """Score every request of every group; a group (one item's choices) shares its common context prefix.

    ``batch_size`` is the number of groups sharing a KV cache; their rows run length-sorted in forwards
    of about ``token_budget`` padded tokens. Requests are scored exactly as a full
    forward over context + continuation would score them (up to float rounding).
    ``done`` holds scores of groups already scored (a resumed run): they are not run again.
    ``on_batch`` receives each batch's new scores, by group index, as soon as they exist.
    """
    from tqdm import tqdm

    if not model.cfg.causal:
        raise LMForgeError("log-likelihood scoring needs a causal (decoder) model")
    max_len = min(max_len or model.cfg.context_length, model.cfg.context_length)
    dev = next(model.parameters()).device
    # Each request keeps at least its last context token out of the shared prefix, so the hidden state
    # that predicts its first continuation token comes from its own row.
    prepared = []
    for g in groups:
        reqs = [_fit(c, x, max_len) for c, x in g]
        if any(not c for c, _ in reqs):
            raise LMForgeError("a context encodes to no tokens (give the tokenizer a BOS token or a non-empty prompt)")
        p = min(_common_prefix([c for c, _ in reqs]), min(len(c) for c, _ in reqs) - 1)
        rows = [c[p:] + x[:-1] for c, x in reqs]
        prepared.append((reqs, p, rows))
    done = done or {}
    # Similar lengths together: less padding.
    order = sorted((i for i in range(len(prepared)) if i not in done),
                   key=lambda i: (max(len(r) for r in prepared[i][2]), prepared[i][1]))
    out: list[list[Score]] = [list(done[i]) if i in done else [] for i in range(len(groups))]
    cache: KVCache | None = None
    bar = tqdm(total=len(groups), initial=len(groups) - len(order), desc=desc, disable=not progress, unit="item",
               mininterval=2.0)
    for b0 in range(0, len(order), batch_size):
        idx = order[b0:b0 + batch_size]
        batch = [prepared[i] for i in idx]
        n_slots = sum(len(reqs) for reqs, _, _ in batch)
        # Padded rows all span the longest row's length past the largest prefix.
        need = max(p for _, p, _ in batch) + max(len(r) for _, _, rows in batch for r in rows)
        if cache is None or cache.rows < n_slots or cache.max_len < need:
            cache = KVCache(model.cfg, max(n_slots, cache.rows if cache else 0),
                            max(need, cache.max_len if cache else 0), dev, next(model.parameters()).dtype)
        # 1. The shared prefixes, one row per group, into the group's first slot.
        first, slot = [], 0
        for reqs, _, _ in batch:
            first.append(slot)
            slot += len(reqs)
        pre = [(first[gi], 0, batch[gi][0][0][0][:p]) for gi, (_, p, _) in enumerate(batch) if p > 0]
        _forward_rows(model, cache, pre, token_budget, pad_id, dev)
        src, dst = [], []
        for gi, (reqs, p, _) in enumerate(batch):
            if p > 0:
                src += [first[gi]] * (len(reqs) - 1)
                dst += range(first[gi] + 1, first[gi] + len(reqs))
        if dst:  # copy each prefix's keys/values to its group's other slots
            t = max(p for _, p, _ in batch)
            cache.k[:, dst, :, :t] = cache.k[:, src, :, :t]
            cache.v[:, dst, :, :t] = cache.v[:, src, :, :t]
        # 2. Every request's own tokens, continuing its slot after the prefix.
        rows = [(p, reqs[j], r) for reqs, p, rs in batch for j, r in enumerate(rs)]
        hiddens = _forward_rows(model, cache, [(i, p, r) for i, (p, _, r) in enumerate(rows)], token_budget,
                                pad_id, dev)
        # 3. Log-probs only where a continuation token is predicted.
        ri, tgt = [], []
        for i, (p, (c, x), _) in enumerate(rows):
            start = len(c) - p - 1  # row position of the last context token
            ri.append(hiddens[i][start:start + len(x)])
            tgt += x
        lp, hit = _token_logprobs(model, torch.cat(ri), torch.tensor(tgt, device=dev))
        lp, hit = lp.tolist(), hit.tolist()
        k = 0
        for gi, (reqs, _, _) in zip(idx, batch):
            for _, x in reqs:
                n = len(x)
                out[gi].append(Score(math.fsum(lp[k:k + n]), all(hit[k:k + n]), n))
                k += n
        if on_batch is not None:
            on_batch({gi: out[gi] for gi in idx})
        bar.update(len(idx))
    bar.close()
    return out


# -- perplexity ------------------------------------------------------------------------------------------
@dataclass
class Perplexity:
    nll: float  # total negative log-likelihood in nats
    tokens: int  # predicted tokens
    bytes: int  # UTF-8 bytes of the text
    words: int

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / self.tokens)

    @property
    def bits_per_byte(self) -> float:
        return self.nll / math.log(2) / self.bytes

    @property
    def word_perplexity(self) -> float:
        return math.exp(self.nll / max(self.words, 1))


@torch.inference_mode()
def perplexity(model: Transformer, ids: list[int], window: int | None = None, stride: int | None = None,
               prefix_id: int | None = None, progress: bool = False) -> tuple[float, int]:
    """Total NLL (nats) and number of predicted tokens of ``ids`` with a sliding window.

    Each window of ``window`` tokens predicts only the tokens that earlier windows did not, with up to
    ``window - stride`` tokens of context before them. With ``prefix_id`` (the BOS/EOS token) every token
    is predicted; without it the first token is not.
    """
    from tqdm import tqdm

    window = min(window or model.cfg.context_length, model.cfg.context_length)
    stride = stride or window // 2
    if window < 2 or not 0 < stride < window:
        raise LMForgeError(f"need window >= 2 and 0 < stride < window (got window {window}, stride {stride})")
    seq = ([prefix_id] if prefix_id is not None else []) + list(ids)
    if len(seq) < 2:
        raise LMForgeError("the text is too short to measure perplexity (fewer than 2 tokens)")
    dev = next(model.parameters()).device
    total, count, done = 0.0, 0, 1  # seq[:done] are already predicted (the first token never is)
    n_windows = 1 + max(0, -(-(len(seq) - window) // stride))
    bar = tqdm(total=n_windows, desc="perplexity", disable=not progress, unit="window")
    while done < len(seq):
        end = min(len(seq), window if done == 1 else done + stride)
        begin = max(0, end - window)  # up to window - stride tokens of already-scored context
        hidden = model(torch.tensor([seq[begin:end]], device=dev), return_hidden=True)[0]
        targets = torch.tensor(seq[done:end], device=dev)
        lp, _ = _token_logprobs(model, hidden[done - 1 - begin:end - 1 - begin], targets)
        total -= float(lp.double().sum())
        count += len(targets)
        done = end
        bar.update(1)
    bar.close()
    return total, count
