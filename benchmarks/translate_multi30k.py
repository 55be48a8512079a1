"""Translation on a CPU budget: Multi30k English -> German, a small T5 trained from scratch against
SmolLM2-135M-Instruct tuned with LoRA, each for the same wall time on this machine.

    t5:      lmforge train --preset t5-multi30k --data multi30k/train.en.gz --target-data multi30k/train.de.gz
             (45 minutes: the preset's max_seconds), then `lmforge eval CHECKPOINT --tasks multi30k_en_de`
             on every checkpoint: BLEU and chrF against minutes of training; the last checkpoint also
             with --num-beams (default 4).
    smollm2: the same pairs as chat examples whose user turn is the eval task's own prompt
             ("English: ...\\nGerman:"), `lmforge finetune sft --method lora --max-seconds` for the same
             time, merged, then `lmforge eval --chat --shots 0`; and the untuned model (0-shot chat and
             the task's default 3-shot prompt) for reference.

Data: multi30k/ under $LMFORGE_DATA (train.{en,de}.gz; the validation split is what eval scores).
Each run's directory and eval results go under --out; an existing run is evaluated, not retrained.

    python benchmarks/translate_multi30k.py --part t5|smollm2|all [--minutes 45] [--every 1000] [--num-beams 4] [--out DIR]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, run_lmforge  # noqa: E402


def data_dir() -> Path:
    from lmforge.eval.tasks import data_dirs

    found = next((d / "multi30k" for d in data_dirs() if (d / "multi30k" / "train.en.gz").is_file()), None)
    if found is None:
        sys.exit("multi30k/train.en.gz not found under $LMFORGE_DATA or $LMFORGE_HOME/data")
    return found


def score(model: Path | str, out: Path, *extra: str) -> dict[str, float]:
    """BLEU and chrF of a model on the Multi30k en->de validation split (cached in out/results.json)."""
    if not (out / "results.json").is_file():
        run_lmforge(["eval", str(model), "--tasks", "multi30k_en_de", "--data", str(data_dir()), "--out", str(out),
                     "--batch-size", "32", *extra])
    rows = json.loads((out / "results.json").read_text())["results"]
    return {r["metric"]: r["value"] for r in rows}


def part_t5(out: Path, minutes: float, every: int, beams: int) -> dict[str, float]:
    run = out / "t5"
    data = data_dir()
    if not run.is_dir():
        run_lmforge(["train", "--preset", "t5-multi30k", "--data", str(data / "train.en.gz"), "--target-data",
                     str(data / "train.de.gz"), "--out", str(run), "--set", f"max_seconds={minutes * 60:g}"])
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    elapsed = {r["step"]: r["elapsed_s"] for r in records}
    val = {r["step"]: r["val_loss"] for r in records if "val_loss" in r}
    params = json.loads((sorted(run.glob("step_*"))[-1] / "config.json").read_text())
    print(f"\nT5: d_model {params['d_model']}, {params['num_layers']} + {params['num_decoder_layers']} layers, "
          f"vocabulary {params['vocab_size']}; {records[-1]['step']} steps in {records[-1]['elapsed_s'] / 60:.1f} min")
    print("| step | minutes | val loss | BLEU | chrF |\n|---:|---:|---:|---:|---:|")
    last: dict[str, float] = {}
    checkpoints = sorted(run.glob("step_*"))
    for ck in checkpoints:
        step = int(ck.name.removeprefix("step_"))
        if step % every and ck != checkpoints[-1]:
            continue
        last = score(ck, out / "t5-eval" / ck.name)
        print(f"| {step} | {elapsed[step] / 60:.1f} | {val.get(step, float('nan')):.3f} | {last['bleu']:.2f} | "
              f"{last['chrf']:.2f} |", flush=True)
    samples = (out / "t5-eval" / ck.name / "samples_multi30k_en_de.jsonl").read_text().splitlines()
    for line in samples[:5]:
        print(f"  {json.dumps(json.loads(line), ensure_ascii=False)[:400]}")
    if beams > 1:  # the last checkpoint again, beam-searched
        t = time.perf_counter()
        searched = score(ck, out / "t5-eval" / f"{ck.name}-beams{beams}", "--num-beams", str(beams))
        print(f"{ck.name}, {beams} beams: BLEU {searched['bleu']:.2f}, chrF {searched['chrf']:.2f} "
              f"({time.perf_counter() - t:.0f} s)", flush=True)
        last = searched
    return last


def write_chat_pairs(path: Path) -> int:
    """The training pairs as chat examples whose user turn is the eval task's prompt for the source."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    from lmforge.eval.tasks import get_task

    prompt = ImmutableSandboxedEnvironment().from_string(get_task("multi30k_en_de").context)
    data = data_dir()
    with gzip.open(data / "train.en.gz", "rt", encoding="utf-8") as f:
        en = [line.strip() for line in f]
    with gzip.open(data / "train.de.gz", "rt", encoding="utf-8") as f:
        de = [line.strip() for line in f]
    with path.open("w", encoding="utf-8") as f:
        for a, b in zip(en, de):
            user = prompt.render(source_text=a)
            f.write(json.dumps({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": b}]},
                               ensure_ascii=False) + "\n")
    return len(en)


def part_smollm2(out: Path, minutes: float, model: str) -> dict[str, float]:
    run = out / "smollm2-lora"
    if not (run / "final").is_dir():
        n = write_chat_pairs(out / "multi30k_chat.jsonl")
        print(f"{n} chat pairs -> {out / 'multi30k_chat.jsonl'}")
        run_lmforge(["finetune", "sft", model, "--data", str(out / "multi30k_chat.jsonl"), "--out", str(run),
                     "--method", "lora", "--lora-r", "16", "--lora-alpha", "32", "--lr", "1e-3", "--batch-size", "16",
                     "--epochs", "10", "--max-seconds", f"{minutes * 60:g}", "--val-fraction", "0.01",
                     "--eval-every", "200", "--save-every", "200", "--samples", "0"])
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    print(f"\nSmolLM2 LoRA: {records[-1]['step']} steps of 16 pairs in {records[-1]['elapsed_s'] / 60:.1f} min; "
          f"val loss {[round(r['val_loss'], 3) for r in records if 'val_loss' in r]}")
    merged = out / "smollm2-merged"
    if not merged.is_dir():
        run_lmforge(["merge", model, "--adapter", str(run / "final"), "--out", str(merged)])
    rows = {"untuned, 3-shot": score(model, out / "smollm2-3shot"),
            "untuned, 0-shot chat": score(model, out / "smollm2-chat", "--chat", "--shots", "0"),
            "LoRA-tuned, 0-shot chat": score(merged, out / "smollm2-lora-eval", "--chat", "--shots", "0")}
    print("| SmolLM2-135M-Instruct | BLEU | chrF |\n|---|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r['bleu']:.2f} | {r['chrf']:.2f} |")
    return rows["LoRA-tuned, 0-shot chat"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("t5", "smollm2", "all"), default="all")
    ap.add_argument("--minutes", type=float, default=45.0, help="training wall time of each model (default 45)")
    ap.add_argument("--model", default="smollm2-135m-instruct", help="the decoder model to tune")
    ap.add_argument("--every", type=int, default=1000, help="score the T5 checkpoints every N steps, and the last")
    ap.add_argument("--num-beams", type=int, default=4, help="also score the last T5 checkpoint with beam search "
                                                            "of this many beams (1: greedy only; default 4)")
    ap.add_argument("--out", type=Path, default=Path("runs/translate-multi30k"))
    args = ap.parse_args()
    import torch  # noqa: F401  (so machine() reports torch's build and threads)

    print(machine(), f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.part in ("t5", "all"):
        part_t5(args.out, args.minutes, args.every, args.num_beams)
    if args.part in ("smollm2", "all"):
        part_smollm2(args.out, args.minutes, args.model)


if __name__ == "__main__":
    main()
