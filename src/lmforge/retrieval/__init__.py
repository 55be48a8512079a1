"""Semantic search over documents (chunk, embed, exact cosine search) and answers grounded in it.

`index` builds and searches, `qa` answers with a chat model, `commands` holds `lmforge index` and `ask`.
"""

from .index import MAX_CHUNKS, Hit, Index, build_index, chunk_text
from .qa import Answer, answer

__all__ = ["MAX_CHUNKS", "Answer", "Hit", "Index", "answer", "build_index", "chunk_text"]
