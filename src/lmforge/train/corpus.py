"""Reading training corpora: text files, folders, globs and JSONL(.gz/.bz2), streamed.

Two views of the same files: `iter_texts` yields paragraphs (what tokenizer training wants), and
`iter_documents` yields whole documents in pieces (what pretraining data wants: one boundary token per
file or JSONL record, without ever holding a large file in memory).
"""

from __future__ import annotations

import bz2
import gzip
import json
import os
from collections.abc import Iterable, Iterator
from glob import glob
from pathlib import Path
from typing import IO, Any

from ..errors import LMForgeError

_MAX_DOC_CHARS = 1 << 16  # plain text is cut into paragraphs, at most this long
_CHUNK_CHARS = 1 << 16  # documents of plain text come in line-aligned pieces of about this size


def open_text(path: Path) -> IO[str]:
    """A text file for reading, decompressed by its suffix (.gz, .bz2); undecodable bytes are replaced."""
    name = path.name.lower()
    opener: Any = gzip.open if name.endswith(".gz") else bz2.open if name.endswith(".bz2") else open
    return opener(path, "rt", encoding="utf-8", errors="replace", newline="")


def _is_jsonl(path: Path) -> bool:
    return path.name.lower().removesuffix(".gz").removesuffix(".bz2").endswith(".jsonl")


def _looks_binary(path: Path) -> bool:
    try:
        with open_text(path) as f:
            return "\0" in f.read(8192)
    except (OSError, EOFError):  # e.g. a corrupt .gz
        return True


def expand_inputs(inputs: Iterable[str | Path]) -> list[Path]:
    """Files, directories (recursively; hidden entries and binary files skipped) and glob patterns."""
    files: list[Path] = []
    missing: list[str] = []
    for item in inputs:
        s = str(item)
        path = Path(s).expanduser()
        if path.exists():
            candidates = [path]
        elif any(c in s for c in "*?["):
            candidates = [Path(p) for p in sorted(glob(os.path.expanduser(s), recursive=True))]
        else:
            candidates = []
        if not candidates:
            missing.append(s)
            continue
        for c in candidates:
            if c.is_dir():
                found = (p for p in sorted(c.rglob("*")) if p.is_file()
                         and not any(part.startswith(".") for part in p.relative_to(c).parts))
                files.extend(p for p in found if not _looks_binary(p))
            elif c == path and _looks_binary(c):
                raise LMForgeError(f"{c}: does not look like a text file")
            elif not _looks_binary(c):
                files.append(c)
    if missing:
        raise LMForgeError(f"no such file, directory or match: {', '.join(missing)}")
    unique: dict[Path, Path] = {}
    for f in files:
        unique.setdefault(f.resolve(), f)
    return list(unique.values())


def _jsonl_texts(path: Path, f: IO[str], text_field: str) -> Iterator[str]:
    for n, line in enumerate(f, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise LMForgeError(f"{path}:{n}: invalid JSON ({e.msg})") from None
        text = rec.get(text_field) if isinstance(rec, dict) else None
        if isinstance(text, str) and text:
            yield text


def _empty(inputs: list[Any], text_field: str) -> LMForgeError:
    return LMForgeError(f"empty corpus: no text in {', '.join(map(str, inputs))} "
                        f"(JSONL records are read from their {text_field!r} field; see --text-field)")


def _read_file(path: Path, text_field: str) -> Iterator[str]:
    with open_text(path) as f:
        if _is_jsonl(path):
            yield from _jsonl_texts(path, f, text_field)
            return
        buf: list[str] = []
        size = 0
        for line in f:  # paragraphs: lines up to and including a blank line
            buf.append(line)
            size += len(line)
            if not line.strip() or size >= _MAX_DOC_CHARS:
                yield "".join(buf)
                buf, size = [], 0
        if buf:
            yield "".join(buf)


def iter_texts(inputs: Iterable[str | Path], text_field: str = "text") -> Iterator[str]:
    """Stream the documents of a corpus: paragraphs of text files, `text_field` of JSONL records.

    Paths are checked up front (a missing one raises at once); a corpus with no text at all raises
    `LMForgeError` once exhausted.
    """
    inputs = list(inputs)
    files = expand_inputs(inputs)

    def gen() -> Iterator[str]:
        empty = True
        for path in files:
            for text in _read_file(path, text_field):
                empty = False
                yield text
        if empty:
            raise _empty(inputs, text_field)

    return gen()




def iter_documents(inputs: Iterable[str | Path], text_field: str = "text") -> Iterator[tuple[bool, str]]:
    """(starts_a_document, text) pieces: a JSONL record is one document; a text file is one document,
    read in line-aligned pieces so a large file never sits in memory whole. Paths are checked at once."""
    inputs = list(inputs)
    files = expand_inputs(inputs)

    def gen() -> Iterator[tuple[bool, str]]:
        empty = True
        for path in files:
            with open_text(path) as f:
                if _is_jsonl(path):
                    for text in _jsonl_texts(path, f, text_field):
                        empty = False
                        yield True, text
                    continue
                first, buf, size = True, [], 0
                for line in f:
                    buf.append(line)
                    size += len(line)
                    if size >= _CHUNK_CHARS:
                        empty = False
                        yield first, "".join(buf)
                        first, buf, size = False, [], 0
                if buf:
                    empty = False
                    yield first, "".join(buf)
        if empty:
            raise _empty(inputs, text_field)

    return gen()
