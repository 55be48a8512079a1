"""`lmforge agent`: run the agent loop toward a goal with a local model or an OpenAI-compatible endpoint."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from ..errors import LMForgeError
from .backends import AgentError, OpenAIBackend
from .loop import (
    DEFAULT_MAX_STEPS,
    DEFAULT_MAX_TOKENS,
    DEFAULT_STEP_TOKENS,
    DEFAULT_TIMEOUT,
    format_event,
    resolve_tools,
    run,
)

BUDGET_STOPPED = 3  # exit status when a budget ended the run before a final answer


def add_parsers(sub: Any) -> None:
    """Add `agent` to the `lmforge` subcommand parser."""
    from ..registry import DEFAULT_MODEL

    p = sub.add_parser("agent", help="work toward a goal in steps with tools (plan, act, observe), bounded "
                                     "by steps, tokens and time; a local model or an OpenAI-compatible endpoint")
    p.add_argument("model", nargs="?", default=None,
                   help=f"registry name, .gguf file or HF directory (default {DEFAULT_MODEL}; not with --base-url)")
    p.add_argument("goal", help="what to achieve")
    p.add_argument("--tools", default="calculator,python",
                   help="comma-separated tools: calculator, python, search (default calculator,python)")
    p.add_argument("--index", default=None, metavar="INDEX", help="the `lmforge index build` directory for search")
    p.add_argument("--max-steps", type=int, default=DEFAULT_MAX_STEPS,
                   help=f"most model turns (default {DEFAULT_MAX_STEPS})")
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                   help=f"most tokens generated, all turns together: a turn starts only while its --step-tokens "
                        f"fit in what is left (default {DEFAULT_MAX_TOKENS})")
    p.add_argument("--step-tokens", type=int, default=DEFAULT_STEP_TOKENS,
                   help=f"most tokens one turn generates (default {DEFAULT_STEP_TOKENS})")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                   help=f"wall-clock budget (default {DEFAULT_TIMEOUT:g})")
    p.add_argument("--tool-choice", choices=["required", "auto"], default="required",
                   help="required: every turn calls a tool (final_answer included); auto: a turn without a call "
                        "is the final answer (default required)")
    p.add_argument("--transcript", default=None, metavar="PATH.jsonl",
                   help="JSONL file the events are appended to (default agent-<time>.jsonl here)")
    p.add_argument("--base-url", default=None, metavar="URL",
                   help="an OpenAI-compatible endpoint instead of a local model, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--api-key", default=None, metavar="KEY", help="sent as `Authorization: Bearer KEY`")
    p.add_argument("--model", dest="endpoint_model", default=None, metavar="NAME",
                   help="the endpoint's model (default: the first it lists at /v1/models)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0, greedy)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.set_defaults(func=cmd_agent)


def cmd_agent(args: argparse.Namespace) -> int:
    # Everything that can be checked is checked before a model loads or a request goes out.
    for flag in ("max_steps", "max_tokens", "step_tokens"):
        if getattr(args, flag) < 1:
            raise AgentError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if not args.timeout > 0:
        raise AgentError(f"--timeout must be above 0 seconds, got {args.timeout:g}")
    if args.base_url is None and (args.api_key is not None or args.endpoint_model is not None):
        raise AgentError("--api-key and --model go with --base-url (a local model is given as MODEL)")
    if args.base_url is not None and args.model is not None:
        raise AgentError(f"give either MODEL ({args.model!r}) or --base-url, not both (the endpoint's model "
                         "is --model)")
    names = [n.strip() for n in args.tools.split(",") if n.strip()]
    if "search" in names:
        import lmforge.retrieval  # noqa: F401 - registers the search tool

    tools = resolve_tools(get_options(name, args) for name in names)
    if args.index is not None and "search" not in names:
        raise AgentError("--index is for the search tool: add search to --tools")
    if args.base_url is not None:
        backend: Any = OpenAIBackend(args.base_url, api_key=args.api_key, model=args.endpoint_model,
                                     temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    transcript = Path(args.transcript or time.strftime("agent-%Y%m%d-%H%M%S.jsonl"))
    if not transcript.parent.is_dir():
        raise AgentError(f"--transcript: the folder {transcript.parent} does not exist")
    if args.base_url is None:
        from ..api import load
        from ..engine import SamplingParams
        from ..registry import DEFAULT_MODEL
        from .backends import LocalBackend

        params = SamplingParams(temperature=args.temperature, top_p=1.0 if args.top_p is None else args.top_p,
                                seed=args.seed)
        backend = LocalBackend(load(args.model or DEFAULT_MODEL, device=args.device, progress=sys.stderr.isatty()),
                               params)
    print(f"transcript: {transcript}", flush=True)

    def show(event: dict[str, Any]) -> None:
        line = format_event(event)
        if line is not None:
            print(line, flush=True)

    result = run(args.goal, backend, tools, max_steps=args.max_steps, max_tokens=args.max_tokens,
                 step_tokens=args.step_tokens, timeout=args.timeout, transcript=transcript, on_event=show,
                 tool_choice=args.tool_choice)
    print(f"transcript: {transcript}")
    return 0 if result.answer is not None else BUDGET_STOPPED


def get_options(name: str, args: argparse.Namespace) -> Any:
    """The tool ``name`` with the options its flags give (the index, for search)."""
    from ..tools import get_tool

    if name == "search":
        if args.index is None:
            raise LMForgeError("--tools search needs --index INDEX (a `lmforge index build` directory)")
        return get_tool("search", index=args.index, device=args.device)
    return get_tool(name)
