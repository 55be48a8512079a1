"""The encoder commands: `lmforge classify` and `lmforge finetune classify`."""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable
from typing import Any

from .pooling import POOLING_MODES

Options = Callable[[argparse.ArgumentParser], None]


def add_classify_parser(sub: Any, model_opts: Options, text_opts: Options,
                        texts: Callable[[argparse.Namespace], list[str]]) -> None:
    """Add `classify` to the `lmforge` subcommand parser; ``texts`` reads the texts its options name."""
    p = sub.add_parser("classify", help="predict labels with a `lmforge finetune classify` model")
    model_opts(p)
    text_opts(p)
    p.set_defaults(func=functools.partial(cmd_classify, texts=texts))


def add_finetune_parser(fsub: Any, model_opts: Options) -> None:
    """Add `classify` to the `lmforge finetune` subcommand parser."""
    f = fsub.add_parser("classify", help="text classification (CSV, TSV or JSONL with text and label columns)")
    model_opts(f)
    f.add_argument("--train", required=True, metavar="FILE", help="training examples (.csv, .tsv, .jsonl)")
    f.add_argument("--eval", default=None, metavar="FILE", help="evaluation examples: accuracy and F1")
    f.add_argument("--text-field", default="text", help="column/field with the text (default text)")
    f.add_argument("--label-field", default="label", help="column/field with the label (default label)")
    f.add_argument("--out", required=True, metavar="DIR", help="output model directory (replaced atomically)")
    f.add_argument("--epochs", type=float, default=1.0, help="passes over the training data (default 1)")
    f.add_argument("--batch-size", type=int, default=32, help="examples per step (default 32)")
    f.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (default 1e-4)")
    f.add_argument("--max-length", type=int, default=128, help="tokens per text (default 128)")
    f.add_argument("--max-train", type=int, default=None, metavar="N", help="train on a random N-example subset")
    f.add_argument("--max-eval", type=int, default=None, metavar="N", help="evaluate on a random N-example subset")
    f.add_argument("--pooling", default=None, choices=POOLING_MODES,
                   help="how the head sees the text (default: the encoder's pooling; last token for decoders)")
    f.add_argument("--seed", type=int, default=0, help="seed for shuffling, subsets and the head (default 0)")
    f.set_defaults(func=cmd_finetune_classify)


def cmd_finetune_classify(args: argparse.Namespace) -> int:
    from .finetune import ClassifyConfig, finetune_classifier

    cfg = ClassifyConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, max_length=args.max_length,
                         max_train=args.max_train, max_eval=args.max_eval, seed=args.seed, pooling=args.pooling)
    report = finetune_classifier(args.model, args.train, args.eval, args.out, text_field=args.text_field,
                                 label_field=args.label_field, cfg=cfg, device=args.device,
                                 log=lambda s: print(s, file=sys.stderr), progress=sys.stderr.isatty())
    print(f"trained on {report['examples']} examples in {report['steps']} steps, {report['train_seconds']} s")
    if "eval" in report:
        e = report["eval"]
        f1 = f", F1 {e['f1']:.4f}" if "f1" in e else ""
        print(f"eval: accuracy {e['accuracy']:.4f}{f1}, macro-F1 {e['f1_macro']:.4f} on {e['examples']} examples")
    print(f"wrote {args.out} (total {report['seconds']} s)")
    return 0


def cmd_classify(args: argparse.Namespace, texts: Callable[[argparse.Namespace], list[str]]) -> int:
    from .classify import Classifier

    rows = texts(args)
    clf = Classifier(args.model, device=args.device)
    for t, p in zip(rows, clf.probabilities(rows)):
        best = int(p.argmax())
        print(f"{clf.labels[best]}\t{p[best]:.4f}\t{t}")
    return 0
