"""Train the shakespeare-char preset and report tokens/s, MFU against this machine's measured matmul
peak, wall time and the final validation loss (nanoGPT's CPU result for the recipe: 1.88).

    python benchmarks/train.py [--data ../shared/data/tinyshakespeare/input.txt] [--max-iters 2000]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from lmforge.tokenizer import Tokenizer
from lmforge.train.data import prepare
from lmforge.train.presets import PRESETS
from lmforge.train.pretrain import TrainConfig, Trainer, matmul_peak
from lmforge.train.tokenizer import train_char

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared/data/tinyshakespeare/input.txt"))
    ap.add_argument("--max-iters", type=int, default=None)
    args = ap.parse_args()

    recipe = dict(PRESETS["shakespeare-char"])
    settings = {k: v for k, v in recipe.items() if k not in ("tokenizer", "val_fraction", "default_data")}
    if args.max_iters:
        settings["max_iters"] = args.max_iters
    device = torch.device("cpu")
    peak = matmul_peak(device, n=2048, reps=10)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        tok = Tokenizer.from_dir(train_char([args.data], out / "tokenizer"))
        prepare([args.data], tok, out / "data", val_fraction=recipe["val_fraction"], workers=1, progress=False)
        trainer = Trainer(TrainConfig(data=str(out / "data"), out=str(out / "run"), device="cpu", **settings),
                          log=lambda s: None)
        start = time.perf_counter()
        trainer.fit()
        wall = time.perf_counter() - start
        records = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = len(records)
    tokens = steps * trainer.cfg.batch_size * trainer.cfg.block_size * trainer.cfg.grad_accum
    tok_s = tokens / wall
    final = next(r for r in reversed(records) if "val_loss" in r)
    print(f"machine: {torch.get_num_threads()} threads, torch {torch.__version__}")
    print("| metric | value |\n|---|---|")
    print(f"| fp32 matmul peak (2048^3) | {peak / 1e9:.1f} GFLOP/s |")
    print(f"| parameters | {sum(p.numel() for p in trainer.model.parameters()) / 1e6:.2f} M |")
    print(f"| steps | {steps} |")
    print(f"| tokens/s (wall, evaluations included) | {tok_s:,.0f} |")
    print(f"| MFU | {100 * tok_s * trainer.flops_per_token / peak:.1f}% |")
    print(f"| wall time | {wall:.1f} s |")
    print(f"| final val loss | {final['val_loss']:.4f} (nanoGPT: 1.88) |")


if __name__ == "__main__":
    main()
