"""A sequence's output as tokens are sampled: end-of-turn tokens, max_tokens, and the text released to the
client, held back while it may still grow into a stop string."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .engine import Sequence


def append(s: Sequence, tok: int) -> str:
    """Record one sampled token; returns the text it releases (held back if it may start a stop string)."""
    s.output_ids.append(tok)
    s.sampler.observe(tok)
    if tok in s.stop_ids:
        # End-of-turn tokens never appear in the output, but their logprob entry stays: the token was
        # sampled, and scoring clients (echo + logprobs) read the entry after the prompt's last token.
        s.output_ids.pop()
        s.finish_reason = "stop"
        return release(s, final=True)
    if s.decoder is not None:
        s.raw += s.decoder.push(tok)
    if len(s.output_ids) >= s.max_tokens:
        # A constrained output that is a whole document has finished, though at the budget's last token.
        s.finish_reason = "stop" if s.constraint is not None and s.constraint.complete else "length"
        return release(s, final=True)
    return release(s, final=False)


def release(s: Sequence, final: bool) -> str:
    if s.decoder is None:
        return ""
    if final:
        s.raw += s.decoder.flush()
    safe = len(s.raw)
    # Released text never holds a stop string or its start, so a match begins after it. Before
    # min_tokens no stop string counts (vLLM's semantics).
    early = len(s.output_ids) < s.params.min_tokens
    hits = [] if early else [j for j in (s.raw.find(stop, len(s.text)) for stop in s.params.stop) if j != -1]
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
