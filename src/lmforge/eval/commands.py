"""`lmforge solve` (one question, one reasoning strategy) and the strategy flags of `lmforge eval`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from ..engine.sampling import DEFAULT_TEMPERATURE
from ..errors import LMForgeError
from .runner import check_strategy
from .strategies import CHAIN_MAX_TOKENS, DIRECT_MAX_TOKENS, STRATEGIES, Strategy, solve
from .tasks import get_task

# The flags a strategy takes, besides --strategy itself (dest -> flag), for "needs --strategy" errors.
_STRATEGY_FLAGS = {"n": "--n", "max_rounds": "--max-rounds", "temperature": "--temperature",
                   "max_tokens": "--max-tokens"}


def _add_strategy_flags(p: argparse.ArgumentParser, default: str | None) -> None:
    d = Strategy()  # the defaults, defined once
    g = p.add_argument_group("reasoning strategy")
    g.add_argument("--strategy", choices=STRATEGIES, default=default,
                   help="direct: answer at once; cot: think step by step; self-consistency: --n sampled chains, "
                        "majority vote on the answer; self-refine: draft, critique, revise"
                        + (f" (default {default})" if default else " (generative tasks; prompts are 0-shot chat)"))
    g.add_argument("--n", type=int, default=None, help=f"self-consistency: chains per question (default {d.n})")
    g.add_argument("--max-rounds", type=int, default=None,
                   help=f"self-refine: critique-and-revise rounds at most (default {d.max_rounds})")
    g.add_argument("--temperature", type=float, default=None,
                   help=f"default 0 (greedy); self-consistency {DEFAULT_TEMPERATURE:g}")
    g.add_argument("--max-tokens", type=int, default=None,
                   help=f"tokens per completion (default {DIRECT_MAX_TOKENS} direct, {CHAIN_MAX_TOKENS} otherwise)")


def strategy_from_args(args: argparse.Namespace) -> Strategy | None:
    """The Strategy the flags describe (None without --strategy); a strategy's flag without it is an error."""
    if args.strategy is None:
        given = [flag for dest, flag in _STRATEGY_FLAGS.items() if getattr(args, dest, None) is not None]
        if given:
            raise LMForgeError(f"{', '.join(given)} {'needs' if len(given) == 1 else 'need'} --strategy")
        return None
    if args.n is not None and args.strategy != "self-consistency":
        raise LMForgeError(f"--n applies to self-consistency, not {args.strategy}")
    if args.max_rounds is not None and args.strategy != "self-refine":
        raise LMForgeError(f"--max-rounds applies to self-refine, not {args.strategy}")
    opts = {k: getattr(args, k) for k in _STRATEGY_FLAGS if getattr(args, k, None) is not None}
    return Strategy(args.strategy, seed=getattr(args, "seed", None), **opts)


def _tool_names(text: str | None) -> list[str]:
    names = [t.strip() for t in (text or "").split(",") if t.strip()]
    if text is not None and not names:
        raise LMForgeError("--tools needs tool names, e.g. --tools calculator")
    return names


def add_parsers(sub: Any, eval_parser: argparse.ArgumentParser, add_model_opts: Callable[..., None],
                load: Callable[[argparse.Namespace], Any]) -> None:
    """Add `solve` to the `lmforge` subcommands, and the strategy flags to `lmforge eval`, whose command then
    receives ``args.strategy`` as a Strategy (or None), checked before any model loads."""
    p = sub.add_parser("solve", help="answer a question with a reasoning strategy (direct, chain of thought, "
                                     "self-consistency, self-refine), optionally using tools")
    add_model_opts(p)
    p.add_argument("question", nargs="?", default=None, help="the question (default: read stdin)")
    _add_strategy_flags(p, "direct")
    p.add_argument("--tools", default=None, metavar="NAMES",
                   help="comma-separated tools the model may call while it answers, e.g. calculator,python")
    p.add_argument("--top-p", type=float, default=None, help=f"nucleus sampling mass (default {Strategy().top_p:g})")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--extract", default="number", metavar="number|regex:PATTERN|text",
                   help="how the answer is read from a completion: the final number (after '####', else the "
                        "last one; default), a regex's first group, or the whole text")
    p.add_argument("--chains", action="store_true",
                   help="also print every completion (the sampled chains, or self-refine's drafts and critiques)")
    p.add_argument("--adapter", default=None, metavar="DIR", help="apply a LoRA adapter directory")
    p.set_defaults(func=lambda args: cmd_solve(args, load))

    _add_strategy_flags(eval_parser, None)
    eval_parser.add_argument("--tools", default=None, metavar="NAMES",
                             help="generative tasks: comma-separated tools offered in 0-shot chat prompts, their calls "
                                  "run during generation (e.g. --tools calculator)")
    eval_parser.add_argument("--tool-execution", default="on", choices=("on", "off"),
                             help="with --tools: off leaves calls unrun, so the model writes their results itself "
                                  "(default on)")
    run_eval = eval_parser.get_default("func")

    def eval_with_strategy(args: argparse.Namespace) -> int:
        args.strategy = strategy_from_args(args)
        args.tools = tuple(_tool_names(args.tools))
        if args.tools:
            from ..tools.inline import resolve_tools

            resolve_tools(list(args.tools))  # an unknown tool is an error before the model loads
        elif args.tool_execution != "on":
            raise LMForgeError("--tool-execution needs --tools")
        args.tool_execution = args.tool_execution == "on"
        if args.strategy is not None and not args.tool_execution:
            raise LMForgeError("--tool-execution off cannot be combined with --strategy: a strategy runs its tools")
        if args.strategy is not None and args.model != "compare":
            for name in (args.tasks or "").split(","):
                if name.strip():
                    check_strategy(get_task(name.strip()), args.shots)
        return run_eval(args)

    eval_parser.set_defaults(func=eval_with_strategy)


def cmd_solve(args: argparse.Namespace, load: Callable[[argparse.Namespace], Any]) -> int:
    st = strategy_from_args(args)
    assert st is not None  # solve's --strategy has a default
    st.top_p = st.top_p if args.top_p is None else args.top_p
    st.system = args.system
    st.extract = None if args.extract == "text" else args.extract
    st.__post_init__()  # check the settings changed above
    tools = _tool_names(args.tools)
    question = args.question if args.question is not None else sys.stdin.read()
    if not question.strip():
        raise LMForgeError("the question is empty")
    if tools:
        from ..tools.inline import resolve_tools

        resolve_tools(tools)  # an unknown tool is an error before the model loads
    sol = solve(load(args), question, st, tools=tools or None)
    if args.chains:
        for i, (text, answer) in enumerate(zip(sol.chains, sol.answers)):
            label = "draft" if st.name == "self-refine" else "chain"
            print(f"--- {label} {i + 1} (answer: {answer}) ---\n{text.strip()}")
            if i < len(sol.critiques):
                print(f"--- critique {i + 1} ---\n{sol.critiques[i] or 'no issues'}")
        if sol.votes:
            print("--- votes: " + ", ".join(f"{a}: {v}" for a, v in sol.votes.items()) + " ---")
    if sol.answer is None:
        print("lmforge: no answer could be read from the completion; it was:", file=sys.stderr)
        print(sol.text.strip())
        return 0
    print(sol.answer)
    return 0
