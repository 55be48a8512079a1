"""Semantic search over documents (chunk, embed, exact cosine search) and answers grounded in it."""

from .index import MAX_CHUNKS, Hit, Index, build_index, chunk_text
from .qa import Answer, answer

__all__ = ["MAX_CHUNKS", "Answer", "Hit", "Index", "answer", "build_index", "chunk_text"]
