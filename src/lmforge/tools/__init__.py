"""Tools a model can call: the `Tool` type, a registry by name, and the tools that ship.

`calculator` (exact arithmetic) and `python` (a sandboxed process) are registered here; `search` (top-k
chunks of an lmforge index) is registered by `lmforge.retrieval`, which loads embedding models.
"""

from .base import (
           Tool,
           ToolError,
           from_openai,
           get_tool,
           register_tool,
           to_openai,
           tool_from_function,
           tool_names,
)
from .calculator import calculate, calculator_tool, evaluate
from .sandbox import SandboxResult, python_tool, run_python

register_tool("calculator", calculator_tool)
register_tool("python", python_tool)

__all__ = ["SandboxResult", "Tool", "ToolError", "calculate", "calculator_tool", "evaluate", "from_openai",
           "get_tool", "python_tool", "register_tool", "run_python", "to_openai", "tool_from_function",
           "tool_names"]
