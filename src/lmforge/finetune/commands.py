"""The fine-tuning commands: `lmforge finetune sft`, `finetune seq2seq`, `finetune dpo`, `finetune reward`, and
`finetune gsm8k-tools` (GSM8K's calculator annotations as tool-call training data)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..errors import LMForgeError


def add_parsers(fsub: Any) -> None:
    """Add sft, seq2seq, dpo, reward and gsm8k-tools to the `lmforge finetune` subcommand parser."""
    f = fsub.add_parser("sft", help="instruction tuning on Alpaca, chat (messages) or ShareGPT data")
    _common(f, "instruction data: .json/.jsonl (optionally .gz) in alpaca, chatml or sharegpt format")
    f.add_argument("--format", default="auto", choices=("auto", "alpaca", "chatml", "sharegpt"),
                   help="data format (default auto: from the fields)")
    f.set_defaults(func=cmd_sft)

    f = fsub.add_parser("dpo", help="direct preference optimization on {prompt, chosen, rejected} or HH-RLHF data")
    _common(f, "preference data: {prompt, chosen, rejected} JSONL (strings or message lists) or HH-RLHF {chosen, "
               "rejected} transcripts")
    f.add_argument("--beta", type=float, default=0.1, help="DPO temperature β (default 0.1)")
    f.set_defaults(func=cmd_dpo)

    f = fsub.add_parser("reward", help="train a reward model (base + scalar head) on preference pairs")
    _common(f, "preference data, as for `finetune dpo`")
    f.set_defaults(func=cmd_reward)

    f = fsub.add_parser("seq2seq", help="source -> target training of an encoder-decoder (T5, BART): translation, "
                                        "summarization")
    _common(f, "pairs: TSV (source<TAB>target), JSONL with --source-field/--target-field, or the sources with "
               "--target-data")
    f.add_argument("--target-data", default=None, metavar="FILE", help="the targets, line-aligned with --data")
    f.add_argument("--source-field", default="source", help="JSONL field of the source (default source)")
    f.add_argument("--target-field", default="target", help="JSONL field of the target (default target)")
    f.add_argument("--source-prefix", default="", metavar="TEXT",
                   help="written before every source, T5-style (e.g. 'translate English to German: ')")
    f.add_argument("--label-smoothing", type=float, default=0.0, help="cross-entropy label smoothing (default 0)")
    f.set_defaults(func=cmd_seq2seq)

    f = fsub.add_parser("gsm8k-tools", help="convert GSM8K's calculator annotations (<<48/2=24>>) into "
                                            "tool-call conversations for `finetune sft`")
    f.add_argument("input", help="GSM8K {question, answer} JSONL (e.g. gsm8k/train.jsonl)")
    f.add_argument("--out", required=True, metavar="FILE", help="the JSONL to write (chatml messages with tools)")
    f.add_argument("--limit", type=int, default=None, help="only the first N examples")
    f.set_defaults(func=cmd_gsm8k_tools)


def _common(f: argparse.ArgumentParser, data_help: str) -> None:
    f.add_argument("model", help="registry name, .gguf file or HF directory")
    f.add_argument("--data", required=True, metavar="FILE", help=data_help)
    f.add_argument("--out", required=True, metavar="DIR",
                   help="run directory: step_* checkpoints, metrics.jsonl and final/")
    f.add_argument("--method", default="full", choices=("full", "lora", "qlora"),
                   help="full: every weight; lora: low-rank adapters; qlora: adapters on an NF4 base (default full)")
    f.add_argument("--lora-r", type=int, default=8, help="adapter rank (default 8)")
    f.add_argument("--lora-alpha", type=float, default=16.0, help="adapter scale numerator (default 16)")
    f.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the adapter input (default 0)")
    f.add_argument("--lora-targets", default=None, metavar="NAMES",
                   help="comma-separated layer-name suffixes (default qkv,o,gate_up,down)")
    f.add_argument("--epochs", type=float, default=1.0, help="passes over the training data (default 1)")
    f.add_argument("--max-steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    f.add_argument("--max-seconds", type=float, default=0.0, metavar="SECONDS",
                   help="stop after this much wall time, the schedule fitted to it (default 0: no limit)")
    f.add_argument("--batch-size", type=int, default=4, help="examples per micro-batch (default 4)")
    f.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    f.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (default: by method and command, e.g. sft 2e-5 full, 2e-4 LoRA)")
    f.add_argument("--warmup", type=float, default=0.03, metavar="FRACTION",
                   help="warmup as a fraction of the steps, then cosine decay to lr/10 (default 0.03)")
    f.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0)")
    f.add_argument("--max-length", type=int, default=None, help="tokens per example (default: the model's context)")
    f.add_argument("--overlong", default="truncate", choices=("truncate", "skip"),
                   help="longer examples: cut at --max-length or drop (default truncate)")
    f.add_argument("--val-fraction", type=float, default=0.05, help="examples held out for validation (default 0.05)")
    f.add_argument("--eval-every", type=int, default=50, help="steps between validations (default 50)")
    f.add_argument("--save-every", type=int, default=200, help="steps between checkpoints (default 200)")
    f.add_argument("--samples", type=int, default=2, help="held-out prompts generated at each validation (default 2)")
    f.add_argument("--seed", type=int, default=0, help="seed for the split, data order and init (default 0)")
    f.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    f.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")


def _config(args: argparse.Namespace, cls: Any) -> Any:
    import dataclasses

    from .sft import FinetuneConfig

    targets = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip()) if args.lora_targets else None
    if args.lora_targets is not None and not targets:
        raise LMForgeError("--lora-targets is empty")
    # The settings of one kind of run (DPO's beta, seq2seq's fields), from its own flags.
    base = {f.name for f in dataclasses.fields(FinetuneConfig)}
    own = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls.config_type)
           if f.name not in base and hasattr(args, f.name)}
    return cls.config_type(
        method=args.method, lora_r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
        lora_targets=targets, epochs=args.epochs, max_steps=args.max_steps, max_seconds=args.max_seconds,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum, lr=args.lr, warmup_fraction=args.warmup, weight_decay=args.weight_decay,
        max_length=args.max_length, overlong=args.overlong, format=getattr(args, "format", "auto"),
        val_fraction=args.val_fraction, eval_every=args.eval_every, save_every=args.save_every,
        samples=args.samples, seed=args.seed, device=args.device, **own)


def _run(cls: Any, args: argparse.Namespace) -> int:
    def log(s: str) -> None:
        print(s, file=sys.stderr)

    run = cls(args.model, args.data, args.out, _config(args, cls), resume=args.resume, log=log,
              progress=sys.stderr.isatty())
    log(f"{run.kind}: {len(run.train_set)} training and {len(run.val_set)} validation examples, "
        + (f"up to {run.total_steps} steps in {run.cfg.max_seconds:g} s" if run.cfg.max_seconds else
           f"{run.total_steps} steps") + f" at lr {run.lr:g} ({run.cfg.method})")
    try:
        run.fit()
    finally:
        run.close()
    if not run.dist.main:
        return 0
    scores = ", ".join(f"{k} {v:.4f}" for k, v in run.last_eval.items())
    print(f"trained {run.step} steps" + (f"; {scores}" if scores else ""))
    kind = "adapter" if run.lora else "model"
    print(f"wrote {run.final} ({kind}; checkpoints and metrics.jsonl in {run.out})")
    return 0


def cmd_sft(args: argparse.Namespace) -> int:
    from .sft import FinetuneRun

    return _run(FinetuneRun, args)


def cmd_seq2seq(args: argparse.Namespace) -> int:
    from .seq2seq import Seq2SeqRun

    return _run(Seq2SeqRun, args)


def cmd_dpo(args: argparse.Namespace) -> int:
    from .dpo import DPORun

    return _run(DPORun, args)


def cmd_reward(args: argparse.Namespace) -> int:
    from .dpo import RewardRun

    return _run(RewardRun, args)


def cmd_gsm8k_tools(args: argparse.Namespace) -> int:
    from .toolcalls import convert_gsm8k

    if args.limit is not None and args.limit < 1:
        raise LMForgeError(f"--limit must be positive, got {args.limit}")
    stats = convert_gsm8k(args.input, args.out, args.limit)
    print(f"wrote {stats['examples']} conversations with {stats['calls']} calculator calls to {args.out} "
          f"({stats['kept_as_text']} annotations the calculator does not reproduce kept as text)")
    return 0
