"""The scheduler: one thread that owns the engine and drives it step by step (continuous batching).

Request handlers never touch the engine. They submit work through a thread-safe inbox and receive
per-step events on an asyncio queue; the loop admits new sequences and applies cancellations between
steps, so every running sequence advances in one batched forward pass and a disconnected client's
slot is free by the next step.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..engine import Engine, SamplingParams, Sequence, TokenLogprob
from ..errors import LMForgeError
from .metrics import Metrics


class QueueFull(LMForgeError):
    """Every slot is busy and the waiting queue is full."""


@dataclass
class Event:
    """What one sequence did in one step, copied out of the engine for the request's event loop."""

    index: int
    text: str
    logprobs: list[TokenLogprob]
    finish_reason: str | None = None
    completion_tokens: int = 0
    token_ids: list[int] = field(default_factory=list)


@dataclass
class Job:
    prompts: list[list[int]]
    params: list[SamplingParams]
    constraints: list[Any]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    submitted: float = field(default_factory=time.perf_counter)
    seqs: list[Sequence] = field(default_factory=list)
    cancelled: bool = False


class Scheduler:
    def __init__(self, engine: Engine, max_queue: int = 64, metrics: Metrics | None = None) -> None:
        self.engine = engine
        self.max_queue = max_queue
        self.metrics = metrics or Metrics()
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._load = 0  # sequences submitted and not finished (running + waiting)
        self._owner: dict[int, tuple[Job, int]] = {}  # sequence id -> (job, choice index)
        self._sent: dict[int, int] = {}  # sequence id -> logprobs already sent
        self._last: dict[int, float] = {}  # sequence id -> time of its previous token
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lmforge-scheduler", daemon=True)
        self._thread.start()

    # -- called from request handlers (any thread) ------------------------------------------------
    @property
    def capacity(self) -> int:
        return self.engine.max_batch + self.max_queue

    def submit(self, prompts: list[list[int]], params: list[SamplingParams], constraints: list[Any] | None = None
               ) -> Job:
        """Queue one request's sequences (one per choice); raises QueueFull when there is no room."""
        n = len(prompts)
        with self._lock:
            if self._load + n > self.capacity:
                raise QueueFull(f"the server is busy: {self._load} sequences in flight, room for {self.capacity}")
            self._load += n
        job = Job(prompts, params, constraints or [None] * n, asyncio.get_running_loop(), asyncio.Queue())
        self._inbox.put(("add", job))
        return job

    def cancel(self, job: Job) -> None:
        job.cancelled = True
        self._inbox.put(("cancel", job))

    async def call(self, fn: Callable[[], Any]) -> Any:
        """Run fn on the scheduler thread between steps (the model is not shared across threads)."""
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        self._inbox.put(("call", (fut, fn)))
        return await fut

    def close(self) -> None:
        self._stop.set()
        self._inbox.put(("stop", None))
        self._thread.join(timeout=10)

    @property
    def waiting(self) -> int:
        return len(self.engine.waiting)

    @property
    def running(self) -> int:
        return len(self.engine.running)

    # -- the loop (scheduler thread) ----------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                # Block only when idle; between steps just drain what has arrived.
                cmd = self._inbox.get(timeout=None if not self.engine.has_work else 0)
            except queue.Empty:
                cmd = None
            while cmd is not None:
                self._handle(*cmd)
                try:
                    cmd = self._inbox.get_nowait()
                except queue.Empty:
                    cmd = None
            if self.engine.has_work:
                try:
                    moved = self.engine.step()
                except Exception as e:  # a failed step must not kill the server: fail what was in it
                    self._fail_all(e)
                    continue
                self._publish(moved)
            self.metrics.set_gauges(waiting=len(self.engine.waiting), running=len(self.engine.running))

    def _handle(self, kind: str, arg: Any) -> None:
        if kind == "add":
            self._add(arg)
        elif kind == "cancel":
            for seq in arg.seqs:
                if not seq.done:
                    self.engine.cancel(seq)
                    self.metrics.tokens_out.inc(len(seq.output_ids))
                    self._finish(seq)
        elif kind == "call":
            fut, fn = arg
            try:
                result, error = fn(), None
            except Exception as e:
                result, error = None, e
            try:
                fut.get_loop().call_soon_threadsafe(_resolve, fut, result, error)
            except RuntimeError:  # the caller's event loop is gone
                pass

    def _add(self, job: Job) -> None:
        if job.cancelled:
            self._release(len(job.prompts))
            return
        for i, (prompt, params, constraint) in enumerate(zip(job.prompts, job.params, job.constraints)):
            try:
                seq = self.engine.add(prompt, params)
            except LMForgeError as e:
                self._release(len(job.prompts) - i)
                for s in job.seqs:
                    self.engine.cancel(s)
                    self._finish(s)
                _post(job, e)
                return
            seq.constraint = constraint
            job.seqs.append(seq)
            self._owner[seq.id] = (job, i)
            self._sent[seq.id] = 0

    def _publish(self, moved: list[tuple[Sequence, str]]) -> None:
        now = time.perf_counter()
        for seq, delta in moved:
            owner = self._owner.get(seq.id)
            if owner is None:
                continue
            job, index = owner
            last = self._last.get(seq.id)
            if last is None:
                self.metrics.ttft.observe(now - job.submitted)
            else:
                self.metrics.itl.observe(now - last)
            self._last[seq.id] = now
            sent = self._sent[seq.id]
            lps = seq.logprobs[sent:]
            self._sent[seq.id] = len(seq.logprobs)
            ev = Event(index, delta, lps, seq.finish_reason, len(seq.output_ids),
                       list(seq.output_ids) if seq.done else [])
            _post(job, ev)
            if seq.done:
                self.metrics.tokens_out.inc(len(seq.output_ids))
                self._finish(seq)

    def _finish(self, seq: Sequence) -> None:
        if self._owner.pop(seq.id, None) is not None:
            self._sent.pop(seq.id, None)
            self._last.pop(seq.id, None)
            self._release(1)

    def _release(self, n: int) -> None:
        with self._lock:
            self._load -= n

    def _fail_all(self, error: Exception) -> None:
        jobs = {id(job): job for job, _ in self._owner.values()}
        for seq in list(self.engine.waiting) + list(self.engine.running.values()):
            self.engine.cancel(seq)
            self._finish(seq)
        for job in jobs.values():
            _post(job, error)


def _resolve(fut: asyncio.Future, result: Any, error: Exception | None) -> None:
    if fut.done():
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)


def _post(job: Job, item: Event | Exception) -> None:
    try:
        job.loop.call_soon_threadsafe(job.events.put_nowait, item)
    except RuntimeError:  # the request's event loop has closed (server shutting down)
        pass
