"""The `lmforge` command line. Sampling flags mirror the OpenAI API's parameter names in kebab-case."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from typing import Any

from .errors import LMForgeError


def _add_sampling(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling (OpenAI parameter names)")
    g.add_argument("--max-tokens", type=int, default=256, help="most tokens to generate (default 256)")
    g.add_argument("--temperature", type=float, default=0.7, help="0 is greedy (default 0.7)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0)")
    g.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens; 0 disables (default)")
    g.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min-p x the top probability")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="multiplicative penalty (1.0 = off)")
    g.add_argument("--presence-penalty", type=float, default=0.0, help="additive penalty on used tokens")
    g.add_argument("--frequency-penalty", type=float, default=0.0, help="additive penalty per use")
    g.add_argument("--logit-bias", action="append", default=[], metavar="TOKEN_ID=BIAS",
                   help="add BIAS to a token's logit (repeatable)")
    g.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    g.add_argument("--stop", action="append", default=[], help="stop string, not emitted (repeatable)")
    g.add_argument("--ignore-eos", action="store_true", help="keep going past end-of-turn tokens")


def _add_model_opts(p: argparse.ArgumentParser, optional: bool = False) -> None:
    from .registry import DEFAULT_MODEL

    if optional:
        p.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                       help=f"registry name, .gguf file or HF directory (default {DEFAULT_MODEL})")
    else:
        p.add_argument("model", help="registry name, .gguf file or HF directory")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")


def _add_corpus_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", nargs="+", required=True, metavar="PATH",
                   help="text or .jsonl[.gz] files, directories or glob patterns")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (replaced atomically)")
    p.add_argument("--text-field", default="text", help="JSONL field holding the text (default text)")


def _sampling(args: argparse.Namespace) -> Any:
    from .engine import SamplingParams

    bias = {}
    for item in args.logit_bias:
        tok, sep, val = item.partition("=")
        try:
            bias[int(tok)] = float(val)
        except ValueError:
            raise LMForgeError(f"--logit-bias expects TOKEN_ID=BIAS, got {item!r}") from None
        if not sep:
            raise LMForgeError(f"--logit-bias expects TOKEN_ID=BIAS, got {item!r}")
    return SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        min_p=args.min_p, repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty, logit_bias=bias or None, seed=args.seed, stop=args.stop,
        ignore_eos=args.ignore_eos, logprobs=getattr(args, "logprobs", False),
        top_logprobs=getattr(args, "top_logprobs", 0),
    )


def _load(args: argparse.Namespace) -> Any:
    from .api import load

    return load(args.model, device=args.device, progress=sys.stderr.isatty())


# -- commands ------------------------------------------------------------------------------------------
def cmd_pull(args: argparse.Namespace) -> int:
    from .registry import pull

    for name in args.models:
        path = pull(name, force=args.force)
        print(path)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from .registry import MODELS, list_local

    local = {name: (path, size) for name, path, size in list_local()}
    print(f"{'NAME':<24} {'SIZE':>9}  {'STATUS':<10} DESCRIPTION")
    for name, spec in MODELS.items():
        if name in local:
            size, status = f"{local[name][1] / 2**20:.0f} MB", "pulled"
        else:
            size, status = "-", "available"
        if args.all or name in local:
            print(f"{name:<24} {size:>9}  {status:<10} {spec.description}")
    if not local and not args.all:
        print("(no models pulled yet: `lmforge pull NAME`, or `lmforge list --all` to see what is available)")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .formats.inspect import describe
    from .registry import resolve

    for key, value in describe(resolve(args.model)).items():
        if key == "chat template" and value and not args.template:
            value = f"{len(value)} chars (show it with --template)"
        if isinstance(value, str) and "\n" in value:
            print(f"{key}:\n{value}")
        else:
            print(f"{key}: {value}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    params = _sampling(args)
    lm = _load(args)
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    seq = lm.engine.add(lm.tokenizer.encode(prompt), params)
    while not seq.done:
        for s, delta in lm.engine.step():
            if s is seq and args.stream:
                print(delta, end="", flush=True)
    print() if args.stream else print(seq.text)
    if args.logprobs:
        tok = lm.tokenizer
        for lp in seq.logprobs:
            alts = ", ".join(f"{tok.decode([i], skip_special_tokens=False)!r}:{v:.3f}" for i, v in lp.top)
            print(f"{tok.decode([lp.token_id], skip_special_tokens=False)!r}\t{lp.logprob:.4f}\t{alts}",
                  file=sys.stderr)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from .chat import run_chat

    params = _sampling(args)
    return run_chat(_load(args), params, system=args.system, interactive=sys.stdin.isatty())


def _baseline_tokenizer(name: str) -> Any:
    """A registry model's tokenizer if it is already pulled (never downloads), else None."""
    from .formats import load_tokenizer
    from .registry import is_pulled, local_path

    return load_tokenizer(local_path(name)) if is_pulled(name) else None


def cmd_tokenizer_train(args: argparse.Namespace) -> int:
    import time

    from .tokenizer import Tokenizer
    from .train.tokenizer import bytes_per_token, train_bpe, train_char

    if not args.char and args.vocab_size is None:
        raise LMForgeError("--vocab-size is required (or pass --char for a character-level tokenizer)")
    held: list[str] = []
    start = time.perf_counter()
    if args.char:
        out = train_char(args.input, args.out, text_field=args.text_field, held_out=args.held_out,
                         held_out_texts=held)
    else:
        out = train_bpe(args.input, args.vocab_size, args.out, text_field=args.text_field,
                        progress=sys.stderr.isatty(), held_out=args.held_out, held_out_texts=held)
    elapsed = time.perf_counter() - start
    tok = Tokenizer.from_dir(out)
    kind = "character-level" if args.char else "byte-level BPE"
    print(f"wrote {kind} tokenizer to {out}")
    note = "" if args.char or tok.vocab_size >= args.vocab_size else f" (asked for {args.vocab_size}; corpus too small)"
    print(f"vocab size:     {tok.vocab_size}{note}")
    print(f"training time:  {elapsed:.1f} s")
    if not held:
        print("bytes/token:    no held-out text (corpus too small, or --held-out 0)")
        return 0
    size = sum(len(t.encode("utf-8")) for t in held)
    print(f"bytes/token on held-out text ({len(held)} documents, {size / 1024:.1f} KiB):")
    print(f"  {'new tokenizer':<24} {bytes_per_token(tok, held):.2f}")
    from .registry import DEFAULT_MODEL

    try:
        base = _baseline_tokenizer(DEFAULT_MODEL)
    except LMForgeError as e:
        print(f"  ({DEFAULT_MODEL}: cannot load its tokenizer: {e})")
        return 0
    if base is None:
        print(f"  ({DEFAULT_MODEL} is not pulled; `lmforge pull {DEFAULT_MODEL}` to compare against it)")
    else:
        print(f"  {DEFAULT_MODEL:<24} {bytes_per_token(base, held):.2f}")
    return 0


def cmd_data_prepare(args: argparse.Namespace) -> int:
    from .formats import load_tokenizer
    from .registry import resolve
    from .train.data import prepare

    tok = load_tokenizer(resolve(args.tokenizer))
    meta = prepare(args.input, tok, args.out, text_field=args.text_field, val_fraction=args.val_fraction,
                   workers=args.workers, shard_tokens=args.shard_tokens, dtype=args.dtype,
                   progress=sys.stderr.isatty())
    print(f"wrote {args.out}: {meta['documents']} documents, {meta['characters']:,} characters in {meta['seconds']} s")
    for split in ("train", "val"):
        print(f"  {split:<5} {meta[split]['tokens']:>12,} tokens in {len(meta[split]['shards'])} shard(s), {meta['dtype']}")
    print(f"  boundary token {meta['boundary_token']!r} (id {meta['boundary_token_id']}) starts every document")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    import dataclasses
    from pathlib import Path

    import tomllib

    from .train.presets import PRESETS
    from .train.pretrain import TrainConfig, Trainer

    recipe: dict[str, Any] = {}
    if args.preset:
        if args.preset not in PRESETS:
            raise LMForgeError(f"unknown preset {args.preset!r} (known: {', '.join(PRESETS)})")
        recipe = json.loads(json.dumps(PRESETS[args.preset]))
    if args.config:
        try:
            recipe |= tomllib.loads(Path(args.config).read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise LMForgeError(f"{args.config}: cannot read config ({e})") from None
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise LMForgeError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        if key.startswith("model."):
            recipe.setdefault("model", {})[key.removeprefix("model.")] = parsed
        else:
            recipe[key] = parsed
    out = Path(args.out)
    data_dir = Path(args.data) if args.data and (Path(args.data) / "metadata.json").exists() else None
    if data_dir is None and not args.resume:
        corpus = args.data
        if not corpus and recipe.get("default_data"):
            from .registry import fetch_dataset

            corpus = str(fetch_dataset(recipe["default_data"]))
        if not corpus:
            raise LMForgeError("--data is required: a text/JSONL corpus or a `lmforge data prepare` directory")
        data_dir = _prepare_corpus(corpus, recipe, out)
    elif data_dir is None:
        data_dir = out / "data"
    recipe_only = ("tokenizer", "vocab_size", "val_fraction", "default_data")
    unknown = sorted(k for k in recipe if k not in fields and k not in recipe_only)
    if unknown:
        raise LMForgeError(f"unknown training settings: {', '.join(unknown)}")
    settings = {k: (tuple(v) if k == "betas" else v) for k, v in recipe.items() if k in fields}
    cfg = TrainConfig(**(settings | {"data": str(data_dir), "out": str(out), "device": args.device}))
    trainer = Trainer(cfg, resume=args.resume, log=lambda s: print(s, file=sys.stderr))
    n = sum(p.numel() for p in trainer.model.parameters())
    print(f"training {n / 1e6:.2f}M parameters on {trainer.meta['train']['tokens']:,} tokens -> {out}",
          file=sys.stderr)
    trainer.fit()
    final = trainer.evaluate()
    print(f"step {trainer.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in final.items()))
    print(f"checkpoint: {sorted(out.glob('step_*'))[-1]}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from .train.plot import plot_run

    print(plot_run(args.run_dir, args.out))
    return 0


def _prepare_corpus(corpus: str, recipe: dict[str, Any], out: Any) -> Any:
    """Train the recipe's tokenizer on a raw corpus and tokenize it into OUT/data."""
    from .tokenizer import Tokenizer
    from .train.data import prepare
    from .train.tokenizer import train_bpe, train_char

    if recipe.get("tokenizer", "bpe") == "char":
        tok_dir = train_char([corpus], out / "tokenizer")
    else:
        tok_dir = train_bpe([corpus], int(recipe.get("vocab_size", 8192)), out / "tokenizer",
                            progress=sys.stderr.isatty())
    prepare([corpus], Tokenizer.from_dir(tok_dir), out / "data", val_fraction=float(recipe.get("val_fraction", 0.1)),
            progress=sys.stderr.isatty())
    return out / "data"


# -- entry point -----------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # One line, like every other lmforge error, instead of argparse's usage dump.
        self.exit(2, f"lmforge: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog="lmforge", description="Run, chat with and inspect language models.")
    parser.add_argument("--version", action="version", version=f"lmforge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("pull", help="download registry models into the local cache")
    p.add_argument("models", nargs="+", metavar="NAME")
    p.add_argument("--force", action="store_true", help="download again even if present")
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("list", help="show local models")
    p.add_argument("--all", action="store_true", help="also show registry models not pulled yet")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("info", help="architecture, size, tensor types, context length and template")
    p.add_argument("model", help="registry name, .gguf file or HF directory")
    p.add_argument("--template", action="store_true", help="print the full chat template")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("generate", help="complete a prompt")
    _add_model_opts(p)
    p.add_argument("prompt", nargs="?", default=None, help="the prompt (default: read stdin)")
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    p.add_argument("--logprobs", action="store_true", help="print per-token logprobs to stderr")
    p.add_argument("--top-logprobs", type=int, default=0, help="alternatives per token with --logprobs")
    _add_sampling(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="chat with a model (interactive, or answers piped stdin)")
    _add_model_opts(p, optional=True)
    p.add_argument("--system", default=None, help="system prompt")
    _add_sampling(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("tokenizer", help="train tokenizers")
    tsub = p.add_subparsers(dest="tokenizer_command", metavar="COMMAND", required=True)
    t = tsub.add_parser("train", help="train a byte-level BPE (or --char) tokenizer on text/JSONL files")
    _add_corpus_opts(t)
    t.add_argument("--vocab-size", type=int, default=None, help="BPE vocabulary size (e.g. 32000)")
    t.add_argument("--char", action="store_true", help="character-level instead of BPE (ignores --vocab-size)")
    t.add_argument("--held-out", type=float, default=0.01, metavar="FRACTION",
                   help="fraction of documents kept out of training to measure bytes/token (default 0.01)")
    t.set_defaults(func=cmd_tokenizer_train)

    p = sub.add_parser("data", help="prepare training data")
    dsub = p.add_subparsers(dest="data_command", metavar="COMMAND", required=True)
    d = dsub.add_parser("prepare", help="tokenize a corpus into flat token shards (np.memmap-readable)")
    _add_corpus_opts(d)
    d.add_argument("--tokenizer", required=True,
                   help="a tokenizer directory (tokenizer.json), a .gguf file or a registry model name")
    d.add_argument("--val-fraction", type=float, default=0.01, help="fraction of documents for validation")
    d.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: one per core)")
    d.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard file")
    d.add_argument("--dtype", choices=("auto", "uint16", "uint32"), default="auto",
                   help="token dtype (auto: uint16 when the vocabulary fits)")
    d.set_defaults(func=cmd_data_prepare)

    p = sub.add_parser("train", help="pretrain a model from scratch")
    p.add_argument("--preset", default=None, help="a named recipe (shakespeare-char, tinystories-bpe)")
    p.add_argument("--config", default=None, metavar="FILE.toml", help="settings (override the preset)")
    p.add_argument("--data", default=None,
                   help="a text/JSONL corpus (tokenized into OUT/data) or a `lmforge data prepare` directory")
    p.add_argument("--out", required=True, metavar="DIR", help="run directory: checkpoints and metrics.jsonl")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting, e.g. --set max_iters=500 --set model.n_layers=2 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("plot", help="draw a training run's loss curves as a PNG")
    p.add_argument("run_dir", help="a `lmforge train` run directory (with metrics.jsonl)")
    p.add_argument("--out", default=None, help="PNG path (default RUN_DIR/loss.png)")
    p.set_defaults(func=cmd_plot)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except LMForgeError as e:
        print(f"lmforge: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
