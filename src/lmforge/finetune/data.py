"""Instruction and preference data: reading, format detection, chat rendering and assistant-only labels.

A conversation is a list of ``{"role", "content"}`` messages with roles system/user/assistant. It is
rendered with the model's chat template (ChatML when it has none) and tokenized segment by segment:
rendering the conversation up to each assistant turn, with and without the generation prompt, tells
exactly which characters that turn's reply occupies. Each segment is encoded on its own, so the prompt
tokens are exactly what the model sees at inference (``encode(render(..., add_generation_prompt=True))``)
and the label tokens are exactly the reply it should produce, end-of-turn token included.
"""

from __future__ import annotations

import gzip
import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import LMForgeError
from ..tokenizer import END_OF_TURN_TOKENS, Tokenizer

IGNORE = -100
FORMATS = ("alpaca", "chatml", "sharegpt")
Messages = list[dict[str, str]]

# ShareGPT speaker names -> roles.
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "chatgpt": "assistant", "bard": "assistant", "bing": "assistant", "model": "assistant",
                   "system": "system"}
_ROLES = {"system", "user", "assistant", "tool"}


# -- reading ------------------------------------------------------------------------------------------
def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Records of a JSON array file or a JSONL file (either may be gzipped)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise LMForgeError(f"no such file: {path}")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise LMForgeError(f"{path}: cannot read ({e})") from None
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise LMForgeError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None
    else:
        records = []
        for n, line in enumerate(text.split("\n"), 1):  # (not splitlines: JSON strings may hold U+2028)
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise LMForgeError(f"{path}:{n}: invalid JSON ({e.msg})") from None
    if not records:
        raise LMForgeError(f"{path}: no examples")
    for n, rec in enumerate(records, 1):
        if not isinstance(rec, dict):
            raise LMForgeError(f"{path}: example {n} is not a JSON object")
    return records


def detect_format(records: Sequence[dict[str, Any]], source: str = "data") -> str:
    """alpaca (instruction/output), chatml (messages) or sharegpt (conversations), from the first record."""
    rec = records[0]
    if isinstance(rec.get("messages"), list):
        return "chatml"
    if isinstance(rec.get("conversations"), list):
        return "sharegpt"
    if "instruction" in rec and "output" in rec:
        return "alpaca"
    raise LMForgeError(f"{source}: unrecognised format: expected fields instruction+output (alpaca), messages "
                       f"(chatml) or conversations (sharegpt); found {', '.join(map(str, rec)) or 'none'}")


class Conversation(list):
    """A conversation's messages, with the tools (OpenAI definitions) its record offers, if any."""

    tools: list[dict[str, Any]] | None = None


def _message(m: Any, where: str) -> dict[str, Any]:
    # An assistant message that only calls tools may leave out its content, as OpenAI's do.
    if not isinstance(m, dict) or "role" not in m or ("content" not in m and not m.get("tool_calls")):
        raise LMForgeError(f"{where}: each message needs role and content")
    role = str(m["role"])
    if role not in _ROLES:
        raise LMForgeError(f"{where}: unknown role {role!r} (expected {', '.join(sorted(_ROLES))})")
    out = {"role": role, "content": "" if m.get("content") is None else str(m["content"])}
    return out | {k: m[k] for k in ("tool_calls", "tool_call_id", "name") if m.get(k)}


def to_messages(rec: dict[str, Any], fmt: str, where: str = "example") -> Messages:
    """One record as a conversation in the chat roles."""
    if fmt == "alpaca":
        for key in ("instruction", "output"):
            if key not in rec:
                raise LMForgeError(f"{where}: no field {key!r} (fields: {', '.join(map(str, rec))})")
        user = str(rec["instruction"]).strip()
        if str(rec.get("input") or "").strip():
            user += "\n\n" + str(rec["input"]).strip()
        msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": str(rec["output"])}]
        if rec.get("system"):
            msgs.insert(0, {"role": "system", "content": str(rec["system"])})
        return msgs
    if fmt == "chatml":
        if not isinstance(rec.get("messages"), list):
            raise LMForgeError(f"{where}: no 'messages' list (fields: {', '.join(map(str, rec))})")
        conv = Conversation(_message(m, where) for m in rec["messages"])
        if rec.get("tools") is not None:
            if not isinstance(rec["tools"], list):
                raise LMForgeError(f"{where}: 'tools' must be a list of OpenAI tool definitions")
            conv.tools = rec["tools"]
        return conv
    if fmt == "sharegpt":
        if not isinstance(rec.get("conversations"), list):
            raise LMForgeError(f"{where}: no 'conversations' list (fields: {', '.join(map(str, rec))})")
        out = []
        for m in rec["conversations"]:
            if not isinstance(m, dict) or "from" not in m or "value" not in m:
                raise LMForgeError(f"{where}: each ShareGPT turn needs from and value")
            role = _SHAREGPT_ROLES.get(str(m["from"]).lower())
            if role is None:
                raise LMForgeError(f"{where}: unknown ShareGPT speaker {m['from']!r} "
                                   f"(expected {', '.join(sorted(_SHAREGPT_ROLES))})")
            out.append({"role": role, "content": str(m["value"])})
        return out
    raise LMForgeError(f"unknown format {fmt!r} (expected auto, {', '.join(FORMATS)})")


def load_conversations(path: str | Path, fmt: str = "auto") -> list[Messages]:
    records = read_records(path)
    if fmt == "auto":
        fmt = detect_format(records, str(path))
    elif fmt not in FORMATS:
        raise LMForgeError(f"unknown format {fmt!r} (expected auto, {', '.join(FORMATS)})")
    return [to_messages(r, fmt, f"{path}: example {n}") for n, r in enumerate(records, 1)]


# -- rendering and labels ------------------------------------------------------------------------------
@dataclass
class Example:
    ids: list[int]
    labels: list[int]  # the token itself where the model is trained to produce it, IGNORE elsewhere
    prompt: Messages = field(default_factory=list)  # the conversation before the last reply (for samples)

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class DataStats:
    examples: int = 0
    kept: int = 0
    truncated: int = 0
    skipped_overlong: int = 0
    skipped_invalid: int = 0  # no reply to learn, or (preferences) no usable chosen/rejected split

    def summary(self) -> str:
        return (f"{self.kept} of {self.examples} examples kept ({self.truncated} truncated, "
                f"{self.skipped_overlong} skipped as too long, {self.skipped_invalid} without a usable reply)")


def _end_tokens(tok: Tokenizer) -> list[str]:
    return [t for t in {tok.eos_token, *END_OF_TURN_TOKENS} if t and tok.token_to_id(t) is not None]


def _trim_reply(span: str, ends: list[str]) -> tuple[str, str]:
    """Split a rendered reply into (reply through its end-of-turn token, trailing whitespace the template
    writes between turns): the model should learn to stop, not to emit the separator."""
    cut = max((span.rfind(e) + len(e) for e in ends if e in span), default=-1)
    if cut > 0 and not span[cut:].strip():
        return span[:cut], span[cut:]
    return span, ""


def _render_prompt(tok: Tokenizer, messages: Messages, tools: Any = None) -> str:
    """The rendering that precedes a reply. With no messages at all some templates still write a preamble
    (a default system prompt); others cannot render an empty conversation, which then has none."""
    if messages:
        return tok.apply_chat_template(messages, add_generation_prompt=True, tools=tools)
    try:
        return tok.apply_chat_template([], add_generation_prompt=True, tools=tools)
    except (LMForgeError, IndexError, KeyError, TypeError):
        return ""


def render_segments(tok: Tokenizer, messages: Messages, train_from: int = 0,
                    tools: list[dict[str, Any]] | None = None) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, trained) segments that concatenate to the full rendering.

    An assistant message at index >= train_from is trained; its text is the difference between the
    rendering through it and the rendering before it with the generation prompt. ``tools`` are passed to
    the template (for conversations with tool calls, see `tool_rendering`).
    """
    full = tok.apply_chat_template(messages, add_generation_prompt=False, tools=tools)
    ends = _end_tokens(tok)
    segments: list[tuple[str, bool]] = []
    pos = 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or i < train_from:
            continue
        before = _render_prompt(tok, messages[:i], tools)
        through = tok.apply_chat_template(messages[:i + 1], add_generation_prompt=False, tools=tools)
        if not (full.startswith(through) and through.startswith(before)) or len(before) < pos:
            raise LMForgeError("the chat template does not render conversations incrementally (a prefix of the "
                               "conversation renders differently inside the whole), so replies cannot be located")
        reply, _ = _trim_reply(through[len(before):], ends)
        segments += [(full[pos:len(before)], False), (reply, True)]
        pos = len(before) + len(reply)
    segments.append((full[pos:], False))
    return [(text, trained) for text, trained in segments if text]


def tool_rendering(tok: Tokenizer, messages: Messages, tools: list[dict[str, Any]] | None
                   ) -> tuple[Messages, list[dict[str, Any]] | None]:
    """A conversation with tools offered, assistant ``tool_calls`` or ``tool`` messages as its chat template
    is given it: the same rendering prompts and tools inside generation use (`lmforge.tools.calling.render`:
    the template's own when it renders tools, else the built-in Hermes/Qwen format, where tool results are
    user turns and so never trained)."""
    from ..tools.calling import render, template_renders_tools

    if not tools and not any(m["role"] == "tool" or m.get("tool_calls") for m in messages):
        return messages, None
    return render(messages, tools or [], template_renders_tools(tok.chat_template))


def encode_conversation(tok: Tokenizer, messages: Messages, train_from: int = 0) -> Example:
    """Token ids and assistant-only labels for a conversation (tool results and everything else not written
    by the assistant carry no labels)."""
    ids: list[int] = []
    labels: list[int] = []
    if train_from == 0:  # (preference data, which sets train_from, has no tool turns)
        messages, tools = tool_rendering(tok, messages, getattr(messages, "tools", None))
    else:
        tools = None
    for text, trained in render_segments(tok, messages, train_from, tools):
        piece = tok.encode(text, add_special_tokens=False)
        ids += piece
        labels += piece if trained else [IGNORE] * len(piece)
    # The prompt for samples: as rendered, so tool turns are in the plain roles the template takes.
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=len(messages))
    return Example(ids, labels, list(messages[:last]))


def fit_length(ex: Example, max_length: int, overlong: str, stats: DataStats) -> Example | None:
    """Apply the length policy: truncate (keeping the start) or skip; None when the example is dropped."""
    if len(ex) <= max_length:
        return ex
    if overlong == "skip":
        stats.skipped_overlong += 1
        return None
    ex = Example(ex.ids[:max_length], ex.labels[:max_length], ex.prompt)
    if all(label == IGNORE for label in ex.labels[1:]):  # nothing left to learn after truncation
        stats.skipped_overlong += 1
        return None
    stats.truncated += 1
    return ex


def build_sft_examples(tok: Tokenizer, conversations: Sequence[Messages], max_length: int,
                       overlong: str = "truncate") -> tuple[list[Example], DataStats]:
    if overlong not in ("truncate", "skip"):
        raise LMForgeError(f"overlong must be truncate or skip, got {overlong!r}")
    stats = DataStats(examples=len(conversations))
    out = []
    for msgs in conversations:
        if not any(m["role"] == "assistant" and (m["content"] or m.get("tool_calls")) for m in msgs):
            stats.skipped_invalid += 1
            continue
        ex = fit_length(encode_conversation(tok, msgs), max_length, overlong, stats)
        if ex is not None:
            out.append(ex)
    stats.kept = len(out)
    return out, stats


# -- preferences ---------------------------------------------------------------------------------------
@dataclass
class PreferencePair:
    prompt: Messages
    chosen: Messages  # the preferred reply (assistant messages after the prompt)
    rejected: Messages


_HH_TURN = re.compile(r"\n\n(Human|Assistant): ?")


def parse_hh(transcript: str) -> Messages:
    """An HH-RLHF transcript ("\\n\\nHuman: ...\\n\\nAssistant: ...") as messages."""
    parts = _HH_TURN.split(transcript)
    if len(parts) < 3 or parts[0].strip():
        raise LMForgeError("not an HH-RLHF transcript (expected '\\n\\nHuman: ...\\n\\nAssistant: ...')")
    return [{"role": "user" if who == "Human" else "assistant", "content": text.strip()}
            for who, text in zip(parts[1::2], parts[2::2])]


def _as_messages(value: Any, role: str, where: str) -> Messages:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list):
        return [_message(m, where) for m in value]
    raise LMForgeError(f"{where}: expected a string or a list of messages, got {type(value).__name__}")


def _split_shared(chosen: Messages, rejected: Messages) -> PreferencePair | None:
    """Two whole conversations -> shared prompt + differing replies (None if they do not diverge at a reply)."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    rest_c, rest_r = chosen[n:], rejected[n:]
    if n == 0 or not rest_c or not rest_r or rest_c[0]["role"] != "assistant" or rest_r[0]["role"] != "assistant":
        return None  # identical, or diverging somewhere other than a reply to a shared prompt
    return PreferencePair(chosen[:n], rest_c, rest_r)


def to_pair(rec: dict[str, Any], where: str) -> PreferencePair | None:
    """{prompt, chosen, rejected} (strings or message lists), or {chosen, rejected} whole conversations
    (HH-RLHF transcripts or message lists) split at their shared prompt."""
    if "chosen" not in rec or "rejected" not in rec:
        raise LMForgeError(f"{where}: preference data needs chosen and rejected (and optionally prompt); "
                           f"found {', '.join(map(str, rec)) or 'none'}")
    if "prompt" in rec:
        prompt = _as_messages(rec["prompt"], "user", where)
        chosen = _as_messages(rec["chosen"], "assistant", where)
        rejected = _as_messages(rec["rejected"], "assistant", where)
        if chosen[: len(prompt)] == prompt and rejected[: len(prompt)] == prompt and len(chosen) > len(prompt):
            chosen, rejected = chosen[len(prompt):], rejected[len(prompt):]  # replies given with their prompt
        if not chosen or not rejected or chosen[0]["role"] != "assistant" or rejected[0]["role"] != "assistant":
            return None
        return PreferencePair(prompt, chosen, rejected)
    c, r = rec["chosen"], rec["rejected"]
    if isinstance(c, str) and isinstance(r, str):
        try:
            return _split_shared(parse_hh(c), parse_hh(r))
        except LMForgeError:
            raise LMForgeError(f"{where}: chosen/rejected strings without a prompt must be HH-RLHF transcripts "
                               "('\\n\\nHuman: ...\\n\\nAssistant: ...')") from None
    return _split_shared(_as_messages(c, "assistant", where), _as_messages(r, "assistant", where))


@dataclass
class PairExample:
    chosen: Example
    rejected: Example
    ref_chosen: float = 0.0  # DPO: the reference model's log-probability of each reply, computed once
    ref_rejected: float = 0.0


def build_pairs(tok: Tokenizer, path: str | Path, max_length: int, overlong: str = "truncate"
                ) -> tuple[list[PairExample], DataStats]:
    """Encode a preference file; only the replies after the shared prompt carry labels."""
    records = read_records(path)
    stats = DataStats(examples=len(records))
    out = []
    for n, rec in enumerate(records, 1):
        pair = to_pair(rec, f"{path}: example {n}")
        if pair is None:
            stats.skipped_invalid += 1
            continue
        k = len(pair.prompt)
        c = encode_conversation(tok, pair.prompt + pair.chosen, train_from=k)
        r = encode_conversation(tok, pair.prompt + pair.rejected, train_from=k)
        c.prompt = r.prompt = pair.prompt
        if max(len(c), len(r)) > max_length:
            if overlong == "skip":
                stats.skipped_overlong += 1
                continue
            c = Example(c.ids[:max_length], c.labels[:max_length], pair.prompt)
            r = Example(r.ids[:max_length], r.labels[:max_length], pair.prompt)
            if all(x == IGNORE for x in c.labels[1:]) or all(x == IGNORE for x in r.labels[1:]):
                stats.skipped_overlong += 1  # the prompt alone fills the window
                continue
            stats.truncated += 1
        out.append(PairExample(c, r))
    stats.kept = len(out)
    return out, stats


# -- batching ------------------------------------------------------------------------------------------
def split_val(items: list[Any], fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    """A seeded random validation split (at least one example when fraction > 0 and there are two or more)."""
    if not 0 <= fraction < 1:
        raise LMForgeError(f"val fraction must be in [0, 1), got {fraction}")
    n_val = int(round(fraction * len(items)))
    if fraction > 0 and len(items) >= 2:
        n_val = max(1, n_val)
    idx = list(range(len(items)))
    random.Random(seed).shuffle(idx)
    val = set(idx[:n_val])
    return [x for i, x in enumerate(items) if i not in val], [items[i] for i in sorted(val)]


