"""The Python API: ``lmforge.load(name_or_path)`` and the object it returns."""

from __future__ import annotations

import threading
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .encoders.pooling import Pooling, embed, embed_ids, pad_id, read_pooling
from .engine import Engine, SamplingParams, Sequence, TokenLogprob
from .engine.scoring import prompt_logprobs
from .engine.speculative import DRAFT_TOKENS, DraftModel, PromptLookup
from .errors import LMForgeError
from .formats import Checkpoint, load_checkpoint
from .model import ModelConfig, Transformer
from .tokenizer import Tokenizer
from .tools.base import Tool, to_openai
from .tools.calling import ToolChoice, assistant_message, check_tools, render, template_renders_tools
from .tools.inline import MAX_TOOL_CALLS, ToolRunner, resolve_tools, tool_messages

Messages = list[dict[str, Any]]


class LM:
    """A loaded model with its tokenizer and a generation engine."""

    def __init__(self, ck: Checkpoint, max_batch: int = 8) -> None:
        self.checkpoint = ck
        self.model: Transformer = ck.model
        self.config: ModelConfig = ck.config
        self.path: Path = ck.path
        self.adapter: Path | None = None  # a LoRA adapter applied on top of the weights at `path`
        self.engine = Engine(ck.model, ck.tokenizer, max_batch=max_batch)
        self._pooling: Pooling | None = None
        self._grammars: Any = None  # JsonGrammars for this tokenizer, built on first use
        self._grammar_cache: dict[str, Any] = {}
        self._grammar_lock = threading.Lock()

    @property
    def tokenizer(self) -> Tokenizer:
        if self.checkpoint.tokenizer is None:
            raise LMForgeError(f"{self.path}: the model has no tokenizer (tokenizer.json)")
        return self.checkpoint.tokenizer

    def configure_engine(self, max_batch: int, max_len: int | None = None, kv_memory: int | None = None,
                         draft_tokens: int | None = None, draft_model: LM | None = None) -> Engine:
        """Give the engine this shape (slots, context, KV cache bytes; see `Engine`) and return it. The server
        drives it from then on, on its scheduler thread; `generate`, `stream` and `chat` use it too.

        Speculative decoding (engine/speculative.py): by default the engine guesses by prompt lookup wherever
        verification is exact; ``draft_tokens`` sets the most guesses a step (0 turns it off), and
        ``draft_model`` guesses with that model (same vocabulary) instead. Asked for where it cannot run, it
        is refused."""
        if self.engine.has_work:
            raise LMForgeError("the engine cannot be reconfigured while it is generating")
        if draft_tokens is not None and draft_tokens < 0:
            raise LMForgeError(f"draft_tokens must be 0 (off) or more, got {draft_tokens}")
        self.engine = Engine(self.model, self.checkpoint.tokenizer, max_batch=max_batch, max_len=max_len,
                             kv_memory=kv_memory)
        if draft_tokens == 0:
            if draft_model is not None:
                raise LMForgeError("a draft model needs draft_tokens of at least 1")
            self.engine.speculate(None)
        elif draft_tokens is not None or draft_model is not None:
            drafter: Any = PromptLookup()
            if draft_model is not None:
                mine, theirs = self.checkpoint.tokenizer, draft_model.checkpoint.tokenizer
                if mine is not None and theirs is not None and mine.hf.get_vocab() != theirs.hf.get_vocab():
                    raise LMForgeError(f"the draft model {draft_model.path} has another vocabulary than {self.path}")
                drafter = DraftModel(draft_model.model, self.config.vocab_size)
            self.engine.speculate(drafter, draft_tokens or DRAFT_TOKENS)
        return self.engine

    @property
    def context_length(self) -> int:
        return self.engine.context

    @property
    def is_encoder(self) -> bool:
        """Bidirectional (BERT-style) models embed and classify; they cannot generate."""
        return not self.config.causal

    @property
    def is_seq2seq(self) -> bool:
        """Encoder-decoders (T5, BART): a prompt is the source text the encoder reads; there is no chat template."""
        return bool(self.config.decoder_layers)

    @property
    def pooling(self) -> Pooling:
        """How `embed` turns hidden states into one vector (from sentence-transformers files, else mean)."""
        if self._pooling is None:
            self._pooling = read_pooling(self.path)
        return self._pooling

    def embed(self, texts: str | list[str], batch_size: int = 32, progress: bool = False) -> np.ndarray:
        """Embed texts -> float32 array [n, dim] (a str gives one row); pooled as the model is configured."""
        return embed(self.model, self.tokenizer, [texts] if isinstance(texts, str) else list(texts), self.pooling,
                     batch_size=batch_size, progress=progress)

    def embed_ids(self, rows: list[list[int]]) -> np.ndarray:
        """`embed` for token rows: float32 array [n, dim], pooled as the model is configured."""
        return embed_ids(self.model, rows, pad_id(self.tokenizer), self.pooling)

    def score(self, prompt: str | list[int], top: int = 0) -> list[TokenLogprob | None]:
        """The logprob of every prompt token given the ones before it (None for the first), with the `top`
        most likely alternatives at each position."""
        steps = self.score_steps(self._prompt_ids(prompt), top)
        while True:
            try:
                next(steps)
            except StopIteration as done:
                return done.value

    def score_steps(self, ids: list[int], top: int = 0) -> Generator[None, None, list[TokenLogprob | None]]:
        """`score` a chunk of positions per step, for a scheduler that interleaves it with other work."""
        return prompt_logprobs(self.model, ids, top)

    def _prompt_ids(self, prompt: str | list[int]) -> list[int]:
        return list(prompt) if isinstance(prompt, list) else self.tokenizer.encode(prompt)

    def generate(self, prompt: str | list[str], tools: list[Tool | str] | None = None,
                 max_tool_calls: int = MAX_TOOL_CALLS, **params: Any) -> str | list[str]:
        """Complete one prompt (returns a str) or several, batched (returns a list).

        ``tools`` (Tool objects or registered names, e.g. ``["calculator"]``): calls the model writes
        (``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``) run during generation, and each result is
        forced into the text as the chat template renders a tool turn, after which the model continues; at
        most ``max_tool_calls`` run per prompt. The prompt should offer the tools (`tool_prompt`)."""
        prompts = [prompt] if isinstance(prompt, str) else prompt
        seqs = self.generate_sequences([self._prompt_ids(p) for p in prompts], SamplingParams(**params),
                                       tools=tools, max_tool_calls=max_tool_calls)
        texts = [s.text for s in seqs]
        return texts[0] if isinstance(prompt, str) else texts

    def generate_sequences(self, prompts: list[list[int]], params: SamplingParams,
                           tools: list[Tool | str] | None = None, max_tool_calls: int = MAX_TOOL_CALLS
                           ) -> list[Sequence]:
        """Token-level generation: finished sequences with ids, text, finish reason and logprobs. With
        ``tools`` (as in `generate`) each sequence's ``tools`` is its ToolRunner (its ``calls``), and
        ``forced`` / ``forced_chars`` mark the result tokens and text that were forced, not sampled."""
        if not tools:
            return self.engine.generate(prompts, params)
        resolved = resolve_tools(tools)
        return self.engine.generate(prompts, params, lambda: ToolRunner(resolved, self.tokenizer, max_tool_calls))

    def tool_prompt(self, messages: str | Messages, tools: list[Tool | str]) -> str:
        """The chat prompt, as text, of a conversation that offers ``tools`` (Tool objects or names): what
        `generate` with ``tools`` continues."""
        offered = [to_openai(t) for t in resolve_tools(tools)]
        return self.tokenizer.decode(self.chat_prompt(messages, offered), skip_special_tokens=False)

    def stream(self, prompt: str, **params: Any) -> Iterator[str]:
        """Yield text deltas as they are generated (beam search, ``num_beams > 1``, yields its text when done)."""
        return self._stream(self._prompt_ids(prompt), SamplingParams(**params))

    def _stream(self, ids: list[int], params: SamplingParams) -> Iterator[str]:
        return iter(self.start(ids, params)) if params.num_beams > 1 else self.engine.stream(ids, params)

    def start(self, prompt: str | list[int], params: SamplingParams | None = None, constraint: Any = None
              ) -> Generation:
        """Queue one prompt (text or token ids) now, checked against the context; iterate the result for text
        deltas, then read its finished `sequence` (text, finish reason, logprobs, error). ``constraint``: a
        decoding constraint (`tool_constraint`). Beam search (``num_beams > 1``) runs to the end here, and
        iterating yields its whole text at once."""
        if params is not None and params.num_beams > 1:
            if constraint is not None:
                raise LMForgeError("a decoding constraint cannot be combined with num_beams > 1")
            seq = self.engine.generate([self._prompt_ids(prompt)], params)[0]
            return Generation(self.engine, seq, iter([seq.text] if seq.text else []))
        seq = self.engine.add(self._prompt_ids(prompt), params)
        seq.constraint = constraint
        return Generation(self.engine, seq)

    def chat_prompt(self, messages: str | Messages, tools: list[dict[str, Any]] | ToolChoice | None = None
                    ) -> list[int]:
        """The conversation's prompt tokens; tools (OpenAI tool definitions) are rendered by the chat template
        when it supports them, else in the built-in Hermes/Qwen format (`lmforge.tools.calling`). An
        encoder-decoder has no chat template: its source is the last user message, encoded as it stands."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        if self.is_seq2seq:
            if tools:
                raise LMForgeError(f"a {self.config.family} model (an encoder-decoder) cannot be offered tools")
            if any(m.get("role") in ("system", "developer") for m in messages):
                raise LMForgeError("an encoder-decoder has no chat template to give a system prompt to")
            users = [m.get("content") for m in messages if m.get("role") == "user"]
            if not users or not isinstance(users[-1], str):
                raise LMForgeError("an encoder-decoder reads the last user message as its source: send one, as text")
            return self.tokenizer.encode(users[-1])
        if not tools and not any(m.get("role") == "tool" or m.get("tool_calls") for m in messages):
            return self.tokenizer.encode_chat(messages)
        offered = (tools if isinstance(tools, ToolChoice) else check_tools(tools)).tools
        msgs, offered = render(messages, offered, template_renders_tools(self.tokenizer.chat_template))
        return self.tokenizer.encode_chat(msgs, tools=offered)

    def grammar(self, key: str, build: Callable[[Any], Any]) -> Any:
        """A decoding grammar for this tokenizer: ``build(JsonGrammars)`` compiles it, once per ``key`` (the
        256 most recent are kept). The Python API and the server share these; safe from any thread."""
        with self._grammar_lock:
            if self._grammars is None:
                from .engine.structured import JsonGrammars

                self._grammars = JsonGrammars(self.tokenizer, self.config.vocab_size)
            if key not in self._grammar_cache:
                self._grammar_cache[key] = build(self._grammars)
                if len(self._grammar_cache) > 256:
                    self._grammar_cache.pop(next(iter(self._grammar_cache)))
            return self._grammar_cache[key]

    def grammar_constraint(self, grammar: Any) -> Any:
        """A fresh decoding constraint (one sequence's parser state) for a grammar from `grammar`."""
        return self._grammars.constraint(grammar)

    def tool_constraint(self, choice: ToolChoice) -> Any:
        """The decoding constraint that keeps every tool call valid (None when calls are not parsed)."""
        if not choice.constrained:
            return None
        from .tools.grammar import SPAN, call_grammar

        lark = call_grammar(choice.functions, choice.mode, choice.parallel)
        return self.grammar_constraint(self.grammar(lark, lambda g: g.compile_lark(lark, SPAN, choice.parallel)))

    def chat(self, messages: str | Messages, stream: bool = False, tools: list[Any] | None = None,
             tool_choice: str | dict[str, Any] | None = None, parallel_tool_calls: bool | None = None,
             execute_tools: bool = False, max_tool_calls: int = MAX_TOOL_CALLS,
             **params: Any) -> str | Iterator[str] | dict[str, Any] | Messages:
        """Answer a conversation (or a single user message) using the model's chat template: the text (or, with
        ``stream``, its deltas). With ``tools`` (OpenAI tool definitions; ``tool_choice`` and
        ``parallel_tool_calls`` as in OpenAI's API) the answer is the assistant message in OpenAI's shape,
        ``{"role": "assistant", "content": str | None, "tool_calls": [...]}`` (``tool_calls`` only when the
        model called a tool), which can be appended to ``messages`` as it is.

        ``execute_tools``: ``tools`` are Tool objects or registered names, run during generation (see
        `generate`); the answer is the list of messages the turn adds (per call, the assistant message with
        ``tool_calls`` and the ``tool`` message with its result, then the final assistant message)."""
        if execute_tools:
            if stream or tool_choice is not None or parallel_tool_calls is not None:
                raise LMForgeError("chat: execute_tools cannot be combined with stream, tool_choice or "
                                   "parallel_tool_calls")
            if not tools:
                raise LMForgeError("chat: execute_tools needs tools")
            resolved = resolve_tools(tools)
            ids = self.chat_prompt(messages, [to_openai(t) for t in resolved])
            seq = self.generate_sequences([ids], SamplingParams(**params), resolved, max_tool_calls)[0]
            return tool_messages(seq.text, seq.forced_chars, seq.tools.calls)
        if tools is None and tool_choice is None:
            ids = self.chat_prompt(messages)
            if stream:
                return self._stream(ids, SamplingParams(**params))
            return self.engine.generate([ids], SamplingParams(**params))[0].text
        if stream:
            raise LMForgeError("chat: stream cannot be combined with tools (the answer is a message)")
        choice = check_tools(tools, tool_choice, parallel_tool_calls)
        gen = self.start(self.chat_prompt(messages, choice), SamplingParams(**params), self.tool_constraint(choice))
        for _ in gen:
            pass
        if gen.sequence.error is not None:
            raise gen.sequence.error
        return assistant_message(gen.sequence.text, choice)

    def solve(self, question: str | list[str], strategy: str = "direct", tools: list[Tool | str] | None = None,
              **options: Any) -> Any:
        """Answer a question (or a batch, together) with a reasoning strategy: ``direct``, ``cot``,
        ``self-consistency`` or ``self-refine``; a Solution each (`lmforge.eval.strategies.solve`, which
        takes the ``options``: ``n``, ``max_rounds``, ``critic``, ``temperature``, ...)."""
        from .eval.strategies import solve

        return solve(self, question, strategy, tools=tools, **options)


class Generation:
    """One prompt being generated: iterating yields its text deltas until it finishes; `close()` (or leaving
    the iteration early) cancels it. A failure is not raised: it is `sequence.error`, with finish reason
    "error", so that callers word it themselves."""

    def __init__(self, engine: Engine, seq: Sequence, deltas: Iterator[str] | None = None) -> None:
        self.sequence, self._engine = seq, engine
        self._deltas = engine.run(seq) if deltas is None else deltas

    def __iter__(self) -> Iterator[str]:
        return self._deltas

    def close(self) -> None:
        getattr(self._deltas, "close", lambda: None)()
        if not self.sequence.done:  # never iterated: the generator had no frame to clean up in
            self._engine.cancel(self.sequence)


def load(name_or_path: str | Path, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
         max_batch: int = 8, progress: bool = False, adapter: str | Path | None = None) -> LM:
    """Load a registry name (pulled on first use), a `.gguf` file or an HF-style directory.

    ``adapter``: a LoRA adapter directory (lmforge's or PEFT's) to apply, merged where that keeps decoding fast.
    An adapter directory given as the model loads the base model it names, with the adapter."""
    from .finetune.lora import adapter_base
    from .registry import resolve

    base = adapter_base(name_or_path)
    if base is not None:
        if adapter is not None:
            raise LMForgeError(f"{name_or_path} is itself an adapter; pass its base model with --adapter")
        name_or_path, adapter = base, name_or_path
    ck = load_checkpoint(resolve(str(name_or_path)), device=device, dtype=dtype, progress=progress)
    if adapter is not None:
        from .finetune.lora import attach_adapter

        attach_adapter(ck.model, adapter)
    lm = LM(ck, max_batch=max_batch)
    lm.adapter = Path(adapter) if adapter is not None else None
    return lm
