"""Structured output: JSON (any object, or a JSON schema), or JSON spans in free text (tool calls, see
`lmforge.tools.grammar`), enforced during decoding by token masking.

llguidance compiles the schema into a grammar over the model's own tokenizer and says, at every step,
which tokens keep the output a valid prefix. Masking alone cannot promise a *complete* document within
``max_tokens``, so each sequence plans, on a copy of the parser, the shortest way to a complete document
that it knows (close the string, close the brackets, forced text in its canonical tokens, the shortest
value for each required key). Near the end of the budget every sampled token is checked against that
plan, and once the plan needs the whole remaining budget the sequence follows it exactly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import LMForgeError
from ..tokenizer import Tokenizer

# Fixed separators and no free whitespace: a random model could otherwise spend its budget on spaces.
_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# Values tried, in order, when a value must be written quickly (outside a string).
_SHORT = ("0", "1", '""', "true", "null", "false", "[]", "{}", '"', "[", "{")
_MAX_PLAN = 4096
_LONGEST = 48  # longest token text tried when spelling a planned completion
# Within this many tokens of slack (budget left minus the plan's length), every sampled token is checked.
_WINDOW = 32


class StructuredOutputError(LMForgeError):
    """The document cannot be completed (the parser failed on the way): that request fails, naming
    response_format, rather than return a fragment."""

    param = "response_format"


@dataclass(frozen=True)
class Grammar:
    """A compiled grammar and the length, in tokens, of the shortest document the closing plan writes.

    ``span``: the JSON lies between these markers in free text (tool calls), so only text inside them is
    lexed as JSON; ``jump``: the tokens the shortest span takes, which the budget must keep once one opens;
    ``repeat``: another span may follow a closed one."""

    text: str
    min_tokens: int
    span: tuple[str, str] | None = None
    jump: int = 0
    repeat: bool = False


def _lex(in_string: bool, escaped: bool, text: str) -> tuple[bool, bool]:
    """Whether JSON text leaves the writer inside a string (and just after a backslash there)."""
    for ch in text:
        if escaped:
            escaped = False
        elif in_string and ch == "\\":
            escaped = True
        elif ch == '"':
            in_string = not in_string
    return in_string, escaped


class JsonGrammars:
    """Compiles JSON grammars for one tokenizer and model vocabulary (built once per server)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int) -> None:
        import llguidance

        self._llg = llguidance
        self.vocab_size = vocab_size
        self.stop_ids = [i for i in tokenizer.stop_token_ids if i < vocab_size]
        try:
            self.lltok = llguidance.LLTokenizer(tokenizer.hf.to_str(), n_vocab=vocab_size,
                                                eos_token=self.stop_ids or None)
        except TypeError:  # llguidance before 1.7 takes a single end-of-sequence id: the first stop token
            self.lltok = llguidance.LLTokenizer(tokenizer.hf.to_str(), n_vocab=vocab_size,
                                                eos_token=self.stop_ids[0] if self.stop_ids else None)
        self.texts = [tokenizer.decode([i], skip_special_tokens=False) if i < tokenizer.vocab_size else ""
                      for i in range(vocab_size)]
        special = set(tokenizer.stop_token_ids)
        added = {i for i, t in tokenizer.hf.get_added_tokens_decoder().items() if t.special}
        self.quote = [i for i, t in enumerate(self.texts) if t == '"' and i not in special]
        # Bracket closers, longest first (`]}` closes two levels in one token).
        brackets = [i for i, t in enumerate(self.texts) if t and set(t) <= set("]}") and i not in special]
        self.brackets = sorted(brackets, key=lambda i: -len(self.texts[i]))
        by_text = {t: i for i, t in enumerate(self.texts) if t in _SHORT and i not in special}
        self.short = [by_text[t] for t in _SHORT if t in by_text]
        # Value separators: they end a number when a bracket cannot (a required key still follows).
        self.commas = [i for i, t in enumerate(self.texts) if t.strip() == "," and i not in special]
        # Whole-text tokens, for spelling a planned completion in as few tokens as the vocabulary allows.
        self.spellings: dict[str, int] = {}
        for i, t in enumerate(self.texts):
            if t and "\ufffd" not in t and i not in special and i not in added:
                self.spellings.setdefault(t, i)
        self.longest = min(_LONGEST, max((len(t) for t in self.spellings), default=1))

    def spell(self, text: str) -> list[int] | None:
        """The fewest tokens whose texts concatenate to `text` (None if the vocabulary cannot spell it)."""
        n = len(text)
        best: list[tuple[int, int, int] | None] = [None] * (n + 1)  # (tokens, previous end, token)
        best[0] = (0, 0, -1)
        for i in range(n):
            if best[i] is None:
                continue
            for j in range(i + 1, min(n, i + self.longest) + 1):
                tok = self.spellings.get(text[i:j])
                if tok is not None and (best[j] is None or best[i][0] + 1 < best[j][0]):
                    best[j] = (best[i][0] + 1, i, tok)
        if best[n] is None:
            return None
        out, j = [], n
        while j:
            _, i, tok = best[j]
            out.append(tok)
            j = i
        return out[::-1]

    def compile(self, schema: dict[str, Any] | None) -> Grammar:
        """The grammar for a JSON schema (None: any JSON object); a bad schema is an LMForgeError."""
        try:
            grammar = self._llg.LLMatcher.grammar_from_json_schema(
                json.dumps(schema if schema is not None else {"type": "object"}), overrides=_JSON_OPTIONS)
        except (ValueError, TypeError) as e:
            raise LMForgeError(f"invalid JSON schema: {e}") from None
        return self._checked(grammar, "JSON schema", None)

    def compile_lark(self, lark: str, span: tuple[str, str] | None = None, repeat: bool = False) -> Grammar:
        """A grammar in llguidance's Lark syntax (``%json`` embeds JSON schemas); ``span``, ``repeat``: see
        `Grammar`."""
        return self._checked(lark, "grammar", span, repeat)

    def _checked(self, grammar: str, what: str, span: tuple[str, str] | None, repeat: bool = False) -> Grammar:
        is_error, messages = self._llg.LLMatcher.validate_grammar_with_warnings(grammar, self.lltok)
        if is_error:
            raise LMForgeError(f"invalid {what}: {messages[0].strip().splitlines()[0]}")
        # A schema may admit no finite document (an object that requires itself): refuse it here rather than
        # stop with a fragment later.
        state = _State(self, self._llg.LLMatcher(self.lltok, grammar, log_level=0), span=span)
        plan = state.plan()
        if plan is None:
            raise LMForgeError(f"the {what} admits no document that can be completed "
                               f"({state.failure or 'the shortest way to close it never ends'})")
        jump = len(plan) + 2 if span is not None else 0  # the first span, and a separator before another
        if span is not None and not plan:  # free text first: the shortest span, once its opening is written
            opening = self.spell(span[0]) or []
            if all(state.consume(t) for t in opening) and (rest := state.plan()) is not None:
                jump = len(opening) + len(rest) + 2
            else:
                raise LMForgeError(f"the {what} cannot complete a span opened by {span[0]!r}")
        return Grammar(grammar, len(plan), span, jump, repeat)

    def constraint(self, grammar: Grammar) -> JsonConstraint:
        return JsonConstraint(self, grammar)


class _State:
    """A parser with the lexical state of the JSON text it has consumed."""

    def __init__(self, g: JsonGrammars, matcher: Any, in_string: bool = False, escaped: bool = False,
                 span: tuple[str, str] | None = None, outside: bool = True, tail: str = "") -> None:
        self.g, self.matcher, self.in_string, self.escaped = g, matcher, in_string, escaped
        # With a span, text outside it is free text (no JSON lexing); `tail` matches its markers.
        self.span, self.outside, self.tail = span, span is not None and outside, tail
        self.failure: str | None = None

    def copy(self) -> _State:
        return _State(self.g, self.matcher.deep_copy(), self.in_string, self.escaped, self.span, self.outside,
                      self.tail)

    def allowed(self) -> np.ndarray:
        bits = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
        return np.unpackbits(bits, bitorder="little")[: self.g.vocab_size].view(bool)

    def consume(self, token: int) -> bool:
        if not self.matcher.consume_token(token):
            return False
        text = self.g.texts[token]
        if self.span is None:
            self.in_string, self.escaped = _lex(self.in_string, self.escaped, text)
            return True
        opening, closing = self.span
        for ch in text:
            if self.outside:
                self.tail = (self.tail + ch)[-len(opening):]
                if self.tail == opening:
                    self.outside, self.tail, self.in_string, self.escaped = False, "", False, False
                continue
            self.in_string, self.escaped = _lex(self.in_string, self.escaped, ch)
            self.tail = "" if self.in_string else (self.tail + ch)[-len(closing):]
            if self.tail == closing:
                self.outside, self.tail = True, ""
        return True

    def broken(self) -> str | None:
        """The parser's error, if it has failed (for instance a grammar too complex to go on)."""
        if self.matcher.is_error():
            return (self.matcher.get_error() or "the parser failed").strip().splitlines()[0]
        return None

    def closing_move(self, allowed: np.ndarray) -> int | None:
        """The next token on the shortest way out that this plan knows: deterministic, so it is followed
        exactly once taken."""
        g = self.g
        for i in g.stop_ids:
            if allowed[i]:
                return i
        ff = self.matcher.compute_ff_tokens()  # forced text (a required key, an enum value): canonical tokens
        if ff and 0 <= ff[0] < g.vocab_size and allowed[ff[0]]:
            return int(ff[0])
        groups = (g.quote,) if self.in_string else (g.brackets, g.commas, g.short)
        for group in groups:
            for i in group:
                if allowed[i]:
                    return i
        nz = np.flatnonzero(allowed)
        return int(nz[0]) if len(nz) else None

    def plan(self) -> list[int] | None:
        """The tokens that lead from here to a complete document, as few as this plan finds; None if it
        cannot get there. The closing moves find the text; it is then spelled in the fewest tokens."""
        s = self.copy()
        moves: list[int] = []
        while not s.matcher.is_accepting():
            if len(moves) == _MAX_PLAN:
                self.failure = None
                return None
            tok = s.closing_move(s.allowed())
            if tok is None or not s.consume(tok):
                self.failure = s.broken() or "no token can continue it"
                return None
            moves.append(tok)
        spelled = self.g.spell("".join(self.g.texts[t] for t in moves)) if len(moves) > 1 else None
        if spelled is not None and len(spelled) < len(moves):
            check = self.copy()
            if all(check.consume(t) for t in spelled) and check.matcher.is_accepting():
                return spelled
        return moves


class JsonConstraint:
    """Per-sequence grammar state, driven by the engine: ``mask`` before sampling, ``accept`` after it."""

    def __init__(self, grammars: JsonGrammars, grammar: Grammar) -> None:
        self.g, self.jump, self.repeat = grammars, grammar.jump, grammar.repeat
        self.state = _State(grammars, grammars._llg.LLMatcher(grammars.lltok, grammar.text, log_level=0),
                            span=grammar.span)
        self.closing = False
        self._remaining = 0
        self._next_check: int | None = None  # remaining budget at which to plan again (None: at once)
        self._verify = False  # check every sampled token against the plan
        self._plan: list[int] | None = None  # the way out from the current state, when known

    def mask(self, logits: torch.Tensor, remaining: int) -> torch.Tensor:
        """Logits with every token that would break the grammar (or the budget) set to -inf."""
        self._remaining = remaining
        allowed = self.state.allowed()
        if not self.closing and (self._verify or self._next_check is None or remaining <= self._next_check):
            plan = self._plan if self._plan is not None else self.state.plan()
            self._plan = None
            need = _MAX_PLAN if plan is None else len(plan)
            if need >= remaining - 1:  # one token is kept for the end of turn, when the budget has it
                self.closing, self._plan = True, plan
            else:
                # With spans, one may open at any token outside one (or after this one closes, when spans
                # repeat) and then needs `jump` more: check early enough for that.
                slack = remaining - need - (self.jump if self.state.outside or self.repeat else 0)
                self._verify = slack <= _WINDOW
                self._next_check = remaining - max(1, (slack - _WINDOW) // 2)
        if self.closing:
            tok = self._next_move(allowed)
            if tok is not None:
                out = torch.full_like(logits, float("-inf"))
                out[tok] = 0.0
                return out
        if not allowed.any():
            raise StructuredOutputError("the JSON output cannot be completed: "
                                        f"{self.state.broken() or 'no token can continue it'}")
        keep = torch.from_numpy(allowed.copy()).to(logits.device)
        if keep.shape[0] < logits.shape[0]:
            keep = torch.cat([keep, keep.new_zeros(logits.shape[0] - keep.shape[0])])
        return logits.masked_fill(~keep, float("-inf"))

    @property
    def complete(self) -> bool:
        """The output so far is a whole document (so a sequence that ends here has finished, not been cut)."""
        return bool(self.state.matcher.is_accepting())

    def _next_move(self, allowed: np.ndarray) -> int | None:
        """While closing: the plan's next token (an end-of-turn token once the document is complete)."""
        if self._plan:
            return self._plan[0]
        return self.state.closing_move(allowed)

    def accept(self, token: int) -> int:
        """Take the sampled token; returns the token actually taken, which near the end of the budget is
        the plan's move instead when the sampled one would leave too little room to finish."""
        if token in self.g.stop_ids:  # allowed only once the document is complete
            return token
        if self._verify and not self.closing:
            trial = self.state.copy()
            plan = trial.plan() if trial.consume(token) else None
            if plan is None or len(plan) > self._remaining - 2:
                self.closing, self._plan = True, self.state.plan()
                move = self._next_move(self.state.allowed())
                token = token if move is None else move
            else:
                self.state, self._plan = trial, plan
                return token
        if self.closing and self._plan and self._plan[0] == token:
            self._plan.pop(0)
        if not self.state.consume(token):
            raise StructuredOutputError("the JSON output cannot be completed: "
                                        f"{self.state.broken() or f'token {token} does not continue it'}")
        return token
