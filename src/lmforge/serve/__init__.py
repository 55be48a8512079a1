"""`lmforge serve`: an OpenAI-compatible HTTP server with continuous batching and a web chat page."""

from .app import ServerConfig, create_app, model_name_for, serve

__all__ = ["ServerConfig", "create_app", "model_name_for", "serve"]
