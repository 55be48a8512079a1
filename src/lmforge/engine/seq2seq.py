"""The engine's steps for encoder-decoders (T5, BART): `Engine` picks this class for such a model.

A sequence's prompt is its source (the encoder's input); its output continues the decoder start token.
Admission prefills a batch: the sources are encoded together, once, and the decoder runs over the start
token (and, for a sequence resumed after preemption, what it had generated), making each decoder layer's
cross-attention keys/values of the source in the sequence's slot (`kv_cache.CrossKVCache`). Decode steps
then feed one token per running sequence, as for a decoder model, reading the cross keys from the slots.
Sampling, stop conditions, streaming, cancellation and preemption are the engine's own. A preempted
sequence's source is encoded again when it resumes. Prefix reuse does not apply: a decoder's keys depend
on the source. Beam search (``num_beams > 1``) runs through `generate` (`engine.beam`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..errors import LMForgeError
from ..tokenizer import Tokenizer
from .beam import beam_search
from .engine import Engine, Sequence
from .kv_cache import CrossKVCache, KVCache
from .sampling import SamplingParams
from .tooluse import ToolHook


class Seq2SeqEngine(Engine):
    def __init__(self, model: Any, tokenizer: Tokenizer | None = None, max_batch: int = 8,
                 max_len: int | None = None, kv_memory: int | None = None) -> None:
        super().__init__(model, tokenizer, max_batch=max_batch, max_len=max_len, kv_memory=kv_memory)
        self.prefix_reuse = False
        extra = self.cfg.extra
        self.start_id = int(extra.get("decoder_start_token_id", 0))
        self.pad_id = int(extra.get("pad_token_id", 0))
        self.end_id = extra.get("eos_token_id")
        # T5's relative positions have no hard limit, BART's learned ones do: either way the model's context.
        self.source_limit = self.cfg.context_length

    # -- the source and the output -----------------------------------------------------------------
    def check_length(self, n: int) -> None:
        if n > self.source_limit:
            raise LMForgeError(f"the source is {n} tokens, but the {self.cfg.family} encoder takes at most "
                               f"{self.source_limit}")

    def room(self, prompt_len: int) -> int:
        return self.context  # the decoder's positions: the start token and every fed output token

    @property
    def eos_ids(self) -> list[int]:
        ids = super().eos_ids
        return ids + [int(self.end_id)] if self.end_id is not None and int(self.end_id) not in ids else ids

    def output_prefix(self, prompt_ids: list[int]) -> list[int]:
        return [self.start_id]

    def _need(self, seq: Sequence) -> int:
        return min(seq.max_tokens, len(seq.output_ids) + 1 + self.headroom)

    # -- the cache ---------------------------------------------------------------------------------
    def new_cache(self, rows: int, max_len: int) -> KVCache:
        return CrossKVCache(self.cfg, rows, max_len, self.device, self.dtype)

    def _ensure_cache(self, rows: int, need_len: int) -> None:
        old = self.cache
        if old is None or (old.rows >= rows and old.max_len >= need_len):
            super()._ensure_cache(rows, need_len)
            return
        running = sorted(self.running.values(), key=lambda s: s.slot)
        saved = old.saved_cross([s.slot for s in running]) if running else None
        old = None  # noqa: F841 (the old cache is freed before the new one is allocated)
        super()._ensure_cache(rows, need_len)
        if saved is not None:  # running sequences keep their cross keys, in their (maybe renumbered) slots
            self.cache.restore_cross([s.slot for s in running], saved)

    def _source_mask(self, batch: list[Sequence]) -> tuple[int, torch.Tensor]:
        lens = torch.tensor([len(s.prompt_ids) for s in batch], device=self.device)
        width = int(lens.max())
        return width, (torch.arange(width, device=self.device)[None, :] < lens[:, None]).long()

    # -- steps -------------------------------------------------------------------------------------
    def _prefill(self, batch: list[Sequence]) -> list[tuple[Sequence, str]]:
        width, mask = self._source_mask(batch)
        src = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        dec = [[self.start_id] + s.output_ids for s in batch]
        tgt = torch.zeros(len(batch), max(len(d) for d in dec), dtype=torch.long)
        for i, s in enumerate(batch):
            src[i, : len(s.prompt_ids)] = torch.tensor(s.prompt_ids)
            tgt[i, : len(dec[i])] = torch.tensor(dec[i])
        memory = self.model.encode(src.to(self.device), mask)
        self.cache.bind_source(width, fresh=True)
        logits = self.model.decode(tgt.to(self.device), memory, mask, cache=self.cache, start_pos=[0] * len(batch),
                                   slots=[s.slot for s in batch],
                                   last_index=torch.tensor([len(d) - 1 for d in dec], device=self.device))
        for s, d in zip(batch, dec):
            s.cached = len(d)
        return self._sample(batch, logits)

    def _decode(self, batch: list[Sequence]) -> list[tuple[Sequence, str]]:
        width, mask = self._source_mask(batch)
        self.cache.bind_source(width, fresh=False)
        tokens = torch.tensor([[s.output_ids[-1]] for s in batch], device=self.device)
        logits = self.model.decode(tokens, None, mask, cache=self.cache, start_pos=[s.cached for s in batch],
                                   slots=[s.slot for s in batch])[:, -1]
        for s in batch:
            s.cached += 1
        return self._sample(batch, logits)

    # -- beam search -------------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams] | None = None,
                 tools: Callable[[], ToolHook] | None = None) -> list[Sequence]:
        """`Engine.generate`; sources whose parameters ask for ``num_beams > 1`` are beam-searched, together
        when they share their parameters."""
        plist = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        beams = [i for i, p in enumerate(plist) if p.num_beams > 1]
        if not beams:
            return super().generate(prompts, params, tools)
        if tools is not None:
            raise LMForgeError("tools cannot be combined with num_beams > 1")
        out: list[Sequence | None] = [None] * len(prompts)
        rest = [i for i in range(len(prompts)) if plist[i].num_beams == 1]
        if rest:
            for i, seq in zip(rest, super().generate([prompts[i] for i in rest], [plist[i] for i in rest])):
                out[i] = seq
        checked = {i: self.check(prompts[i], plist[i]) for i in beams}
        groups: dict[int, list[int]] = {}
        for i in beams:  # one search per distinct parameters
            groups.setdefault(next(j for j in beams if plist[j] == plist[i]), []).append(i)
        for members in groups.values():
            p = plist[members[0]]
            budget = min(p.max_tokens, self.context)
            ends = sorted(set(p.stop_token_ids) | (set() if p.ignore_eos else set(self.eos_ids)))
            found = beam_search(self.model, [checked[i] for i in members], p, self.start_id, ends, self.pad_id,
                                budget)
            for i, ids in zip(members, found):
                out[i] = self._finished(checked[i], p, budget, ids, ends)
        return [s for s in out if s is not None]

    def _finished(self, source: list[int], params: SamplingParams, budget: int, ids: list[int],
                  ends: list[int]) -> Sequence:
        """A beam-searched hypothesis as a finished Sequence (the end token, if any, not in its output)."""
        stopped = bool(ids) and ids[-1] in ends
        output = ids[:-1] if stopped else ids
        text = self.tok.decode(output) if self.tok is not None else ""
        return Sequence(prompt_ids=source, params=params, max_tokens=budget, output_ids=output, text=text,
                        raw=text, finish_reason="stop" if stopped else "length")
