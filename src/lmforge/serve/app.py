"""The OpenAI-compatible HTTP API (FastAPI): routes, each a request checked at the edge (`edge`), work for the
scheduler (`server`, `generation`) and a response in OpenAI's shape (`formatting`)."""

from __future__ import annotations

import asyncio
import base64
import sys
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Any

import torch.nn.functional as F
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..api import LM
from ..engine import TokenLogprob
from ..engine.sampling import DEFAULT_TEMPERATURE
from ..errors import LMForgeError
from ..tokenizer import CHATML_TEMPLATE
from .formatting import ChatChoices, CompletionChoices, api_error_for, usage
from .gate import APIError, Gate, ServerConfig, envelope, error_response
from .generation import respond
from .schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    TokenizeRequest,
)
from .server import Server


def create_app(lm: LM, cfg: ServerConfig, draft: LM | None = None) -> FastAPI:
    """Build the FastAPI app; its scheduler thread starts now and stops at shutdown. ``draft``: a small model
    that guesses tokens for speculative decoding (default: prompt lookup where it is exact)."""
    server = Server(lm, cfg, draft)

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
        return error_response(api_error_for(e))

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
    def base(prefix: str) -> dict[str, Any]:
        return {"id": f"{prefix}-{uuid.uuid4().hex}", "created": int(time.time()), "model": cfg.model_name,
                "system_fingerprint": "lmforge"}

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request) -> Any:
        server.check_model(req.model)
        if req.top_logprobs and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        server.check_generates()
        server.check_chat_size(req.messages)
        tools = server.tool_choice(req)
        ids = await asyncio.to_thread(server.chat_ids, req.messages,  # template and tokenizer: off the loop
                                      req.add_generation_prompt, req.continue_final_message, tools)
        server.check_ids(ids, "messages")
        param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        max_tokens = server.budget(len(ids), requested, requested is not None, param, prompt_param="messages")
        params = [server.sampling(req, max_tokens, req.logprobs, req.top_logprobs or 0, i) for i in range(req.n)]
        grammar = await asyncio.to_thread(server.tool_grammar, tools) if tools.constrained else \
            await asyncio.to_thread(server.grammar, req)
        server.check_structured(req, grammar, max_tokens, param)
        choices = ChatChoices(base("chatcmpl"), req.n, req.logprobs, server.token_text, tools)
        return await respond(server, request, [ids] * req.n, params, grammar, choices, stream=req.stream,
                             include_usage=bool(req.stream_options and req.stream_options.include_usage),
                             prompt_tokens=len(ids))

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request) -> Any:
        server.check_model(req.model)
        server.check_generates()
        if req.best_of is not None and req.best_of != req.n:  # every candidate is returned: best_of is n
            raise APIError(400, f"best_of must equal n ({req.n}), got {req.best_of}", param="best_of")
        raw, prompts = await asyncio.to_thread(server.token_rows, req.prompt, "prompt", cfg.max_inputs)
        explicit = "max_tokens" in req.model_fields_set and req.max_tokens is not None
        if req.echo and req.logprobs is not None and lm.is_seq2seq:
            raise APIError(400, "an encoder-decoder's prompt is its source, which it does not score: echo with "
                                "logprobs is for decoder models", param="echo")
        if req.max_tokens == 0 and not req.echo:
            raise APIError(400, "max_tokens must be at least 1 (or use echo to score the prompt)", param="max_tokens")
        budgets = [server.budget(len(ids), req.max_tokens, explicit) for ids in prompts]
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
        prompt_tokens = sum(len(ids) for ids in prompts)
        choices = CompletionChoices(base("cmpl"), len(owner), with_lp, server.token_text, echo=req.echo, owner=owner,
                                    texts_in=texts_in, prompts=prompts, prompt_lps=prompt_lps)
        if not flat:  # max_tokens 0 with echo: score the prompt only
            return {**choices.base, "object": choices.object, "choices": choices.prompt_only(),
                    "usage": usage(prompt_tokens, 0)}
        return await respond(server, request, flat, params, grammar, choices, stream=req.stream,
                             include_usage=bool(req.stream_options and req.stream_options.include_usage),
                             prompt_tokens=prompt_tokens)

    return app


def model_name_for(model: str) -> str:
    """The id clients send as `model`: a registry name as given, a file or directory by its name."""
    p = Path(model)
    return p.name if p.exists() else model


def serve(lm: LM, cfg: ServerConfig, host: str = "127.0.0.1", port: int = 8000, draft: LM | None = None) -> None:
    """Run the server until interrupted."""
    import uvicorn

    app = create_app(lm, cfg, draft)
    engine = app.state.server.engine
    kv = engine.kv_info
    print(f"KV cache: {kv['slots']} slots, up to {kv['context']} tokens each, {kv['tokens']} tokens in all, "
          f"{kv['bytes'] / 2**20:.0f} MiB (--kv-memory)", file=sys.stderr)
    spec = (f"up to {engine.draft_tokens} tokens a step, guessed by "
            f"{'the draft model' if draft is not None else 'prompt lookup'}" if engine.drafter is not None
            else "off (it needs a GGUF model's packed codes on CPU)")
    print(f"speculative decoding: {spec} (--draft-tokens, --draft-model)", file=sys.stderr)
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=5)
