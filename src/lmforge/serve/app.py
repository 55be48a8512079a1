"""The OpenAI-compatible HTTP API (FastAPI), on top of the continuous-batching scheduler."""

from __future__ import annotations

import asyncio
import base64
import json
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Generator
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..api import LM
from ..engine import Engine, SamplingParams, TokenLogprob
from ..engine.sampling import DEFAULT_TEMPERATURE, choice_seed
from ..errors import LMForgeError
from ..tokenizer import CHATML_TEMPLATE
from .gate import APIError, Gate, ServerConfig, envelope, error_response
from .metrics import Metrics
from .scheduler import Event, Job, NeverFits, QueueFull, Scheduler, SchedulerDown
from .schemas import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    ResponseFormat,
    TokenizeRequest,
)
from .structured import Grammar

MAX_STOP = 16
# Text longer than this many bytes per token of the context window cannot fit it (real tokens average a few
# bytes), so it is refused before tokenizing: tokenizing megabytes only to refuse them would waste a core.
MAX_BYTES_PER_TOKEN = 64
# Work done between two engine steps: prompt positions scored, or inputs embedded.
SCORE_CHUNK = 256
EMBED_CHUNK = 8


# -- the server state ---------------------------------------------------------------------------------------
class Server:
    """The loaded model, its engine and scheduler, and the helpers the routes share."""

    def __init__(self, lm: LM, cfg: ServerConfig) -> None:
        self.lm, self.cfg = lm, cfg
        self.tok = lm.tokenizer
        self.engine = Engine(lm.model, self.tok, max_batch=cfg.max_batch, max_len=cfg.ctx, kv_memory=cfg.kv_memory)
        self.ctx = self.engine.context
        # Named in context errors; when the KV cache budget is smaller than the model's context, it is the limit.
        self.window = f"the context window is {self.ctx} tokens" + (
            " (all that the KV cache memory, --kv-memory, holds)" if self.engine.kv_limits_context else "")
        self.vocab = lm.config.vocab_size
        self.metrics = Metrics()
        self.scheduler = Scheduler(self.engine, max_queue=cfg.max_queue, metrics=self.metrics)
        self.created = int(time.time())
        self.names = {cfg.model_name}
        self._grammars: Any = None
        self._grammar_lock = threading.Lock()
        self._grammar_cache: dict[str, str] = {}
        self._token_text: dict[int, str] = {}
        self.max_text_bytes = self.ctx * MAX_BYTES_PER_TOKEN

    # -- validation helpers --------------------------------------------------------------------------
    def check_model(self, name: str | None) -> None:
        if name and name not in self.names:
            raise APIError(404, f"the model {name!r} does not exist (this server serves {self.cfg.model_name!r})",
                           param="model", code="model_not_found")

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

    def sampling(self, req: Any, max_tokens: int, logprobs: bool, top_logprobs: int, index: int) -> SamplingParams:
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
        try:
            return SamplingParams(
                max_tokens=max_tokens,
                temperature=DEFAULT_TEMPERATURE if req.temperature is None else req.temperature,
                top_p=1.0 if req.top_p is None else req.top_p,
                top_k=max(0, req.top_k or 0),
                min_p=req.min_p or 0.0,
                repetition_penalty=req.repetition_penalty or 1.0,
                presence_penalty=req.presence_penalty or 0.0,
                frequency_penalty=req.frequency_penalty or 0.0,
                logit_bias=bias or None, seed=choice_seed(req.seed, index), stop=stop, ignore_eos=req.ignore_eos,
                logprobs=logprobs, top_logprobs=top_logprobs, min_tokens=req.min_tokens,
            )
        except LMForgeError as e:  # a SamplingError names the parameter
            raise APIError(400, str(e), param=getattr(e, "param", None)) from None

    # -- structured output ------------------------------------------------------------------------------
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
        key = json.dumps(schema, sort_keys=True)
        with self._grammar_lock:
            if self._grammars is None:
                from .structured import JsonGrammars

                self._grammars = JsonGrammars(self.tok, self.vocab)
            if key not in self._grammar_cache:
                try:
                    self._grammar_cache[key] = self._grammars.compile(schema)
                except LMForgeError as e:
                    raise APIError(400, str(e), param=param) from None
                if len(self._grammar_cache) > 256:
                    self._grammar_cache.pop(next(iter(self._grammar_cache)))
            return self._grammar_cache[key]

    def check_structured(self, req: Any, grammar: Grammar | None, max_tokens: int, param: str) -> None:
        """A structured completion must have room for the schema's shortest document, so that it always ends
        complete; and cannot be held open by min_tokens past its end."""
        if grammar is None:
            return
        if req.min_tokens:
            raise APIError(400, "min_tokens cannot be combined with structured output (the document decides "
                                "where the output ends)", param="min_tokens")
        if max_tokens < grammar.min_tokens:
            raise APIError(400, f"{param} is {max_tokens}, but the shortest document this response format admits "
                                f"is {grammar.min_tokens} tokens", param=param)

    def check_generates(self) -> None:
        if self.lm.is_encoder:
            raise APIError(400, f"{self.cfg.model_name} is an encoder (bidirectional) model: it embeds text "
                                "(/v1/embeddings) but cannot generate or score completions", param="model")

    def constraints(self, grammar: Grammar | None, n: int) -> list[Any]:
        return [None if grammar is None else self._grammars.constraint(grammar) for _ in range(n)]

    # -- text of tokens -----------------------------------------------------------------------------------
    def token_text(self, i: int) -> str:
        text = self._token_text.get(i)
        if text is None:
            text = self._token_text[i] = self.tok.decode([i], skip_special_tokens=False)
        return text

    def chat_ids(self, messages: list[ChatMessage], add_generation_prompt: bool | None = True,
                 continue_final_message: bool = False) -> list[int]:
        """The rendered conversation's tokens. ``continue_final_message``: the final (assistant) message is
        continued rather than answered; a generation prompt is then left out unless asked for (a 400)."""
        if len(messages) > self.cfg.max_messages:
            raise APIError(400, f"at most {self.cfg.max_messages} messages are allowed, got {len(messages)}",
                           param="messages")
        msgs = []
        for i, m in enumerate(messages):
            for name in ("tool_calls", "function_call"):
                if getattr(m, name):
                    raise APIError(400, f"{name} in messages is not supported (no tool calling)",
                                   param=f"messages.{i}.{name}")
            content = m.content
            if isinstance(content, list):
                for j, part in enumerate(content):
                    if part.type != "text":  # an image, audio or file: this server reads text only
                        raise APIError(400, f"content parts of type {part.type!r} are not supported (only text)",
                                       param=f"messages.{i}.content.{j}.type")
                content = "".join(p.text or "" for p in content)
            msg = {"role": "system" if m.role == "developer" else m.role, "content": content or ""}
            msg |= {k: v for k in ("name", "tool_call_id") if (v := getattr(m, k)) is not None}
            msgs.append(msg)
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
                                        continue_final_message=continue_final_message)
        except LMForgeError as e:
            raise APIError(400, str(e), param="continue_final_message" if continue_final_message else "messages"
                           ) from None

    # -- work on the scheduler thread -----------------------------------------------------------------------
    def _head(self, h: torch.Tensor) -> torch.Tensor:
        m = self.lm.model
        return m.lm_head(h) if m.lm_head is not None else F.linear(h, m.tok_emb.weight)

    def prompt_logprobs(self, ids: list[int], top: int) -> Generator[None, None, list[TokenLogprob | None]]:
        """Logprob of every prompt token given the ones before it (None for the first). A generator run by
        the scheduler: it scores SCORE_CHUNK positions at a time through its own KV cache, yielding between
        chunks so that running sequences keep decoding."""
        from ..engine import KVCache

        out: list[TokenLogprob | None] = [None]
        model = self.lm.model
        cache = KVCache(model.cfg, 1, len(ids), self.engine.device, self.engine.dtype) if model.cfg.causal else None
        tokens = torch.tensor([ids], device=self.engine.device)
        step = SCORE_CHUNK if cache is not None else len(ids)  # an encoder sees the whole text at once
        for start in range(0, len(ids) - 1, step):
            with torch.inference_mode():
                if cache is not None:
                    hidden = model(tokens[:, start:start + step], cache=cache, start_pos=[start], slots=[0],
                                   return_hidden=True)[0]
                else:
                    hidden = model(tokens, return_hidden=True)[0]
                lp = torch.log_softmax(self._head(hidden).float(), -1)
            for j in range(lp.shape[0]):
                pos = start + j + 1
                if pos >= len(ids):
                    break
                alts: list[tuple[int, float]] = []
                if top:
                    vals, idx = torch.topk(lp[j], top)
                    alts = list(zip(idx.tolist(), vals.tolist()))
                out.append(TokenLogprob(ids[pos], float(lp[j, ids[pos]]), alts))
            yield
        return out

    def score_prompts(self, prompts: list[list[int]], top: int
                      ) -> Generator[None, None, list[list[TokenLogprob | None]]]:
        out = []
        for ids in prompts:
            out.append((yield from self.prompt_logprobs(ids, top)))
        return out

    def embed(self, batch: list[list[int]]) -> Generator[None, None, list[torch.Tensor]]:
        """Vectors pooled as `LM.embed` pools them (an encoder's sentence-transformers config; mean otherwise);
        a generator run by the scheduler, EMBED_CHUNK inputs at a time."""
        from ..embeddings import embed_ids, pad_id

        vecs: list[torch.Tensor] = []
        for start in range(0, len(batch), EMBED_CHUNK):
            part = torch.from_numpy(embed_ids(self.lm.model, batch[start:start + EMBED_CHUNK], pad_id(self.tok),
                                              self.lm.pooling))
            vecs.extend(F.normalize(part, dim=-1))  # unit vectors, as OpenAI's embeddings are
            yield
        return vecs


# -- formatting -------------------------------------------------------------------------------------------------
def _completion_logprobs(server: Server, lps: list[TokenLogprob | None], offset: int) -> dict[str, Any]:
    tokens, token_lps, tops, offsets = [], [], [], []
    for lp in lps:
        if lp is None:  # the first prompt token has no context to be predicted from
            continue
        text = server.token_text(lp.token_id)
        tokens.append(text)
        token_lps.append(lp.logprob)
        tops.append({server.token_text(i): v for i, v in lp.top} if lp.top else None)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def _echo_logprobs(server: Server, prompt: list[int], plps: list[TokenLogprob | None]) -> dict[str, Any]:
    tokens, token_lps, tops, offsets, offset = [], [], [], [], 0
    for i, lp in zip(prompt, plps):
        text = server.token_text(i)
        tokens.append(text)
        token_lps.append(None if lp is None else lp.logprob)
        tops.append(None if lp is None else {server.token_text(a): v for a, v in lp.top} if lp.top else None)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def _merge_logprobs(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    return {k: a[k] + b[k] for k in a}


def _chat_logprobs(server: Server, lps: list[TokenLogprob]) -> dict[str, Any]:
    def entry(i: int, v: float) -> dict[str, Any]:
        text = server.token_text(i)
        return {"token": text, "logprob": v, "bytes": list(text.encode("utf-8"))}

    return {"content": [entry(lp.token_id, lp.logprob) | {"top_logprobs": [entry(i, v) for i, v in lp.top]}
                        for lp in lps], "refusal": None}


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _api_error_for(e: Exception) -> APIError:
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


def _stream_error(e: Exception) -> str:
    """A failure after the stream's headers went out is reported in-band, as OpenAI does; [DONE] follows."""
    return _sse(_api_error_for(e).body()) + "data: [DONE]\n\n"


# -- the app ------------------------------------------------------------------------------------------------------
def create_app(lm: LM, cfg: ServerConfig) -> FastAPI:
    """Build the FastAPI app; its scheduler thread starts now and stops at shutdown."""
    server = Server(lm, cfg)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        server.scheduler.close()

    # The API's description is served for clients' tools; no docs pages (they would load scripts from a CDN).
    app = FastAPI(title="lmforge", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url="/openapi.json")
    app.state.server = server
    app.add_middleware(Gate, cfg=cfg, metrics=server.metrics)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError) -> JSONResponse:
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        err = (e.errors() or [{}])[0]
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        # A body that is not JSON has no field to name (its loc holds the character offset instead).
        param = None if err.get("type") == "json_invalid" else ".".join(loc) or None
        msg = err.get("msg", "invalid request")
        return envelope(400, f"{param}: {msg}" if param else msg, "invalid_request_error", param, "invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        msg = f"no route {request.method} {request.url.path}" if e.status_code in (404, 405) else str(e.detail)
        return envelope(e.status_code, msg, "invalid_request_error" if e.status_code < 500 else "server_error",
                         None, "not_found" if e.status_code == 404 else None)

    @app.exception_handler(LMForgeError)
    async def _lmforge_error(request: Request, e: LMForgeError) -> JSONResponse:
        return error_response(_api_error_for(e))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception) -> JSONResponse:
        return envelope(500, f"internal error: {type(e).__name__}: {e}", "server_error")

    # -- plain routes ----------------------------------------------------------------------------------
    @app.get("/health")
    async def health() -> Any:
        body = {"status": "ok", "model": cfg.model_name, "running": server.scheduler.running,
                "waiting": server.scheduler.waiting, "kv_cache": server.engine.kv_info}
        if not server.scheduler.alive:  # nothing can be served: say why, with a status a probe notices
            return JSONResponse(body | {"status": "error",
                                        "error": server.scheduler.error or "the scheduler thread has stopped"}, 503)
        return body

    def model_card() -> dict[str, Any]:
        # an encoder only embeds; the web page and clients read this to offer the right interface
        caps = ["embeddings"] if lm.is_encoder else ["completions", "chat", "embeddings"]
        return {"id": cfg.model_name, "object": "model", "created": server.created, "owned_by": "lmforge",
                "max_model_len": server.ctx, "capabilities": caps}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> dict[str, Any]:
        server.check_model(name)
        return model_card()

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(server.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/")
    async def index() -> HTMLResponse:
        page = resources.files("lmforge.serve").joinpath("static/index.html").read_text("utf-8")
        # the page's temperature control starts at the server's own default
        return HTMLResponse(page.replace("{{DEFAULT_TEMPERATURE}}", f"{DEFAULT_TEMPERATURE:g}"))

    # the page's vendored scripts and styles, shipped in the package (nothing is fetched from elsewhere)
    app.mount("/static", StaticFiles(packages=[("lmforge.serve", "static")]), name="static")

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest) -> dict[str, Any]:
        server.check_model(req.model)
        if req.messages is not None:
            server.check_chat_size(req.messages)
            ids = await asyncio.to_thread(server.chat_ids, req.messages, req.add_generation_prompt)
        elif req.prompt is not None:
            server.check_text_size([req.prompt], "prompt")
            ids = await asyncio.to_thread(server.tok.encode, req.prompt, add_special_tokens=req.add_special_tokens)
        else:
            raise APIError(400, "send `prompt` or `messages`", param="prompt")
        return {"tokens": ids, "count": len(ids), "max_model_len": server.ctx}

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest) -> dict[str, Any]:
        server.check_model(req.model)
        bad = next((i for i in req.tokens if not 0 <= i < server.vocab), None)
        if bad is not None:
            raise APIError(400, f"token id {bad} is outside the vocabulary of {server.vocab}", param="tokens")
        return {"prompt": await asyncio.to_thread(server.tok.decode, req.tokens)}

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict[str, Any]:
        """The tokenizer's configuration as vLLM serves it (tokenizer_config.json's keys), so that clients
        such as lm-eval-harness's remote tokenizer need no copy of the tokenizer."""
        tok = server.tok
        return {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": tok.bos_token, "eos_token": tok.eos_token,
                "pad_token": tok.pad_token, "unk_token": tok.unk_token, "model_max_length": server.ctx,
                "chat_template": tok.chat_template or CHATML_TEMPLATE}

    @app.post("/v1/embeddings")
    async def embeddings(req: EmbeddingRequest) -> dict[str, Any]:
        server.check_model(req.model)
        _, batch = await asyncio.to_thread(server.token_rows, req.input, "input", cfg.max_inputs)
        for ids in batch:
            if len(ids) > server.ctx:
                raise APIError(400, f"an input is {len(ids)} tokens, but the context window is {server.ctx} tokens",
                               param="input", code="context_length_exceeded")
        vecs = await server.scheduler.call(lambda: server.embed(batch))
        dim = vecs[0].shape[0]
        if req.dimensions is not None:
            if req.dimensions > dim:
                raise APIError(400, f"dimensions must be at most {dim}, got {req.dimensions}", param="dimensions")
            vecs = [F.normalize(v[: req.dimensions], dim=-1) for v in vecs]

        n_tokens = sum(len(ids) for ids in batch)
        server.metrics.tokens_in.inc(n_tokens)

        def render() -> JSONResponse:  # formatting and JSON-encoding many floats: off the loop too
            data = [{"object": "embedding", "index": i,
                     "embedding": base64.b64encode(v.numpy().astype("<f4").tobytes()).decode()
                     if req.encoding_format == "base64" else v.tolist()} for i, v in enumerate(vecs)]
            return JSONResponse({"object": "list", "data": data, "model": cfg.model_name,
                                 "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}})

        return await asyncio.to_thread(render)

    # -- generation -----------------------------------------------------------------------------------------
    async def run_job(request: Request, prompts: list[list[int]], params: list[SamplingParams],
                      grammar: Grammar | None) -> Job:
        constraints = server.constraints(grammar, len(prompts))
        job = server.scheduler.submit(prompts, params, constraints)  # QueueFull -> 429, NeverFits -> 400
        server.metrics.tokens_in.inc(sum(len(p) for p in prompts))
        return job

    async def events(job: Job, request: Request | None) -> AsyncIterator[Event]:
        """The job's events until every sequence finishes; cancels the job if abandoned or disconnected."""
        remaining = len(job.prompts)
        watcher = asyncio.create_task(_watch_disconnect(request, job)) if request is not None else None
        try:
            while remaining:
                item = await job.events.get()
                if isinstance(item, LMForgeError):
                    raise _api_error_for(item)
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

    async def _watch_disconnect(request: Request, job: Job) -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                server.scheduler.cancel(job)
                return

    def finish(reason: str | None) -> str:
        return "length" if reason == "length" else "stop"

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request) -> Any:
        server.check_model(req.model)
        if req.top_logprobs and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        server.check_generates()
        server.check_chat_size(req.messages)
        ids = await asyncio.to_thread(server.chat_ids, req.messages,  # template and tokenizer: off the loop
                                      req.add_generation_prompt, req.continue_final_message)
        server.check_ids(ids, "messages")
        requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        explicit = requested is not None
        max_tokens = server.budget(len(ids), requested, explicit,
                                   "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens",
                                   prompt_param="messages")
        params = [server.sampling(req, max_tokens, req.logprobs, req.top_logprobs or 0, i) for i in range(req.n)]
        grammar = await asyncio.to_thread(server.grammar, req)
        server.check_structured(req, grammar, max_tokens,
                                "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens")
        job = await run_job(request, [ids] * req.n, params, grammar)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        base = {"id": rid, "created": created, "model": cfg.model_name, "system_fingerprint": "lmforge"}
        shown = [0] * req.n  # logprob entries passed on, per choice

        def content_lps(ev: Event) -> list[TokenLogprob]:
            # Chat logprobs cover the content, as OpenAI's do: not the end-of-turn token that ended it.
            keep = ev.logprobs[:max(0, ev.completion_tokens - shown[ev.index])]
            shown[ev.index] += len(keep)
            return keep

        if not req.stream:
            texts, reasons, counts = [""] * req.n, [None] * req.n, [0] * req.n
            lps: list[list[TokenLogprob]] = [[] for _ in range(req.n)]
            async for ev in events(job, request):
                texts[ev.index] += ev.text
                lps[ev.index].extend(content_lps(ev))
                if ev.finish_reason is not None:
                    reasons[ev.index], counts[ev.index] = ev.finish_reason, ev.completion_tokens
            choices = [{"index": i, "message": {"role": "assistant", "content": texts[i]},
                        "logprobs": _chat_logprobs(server, lps[i]) if req.logprobs else None,
                        "finish_reason": finish(reasons[i])} for i in range(req.n)]
            return {**base, "object": "chat.completion", "choices": choices,
                    "usage": {"prompt_tokens": len(ids), "completion_tokens": sum(counts),
                              "total_tokens": len(ids) + sum(counts)}}

        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        async def stream() -> AsyncIterator[str]:
            chunk = {**base, "object": "chat.completion.chunk"}
            extra = {"usage": None} if include_usage else {}
            for i in range(req.n):
                yield _sse(chunk | {"choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                 "logprobs": None, "finish_reason": None}]} | extra)
            total = 0
            try:
                async for ev in events(job, None):
                    ev_lps = content_lps(ev)
                    if ev.text or (ev_lps and req.logprobs):
                        lp = _chat_logprobs(server, ev_lps) if req.logprobs else None
                        yield _sse(chunk | {"choices": [{"index": ev.index, "delta": {"content": ev.text},
                                                         "logprobs": lp, "finish_reason": None}]} | extra)
                    if ev.finish_reason is not None:
                        total += ev.completion_tokens
                        yield _sse(chunk | {"choices": [{"index": ev.index, "delta": {}, "logprobs": None,
                                                         "finish_reason": finish(ev.finish_reason)}]} | extra)
            except Exception as e:  # headers are gone: report in-band, as OpenAI does
                yield _stream_error(e)
                return
            if include_usage:
                yield _sse(chunk | {"choices": [], "usage": {"prompt_tokens": len(ids), "completion_tokens": total,
                                                             "total_tokens": len(ids) + total}})
            yield "data: [DONE]\n\n"

        return _streaming(stream(), job)

    def _streaming(gen: AsyncIterator[str], job: Job) -> StreamingResponse:
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

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request) -> Any:
        server.check_model(req.model)
        server.check_generates()
        if req.best_of is not None and req.best_of != req.n:  # every candidate is returned: best_of is n
            raise APIError(400, f"best_of must equal n ({req.n}), got {req.best_of}", param="best_of")
        raw, prompts = await asyncio.to_thread(server.token_rows, req.prompt, "prompt", cfg.max_inputs)
        explicit = "max_tokens" in req.model_fields_set and req.max_tokens is not None
        want = req.max_tokens if req.max_tokens is not None else None
        if want == 0 and not req.echo:
            raise APIError(400, "max_tokens must be at least 1 (or use echo to score the prompt)", param="max_tokens")
        budgets = [server.budget(len(ids), want, explicit) for ids in prompts]
        top = req.logprobs or 0
        with_lp = req.logprobs is not None
        grammar = await asyncio.to_thread(server.grammar, req)
        if any(budgets):
            server.check_structured(req, grammar, min(b for b in budgets if b), "max_tokens")
        flat, params, owner = [], [], []
        for p, (ids, budget) in enumerate(zip(prompts, budgets)):
            for j in range(req.n):
                owner.append(p)
                if budget:
                    flat.append(ids)
                    params.append(server.sampling(req, budget, with_lp, top, j))
        prompt_lps: list[list[TokenLogprob | None]] = []
        if req.echo and with_lp:
            prompt_lps = await server.scheduler.call(lambda: server.score_prompts(prompts, top))
        texts_in = await asyncio.to_thread(
            lambda: [server.tok.decode(ids) if isinstance(r, list) else r for r, ids in zip(raw, prompts)])
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        base = {"id": rid, "created": created, "model": cfg.model_name, "system_fingerprint": "lmforge"}
        n_choices = len(owner)
        prompt_tokens = sum(len(ids) for ids in prompts)

        def echo_lp(i: int) -> dict[str, Any]:
            return _echo_logprobs(server, prompts[owner[i]], prompt_lps[owner[i]]) if prompt_lps else \
                {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}

        if not flat:  # max_tokens 0 with echo: score the prompt only
            choices = [{"index": i, "text": texts_in[owner[i]], "finish_reason": "length",
                        "logprobs": echo_lp(i) if with_lp else None} for i in range(n_choices)]
            return {**base, "object": "text_completion", "choices": choices,
                    "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": 0, "total_tokens": prompt_tokens}}

        job = await run_job(request, flat, params, grammar)

        if not req.stream:
            texts, reasons, counts = [""] * n_choices, [None] * n_choices, [0] * n_choices
            lps: list[list[TokenLogprob]] = [[] for _ in range(n_choices)]
            async for ev in events(job, request):
                texts[ev.index] += ev.text
                lps[ev.index].extend(ev.logprobs)
                if ev.finish_reason is not None:
                    reasons[ev.index], counts[ev.index] = ev.finish_reason, ev.completion_tokens
            choices = []
            for i in range(n_choices):
                prefix = texts_in[owner[i]] if req.echo else ""
                logprobs = None
                if with_lp:
                    logprobs = _completion_logprobs(server, lps[i], len(prefix))
                    if req.echo:
                        logprobs = _merge_logprobs(echo_lp(i), logprobs)
                choices.append({"index": i, "text": prefix + texts[i], "logprobs": logprobs,
                                "finish_reason": finish(reasons[i])})
            return {**base, "object": "text_completion", "choices": choices,
                    "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": sum(counts),
                              "total_tokens": prompt_tokens + sum(counts)}}

        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        async def stream() -> AsyncIterator[str]:
            chunk = {**base, "object": "text_completion"}
            extra = {"usage": None} if include_usage else {}
            offsets = [len(texts_in[owner[i]]) if req.echo else 0 for i in range(n_choices)]
            if req.echo:
                for i in range(n_choices):
                    lp = echo_lp(i) if with_lp else None
                    yield _sse(chunk | {"choices": [{"index": i, "text": texts_in[owner[i]], "logprobs": lp,
                                                     "finish_reason": None}]} | extra)
            total = 0
            try:
                async for ev in events(job, None):
                    if ev.text or (ev.logprobs and with_lp):
                        lp = _completion_logprobs(server, ev.logprobs, offsets[ev.index]) if with_lp else None
                        offsets[ev.index] += len(ev.text)
                        yield _sse(chunk | {"choices": [{"index": ev.index, "text": ev.text, "logprobs": lp,
                                                         "finish_reason": None}]} | extra)
                    if ev.finish_reason is not None:
                        total += ev.completion_tokens
                        yield _sse(chunk | {"choices": [{"index": ev.index, "text": "", "logprobs": None,
                                                         "finish_reason": finish(ev.finish_reason)}]} | extra)
            except Exception as e:  # headers are gone: report in-band, as OpenAI does
                yield _stream_error(e)
                return
            if include_usage:
                yield _sse(chunk | {"choices": [], "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": total,
                                                             "total_tokens": prompt_tokens + total}})
            yield "data: [DONE]\n\n"

        return _streaming(stream(), job)

    return app


def model_name_for(model: str) -> str:
    """The id clients send as `model`: a registry name as given, a file or directory by its name."""
    p = Path(model)
    return p.name if p.exists() else model


def serve(lm: LM, cfg: ServerConfig, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Run the server until interrupted."""
    import uvicorn

    app = create_app(lm, cfg)
    kv = app.state.server.engine.kv_info
    print(f"KV cache: {kv['slots']} slots, up to {kv['context']} tokens each, {kv['tokens']} tokens in all, "
          f"{kv['bytes'] / 2**20:.0f} MiB (--kv-memory)", file=sys.stderr)
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=5)
