"""The `python` tool: code run in a separate, limited process. Linux; see docs/tools.md for what this does
and does not protect against (it is not a VM or container boundary: same kernel, same file system).

A small launcher (a fresh ``python -I -S`` process, so nothing here runs between fork and exec of a
threaded server) enters a new network namespace, sets the rlimits, drops root to ``nobody``, reports what
it managed on a private pipe, and then execs the user's code with an empty environment, in a fresh
temporary directory, with stdin on /dev/null. The host enforces the wall-clock timeout by killing the
process group, keeps only the first ``max_output`` characters of output, and removes the directory.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any

from .base import Tool, ToolError

TIMEOUT = 10.0  # wall-clock seconds
CPU_SECONDS = 10
MEMORY_MB = 1024  # address space (RLIMIT_AS)
FILE_SIZE_MB = 16  # largest file the code may write
MAX_PROCESSES = 16  # processes and threads of the sandbox user
MAX_OUTPUT = 16_000  # characters of stdout + stderr kept

# Runs as `python -I -S -c _LAUNCHER CONFIG STATUS_FD`; it must not import lmforge (it runs before site).
_LAUNCHER = r"""
import ctypes, json, os, resource, sys
cfg, fd = json.loads(sys.argv[1]), int(sys.argv[2])
status = {"network": None, "user": None}
libc = ctypes.CDLL(None, use_errno=True)
NEWNET, NEWUSER = 0x40000000, 0x10000000
uid = os.getuid()
mine = 0  # counted before any user namespace hides the owners
for p in os.listdir("/proc"):
    try:
        mine += p.isdigit() and os.stat("/proc/" + p).st_uid == uid
    except OSError:
        pass
# Root stays in the root user namespace, so that it can drop to `nobody` below.
tries = [(NEWNET, "new network namespace")] + [(NEWUSER | NEWNET, "new user and network namespace")] * (uid != 0)
for flags, how in tries:
    if libc.unshare(flags) == 0:
        status["network"] = how
        break
    status["network_error"] = os.strerror(ctypes.get_errno())
if uid == 0:
    target = cfg["user"]
    if cfg["keep_read"]:  # the interpreter is where only root can reach it: keep CAP_DAC_READ_SEARCH
        libc.prctl(8, 1, 0, 0, 0)  # PR_SET_KEEPCAPS across setuid
    os.setgroups([])
    os.setgid(target[1])
    os.setuid(target[0])
    status["user"] = target[2]
    if cfg["keep_read"]:
        bit = 1 << 2  # CAP_DAC_READ_SEARCH
        head = (ctypes.c_uint32 * 2)(0x20080522, 0)
        data = (ctypes.c_uint32 * 6)(bit, bit, bit, 0, 0, 0)  # effective, permitted, inheritable (x2 words)
        if libc.capset(head, data) != 0 or libc.prctl(47, 2, 2, 0, 0) != 0:  # PR_CAP_AMBIENT_RAISE
            raise SystemExit("cannot keep read access to the interpreter: " + os.strerror(ctypes.get_errno()))
        status["user"] += " (reads any file)"
    nproc = cfg["procs"]
else:
    nproc = mine + cfg["procs"]  # RLIMIT_NPROC counts every process of this user
for name, value in (("RLIMIT_CPU", cfg["cpu"]), ("RLIMIT_AS", cfg["mem"]), ("RLIMIT_FSIZE", cfg["fsize"]),
                    ("RLIMIT_NPROC", nproc), ("RLIMIT_CORE", 0)):
    hard = value + 1 if name == "RLIMIT_CPU" else value
    resource.setrlimit(getattr(resource, name), (value, hard))
if status["network"]:
    status["netns"] = os.stat("/proc/self/ns/net").st_ino  # lets the host find every process of this run
os.write(fd, json.dumps(status).encode() + b"\n")
os.set_inheritable(fd, False)  # closed by a successful exec; written to again when the exec fails
try:
    os.execve(sys.executable, [sys.executable, "-I", "main.py"], {})
except OSError as e:
    os.write(fd, json.dumps({"exec_error": f"{sys.executable}: {e.strerror}"}).encode())
    os._exit(127)
"""


@dataclass
class SandboxResult:
    exit_code: int | None  # None when killed by a signal (see ``reason``)
    output: str  # stdout and stderr interleaved, at most MAX_OUTPUT characters
    truncated: bool
    reason: str | None  # why it stopped early: timeout, CPU, memory, file size, a signal
    network_isolated: bool
    network_note: str  # how the network was cut off, or why it could not be
    user: str | None  # the unprivileged user the code ran as, when lmforge was root
    seconds: float

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and self.reason is None

    def text(self) -> str:
        """The result as the model sees it: output, then a status line, then any warnings."""
        parts = [self.output.rstrip("\n")] if self.output.strip() else []
        if self.truncated:
            parts.append(f"[output truncated to {MAX_OUTPUT} characters]")
        if self.reason:
            parts.append(f"[stopped: {self.reason}]")
        elif self.exit_code:
            parts.append(f"[exit status {self.exit_code}]")
        if not self.network_isolated:
            parts.append(f"[warning: network NOT isolated: {self.network_note}]")
        return "\n".join(parts) if parts else "[no output]"


def _sandbox_user() -> list[Any]:
    import pwd

    try:
        u = pwd.getpwnam("nobody")
        return [u.pw_uid, u.pw_gid, "nobody"]
    except KeyError:
        return [65534, 65534, "uid 65534"]


def _reachable_by_others(path: str) -> bool:
    """Whether a user other than root can read ``path`` (each directory above it searchable)."""
    import stat

    path = os.path.realpath(path)
    parts = [path] + [os.path.dirname(path)]
    while parts[-1] != os.path.dirname(parts[-1]):
        parts.append(os.path.dirname(parts[-1]))
    try:
        return all(os.stat(p).st_mode & (stat.S_IXOTH if p != path else stat.S_IROTH) for p in parts)
    except OSError:
        return False


def _reason(code: int, output: str, timed_out: bool, timeout: float, cfg: dict[str, Any],
            seconds: float) -> str | None:
    if timed_out:
        return f"wall-clock timeout after {timeout:g} s"
    # SIGKILL is the hard CPU limit (a second after SIGXCPU) only once that much time has passed.
    if code == -signal.SIGXCPU or (code == -signal.SIGKILL and seconds >= cfg["cpu"]):
        return f"CPU time limit ({cfg['cpu']} s)"
    if code == -signal.SIGXFSZ or (code != 0 and "File too large" in output[-2000:]):  # Python ignores SIGXFSZ
        return f"file size limit ({cfg['fsize'] // 2**20} MB)"
    if code != 0 and "MemoryError" in output[-2000:]:
        return f"memory limit ({cfg['mem'] // 2**20} MB)"
    if code < 0:
        return f"killed by signal {signal.Signals(-code).name}"
    return None


def run_python(code: str, timeout: float = TIMEOUT, cpu_seconds: int = CPU_SECONDS, memory_mb: int = MEMORY_MB,
               file_size_mb: int = FILE_SIZE_MB, max_processes: int = MAX_PROCESSES,
               max_output: int = MAX_OUTPUT, files: dict[str, str] | None = None) -> SandboxResult:
    """Run Python source in the sandbox and return its output and how it ended. ``files`` are written into
    the working directory first (name -> text). Code that fails is a result, not an exception."""
    if sys.platform != "linux":
        raise ToolError("the python sandbox needs Linux (namespaces and rlimits)")
    if not isinstance(code, str):
        raise ToolError("python: code must be a string")
    cfg = {"cpu": int(cpu_seconds), "mem": int(memory_mb) * 2**20, "fsize": int(file_size_mb) * 2**20,
           "procs": int(max_processes), "user": _sandbox_user(),
           "keep_read": not all(map(_reachable_by_others, (sys.executable, sys.base_prefix + "/lib")))}
    work = tempfile.mkdtemp(prefix="lmforge-sandbox-")
    try:
        for name, text in {**(files or {}), "main.py": code}.items():
            if os.path.basename(name) != name:
                raise ToolError(f"python: file name {name!r} must be a plain name")
            with open(os.path.join(work, name), "w", encoding="utf-8") as fh:
                fh.write(text)
        if os.getuid() == 0:  # the code runs as nobody: only its own directory is writable to it
            for name in [".", *os.listdir(work)]:
                os.chown(os.path.join(work, name), cfg["user"][0], cfg["user"][1])
        return _run(work, cfg, timeout, max_output)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _sweep(netns: int | None, work: str) -> None:
    """Kill what the process group kill missed: processes that called setsid() but are still in this run's
    network namespace, or still in its working directory."""
    host_ns = os.stat("/proc/self/ns/net").st_ino
    for _ in range(5):  # a process may fork while we look; a few passes catch its children
        found = False
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                ours = netns is not None and netns != host_ns and os.stat(f"/proc/{pid}/ns/net").st_ino == netns
                ours = ours or os.readlink(f"/proc/{pid}/cwd") == work or \
                    os.readlink(f"/proc/{pid}/cwd").startswith(work + "/")
                if ours:
                    os.kill(int(pid), signal.SIGKILL)
                    found = True
            except OSError:
                continue
        if not found:
            return
        time.sleep(0.02)


def _run(work: str, cfg: dict[str, Any], timeout: float, max_output: int) -> SandboxResult:
    status_r, status_w = os.pipe()
    start = time.monotonic()
    try:
        proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", _LAUNCHER, json.dumps(cfg), str(status_w)],
                                cwd=work, env={}, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True, pass_fds=(status_w,))
    finally:
        os.close(status_w)
    kept: list[bytes] = []
    size = [0, False]  # bytes kept, truncated

    def drain() -> None:  # keep the head, discard the rest, so a print loop cannot fill the host's memory
        assert proc.stdout is not None
        while chunk := proc.stdout.read1(65536):
            room = max_output * 4 - size[0]
            if room > 0:
                kept.append(chunk[:room])
                size[0] += min(room, len(chunk))
            if len(chunk) > room:
                size[1] = True

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    timed_out = False
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:
        try:  # the whole group: children left running in the background go too
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()
    with os.fdopen(status_r, "rb") as fh:
        raw = fh.read()
    _sweep(json.loads(raw.splitlines()[0]).get("netns") if raw else None, work)
    reader.join(timeout=5)
    if not raw:  # the launcher itself failed (it reports before exec)
        out = b"".join(kept).decode("utf-8", "replace")
        raise ToolError(f"the python sandbox could not start: {out.strip()[-500:]}")
    status, *failed = [json.loads(line) for line in raw.splitlines()]
    if failed:
        raise ToolError(f"the python sandbox could not start: {failed[0]['exec_error']}")
    text = b"".join(kept).decode("utf-8", "replace")
    truncated = bool(size[1]) or len(text) > max_output
    text = text[:max_output]
    code = proc.returncode
    isolated = status["network"] is not None
    note = status["network"] or f"no network namespace ({status.get('network_error', 'unshare failed')})"
    seconds = time.monotonic() - start
    return SandboxResult(code if code >= 0 else None, text, truncated,
                         _reason(code, text, timed_out, timeout, cfg, seconds), isolated, note, status["user"],
                         seconds)


def python_tool(timeout: float = TIMEOUT, memory_mb: int = MEMORY_MB, max_output: int = MAX_OUTPUT) -> Tool:
    """The sandbox as a Tool named `python`: it takes ``code`` and returns what the program printed."""

    def python(code: str) -> str:
        return run_python(code, timeout=timeout, memory_mb=memory_mb, max_output=max_output).text()

    return Tool("python", "Run a Python 3 program in a sandbox (no network, no input, a time limit) and "
                "return what it prints. Use print() to see results.",
                {"type": "object", "properties": {"code": {"type": "string", "description": "the program"}},
                 "required": ["code"], "additionalProperties": False}, python)
