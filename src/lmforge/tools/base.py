"""A tool: a name, a description, a JSON schema for its arguments, and the function that runs it.

Tools are looked up by name in one registry (``get_tool``); ``tool_from_function`` turns any typed,
documented Python function into one, and ``to_openai`` / ``from_openai`` convert to and from the OpenAI
``{"type": "function", "function": {...}}`` definition.
"""

from __future__ import annotations

import inspect
import json
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import LMForgeError


class ToolError(LMForgeError):
    """A tool call that cannot run: unknown tool, bad arguments, or a tool's own refusal (bad expression)."""


_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # what OpenAI accepts as a function name


@dataclass
class Tool:
    """``fn`` takes the parsed arguments as keyword arguments and returns text or a JSON-able value."""

    name: str
    description: str
    parameters: dict[str, Any]
    fn: Callable[..., Any] = field(repr=False)

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ToolError(f"tool name {self.name!r}: use 1-64 letters, digits, '_' or '-'")
        if self.parameters.get("type") != "object":
            raise ToolError(f"tool {self.name!r}: parameters must be a JSON schema of type 'object'")

    def call(self, arguments: dict[str, Any] | str | None = None) -> str:
        """Run the tool on its arguments (a dict, or the JSON text a model wrote); the result as text.

        Missing required arguments and unknown names raise ToolError naming them; so does whatever the
        tool raises as a ToolError (an expression the calculator refuses, for one).
        """
        if arguments is None or arguments == "":
            arguments = {}
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError as e:
                raise ToolError(f"{self.name}: arguments are not valid JSON ({e.msg})") from None
        if not isinstance(arguments, dict):
            raise ToolError(f"{self.name}: arguments must be a JSON object, got {type(arguments).__name__}")
        props = self.parameters.get("properties", {})
        missing = [p for p in self.parameters.get("required", []) if p not in arguments]
        if missing:
            raise ToolError(f"{self.name}: missing required argument(s) {', '.join(missing)}")
        unknown = [a for a in arguments if a not in props]
        if unknown and self.parameters.get("additionalProperties", True) is False:
            raise ToolError(f"{self.name}: unknown argument(s) {', '.join(unknown)}")
        result = self.fn(**arguments)
        return result if isinstance(result, str) else json.dumps(result, ensure_ascii=False)


def to_openai(tool: Tool) -> dict[str, Any]:
    """The OpenAI tool definition of a Tool."""
    return {"type": "function",
            "function": {"name": tool.name, "description": tool.description, "parameters": tool.parameters}}


def from_openai(definition: dict[str, Any], fn: Callable[..., Any]) -> Tool:
    """A Tool from an OpenAI tool definition and the function that implements it."""
    if not isinstance(definition, dict) or definition.get("type") != "function" \
            or not isinstance(definition.get("function"), dict):
        raise ToolError('a tool definition must be {"type": "function", "function": {...}}')
    f = definition["function"]
    if not isinstance(f.get("name"), str):
        raise ToolError("tool definition: function.name is missing")
    params = f.get("parameters", {"type": "object", "properties": {}})
    if not isinstance(params, dict):
        raise ToolError(f"tool {f['name']!r}: function.parameters must be a JSON schema object")
    return Tool(f["name"], str(f.get("description", "")), params, fn)


# -- functions to tools ----------------------------------------------------------------------------------

_SCALARS = {str: "string", int: "integer", float: "number", bool: "boolean"}


def _schema(annotation: Any, where: str) -> tuple[dict[str, Any], bool]:
    """(JSON schema, optional) for a type annotation; ToolError naming ``where`` when it has none."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            return _schema(rest[0], where)[0], True
    if annotation in _SCALARS:
        return {"type": _SCALARS[annotation]}, False
    if origin is typing.Literal and args and all(isinstance(a, (str, int, float, bool)) for a in args):
        kinds = {_SCALARS[type(a)] for a in args}
        out: dict[str, Any] = {"enum": list(args)}
        if len(kinds) == 1:
            out["type"] = kinds.pop()
        return out, False
    if annotation is list or origin is list:
        if not args:
            return {"type": "array"}, False
        return {"type": "array", "items": _schema(args[0], where)[0]}, False
    if annotation is dict or origin is dict:
        if args and args[0] is not str:
            raise ToolError(f"{where}: JSON object keys are strings, so use dict[str, ...]")
        return ({"type": "object", "additionalProperties": _schema(args[1], where)[0]} if args
                else {"type": "object"}), False
    raise ToolError(f"{where}: type {annotation!r} has no JSON schema; use str, int, float, bool, "
                    "list[...], dict[str, ...], Literal[...] or Optional[...] of these")


def _docstring(doc: str) -> tuple[str, dict[str, str]]:
    """(first paragraph, {parameter: description}) from a Google- or NumPy-style docstring."""
    doc = inspect.cleandoc(doc or "")
    description = " ".join(doc.split("\n\n")[0].split())
    params: dict[str, str] = {}
    lines = doc.splitlines()
    i = 0
    while i < len(lines):
        head = lines[i].strip().rstrip(":").lower()
        numpy_style = i + 1 < len(lines) and set(lines[i + 1].strip()) == {"-"}
        if head in ("args", "arguments", "parameters", "params"):
            i += 2 if numpy_style else 1
            current = None
            while i < len(lines) and (lines[i].strip() or current is None) and \
                    not (i + 1 < len(lines) and set(lines[i + 1].strip()) == {"-"}):
                line = lines[i].strip()
                google = re.match(r"^(\*{0,2}\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)$", line)
                numpy = re.match(r"^(\w+)\s*:\s*[^\s].*$", line) if numpy_style else None
                if numpy_style and numpy and not lines[i].startswith((" ", "\t")):
                    current = numpy.group(1)
                    params[current] = ""
                elif google and not numpy_style:
                    current = google.group(1)
                    params[current] = google.group(2)
                elif current and line:
                    params[current] = f"{params[current]} {line}".strip()
                elif not line:
                    break
                i += 1
            continue
        i += 1
    return description, params


def tool_from_function(fn: Callable[..., Any], name: str | None = None) -> Tool:
    """A Tool from a function with type hints and a docstring: parameters become the JSON schema (those
    with a default, or Optional, are not required), the docstring's first paragraph the description, and
    its ``Args:`` (or NumPy ``Parameters``) entries the parameters' descriptions."""
    name = name or fn.__name__
    if not fn.__doc__ or not fn.__doc__.strip():
        raise ToolError(f"function {name!r} needs a docstring: its first paragraph describes the tool")
    description, docs = _docstring(fn.__doc__)
    try:
        hints = typing.get_type_hints(fn)
    except Exception as e:  # noqa: BLE001 - a forward reference that does not resolve
        raise ToolError(f"function {name!r}: cannot read its type hints ({e})") from None
    props: dict[str, Any] = {}
    required = []
    for p in inspect.signature(fn).parameters.values():
        where = f"function {name!r}, parameter {p.name!r}"
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise ToolError(f"{where}: *args and **kwargs have no JSON schema")
        if p.kind is p.POSITIONAL_ONLY:
            raise ToolError(f"{where}: positional-only parameters cannot be passed by name")
        if p.name not in hints:
            raise ToolError(f"{where} has no type hint")
        schema, optional = _schema(hints[p.name], where)
        if p.name in docs and docs[p.name]:
            schema["description"] = docs[p.name]
        if p.default is not p.empty:
            try:
                json.dumps(p.default)
                schema["default"] = p.default
            except TypeError:
                pass
        props[p.name] = schema
        if p.default is p.empty and not optional:
            required.append(p.name)
    params = {"type": "object", "properties": props, "required": required, "additionalProperties": False}
    return Tool(name, description, params, fn)


# -- the registry ----------------------------------------------------------------------------------------

# name -> factory(**options) -> Tool. `calculator` and `python` are registered by lmforge.tools; `search`
# by lmforge.retrieval (it loads an embedding model, from a layer above this one).
_FACTORIES: dict[str, Callable[..., Tool]] = {}
_PROVIDERS = {"search": "lmforge.retrieval"}


def register_tool(name: str, factory: Callable[..., Tool]) -> None:
    """Make ``get_tool(name, **options)`` build a tool with ``factory(**options)``."""
    if not _NAME.match(name):
        raise ToolError(f"tool name {name!r}: use 1-64 letters, digits, '_' or '-'")
    _FACTORIES[name] = factory


def tool_names() -> list[str]:
    """The names ``get_tool`` knows, sorted."""
    return sorted(_FACTORIES)


def get_tool(name: str, **options: Any) -> Tool:
    """The registered tool ``name``, built with ``options`` (e.g. ``get_tool("search", index="idx/")``)."""
    if name not in _FACTORIES:
        hint = f"; it is provided by {_PROVIDERS[name]}, import that first" if name in _PROVIDERS else ""
        raise ToolError(f"unknown tool {name!r} (known: {', '.join(tool_names()) or 'none'}){hint}")
    try:  # check the options, not the factory's own work, so a bug inside it is not dressed as bad input
        inspect.signature(_FACTORIES[name]).bind(**options)
    except TypeError as e:
        raise ToolError(f"tool {name!r}: {e}") from None
    return _FACTORIES[name](**options)
