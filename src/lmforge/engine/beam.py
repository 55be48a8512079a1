"""Beam search for encoder-decoders, as transformers' ``generate(num_beams=n, do_sample=False)`` runs it.

Each source keeps ``num_beams`` running hypotheses, one cache slot each. A step scores every continuation of
every beam by its summed log-probability and keeps the best ``max(2, 1 + number of end tokens) * num_beams``:
those that end (an end token, or the length limit) among the first ``num_beams`` become finished hypotheses,
scored by sum / length**length_penalty; the best ``num_beams`` that go on are the next running beams, whose
slots' decoder keys and values are copied from their parents' slots. The encoder runs once per source, and
its cross-attention keys and values, made once, are shared by the source's beams. A source is done when
``early_stopping`` says its finished hypotheses can no longer be beaten (see `SamplingParams`); its answer
is its best finished hypothesis.
"""

from __future__ import annotations

import torch

from ..model.seq2seq import EncoderDecoder
from .kv_cache import CrossKVCache
from .sampling import SamplingParams

_NEG = -1.0e9  # transformers' "impossible" score: finite, so that sums and top-k stay well defined


def _gather(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """t [B, N, ...] -> t[b, idx[b, j], ...] for idx [B, K]."""
    return t[torch.arange(t.shape[0], device=t.device)[:, None], idx]


@torch.inference_mode()
def beam_search(model: EncoderDecoder, sources: list[list[int]], params: SamplingParams, start_id: int,
                end_ids: list[int], pad_id: int, max_tokens: int) -> list[list[int]]:
    """The best hypothesis of each source: its generated tokens, ending with an end token if it ended with one.
    ``max_tokens`` (at most the decoder's context) bounds the generated tokens."""
    cfg = model.cfg
    dev = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    b, k = len(sources), params.num_beams
    rows = b * k
    s = max(len(x) for x in sources)
    src = torch.full((b, s), pad_id, dtype=torch.long)
    mask = torch.zeros(b, s, dtype=torch.long)
    for i, x in enumerate(sources):
        src[i, : len(x)], mask[i, : len(x)] = torch.tensor(x), 1
    src, mask = src.to(dev), mask.to(dev)
    memory = model.encode(src, mask).repeat_interleave(k, 0)
    mask = mask.repeat_interleave(k, 0)
    max_length = 1 + max_tokens  # the start token and the generated ones, as transformers counts
    cache = CrossKVCache(cfg, rows, max_tokens, dev, dtype)

    keep = max(2, 1 + len(end_ids)) * k
    top_k_mask = torch.arange(keep, device=dev) < k
    ends = torch.tensor(end_ids, dtype=torch.long, device=dev)
    running = torch.full((b, k, max_length), pad_id, dtype=torch.long, device=dev)
    running[:, :, 0] = start_id
    finished = running.clone()
    running_scores = torch.zeros(b, k, device=dev)
    running_scores[:, 1:] = _NEG  # the beams start equal: only the first one's continuations count at first
    scores = torch.full((b, k), _NEG, device=dev)
    lengths = torch.zeros(b, k, dtype=torch.long, device=dev)  # generated tokens of each finished hypothesis
    is_finished = torch.zeros(b, k, dtype=torch.bool, device=dev)
    open_ = torch.ones(b, 1, dtype=torch.bool, device=dev)  # the early-stop heuristic is not yet satisfied
    offset = (torch.arange(b, device=dev) * k)[:, None]
    cur = 1
    while True:
        cache.bind_source(s, fresh=cur == 1)
        tokens = running[:, :, cur - 1].reshape(rows, 1)
        logits = model.decode(tokens, memory if cur == 1 else None, mask, cache=cache,
                              start_pos=[cur - 1] * rows)[:, -1]
        logprobs = torch.log_softmax(logits.float(), -1)
        vocab = logprobs.shape[-1]
        if cur - 1 < params.min_tokens and len(end_ids):
            logprobs[:, ends] = float("-inf")
        total = (logprobs.view(b, k, vocab) + running_scores[:, :, None]).view(b, k * vocab)
        top_scores, top_idx = torch.topk(total, keep)
        parent = top_idx // vocab
        cand = _gather(running, parent)
        cand[:, :, cur] = top_idx % vocab
        hits = torch.isin(cand[:, :, cur], ends) | (cur + 1 >= max_length)

        # The running beams of the next step: the best candidates that did not end.
        go_on = top_scores + hits.float() * _NEG
        nxt = torch.topk(go_on, k)[1]
        running, running_scores = _gather(cand, nxt), _gather(go_on, nxt)
        rows_from = (_gather(parent, nxt) + offset).view(-1)

        # Finished hypotheses: ended candidates among the first k, while their source may still improve.
        just = hits & top_k_mask[None, :]
        final = top_scores / (cur ** params.length_penalty)
        full = is_finished.all(-1, keepdim=True) & (params.early_stopping is True)
        final = final + full.float() * _NEG + (~open_).float() * _NEG + (~just).float() * _NEG
        merged = torch.topk(torch.cat((scores, final), 1), k)[1]
        finished = _gather(torch.cat((finished, cand), 1), merged)
        scores = _gather(torch.cat((scores, final), 1), merged)
        lengths = _gather(torch.cat((lengths, torch.full_like(final, cur, dtype=torch.long)), 1), merged)
        is_finished = _gather(torch.cat((is_finished, just), 1), merged)

        cache.k.copy_(cache.k.index_select(1, rows_from))  # each beam continues its parent's keys
        cache.v.copy_(cache.v.index_select(1, rows_from))
        cur += 1
        # transformers' heuristic: the best running beam, at its current length (or, with "never" and a
        # positive length penalty, at the longest), against the worst finished hypothesis.
        best_len = max_length - 1 if params.early_stopping == "never" and params.length_penalty > 0 else cur - 1
        best_running = running_scores[:, :1] / (best_len ** params.length_penalty)
        worst = torch.where(is_finished, scores.min(1, keepdim=True)[0], torch.full_like(scores, _NEG))
        open_ = open_ & (best_running > worst).any(-1, keepdim=True)
        all_done = bool(is_finished.all()) and params.early_stopping is True
        if not bool(open_.any()) or all_done or bool(hits.all()):
            break
    return [finished[i, 0, 1 : 1 + int(lengths[i, 0])].tolist() for i in range(b)]
