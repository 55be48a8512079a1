"""Writing directories atomically: readers see the old directory or the complete new one, never half.

Writes are durable too: the new files and directories are flushed to disk before the rename that
publishes them, so a power loss cannot leave a complete-looking but empty result. A process killed
mid-write leaves only hidden `.NAME.tmp-*` / `.NAME.old-*` / `.NAME.trash-*` entries beside `NAME`;
`sweep_leftovers` removes them.
"""

from __future__ import annotations

import errno
import json
import os
import re
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
        fsync_tree(tmp)
        if out.exists():  # swap: the old directory disappears only once the new one is in place
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "x")
            os.replace(tmp, out)
            fsync_dir(out.parent)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
            fsync_dir(out.parent)
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
        fsync_tree(tmp)
        os.replace(tmp, out)
        fsync_dir(out.parent)
    finally:
        tmp.unlink(missing_ok=True)


def fsync_dir(path: str | Path) -> None:
    """Flush a directory's entries (creations, renames, removals in it) to disk."""
    if os.name != "posix":  # directories cannot be opened for fsync elsewhere
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP):  # a file system without directory fsync
            raise
    finally:
        os.close(fd)


def fsync_tree(path: str | Path) -> None:
    """Flush a file, or every file and directory under a directory (and it), to disk."""
    path = Path(path)
    if not path.is_dir():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return
    for root, _dirs, files in os.walk(path, topdown=False):
        for name in files:
            if not (Path(root) / name).is_symlink():  # a link is an entry of its directory, synced below
                fsync_tree(Path(root) / name)
        fsync_dir(root)


def remove_dir(path: str | Path) -> None:
    """Delete a directory so that an interruption never leaves it half-deleted under its own name: it is
    first renamed (durably) to a hidden `.NAME.trash-*` beside it, which `sweep_leftovers` finishes."""
    path = Path(path)
    trash = Path(tempfile.mkdtemp(prefix=f".{path.name}.trash-", dir=path.parent))
    os.replace(path, trash / "x")
    fsync_dir(path.parent)
    shutil.rmtree(trash, ignore_errors=True)


_LEFTOVER = re.compile(r"\.(?P<name>.+)\.(?P<kind>tmp|old|trash)-[a-z0-9_]+")


def sweep_leftovers(parent: str | Path, names: str = ".+") -> list[Path]:
    """Remove what interrupted `atomic_dir`, `atomic_file` and `remove_dir` calls left in `parent` for the
    entries whose names match the regex `names`; returns what was removed.

    Staging (`.NAME.tmp-*`) and removals (`.NAME.trash-*`) are deleted. A swap cut between its two renames
    left the previous `NAME` in `.NAME.old-*/x` and no `NAME`: that previous version is put back.
    """
    parent = Path(parent)
    removed: list[Path] = []
    for entry in sorted(parent.iterdir()) if parent.is_dir() else []:
        m = _LEFTOVER.fullmatch(entry.name)
        if not m or not re.fullmatch(names, m["name"]):
            continue
        target = parent / m["name"]
        if m["kind"] == "old" and (entry / "x").is_dir() and not target.exists():
            os.replace(entry / "x", target)
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    if removed:
        fsync_dir(parent)
    return removed


def read_json(path: str | Path) -> Any:
    """A JSON file, or a one-line LMForgeError naming the file (missing, unreadable or malformed)."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise LMForgeError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise LMForgeError(f"{path}: cannot read ({e.strerror or e})") from None
