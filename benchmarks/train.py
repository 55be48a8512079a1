"""Train a preset (default shakespeare-char) and report tokens/s, MFU against this machine's measured matmul
peak, wall time and the final validation loss (nanoGPT's CPU result for shakespeare-char: 1.88).

    python benchmarks/train.py [--data ../shared/data/tinyshakespeare/input.txt] [--max-iters 2000]
    python benchmarks/train.py --preset gpt2-124m --device cuda --max-iters 30

A BPE preset trains its tokenizer on --data; when the corpus is too small for the preset's vocab_size the
model keeps the preset's vocabulary (the unused rows cost the same compute), so the shape, parameter count
and MFU are the preset's. `--set KEY=VALUE` overrides a training setting (e.g. batch_size=2) for quick runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from lmforge.tokenizer import Tokenizer
from lmforge.train.data import prepare
from lmforge.train.presets import PRESETS
from lmforge.train.pretrain import TrainConfig, Trainer, matmul_peak
from lmforge.train.tokenizer import train_bpe, train_char

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="shakespeare-char", choices=list(PRESETS))
    ap.add_argument("--data", default=str(ROOT.parent / "shared/data/tinyshakespeare/input.txt"))
    ap.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N")
    ap.add_argument("--max-iters", type=int, default=None)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a training setting (JSON value), e.g. --set batch_size=2")
    args = ap.parse_args()

    recipe = json.loads(json.dumps(PRESETS[args.preset]))
    settings = {k: v for k, v in recipe.items() if k not in ("tokenizer", "vocab_size", "val_fraction", "default_data")}
    settings["betas"] = tuple(settings.get("betas", (0.9, 0.95)))
    for item in args.set:
        key, _, value = item.partition("=")
        settings[key] = json.loads(value)
    if args.max_iters:
        settings["max_iters"] = args.max_iters
    device = torch.device(args.device)
    # A GPU needs large matrices to reach its peak; the CPU figure keeps its historical size.
    peak = matmul_peak(device, n=8192, reps=20) if device.type == "cuda" else matmul_peak(device, n=2048, reps=10)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        if recipe["tokenizer"] == "char":
            tok_dir = train_char([args.data], out / "tokenizer")
        else:
            tok_dir = train_bpe([args.data], recipe["vocab_size"], out / "tokenizer")
        tok = Tokenizer.from_dir(tok_dir)
        if recipe["tokenizer"] != "char" and tok.vocab_size < recipe["vocab_size"]:
            settings["model"] = settings["model"] | {"vocab_size": recipe["vocab_size"]}
        prepare([args.data], tok, out / "data", val_fraction=recipe["val_fraction"], workers=1, progress=False)
        trainer = Trainer(TrainConfig(data=str(out / "data"), out=str(out / "run"), device=args.device, **settings),
                          log=lambda s: None)
        start = time.perf_counter()
        trainer.fit()
        wall = time.perf_counter() - start
        records = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = len(records)
    cfg = trainer.cfg
    tokens = steps * cfg.batch_size * cfg.block_size * cfg.grad_accum
    tok_s = tokens / wall
    # The median step leaves out the first steps' compilation and the evaluations.
    step_tok_s = statistics.median(r["tokens_per_s"] for r in records[min(5, steps // 2):])
    final = next(r for r in reversed(records) if "val_loss" in r)
    mem = f", peak memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB" if device.type == "cuda" else ""
    print(f"machine: {args.device}, {torch.get_num_threads()} threads, torch {torch.__version__}{mem}")
    print(f"preset {args.preset}: batch {cfg.batch_size} x block {cfg.block_size} x accum {cfg.grad_accum}, "
          f"compile {cfg.compile}, vocab {trainer.model_cfg.vocab_size} (tokenizer {tok.vocab_size})")
    unit = "bf16" if device.type == "cuda" else "fp32"
    n = 8192 if device.type == "cuda" else 2048
    print("| metric | value |\n|---|---|")
    print(f"| {unit} matmul peak ({n}^3) | {peak / 1e9:.1f} GFLOP/s |")
    print(f"| parameters | {sum(p.numel() for p in trainer.model.parameters()) / 1e6:.2f} M |")
    print(f"| steps | {steps} |")
    print(f"| tokens/s (wall, evaluations included) | {tok_s:,.0f} |")
    print(f"| MFU | {100 * tok_s * trainer.flops_per_token / peak:.1f}% |")
    print(f"| tokens/s (median step) | {step_tok_s:,.0f} |")
    print(f"| MFU (median step) | {100 * step_tok_s * trainer.flops_per_token / peak:.1f}% |")
    print(f"| wall time | {wall:.1f} s |")
    note = " (nanoGPT: 1.88)" if args.preset == "shakespeare-char" else ""
    print(f"| final val loss | {final['val_loss']:.4f}{note} |")


if __name__ == "__main__":
    main()
