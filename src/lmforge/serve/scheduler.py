"""The scheduler: one thread that owns the engine and drives it step by step (continuous batching).

Request handlers never touch the engine. They submit work through a thread-safe inbox and receive
per-step events on an asyncio queue; the loop admits new sequences and applies cancellations between
steps, so every running sequence advances in one batched forward pass and a disconnected client's
slot is free by the next step.

Other model work (embeddings, prompt scoring) runs on the same thread as tasks: generators that do one
chunk per loop turn, interleaved with the engine's steps, one task at a time in arrival order, and counted
against the same limits. Nothing a
request does can stop the loop: a failure fails that request alone, and a loop that cannot go on says so
through `error` (which /health reports).
"""

from __future__ import annotations

import asyncio
import inspect
import queue
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any

from ..engine import Engine, SamplingParams, Sequence, TokenLogprob
from ..errors import LMForgeError
from .metrics import Metrics


class QueueFull(LMForgeError):
    """Every slot is busy and the waiting queue is full (retry later)."""


class NeverFits(LMForgeError):
    """A request larger than the server's whole capacity: retrying cannot help."""


class SchedulerDown(LMForgeError):
    """The scheduler loop has stopped; no request can be served."""


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
    failed: bool = False


@dataclass
class Task:
    """Model work other than generation. `work()` returns the result, or a generator that yields between
    chunks and returns the result, so long work does not stall the running sequences."""

    work: Callable[[], Any]
    fut: asyncio.Future
    gen: Generator[Any, None, Any] | None = None
    started: bool = False


# The least time between two streamed events of one sequence (seconds); text decoded in between goes out
# together. Each event wakes the server's event loop and the client, and on a small machine those wake-ups
# preempt the decode step's OpenMP threads at their barriers: posting every token cost 12% of a single
# stream's speed on 2 cores (SmolLM2, ~270 tok/s). 20 ms is 50 updates a second, smoother than reading.
STREAM_INTERVAL = 0.02


class Scheduler:
    def __init__(self, engine: Engine, max_queue: int = 64, metrics: Metrics | None = None,
                 stream_interval: float = STREAM_INTERVAL) -> None:
        self.engine = engine
        self.max_queue = max_queue
        self.metrics = metrics or Metrics()
        self.stream_interval = stream_interval
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._load = 0  # sequences submitted and not finished (running + waiting)
        self._owner: dict[int, tuple[Job, int]] = {}  # sequence id -> (job, choice index)
        self._sent: dict[int, int] = {}  # sequence id -> logprobs already sent
        self._last: dict[int, float] = {}  # sequence id -> time of its previous token
        self._posted: dict[int, float] = {}  # sequence id -> time of its last event
        self._held: dict[int, str] = {}  # sequence id -> text decoded since its last event
        self._tasks: deque[Task] = deque()
        self._tasks_in = 0  # tasks queued and not finished (the one being advanced included)
        self._tasks_started = 0
        self.error: str | None = None  # why the loop stopped, if it did
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lmforge-scheduler", daemon=True)
        self._thread.start()

    # -- called from request handlers (any thread) ------------------------------------------------
    @property
    def capacity(self) -> int:
        return self.engine.max_batch + self.max_queue

    def _reserve(self, n: int) -> None:
        if self.error is not None:
            raise SchedulerDown(f"the server cannot serve requests: {self.error}")
        if n > self.capacity:
            raise NeverFits(f"this request needs {n} sequences, but the server runs at most {self.capacity} at "
                            f"once ({self.engine.max_batch} running + {self.max_queue} waiting)")
        with self._lock:
            if self._load + n > self.capacity:
                raise QueueFull(f"the server is busy: {self._load} sequences in flight, room for {self.capacity}")
            self._load += n

    def submit(self, prompts: list[list[int]], params: list[SamplingParams], constraints: list[Any] | None = None
               ) -> Job:
        """Queue one request's sequences (one per choice); raises QueueFull when there is no room now,
        NeverFits when there never will be."""
        n = len(prompts)
        self._reserve(n)
        job = Job(prompts, params, constraints or [None] * n, asyncio.get_running_loop(), asyncio.Queue())
        self._inbox.put(("add", job))
        return job

    def cancel(self, job: Job) -> None:
        job.cancelled = True
        self._inbox.put(("cancel", job))

    async def call(self, work: Callable[[], Any]) -> Any:
        """Run `work` on the scheduler thread (the model is not shared across threads), as one unit of load:
        raises QueueFull when the server is full. If it returns a generator, each `next` is one chunk."""
        self._reserve(1)
        task = Task(work, asyncio.get_running_loop().create_future())
        self._inbox.put(("call", task))
        return await task.fut

    def close(self) -> None:
        self._stop.set()
        self._inbox.put(("stop", None))
        self._thread.join(timeout=10)

    @property
    def waiting(self) -> int:
        return len(self.engine.waiting) + self._tasks_in - self._tasks_started

    @property
    def running(self) -> int:
        return len(self.engine.running) + self._tasks_started

    @property
    def alive(self) -> bool:
        return self.error is None and self._thread.is_alive()

    # -- the loop (scheduler thread) ----------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as e:  # only a bug in the loop itself gets here: say so, and fail what is pending
            self.error = f"the scheduler loop stopped: {type(e).__name__}: {e}"
            traceback.print_exc()
            self._fail_everything(SchedulerDown(self.error))

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                # Block only when idle; between steps just drain what has arrived.
                busy = self.engine.has_work or self._tasks
                cmd = self._inbox.get(timeout=0 if busy else None)
            except queue.Empty:
                cmd = None
            while cmd is not None:
                self._handle(*cmd)
                try:
                    cmd = self._inbox.get_nowait()
                except queue.Empty:
                    cmd = None
            if self._tasks:
                self._advance_task()
            if self.engine.has_work:
                self._step()
            self.metrics.set_gauges(waiting=self.waiting, running=self.running)

    def _handle(self, kind: str, arg: Any) -> None:
        if kind == "add":
            try:
                self._add(arg)
            except Exception as e:  # anything wrong with one request fails that request alone
                self._fail_job(arg, e)
        elif kind == "cancel":
            for seq in arg.seqs:
                if not seq.done:
                    self.engine.cancel(seq)
                    self.metrics.tokens_out.inc(len(seq.output_ids))
                    self._finish(seq)
        elif kind == "call":
            self._tasks_in += 1
            self._tasks.append(arg)

    def _add(self, job: Job) -> None:
        if job.cancelled:
            self._release(len(job.prompts))
            return
        for i, (prompt, params, constraint) in enumerate(zip(job.prompts, job.params, job.constraints)):
            try:
                seq = self.engine.enqueue(prompt, params)  # checked at the server's edge
            except Exception:
                self._release(len(job.prompts) - i)  # the ones never added; the added ones via _fail_job
                raise
            seq.constraint = constraint
            job.seqs.append(seq)
            self._owner[seq.id] = (job, i)
            self._sent[seq.id] = 0

    def _step(self) -> None:
        before = {s.id for s in self.engine.running.values()}
        preempted = self.engine.preemptions
        try:
            moved = self.engine.step()
        except Exception as e:
            # A failure the engine could not pin on one row: fail the step's rows (the sequences admitted by
            # this step if it prefilled, else every running one), not the waiting ones.
            running = list(self.engine.running.values())
            rows = [s for s in running if s.id not in before] or running
            for job in {id(j): j for j, _ in (self._owner[s.id] for s in rows if s.id in self._owner)}.values():
                self._fail_job(job, e)
            for s in rows:  # rows without a job (none today) must not keep their slots either
                self.engine.cancel(s)
            return
        if self.engine.preemptions > preempted:
            self.metrics.preemptions.inc(self.engine.preemptions - preempted)
        self._publish(moved)

    def _advance_task(self) -> None:
        """One chunk of the oldest task. Tasks run one at a time, in order: a scoring task holds a KV cache
        for its prompt, outside the engine's budget, so only one such cache may exist at once."""
        task = self._tasks.popleft()
        if task.fut.cancelled():  # the caller went away
            self._end_task(task, None, None)
            return
        if not task.started:
            task.started = True
            self._tasks_started += 1
        try:
            if task.gen is None:
                result = task.work()
                if not inspect.isgenerator(result):
                    self._end_task(task, result, None)
                    return
                task.gen = result
            next(task.gen)
        except StopIteration as stop:
            self._end_task(task, stop.value, None)
            return
        except Exception as e:
            self._end_task(task, None, e)
            return
        self._tasks.appendleft(task)

    def _end_task(self, task: Task, result: Any, error: Exception | None) -> None:
        if task.gen is not None:
            task.gen.close()
        if task.started:
            self._tasks_started -= 1
        self._tasks_in -= 1
        self._release(1)
        try:
            task.fut.get_loop().call_soon_threadsafe(_resolve, task.fut, result, error)
        except RuntimeError:  # the caller's event loop is gone
            pass

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
            delta = self._held.pop(seq.id, "") + delta
            if seq.error is None and not seq.done and now - self._posted.get(seq.id, -1.0) < self.stream_interval:
                self._held[seq.id] = delta  # sent with the next event (its logprobs too: `_sent` stays)
                continue
            self._posted[seq.id] = now
            sent = self._sent[seq.id]
            lps = seq.logprobs[sent:]
            self._sent[seq.id] = len(seq.logprobs)
            ev = Event(index, delta, lps, seq.finish_reason, len(seq.output_ids),
                       list(seq.output_ids) if seq.done else [])
            if seq.error is not None:  # the engine failed this sequence alone: fail its request
                self._fail_job(job, seq.error)
                continue
            _post(job, ev)
            if seq.done:
                self.metrics.tokens_out.inc(len(seq.output_ids))
                self._finish(seq)

    def _finish(self, seq: Sequence) -> None:
        if self._owner.pop(seq.id, None) is not None:
            if seq.spec is not None and seq.spec.proposed:
                self.metrics.draft_tokens.inc(seq.spec.accepted, result="accepted")
                self.metrics.draft_tokens.inc(seq.spec.proposed - seq.spec.accepted, result="rejected")
            for d in (self._sent, self._last, self._posted, self._held):
                d.pop(seq.id, None)
            self._release(1)

    def _release(self, n: int) -> None:
        with self._lock:
            self._load -= n

    def _fail_job(self, job: Job, error: Exception) -> None:
        """End every sequence of one request and hand it the error (once)."""
        for seq in job.seqs:
            if not seq.done:
                self.engine.cancel(seq)
            self._finish(seq)
        if not job.failed:
            job.failed = True
            _post(job, error)

    def _fail_everything(self, error: Exception) -> None:
        for job in {id(j): j for j, _ in list(self._owner.values())}.values():
            try:
                self._fail_job(job, error)
            except Exception:  # keep failing the others
                pass
        while self._tasks:
            self._end_task(self._tasks.popleft(), None, error)
        while True:  # what arrived but was never handled
            try:
                kind, arg = self._inbox.get_nowait()
            except queue.Empty:
                break
            if kind == "add":
                _post(arg, error)
            elif kind == "call":
                self._tasks_in += 1
                self._end_task(arg, None, error)


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
