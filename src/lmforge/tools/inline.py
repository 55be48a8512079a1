"""Tools run inside generation: the per-sequence runner the engine calls when a call span closes
(`lmforge.engine.tooluse.ToolHook`), and the text it forces.

The forced text is what the chat template renders after the call: the rest of the assistant turn, a tool
turn holding the result, and the start of the next assistant turn. It is derived from the same rendering
(`calling.render`, so the built-in Hermes/Qwen fallback for templates without tools) that prompts and SFT
data go through, so generation and training see one format.
"""

from __future__ import annotations

import json
from typing import Any

from ..errors import LMForgeError
from ..tokenizer import Tokenizer
from .base import Tool, get_tool, to_openai
from .calling import MORE, call_end, render, template_renders_tools
from .grammar import CALL_CLOSE, CALL_OPEN

MAX_TOOL_CALLS = 8  # calls run per sequence; later ones get an error as their result


def resolve_tools(tools: list[Tool | str]) -> list[Tool]:
    """Tools given as Tool objects or registered names (`get_tool`)."""
    out = [t if isinstance(t, Tool) else get_tool(t) for t in tools]
    names = [t.name for t in out]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise LMForgeError(f"tool {dup!r} is given twice")
    return out


def result_text(tok: Tokenizer, tools: list[dict[str, Any]], name: str, arguments: Any, result: str) -> str:
    """The text the chat template writes after a call to ``name`` closes, through the start of the next
    assistant turn, with ``result`` as the tool turn's content. ``tools``: OpenAI definitions."""
    native = template_renders_tools(tok.chat_template)
    call = {"id": "call_0", "type": "function", "function": {"name": name, "arguments": arguments}}
    convo: list[dict[str, Any]] = [{"role": "user", "content": "?"},
                                   {"role": "assistant", "content": "", "tool_calls": [call]}]
    msgs, offered = render(convo, tools, native)
    upto = tok.apply_chat_template(msgs, add_generation_prompt=False, tools=offered)
    msgs, offered = render([*convo, {"role": "tool", "tool_call_id": "call_0", "content": result}], tools, native)
    after = tok.apply_chat_template(msgs, add_generation_prompt=True, tools=offered)
    cut = upto.rfind(CALL_CLOSE)
    if cut == -1 or not after.startswith(upto[:cut + len(CALL_CLOSE)]):
        raise LMForgeError("the chat template does not render a tool result after the call it answers, so "
                           "results cannot be forced into generation")
    return after[cut + len(CALL_CLOSE):]


class ToolRunner:
    """One sequence's tool runner (an engine ToolHook): parses the call the output just closed, runs it, and
    returns the template's text for its result and that text's tokens. A tool's failure (bad JSON, an unknown
    tool, bad arguments, an exception) is its result text, ``error: ...``, never a failure of the sequence.
    ``calls`` records each call: its id, name, arguments (JSON text) and result."""

    close = CALL_CLOSE

    def __init__(self, tools: list[Tool], tok: Tokenizer, max_calls: int = MAX_TOOL_CALLS) -> None:
        if max_calls < 0:
            raise LMForgeError(f"max_tool_calls must be >= 0, got {max_calls}")
        self.tools, self.tok, self.max_calls = {t.name: t for t in tools}, tok, max_calls
        self.definitions = [to_openai(t) for t in tools]
        self.calls: list[dict[str, Any]] = []

    def run(self, body: str) -> tuple[str, Any, str]:
        """(name, arguments, result text) for one call's JSON body."""
        try:
            obj = json.loads(body)
        except ValueError as e:
            return "", {}, f"error: the call is not valid JSON ({e})"
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return "", {}, "error: a call is a JSON object with a name and arguments"
        name, args = obj["name"], obj.get("arguments", {})
        if len(self.calls) >= self.max_calls:
            return name, args, f"error: no more tool calls (at most {self.max_calls} per answer)"
        if name not in self.tools:
            return name, args, f"error: unknown tool {name!r} (available: {', '.join(sorted(self.tools))})"
        try:
            return name, args, self.tools[name].call(args)
        except Exception as e:  # noqa: BLE001 - whatever a tool raises is its result, as a chat loop would show it
            return name, args, f"error: {e}"

    @staticmethod
    def _call_at_end(output: str) -> tuple[int, int] | None:
        """(start, body end) of the call block that ``output`` ends with. A close tag inside a call's JSON
        (say, in a string argument) does not end it, and an open tag there does not start one."""
        start = output.find(CALL_OPEN)
        while start != -1:
            span = call_end(output, start, final=False)
            if span == MORE or span is None:
                return None
            if span[1] == len(output):  # type: ignore[index]
                return start, span[0]  # type: ignore[index]
            start = output.find(CALL_OPEN, span[1])  # type: ignore[index]
        return None

    def closed(self, output: str) -> bool:
        # A close tag with no call before it is answered too (`respond` reports it as a bad call).
        return CALL_OPEN not in output or self._call_at_end(output) is not None

    def respond(self, output: str) -> tuple[str, list[int]]:
        found = self._call_at_end(output)
        body = output[found[0] + len(CALL_OPEN):found[1]] if found is not None else ""
        name, args, result = self.run(body)
        self.calls.append({"id": f"call_{len(self.calls)}", "name": name,
                           "arguments": json.dumps(args, ensure_ascii=False), "result": result})
        text = result_text(self.tok, self.definitions, name or "unknown", args if isinstance(args, dict) else {},
                           result)
        return text, self.tok.encode(text, add_special_tokens=False)


def tool_messages(text: str, forced_chars: list[tuple[int, int]], calls: list[dict[str, Any]]
                  ) -> list[dict[str, Any]]:
    """A generated text with forced results as OpenAI messages: per call, the assistant message that made
    it (content before the call, and the call) and the tool message with its result; then the final
    assistant message."""
    out: list[dict[str, Any]] = []
    at = 0
    for (lo, hi), call in zip(forced_chars, calls):
        before = text[at:lo]
        content = before[:before.rfind(CALL_OPEN)].strip() if CALL_OPEN in before else before.strip()
        out.append({"role": "assistant", "content": content or None,
                    "tool_calls": [{"id": call["id"], "type": "function",
                                    "function": {"name": call["name"], "arguments": call["arguments"]}}]})
        out.append({"role": "tool", "tool_call_id": call["id"], "content": call["result"]})
        at = hi
    out.append({"role": "assistant", "content": text[at:]})
    return out
