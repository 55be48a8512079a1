"""The agent loop, ReAct-style over a task list: the model plans (calls `plan` with tasks), then each step
acts on the current task with one tool call and observes the result, revises the list when it wants
(`plan` again), and ends by calling `final_answer` (or, when it may answer in text, by answering without a
call). Every run is bounded: steps (model turns), generated tokens and wall-clock time, and it stops when
the conversation no longer fits the context. Each event goes to the transcript as one JSON line as it
happens, and to ``on_event`` (the CLI prints them).
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import LMForgeError
from ..tools import Tool, get_tool, to_openai, tool_from_function
from ..tools.grammar import CALL_OPEN
from .backends import AgentError, Backend, ContextFull, LocalBackend

PLAN, FINAL = "plan", "final_answer"
DEFAULT_MAX_STEPS = 8
DEFAULT_MAX_TOKENS = 4096  # generated tokens, all steps together
DEFAULT_STEP_TOKENS = 512  # the most one reply may generate
DEFAULT_TIMEOUT = 300.0  # seconds
MAX_OBSERVATION = 4000  # characters of a tool result the model is shown (the transcript keeps it whole)

SYSTEM = (
    "You are an agent: you reach a goal in steps, using tools.\n"
    "1. First call `plan` with a short list of tasks that reach the goal.\n"
    "2. Then do the current task: call one tool for it. Its result comes back to you, and the next task "
    "becomes current.\n"
    "3. After a result, you may call `plan` again if the remaining tasks should change.\n"
    "4. When the goal is met, call `final_answer` with the answer."
)

CONTROL_TOOLS = [
    {"type": "function", "function": {
        "name": PLAN, "description": "Set the list of tasks that remain to reach the goal, in order.",
        "parameters": {"type": "object", "properties": {"tasks": {
            "type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1, "description": "the tasks, in order"}},
            "required": ["tasks"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": FINAL, "description": "Give the final answer to the goal; this ends the work.",
        "parameters": {"type": "object", "properties": {"answer": {"type": "string", "description": "the answer"}},
                       "required": ["answer"], "additionalProperties": False}}},
]


@dataclass
class AgentResult:
    """How a run ended: ``answer`` (None unless the model gave one), ``stop_reason`` (``final_answer``,
    ``max_steps``, ``max_tokens``, ``timeout``, ``context_full``), the steps taken, the tokens used
    (``prompt_tokens``, ``completion_tokens``), the seconds, the final task list, every event, the whole
    conversation, and the transcript's path."""

    answer: str | None
    stop_reason: str
    steps: int
    usage: dict[str, int]
    seconds: float
    tasks: list[dict[str, str]]
    events: list[dict[str, Any]] = field(repr=False)
    messages: list[dict[str, Any]] = field(repr=False)
    transcript: Path | None = None


class Transcript:
    """A JSONL file, appended one event per line as it happens: each line is one ``write`` on a file opened
    for appending, so a reader (or a crash) never sees half an event."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        except OSError as e:
            raise AgentError(f"cannot write the transcript {self.path}: {e.strerror}") from None

    def write(self, event: dict[str, Any]) -> None:
        data = (json.dumps(event, ensure_ascii=False) + "\n").encode()
        while data:
            data = data[os.write(self.fd, data):]

    def close(self) -> None:
        os.close(self.fd)


def resolve_tools(tools: Iterable[str | Tool | Callable[..., Any]]) -> list[Tool]:
    """Tools by registry name (``get_tool``), as Tool objects, or as typed, documented functions
    (``tool_from_function``); a name the loop itself uses, or one given twice, is an AgentError."""
    out: list[Tool] = []
    for t in tools:
        tool = get_tool(t) if isinstance(t, str) else t if isinstance(t, Tool) else tool_from_function(t)
        if tool.name in (PLAN, FINAL):
            raise AgentError(f"tool name {tool.name!r} is the agent's own; rename the tool")
        if tool.name in {o.name for o in out}:
            raise AgentError(f"tool {tool.name!r} is given twice")
        out.append(tool)
    return out


def _arguments(raw: Any) -> dict[str, Any] | str:
    """A call's arguments as an object, or the reason they are not one."""
    if isinstance(raw, dict):
        return raw
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return {}
    if not isinstance(raw, str):
        return f"arguments must be a JSON object, got {type(raw).__name__}"
    try:
        out = json.loads(raw)
    except ValueError as e:
        return f"arguments are not valid JSON ({e})"
    return out if isinstance(out, dict) else f"arguments must be a JSON object, got {type(out).__name__}"


def _normalize(calls: Any) -> tuple[list[dict[str, Any]], list[str]]:
    """Well-formed OpenAI tool calls (arguments a JSON object, an id given) and what was wrong with the rest."""
    good, bad = [], []
    for i, call in enumerate(calls if isinstance(calls, list) else [calls]):
        fn = call.get("function") if isinstance(call, dict) else None
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str) or not name:
            bad.append(f"tool call {i} has no function name: {json.dumps(call, default=str)[:200]}")
            continue
        args = _arguments(fn.get("arguments"))
        if isinstance(args, str):
            bad.append(f"the call to {name!r} could not be used: {args}: {str(fn.get('arguments'))[:200]}")
            continue
        good.append({"id": call.get("id") or f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                     "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}})
    return good, bad


def _clip(text: str, limit: int = MAX_OBSERVATION) -> str:
    return text if len(text) <= limit else f"{text[:limit]}\n[... {len(text) - limit} more characters cut]"


def run(goal: str, backend: Backend | Any, tools: Iterable[str | Tool | Callable[..., Any]] = ("calculator",),
        *, max_steps: int = DEFAULT_MAX_STEPS, max_tokens: int = DEFAULT_MAX_TOKENS,
        step_tokens: int = DEFAULT_STEP_TOKENS, timeout: float = DEFAULT_TIMEOUT,
        transcript: str | Path | None = None, on_event: Callable[[dict[str, Any]], None] | None = None,
        tool_choice: str = "required", system: str = SYSTEM) -> AgentResult:
    """Run the agent toward ``goal`` and return how it ended (`AgentResult`).

    ``backend``: a loaded model (`lmforge.load`), an `OpenAIBackend`, or any object with ``complete``.
    ``tools``: registry names, Tools, or typed, documented functions. Budgets: ``max_steps`` model turns,
    ``max_tokens`` generated tokens in all (a turn starts only while its ``step_tokens`` fit in what is
    left), ``timeout`` seconds (checked before each turn and while a local model generates; a tool already
    running finishes first, within its own limits). ``tool_choice``: ``required`` (every turn calls a
    tool, `final_answer` included) or ``auto`` (a turn without a call is the final answer). Backend failures are raised as AgentError after they
    are recorded. ``transcript``: a JSONL file the events are appended to."""
    if not isinstance(goal, str) or not goal.strip():
        raise AgentError("the goal is empty")
    for name, value in (("max_steps", max_steps), ("max_tokens", max_tokens), ("step_tokens", step_tokens)):
        if not isinstance(value, int) or value < 1:
            raise AgentError(f"{name} must be a whole number of at least 1, got {value!r}")
    if not timeout > 0:
        raise AgentError(f"timeout must be a number of seconds above 0, got {timeout!r}")
    if tool_choice not in ("required", "auto"):
        raise AgentError(f"tool_choice must be \"required\" or \"auto\", got {tool_choice!r}")
    step_tokens = min(step_tokens, max_tokens)
    if not hasattr(backend, "complete"):
        backend = LocalBackend(backend)
    by_name = {t.name: t for t in resolve_tools(tools)}
    definitions = CONTROL_TOOLS + [to_openai(t) for t in by_name.values()]
    writer = Transcript(transcript) if transcript is not None else None
    run_id, start = uuid.uuid4().hex[:12], time.monotonic()
    deadline = start + timeout
    events: list[dict[str, Any]] = []
    step = 0

    def emit(kind: str, **data: Any) -> None:
        event = {"run": run_id, "step": step, "type": kind, "t": round(time.monotonic() - start, 3), **data}
        events.append(event)
        if writer is not None:
            writer.write(event)
        if on_event is not None:
            on_event(event)

    messages: list[dict[str, Any]] = [{"role": "system", "content": system},
                                      {"role": "user", "content": f"Goal: {goal.strip()}"}]
    tasks: list[dict[str, str]] = []
    usage = {"prompt_tokens": 0, "completion_tokens": 0}
    answer: str | None = None
    reason: str | None = None
    planned = False  # the last turn set the task list: the next one acts, it does not plan again

    def current() -> dict[str, str] | None:
        return next((t for t in tasks if t["status"] == "pending"), None)

    def act(call: dict[str, Any]) -> str:
        """Run one well-formed call; the observation the model gets. Sets ``answer`` on `final_answer`."""
        nonlocal answer, tasks, planned
        fn = call["function"]
        name, args = fn["name"], json.loads(fn["arguments"])
        task = current()
        emit("action", tool=name, arguments=args, call_id=call["id"], task=task["task"] if task else None)
        error, progress = True, ""
        if name == FINAL:
            if isinstance(args.get("answer"), str) and args["answer"].strip():
                answer, error, text = args["answer"].strip(), False, "Final answer recorded."
            else:
                text = 'final_answer needs {"answer": "<the answer as text>"}'
        elif name == PLAN:
            new = args.get("tasks")
            if isinstance(new, list) and new and all(isinstance(t, str) and t.strip() for t in new):
                tasks = [t for t in tasks if t["status"] == "done"] + [{"task": t.strip(), "status": "pending"}
                                                                      for t in new]
                emit("plan", tasks=[dict(t) for t in tasks], by="model")
                error, text, planned = False, "Task list set. Current task: " + new[0].strip(), True
            else:
                text = 'plan needs {"tasks": ["<first task>", "<second task>", ...]} (non-empty strings)'
        elif name not in by_name:
            text = f"unknown tool {name!r}; the tools are: {', '.join([PLAN, FINAL, *by_name])}"
        else:
            try:
                text, error = by_name[name].call(args), False
            except Exception as e:  # noqa: BLE001 - the model sees what went wrong and may try again
                text = str(e) if isinstance(e, LMForgeError) else f"{name} failed: {type(e).__name__}: {e}"
            if not error and task is not None:  # acting on the current task completes it
                task["status"] = "done"
                emit("plan", tasks=[dict(t) for t in tasks], by="progress")
                nxt = current()
                progress = (f"\n\n[task done: {task['task']}. Next task: {nxt['task']}]" if nxt else
                            f"\n\n[task done: {task['task']}. All tasks are done: call {FINAL} with the answer, "
                            f"or {PLAN} if more is needed.]")
        emit("observation", tool=name, call_id=call["id"], content=text, error=error)
        return ("Error: " if error else "") + _clip(text) + progress

    try:
        emit("start", goal=goal, tools=list(by_name), backend=getattr(backend, "name", type(backend).__name__),
             max_steps=max_steps, max_tokens=max_tokens, step_tokens=step_tokens, timeout=timeout,
             tool_choice=tool_choice, transcript=str(writer.path) if writer else None)
        while reason is None:
            if time.monotonic() >= deadline:
                reason = "timeout"
            elif usage["completion_tokens"] + step_tokens > max_tokens:  # a turn may use all its tokens
                reason = "max_tokens"
            elif step >= max_steps:
                reason = "max_steps"
            if reason is not None:
                break
            step += 1
            # The first turn plans; later turns act, revise or answer.
            choice: Any = {"type": "function", "function": {"name": PLAN}} if step == 1 else tool_choice
            # A new plan is acted on, not planned again; with every task done there is nothing to act on:
            # the turn revises the plan or answers.
            finished = bool(tasks) and current() is None
            offered = [d for d in definitions if not (planned and d["function"]["name"] == PLAN)
                       and not (finished and d["function"]["name"] not in (PLAN, FINAL))]
            planned = False
            try:
                reply = backend.complete(messages, offered, choice, step_tokens, deadline)
            except ContextFull as e:
                emit("note", content=str(e))
                reason = "context_full"
                break
            except Exception as e:
                emit("error", message=str(e) or type(e).__name__)
                raise
            usage["prompt_tokens"] += reply.prompt_tokens
            usage["completion_tokens"] += reply.completion_tokens
            msg = reply.message
            content = msg.get("content") if isinstance(msg.get("content"), str) else None
            calls, bad = _normalize(msg["tool_calls"]) if msg.get("tool_calls") else ([], [])
            emit("reply", content=content, tool_calls=len(calls) + len(bad), finish_reason=reply.finish_reason,
                 tokens=reply.completion_tokens)
            if reply.finish_reason == "timeout":
                reason = "timeout"
                break
            if content and content.strip() and calls:
                emit("thought", content=content.strip())
            if not calls and not bad and content and content.strip() and CALL_OPEN not in content \
                    and reply.finish_reason != "length" and step > 1 and tool_choice == "auto":
                answer, reason = content.strip(), "final_answer"
                emit("answer", content=answer)
                break
            history: dict[str, Any] = {"role": "assistant", "content": content}
            if calls:
                history["tool_calls"] = calls
            messages.append(history)
            for call in calls:
                messages.append({"role": "tool", "tool_call_id": call["id"], "content": act(call)})
                if answer is not None:
                    emit("answer", content=answer)
                    reason = "final_answer"
                    break
            if reason is None and not calls and not bad:
                cut = " (the reply was cut at its token limit)" if reply.finish_reason == "length" else ""
                bad.append(f"the reply called no tool{cut}: call {PLAN}, a tool, or {FINAL}")
            if reason is None and bad:
                for problem in bad:
                    emit("observation", tool=None, call_id=None, content=problem, error=True)
                messages.append({"role": "user", "content": "Error: " + "\n".join(bad)})
    finally:  # a run that raised still ends its transcript, with reason "error"
        seconds = round(time.monotonic() - start, 3)
        emit("stop", reason=reason or "error", answer=answer, steps=step, usage=dict(usage), seconds=seconds,
             tasks=[dict(t) for t in tasks])
        if writer is not None:
            writer.close()
    return AgentResult(answer, reason, step, usage, seconds, tasks, events, messages,
                       writer.path if writer else None)


def format_event(event: dict[str, Any], width: int = 400) -> str | None:
    """One event as the terminal shows it live (None for the bookkeeping ones)."""
    kind, step = event["type"], event["step"]

    def short(text: Any) -> str:
        text = " ".join(str(text).split())
        return text if len(text) <= width else text[:width] + " ..."

    if kind == "start":
        return f"goal: {short(event['goal'])}\ntools: {', '.join(event['tools'])}; budget: {event['max_steps']} " \
               f"steps, {event['max_tokens']} tokens, {event['timeout']:g} s"
    if kind == "plan":
        if event["by"] != "model":  # a task done: the next observation says so
            return None
        lines = [f"  {i}. [{'x' if t['status'] == 'done' else ' '}] {short(t['task'])}"
                 for i, t in enumerate(event["tasks"], 1)]
        return "\n".join([f"[{step}] plan" + (" (revised)" if step > 1 else ""), *lines])
    if kind == "thought":
        return f"[{step}] thought: {short(event['content'])}"
    if kind == "action":
        if event["tool"] in (PLAN, FINAL):
            return None
        task = f" (task: {short(event['task'])})" if event.get("task") else ""
        return f"[{step}] action: {event['tool']} {json.dumps(event['arguments'], ensure_ascii=False)}{task}"
    if kind == "observation":
        if event["tool"] in (PLAN, FINAL) and not event["error"]:
            return None
        return f"[{step}] observation{' (error)' if event['error'] else ''}: {short(event['content'])}"
    if kind == "answer":
        return f"[{step}] final answer: {event['content']}"
    if kind in ("error", "note"):
        return f"[{step}] {kind}: {event.get('message') or event.get('content')}"
    if kind == "stop":
        u = event["usage"]
        return f"stopped: {event['reason']} after {event['steps']} steps, {u['completion_tokens']} tokens " \
               f"generated ({u['prompt_tokens']} prompt), {event['seconds']:.1f} s"
    return None
