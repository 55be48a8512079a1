"""`lmforge data prepare`: a corpus -> flat token shards for pretraining.

Documents are streamed (never the whole corpus in memory), tokenized in worker processes, and written
as flat arrays of token ids (uint16 when the vocabulary fits, else uint32) that `np.memmap` reads.
Every document starts with the boundary token. Every k-th piece (a JSONL record, or ~64K characters of
a text file) goes to the validation split, so even a single-file corpus gets one; a piece cut from
the middle of a document also starts with the boundary token, so no split joins unrelated text.
The output directory appears complete or not at all.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import time
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import LMForgeError
from ..fsutil import atomic_dir, read_json
from ..tokenizer import Tokenizer
from .corpus import iter_documents

BOUNDARY_TOKENS = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<|im_end|>")
_BATCH_CHARS = 4 << 20  # text handed to a worker at a time


_worker_tok: Any = None


def _init_worker(tokenizer_json: str) -> None:
    global _worker_tok
    from tokenizers import Tokenizer as HFTokenizer

    _worker_tok = HFTokenizer.from_str(tokenizer_json)


def _encode(texts: list[str]) -> list[list[int]]:
    return [e.ids for e in _worker_tok.encode_batch(texts, add_special_tokens=False)]


class _ShardWriter:
    """Appends token arrays to numbered shard files of at most `shard_tokens` tokens."""

    def __init__(self, out: Path, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.out, self.split, self.dtype, self.shard_tokens = out, split, dtype, shard_tokens
        self.shards: list[dict[str, Any]] = []
        self.tokens = 0
        self._f: Any = None
        self._in_shard = 0

    def write(self, ids: np.ndarray) -> None:
        while len(ids):
            if self._f is None or self._in_shard >= self.shard_tokens:
                self._roll()
            take = ids[: self.shard_tokens - self._in_shard]
            self._f.write(take.astype(self.dtype).tobytes())
            self._in_shard += len(take)
            self.shards[-1]["tokens"] += len(take)
            self.tokens += len(take)
            ids = ids[len(take):]

    def _roll(self) -> None:
        if self._f is not None:
            self._f.close()
        name = f"{self.split}_{len(self.shards):06d}.bin"
        self._f = open(self.out / name, "wb")  # noqa: SIM115 - closed by _roll/close
        self.shards.append({"file": name, "tokens": 0})
        self._in_shard = 0

    def close(self) -> None:
        if self._f is not None:
            self._f.close()


def prepare(inputs: Iterable[str | Path], tokenizer: Tokenizer, out_dir: str | Path, text_field: str = "text",
            val_fraction: float = 0.01, workers: int | None = None, shard_tokens: int = 100_000_000,
            dtype: str = "auto", progress: bool = True) -> dict[str, Any]:
    """Tokenize a corpus into `out_dir` (train_*.bin, val_*.bin, metadata.json); returns the metadata."""
    from tqdm import tqdm

    if not 0 <= val_fraction <= 0.5:
        raise LMForgeError(f"val fraction must be between 0 and 0.5, got {val_fraction}")
    vocab = tokenizer.vocab_size
    if dtype == "auto":
        dtype = "uint16" if vocab <= 1 << 16 else "uint32"
    if dtype not in ("uint16", "uint32"):
        raise LMForgeError(f"dtype must be auto, uint16 or uint32, got {dtype!r}")
    if dtype == "uint16" and vocab > 1 << 16:
        raise LMForgeError(f"a vocabulary of {vocab} tokens does not fit uint16 shards (at most 65536); use uint32")
    boundary = next((t for t in (tokenizer.eos_token, *BOUNDARY_TOKENS)
                     if t and tokenizer.token_to_id(t) is not None), None)
    if boundary is None:
        raise LMForgeError("the tokenizer has no document boundary token (e.g. <|endoftext|>)")
    boundary_id = tokenizer.token_to_id(boundary)
    docs = iter_documents(inputs, text_field)  # raises at once on missing paths
    k = round(1 / val_fraction) if val_fraction else 0
    workers = workers or max(1, (os.cpu_count() or 1))
    start = time.time()
    n_docs = n_chars = n_bytes = 0
    bar = tqdm(desc="tokenizing", unit="B", unit_scale=True, disable=not progress)

    def batches() -> Iterator[tuple[list[str], list[tuple[bool, str]]]]:
        nonlocal n_docs
        texts: list[str] = []
        meta: list[tuple[bool, str]] = []
        size, pieces, prev = 0, 0, None
        for first, text in docs:
            n_docs += first
            pieces += 1
            split = "val" if k and pieces % k == 0 else "train"
            # A boundary starts every document and every piece whose predecessor went elsewhere.
            texts.append(text)
            meta.append((first or split != prev, split))
            prev = split
            size += len(text)
            if size >= _BATCH_CHARS:
                yield texts, meta
                texts, meta, size = [], [], 0
        if texts:
            yield texts, meta

    def emit(ids_list: list[list[int]], meta: list[tuple[bool, str]], texts: list[str]) -> None:
        nonlocal n_chars, n_bytes
        for ids, (starts, split), text in zip(ids_list, meta, texts):
            arr = np.asarray(([boundary_id] if starts else []) + ids, dtype=np.int64)
            writers[split].write(arr)
            size = len(text.encode("utf-8"))
            n_chars, n_bytes = n_chars + len(text), n_bytes + size
            bar.update(size)

    with atomic_dir(out_dir, marker="metadata.json") as tmp:
        writers = {s: _ShardWriter(tmp, s, np.dtype(dtype), shard_tokens) for s in ("train", "val")}
        try:
            if workers == 1:
                _init_worker(tokenizer.hf.to_str())
                for texts, meta in batches():
                    emit(_encode(texts), meta, texts)
            else:
                with mp.get_context("spawn").Pool(workers, _init_worker, (tokenizer.hf.to_str(),)) as pool:
                    pending: deque = deque()
                    for texts, meta in batches():  # at most 2 batches per worker in flight: constant memory
                        pending.append((pool.apply_async(_encode, (texts,)), meta, texts))
                        while len(pending) >= 2 * workers:
                            r, m, t = pending.popleft()
                            emit(r.get(), m, t)
                    while pending:
                        r, m, t = pending.popleft()
                        emit(r.get(), m, t)
        finally:
            for w in writers.values():
                w.close()
            bar.close()
        if k and not writers["val"].tokens and writers["train"].tokens > 1:
            _carve_val(tmp, writers, int(writers["train"].tokens * val_fraction), boundary_id)
        tokenizer.hf.save(str(tmp / "tokenizer.json"))
        meta_out = {
            "tokenizer": "tokenizer.json", "vocab_size": vocab, "dtype": dtype,
            "boundary_token": boundary, "boundary_token_id": boundary_id, "documents": n_docs,
            "characters": n_chars, "bytes": n_bytes, "text_field": text_field, "val_fraction": val_fraction,
            "seconds": round(time.time() - start, 2),
            **{s: {"tokens": w.tokens, "shards": w.shards} for s, w in writers.items()},
        }
        (tmp / "metadata.json").write_text(json.dumps(meta_out), encoding="utf-8")
    return meta_out


def _carve_val(out: Path, writers: dict[str, _ShardWriter], n: int, boundary_id: int) -> None:
    """Too few pieces for a document-level split (e.g. one small text file): move the tail of the
    train tokens to the validation split instead, as a contiguous held-out stretch."""
    train, val = writers["train"], writers["val"]
    last = train.shards[-1]
    path = out / last["file"]
    n = max(1, min(n, last["tokens"] - 1))
    keep = last["tokens"] - n
    tail = np.array(np.memmap(path, dtype=train.dtype, mode="r")[keep:])
    with open(path, "r+b") as f:
        f.truncate(keep * train.dtype.itemsize)
    last["tokens"] = keep
    train.tokens -= n
    val.write(np.concatenate([[boundary_id], tail]).astype(np.int64))
    val.close()


def load_split(data_dir: str | Path, split: str = "train") -> np.ndarray:
    """All tokens of a split as one array (memory-mapped when it is a single shard)."""
    d = Path(data_dir)
    meta = read_json(d / "metadata.json")
    arrays = [np.memmap(d / s["file"], dtype=meta["dtype"], mode="r") for s in meta[split]["shards"]]
    if not arrays:
        return np.zeros(0, dtype=meta["dtype"])
    return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
