"""What stands in front of the routes: the server's limits, OpenAI's error envelope, API keys and body size."""

from __future__ import annotations

import hmac
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi.responses import JSONResponse

from ..errors import LMForgeError
from .metrics import Metrics
from .scheduler import STREAM_INTERVAL

OPEN_PATHS = frozenset({"/health", "/", "/favicon.ico", "/openapi.json"})  # no API key needed
OPEN_PREFIXES = ("/static/",)  # the web page's scripts and styles: public, like the page itself
ROUTES = ("/health", "/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/tokenize",
          "/detokenize", "/tokenizer_info", "/openapi.json", "/metrics", "/")


@dataclass
class ServerConfig:
    model_name: str
    api_keys: list[str] = field(default_factory=list)
    max_batch: int = 16
    max_queue: int = 64
    ctx: int | None = None
    kv_memory: int | None = None  # bytes for the KV cache, all slots together; None: the engine's default
    draft_tokens: int | None = None  # speculative decoding's most guesses a step; None: the engine's default
    stream_interval: float = STREAM_INTERVAL  # seconds: the least time between two streamed events of a sequence
    max_body_bytes: int = 4 * 2**20
    max_messages: int = 512
    max_inputs: int = 256  # embeddings inputs / completion prompts per request

    def __post_init__(self) -> None:
        self.api_keys = check_api_keys(self.api_keys, "api_keys") if self.api_keys else []


def check_api_keys(keys: list[str], source: str) -> list[str]:
    """The keys, stripped; an empty one is refused, since it would let every request in."""
    out = [k.strip() for k in keys]
    if not all(out):
        raise LMForgeError(f"{source}: an API key must not be empty (leave it out to serve without keys)")
    return out


class APIError(Exception):
    """An error answered in OpenAI's envelope."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        """OpenAI's error object (also sent as an event when a stream fails after its headers)."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def envelope(status: int, message: str, type_: str, param: str | None = None, code: str | None = None,
             headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}}, status,
                        headers=headers)


def error_response(e: APIError) -> JSONResponse:
    return envelope(e.status, e.message, e.type, e.param, e.code, e.headers)


# -- middleware: API keys, body size, request counts ------------------------------------------------------
class Gate:
    """Pure ASGI middleware, so oversized bodies are refused without ever being handed to the app."""

    def __init__(self, app: Any, cfg: ServerConfig, metrics: Metrics) -> None:
        self.app, self.cfg, self.metrics = app, cfg, metrics
        self.keys = [k.encode() for k in cfg.api_keys]

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        auth = headers.get(b"authorization", b"")
        scheme, _, given = auth.partition(b" ")
        if scheme.lower() != b"bearer":
            given = b""
        ok = False
        for key in self.keys:  # no early exit: the time taken says nothing about which key is close
            ok |= hmac.compare_digest(given.strip(), key)
        return ok

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        status: list[int] = [0]

        async def send_and_count(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self._handle(scope, receive, send_and_count, path)
        finally:
            self.metrics.requests.inc(endpoint=path if path in ROUTES else "other", status=str(status[0]))

    async def _handle(self, scope: dict, receive: Callable, send: Callable, path: str) -> None:
        headers = dict(scope.get("headers") or [])
        if (self.keys and path not in OPEN_PATHS and not path.startswith(OPEN_PREFIXES)
                and not self._authorized(headers)):
            await envelope(401, "invalid or missing API key (send `Authorization: Bearer KEY`)",
                            "invalid_request_error", None, "invalid_api_key")(scope, receive, send)
            return
        limit = self.cfg.max_body_bytes
        too_big = envelope(413, f"request body is larger than the {limit} bytes allowed", "invalid_request_error",
                            None, "request_too_large")
        try:
            declared = int(headers.get(b"content-length", b"0") or 0)
        except ValueError:
            declared = 0
        if declared > limit:
            await too_big(scope, receive, send)
            return
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        # Read the body here (bounded) and replay it, so a chunked body cannot grow past the limit either.
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                await too_big(scope, receive, send)
                return
            if not message.get("more_body"):
                break
        body, replayed = b"".join(chunks), False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
