"""Start an lmforge server in-process on a free loopback port (a real uvicorn server, real HTTP)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import uvicorn

import lmforge
from lmforge.serve import ServerConfig, create_app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RunningServer:
    def __init__(self, model: str | Path | lmforge.LM, **cfg: object) -> None:
        self.lm = model if isinstance(model, lmforge.LM) else lmforge.load(model)  # an LM: served as it is
        self.cfg = ServerConfig(**({"model_name": "tiny"} | cfg))  # type: ignore[arg-type]
        self.app = create_app(self.lm, self.cfg)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    timeout_graceful_shutdown=1))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> RunningServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)


@contextmanager
def serve_process(model: str | Path, *args: str, log: Path, env: dict[str, str] | None = None,
                  timeout: float = 120) -> Iterator[tuple[subprocess.Popen, str]]:
    """`lmforge serve MODEL ARGS` in its own process, as a user runs it: (process, base URL) once /health
    answers; its stdout and stderr go to `log`. Stopped on exit."""
    port = free_port()
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "lmforge", "serve", str(model), "--port", str(port), *args],
                                stdout=f, stderr=subprocess.STDOUT, env=os.environ | (env or {}))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"lmforge serve exited: {log.read_text()[-2000:]}")
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"lmforge serve did not start: {log.read_text()[-2000:]}")
            time.sleep(0.2)
        yield proc, url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
