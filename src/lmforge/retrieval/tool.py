"""The `search` tool: the top-k chunks of an lmforge index (`lmforge index build`), with their sources.

It lives here, not in `lmforge.tools`, because an index loads its embedding model through the API.
"""

from __future__ import annotations

from pathlib import Path

from ..tools import Tool, ToolError, register_tool
from .index import Index

DEFAULT_K = 3


def search_tool(index: str | Path | Index | None = None, k: int = DEFAULT_K, device: str | None = None,
                embed_model: str | None = None) -> Tool:
    """A Tool named `search` over an index (a directory, or a loaded Index), returning up to ``k`` chunks
    (the model may ask for fewer or more, up to ``k``), each with its source file and line."""
    if index is None:
        raise ToolError("the search tool needs an index: build one with `lmforge index build` and pass its path")
    if k < 1:
        raise ToolError(f"search: k must be at least 1, got {k}")
    idx = index if isinstance(index, Index) else Index.load(index, embed_model=embed_model, device=device)

    limit = k

    def search(query: str, k: int = limit) -> list[dict[str, object]]:
        if not isinstance(k, int) or k < 1:
            raise ToolError(f"search: k must be a whole number of at least 1, got {k!r}")
        return [{"source": h.source, "line": h.line, "score": round(h.score, 4), "text": h.text}
                for h in idx.search(query, k=min(k, limit))]

    return Tool("search", f"Search the documents of the index at {idx.path.name!r} and return the most relevant "
                "passages with their sources.",
                {"type": "object", "properties": {
                    "query": {"type": "string", "description": "what to look for"},
                    "k": {"type": "integer", "minimum": 1, "maximum": k, "default": k,
                          "description": "how many passages to return"}},
                 "required": ["query"], "additionalProperties": False}, search)


register_tool("search", search_tool)
