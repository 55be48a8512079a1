"""Structured output: JSON (any object, or a JSON schema) enforced during decoding by token masking.

llguidance compiles the schema into a grammar over the model's own tokenizer and says, at every step,
which tokens keep the output a valid prefix. Masking alone cannot promise a *complete* document within
``max_tokens``, so when the budget runs low a constraint switches to closing moves (end strings, close
brackets, short literals) that it has checked, on a copy of the parser, reach a complete document in
time.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch

from ..errors import LMForgeError
from ..tokenizer import Tokenizer

# Fixed separators and no free whitespace: a random model could otherwise spend its budget on spaces.
_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# Tokens tried, in order, when the output must be closed quickly (after any pure closer like `"}`).
_SHORT = ("0", "1", "true", "false", "null", '""', '"', "[]", "{}", "[", "{")
_MAX_PLAN = 4096


class JsonGrammars:
    """Compiles JSON grammars for one tokenizer and model vocabulary (built once per server)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int) -> None:
        import llguidance

        self._llg = llguidance
        self.vocab_size = vocab_size
        self.stop_ids = [i for i in tokenizer.stop_token_ids if i < vocab_size]
        self.lltok = llguidance.LLTokenizer(tokenizer.hf.to_str(), n_vocab=vocab_size,
                                            eos_token=self.stop_ids or None)
        texts = [tokenizer.decode([i], skip_special_tokens=False) if i < tokenizer.vocab_size else ""
                 for i in range(vocab_size)]
        special = set(tokenizer.stop_token_ids)
        # A bare `"` comes first: inside a string it is the only way out, while `]]` would be content
        # there. Then bracket closers, longest first; tokens mixing `"` and brackets are left out.
        quote = [i for i, t in enumerate(texts) if t == '"' and i not in special]
        brackets = [i for i, t in enumerate(texts) if t and set(t) <= set("]}") and i not in special]
        self.closers = quote + sorted(brackets, key=lambda i: -len(texts[i]))
        by_text = {t: i for i, t in enumerate(texts) if t in _SHORT and i not in special}
        self.short = [by_text[t] for t in _SHORT if t in by_text]

    def compile(self, schema: dict[str, Any] | None) -> str:
        """The grammar for a JSON schema (None: any JSON object); a bad schema is an LMForgeError."""
        try:
            grammar = self._llg.LLMatcher.grammar_from_json_schema(
                json.dumps(schema if schema is not None else {"type": "object"}), overrides=_JSON_OPTIONS)
        except (ValueError, TypeError) as e:
            raise LMForgeError(f"invalid JSON schema: {e}") from None
        is_error, messages = self._llg.LLMatcher.validate_grammar_with_warnings(grammar, self.lltok)
        if is_error:
            raise LMForgeError(f"invalid JSON schema: {messages[0].strip().splitlines()[0]}")
        return grammar

    def constraint(self, grammar: str) -> JsonConstraint:
        return JsonConstraint(self, grammar)


class JsonConstraint:
    """Per-sequence grammar state, driven by the engine: ``mask`` before sampling, ``accept`` after."""

    def __init__(self, grammars: JsonGrammars, grammar: str) -> None:
        self.g = grammars
        self.matcher = grammars._llg.LLMatcher(grammars.lltok, grammar, log_level=0)
        self.closing = False
        self._next_check: int | None = None  # remaining budget at which to re-plan (None: at once)

    def _allowed(self, matcher: Any) -> np.ndarray:
        bits = np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8)
        return np.unpackbits(bits, bitorder="little")[: self.g.vocab_size].view(bool)

    def _closing_move(self, allowed: np.ndarray) -> int | None:
        """The token that heads for the end of the document: deterministic, so a plan is followed exactly."""
        for i in self.g.stop_ids:
            if allowed[i]:
                return i
        for group in (self.g.closers, self.g.short):
            for i in group:
                if allowed[i]:
                    return i
        nz = np.flatnonzero(allowed)  # forced text (a required key, an enum value): any allowed token
        return int(nz[0]) if len(nz) else None

    def _steps_to_close(self) -> int:
        """Tokens the closing strategy needs from here (a large number if it gets stuck)."""
        m = self.matcher.deep_copy()
        for n in range(_MAX_PLAN):
            if m.is_accepting():
                return n
            tok = self._closing_move(self._allowed(m))
            if tok is None or not m.consume_token(tok):
                return _MAX_PLAN
        return _MAX_PLAN

    def mask(self, logits: torch.Tensor, remaining: int) -> torch.Tensor:
        """Logits with every token that would break the grammar set to -inf."""
        allowed = self._allowed(self.matcher)
        if not self.closing and (self._next_check is None or remaining <= self._next_check):
            need = self._steps_to_close() + 1  # +1 for the end-of-turn token
            if need + 1 >= remaining:
                self.closing = True
            else:  # look again halfway to the point where closing must start
                self._next_check = remaining - max(1, (remaining - need) // 2)
        if self.closing:
            tok = self._closing_move(allowed)
            if tok is not None:
                out = torch.full_like(logits, float("-inf"))
                out[tok] = 0.0
                return out
        if not allowed.any():  # the grammar is finished or broken: only end the turn
            allowed = np.zeros_like(allowed)
            allowed[self.g.stop_ids] = True
        keep = torch.from_numpy(allowed.copy()).to(logits.device)
        if keep.shape[0] < logits.shape[0]:
            keep = torch.cat([keep, keep.new_zeros(logits.shape[0] - keep.shape[0])])
        return logits.masked_fill(~keep, float("-inf"))

    def accept(self, token: int) -> None:
        if token not in self.g.stop_ids:
            self.matcher.consume_token(token)
