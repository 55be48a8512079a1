"""The generation engine: per-sequence state, batched prefill, batched decode over a slotted KV cache.

`Engine.step()` is the unit a scheduler calls in a loop: admitted sequences are prefilled together,
otherwise every running sequence advances by one token in one forward pass. Sequences join and
leave between steps, each with its own sampling parameters and KV slot. The KV cache never takes more
than its memory budget. Admission is optimistic: a sequence is admitted when the cache can hold it and
every running sequence at their current lengths plus a little headroom, not at their full lengths
(prompt and max_tokens). When running sequences outgrow what the budget holds, the most recently
admitted ones are preempted: they give up their slots and wait at the front of the queue with
everything they generated, and on readmission their keys and values are recomputed by prefilling
prompt and output, after which decoding continues as if nothing happened. The oldest running sequence
is never preempted, so one always makes progress and any sequence can reach the full context.

A slot keeps its keys and values after its sequence leaves. A new prompt that starts like what some
slot holds (a shared system prompt, the earlier turns of a chat) reuses that prefix: it is copied
into the new sequence's slot (or is already there) and only the rest of the prompt is prefilled.

Where a step's rows are computed exactly as their own one-row steps would be, a decode step also feeds
each sequence's guessed next tokens and keeps those the model agrees with (engine/speculative.py).

An encoder-decoder (T5, BART) runs these same steps with its own prefill and decode (engine/seq2seq.py).
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Iterator
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import LMForgeError
from ..model import Transformer
from ..quant import exact_rows
from ..tokenizer import IncrementalDecoder, Tokenizer
from . import speculative
from .kv_cache import KVCache, default_kv_memory, kv_bytes_per_token
from .output import append
from .sampling import SamplerState, SamplingParams, TokenLogprob, token_logprob
from .tooluse import ToolHook, closes_call, force_result

_ids = itertools.count()

# The most cache positions reserved at admission beyond a sequence's current length (see Engine.headroom).
ADMIT_HEADROOM = 256


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
    # One entry per sampled token: output_ids, then the end-of-turn token that ended the sequence, if any.
    logprobs: list[TokenLogprob] = field(default_factory=list)
    sampler: SamplerState | None = None
    decoder: IncrementalDecoder | None = None
    stop_ids: frozenset[int] = frozenset()
    raw: str = ""  # decoded text including any held-back tail that might start a stop string
    # Optional decoding constraint (structured output): ``mask(logits, remaining) -> logits`` before
    # sampling, ``accept(token) -> token taken`` after it, and ``complete`` once the output is whole.
    constraint: Any = None
    error: Exception | None = None  # why it finished with reason "error"
    tools: Any = None  # a ToolHook (engine/tooluse.py): calls this sequence writes run during decoding
    forced: list[tuple[int, int]] = field(default_factory=list)  # [start, end) spans of output_ids forced by tools
    forced_chars: list[tuple[int, int]] = field(default_factory=list)  # the same spans in `text`
    spec: speculative.DraftState | None = None  # speculative decoding's guesses so far (engine/speculative.py)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def token_ids(self) -> list[int]:
        """Prompt and output: what a (re)admitted sequence prefills, and what its slot's keys cover."""
        return self.prompt_ids + self.output_ids


class Engine:
    def __new__(cls, model: Any, *args: Any, **kwargs: Any) -> Engine:
        # An encoder-decoder gets the same engine with its seq2seq steps (engine/seq2seq.py).
        if cls is Engine and model.cfg.decoder_layers:
            from .seq2seq import Seq2SeqEngine

            return super().__new__(Seq2SeqEngine)
        return super().__new__(cls)

    def __init__(self, model: Transformer, tokenizer: Tokenizer | None = None, max_batch: int = 8,
                 max_len: int | None = None, kv_memory: int | None = None) -> None:
        """``kv_memory``: bytes the KV cache may take, all slots together (default: `default_kv_memory`)."""
        self.model = model
        self.tok = tokenizer
        self.cfg = model.cfg
        self.max_batch = max_batch
        context = min(max_len or self.cfg.context_length, self.cfg.context_length)
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.kv_token_bytes = kv_bytes_per_token(self.cfg, self.dtype)
        self.kv_memory = default_kv_memory(self.cfg, context, self.dtype) if kv_memory is None else kv_memory
        self.kv_tokens = self.kv_memory // self.kv_token_bytes  # tokens the budget holds, all slots together
        if self.kv_tokens < 2:
            raise LMForgeError(f"a KV cache of {self.kv_memory} bytes holds {self.kv_tokens} tokens of this model "
                               f"({self.kv_token_bytes} bytes each); at least 2 are needed")
        # One sequence can never hold more than the whole budget, so a small budget shortens the context.
        self.context = min(context, self.kv_tokens)
        self.kv_limits_context = self.kv_tokens < context
        self.cache: KVCache | None = None
        self.waiting: deque[Sequence] = deque()
        self.running: dict[int, Sequence] = {}
        self.holder: dict[int, Sequence] = {}  # slot -> the sequence whose keys/values it holds
        self.prefix_reuse = True
        self.reused_tokens = 0  # tokens not prefilled thanks to prefix reuse (a statistic)
        # Cache positions a sequence is admitted with beyond its current length (at most up to its max_tokens):
        # enough to decode a while before the cache must grow, small enough that many sequences start at once.
        self.headroom = max(1, min(ADMIT_HEADROOM, self.context // 16))
        self.preemptions = 0  # sequences preempted to keep the cache within its budget (a statistic)
        # Speculative decoding (engine/speculative.py): prompt lookup wherever verification is exact.
        self.drafter: speculative.Drafter | None = None
        self.draft_tokens = self.spec_rows = 0  # the most guesses per sequence, and rows per step
        if exact_rows(model) > 1:
            self.speculate(speculative.PromptLookup())

    def speculate(self, drafter: speculative.Drafter | None, draft_tokens: int = speculative.DRAFT_TOKENS) -> None:
        """Guess up to ``draft_tokens`` tokens a step with ``drafter`` and verify them in one step (None: plain
        decoding). Refused where a step's rows are not computed exactly as their one-row steps would be
        (`quant.exact_rows`), since greedy output could then differ from plain decoding's."""
        self.spec_rows = exact_rows(self.model)
        if drafter is not None and (draft_tokens < 1 or self.spec_rows < 2):
            raise LMForgeError("speculative decoding needs draft_tokens >= 1 and a model whose decode steps run the "
                               "packed CPU kernels (a GGUF file's codes on CPU, fp32, LMFORGE_EXACT unset)")
        self.drafter, self.draft_tokens = drafter, draft_tokens if drafter is not None else 0

    # -- requests ----------------------------------------------------------------------------------
    def add(self, prompt_ids: Seq[int], params: SamplingParams | None = None) -> Sequence:
        """Check a prompt and its parameters against this engine, then queue it (`enqueue`); max_tokens is
        clamped to the room the context leaves beside the prompt."""
        params = params or SamplingParams()
        prompt_ids = self.check(prompt_ids, params)
        return self.enqueue(prompt_ids, params, min(params.max_tokens, self.room(len(prompt_ids))))

    def room(self, prompt_len: int) -> int:
        """The most tokens a prompt of this length leaves room to generate."""
        return self.context - prompt_len

    def check(self, prompt_ids: Seq[int], params: SamplingParams) -> list[int]:
        """The prompt as a list of ints, once it and the parameters are known to fit this engine; raises
        LMForgeError naming what does not."""
        if not self.cfg.causal:
            raise LMForgeError("this is an encoder (bidirectional) model: it embeds and classifies text but cannot "
                               "generate; use `lmforge embed` or `lmforge classify`")
        prompt_ids = [int(i) for i in prompt_ids]
        if not prompt_ids:
            raise LMForgeError("the prompt is empty")
        self.check_length(len(prompt_ids))
        bad = [i for i in prompt_ids if not 0 <= i < self.cfg.vocab_size]
        if bad:
            raise LMForgeError(f"token id {bad[0]} is outside the vocabulary of {self.cfg.vocab_size}")
        bad = [i for i in (params.logit_bias or {}) if not 0 <= i < self.cfg.vocab_size]
        if bad:
            raise LMForgeError(f"logit_bias token id {bad[0]} is outside the vocabulary of {self.cfg.vocab_size}")
        if params.stop and self.tok is None:
            raise LMForgeError("stop strings need a tokenizer")
        return prompt_ids

    def check_length(self, n: int) -> None:
        """Refuse a prompt of n tokens that leaves no room to generate."""
        if n >= self.context:
            held = " (all that the KV cache memory holds)" if self.kv_limits_context else ""
            raise LMForgeError(f"prompt is {n} tokens, but the context window is {self.context} tokens{held}")

    def enqueue(self, prompt_ids: list[int], params: SamplingParams, max_tokens: int | None = None) -> Sequence:
        """Queue a prompt that its caller has checked (`check`, or the server's own checks at its edge): it
        fits the context with ``max_tokens`` (default ``params.max_tokens``) beside it."""
        if params.num_beams > 1:
            raise LMForgeError(f"num_beams={params.num_beams}: beam search runs for encoder-decoder models only, "
                               "through generate (it is not streamed)")
        stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            stop_ids.update(self.eos_ids)
        before = self.output_prefix(prompt_ids)  # what the output continues: penalties and decoding see it
        seq = Sequence(
            prompt_ids=prompt_ids, params=params, max_tokens=params.max_tokens if max_tokens is None else max_tokens,
            sampler=SamplerState(params, before, self.cfg.vocab_size, self.device),
            decoder=self.tok.decoder(before) if self.tok is not None else None,
            stop_ids=frozenset(stop_ids),
        )
        self.waiting.append(seq)
        return seq

    @property
    def eos_ids(self) -> list[int]:
        """Tokens that end an output unless ignore_eos."""
        return list(self.tok.stop_token_ids) if self.tok is not None else []

    def output_prefix(self, prompt_ids: list[int]) -> list[int]:
        """The tokens the output follows: the prompt (an encoder-decoder's output follows its start token)."""
        return prompt_ids

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

    @property
    def kv_info(self) -> dict[str, int]:
        """The KV cache's limits: slots, tokens one sequence may use, tokens and bytes of the whole budget,
        the bytes allocated now (the cache grows up to the budget as requests need it), and how many
        sequences have been preempted so far to stay within the budget."""
        return {"slots": self.max_batch, "context": self.context, "tokens": self.kv_tokens,
                "bytes": self.kv_memory, "allocated_bytes": self.cache.nbytes if self.cache is not None else 0,
                "preemptions": self.preemptions}

    # -- stepping ----------------------------------------------------------------------------------
    def _need(self, seq: Sequence) -> int:
        """Cache positions `seq` is admitted with (or counted at beside an admission): its tokens so far and
        the next `headroom` it may generate, never more than its prompt and max_tokens."""
        return min(len(seq.prompt_ids) + seq.max_tokens, seq.num_tokens + self.headroom)

    def _admit(self) -> list[Sequence]:
        """Take waiting sequences, first come first served, while the slots and the KV budget hold them and
        everything running, each at its current length plus headroom; the rest wait. Running sequences
        that later outgrow the budget are preempted (`_make_room`)."""
        live = len(self.running)
        longest = max((self._need(s) for s in self.running.values()), default=0)
        batch: list[Sequence] = []
        while self.waiting and live + len(batch) < self.max_batch:
            n, need = live + len(batch) + 1, max(longest, self._need(self.waiting[0]))
            fits_cache = self.cache is not None and n <= self.cache.rows and need <= self.cache.max_len
            if not fits_cache and n * need > self.kv_tokens:
                break  # the first in line waits, and everyone behind it: no one overtakes a long request
            batch.append(self.waiting.popleft())
            longest = need
        if batch:
            self._ensure_cache(live + len(batch), longest)
        return batch

    def _make_room(self) -> None:
        """Before a decode step, give every running sequence one more cache position. When the budget cannot
        hold that many rows that long, preempt the most recently admitted sequences until it can (never the
        last one: the budget holds one sequence of the full context)."""
        need = max(s.cached + 1 for s in self.running.values())
        if self.cache is not None and need <= self.cache.max_len:
            return
        while len(self.running) > 1 and len(self.running) * need > self.kv_tokens:
            self._preempt(max(self.running.values(), key=lambda s: s.id))
            need = max(s.cached + 1 for s in self.running.values())
        self._ensure_cache(len(self.running), need)

    def _preempt(self, seq: Sequence) -> None:
        """Take a running sequence out of the batch; it waits at the front of the queue with everything it has
        generated and sampled (output, text, logprobs, sampler and decoder state, constraint) and resumes by
        recomputing its keys and values. Its slot keeps them until reused, so a resumption may copy them back."""
        del self.running[seq.slot]
        self.waiting.appendleft(seq)  # sequences are preempted youngest first, so the queue stays in order
        self.preemptions += 1

    def _ensure_cache(self, rows: int, need_len: int) -> None:
        """Give the cache at least `rows` slots of `need_len` positions, within the KV budget."""
        old = self.cache
        if old is not None and old.rows >= rows and old.max_len >= need_len:
            return
        # Grow in coarse steps, but never past what the budget holds for this many sequences.
        new_len = min(self.context, max(256, -(-need_len // 256) * 256,
                                        2 * old.max_len if old is not None and need_len > old.max_len else 0))
        new_len = max(need_len, min(new_len, self.kv_tokens // rows))
        new_rows = min(self.max_batch, self.kv_tokens // new_len)
        # Keep what running sequences have cached, then what finished ones left for prefix reuse, in as many
        # slots as the new shape has; renumber slots only when a kept one is past the new last row.
        keep = sorted(self.running) + sorted(sl for sl, h in self.holder.items()
                                             if sl not in self.running and h.cached <= new_len)
        keep = sorted(keep[:new_rows])
        target = keep if not keep or keep[-1] < new_rows else list(range(len(keep)))
        n = max((self.holder[sl].cached for sl in keep), default=0)
        saved = None
        if old is not None and keep and n:
            src = torch.tensor(keep, device=self.device)
            saved = old.k[:, src, :, :n], old.v[:, src, :, :n]  # copies, so the old cache can go first
        self.cache = old = None  # freed before the new one is allocated, so the two never add up
        self.cache = self.new_cache(new_rows, new_len)
        if saved is not None:
            dst = torch.tensor(target, device=self.device)
            self.cache.k[:, dst, :, :n], self.cache.v[:, dst, :, :n] = saved
        if target != keep:
            moved = dict(zip(keep, target))
            self.running = {moved[sl]: s for sl, s in self.running.items()}
        self.holder = {new: self.holder[sl] for sl, new in zip(keep, target)}
        for sl, s in self.holder.items():
            s.slot = sl

    def new_cache(self, rows: int, max_len: int) -> KVCache:
        return KVCache(self.cfg, rows, max_len, self.device, self.dtype)

    @torch.inference_mode()
    def step(self) -> list[tuple[Sequence, str]]:
        """Advance the batch by one step; returns (sequence, new text) for every sequence that moved."""
        batch = self._admit() if self.waiting else []
        if batch:
            self._place(batch, [s for s in range(self.cache.rows) if s not in self.running])
            return self._prefill(batch)
        if self.running:
            self._make_room()
            return self._decode(sorted(self.running.values(), key=lambda s: s.slot))
        return []

    @staticmethod
    def _shared(seq: Sequence, holder: Sequence | None) -> int:
        """How many leading tokens of `seq` (its prompt, and its output if it resumes after preemption)
        `holder`'s cached keys/values cover (at most all but one, so the last token always runs and yields
        the logits to sample from)."""
        if holder is None:
            return 0
        held, ids = holder.token_ids, seq.token_ids
        n = min(holder.cached, len(held), len(ids) - 1)
        if held[:n] == ids[:n]:  # the usual case (a whole earlier turn), compared at C speed
            return n
        lo, hi = 0, n  # otherwise the longest matching prefix, by bisection on slice equality
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if held[:mid] == ids[:mid]:
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
            for sl in [sl for sl, h in self.holder.items() if h is seq]:  # a resumed sequence's former slot
                del self.holder[sl]  # (seq.cached will count its new slot's keys, not these)
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
        # What prefix reuse left to run: the prompt's rest, and for a resumed sequence its output too, so that
        # the last logits are those after its last generated token, as a decode step would give.
        rest = [s.token_ids[s.cached:] for s in batch]
        # Right padding writes every row up to its start plus the longest rest; where that would pass the
        # cache's length (a row that reuses a long prefix beside one that reuses none), run them apart.
        groups: list[list[int]] = [[]]
        for i in range(len(batch)):
            group = groups[-1] + [i]
            if groups[-1] and (max(batch[j].cached for j in group) + max(len(rest[j]) for j in group)
                               > self.cache.max_len):
                groups.append([i])
            else:
                groups[-1] = group
        parts = []
        for group in groups:
            lengths = [len(rest[i]) for i in group]
            tokens = torch.zeros(len(group), max(lengths), dtype=torch.long)
            for row, i in enumerate(group):
                tokens[row, : lengths[row]] = torch.tensor(rest[i])
            parts.append(self.model(tokens.to(self.device), cache=self.cache,
                                    start_pos=[batch[i].cached for i in group], slots=[batch[i].slot for i in group],
                                    last_index=torch.tensor(lengths, device=self.device) - 1))
        for s in batch:
            s.cached = s.num_tokens
        return self._sample(batch, parts[0] if len(parts) == 1 else torch.cat(parts))

    def _decode(self, batch: list[Sequence]) -> list[tuple[Sequence, str]]:
        drafts = speculative.drafts(self, batch) if self.drafter is not None else None
        if drafts is None:
            drafts = [[]] * len(batch)
        # One row per sequence, plus one per guessed token: its slot's next positions (engine/speculative.py).
        rows = [(s, t, s.cached + j) for s, d in zip(batch, drafts) for j, t in enumerate([s.output_ids[-1], *d])]
        tokens = torch.tensor([[t] for _, t, _ in rows], device=self.device)
        logits = self.model(tokens, cache=self.cache, start_pos=[p for _, _, p in rows],
                            slots=[s.slot for s, _, _ in rows])[:, -1]
        return self._sample(batch, logits, drafts)

    def _sample(self, batch: list[Sequence], logits: torch.Tensor, drafts: list[list[int]] | None = None
                ) -> list[tuple[Sequence, str]]:
        """Sample each sequence's next token from its row of logits. With ``drafts`` (a decode step), a
        sequence's row is followed by one row per guessed token: its tokens are taken row by row while
        each is the guess the next row was fed (engine/speculative.py), and its cache length advances by
        the rows used."""
        logits = logits.float()
        simple = all(s.params.greedy and s.sampler.counts is None and s.sampler.seen is None
                     and s.sampler.bias is None and s.constraint is None
                     and len(s.output_ids) >= s.params.min_tokens for s in batch)
        chosen: list[int] = logits.argmax(-1).tolist() if simple else [-1] * len(logits)  # one argmax for all
        out, forced, i = [], [], 0
        for s, guess in zip(batch, drafts or [[]] * len(batch)):
            text, used, first = "", 0, i
            # A failure in one row (its sampler, constraint or stop handling) fails that sequence alone.
            try:
                while used <= len(guess) and not s.done:
                    draft = guess[used] if used < len(guess) else None
                    used += 1
                    i = first + used - 1
                    if not simple:
                        row = logits[i] if s.constraint is None else s.constraint.mask(logits[i], s.max_tokens
                                                                                       - len(s.output_ids))
                        if len(s.output_ids) < s.params.min_tokens:  # no end-of-turn before min_tokens
                            ends = [t for t in s.stop_ids if t < row.shape[0]]
                            row = row.index_fill(0, torch.tensor(ends, dtype=torch.long, device=row.device),
                                                 float("-inf"))
                        chosen[i] = s.sampler.sample(row, draft)
                    tok = chosen[i]
                    if s.constraint is not None:  # near the end of its budget it may take its own closing move
                        tok = s.constraint.accept(tok)
                    if s.params.logprobs:
                        s.logprobs.append(token_logprob(logits[i], tok, s.params.top_logprobs))
                    text += append(s, tok)
                    if closes_call(s):
                        text += force_result(s, self.tok)
                        if not s.done:  # the forced tokens are prefilled next step, as a resumed sequence's are
                            forced.append(s)
                    if tok != draft:
                        break
                out.append((s, text))
            except Exception as e:
                s.error, s.finish_reason = e, "error"
                out.append((s, text))
            i = first + len(guess) + 1  # the next sequence's first row
            if drafts is not None:
                s.cached += used
                if guess:
                    speculative.adapt(s.spec, len(guess), used - 1, self.draft_tokens)
            if s.done or (forced and forced[-1] is s):
                self.running.pop(s.slot, None)
        self.waiting.extendleft(reversed(forced))
        return out

    # -- convenience loops -------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams] | None = None,
                 tools: Callable[[], ToolHook] | None = None) -> list[Sequence]:
        """Run prompts of any lengths to completion, batched; returns the finished sequences in order.
        ``tools`` makes each sequence's tool hook (`tooluse.ToolHook`): calls it writes run as they close."""
        plist = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        seqs = [self.add(p, sp) for p, sp in zip(prompts, plist)]
        for s in seqs if tools is not None else ():
            s.tools = tools()
        while not all(s.done for s in seqs):
            self.step()
        failed = next((s for s in seqs if s.error is not None), None)
        if failed is not None:
            raise failed.error
        return seqs

    def run(self, seq: Sequence) -> Iterator[str]:
        """Step until `seq` finishes (every other queued sequence advances too), yielding its text deltas;
        abandoning the iteration cancels it. A failed sequence ends with its `error` set, not raised."""
        try:
            while not seq.done:
                for s, delta in self.step():
                    if s is seq and delta:
                        yield delta
        finally:
            if not seq.done:
                self.cancel(seq)

    def stream(self, prompt_ids: list[int], params: SamplingParams | None = None) -> Iterator[str]:
        """Yield text deltas for one prompt as they are produced."""
        seq = self.add(prompt_ids, params)
        yield from self.run(seq)
        if seq.error is not None:
            raise seq.error
