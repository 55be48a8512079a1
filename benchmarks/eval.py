"""Multiple-choice scoring: lmforge vs transformers on the same items, same token ids, same run.

    python benchmarks/eval.py --data /path/to/hellaswag_val_full.txt.bz2 --limit 500 --threads 1

Prints items/s for both, their ratio, and how often the two agree on the predicted choice (acc and
acc_norm), plus each side's accuracy. transformers loads the same GGUF (dequantized to fp32) and scores
every choice as its own full context + continuation row, without prefix sharing.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from common import machine


def hf_score(model, groups: list[list[tuple[list[int], list[int]]]]) -> list[list[float]]:
    """One forward per item: its choices as right-padded full rows; sum log-probs over continuations."""
    out = []
    with torch.inference_mode():
        for g in groups:
            seqs = [c + x for c, x in g]
            t = max(len(s) for s in seqs)
            ids = torch.zeros(len(seqs), t, dtype=torch.long)
            mask = torch.zeros(len(seqs), t, dtype=torch.long)
            for i, s in enumerate(seqs):
                ids[i, :len(s)] = torch.tensor(s)
                mask[i, :len(s)] = 1
            logp = model(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)
            row = []
            for i, (c, x) in enumerate(g):
                pos = torch.arange(len(c) - 1, len(c) - 1 + len(x))
                row.append(float(logp[i, pos, torch.tensor(x)].double().sum()))
            out.append(row)
    return out


def main() -> None:
    from lmforge import load
    from lmforge.eval import get_task, load_items, mc_metrics, score_groups
    from lmforge.eval.runner import encode_pair

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--task", default="hellaswag")
    ap.add_argument("--data", default=None, help="the task's data file (default: $LMFORGE_DATA lookup)")
    ap.add_argument("--limit", type=int, default=500)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    lm = load(a.model)
    spec = get_task(a.task)
    items, path = load_items(spec, a.data)
    items = items[:a.limit]
    groups = [[encode_pair(lm.tokenizer, c, spec.target_delimiter + x) for c, x in zip(it.contexts, it.continuations)]
              for it in items]
    golds = [int(it.gold) for it in items]
    texts = [it.choice_texts for it in items]
    print(f"{spec.name}: {len(items)} items from {path}; {machine()}", flush=True)

    t = time.perf_counter()
    ours = [[s.logprob for s in g] for g in score_groups(lm.model, groups, batch_size=a.batch_size)]
    t_ours = time.perf_counter() - t
    m_ours = mc_metrics(ours, golds, texts)
    res = {"items": len(items), "machine": machine(),
           "lmforge": {"seconds": round(t_ours, 2), "items_per_s": round(len(items) / t_ours, 3),
                       "acc": float(np.mean(m_ours["acc"])), "acc_norm": float(np.mean(m_ours["acc_norm"]))}}
    print("lmforge", json.dumps(res["lmforge"]), flush=True)
    if not a.skip_hf:
        from transformers import AutoModelForCausalLM

        gguf = Path(lm.path)
        hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
        t = time.perf_counter()
        theirs = hf_score(hf, groups)
        t_hf = time.perf_counter() - t
        m_hf = mc_metrics(theirs, golds, texts)
        diff = np.abs(np.array([x for g in ours for x in g]) - np.array([x for g in theirs for x in g]))
        def pick(ll: list[float], tx: list[str], norm: bool) -> int:
            return int(np.argmax(np.array(ll) / (np.array([len(s) for s in tx]) if norm else 1.0)))

        agree = {k: float(np.mean([pick(o, tx, k == "acc_norm") == pick(h, tx, k == "acc_norm")
                                   for o, h, tx in zip(ours, theirs, texts)])) for k in ("acc", "acc_norm")}
        res["transformers"] = {"seconds": round(t_hf, 2), "items_per_s": round(len(items) / t_hf, 3),
                               "acc": float(np.mean(m_hf["acc"])), "acc_norm": float(np.mean(m_hf["acc_norm"]))}
        res["agreement"] = agree
        res["max_abs_logprob_diff"] = float(diff.max())
        res["speedup_lmforge_over_transformers"] = round(t_hf / t_ours, 2)
        print("transformers", json.dumps(res["transformers"]), flush=True)
        print(f"agreement acc {agree['acc']:.4f} acc_norm {agree['acc_norm']:.4f}; max |logprob diff| "
              f"{res['max_abs_logprob_diff']:.2e}; lmforge/transformers items/s ratio "
              f"{res['speedup_lmforge_over_transformers']}x", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
