"""`lmforge eval` (its flags and command) and `lmforge solve` (one question, one reasoning strategy)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from ..engine.sampling import DEFAULT_TEMPERATURE
from ..errors import LMForgeError
from .runner import check_beams, check_strategy
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


def _add_eval_parser(sub: Any, load: Callable[[argparse.Namespace], Any]) -> argparse.ArgumentParser:
    p = sub.add_parser("eval", help="benchmark a model (multiple choice, generative, perplexity); "
                                    "`eval compare RUN_A RUN_B` diffs two runs")
    p.add_argument("model", help="registry name, .gguf file or HF directory (or `compare`)")
    p.add_argument("runs", nargs="*", help=argparse.SUPPRESS)
    p.add_argument("--tasks", help="comma-separated built-in task names or .toml spec files")
    p.add_argument("--data", action="append", default=[], metavar="[TASK=]PATH",
                   help="the task's data file (repeatable as TASK=PATH with several tasks)")
    p.add_argument("--limit", type=int, default=None, help="only the first N items of each task")
    p.add_argument("--shots", type=int, default=None, help="few-shot exemplars per item (default: the task's)")
    p.add_argument("--batch-size", type=int, default=16, help="items scored together (default 16)")
    p.add_argument("--chat", action="store_true", help="wrap prompts in the model's chat template")
    p.add_argument("--seed", type=int, default=1234, help="few-shot sampling seed (default 1234)")
    p.add_argument("--window", type=int, default=None, help="perplexity window in tokens (default: context)")
    p.add_argument("--stride", type=int, default=None, help="perplexity: new tokens per window (default window/2)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--out", default=None, metavar="DIR", help="write results.json, report.md and samples here")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--fresh", action="store_true",
                   help="score every item again instead of resuming an interrupted run of the same evaluation")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--num-beams", type=int, default=None,
                   help="seq2seq tasks on an encoder-decoder: beam search with this many beams (default: greedy)")
    p.set_defaults(func=lambda args: cmd_eval(args, load))
    return p


def add_parsers(sub: Any, add_model_opts: Callable[..., None], load: Callable[[argparse.Namespace], Any]) -> None:
    """Add `eval` and `solve` to the `lmforge` subcommands; eval's command receives ``args.strategy`` as a
    Strategy (or None), checked before any model loads."""
    eval_parser = _add_eval_parser(sub, load)
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


def cmd_eval(args: argparse.Namespace, load: Callable[[argparse.Namespace], Any]) -> int:
    from .report import compare, load_run, report_card, write_run
    from .runner import EvalOptions, evaluate
    from .tasks import resolve_data

    if args.model == "compare":  # `lmforge eval compare RUN_A RUN_B`
        if len(args.runs) != 2:
            raise LMForgeError("usage: lmforge eval compare RUN_A RUN_B")
        _, text = compare(load_run(args.runs[0]), load_run(args.runs[1]))
        print(text, end="")
        return 0
    if args.runs:
        raise LMForgeError(f"unexpected argument(s): {' '.join(args.runs)}")
    if not args.tasks:
        raise LMForgeError("--tasks is required (e.g. --tasks hellaswag,arc_easy)")
    specs = [get_task(t.strip()) for t in args.tasks.split(",") if t.strip()]
    data: dict[str, str] = {}
    for d in args.data:
        name, sep, path = d.partition("=")
        if sep and name in {s.name for s in specs}:
            data[name] = path
        elif len(specs) == 1:
            data[specs[0].name] = d
        else:
            raise LMForgeError(f"with several tasks, --data takes TASK=PATH (got {d!r})")
    for n in ("limit", "batch_size", "shots", "threads", "num_beams"):
        v = getattr(args, n)
        if v is not None and v < (0 if n == "shots" else 1):
            raise LMForgeError(f"--{n.replace('_', '-')} must be {'>= 0' if n == 'shots' else 'positive'}, got {v}")
    for spec in specs:  # fail on a missing data file or a misapplied option before loading the model
        check_beams(spec, args.num_beams)
        resolve_data(spec, data.get(spec.name))
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    lm = load(args)
    opt = EvalOptions(limit=args.limit, shots=args.shots, batch_size=args.batch_size, chat=args.chat, seed=args.seed,
                      progress=not args.quiet, window=args.window, stride=args.stride, resume=not args.fresh,
                      strategy=args.strategy, tools=args.tools, tool_execution=args.tool_execution,
                      num_beams=args.num_beams or 1)
    doc = evaluate(lm, specs, data, opt, model_name=args.model)
    if args.out:
        write_run(args.out, doc)
    print(report_card(doc), end="")
    for name, t in doc["tasks"].items():
        again = f", {t['resumed']} of them from an interrupted run" if t.get("resumed") else ""
        print(f"{name}: {t['n']} items in {t['seconds']:.1f}s ({t['items_per_s']} items/s{again})", file=sys.stderr)
    if args.out:
        print(f"wrote {args.out}/results.json and report.md", file=sys.stderr)
    return 0
