"""What an agent talks to: a local model (`LocalBackend`) or any OpenAI-compatible endpoint (`OpenAIBackend`).

A backend answers one turn: ``complete(messages, tools, tool_choice, max_tokens, deadline)`` returns a
`Reply` holding the assistant message in OpenAI's shape (``content`` and, when the model called a tool,
``tool_calls``) and the tokens it used. Any object with that method can drive the loop.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, replace
from typing import Any, Protocol

from ..engine import SamplingParams
from ..errors import LMForgeError
from ..tools.calling import assistant_message, check_tools


class AgentError(LMForgeError):
    """The agent cannot go on: its backend failed (an endpoint's error, an unreachable server) or was
    given settings it cannot honour."""


class ContextFull(AgentError):
    """The conversation no longer fits the model's context window: a budget, like steps or time."""


@dataclass
class Reply:
    """One assistant turn: ``message`` in OpenAI's shape, the tokens of the prompt and of the reply, and
    why the reply ended (``stop``, ``tool_calls``, ``length``, or ``timeout`` when the deadline cut it)."""

    message: dict[str, Any]
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str


class Backend(Protocol):
    def complete(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]], tool_choice: Any,
                 max_tokens: int, deadline: float) -> Reply: ...


class LocalBackend:
    """A loaded model (`lmforge.load`): the prompt rendered with its chat template and tools, the calls
    kept valid by constrained decoding, generation cut when ``deadline`` (``time.monotonic()``) passes."""

    def __init__(self, lm: Any, params: SamplingParams | None = None) -> None:
        self.lm = lm
        self.params = params or SamplingParams(temperature=0.0)
        self.name = str(getattr(lm, "path", "model"))

    def complete(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]], tool_choice: Any,
                 max_tokens: int, deadline: float) -> Reply:
        choice = check_tools(tools, tool_choice, parallel_tool_calls=False)
        ids = self.lm.chat_prompt(messages, choice)
        room = self.lm.context_length - len(ids)
        if room < 2:  # nothing useful can be generated
            raise ContextFull(f"the conversation is {len(ids)} tokens and the context window "
                              f"{self.lm.context_length} tokens")
        generation = self.lm.start(ids, replace(self.params, max_tokens=min(max_tokens, room)),
                                   self.lm.tool_constraint(choice))
        cut = False
        for _ in generation:
            if time.monotonic() >= deadline:
                generation.close()
                cut = True
                break
        seq = generation.sequence
        if seq.error is not None:
            raise AgentError(f"generation failed: {seq.error}")
        reason = "timeout" if cut else (seq.finish_reason or "stop")
        message = assistant_message(seq.text, choice)
        if message.get("tool_calls") and reason == "stop":
            reason = "tool_calls"
        return Reply(message, len(ids), len(seq.output_ids), reason)


def endpoint_url(base_url: str) -> str:
    """The chat completions URL of a base URL, as OpenAI's clients read one (``http://host:8000/v1``); a
    bare ``http://host:8000`` gets ``/v1``. A URL that is not http(s) with a host is an AgentError."""
    parts = urllib.parse.urlsplit(base_url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise AgentError(f"--base-url must be an http:// or https:// URL such as http://127.0.0.1:8000/v1, "
                         f"got {base_url!r}")
    try:
        parts.port  # noqa: B018 - raises on a malformed port
    except ValueError:
        raise AgentError(f"--base-url {base_url!r} has a malformed port") from None
    path = parts.path.rstrip("/") or "/v1"
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path + "/chat/completions", "", ""))


class OpenAIBackend:
    """Any server with OpenAI's ``POST /v1/chat/completions`` and function calling (`lmforge serve`, vLLM,
    llama.cpp's server, OpenAI itself). ``model``: the server's model name (default: the first that
    ``GET /v1/models`` lists). Errors are AgentErrors of one line; sampling: ``temperature``, ``top_p``,
    ``seed`` (None leaves the server's default)."""

    def __init__(self, base_url: str, api_key: str | None = None, model: str | None = None,
                 temperature: float | None = 0.0, top_p: float | None = None, seed: int | None = None) -> None:
        self.url = endpoint_url(base_url)
        self.api_key, self.model = api_key, model
        self.sampling = {k: v for k, v in {"temperature": temperature, "top_p": top_p, "seed": seed}.items()
                         if v is not None}
        self.name = self.url.removesuffix("/chat/completions")

    def _request(self, url: str, body: dict[str, Any] | None, timeout: float) -> dict[str, Any]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = None if body is None else json.dumps(body, ensure_ascii=False).encode()
        request = urllib.request.Request(url, data=data, headers=headers, method="GET" if body is None else "POST")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as e:
            raise AgentError(f"{url} answered HTTP {e.code}: {_error_message(e.read())}") from None
        except TimeoutError:
            raise
        except urllib.error.URLError as e:
            if isinstance(e.reason, TimeoutError):
                raise TimeoutError from None
            raise AgentError(f"cannot reach {url}: {getattr(e.reason, 'strerror', None) or e.reason}") from None
        except OSError as e:  # a connection reset mid-answer
            raise AgentError(f"cannot reach {url}: {e.strerror or e}") from None
        try:
            out = json.loads(raw)
        except ValueError:
            raise AgentError(f"{url} did not answer with JSON: {raw[:120]!r}") from None
        if not isinstance(out, dict):
            raise AgentError(f"{url} answered with JSON that is not an object")
        return out

    def _model(self, timeout: float) -> str:
        if self.model is None:
            url = self.name + "/models"
            try:
                listed = self._request(url, None, timeout).get("data")
            except TimeoutError:
                raise AgentError(f"{url} did not answer in time") from None
            ids = [m.get("id") for m in listed if isinstance(m, dict)] if isinstance(listed, list) else []
            if not ids or not isinstance(ids[0], str):
                raise AgentError(f"{url} lists no model: name one with --model")
            self.model = ids[0]
        return self.model

    def complete(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]], tool_choice: Any,
                 max_tokens: int, deadline: float) -> Reply:
        try:
            body = {"model": self._model(max(1.0, deadline - time.monotonic())), "messages": messages,
                    "tools": tools, "tool_choice": tool_choice, "parallel_tool_calls": False,
                    "max_tokens": max_tokens, **self.sampling}
            out = self._request(self.url, body, max(0.1, deadline - time.monotonic()))
        except TimeoutError:
            return Reply({"role": "assistant", "content": None}, 0, 0, "timeout")
        choices = out.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict) \
                or not isinstance(choices[0].get("message"), dict):
            raise AgentError(f"{self.url} answered without choices[0].message: {json.dumps(out)[:160]}")
        usage = out.get("usage") if isinstance(out.get("usage"), dict) else {}
        message = dict(choices[0]["message"])
        message["role"] = "assistant"
        used = usage.get("completion_tokens")
        if not isinstance(used, int):  # no usage reported: about 4 characters a token, so the budget holds
            used = max(1, len(json.dumps([message.get("content"), message.get("tool_calls")])) // 4)
        prompt = usage.get("prompt_tokens")
        return Reply(message, prompt if isinstance(prompt, int) else 0, used,
                     str(choices[0].get("finish_reason") or "stop"))


def _error_message(raw: bytes) -> str:
    """The message of an OpenAI error envelope, or the start of whatever else the server sent."""
    try:
        err = json.loads(raw).get("error")
        message = err.get("message") if isinstance(err, dict) else err
        if isinstance(message, str) and message:
            return " ".join(message.split())
    except (ValueError, AttributeError):
        pass
    text = " ".join(raw.decode("utf-8", "replace").split())
    return text[:200] or "(empty body)"
