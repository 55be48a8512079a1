"""Grammars that make tool calls valid by construction (llguidance's Lark syntax, compiled by
`lmforge.engine.structured`).

A call is written as ``<tool_call>\\n{"name": NAME, "arguments": ARGS}\\n</tool_call>``, where NAME is one of
the offered functions and ARGS validates against that function's parameter schema (``%json`` embeds the
schema). Three shapes, by ``tool_choice``:

- ``required`` / a named function: the output is one call (or, with parallel calls, one or more) and
  nothing else;
- ``auto``: free text, in which ``<tool_call>`` is a lazy trigger: once the model writes it, the rest of that
  call is constrained (as llama.cpp's lazy grammars do); the free text can never hold an unfinished call.
"""

from __future__ import annotations

import json
from typing import Any

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
SPAN = (CALL_OPEN, CALL_CLOSE)
# The same separators and whitespace as structured output, so calls render the same everywhere.
_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def _call_schema(function: dict[str, Any]) -> dict[str, Any]:
    """The JSON object of one call: the name as a constant and the arguments per the function's schema."""
    params = function.get("parameters") or {"type": "object", "properties": {}}
    return {"type": "object", "properties": {"name": {"const": function["name"]}, "arguments": params},
            "required": ["name", "arguments"], "additionalProperties": False, "x-guidance": _JSON_OPTIONS}


def call_grammar(functions: list[dict[str, Any]], mode: str, parallel: bool) -> str:
    """The Lark grammar for calls to `functions` (OpenAI ``function`` objects): ``mode`` is ``"auto"`` or
    ``"required"`` (a named function is ``"required"`` over that function alone)."""
    lines = ["%llguidance {}"]
    bodies = []
    for i, fn in enumerate(functions):
        lines.append(f"fn_{i}: %json {json.dumps(_call_schema(fn), ensure_ascii=False)}")
        bodies.append(f"fn_{i}")
    lines.append(f"body: {' | '.join(bodies)}")
    close = json.dumps("\n" + CALL_CLOSE)
    if mode == "required":
        lines.append(f"call: {json.dumps(CALL_OPEN + chr(10))} body {close}")
        lines.append('start: call ("\\n" call)*' if parallel else "start: call")
    else:
        # Free text holds no call opening (an opening always starts a constrained call).
        lines.append(f"TEXT: /(.|\\n)*/ & ~/(.|\\n)*{CALL_OPEN}(.|\\n)*/")
        lines.append(f"open[lazy]: TEXT {json.dumps(CALL_OPEN)}")
        lines.append(f'call: open "\\n" body {close}')
        lines.append("start: call* TEXT" if parallel else "start: call? TEXT")
    return "\n".join(lines) + "\n"
