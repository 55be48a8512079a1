"""Speculative decoding: guess a sequence's next tokens cheaply, then check all of them in one decode step.

A decode step of k + 1 rows (the last token and k guessed ones, consecutive positions of one slot) costs
much less than k + 1 one-row steps, and yields the model's logits after each of them. Verification then
walks the rows as plain decoding would: the token sampled (or argmax'ed) after row j is kept, and the
walk goes on to row j + 1 only if that token is the guess that row j + 1 was fed. So every output token
comes from logits computed on exactly the tokens plain decoding would have fed.

- Greedy outputs are bit-identical to plain decoding because verification runs only where a step's rows
  are computed independently of each other (`quant.exact_rows`: the CPU decode kernels, whose
  per-row arithmetic never depends on the batch); elsewhere nothing is guessed.
- Sampled outputs keep their distribution: a guess g is a deterministic proposal, so the standard
  acceptance rule keeps it with probability p(g) and otherwise samples from p with g removed
  (`SamplerState.sample(logits, draft=g)`). Seeded sampling is not speculated, so that a seed gives the
  same output whatever else the engine is running.

Guesses come from a `Drafter`: `PromptLookup` (the default) continues the latest earlier occurrence of the
sequence's last few tokens, which pays off when the output quotes or edits its input (summaries, code
edits, extraction, RAG answers) and costs nothing when there is no match; `DraftModel` runs a small model
with the same vocabulary. Each sequence's draft length adapts to how much of its last guess was kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch

from ..errors import LMForgeError
from ..quant import exact_rows
from .kv_cache import KVCache

if TYPE_CHECKING:
    from .engine import Engine, Sequence

# The most tokens guessed for one sequence in one step. A verification row costs a third to a half of a
# one-row decode step (SmolLM2 Q4_1 on 2 Zen 5 cores: 4.3 ms for 1 row, 5.7 for 2, 8.1 for 3 or 4, 15.0
# for 8), so long guesses pay only when most of them are kept; the adaptive length starts at START_TOKENS.
# The packed kernels take rows in tiles of 4, so 3 rows cost what 4 do: `adapt` never leaves a step at 3.
DRAFT_TOKENS = 7
START_TOKENS = 3


@dataclass
class DraftState:
    """One sequence's speculation state (`Sequence.spec`)."""

    k: int = START_TOKENS  # tokens to guess next step
    index: dict[tuple[int, ...], int] = field(default_factory=dict)  # n-gram -> latest start (PromptLookup)
    indexed: int = 0  # positions of token_ids whose n-grams are in `index`
    fed: list[int] = field(default_factory=list)  # tokens whose keys the draft model's cache holds
    slot: int = -1  # the draft cache slot they are in
    proposed: int = 0  # statistics: tokens guessed and kept
    accepted: int = 0


class Drafter(Protocol):
    def propose(self, seq: Sequence, k: int) -> list[int]:
        """Up to k guesses of the tokens that follow ``seq.token_ids``."""


class PromptLookup:
    """Guesses by n-gram lookup: the tokens that followed the latest earlier occurrence of the sequence's
    last ``max_ngram`` tokens (or fewer, down to ``min_ngram``), in its prompt or its output so far."""

    def __init__(self, max_ngram: int = 3, min_ngram: int = 2) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise LMForgeError(f"prompt lookup n-grams must satisfy 1 <= min ({min_ngram}) <= max ({max_ngram})")
        self.sizes = range(max_ngram, min_ngram - 1, -1)

    def propose(self, seq: Sequence, k: int) -> list[int]:
        st, ids = seq.spec, seq.token_ids
        n_ids = len(ids)
        # Index the n-grams that end before the last token: an earlier occurrence of the tail ends there at
        # the latest. Later occurrences overwrite earlier ones, so a lookup finds the most recent.
        for end in range(st.indexed, n_ids - 1):
            for n in self.sizes:
                if end + 1 >= n:
                    st.index[tuple(ids[end + 1 - n: end + 1])] = end + 1 - n
        st.indexed = max(st.indexed, n_ids - 1)
        for n in self.sizes:
            start = st.index.get(tuple(ids[n_ids - n:])) if n_ids > n else None
            if start is not None:
                return ids[start + n: start + n + k]
        return []


class DraftModel:
    """Guesses by greedy decoding with a small model of the same vocabulary, in a KV cache of its own (one
    slot per engine slot). The draft cache keeps what it computed for a sequence's accepted prefix."""

    def __init__(self, model: Any, vocab_size: int) -> None:
        if model.cfg.vocab_size != vocab_size or not model.cfg.causal or model.cfg.decoder_layers:
            raise LMForgeError(f"a draft model must be a decoder with the target's vocabulary ({vocab_size} tokens); "
                               f"this one has {model.cfg.vocab_size}")
        self.model = model
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.cache: KVCache | None = None
        self.owner: dict[int, int] = {}  # slot -> id of the sequence whose keys it holds

    @torch.inference_mode()
    def propose(self, seq: Sequence, k: int) -> list[int]:
        st, ids = seq.spec, seq.token_ids
        need = len(ids) + k
        if need > self.model.cfg.context_length:
            return []
        if self.cache is None or self.cache.rows <= seq.slot or self.cache.max_len < need:
            rows = max(seq.slot + 1, self.cache.rows if self.cache is not None else 1)
            self.cache = KVCache(self.model.cfg, rows, -(-need // 256) * 256, self.device, self.dtype)
            self.owner.clear()
        same = self.owner.get(seq.slot) == seq.id and st.slot == seq.slot
        common = 0
        if same:  # the longest prefix of what the cache holds that the sequence still starts with
            while common < min(len(st.fed), len(ids)) and st.fed[common] == ids[common]:
                common += 1
        common = min(common, len(ids) - 1)  # at least one token runs, to give the next logits
        self.owner[seq.slot], st.slot = seq.id, seq.slot
        tokens, start, out = ids[common:], common, []
        for _ in range(k):
            x = torch.tensor([tokens], device=self.device)
            logits = self.model(x, cache=self.cache, start_pos=[start], slots=[seq.slot])[0, -1]
            start += len(tokens)
            tokens = [int(logits.argmax())]
            out.append(tokens[0])
        st.fed = ids + out[:-1]  # the last guess was never fed
        return out


def adapt(st: DraftState, proposed: int, kept: int, limit: int) -> None:
    """After verification: guess twice as far when every guess was kept, else one past what was kept (and
    one more where that fills the kernels' tile of 4 rows: the last token and 3 guesses)."""
    st.proposed += proposed
    st.accepted += kept
    k = 2 * st.k if kept == proposed else max(1, kept + 1)
    st.k = min(limit, k + 1 if (k + 1) % 4 == 3 else k)


def drafts(engine: Engine, batch: list[Sequence]) -> list[list[int]] | None:
    """Each sequence's guesses for this step, within the rows a step may have and stay exact (one per
    sequence, plus its guesses); None when no sequence guesses anything, or the model no longer qualifies
    (e.g. its weights were changed in place since the engine was made)."""
    spare = engine.spec_rows - len(batch)
    if engine.drafter is None or spare <= 0:
        return None
    out: list[list[int]] = []
    for s in batch:
        guess: list[int] = []
        room = min(spare, engine.cache.max_len - s.cached - 1, s.max_tokens - len(s.output_ids) - 1)
        if room > 0 and s.constraint is None and s.tools is None and (s.params.greedy or s.params.seed is None):
            if s.spec is None:
                s.spec = DraftState(k=min(START_TOKENS, engine.draft_tokens))
            guess = engine.drafter.propose(s, min(room, s.spec.k))[:room]
        spare -= len(guess)
        out.append(guess)
    if not any(out) or exact_rows(engine.model) < len(batch) + sum(map(len, out)):
        return None
    return out
