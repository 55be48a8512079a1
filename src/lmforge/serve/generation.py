"""The one generation path of chat and completions: submit a request's sequences to the scheduler, then
collect the choices (or stream the chunks) with in-band errors and usage, in the endpoint's `Choices` shape."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from ..engine import SamplingParams, TokenLogprob
from ..engine.structured import Grammar
from ..errors import LMForgeError
from .formatting import Choices, api_error_for, finish, sse, stream_error, usage
from .scheduler import Event, Job
from .server import Server


async def respond(server: Server, request: Request, prompts: list[list[int]], params: list[SamplingParams],
                  grammar: Grammar | None, choices: Choices, *, stream: bool, include_usage: bool,
                  prompt_tokens: int) -> Any:
    """Run one sequence per (prompt, params) pair and answer with a whole response or an event stream."""
    job = server.scheduler.submit(prompts, params, server.constraints(grammar, len(prompts)))  # 429 / 400
    server.metrics.tokens_in.inc(sum(len(p) for p in prompts))
    if stream:
        return _streaming(server, _chunks(server, job, choices, include_usage, prompt_tokens), job)
    n = choices.n
    texts, reasons, counts = [""] * n, [None] * n, [0] * n
    lps: list[list[TokenLogprob]] = [[] for _ in range(n)]
    async for ev in events(server, job, request):
        texts[ev.index] += ev.text
        lps[ev.index].extend(choices.logprobs_of(ev))
        if ev.finish_reason is not None:
            reasons[ev.index], counts[ev.index] = ev.finish_reason, ev.completion_tokens
    return {**choices.base, "object": choices.object,
            "choices": [choices.choice(i, texts[i], lps[i], finish(reasons[i])) for i in range(n)],
            "usage": usage(prompt_tokens, sum(counts))}


async def _chunks(server: Server, job: Job, choices: Choices, include_usage: bool, prompt_tokens: int
                  ) -> AsyncIterator[str]:
    chunk = {**choices.base, "object": choices.chunk_object}
    extra = {"usage": None} if include_usage else {}
    for c in choices.opening():
        yield sse(chunk | {"choices": [c]} | extra)
    total = 0
    try:
        async for ev in events(server, job, None):
            for c in choices.deltas(ev.index, ev.text, choices.logprobs_of(ev)):
                yield sse(chunk | {"choices": [c]} | extra)
            if ev.finish_reason is not None:
                total += ev.completion_tokens
                for c in choices.closing(ev.index):
                    yield sse(chunk | {"choices": [c]} | extra)
                yield sse(chunk | {"choices": [choices.finished(ev.index, finish(ev.finish_reason))]} | extra)
    except Exception as e:  # headers are gone: report in-band, as OpenAI does
        yield stream_error(e)
        return
    if include_usage:
        yield sse(chunk | {"choices": [], "usage": usage(prompt_tokens, total)})
    yield "data: [DONE]\n\n"


async def events(server: Server, job: Job, request: Request | None) -> AsyncIterator[Event]:
    """The job's events until every sequence finishes; cancels the job if abandoned or disconnected."""
    remaining = len(job.prompts)
    watcher = asyncio.create_task(_watch_disconnect(server, request, job)) if request is not None else None
    try:
        while remaining:
            item = await job.events.get()
            if isinstance(item, LMForgeError):
                raise api_error_for(item)
            if isinstance(item, Exception):
                raise item
            if item.finish_reason is not None:
                remaining -= 1
            yield item
    finally:
        if watcher is not None:
            watcher.cancel()
        if remaining:
            server.scheduler.cancel(job)


async def _watch_disconnect(server: Server, request: Request, job: Job) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            server.scheduler.cancel(job)
            return


def _streaming(server: Server, gen: AsyncIterator[str], job: Job) -> StreamingResponse:
    async def guarded() -> AsyncIterator[str]:
        complete = False
        try:
            async for part in gen:
                yield part
            complete = True
        finally:  # the client went away (Starlette cancels the stream): free the slots now
            if not complete:
                server.scheduler.cancel(job)

    return StreamingResponse(guarded(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
