"""What goes back to the client: OpenAI's choice, chunk and logprob shapes, server-sent events, and the HTTP
error an exception stands for."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from ..engine import TokenLogprob
from ..errors import LMForgeError
from ..tools.calling import CallStream, ToolChoice, parse_calls
from .gate import APIError
from .scheduler import Event, NeverFits, QueueFull, SchedulerDown

TokenText = Callable[[int], str]


# -- errors -----------------------------------------------------------------------------------------------------
def api_error_for(e: Exception) -> APIError:
    """The HTTP answer to an error: lmforge's own are the client's (400, naming the field where known) or the
    server's state (429 busy, 503 down); anything else is an internal error."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, QueueFull):
        return APIError(429, str(e), "rate_limit_error", None, "queue_full", headers={"Retry-After": "1"})
    if isinstance(e, NeverFits):
        return APIError(400, str(e), param="n", code="request_too_large")
    if isinstance(e, SchedulerDown):
        return APIError(503, str(e), "server_error", code="server_unavailable")
    if isinstance(e, LMForgeError):
        return APIError(400, str(e), param=getattr(e, "param", None))
    return APIError(500, f"internal error: {type(e).__name__}: {e}", "server_error")


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def stream_error(e: Exception) -> str:
    """A failure after the stream's headers went out is reported in-band, as OpenAI does; [DONE] follows."""
    return sse(api_error_for(e).body()) + "data: [DONE]\n\n"


def finish(reason: str | None) -> str:
    return "length" if reason == "length" else "stop"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


# -- logprobs ---------------------------------------------------------------------------------------------------
def completion_logprobs(token_text: TokenText, lps: list[TokenLogprob | None], offset: int) -> dict[str, Any]:
    tokens, token_lps, tops, offsets = [], [], [], []
    for lp in lps:
        if lp is None:  # the first prompt token has no context to be predicted from
            continue
        text = token_text(lp.token_id)
        tokens.append(text)
        token_lps.append(lp.logprob)
        tops.append({token_text(i): v for i, v in lp.top} if lp.top else None)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def echo_logprobs(token_text: TokenText, prompt: list[int], plps: list[TokenLogprob | None]) -> dict[str, Any]:
    tokens, token_lps, tops, offsets, offset = [], [], [], [], 0
    for i, lp in zip(prompt, plps):
        text = token_text(i)
        tokens.append(text)
        token_lps.append(None if lp is None else lp.logprob)
        tops.append(None if lp is None else {token_text(a): v for a, v in lp.top} if lp.top else None)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(token_text: TokenText, lps: list[TokenLogprob]) -> dict[str, Any]:
    def entry(i: int, v: float) -> dict[str, Any]:
        text = token_text(i)
        return {"token": text, "logprob": v, "bytes": list(text.encode("utf-8"))}

    return {"content": [entry(lp.token_id, lp.logprob) | {"top_logprobs": [entry(i, v) for i, v in lp.top]}
                        for lp in lps], "refusal": None}


# -- choices ----------------------------------------------------------------------------------------------------
class Choices:
    """How one endpoint shapes its choices; the generation path (`generation.respond`) drives it. One instance
    per request: it keeps the per-choice state that formatting needs (logprobs shown, text offsets)."""

    object = ""  # a whole response's "object"
    chunk_object = ""  # a stream chunk's

    def __init__(self, base: dict[str, Any], n: int, with_logprobs: bool, token_text: TokenText) -> None:
        self.base, self.n, self.with_logprobs, self.token_text = base, n, with_logprobs, token_text

    def logprobs_of(self, ev: Event) -> list[TokenLogprob]:
        """The logprob entries an event contributes to its choice."""
        return ev.logprobs

    def opening(self) -> list[dict[str, Any]]:
        """Stream choices sent before any token."""
        return []

    def delta(self, index: int, text: str, lps: list[TokenLogprob]) -> dict[str, Any]:
        raise NotImplementedError

    def deltas(self, index: int, text: str, lps: list[TokenLogprob]) -> list[dict[str, Any]]:
        """The stream choices one event's text (and logprobs) make."""
        return [self.delta(index, text, lps)] if text or (lps and self.with_logprobs) else []

    def closing(self, index: int) -> list[dict[str, Any]]:
        """Stream choices that a finished choice still holds back, sent before its finish reason."""
        return []

    def finished(self, index: int, reason: str) -> dict[str, Any]:
        raise NotImplementedError

    def choice(self, index: int, text: str, lps: list[TokenLogprob], reason: str) -> dict[str, Any]:
        raise NotImplementedError


class ChatChoices(Choices):
    object, chunk_object = "chat.completion", "chat.completion.chunk"

    def __init__(self, base: dict[str, Any], n: int, with_logprobs: bool, token_text: TokenText,
                 tools: ToolChoice | None = None) -> None:
        super().__init__(base, n, with_logprobs, token_text)
        self.shown = [0] * n  # logprob entries passed on, per choice
        # With tools to call, the output is parsed for calls (a stream parser per choice).
        self.names = {f["name"] for f in tools.functions} if tools is not None and tools.constrained else None
        self.streams = [CallStream(self.names) for _ in range(n)] if self.names is not None else None

    def logprobs_of(self, ev: Event) -> list[TokenLogprob]:
        # Chat logprobs cover the content, as OpenAI's do: not the end-of-turn token that ended it.
        keep = ev.logprobs[:max(0, ev.completion_tokens - self.shown[ev.index])]
        self.shown[ev.index] += len(keep)
        return keep

    def _logprobs(self, lps: list[TokenLogprob]) -> dict[str, Any] | None:
        return chat_logprobs(self.token_text, lps) if self.with_logprobs else None

    def opening(self) -> list[dict[str, Any]]:
        return [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                for i in range(self.n)]

    def delta(self, index: int, text: str, lps: list[TokenLogprob]) -> dict[str, Any]:
        return {"index": index, "delta": {"content": text}, "logprobs": self._logprobs(lps), "finish_reason": None}

    def deltas(self, index: int, text: str, lps: list[TokenLogprob]) -> list[dict[str, Any]]:
        if self.streams is None:
            return super().deltas(index, text, lps)
        parts = self.streams[index].feed(text)
        if lps and self.with_logprobs and not parts:
            parts = [{"content": ""}]  # the logprobs of tokens whose text is held back
        return [{"index": index, "delta": d, "logprobs": self._logprobs(lps) if k == 0 else None,
                 "finish_reason": None} for k, d in enumerate(parts)]

    def closing(self, index: int) -> list[dict[str, Any]]:
        if self.streams is None:
            return []
        return [{"index": index, "delta": d, "logprobs": None, "finish_reason": None}
                for d in self.streams[index].close()]

    def finished(self, index: int, reason: str) -> dict[str, Any]:
        if self.streams is not None and self.streams[index].calls and reason == "stop":
            reason = "tool_calls"
        return {"index": index, "delta": {}, "logprobs": None, "finish_reason": reason}

    def choice(self, index: int, text: str, lps: list[TokenLogprob], reason: str) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if self.names is not None:
            message["content"], calls = parse_calls(text, self.names)
            if calls:
                message["tool_calls"] = calls
                reason = "tool_calls" if reason == "stop" else reason
        return {"index": index, "message": message, "logprobs": self._logprobs(lps), "finish_reason": reason}


class CompletionChoices(Choices):
    """Completions; with ``echo`` each choice starts with its prompt's text (and, with logprobs, the prompt's
    scored tokens: ``prompt_lps`` per prompt)."""

    object = chunk_object = "text_completion"

    def __init__(self, base: dict[str, Any], n: int, with_logprobs: bool, token_text: TokenText, *,
                 echo: bool, owner: list[int], texts_in: list[str], prompts: list[list[int]],
                 prompt_lps: list[list[TokenLogprob | None]]) -> None:
        super().__init__(base, n, with_logprobs, token_text)
        self.echo, self.owner, self.texts_in, self.prompts, self.prompt_lps = echo, owner, texts_in, prompts, prompt_lps
        self.offsets = [len(self.prefix(i)) for i in range(n)]  # text offsets of streamed logprobs

    def prefix(self, i: int) -> str:
        return self.texts_in[self.owner[i]] if self.echo else ""

    def echo_logprobs(self, i: int) -> dict[str, Any]:
        p = self.owner[i]
        return echo_logprobs(self.token_text, self.prompts[p], self.prompt_lps[p]) if self.prompt_lps else \
            {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}

    def prompt_only(self) -> list[dict[str, Any]]:
        """The choices of a request that generates nothing (max_tokens 0 with echo): the prompts, scored."""
        return [{"index": i, "text": self.texts_in[self.owner[i]], "finish_reason": "length",
                 "logprobs": self.echo_logprobs(i) if self.with_logprobs else None} for i in range(self.n)]

    def opening(self) -> list[dict[str, Any]]:
        if not self.echo:
            return []
        return [{"index": i, "text": self.texts_in[self.owner[i]],
                 "logprobs": self.echo_logprobs(i) if self.with_logprobs else None, "finish_reason": None}
                for i in range(self.n)]

    def delta(self, index: int, text: str, lps: list[TokenLogprob]) -> dict[str, Any]:
        lp = completion_logprobs(self.token_text, lps, self.offsets[index]) if self.with_logprobs else None
        self.offsets[index] += len(text)
        return {"index": index, "text": text, "logprobs": lp, "finish_reason": None}

    def finished(self, index: int, reason: str) -> dict[str, Any]:
        return {"index": index, "text": "", "logprobs": None, "finish_reason": reason}

    def choice(self, index: int, text: str, lps: list[TokenLogprob], reason: str) -> dict[str, Any]:
        prefix = self.prefix(index)
        logprobs = None
        if self.with_logprobs:
            logprobs = completion_logprobs(self.token_text, lps, len(prefix))
            if self.echo:
                echo = self.echo_logprobs(index)
                logprobs = {k: echo[k] + logprobs[k] for k in echo}
        return {"index": index, "text": prefix + text, "logprobs": logprobs, "finish_reason": reason}
