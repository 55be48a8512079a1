"""Semantic search over documents (chunk, embed, exact cosine search) and answers grounded in it.

`index` builds and searches, `qa` answers with a chat model, `commands` holds `lmforge index` and `ask`,
`tool` is the `search` tool (registered with `lmforge.tools` on import).
"""

from .index import MAX_CHUNKS, Hit, Index, build_index, chunk_text
from .qa import Answer, answer
from .tool import search_tool

__all__ = ["MAX_CHUNKS", "Answer", "Hit", "Index", "answer", "build_index", "chunk_text", "search_tool"]
