"""An on-disk semantic index: documents cut into overlapping word windows, embedded, searched exactly.

Layout of an index directory (written atomically)::

    index.json        embed model, dimension, chunking settings, counts, a probe vector
    chunks.jsonl      one {"source", "line", "text"} record per chunk, in embedding order
    embeddings.npy    float32 [chunks, dim], unit length, so a dot product is the cosine

Search is an exact scan (one matrix-vector product). That stays fast up to about a million chunks
(1.5 GB of vectors for a 384-dim model); beyond `MAX_CHUNKS` build refuses, and the way on is an
approximate index library (e.g. FAISS's IndexFlatIP / IndexHNSWFlat over the same unit vectors).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import LMForgeError
from ..fsutil import atomic_dir, read_json

MAX_CHUNKS = 1_000_000
INDEX_FILE = "index.json"
FORMAT = "lmforge-index"
# Embedded at build time and again at load: a different model behind the same name is caught.
PROBE_TEXT = "lmforge index probe: the quick brown fox jumps over the lazy dog."
_WORD = re.compile(r"\S+")


def chunk_text(text: str, chunk_words: int = 120, overlap_words: int = 30) -> Iterator[tuple[int, str]]:
    """(start line, text) windows of ``chunk_words`` words; neighbours share ``overlap_words`` words, so a
    passage cut by one boundary is whole in the next chunk. The text keeps its original spacing."""
    if chunk_words < 1 or not 0 <= overlap_words < chunk_words:
        raise LMForgeError(f"need chunk words >= 1 and 0 <= overlap < chunk words, got {chunk_words}, {overlap_words}")
    words = [(m.start(), m.end()) for m in _WORD.finditer(text)]
    step = chunk_words - overlap_words
    for s in range(0, len(words), step):
        window = words[s:s + chunk_words]
        start, end = window[0][0], window[-1][1]
        yield text.count("\n", 0, start) + 1, text[start:end]
        if s + chunk_words >= len(words):
            break


@dataclass
class Hit:
    score: float
    source: str
    line: int
    text: str
    chunk: int


def _embedder(name: str, device: str | None) -> Any:
    from ..api import load

    return load(name, device=device)


def _probe(lm: Any) -> list[float]:
    return [round(float(x), 6) for x in lm.embed([PROBE_TEXT])[0][:16]]


def build_index(docs: str | Path | list[str | Path], out: str | Path, embed_model: str = "all-minilm-l6-v2",
                chunk_words: int = 120, overlap_words: int = 30, device: str | None = None,
                progress: bool = False, batch_size: int = 32) -> dict[str, Any]:
    """Chunk every text file under ``docs``, embed the chunks, write the index to ``out``; returns index.json."""
    from ..train.corpus import expand_inputs, open_text

    inputs = docs if isinstance(docs, list) else [docs]
    roots = [Path(d).expanduser() for d in inputs]
    files = expand_inputs(roots)
    records: list[dict[str, Any]] = []
    n_files = 0
    for f in files:
        with open_text(f) as fh:
            text = fh.read()
        root = next((r for r in roots if r.is_dir() and f.is_relative_to(r)), None)
        source = str(f.relative_to(root)) if root is not None else f.name
        chunks = [{"source": source, "line": line, "text": t} for line, t in chunk_text(text, chunk_words, overlap_words)]
        n_files += bool(chunks)
        records += chunks
        if len(records) > MAX_CHUNKS:
            raise LMForgeError(f"more than {MAX_CHUNKS:,} chunks: exact search is too slow beyond that; "
                               "use larger --chunk-words or split the collection")
    if not records:
        raise LMForgeError(f"no documents to index in {', '.join(map(str, inputs))} (no non-empty text files)")
    lm = _embedder(embed_model, device)
    vecs = lm.embed([r["text"] for r in records], batch_size=batch_size, progress=progress)
    vecs /= np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
    info = {"format": FORMAT, "version": 1, "embed_model": str(embed_model), "dim": int(vecs.shape[1]),
            "chunks": len(records), "files": n_files, "chunk_words": chunk_words, "overlap_words": overlap_words,
            "max_tokens": lm.pooling.max_length or lm.config.context_length, "probe": _probe(lm)}
    with atomic_dir(out, marker=INDEX_FILE) as tmp:
        with open(tmp / "embeddings.npy", "wb") as fh:
            np.save(fh, vecs.astype(np.float32))
        with open(tmp / "chunks.jsonl", "w", encoding="utf-8") as fh:
            for r in records:
                fh.write(json.dumps(r, ensure_ascii=False) + "\n")
        (tmp / INDEX_FILE).write_text(json.dumps(info, indent=2), encoding="utf-8")
    return info


class Index:
    """A loaded index with the model that embeds its queries."""

    def __init__(self, path: Path, info: dict[str, Any], vectors: np.ndarray, chunks: list[dict[str, Any]],
                 lm: Any) -> None:
        self.path, self.info, self.vectors, self.chunks, self.lm = path, info, vectors, chunks, lm

    @classmethod
    def load(cls, path: str | Path, embed_model: str | None = None, device: str | None = None) -> Index:
        """Open an index; ``embed_model`` (default: the one it was built with) must be that same model."""
        path = Path(path).expanduser()
        meta = path / INDEX_FILE
        if not meta.exists():
            raise LMForgeError(f"{path}: not an index (no {INDEX_FILE}; build one with `lmforge index build`)")
        info = read_json(meta)
        if info.get("format") != FORMAT:
            raise LMForgeError(f"{path}: not an lmforge index")
        built = info["embed_model"]
        name = embed_model or built
        lm = _embedder(name, device)
        dim = lm.config.dim
        if dim != info["dim"] or not np.allclose(_probe(lm), info["probe"], atol=1e-3):
            raise LMForgeError(f"{path} was built with embedding model {built!r} ({info['dim']}-dim); "
                               f"{name!r} ({dim}-dim) embeds differently: search with {built!r} or rebuild the index")
        vectors = np.load(path / "embeddings.npy", mmap_mode="r", allow_pickle=False)
        with open(path / "chunks.jsonl", encoding="utf-8") as fh:
            chunks = [json.loads(line) for line in fh if line.strip()]
        if len(chunks) != vectors.shape[0] or vectors.shape[0] != info["chunks"]:
            raise LMForgeError(f"{path}: chunks.jsonl and embeddings.npy disagree; rebuild the index")
        return cls(path, info, vectors, chunks, lm)

    def search(self, query: str, k: int = 5) -> list[Hit]:
        """The k chunks most similar to the query (cosine), best first."""
        if not query.strip():
            raise LMForgeError("the query is empty")
        if k < 1:
            raise LMForgeError(f"k must be at least 1, got {k}")
        q = self.lm.embed([query])[0]
        q /= max(float(np.linalg.norm(q)), 1e-12)
        scores = np.asarray(self.vectors @ q)
        k = min(k, len(scores))
        top = np.argpartition(-scores, k - 1)[:k]
        top = top[np.argsort(-scores[top], kind="stable")]
        return [Hit(float(scores[i]), self.chunks[i]["source"], int(self.chunks[i]["line"]), self.chunks[i]["text"],
                    int(i)) for i in top]
