"""GSM8K's calculator annotations as tool-call conversations, for SFT with tools.

A GSM8K solution marks each calculation as ``48/2 = <<48/2=24>>24``. Each annotation becomes a call to the
`calculator` tool: the assistant writes its text up to the annotation and calls
``calculator({"expression": "48/2"})``, a tool message holds what the calculator returns, and the next
assistant message continues with the text after the annotation (``24 clips in May. ...``), through the
final ``#### 72``. An annotation the calculator cannot evaluate, or whose value it computes differently
(GSM8K has a few wrong ones), is left as the plain text around it (``48/2 = 24``). Each record offers the calculator
(``tools``), so training renders the same system turn as a prompt that offers it.
"""

from __future__ import annotations

import json
import re
from fractions import Fraction
from pathlib import Path
from typing import Any

from ..errors import LMForgeError
from ..fsutil import atomic_file
from ..tools import ToolError, calculator_tool, to_openai
from .data import read_records

_ANNOTATION = re.compile(r"<<([^<>=]*)=([^<>]*)>>")


def _value(text: str) -> Fraction | None:
    """The number a calculator result or an annotation's result stands for (``1/5 ≈ 0.2`` -> 1/5)."""
    text = text.split("≈")[0].strip().replace(",", "")
    try:
        return Fraction(text)
    except (ValueError, ZeroDivisionError):
        return None


def gsm8k_conversation(question: str, answer: str, calculator: Any = None) -> tuple[dict[str, Any], int, int]:
    """One GSM8K item as a chat record with calculator calls: (record, annotations called, kept as text)."""
    calculator = calculator or calculator_tool()
    messages: list[dict[str, Any]] = [{"role": "user", "content": question.strip()}]
    text, at, called, kept = "", 0, 0, 0
    for m in _ANNOTATION.finditer(answer):
        text += answer[at:m.start()]
        at = m.end()
        expr, claimed = m.group(1).strip(), m.group(2).strip()
        try:
            result = calculator.call({"expression": expr})
        except ToolError:
            result = None
        if result is None or _value(result) is None or _value(result) != _value(claimed):
            kept += 1  # the markup goes; the text around it already states the result
            continue
        call_id = f"call_{called}"
        messages.append({"role": "assistant", "content": text.rstrip(),
                         "tool_calls": [{"id": call_id, "type": "function",
                                         "function": {"name": calculator.name,
                                                      "arguments": json.dumps({"expression": expr})}}]})
        messages.append({"role": "tool", "tool_call_id": call_id, "content": result})
        text, called = "", called + 1
    messages.append({"role": "assistant", "content": (text + answer[at:]).lstrip(" ")})
    return {"messages": messages, "tools": [to_openai(calculator)]}, called, kept


def convert_gsm8k(source: str | Path, out: str | Path, limit: int | None = None) -> dict[str, int]:
    """Write GSM8K ``{question, answer}`` records from ``source`` as tool-call conversations (JSONL) to ``out``,
    atomically; returns counts (examples, calls, annotations kept as text)."""
    records = read_records(source)[:limit]
    calculator = calculator_tool()
    stats = {"examples": 0, "calls": 0, "kept_as_text": 0}
    with atomic_file(out) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for n, rec in enumerate(records, 1):
            if not isinstance(rec.get("question"), str) or not isinstance(rec.get("answer"), str):
                raise LMForgeError(f"{source}: example {n} needs question and answer strings (GSM8K's format)")
            conv, called, kept = gsm8k_conversation(rec["question"], rec["answer"], calculator)
            f.write(json.dumps(conv, ensure_ascii=False) + "\n")
            stats["examples"] += 1
            stats["calls"] += called
            stats["kept_as_text"] += kept
    return stats
