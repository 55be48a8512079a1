"""The training commands: `lmforge tokenizer train`, `data prepare`, `train` and `plot`."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ..errors import LMForgeError


def add_parsers(sub: Any) -> None:
    """Add the training commands to the `lmforge` subcommand parser."""
    p = sub.add_parser("tokenizer", help="train tokenizers")
    tsub = p.add_subparsers(dest="tokenizer_command", metavar="COMMAND", required=True)
    t = tsub.add_parser("train", help="train a byte-level BPE, Unigram (or --char) tokenizer on text/JSONL files")
    _add_corpus_opts(t)
    t.add_argument("--model", choices=("bpe", "unigram"), default="bpe",
                   help="bpe: byte-level BPE (default); unigram: SentencePiece-style Unigram laid out as T5's")
    t.add_argument("--vocab-size", type=int, default=None,
                   help="vocabulary size, special tokens and sentinels included (e.g. 32000)")
    t.add_argument("--char", action="store_true", help="character-level instead of BPE (ignores --vocab-size)")
    t.add_argument("--special-tokens", nargs="+", default=[], metavar="TOKEN",
                   help="extra special tokens, after the built-in ones (never split, skipped when decoding)")
    t.add_argument("--sentinels", type=int, default=0, metavar="N",
                   help="unigram: add T5's span sentinels <extra_id_0> .. <extra_id_N-1> (T5 uses 100)")
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
    from .presets import PRESETS

    p.add_argument("--preset", default=None, help=f"a named recipe ({', '.join(PRESETS)})")
    p.add_argument("--config", default=None, metavar="FILE.toml", help="settings (override the preset)")
    p.add_argument("--data", default=None,
                   help="a text/JSONL corpus (tokenized into OUT/data) or a `lmforge data prepare` directory")
    p.add_argument("--out", required=True, metavar="DIR", help="run directory: checkpoints and metrics.jsonl")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting, e.g. --set max_iters=500 --set model.n_layers=2 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--objective", choices=("clm", "mlm", "seq2seq", "span-corruption"), default=None,
                   help="clm: next-token prediction (default); mlm: masked tokens, for encoders (bert-mini-mlm); "
                        "seq2seq: source -> target pairs, span-corruption: T5's denoising, for encoder-decoders "
                        "(t5-multi30k, t5-span)")
    p.add_argument("--target-data", default=None, metavar="FILE",
                   help="seq2seq: the targets, line-aligned with the sources in --data (else --data holds "
                        "pairs: TSV, or JSONL with source_field/target_field)")
    p.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard weights, gradients and optimizer state (FSDP2) instead of DDP")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("plot", help="draw a training run's loss curves as a PNG")
    p.add_argument("run_dir", help="a `lmforge train` run directory (with metrics.jsonl)")
    p.add_argument("--out", default=None, help="PNG path (default RUN_DIR/loss.png)")
    p.set_defaults(func=cmd_plot)


def _add_corpus_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", nargs="+", required=True, metavar="PATH",
                   help="text or .jsonl[.gz] files, directories or glob patterns")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (replaced atomically)")
    p.add_argument("--text-field", default="text", help="JSONL field holding the text (default text)")


def _baseline_tokenizer(name: str) -> Any:
    """A registry model's tokenizer if it is already pulled (never downloads), else None."""
    from ..formats import load_tokenizer
    from ..registry import is_pulled, local_path

    return load_tokenizer(local_path(name)) if is_pulled(name) else None


def cmd_tokenizer_train(args: argparse.Namespace) -> int:
    import time

    from ..tokenizer import Tokenizer
    from .tokenizer import bytes_per_token, train_bpe, train_char, train_unigram

    if args.char and args.model != "bpe":
        raise LMForgeError(f"--char and --model {args.model} cannot be combined")
    if not args.char and args.vocab_size is None:
        raise LMForgeError("--vocab-size is required (or pass --char for a character-level tokenizer)")
    if args.sentinels and (args.char or args.model != "unigram"):
        raise LMForgeError("--sentinels needs --model unigram")
    held: list[str] = []
    common = {"text_field": args.text_field, "held_out": args.held_out, "held_out_texts": held,
              "special_tokens": args.special_tokens}
    start = time.perf_counter()
    if args.char:
        out = train_char(args.input, args.out, **common)
    elif args.model == "unigram":
        out = train_unigram(args.input, args.vocab_size, args.out, sentinels=args.sentinels,
                            progress=sys.stderr.isatty(), **common)
    else:
        out = train_bpe(args.input, args.vocab_size, args.out, progress=sys.stderr.isatty(), **common)
    elapsed = time.perf_counter() - start
    tok = Tokenizer.from_dir(out)
    kind = "character-level" if args.char else {"bpe": "byte-level BPE", "unigram": "Unigram"}[args.model]
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
    from ..registry import DEFAULT_MODEL

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
    from ..formats import load_tokenizer
    from ..registry import resolve
    from .data import prepare

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
    import tomllib
    from pathlib import Path

    from tqdm import tqdm

    from .distributed import barrier, setup_distributed
    from .presets import PRESETS
    from .pretrain import TrainConfig, Trainer

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
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
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
    if args.objective:
        recipe["objective"] = args.objective
    if args.target_data:
        recipe["target_data"] = args.target_data
    out = Path(args.out)
    if recipe.get("objective") == "seq2seq":
        return _train_seq2seq(args, recipe, fields, out)
    # Under torchrun, rank 0 alone fetches and tokenizes a raw corpus while the others wait for it.
    dist_info, _ = setup_distributed(args.device)
    data_dir = Path(args.data) if args.data and (Path(args.data) / "metadata.json").exists() else None
    if data_dir is None:
        if not args.resume:
            if dist_info.main:
                corpus = args.data
                if not corpus and recipe.get("default_data"):
                    from ..registry import fetch_dataset

                    corpus = str(fetch_dataset(recipe["default_data"]))
                if not corpus:
                    raise LMForgeError("--data is required: a text/JSONL corpus or a `lmforge data prepare` directory")
                _prepare_corpus(corpus, recipe, out)
            barrier()
        data_dir = out / "data"
    settings = _settings(recipe, fields)
    if args.fsdp:
        settings["fsdp"] = True
    cfg = TrainConfig(**(settings | {"data": str(data_dir), "out": str(out), "device": args.device}))
    log = lambda s: tqdm.write(s, file=sys.stderr)  # noqa: E731
    if cfg.objective == "span-corruption":
        from ..tokenizer import Tokenizer
        from .seq2seq import Seq2SeqTrainer

        # The tokenizer trained for this run names its special tokens; a prepared directory has its vocabulary.
        tok_dir = out / "tokenizer" if (out / "tokenizer" / "tokenizer.json").exists() else data_dir
        trainer: Any = Seq2SeqTrainer(cfg, Tokenizer.from_dir(tok_dir), resume=args.resume, log=log)
    else:
        trainer = Trainer(cfg, resume=args.resume, log=log)
    return _fit(trainer, cfg, out)


RECIPE_ONLY = ("tokenizer", "vocab_size", "sentinels", "default_data")


def _settings(recipe: dict[str, Any], fields: set[str]) -> dict[str, Any]:
    unknown = sorted(k for k in recipe if k not in fields and k not in RECIPE_ONLY)
    if unknown:
        raise LMForgeError(f"unknown training settings: {', '.join(unknown)}")
    return {k: (tuple(v) if k == "betas" else v) for k, v in recipe.items() if k in fields}


def _train_seq2seq(args: argparse.Namespace, recipe: dict[str, Any], fields: set[str], out: Any) -> int:
    """A fresh encoder-decoder on source -> target pairs, with a Unigram tokenizer trained on both sides
    (kept in OUT/tokenizer, so a resumed run reads the same one)."""
    import tempfile
    from pathlib import Path

    from tqdm import tqdm

    from ..tokenizer import Tokenizer
    from .pretrain import TrainConfig
    from .seq2seq import Seq2SeqTrainer, read_pairs
    from .tokenizer import train_unigram

    if not args.data:
        raise LMForgeError("--data is required: source -> target pairs (with --target-data for two files)")
    settings = _settings(recipe, fields)
    cfg = TrainConfig(**(settings | {"data": args.data, "out": str(out), "device": args.device}))
    tok_dir = out / "tokenizer"
    if not (args.resume and (tok_dir / "tokenizer.json").exists()):
        pairs = read_pairs(args.data, cfg.target_data, cfg.source_field, cfg.target_field)
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out) as tmp:  # both sides, one text a line, and the prefix
            texts = Path(tmp) / "texts.txt"
            texts.write_text("\n".join(t.replace("\n", " ") for p in pairs for t in p) + "\n" + cfg.source_prefix
                             + "\n", encoding="utf-8")
            train_unigram([texts], int(recipe.get("vocab_size", 8000)), tok_dir,
                          sentinels=int(recipe.get("sentinels", 0)), progress=sys.stderr.isatty())
    trainer = Seq2SeqTrainer(cfg, Tokenizer.from_dir(tok_dir), resume=args.resume,
                             log=lambda s: tqdm.write(s, file=sys.stderr))
    return _fit(trainer, cfg, out)


def _fit(trainer: Any, cfg: Any, out: Any) -> int:
    from .loop import latest_checkpoint

    try:
        n = sum(p.numel() for p in trainer.model.parameters())
        world = trainer.dist.world
        mode = f" on {world} processes ({'FSDP' if cfg.fsdp else 'DDP'})" if world > 1 else ""
        budget = f", for {cfg.max_seconds / 60:g} minutes" if cfg.max_seconds else ""
        if "pairs" in trainer.meta:
            data = f"{trainer.meta['pairs']:,} pairs ({trainer.meta['val_pairs']:,} held out){mode}"
            step = f"{cfg.batch_size * cfg.grad_accum * world:,} pairs per step"
        else:
            data = f"{trainer.meta['train']['tokens']:,} tokens{mode}"
            step = f"{cfg.batch_size * cfg.block_size * cfg.grad_accum * world:,} tokens per step"
        trainer.log(f"training {n / 1e6:.2f}M parameters on {data}, {step}{budget} -> {out}")
        trainer.fit()
        final = trainer.last_eval or trainer.evaluate()  # fit evaluates at its last step
        if trainer.dist.main:
            print(f"step {trainer.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in final.items()))
            print(f"checkpoint: {latest_checkpoint(out)}")
    finally:
        trainer.close()
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from .plot import plot_run

    print(plot_run(args.run_dir, args.out))
    return 0


def _prepare_corpus(corpus: str, recipe: dict[str, Any], out: Any) -> Any:
    """Train the recipe's tokenizer on a raw corpus and tokenize it into OUT/data."""
    from ..tokenizer import Tokenizer
    from .data import prepare
    from .tokenizer import train_bpe, train_char, train_unigram

    if recipe.get("tokenizer", "bpe") == "char":
        tok_dir = train_char([corpus], out / "tokenizer")
    elif recipe.get("tokenizer") == "unigram":
        tok_dir = train_unigram([corpus], int(recipe.get("vocab_size", 8000)), out / "tokenizer",
                                sentinels=int(recipe.get("sentinels", 0)), progress=sys.stderr.isatty())
    else:
        tok_dir = train_bpe([corpus], int(recipe.get("vocab_size", 8192)), out / "tokenizer",
                            progress=sys.stderr.isatty())
    prepare([corpus], Tokenizer.from_dir(tok_dir), out / "data", val_fraction=float(recipe.get("val_fraction", 0.1)),
            progress=sys.stderr.isatty())
    return out / "data"
