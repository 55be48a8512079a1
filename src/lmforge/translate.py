"""`lmforge translate` and `lmforge summarize`: text-to-text tasks in T5's style.

An encoder-decoder reads the task's prefix and the text ("translate English to German: ...",
"summarize: ..."); a model whose config.json declares its tasks (HF's `task_specific_params`, which
`lmforge train` and `finetune seq2seq` write) is held to them: asking for a language pair it was not
trained on is an error, not a guess. A decoder model gets the same request as a chat instruction.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import LMForgeError
from .train.seq2seq import LANGUAGES, SUMMARIZE_PREFIX, translation_prefix


def add_parsers(sub: Any, add_model_opts: Callable[..., None], add_sampling: Callable[..., None],
                sampling: Callable[[argparse.Namespace], Any], load: Callable[[argparse.Namespace], Any]) -> None:
    """Add translate and summarize to the `lmforge` subcommand parser, with the shared option helpers."""
    p = sub.add_parser("translate", help="translate text (T5-style prefix for encoder-decoders, an instruction for "
                                         "chat models)")
    add_model_opts(p)
    p.add_argument("text", nargs="*", help="text to translate (default: standard input, one text per line)")
    p.add_argument("--from", dest="source_lang", default="en", metavar="LANG",
                   help=f"source language code (default en; known: {', '.join(LANGUAGES)})")
    p.add_argument("--to", dest="target_lang", default="de", metavar="LANG", help="target language code (default de)")
    add_sampling(p)
    p.set_defaults(func=lambda args: _run(args, "translate", sampling, load), temperature=0.0)

    p = sub.add_parser("summarize", help="summarize a text file (T5's 'summarize: ' prefix, or an instruction)")
    add_model_opts(p)
    p.add_argument("file", help="the text to summarize ('-': standard input)")
    add_sampling(p)
    p.set_defaults(func=lambda args: _run(args, "summarize", sampling, load), temperature=0.0)


def prefix_for(lm: Any, task: str, source_lang: str = "en", target_lang: str = "de") -> str:
    """The text an encoder-decoder reads before the input for this task, checked against the tasks the
    model declares (when it declares any)."""
    declared: dict[str, Any] = lm.config.extra.get("task_specific_params") or {}
    if task == "summarize":
        key, prefix = "summarization", SUMMARIZE_PREFIX
    else:
        key, prefix = f"translation_{source_lang}_to_{target_lang}", translation_prefix(source_lang, target_lang)
    if declared and key not in declared:
        pairs = sorted(k.removeprefix("translation_").replace("_to_", "->") for k in declared
                       if k.startswith("translation_"))
        did = f"translates {', '.join(pairs)}" if pairs else f"does {', '.join(sorted(declared))}"
        asked = "summarization" if task == "summarize" else f"{source_lang}->{target_lang}"
        raise LMForgeError(f"{lm.path}: the model was trained for other tasks (it {did}), not {asked}")
    entry = declared.get(key)
    return entry.get("prefix", prefix) if isinstance(entry, dict) else prefix


def instruction(task: str, text: str, source_lang: str = "en", target_lang: str = "de") -> str:
    """The request a chat model gets."""
    if task == "summarize":
        return f"Summarize the following text in a few sentences.\n\n{text}"
    names = LANGUAGES.get(source_lang, source_lang), LANGUAGES.get(target_lang, target_lang)
    return f"Translate the following {names[0]} text into {names[1]}. Reply with the translation only.\n\n{text}"


def prompt_ids(lm: Any, task: str, text: str, source_lang: str = "en", target_lang: str = "de") -> list[int]:
    """The prompt of one text: prefix + text for an encoder-decoder, the chat-rendered instruction else."""
    if lm.is_seq2seq:
        return lm.tokenizer.encode(prefix_for(lm, task, source_lang, target_lang) + text)
    if lm.is_encoder:
        raise LMForgeError(f"{lm.path}: an encoder cannot generate text")
    return lm.chat_prompt([{"role": "user", "content": instruction(task, text, source_lang, target_lang)}])


def _run(args: argparse.Namespace, task: str, sampling: Callable[[argparse.Namespace], Any],
         load: Callable[[argparse.Namespace], Any]) -> int:
    params = sampling(args)
    if task == "translate":
        translation_prefix(args.source_lang, args.target_lang)  # unknown codes fail before the model loads
        texts = args.text or [line.strip() for line in sys.stdin if line.strip()]
    else:
        try:
            text = sys.stdin.read() if args.file == "-" else Path(args.file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise LMForgeError(f"{args.file}: cannot read ({e})") from None
        texts = [" ".join(text.split())]
    texts = [t for t in texts if t]
    if not texts:
        raise LMForgeError("no text given")
    lm = load(args)
    langs = (args.source_lang, args.target_lang) if task == "translate" else ("en", "de")
    prompts = [prompt_ids(lm, task, t, *langs) for t in texts]
    for seq in lm.generate_sequences(prompts, params):
        if seq.error is not None:
            raise LMForgeError(f"generation failed: {seq.error}")
        print(seq.text.strip())
    return 0
