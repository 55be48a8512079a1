"""Tools: the calculator's exact arithmetic and limits, functions as tools, the registry, the search tool."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Literal, Optional

import pytest
from tiny import make_tiny_bert_dir

from lmforge.tools import (
    Tool,
    ToolError,
    calculate,
    evaluate,
    from_openai,
    get_tool,
    to_openai,
    tool_from_function,
    tool_names,
)


@pytest.mark.parametrize("expr, want", [
    ("48/2", "24"), ("5*(3+2)", "25"), ("0.1 + 0.2", "3/10 ≈ 0.3"), ("1/3 + 1/6", "1/2 ≈ 0.5"),
    ("7 // 2", "3"), ("-7 % 3", "2"), ("2**100", str(2**100)), ("2**-2", "1/4 ≈ 0.25"), ("-(3 - 5) * +2", "4"),
    ("sqrt(16/9)", "4/3 ≈ 1.33333333333"), ("sqrt(2)", "1.41421356237"), ("abs(-3.5)", "7/2 ≈ 3.5"),
    ("round(2.675, 2)", "67/25 ≈ 2.68"), ("round(7/2)", "4"), ("min(3, 1.5, 2)", "3/2 ≈ 1.5"), ("max(4, 9)", "9"),
    ("floor(-2.5) + ceil(2.1)", "0"), ("1.5e3", "1500"), ("10 ** 0.5 * 10 ** 0.5", "10"), ("12_000 / 3", "4000"),
])
def test_calculator_is_exact(expr: str, want: str) -> None:
    assert calculate(expr) == want


def test_calculator_keeps_rationals_exact_where_floats_drift() -> None:
    total = evaluate(" + ".join(["0.1"] * 10))
    assert total == 1 and sum([0.1] * 10) != 1  # the float sum is 0.9999999999999999
    assert evaluate("(1/3) * 3") == 1


@pytest.mark.parametrize("expr, message", [
    ("1/0", "division by zero"), ("5 % 0", "division by zero"), ("0 ** -1", "division by zero"),
    ("2 ** 100000", "beyond the limit"), ("99 ** 9999", "more than 1000 digits"),
    ("10**999 * 10**999", "more than 1000 digits"), ("(-8) ** (1/3)", "not a real number"),
    ("2 ^ 3", "write 2**3"), ("__import__('os')", "unknown function"), ("x + 1", "unknown name 'x'"),
    ("'a' * 3", "not a number"), ("[1, 2]", "List is not arithmetic"), ("(1).real", "Attribute is not arithmetic"),
    ("1 +", "not an arithmetic expression"), ("", "empty"), ("1" * 1001, "longer than 1000 characters"),
    ("(" * 150 + "1" + ")" * 150, "nested more than 50"), ("-" * 200 + "1", "nested more than 50"),
    ("sqrt(-1)", "negative"), ("exp(10000)", "too large"), ("round(1, 0.5)", "whole number"),
    ("sqrt(1, 2)", "wrong number of arguments"), ("True + 1", "not a number"), ("1 < 2", "Compare is not"),
])
def test_calculator_refuses_with_a_clear_error(expr: str, message: str) -> None:
    start = time.monotonic()
    with pytest.raises(ToolError, match=message.replace("(", r"\(").replace("*", r"\*")):
        calculate(expr)
    assert time.monotonic() - start < 5  # every limit is checked before the work: never a hang


def test_calculator_tool_through_the_registry() -> None:
    calc = get_tool("calculator")
    assert {"calculator", "python"} <= set(tool_names())
    assert calc.call('{"expression": "48/2"}') == "24"
    assert calc.call({"expression": "5*(3+2)"}) == "25"
    assert to_openai(calc)["function"]["parameters"]["required"] == ["expression"]
    with pytest.raises(ToolError, match="missing required argument.*expression"):
        calc.call({})
    with pytest.raises(ToolError, match="unknown argument.*precision"):
        calc.call({"expression": "1", "precision": 3})
    with pytest.raises(ToolError, match="not valid JSON"):
        calc.call('{"expression": ')
    with pytest.raises(ToolError, match="unknown tool 'weather'.*calculator"):
        get_tool("weather")
    with pytest.raises(ToolError, match="tool 'calculator'"):
        get_tool("calculator", colour="red")


def get_weather(city: str, unit: Literal["celsius", "fahrenheit"] = "celsius", days: int = 1,
                hourly: Optional[bool] = None, tags: list[str] | None = None,  # noqa: UP045 - both spellings
                extra: dict[str, float] | None = None) -> dict:
    """Get the weather forecast for a city.

    It is always sunny.

    Args:
        city: the city's name, e.g. Paris
        unit: the temperature unit;
            celsius unless asked otherwise
        days (int): how many days ahead
        hourly: whether to give hourly figures
    """
    return {"city": city, "unit": unit, "days": days, "tags": tags or []}


def test_tool_from_function_schema() -> None:
    t = tool_from_function(get_weather)
    assert t.name == "get_weather" and t.description == "Get the weather forecast for a city."
    assert t.parameters == {
        "type": "object", "additionalProperties": False, "required": ["city"],
        "properties": {
            "city": {"type": "string", "description": "the city's name, e.g. Paris"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "default": "celsius",
                     "description": "the temperature unit; celsius unless asked otherwise"},
            "days": {"type": "integer", "description": "how many days ahead", "default": 1},
            "hourly": {"type": "boolean", "description": "whether to give hourly figures", "default": None},
            "tags": {"type": "array", "items": {"type": "string"}, "default": None},
            "extra": {"type": "object", "additionalProperties": {"type": "number"}, "default": None},
        }}
    assert json.loads(t.call({"city": "Oslo", "days": 2})) == {"city": "Oslo", "unit": "celsius", "days": 2,
                                                              "tags": []}


def test_tool_from_numpy_docstring_and_openai_round_trip() -> None:
    def add(a: int, b: float = 0.5) -> float:
        """Add two numbers.

        Parameters
        ----------
        a : int
            the first
        b : float
            the second

        Returns
        -------
        float
        """
        return a + b

    t = tool_from_function(add)
    assert t.parameters["properties"]["a"] == {"type": "integer", "description": "the first"}
    assert t.parameters["properties"]["b"]["description"] == "the second" and t.parameters["required"] == ["a"]
    d = to_openai(t)
    assert d == {"type": "function", "function": {"name": "add", "description": "Add two numbers.",
                                                  "parameters": t.parameters}}
    back = from_openai(json.loads(json.dumps(d)), add)
    assert (back.name, back.description, back.parameters) == (t.name, t.description, t.parameters)
    assert back.call('{"a": 2, "b": 0.25}') == "2.25"
    with pytest.raises(ToolError, match='"type": "function"'):
        from_openai({"name": "add"}, add)
    with pytest.raises(ToolError, match="function.name"):
        from_openai({"type": "function", "function": {}}, add)
    with pytest.raises(ToolError, match="type 'object'"):
        from_openai({"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}, add)
    with pytest.raises(ToolError, match="tool name"):
        Tool("bad name!", "", {"type": "object"}, add)


def _no_doc(x: int) -> int:
    return x


def _untyped(x):  # noqa: ANN001 - the missing hint is the point
    """Doc."""
    return x


def _set_arg(x: set[int]) -> int:
    """Doc."""
    return 0


def _int_keys(x: dict[int, str]) -> int:
    """Doc."""
    return 0


def _star(*xs: int) -> int:
    """Doc."""
    return 0


@pytest.mark.parametrize("fn, message", [
    (_no_doc, "needs a docstring"), (_untyped, "parameter 'x' has no type hint"),
    (_set_arg, "parameter 'x': type set\\[int\\] has no JSON schema"), (_int_keys, "parameter 'x'.*dict\\[str"),
    (_star, "parameter 'xs'.*\\*args"),
])
def test_tool_from_function_errors_name_the_parameter(fn, message: str) -> None:  # noqa: ANN001
    with pytest.raises(ToolError, match=message):
        tool_from_function(fn)


@pytest.mark.usefixtures("one_thread")
def test_search_tool_returns_chunks_with_sources(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from lmforge.retrieval import build_index, search_tool  # registers `search`

    words = ["sourdough", "bread", "bake", "oven", "volcano", "lava", "ash", "planet", "jupiter", "moon"]
    bert = make_tiny_bert_dir(tmp_path / "bert", words, seed=3)
    docs = tmp_path / "docs"
    (docs / "food").mkdir(parents=True)
    (docs / "food" / "bread.md").write_text("sourdough bread bake oven " * 3, encoding="utf-8")
    (docs / "geo.txt").write_text("volcano lava ash\n" * 3, encoding="utf-8")
    (docs / "sky.txt").write_text("planet jupiter moon " * 3, encoding="utf-8")
    build_index(docs, tmp_path / "idx", embed_model=str(bert), device="cpu")

    tool = get_tool("search", index=tmp_path / "idx", k=2, device="cpu")
    assert "search" in tool_names() and tool.parameters["properties"]["k"]["maximum"] == 2
    hits = json.loads(tool.call({"query": "sourdough bread bake oven"}))
    assert len(hits) == 2 and hits[0]["source"] == "food/bread.md" and hits[0]["line"] == 1
    assert hits[0]["text"].startswith("sourdough bread") and hits[0]["score"] >= hits[1]["score"]
    assert {h["source"] for h in hits} < {"food/bread.md", "geo.txt", "sky.txt"}
    one = json.loads(tool.call({"query": "volcano lava ash", "k": 1}))
    assert [h["source"] for h in one] == ["geo.txt"]
    assert len(json.loads(tool.call({"query": "moon", "k": 50}))) == 2  # capped at the tool's k
    with pytest.raises(ToolError, match="needs an index"):
        search_tool()
    with pytest.raises(ToolError, match="at least 1"):
        tool.call({"query": "moon", "k": 0})
