"""`lmforge chat`: an interactive, streaming, multi-turn chat loop (and a one-shot mode for piped stdin)."""

from __future__ import annotations

import sys
from typing import Any

from .api import LM
from .engine import SamplingParams
from .errors import LMForgeError

HELP = "Commands: /reset clears the conversation, /system TEXT sets the system prompt, /exit quits."


def fit_conversation(lm: LM, messages: list[dict[str, Any]], reserve: int) -> tuple[list[int], int]:
    """Encode the conversation, dropping the oldest turns until it leaves `reserve` tokens to answer.

    Returns the prompt ids and how many messages were dropped. The system prompt and the newest
    user message are always kept; if those alone overflow, that is an error.
    """
    msgs = list(messages)
    dropped = 0
    while True:
        ids = lm.chat_prompt(msgs)
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


def _answer(lm: LM, messages: list[dict[str, Any]], params: SamplingParams) -> str:
    reserve = min(params.max_tokens, lm.context_length // 4)
    ids, dropped = fit_conversation(lm, messages, reserve)
    if dropped:
        print(f"[context full: dropped the {dropped} oldest message(s)]", file=sys.stderr)
    parts: list[str] = []
    generation = lm.start(ids, params)
    try:
        for delta in generation:
            parts.append(delta)
            print(delta, end="", flush=True)
    except KeyboardInterrupt:  # Ctrl-C stops this answer, not the session
        generation.close()
        print(" [interrupted]", end="")
    else:
        if generation.sequence.error is not None:
            raise generation.sequence.error
    print(flush=True)
    return "".join(parts)


def run_chat(lm: LM, params: SamplingParams, system: str | None = None, interactive: bool = True) -> int:
    messages: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    if not interactive:
        text = sys.stdin.read().strip()
        if not text:
            raise LMForgeError("no input on stdin")
        messages.append({"role": "user", "content": text})
        _answer(lm, messages, params)
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
            reply = _answer(lm, messages, params)
        except LMForgeError as e:
            messages.pop()
            print(f"lmforge: error: {e}", file=sys.stderr)
            continue
        messages.append({"role": "assistant", "content": reply})
