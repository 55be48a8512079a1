"""Start an lmforge server in-process on a free loopback port (a real uvicorn server, real HTTP)."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import uvicorn

import lmforge
from lmforge.serve import ServerConfig, create_app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RunningServer:
    def __init__(self, model: str | Path, **cfg: object) -> None:
        self.lm = lmforge.load(model)
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
