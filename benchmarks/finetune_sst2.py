"""A measured fine-tuning effect: SST-2 sentiment as a chat task, before and after LoRA SFT.

Takes N random rows of SST-2's train split (sst2/train.tsv under $LMFORGE_DATA or $LMFORGE_HOME/data) and
turns each into a chat example whose user turn is exactly the `sst2` eval task's prompt and whose
assistant reply is "positive" or "negative". Then, through the CLI:

    lmforge eval MODEL --tasks sst2 --chat --limit L --out OUT/before     # the held-out split
    lmforge finetune sft MODEL --method lora --data OUT/train.jsonl --out OUT/run ...
    lmforge eval OUT/run/final --tasks sst2 --chat --limit L --out OUT/after
    lmforge eval compare OUT/before OUT/after

and prints the wall times, a summary of the loss curve and the comparison. The eval items come from
sst2/train_heldout.tsv, which shares no row with train.tsv. Every command runs with --threads torch
threads (default 1: on cores that other jobs keep busy, a second thread mostly waits for the first);
with --reuse-before an existing OUT/before run (it does not depend on the training settings) is kept.

    python benchmarks/finetune_sst2.py [--model smollm2-135m-instruct] [--n 1500] [--steps 160] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path


def write_chat_data(n: int, seed: int, path: Path) -> int:
    """N random SST-2 train rows as chat JSONL, prompted exactly as the `sst2` eval task prompts."""
    from lmforge.eval.tasks import build_items, data_dirs, get_task, read_records

    spec = get_task("sst2")
    train = next((d / "sst2" / "train.tsv" for d in data_dirs() if (d / "sst2" / "train.tsv").is_file()), None)
    if train is None:
        sys.exit("sst2/train.tsv not found under $LMFORGE_DATA or $LMFORGE_HOME/data")
    records = read_records(spec, train)
    rows = random.Random(seed).sample(records, min(n, len(records)))
    with path.open("w", encoding="utf-8") as f:
        for it in build_items(spec, rows):
            msgs = [{"role": "user", "content": it.contexts[0]},
                    {"role": "assistant", "content": it.continuations[int(it.gold)]}]
            f.write(json.dumps({"messages": msgs}) + "\n")
    return len(rows)


def loss_summary(metrics: Path) -> str:
    recs = [json.loads(line) for line in metrics.read_text(encoding="utf-8").splitlines() if line.strip()]
    losses = [r["loss"] for r in recs]
    k = max(1, len(losses) // 10)
    parts = [f"steps {i + 1}-{i + k}: {sum(losses[i:i + k]) / k:.3f}"
             for i in range(0, len(losses) - k + 1, max(k, len(losses) // 5))]
    vals = [f"{r['step']}: {r['val_loss']:.3f}" for r in recs if "val_loss" in r]
    return ("mean training loss, " + "; ".join(parts) + "\nvalidation loss at step " + ", ".join(vals))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--n", type=int, default=1500, help="training rows (default 1500)")
    ap.add_argument("--limit", type=int, default=872, help="held-out items evaluated (default 872)")
    ap.add_argument("--steps", type=int, default=160)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per command (default 1)")
    ap.add_argument("--reuse-before", action="store_true", help="keep an existing OUT/before evaluation")
    ap.add_argument("--out", default="runs/sst2")
    args = ap.parse_args()
    from common import machine, run_lmforge

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = out / "train.jsonl"
    n = write_chat_data(args.n, args.seed, data)
    print(f"{n} training rows -> {data}")
    ev = ["--tasks", "sst2", "--chat", "--limit", str(args.limit), "--quiet", "--fresh"]
    if args.reuse_before and (out / "before" / "results.json").is_file():
        print(f"keeping {out / 'before'}")
        t_before = float("nan")
    else:
        t_before, _ = run_lmforge(["eval", args.model, *ev, "--out", str(out / "before")], args.threads)
    t_train, train_out = run_lmforge(["finetune", "sft", args.model, "--method", "lora", "--data", str(data),
                              "--out", str(out / "run"), "--max-steps", str(args.steps), "--batch-size",
                              str(args.batch_size), "--lr", str(args.lr), "--eval-every", "50", "--save-every",
                              "100", "--samples", "0", "--seed", str(args.seed), "--device", "cpu"], args.threads)
    t_after, _ = run_lmforge(["eval", str(out / "run" / "final"), *ev, "--out", str(out / "after")], args.threads)
    _, table = run_lmforge(["eval", "compare", str(out / "before"), str(out / "after")], args.threads)
    import torch

    torch.set_num_threads(args.threads)  # so machine() reports the threads the commands ran with

    print(f"\nmachine: {machine()}")
    print(train_out.strip())
    print(f"wall time: eval before {t_before:.0f} s, training {t_train:.0f} s ({t_train / args.steps:.1f} s/step), "
          f"eval after {t_after:.0f} s")
    print(loss_summary(out / "run" / "metrics.jsonl"))
    print(table)


if __name__ == "__main__":
    main()
