"""Agents: a ReAct-style loop over a task list that drives a local model or any OpenAI-compatible endpoint
with tools, bounded by steps, tokens and time, and recorded as a JSONL transcript (`lmforge agent`)."""

from .backends import AgentError, Backend, ContextFull, LocalBackend, OpenAIBackend, Reply, endpoint_url
from .loop import (
    DEFAULT_MAX_STEPS,
    DEFAULT_MAX_TOKENS,
    DEFAULT_STEP_TOKENS,
    DEFAULT_TIMEOUT,
    AgentResult,
    Transcript,
    format_event,
    resolve_tools,
    run,
)

__all__ = ["DEFAULT_MAX_STEPS", "DEFAULT_MAX_TOKENS", "DEFAULT_STEP_TOKENS", "DEFAULT_TIMEOUT", "AgentError",
           "AgentResult", "Backend", "ContextFull", "LocalBackend", "OpenAIBackend", "Reply", "Transcript",
           "endpoint_url", "format_event", "resolve_tools", "run"]
