"""The retrieval commands: `lmforge index build`, `index search` and `ask`."""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable
from typing import Any

from ..engine import SamplingParams


def add_parsers(sub: Any, sampling_opts: Callable[[argparse.ArgumentParser], None],
                sampling: Callable[[argparse.Namespace], SamplingParams]) -> None:
    """Add `index` and `ask` to the `lmforge` subcommand parser; ``sampling_opts`` adds the sampling flags
    and ``sampling`` reads them."""
    from ..registry import DEFAULT_MODEL

    p = sub.add_parser("index", help="semantic search indexes over a folder of documents")
    isub = p.add_subparsers(dest="index_command", metavar="COMMAND", required=True)
    i = isub.add_parser("build", help="chunk and embed a documents folder into an on-disk index")
    i.add_argument("docs", metavar="DOCS_DIR", help="folder (or files) of text documents")
    i.add_argument("--out", required=True, metavar="INDEX", help="index directory (replaced atomically)")
    i.add_argument("--embed-model", default="all-minilm-l6-v2", help="embedding model (default all-minilm-l6-v2)")
    i.add_argument("--chunk-words", type=int, default=120, help="words per chunk (default 120)")
    i.add_argument("--overlap", type=int, default=30, help="words shared by neighbouring chunks (default 30)")
    i.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    i.set_defaults(func=cmd_index_build)
    i = isub.add_parser("search", help="top-k chunks for a query, with scores and sources")
    i.add_argument("index", metavar="INDEX", help="a `lmforge index build` directory")
    i.add_argument("query")
    i.add_argument("-k", type=int, default=5, help="how many chunks (default 5)")
    i.add_argument("--embed-model", default=None, help="must match the index's model (default: the index's)")
    i.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    i.set_defaults(func=cmd_index_search)

    p = sub.add_parser("ask", help="answer a question from an index with a chat model, citing sources "
                                   "(greedy unless --temperature is given)")
    p.add_argument("index", metavar="INDEX", help="a `lmforge index build` directory")
    p.add_argument("question")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"chat model (default {DEFAULT_MODEL})")
    p.add_argument("-k", type=int, default=3, help="chunks given to the model (default 3)")
    p.add_argument("--embed-model", default=None, help="must match the index's model (default: the index's)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    sampling_opts(p)
    p.set_defaults(func=functools.partial(cmd_ask, sampling=sampling), temperature=0.0)


def cmd_index_build(args: argparse.Namespace) -> int:
    from .index import build_index

    info = build_index(args.docs, args.out, embed_model=args.embed_model, chunk_words=args.chunk_words,
                       overlap_words=args.overlap, device=args.device, progress=sys.stderr.isatty())
    print(f"indexed {info['chunks']} chunks from {info['files']} files with {info['embed_model']} -> {args.out}")
    return 0


def cmd_index_search(args: argparse.Namespace) -> int:
    from .index import Index

    index = Index.load(args.index, embed_model=args.embed_model, device=args.device)
    for rank, hit in enumerate(index.search(args.query, k=args.k), 1):
        text = " ".join(hit.text.split())
        print(f"{rank}. {hit.score:.4f}  {hit.source}:{hit.line}\n   {text[:300]}")
    return 0


def cmd_ask(args: argparse.Namespace, sampling: Callable[[argparse.Namespace], SamplingParams]) -> int:
    from ..api import load
    from .index import Index
    from .qa import answer

    index = Index.load(args.index, embed_model=args.embed_model, device=args.device)
    lm = load(args.model, device=args.device, progress=sys.stderr.isatty())
    result = answer(lm, index, args.question, k=args.k, params=sampling(args))
    print(result.text.strip())
    print("\nSources:")
    for i, src in enumerate(result.sources, 1):
        print(f"[{i}] {src}")
    return 0
