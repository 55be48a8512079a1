"""`lmforge chat`: an interactive, streaming, multi-turn chat loop (and a one-shot mode for piped stdin)."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from .api import LM
from .engine import SamplingParams
from .errors import LMForgeError
from .tools.calling import CallStream, ToolChoice, assistant_message, check_tools

HELP = "Commands: /reset clears the conversation, /system TEXT sets the system prompt, /exit quits."


def load_tools(path: str | None, tool_choice: str | None) -> ToolChoice:
    """--tools FILE.json (a JSON list of OpenAI tool definitions) and --tool-choice, checked."""
    tools: Any = None
    if path is not None:
        try:
            tools = json.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as e:
            raise LMForgeError(f"--tools: cannot read {path}: {e.strerror}") from None
        except ValueError as e:
            raise LMForgeError(f"--tools: {path} is not JSON: {e}") from None
        if not isinstance(tools, list):
            raise LMForgeError(f"--tools: {path} must hold a JSON list of tool definitions")
    choice: Any = tool_choice
    if tool_choice not in (None, "auto", "none", "required"):
        choice = {"type": "function", "function": {"name": tool_choice}}
    try:
        return check_tools(tools, choice)
    except LMForgeError as e:
        raise LMForgeError(f"--{getattr(e, 'param', 'tools').split('.')[0].replace('_', '-')}: {e}") from None


def fit_conversation(lm: LM, messages: list[dict[str, Any]], reserve: int, tools: ToolChoice | None = None
                     ) -> tuple[list[int], int]:
    """Encode the conversation, dropping the oldest turns until it leaves `reserve` tokens to answer.

    Returns the prompt ids and how many messages were dropped. The system prompt and the newest
    user message are always kept; if those alone overflow, that is an error.
    """
    msgs = list(messages)
    dropped = 0
    while True:
        ids = lm.chat_prompt(msgs, tools)
        if len(ids) + reserve <= lm.context_length:
            return ids, dropped
        first = 1 if msgs and msgs[0]["role"] == "system" else 0
        if len(msgs) - first <= 1:
            if len(ids) >= lm.context_length:
                raise LMForgeError(f"prompt is {len(ids)} tokens, but the context window is "
                                   f"{lm.context_length} tokens")
            return ids, dropped
        del msgs[first]
        dropped += 1
        messages[:] = msgs


def _answer(lm: LM, messages: list[dict[str, Any]], params: SamplingParams, tools: ToolChoice | None = None
            ) -> dict[str, Any]:
    """The assistant's message, its text streamed to stdout as it comes; each tool call it makes is then
    printed as one line of JSON (OpenAI's tool call object)."""
    reserve = min(params.max_tokens, lm.context_length // 4)
    ids, dropped = fit_conversation(lm, messages, reserve, tools)
    if dropped:
        print(f"[context full: dropped the {dropped} oldest message(s)]", file=sys.stderr)
    constraint = lm.tool_constraint(tools) if tools is not None else None
    calls = CallStream({f["name"] for f in tools.functions}) if constraint is not None else None
    generation = lm.start(ids, params, constraint)

    def show(delta: str) -> None:  # call markup is not shown as text: the parsed calls are printed below
        parts = [{"content": delta}] if calls is None else calls.feed(delta)
        for part in parts:
            print(part.get("content", ""), end="", flush=True)

    try:
        for delta in generation:
            show(delta)
    except KeyboardInterrupt:  # Ctrl-C stops this answer, not the session
        generation.close()
        print(" [interrupted]", end="")
    else:
        if generation.sequence.error is not None:
            raise generation.sequence.error
    for part in calls.close() if calls is not None else []:
        print(part.get("content", ""), end="")
    print(flush=True)
    text = generation.sequence.text
    message = assistant_message(text, tools) if tools is not None else {"role": "assistant", "content": text}
    for call in message.get("tool_calls", []):
        print(json.dumps(call, ensure_ascii=False), flush=True)
    return message


def _tool_results(message: dict[str, Any]) -> list[dict[str, Any]]:
    """Each call's result, typed by the user (the calls are the user's to run)."""
    return [{"role": "tool", "tool_call_id": call["id"],
             "content": input(f"result of {call['function']['name']} {call['id']}> ")}
            for call in message.get("tool_calls", [])]


def run_chat(lm: LM, params: SamplingParams, system: str | None = None, interactive: bool = True,
             tools: ToolChoice | None = None) -> int:
    """Chat on the terminal. ``tools``: the model may call them; interactively, the user types each call's
    result and the model answers again; with piped stdin the calls are printed and the run ends."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    if not interactive:
        text = sys.stdin.read().strip()
        if not text:
            raise LMForgeError("no input on stdin")
        messages.append({"role": "user", "content": text})
        _answer(lm, messages, params, tools)
        return 0
    print(f"Chatting with {lm.path.name} (context {lm.context_length} tokens). {HELP}", file=sys.stderr)
    while True:
        try:
            line = input(">>> ").strip()
        except EOFError:
            print(file=sys.stderr)
            return 0
        except KeyboardInterrupt:
            print(file=sys.stderr)
            return 0
        if not line:
            continue
        if line.startswith("/"):
            cmd, _, rest = line.partition(" ")
            if cmd in ("/exit", "/quit", "/bye"):
                return 0
            if cmd == "/reset":
                messages = [m for m in messages if m["role"] == "system"]
                print("[conversation cleared]", file=sys.stderr)
            elif cmd == "/system":
                messages = [m for m in messages if m["role"] != "system"]
                if rest.strip():
                    messages.insert(0, {"role": "system", "content": rest.strip()})
                print("[system prompt set]" if rest.strip() else "[system prompt cleared]", file=sys.stderr)
            else:
                print(f"unknown command {cmd}. {HELP}", file=sys.stderr)
            continue
        messages.append({"role": "user", "content": line})
        try:
            reply = _answer(lm, messages, params, tools)
            # With "required" (or a named function) the model would call again forever: after the results
            # it may answer in text (tool_choice "auto").
            follow = replace(tools, mode="auto", named=None) if tools is not None and tools.mode == "required" \
                else tools
            while reply.get("tool_calls"):  # the user runs the calls; the model answers with their results
                results = _tool_results(reply)
                messages += [reply, *results]
                reply = _answer(lm, messages, params, follow)
        except LMForgeError as e:
            messages.pop()
            print(f"lmforge: error: {e}", file=sys.stderr)
            continue
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        messages.append(reply)
