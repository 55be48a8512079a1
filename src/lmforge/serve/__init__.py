"""`lmforge serve`: an OpenAI-compatible HTTP server with continuous batching and a web chat page."""

from .app import create_app, model_name_for, serve
from .gate import ServerConfig

__all__ = ["ServerConfig", "create_app", "model_name_for", "serve"]
