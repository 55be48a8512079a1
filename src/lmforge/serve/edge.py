"""The server's edge: every request is checked here, once, and turned into token rows and `SamplingParams`.

Errors are `APIError`s naming the request's field (OpenAI's `param`), so that the engine behind only ever
receives work that fits it.
"""

from __future__ import annotations

import json
from typing import Any

from ..api import LM
from ..engine import SamplingParams
from ..engine.sampling import choice_seed
from ..engine.structured import Grammar
from ..errors import LMForgeError
from ..tools.calling import ToolCallError, ToolChoice, check_tools, render, template_renders_tools
from ..tools.grammar import SPAN, call_grammar
from .gate import APIError, ServerConfig
from .schemas import ChatMessage, ResponseFormat

MAX_STOP = 16
# Text longer than this many bytes per token of the context window cannot fit it (real tokens average a few
# bytes), so it is refused before tokenizing: tokenizing megabytes only to refuse them would waste a core.
MAX_BYTES_PER_TOKEN = 64


class Edge:
    """Request checks and translation for one model and server configuration."""

    def __init__(self, lm: LM, cfg: ServerConfig, ctx: int, kv_limits_context: bool) -> None:
        self.lm, self.cfg = lm, cfg
        self.tok = lm.tokenizer
        self.ctx = ctx
        # Named in context errors; when the KV cache budget is smaller than the model's context, it is the limit.
        self.window = f"the context window is {self.ctx} tokens" + (
            " (all that the KV cache memory, --kv-memory, holds)" if kv_limits_context else "")
        self.vocab = lm.config.vocab_size
        self.names = {cfg.model_name}
        self.max_text_bytes = self.ctx * MAX_BYTES_PER_TOKEN
        self.native_tools = template_renders_tools(self.tok.chat_template)
        # An encoder-decoder's prompt is its source: limited by the encoder, and generating within the decoder's
        # whole context beside it.
        self.source_limit = lm.config.context_length if lm.is_seq2seq else None

    # -- validation ------------------------------------------------------------------------------------------
    def check_model(self, name: str | None) -> None:
        if name and name not in self.names:
            raise APIError(404, f"the model {name!r} does not exist (this server serves {self.cfg.model_name!r})",
                           param="model", code="model_not_found")

    def check_generates(self) -> None:
        if self.lm.is_encoder:
            raise APIError(400, f"{self.cfg.model_name} is an encoder (bidirectional) model: it embeds text "
                                "(/v1/embeddings) but cannot generate or score completions", param="model")

    def token_rows(self, raw: Any, param: str, limit: int) -> tuple[list[Any], list[list[int]]]:
        """OpenAI's input forms (a string, a token list, or a list of either): each input as given, and
        its checked token row."""
        if isinstance(raw, str) or (raw and isinstance(raw[0], int)):
            raw = [raw]
        if not raw:
            raise APIError(400, f"{param} is empty", param=param)
        if len(raw) > limit:
            raise APIError(400, f"at most {limit} {param}s are allowed, got {len(raw)}", param=param)
        for x in raw:
            if isinstance(x, str):
                self.check_text_size([x], param)
        rows = [self.tok.encode(x) if isinstance(x, str) else list(x) for x in raw]
        for ids in rows:
            self.check_ids(ids, param)
        return raw, rows

    def check_text_size(self, texts: list[str], param: str) -> None:
        """Refuse text that cannot fit the context window, by its size, before tokenizing it."""
        size = sum(len(t.encode("utf-8", "surrogatepass")) for t in texts)
        if size > self.max_text_bytes:
            raise APIError(400, f"{param} is {size} bytes, more than can fit the context window of {self.ctx} tokens "
                                f"(at most {self.max_text_bytes} bytes are accepted)",
                           param=param, code="context_length_exceeded")

    def check_chat_size(self, messages: list[ChatMessage]) -> None:
        texts = []
        for m in messages:
            if isinstance(m.content, str):
                texts.append(m.content)
            elif m.content:
                texts.extend(p.text or "" for p in m.content)
        self.check_text_size(texts, "messages")

    def check_ids(self, ids: list[int], param: str) -> None:
        if not ids:
            raise APIError(400, "the prompt is empty", param=param)
        bad = next((i for i in ids if not 0 <= i < self.vocab), None)
        if bad is not None:
            raise APIError(400, f"token id {bad} is outside the vocabulary of {self.vocab}", param=param)

    def budget(self, prompt_len: int, requested: int | None, explicit: bool, param: str = "max_tokens",
               prompt_param: str = "prompt") -> int:
        """How many tokens a completion may generate; context overflow is a 400 naming both counts."""
        if self.source_limit is not None:
            if prompt_len > self.source_limit:
                raise APIError(400, f"the source is {prompt_len} tokens, but the {self.lm.config.family} encoder "
                                    f"takes at most {self.source_limit}", param=prompt_param,
                               code="context_length_exceeded")
            return self.ctx if requested is None else self.seq2seq_room(requested, explicit, param)
        if prompt_len >= self.ctx:
            raise APIError(400, f"the prompt is {prompt_len} tokens, but {self.window}",
                           param=prompt_param, code="context_length_exceeded")
        room = self.ctx - prompt_len
        if requested is None:
            return room
        if requested > room and explicit:
            raise APIError(400, f"{self.window}, but {prompt_len + requested} were requested "
                                f"({prompt_len} in the prompt, {requested} for the completion)",
                           param=param, code="context_length_exceeded")
        return min(requested, room)

    def seq2seq_room(self, requested: int, explicit: bool, param: str) -> int:
        if requested > self.ctx and explicit:
            raise APIError(400, f"{self.window}, but {requested} tokens were requested for the completion",
                           param=param, code="context_length_exceeded")
        return min(requested, self.ctx)

    # -- request -> SamplingParams -----------------------------------------------------------------------------
    def sampling(self, req: Any, max_tokens: int, logprobs: bool, top_logprobs: int, index: int) -> SamplingParams:
        """Choice `index`'s parameters; a value the request leaves out takes `SamplingParams`' default."""
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > MAX_STOP:
            raise APIError(400, f"at most {MAX_STOP} stop strings are allowed, got {len(stop)}", param="stop")
        bias: dict[int, float] = {}
        for k, v in (req.logit_bias or {}).items():
            try:
                tok = int(k)
            except ValueError:
                raise APIError(400, f"logit_bias keys must be token ids, got {k!r}", param="logit_bias") from None
            if not 0 <= tok < self.vocab:
                raise APIError(400, f"logit_bias token id {tok} is outside the vocabulary of {self.vocab}",
                               param="logit_bias")
            bias[tok] = v
        given = {"temperature": req.temperature, "top_p": req.top_p, "min_p": req.min_p,
                 "repetition_penalty": req.repetition_penalty, "presence_penalty": req.presence_penalty,
                 "frequency_penalty": req.frequency_penalty,
                 "top_k": None if req.top_k is None else max(0, req.top_k)}  # vLLM's -1 disables, as 0 does
        try:
            return SamplingParams(
                max_tokens=max_tokens, **{k: v for k, v in given.items() if v is not None},
                logit_bias=bias or None, seed=choice_seed(req.seed, index), stop=stop, ignore_eos=req.ignore_eos,
                logprobs=logprobs, top_logprobs=top_logprobs, min_tokens=req.min_tokens,
            )
        except LMForgeError as e:  # a SamplingError names the parameter
            raise APIError(400, str(e), param=getattr(e, "param", None)) from None

    # -- structured output ------------------------------------------------------------------------------------
    def grammar(self, req: Any) -> Grammar | None:
        """The compiled grammar of a request's response_format (or vLLM's guided_json); None for free text."""
        fmt: ResponseFormat | None = req.response_format
        param = "response_format"
        if req.guided_json is not None:
            if fmt is not None and fmt.type != "text":
                raise APIError(400, "send response_format or guided_json, not both", param="guided_json")
            schema_ = req.guided_json
            if isinstance(schema_, str):
                try:
                    schema_ = json.loads(schema_)
                except ValueError:
                    raise APIError(400, "guided_json must be a JSON schema (an object, or a string holding one)",
                                   param="guided_json") from None
            if not isinstance(schema_, dict):
                raise APIError(400, "guided_json must be a JSON schema object", param="guided_json")
            fmt = ResponseFormat.model_validate({"type": "json_schema", "json_schema": {"schema": schema_}})
            param = "guided_json"
        if fmt is None or fmt.type == "text":
            return None
        schema: dict[str, Any] | None = None
        if fmt.type == "json_schema":
            if fmt.json_schema is None or fmt.json_schema.schema_ is None:
                raise APIError(400, "response_format json_schema needs json_schema.schema", param="response_format")
            schema = fmt.json_schema.schema_
        return self._compiled(json.dumps(schema, sort_keys=True), lambda g: g.compile(schema), param)

    def _compiled(self, key: str, build: Any, param: str) -> Grammar:
        try:
            return self.lm.grammar(key, build)
        except LMForgeError as e:
            raise APIError(400, str(e), param=param) from None

    # -- function calling -------------------------------------------------------------------------------------
    def tool_choice(self, req: Any) -> ToolChoice:
        """The request's tools, checked (a 400 names the malformed field)."""
        try:
            choice = check_tools(req.tools, req.tool_choice, req.parallel_tool_calls)
        except ToolCallError as e:
            raise APIError(400, str(e), param=e.param) from None
        fmt = req.response_format
        if choice.constrained and ((fmt is not None and fmt.type != "text") or req.guided_json is not None):
            raise APIError(400, "a response format cannot be combined with tool calls (send tool_choice "
                                "\"none\" to use it)", param="response_format")
        return choice

    def tool_grammar(self, choice: ToolChoice) -> Grammar | None:
        """The grammar that makes every call valid (None when the output is not parsed for calls)."""
        if not choice.constrained:
            return None
        lark = call_grammar(choice.functions, choice.mode, choice.parallel)
        return self._compiled(lark, lambda g: g.compile_lark(lark, SPAN, choice.parallel), "tools")

    def check_structured(self, req: Any, grammar: Grammar | None, max_tokens: int, param: str) -> None:
        """A structured completion must have room for the schema's shortest document, so that it always ends
        complete; and cannot be held open by min_tokens past its end."""
        if grammar is None:
            return
        if req.min_tokens:
            raise APIError(400, "min_tokens cannot be combined with structured output (the document decides "
                                "where the output ends)", param="min_tokens")
        if max_tokens < grammar.min_tokens:
            what = "tool call" if grammar.span is not None else "document this response format admits"
            raise APIError(400, f"{param} is {max_tokens}, but the shortest {what} "
                                f"is {grammar.min_tokens} tokens", param=param)

    def constraints(self, grammar: Grammar | None, n: int) -> list[Any]:
        return [None if grammar is None else self.lm.grammar_constraint(grammar) for _ in range(n)]

    # -- messages -> tokens -----------------------------------------------------------------------------------
    def chat_ids(self, messages: list[ChatMessage], add_generation_prompt: bool | None = True,
                 continue_final_message: bool = False, tools: ToolChoice | None = None) -> list[int]:
        """The rendered conversation's tokens. ``continue_final_message``: the final (assistant) message is
        continued rather than answered; a generation prompt is then left out unless asked for (a 400).
        ``tools``: rendered by the template when it supports them, else in the built-in format."""
        if len(messages) > self.cfg.max_messages:
            raise APIError(400, f"at most {self.cfg.max_messages} messages are allowed, got {len(messages)}",
                           param="messages")
        msgs = []
        for i, m in enumerate(messages):
            if m.function_call:
                raise APIError(400, "function_call in messages is the deprecated functions API, which is not "
                                    "supported: send tool_calls", param=f"messages.{i}.function_call")
            content = m.content
            if isinstance(content, list):
                for j, part in enumerate(content):
                    if part.type != "text":  # an image, audio or file: this server reads text only
                        raise APIError(400, f"content parts of type {part.type!r} are not supported (only text)",
                                       param=f"messages.{i}.content.{j}.type")
                content = "".join(p.text or "" for p in content)
            msg = {"role": "system" if m.role == "developer" else m.role, "content": content or ""}
            msg |= {k: v for k in ("name", "tool_call_id") if (v := getattr(m, k)) is not None}
            if m.tool_calls:
                msg["tool_calls"] = m.tool_calls
            msgs.append(msg)
        if self.source_limit is not None:  # an encoder-decoder: no chat template, the last user message is the source
            if tools is not None and tools.tools:
                raise APIError(400, f"a {self.lm.config.family} model (an encoder-decoder) cannot be offered tools",
                               param="tools")
            if any(m["role"] == "system" for m in msgs):
                raise APIError(400, "an encoder-decoder model has no chat template to give a system message to",
                               param="messages")
            users = [m["content"] for m in msgs if m["role"] == "user"]
            if not users:
                raise APIError(400, "an encoder-decoder model reads the last user message as its source: send one",
                               param="messages")
            return self.tok.encode(users[-1])
        try:
            msgs, offered = render(msgs, tools.tools if tools is not None else [], self.native_tools)
        except ToolCallError as e:
            raise APIError(400, str(e), param=e.param) from None
        if continue_final_message:
            if messages[-1].role != "assistant":
                raise APIError(400, "continue_final_message needs the last message to be the assistant's",
                               param="continue_final_message")
            if add_generation_prompt:
                raise APIError(400, "continue_final_message and add_generation_prompt cannot both be true",
                               param="add_generation_prompt")
        if add_generation_prompt is None:
            add_generation_prompt = not continue_final_message
        try:
            return self.tok.encode_chat(msgs, add_generation_prompt=add_generation_prompt,
                                        continue_final_message=continue_final_message, tools=offered)
        except LMForgeError as e:
            raise APIError(400, str(e), param="continue_final_message" if continue_final_message else "messages"
                           ) from None
