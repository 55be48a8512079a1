"""Train a preset (default shakespeare-char) and report tokens/s, MFU against this machine's measured matmul
peak, wall time and the final validation loss; for shakespeare-char also the time to a target validation
loss against nanoGPT's own train.py (`--nanogpt`: a nanoGPT checkout), run in the same benchmark.

    python benchmarks/train.py --nanogpt ../nanogpt [--target 1.90] [--threads 2]
    python benchmarks/train.py [--data ../shared/data/tinyshakespeare/input.txt] [--max-iters 2000]
    python benchmarks/train.py --preset gpt2-124m --device cuda --max-iters 30

shakespeare-char runs nanoGPT's CPU recipe (its README: 4 layers, 4 heads, width 128, batch 12 x block 64,
2000 iterations, lr 1e-3 cosine to 1e-4 after 100 warmup iterations, AdamW betas 0.9/0.99, weight decay
0.1, clipping 1.0, dropout 0, exact GELU) on nanoGPT's split of the text (first 90% train, last 10%
validation), evaluated every 250 iterations on 20 batches of 12 x 64 tokens. nanoGPT runs first, in its
own process, then lmforge, never both at once, both with `--threads` threads. Each is timed from its
training start (model built, data loaded: Python start-up and data preparation are excluded for both) to
the end of each evaluation; the time to the first evaluation at or below `--target` is compared.
What differs: lmforge's model is the preset's GPT-2 layout, with biases in its linear layers and
LayerNorms (nanoGPT's recipe has none: its bias=False); its character vocabulary has 7 special tokens
beside the 65 characters, and each split starts with one boundary token; it evaluates the validation
loss on fixed windows (nanoGPT: the train and validation losses on fresh random batches, so 40 batches
an evaluation, and one more evaluation at step 0); it saves a checkpoint every 500 iterations (nanoGPT
at each evaluation that improves); it takes 2000 optimizer steps (nanoGPT 2001); it samples no text while
training; and it trains with its own defaults: bf16 autocast where bf16 matmuls are fast
(quant.cpu.fast_bf16: AVX-512 BF16 or AMX) with the short-block causal attention of train/attention.py,
fused AdamW.

Measured (docs/benchmarks.md, "Training against nanoGPT"): AMD EPYC Zen 5, 2 cores, AVX-512 BF16, no AMX,
2 threads: lmforge reached val loss 1.90 in 33.1 s (at step 2000), nanoGPT in 68.0 s (at step 1750): 0.49x
(two later runs: 0.48x and 0.51x); per step lmforge ran 2.2-2.4x nanoGPT's tokens/s.

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
from typing import Any

import nanogpt_peer
import torch
from common import machine

from lmforge.tokenizer import Tokenizer
from lmforge.train.data import prepare
from lmforge.train.presets import PRESETS
from lmforge.train.pretrain import TrainConfig, Trainer, matmul_peak
from lmforge.train.tokenizer import train_bpe, train_char

ROOT = Path(__file__).resolve().parents[1]
# nanoGPT's activation (exact GELU) and its CPU recipe's evaluation cadence; no text sampled while training
# (nanoGPT samples none).
PEER_SETTINGS: dict[str, Any] = {"model": {"activation": "gelu"}, "eval_interval": nanogpt_peer.EVAL_INTERVAL,
                                 "eval_iters": nanogpt_peer.EVAL_ITERS, "samples": 0}


class TimedTrainer(Trainer):
    """A Trainer that notes when each evaluation ends: (step, seconds since `t0`, val loss)."""

    t0 = 0.0

    def evaluate(self) -> dict[str, float]:
        out = super().evaluate()
        self.evals = [*getattr(self, "evals", []), (self.step, time.perf_counter() - self.t0, out["val_loss"])]
        return out


def first_at(evals: list[tuple[int, float, float]], target: float) -> tuple[int, float] | None:
    """(step, seconds) of the first evaluation at or below `target`."""
    return next(((step, t) for step, t, loss in evals if loss <= target), None)


def prepare_data(args: argparse.Namespace, recipe: dict[str, Any], out: Path) -> Tokenizer:
    """Tokenizer and token shards under `out`; shakespeare-char takes nanoGPT's split of the text."""
    if recipe["tokenizer"] == "char":
        tok_dir = train_char([args.data], out / "tokenizer")
    else:
        tok_dir = train_bpe([args.data], recipe["vocab_size"], out / "tokenizer")
    tok = Tokenizer.from_dir(tok_dir)
    if args.preset == "shakespeare-char":  # two records, the second of every two held out: 90% / 10%
        parts = nanogpt_peer.split_text(Path(args.data).read_text(encoding="utf-8"))
        corpus = out / "corpus.jsonl"
        corpus.write_text("".join(json.dumps({"text": p}) + "\n" for p in parts), encoding="utf-8")
        prepare([corpus], tok, out / "data", val_fraction=0.5, workers=1, progress=False)
    else:
        prepare([args.data], tok, out / "data", val_fraction=recipe["val_fraction"], workers=1, progress=False)
    return tok


def run_peer(args: argparse.Namespace, max_iters: int, threads: int) -> nanogpt_peer.PeerRun:
    with tempfile.TemporaryDirectory() as tmp:
        work = nanogpt_peer.prepare(Path(args.data), Path(args.nanogpt).resolve(), Path(tmp))
        print(f"$ (in a scratch directory) OMP_NUM_THREADS={threads} {' '.join(nanogpt_peer.CPU_RECIPE)} "
              f"--max_iters={max_iters} --lr_decay_iters={max_iters}", flush=True)
        return nanogpt_peer.run(Path(args.nanogpt).resolve(), work, max_iters, threads)


def compare(ours: TimedTrainer, peer: nanogpt_peer.PeerRun | None, target: float, steps: int,
            tok_step: int, our_step_tok_s: float) -> None:
    """The side-by-side table: time to the target, to the last evaluation, tokens/s and the losses."""
    print(f"\n### lmforge against nanoGPT's train.py: time to val loss <= {target}")
    if peer is None:
        print("(nanoGPT was not run: pass --nanogpt /path/to/nanoGPT)")
    cols = [("lmforge", ours.evals, our_step_tok_s)]
    if peer is not None:
        cols.append(("nanoGPT", peer.evals, tok_step / (statistics.median(peer.iter_ms) / 1e3)))
    print("| | " + " | ".join(c[0] for c in cols) + " |\n" + "|---" * (len(cols) + 1) + "|")
    hit = [first_at(e, target) for _, e, _ in cols]
    print("| time to target (step) | " + " | ".join(
        f"{h[1]:.1f} s ({h[0]})" if h else "not reached" for h in hit) + " |")
    last = [next((t for s, t, _ in e if s == steps), None) for _, e, _ in cols]
    print(f"| time to the evaluation after step {steps} | " + " | ".join(
        f"{t:.1f} s" if t else "n/a" for t in last) + " |")
    print("| tokens/s (wall, evaluations included) | " + " | ".join(
        f"{steps * tok_step / t:,.0f}" if t else "n/a" for t in last) + " |")
    print("| tokens/s (median step) | " + " | ".join(f"{c[2]:,.0f}" for c in cols) + " |")
    print("| final val loss | " + " | ".join(f"{e[-1][2]:.4f}" for _, e, _ in cols) + " |")
    if peer is not None:
        ratio = f"{hit[0][1] / hit[1][1]:.2f}x" if hit[0] and hit[1] else "n/a (target not reached by both)"
        print(f"| lmforge / nanoGPT time to target | {ratio} | |")
    for name, evals, _ in cols:
        print(f"{name} val loss (seconds) by step: " + ", ".join(f"{s}: {v:.4f} ({t:.1f})" for s, t, v in evals))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="shakespeare-char", choices=list(PRESETS))
    ap.add_argument("--data", default=str(ROOT.parent / "shared/data/tinyshakespeare/input.txt"))
    ap.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N")
    ap.add_argument("--max-iters", type=int, default=None)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a training setting (JSON value), e.g. --set batch_size=2")
    ap.add_argument("--nanogpt", help="a nanoGPT checkout: also run its train.py (shakespeare-char, CPU)")
    ap.add_argument("--target", type=float, default=1.90, help="the validation loss timed (shakespeare-char)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads for both (default: torch's)")
    args = ap.parse_args()
    if args.nanogpt and (args.preset != "shakespeare-char" or args.device != "cpu" or args.set):
        ap.error("--nanogpt runs nanoGPT's CPU recipe: preset shakespeare-char on cpu, without --set")
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()

    recipe = json.loads(json.dumps(PRESETS[args.preset]))
    settings = {k: v for k, v in recipe.items() if k not in ("tokenizer", "vocab_size", "val_fraction", "default_data")}
    settings["betas"] = tuple(settings.get("betas", (0.9, 0.95)))
    if args.preset == "shakespeare-char":
        settings |= PEER_SETTINGS | {"model": settings["model"] | PEER_SETTINGS["model"]}
    for item in args.set:
        key, _, value = item.partition("=")
        settings[key] = json.loads(value)
    if args.max_iters:
        settings["max_iters"] = args.max_iters
    device = torch.device(args.device)
    peer = run_peer(args, settings["max_iters"], threads) if args.nanogpt else None
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        tok = prepare_data(args, recipe, out)
        if recipe["tokenizer"] != "char" and tok.vocab_size < recipe["vocab_size"]:
            settings["model"] = settings["model"] | {"vocab_size": recipe["vocab_size"]}
        trainer = TimedTrainer(TrainConfig(data=str(out / "data"), out=str(out / "run"), device=args.device,
                                           **settings), log=lambda s: None)
        # The peak in the training's precision. A GPU needs large matrices to reach it; the CPU figure
        # keeps its historical size.
        n = 8192 if device.type == "cuda" else 2048
        peak = matmul_peak(device, n=n, reps=20 if device.type == "cuda" else 10, bf16=trainer.bf16)
        start = trainer.t0 = time.perf_counter()
        trainer.fit()
        wall = time.perf_counter() - start
        records = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = len(records)
    cfg = trainer.cfg
    tok_step = cfg.batch_size * cfg.block_size * cfg.grad_accum
    tok_s = steps * tok_step / wall
    # The median step leaves out the first steps' compilation and the evaluations.
    step_tok_s = statistics.median(r["tokens_per_s"] for r in records[min(5, steps // 2):])
    final = next(r for r in reversed(records) if "val_loss" in r)
    mem = f", peak memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB" if device.type == "cuda" else ""
    print(f"machine: {machine()}; {args.device}{mem}")
    print(f"preset {args.preset}: batch {cfg.batch_size} x block {cfg.block_size} x accum {cfg.grad_accum}, "
          f"compile {cfg.compile}, {'bf16' if trainer.bf16 else 'fp32'}, vocab {trainer.model_cfg.vocab_size} "
          f"(tokenizer {tok.vocab_size})")
    unit = "bf16" if device.type == "cuda" or trainer.bf16 else "fp32"
    print("| metric | value |\n|---|---|")
    print(f"| {unit} matmul peak ({n}^3) | {peak / 1e9:.1f} GFLOP/s |")
    print(f"| parameters | {sum(p.numel() for p in trainer.model.parameters()) / 1e6:.2f} M |")
    print(f"| steps | {steps} |")
    print(f"| tokens/s (wall, evaluations included) | {tok_s:,.0f} |")
    print(f"| MFU | {100 * tok_s * trainer.flops_per_token / peak:.1f}% |")
    print(f"| tokens/s (median step) | {step_tok_s:,.0f} |")
    print(f"| MFU (median step) | {100 * step_tok_s * trainer.flops_per_token / peak:.1f}% |")
    print(f"| wall time | {wall:.1f} s |")
    print(f"| final val loss | {final['val_loss']:.4f} |")
    if args.preset == "shakespeare-char":
        compare(trainer, peer, args.target, steps, tok_step, step_tok_s)


if __name__ == "__main__":
    main()
