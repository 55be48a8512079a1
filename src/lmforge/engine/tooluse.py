"""Tools run inside generation: when a sequence closes a tool-call span, its hook runs the call and the engine
forces the result's tokens into that sequence, then decoding continues from them.

The engine knows nothing of tools or templates: a `ToolHook` (one per sequence, supplied from above) says
which text closes a call and, given the output so far, returns the text and token ids to force. The forced
tokens are prefilled like a resumed sequence's (only that row runs that step; the others wait one step and
continue unchanged) and are recorded as spans, so callers and training can tell them from sampled tokens.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from ..errors import LMForgeError

if TYPE_CHECKING:
    from ..tokenizer import Tokenizer
    from .engine import Sequence


class ToolHook(Protocol):
    """One sequence's tool runner. ``close``: the text that ends a call span (``closed`` says whether it
    did: the tag may be inside the call's own text). ``respond(output)``: for the
    output text so far (ending with ``close``), the text and token ids to force; a tool's own failure is
    result text, so anything it raises fails that sequence alone."""

    close: str

    def closed(self, output: str) -> bool:
        """Whether ``output`` (which ends with ``close``) has closed a call, not just written the tag."""
        ...

    def respond(self, output: str) -> tuple[str, list[int]]: ...


def closes_call(s: Sequence) -> bool:
    """Whether the token just appended closed a call that `s`'s hook should answer."""
    return s.tools is not None and not s.done and s.raw.endswith(s.tools.close) and s.tools.closed(s.raw)


def force_result(s: Sequence, tok: Tokenizer | None) -> str:
    """Run `s`'s hook on its output and append the result tokens (marked in ``s.forced``); returns the text
    this releases: everything held back, then the forced text. When the result would not leave room for one
    more token within max_tokens, nothing is forced and `s` finishes with reason "length"."""
    if s.constraint is not None:  # its parser state would not know the forced tokens
        raise LMForgeError("tools run during generation cannot be combined with a decoding constraint")
    if s.decoder is not None:
        s.raw += s.decoder.flush()
    text, ids = s.tools.respond(s.raw)
    before = len(s.text)
    if len(s.output_ids) + len(ids) >= s.max_tokens:
        s.finish_reason = "length"
        s.text = s.raw
        return s.text[before:]
    start = len(s.output_ids)
    s.output_ids += ids
    s.forced.append((start, len(s.output_ids)))
    s.forced_chars.append((len(s.raw), len(s.raw) + len(text)))
    s.raw += text
    s.text = s.raw  # forced text is released whole; stop strings are looked for after it
    if tok is not None:
        s.decoder = tok.decoder(s.token_ids)  # decoding resumes after the forced tokens
    return s.text[before:]
