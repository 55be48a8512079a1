"""`lmforge serve`: an OpenAI-compatible HTTP server with continuous batching and a web chat page.

- `app`: the FastAPI app and its routes.
- `edge`: every request checked once, and turned into token rows and `SamplingParams`.
- `generation`: the one generation path of chat and completions (collect choices or stream chunks).
- `formatting`: OpenAI's response, chunk and logprob shapes; errors as HTTP answers.
- `server`: the engine (`LM.configure_engine`), scheduler and metrics; prompt scoring and embeddings.
- `scheduler`: the thread that drives the engine step by step. `gate`: keys, body limits and errors.
- `schemas`: request bodies. `metrics`: Prometheus counters.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ServerConfig", "create_app", "model_name_for", "serve"]


def __getattr__(name: str) -> Any:
    # Imported on first use: the CLI reads the scheduler's defaults without loading FastAPI.
    if name == "ServerConfig":
        from .gate import ServerConfig

        return ServerConfig
    if name in __all__:
        from . import app

        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
