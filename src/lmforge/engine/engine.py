"""The generation engine: per-sequence state, batched prefill, batched decode over a slotted KV cache.

`Engine.step()` is the unit a scheduler calls in a loop: admitted sequences are prefilled together,
otherwise every running sequence advances by one token in one forward pass. Sequences join and
leave between steps, each with its own sampling parameters and KV slot.

A slot keeps its keys and values after its sequence leaves. A new prompt that starts like what some
slot holds (a shared system prompt, the earlier turns of a chat) reuses that prefix: it is copied
into the new sequence's slot (or is already there) and only the rest of the prompt is prefilled.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterator
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import LMForgeError
from ..model import Transformer
from ..tokenizer import IncrementalDecoder, Tokenizer
from .kv_cache import KVCache
from .sampling import SamplerState, SamplingParams, TokenLogprob, token_logprob

_ids = itertools.count()


@dataclass
class Sequence:
    """Everything about one request in flight; the engine keeps no hidden per-request state elsewhere."""

    prompt_ids: list[int]
    params: SamplingParams
    max_tokens: int
    id: int = field(default_factory=lambda: next(_ids))
    slot: int = -1
    cached: int = 0  # tokens of this sequence already in the KV cache
    output_ids: list[int] = field(default_factory=list)
    text: str = ""  # text released so far (stop strings and end-of-turn tokens never enter it)
    finish_reason: str | None = None  # "stop" | "length" | "cancelled"
    logprobs: list[TokenLogprob] = field(default_factory=list)
    sampler: SamplerState | None = None
    decoder: IncrementalDecoder | None = None
    stop_ids: frozenset[int] = frozenset()
    raw: str = ""  # decoded text including any held-back tail that might start a stop string
    # Optional decoding constraint (structured output): ``mask(logits, remaining) -> logits`` before
    # sampling and ``accept(token)`` after it.
    constraint: Any = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)


class Engine:
    def __init__(self, model: Transformer, tokenizer: Tokenizer | None = None, max_batch: int = 8,
                 max_len: int | None = None) -> None:
        self.model = model
        self.tok = tokenizer
        self.cfg = model.cfg
        self.max_batch = max_batch
        self.context = min(max_len or self.cfg.context_length, self.cfg.context_length)
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.cache: KVCache | None = None
        self.waiting: deque[Sequence] = deque()
        self.running: dict[int, Sequence] = {}
        self.holder: dict[int, Sequence] = {}  # slot -> the sequence whose keys/values it holds
        self.prefix_reuse = True
        self.reused_tokens = 0  # prompt tokens not prefilled thanks to prefix reuse (a statistic)

    # -- requests ----------------------------------------------------------------------------------
    def add(self, prompt_ids: Seq[int], params: SamplingParams | None = None) -> Sequence:
        params = params or SamplingParams()
        if not self.cfg.causal:
            raise LMForgeError("this is an encoder (bidirectional) model: it embeds and classifies text but cannot "
                               "generate; use `lmforge embed` or `lmforge classify`")
        prompt_ids = [int(i) for i in prompt_ids]
        if not prompt_ids:
            raise LMForgeError("the prompt is empty")
        n = len(prompt_ids)
        if n >= self.context:
            raise LMForgeError(f"prompt is {n} tokens, but the context window is {self.context} tokens")
        bad = [i for i in prompt_ids if not 0 <= i < self.cfg.vocab_size]
        if bad:
            raise LMForgeError(f"token id {bad[0]} is outside the vocabulary of {self.cfg.vocab_size}")
        bad = [i for i in (params.logit_bias or {}) if not 0 <= i < self.cfg.vocab_size]
        if bad:
            raise LMForgeError(f"logit_bias token id {bad[0]} is outside the vocabulary of {self.cfg.vocab_size}")
        stop_ids = set(params.stop_token_ids)
        if self.tok is not None and not params.ignore_eos:
            stop_ids.update(self.tok.stop_token_ids)
        if params.stop and self.tok is None:
            raise LMForgeError("stop strings need a tokenizer")
        seq = Sequence(
            prompt_ids=prompt_ids, params=params, max_tokens=min(params.max_tokens, self.context - n),
            sampler=SamplerState(params, prompt_ids, self.cfg.vocab_size, self.device),
            decoder=self.tok.decoder(prompt_ids) if self.tok is not None else None,
            stop_ids=frozenset(stop_ids),
        )
        self.waiting.append(seq)
        return seq

    def cancel(self, seq: Sequence) -> None:
        if seq in self.waiting:
            self.waiting.remove(seq)
        if not seq.done:
            seq.finish_reason = "cancelled"
        if self.running.get(seq.slot) is seq:  # a finished sequence's slot may already be someone else's
            del self.running[seq.slot]

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # -- stepping ----------------------------------------------------------------------------------
    def _ensure_cache(self, need_len: int) -> None:
        if self.cache is not None and self.cache.max_len >= need_len:
            return
        # Grow in coarse steps and keep what running sequences have cached.
        new_len = min(self.context, max(256, -(-need_len // 256) * 256,
                                        2 * self.cache.max_len if self.cache else 0))
        new = KVCache(self.cfg, self.max_batch, new_len, self.device, self.dtype)
        if self.cache is not None:
            n = self.cache.max_len
            new.k[..., :n, :] = self.cache.k
            new.v[..., :n, :] = self.cache.v
        self.cache = new

    @torch.inference_mode()
    def step(self) -> list[tuple[Sequence, str]]:
        """Advance the batch by one step; returns (sequence, new text) for every sequence that moved."""
        free = [s for s in range(self.max_batch) if s not in self.running]
        if self.waiting and free:
            batch = [self.waiting.popleft() for _ in range(min(len(free), len(self.waiting)))]
            self._place(batch, free)
            return self._prefill(batch)
        if self.running:
            return self._decode(sorted(self.running.values(), key=lambda s: s.slot))
        return []

    @staticmethod
    def _shared(seq: Sequence, holder: Sequence | None) -> int:
        """How many leading prompt tokens `holder`'s cached keys/values cover (at most all but one, so the
        prompt's last token always runs and yields the first logits)."""
        if holder is None:
            return 0
        held = holder.prompt_ids + holder.output_ids
        n = min(holder.cached, len(held), len(seq.prompt_ids) - 1)
        if held[:n] == seq.prompt_ids[:n]:  # the usual case (a whole earlier turn), compared at C speed
            return n
        lo, hi = 0, n  # otherwise the longest matching prefix, by bisection on slice equality
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if held[:mid] == seq.prompt_ids[:mid]:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def _place(self, batch: list[Sequence], free: list[int]) -> None:
        """Give each admitted sequence a free slot, preferring one that already holds its prompt's start,
        and copy the longest matching prefix any slot holds into it."""
        copies: list[tuple[int, int, int]] = []  # (source slot, target slot, tokens)
        sources = dict(self.holder)  # what every slot holds before this batch overwrites anything
        for seq in batch:
            shared = {sl: self._shared(seq, h) for sl, h in sources.items()} if self.prefix_reuse else {}
            slot = max(free, key=lambda sl: shared.get(sl, 0))
            free.remove(slot)
            seq.slot, self.running[slot], self.holder[slot] = slot, seq, seq
            src = max(shared, key=shared.__getitem__, default=slot)
            n = shared.get(src, 0)
            if n > shared.get(slot, 0):
                copies.append((src, slot, n))
            seq.cached = n
            self.reused_tokens += n
        if copies and self.cache is not None:
            # Read every source before writing any target: a slot may be both in one batch.
            parts = [(dst, n, self.cache.k[:, src, :, :n].clone(), self.cache.v[:, src, :, :n].clone())
                     for src, dst, n in copies]
            for dst, n, k, v in parts:
                self.cache.k[:, dst, :, :n] = k
                self.cache.v[:, dst, :, :n] = v

    def _prefill(self, batch: list[Sequence]) -> list[tuple[Sequence, str]]:
        self._ensure_cache(max(s.num_tokens + s.max_tokens for s in batch))
        rest = [s.prompt_ids[s.cached:] for s in batch]  # what prefix reuse left to run
        lengths = [len(r) for r in rest]
        tokens = torch.zeros(len(batch), max(lengths), dtype=torch.long)
        for i, r in enumerate(rest):
            tokens[i, : lengths[i]] = torch.tensor(r)
        logits = self.model(tokens.to(self.device), cache=self.cache, start_pos=[s.cached for s in batch],
                            slots=[s.slot for s in batch], last_index=torch.tensor(lengths, device=self.device) - 1)
        for s in batch:
            s.cached = len(s.prompt_ids)
        return self._sample(batch, logits)

    def _decode(self, batch: list[Sequence]) -> list[tuple[Sequence, str]]:
        self._ensure_cache(max(s.num_tokens + 1 for s in batch))
        tokens = torch.tensor([[s.output_ids[-1]] for s in batch], device=self.device)
        logits = self.model(tokens, cache=self.cache, start_pos=[s.cached for s in batch],
                            slots=[s.slot for s in batch])[:, -1]
        for s in batch:
            s.cached += 1
        return self._sample(batch, logits)

    def _sample(self, batch: list[Sequence], logits: torch.Tensor) -> list[tuple[Sequence, str]]:
        logits = logits.float()
        simple = all(s.params.greedy and s.sampler.counts is None and s.sampler.seen is None
                     and s.sampler.bias is None and s.constraint is None for s in batch)
        if simple:  # one argmax for the whole batch
            chosen = logits.argmax(-1).tolist()
        else:
            chosen = [s.sampler.sample(logits[i] if s.constraint is None
                                       else s.constraint.mask(logits[i], s.max_tokens - len(s.output_ids)))
                      for i, s in enumerate(batch)]
        out = []
        for i, (s, tok) in enumerate(zip(batch, chosen)):
            if s.constraint is not None:
                s.constraint.accept(tok)
            if s.params.logprobs:
                s.logprobs.append(token_logprob(logits[i], tok, s.params.top_logprobs))
            out.append((s, self._append(s, tok)))
            if s.done:
                self.running.pop(s.slot, None)
        return out

    def _append(self, s: Sequence, tok: int) -> str:
        """Record one sampled token; returns the text it releases (held back if it may start a stop string)."""
        s.output_ids.append(tok)
        s.sampler.observe(tok)
        if tok in s.stop_ids:
            s.output_ids.pop()  # end-of-turn tokens never appear in the output
            if s.params.logprobs:
                s.logprobs.pop()
            s.finish_reason = "stop"
            return self._release(s, final=True)
        if s.decoder is not None:
            s.raw += s.decoder.push(tok)
        if len(s.output_ids) >= s.max_tokens:
            s.finish_reason = "length"
            return self._release(s, final=True)
        return self._release(s, final=False)

    def _release(self, s: Sequence, final: bool) -> str:
        if s.decoder is None:
            return ""
        if final:
            s.raw += s.decoder.flush()
        safe = len(s.raw)
        # Released text never holds a stop string or its start, so a match begins after it.
        hits = [j for j in (s.raw.find(stop, len(s.text)) for stop in s.params.stop) if j != -1]
        if hits:
            safe = min(hits)
            s.raw = s.raw[:safe]
            s.finish_reason = "stop"
        elif not final:
            # Hold back a tail that could still grow into a stop string.
            for stop in s.params.stop:
                for k in range(min(len(stop) - 1, len(s.raw) - len(s.text)), 0, -1):
                    if s.raw.endswith(stop[:k]):
                        safe = min(safe, len(s.raw) - k)
                        break
        delta = s.raw[len(s.text):safe]
        s.text += delta
        return delta

    # -- convenience loops -------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams] | None = None
                 ) -> list[Sequence]:
        """Run prompts of any lengths to completion, batched; returns the finished sequences in order."""
        plist = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        seqs = [self.add(p, sp) for p, sp in zip(prompts, plist)]
        while not all(s.done for s in seqs):
            self.step()
        return seqs

    def stream(self, prompt_ids: list[int], params: SamplingParams | None = None) -> Iterator[str]:
        """Yield text deltas for one prompt as they are produced."""
        seq = self.add(prompt_ids, params)
        try:
            while not seq.done:
                for s, delta in self.step():
                    if s is seq and delta:
                        yield delta
        finally:
            if not seq.done:
                self.cancel(seq)
