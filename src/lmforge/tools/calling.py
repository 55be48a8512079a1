"""Function calling as OpenAI's API defines it: the request's tools checked, rendered into the prompt, and
the model's output parsed back into OpenAI tool calls (whole, or as streamed deltas).

Rendering: a chat template that uses the ``tools`` variable renders them itself (as in transformers), given
assistant ``tool_calls`` with their arguments as objects. A template without tool support gets the built-in
fallback, in the Hermes/Qwen style (`FALLBACK_INSTRUCTIONS`): the function signatures as JSON inside
``<tools></tools>`` in the system turn, each call as ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``
in the assistant turn, and tool results in ``<tool_response>`` blocks in a user turn.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from ..errors import LMForgeError
from .grammar import CALL_CLOSE, CALL_OPEN

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names
_DECODER = json.JSONDecoder()
MORE = "more"  # `call_end`: the text may still become a call; wait for more of it


def call_end(text: str, start: int, final: bool = True) -> tuple[int, int] | str | None:
    """Where the ``<tool_call>`` block opening at ``start`` ends: (end of its body, end of the block), or
    None if it is not closed. The body is a JSON value, and a close tag inside one of its strings is part of
    the string (a constrained call may write one there), so a body that parses ends the block at the close
    tag that follows it. Otherwise the block runs to the first close tag, as written. Unless ``final``, a
    block that may still close later (an unfinished body or close tag) gives `MORE`."""
    body = start + len(CALL_OPEN)
    first = text.find(CALL_CLOSE, body)
    at = len(text) - len(text[body:].lstrip())
    try:
        _, stop = _DECODER.raw_decode(text, at)
    except json.JSONDecodeError as e:
        # An open string or a body cut off at the end may still be completed by what follows.
        if not final and (e.msg.startswith("Unterminated string") or e.pos >= len(text)):
            return MORE
    else:
        tail = len(text) - len(text[stop:].lstrip())
        if text.startswith(CALL_CLOSE, tail):
            return stop, tail + len(CALL_CLOSE)
        if not final and CALL_CLOSE.startswith(text[tail:]):
            return MORE
    return (first, first + len(CALL_CLOSE)) if first != -1 else None
_TOOLS_VARIABLE = re.compile(r"\btools\b")

FALLBACK_INSTRUCTIONS = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n{{\"name\": <function-name>, \"arguments\": "
    "<args-json-object>}}\n</tool_call>"
)


class ToolCallError(LMForgeError):
    """A malformed tools request; ``param`` names the field."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class ToolChoice:
    """What a request offers and asks: ``tools`` (OpenAI tool objects, checked), ``mode`` (``auto``, ``none``
    or ``required``; a named function is ``required`` with ``functions`` narrowed to it) and ``parallel``."""

    tools: list[dict[str, Any]]
    mode: str
    parallel: bool = True
    named: str | None = None

    @property
    def functions(self) -> list[dict[str, Any]]:
        """The functions a call may name (the named one alone, when tool_choice names one)."""
        fns = [t["function"] for t in self.tools]
        return [f for f in fns if f["name"] == self.named] if self.named else fns

    @property
    def constrained(self) -> bool:
        """Whether the output is parsed (and constrained) for calls."""
        return self.mode != "none" and bool(self.tools)


def check_tools(tools: list[Any] | None, tool_choice: Any = None, parallel_tool_calls: bool | None = None
                ) -> ToolChoice:
    """Check a request's ``tools``, ``tool_choice`` and ``parallel_tool_calls``; a ToolCallError names the
    malformed field."""
    checked, names = [], set()
    for i, tool in enumerate(tools or []):
        where = f"tools.{i}"
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise ToolCallError(f"{where} must be an object with type \"function\"", f"{where}.type")
        fn = tool.get("function")
        if not isinstance(fn, dict):
            raise ToolCallError(f"{where}.function must be an object", f"{where}.function")
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise ToolCallError(f"{where}.function.name must be 1-64 letters, digits, _ or -, got {name!r}",
                                f"{where}.function.name")
        if name in names:
            raise ToolCallError(f"{where}.function.name: {name!r} is offered twice", f"{where}.function.name")
        names.add(name)
        params = fn.get("parameters")
        if params is not None and (not isinstance(params, dict) or params.get("type", "object") != "object"):
            raise ToolCallError(f"{where}.function.parameters must be a JSON schema of type \"object\"",
                                f"{where}.function.parameters")
        desc = fn.get("description")
        if desc is not None and not isinstance(desc, str):
            raise ToolCallError(f"{where}.function.description must be a string", f"{where}.function.description")
        checked.append({"type": "function", "function": {k: v for k, v in fn.items() if v is not None}})
    parallel = True if parallel_tool_calls is None else bool(parallel_tool_calls)
    if tool_choice is None:
        return ToolChoice(checked, "auto" if checked else "none", parallel)
    if isinstance(tool_choice, str):
        if tool_choice not in ("auto", "none", "required"):
            raise ToolCallError(f"tool_choice must be \"auto\", \"none\", \"required\" or a function, got "
                                f"{tool_choice!r}", "tool_choice")
        if tool_choice == "required" and not checked:
            raise ToolCallError("tool_choice \"required\" needs tools", "tool_choice")
        return ToolChoice(checked, tool_choice, parallel)
    fn = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if tool_choice.get("type", "function") != "function" or not isinstance(name, str):
        raise ToolCallError("tool_choice must name a function as {\"type\": \"function\", \"function\": "
                            "{\"name\": ...}}", "tool_choice")
    if name not in names:
        raise ToolCallError(f"tool_choice names the function {name!r}, which is not among the tools "
                            f"({', '.join(sorted(names)) or 'none given'})", "tool_choice")
    return ToolChoice(checked, "required", parallel=False, named=name)


def template_renders_tools(template: str | None) -> bool:
    """Whether a chat template renders tools itself (it reads the ``tools`` variable)."""
    return bool(template) and bool(_TOOLS_VARIABLE.search(template or ""))


def _arguments(raw: Any, param: str) -> Any:
    if isinstance(raw, str):
        try:
            return json.loads(raw) if raw.strip() else {}
        except ValueError:
            raise ToolCallError(f"{param} must be a JSON string", param) from None
    return raw if raw is not None else {}


def check_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages with tool calls and tool results checked; each call's arguments parsed into an object (as
    chat templates expect them)."""
    out = []
    for i, m in enumerate(messages):
        m = dict(m)
        if m.get("role") == "tool" and not m.get("tool_call_id"):
            raise ToolCallError(f"messages.{i}: a tool message needs tool_call_id", f"messages.{i}.tool_call_id")
        if m.get("tool_calls"):
            calls = []
            for j, call in enumerate(m["tool_calls"]):
                where = f"messages.{i}.tool_calls.{j}"
                fn = call.get("function") if isinstance(call, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                    raise ToolCallError(f"{where}.function.name is missing", f"{where}.function.name")
                calls.append({"id": call.get("id"), "type": "function",
                              "function": {"name": fn["name"],
                                           "arguments": _arguments(fn.get("arguments"), f"{where}.function.arguments")}})
            m["tool_calls"] = calls
        out.append(m)
    return out


def call_text(name: str, arguments: Any) -> str:
    """One call as the fallback format writes it (and as the call grammar constrains it)."""
    body = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
    return f"{CALL_OPEN}\n{body}\n{CALL_CLOSE}"


def fallback_messages(messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Checked messages (`check_messages`) in the built-in Hermes/Qwen format, for a template without tools:
    plain system, user and assistant turns."""
    out: list[dict[str, Any]] = []
    if tools:
        block = FALLBACK_INSTRUCTIONS.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))
        if messages and messages[0].get("role") == "system":
            messages = [{**messages[0], "content": f"{messages[0].get('content') or ''}\n\n{block}".lstrip()},
                        *messages[1:]]
        else:
            messages = [{"role": "system", "content": block}, *messages]
    for m in messages:
        role, content = m.get("role"), m.get("content") or ""
        if role == "tool":
            response = f"<tool_response>\n{content}\n</tool_response>"
            if out and out[-1].get("role") == "user" and out[-1].get("_tool_results"):
                out[-1]["content"] += "\n" + response  # consecutive results share one user turn
            else:
                out.append({"role": "user", "content": response, "_tool_results": True})
            continue
        if role == "assistant" and m.get("tool_calls"):
            calls = "\n".join(call_text(c["function"]["name"], c["function"]["arguments"]) for c in m["tool_calls"])
            content = f"{content}\n{calls}" if content else calls
        out.append({k: v for k, v in m.items() if k not in ("tool_calls", "tool_call_id")} | {"content": content})
    return [{k: v for k, v in m.items() if k != "_tool_results"} for m in out]


def render(messages: list[dict[str, Any]], tools: list[dict[str, Any]], native: bool
           ) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """The messages and tools to give a chat template: as they are when it renders tools (``native``), else
    in the built-in format (no tools variable then)."""
    msgs = check_messages(messages)
    if not native and (tools or any(m.get("role") == "tool" or m.get("tool_calls") for m in msgs)):
        return fallback_messages(msgs, tools), None
    return msgs, tools or None


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _parse_call(block: str, names: set[str] | None) -> dict[str, Any] | None:
    """The OpenAI tool call a ``<tool_call>`` block's body stands for, or None if it is not one."""
    try:
        obj = json.loads(block)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if not isinstance(args, dict) or (names is not None and obj["name"] not in names):
        return None
    return {"id": new_call_id(), "type": "function",
            "function": {"name": obj["name"], "arguments": json.dumps(args, ensure_ascii=False)}}


def parse_calls(text: str, names: set[str] | None = None) -> tuple[str | None, list[dict[str, Any]]]:
    """The content (text outside the calls; None when only calls) and the OpenAI tool calls in an output.
    A block that is not a call to one of ``names`` stays in the content, as written."""
    calls, pieces, at, start = [], [], 0, text.find(CALL_OPEN)
    while start != -1:
        span = call_end(text, start)
        if span is None:
            break
        body, end = span  # type: ignore[misc]
        call = _parse_call(text[start + len(CALL_OPEN):body], names)
        if call is not None:
            pieces.append(text[at:start])
            calls.append(call)
            at = end
        start = text.find(CALL_OPEN, end if call is not None else start + len(CALL_OPEN))
    pieces.append(text[at:])
    content = "".join(pieces)
    if calls:
        content = content.strip()
    return (content or None) if calls else content, calls


def assistant_message(text: str, choice: ToolChoice) -> dict[str, Any]:
    """A whole output as OpenAI's assistant message: content, and tool_calls when the model called."""
    if not choice.constrained:
        return {"role": "assistant", "content": text}
    content, calls = parse_calls(text, {f["name"] for f in choice.functions})
    return {"role": "assistant", "content": content} | ({"tool_calls": calls} if calls else {})


class CallStream:
    """Streamed output → OpenAI deltas: content as it comes (never call markup, nor text that may start it),
    and each call, once written, as a first delta (index, id, type, name, arguments "") and an arguments
    delta. Call markup that is not a valid call goes out as content, as `parse_calls` leaves it."""

    def __init__(self, names: set[str] | None = None) -> None:
        self.names, self.buf, self.calls, self.sent, self.held = names, "", 0, False, ""

    def _content(self, text: str) -> list[dict[str, Any]]:
        # Whitespace is held until text follows it, so that whitespace around calls is dropped as
        # `parse_calls` drops it.
        text = self.held + text
        body = text.rstrip()
        self.held = text[len(body):]
        if not self.sent and self.calls:
            body = body.lstrip()
        if not body:
            return []
        self.sent = True
        return [{"content": body}]

    def feed(self, text: str) -> list[dict[str, Any]]:
        self.buf += text
        out: list[dict[str, Any]] = []
        while True:
            start = self.buf.find(CALL_OPEN)
            if start == -1:
                keep = next((k for k in range(min(len(CALL_OPEN) - 1, len(self.buf)), 0, -1)
                             if self.buf.endswith(CALL_OPEN[:k])), 0)
                out += self._content(self.buf[:len(self.buf) - keep])
                self.buf = self.buf[len(self.buf) - keep:]
                return out
            span = call_end(self.buf, start, final=False)
            if span is None or span == MORE:
                out += self._content(self.buf[:start])
                self.buf = self.buf[start:]
                return out
            body, end = span  # type: ignore[misc]
            call = _parse_call(self.buf[start + len(CALL_OPEN):body], self.names)
            if call is None:
                out += self._content(self.buf[:end])
            else:
                out += self._content(self.buf[:start])
                if not self.sent:
                    self.held = ""
                fn = call["function"]
                out.append({"tool_calls": [{"index": self.calls, "id": call["id"], "type": "function",
                                            "function": {"name": fn["name"], "arguments": ""}}]})
                out.append({"tool_calls": [{"index": self.calls, "function": {"arguments": fn["arguments"]}}]})
                self.calls += 1
            self.buf = self.buf[end:]

    def close(self) -> list[dict[str, Any]]:
        """What is still held at the end: an unfinished call or a partial opening, as content."""
        rest, self.buf = self.buf, ""
        out = self._content(rest)
        if self.held and not self.calls:
            out.append({"content": self.held})
        self.held = ""
        return out
