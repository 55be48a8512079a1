"""Writing directories atomically: readers see the old directory or the complete new one, never half."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import LMForgeError


@contextmanager
def atomic_dir(out: str | Path, marker: str | None = None) -> Iterator[Path]:
    """Yield an empty staging directory beside `out`; on success it replaces `out` whole.

    If the block raises, the staging directory is removed and `out` is untouched. With `marker`, an
    existing non-empty `out` lacking that file is not ours to replace, and is refused.
    """
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise LMForgeError(f"{out} exists and is not a directory")
    if marker and out.is_dir() and any(out.iterdir()) and not (out / marker).exists():
        raise LMForgeError(f"{out} is a non-empty directory without {marker}; refusing to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result should not be
        if out.exists():  # swap: the old directory disappears only once the new one is in place
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "x")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def atomic_file(out: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `out`; on success it replaces `out`, so readers never see half a file."""
    out = Path(out).expanduser()
    if out.is_dir():
        raise LMForgeError(f"{out} is a directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def read_json(path: str | Path) -> Any:
    """A JSON file, or a one-line LMForgeError naming the file (missing, unreadable or malformed)."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise LMForgeError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise LMForgeError(f"{path}: cannot read ({e.strerror or e})") from None
