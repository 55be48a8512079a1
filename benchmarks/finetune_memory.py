"""Peak memory of fine-tuning SmolLM2-135M: full fine-tuning vs LoRA vs QLoRA (NF4, and the GGUF's own codes).

Each configuration runs a few AdamW steps on a batch of 4 x 128 tokens in a fresh subprocess, which reports
its peak resident set size (getrusage ru_maxrss), so no configuration inherits another's memory. glibc's
malloc runs with a fixed mmap threshold (MALLOC_MMAP_THRESHOLD_=65536): large freed tensors then go back
to the OS at once, so the peak counts live memory rather than free space the allocator kept (with its
default, adaptive threshold every configuration's peak grows by several hundred MB of such space).

    python benchmarks/finetune_memory.py [--model PATH.gguf] [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_MODEL = Path("~/.cache/lmforge/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf").expanduser()
CONFIGS = {  # name -> (method, gradient checkpointing)
    "full": ("full", False),
    "lora": ("lora", False),
    "qlora nf4": ("nf4", False),
    "qlora packed (Q4_1 codes)": ("packed", False),
    "qlora nf4 + checkpointing": ("nf4", True),
}


def rss_mb() -> float:
    """Current resident set size."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_one(model_path: str, method: str, checkpointing: bool, steps: int, batch: int, seq: int) -> dict:
    import torch
    import torch.nn.functional as F

    from lmforge.finetune.lora import LoraConfig, apply_lora, lora_parameters
    from lmforge.finetune.qlora import load_quantized
    from lmforge.formats import load_checkpoint

    torch.manual_seed(0)
    baseline = rss_mb()
    if method in ("nf4", "packed"):  # quantized as the weights stream in: no dense model ever exists
        model = load_quantized(model_path, method, device="cpu", dtype=torch.float32).model
    else:
        model = load_checkpoint(model_path, device="cpu", dtype=torch.float32, packed=False).model
    if method == "full":
        params = [p for p in model.parameters() if p.requires_grad]
    else:
        apply_lora(model, LoraConfig(r=8, alpha=16, quant=None if method == "lora" else method))
        params = lora_parameters(model)
    loaded = rss_mb()
    model.grad_checkpointing = checkpointing
    model.train()
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, model.cfg.vocab_size, (batch, seq + 1))
    losses, times = [], []
    for _ in range(steps):
        t = time.perf_counter()
        logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        del logits
        times.append(time.perf_counter() - t)
        losses.append(round(loss.item(), 4))
    return {"trainable": sum(p.numel() for p in params), "baseline_mb": baseline, "loaded_mb": loaded,
            "peak_mb": peak_mb(), "losses": losses, "s_per_step": min(times)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--only", default=None, help=argparse.SUPPRESS)  # one configuration, in this process
    args = ap.parse_args()
    if args.only:
        method, ckpt = CONFIGS[args.only]
        print(json.dumps(run_one(args.model, method, ckpt, args.steps, args.batch, args.seq)))
        return
    from common import machine

    rows = {}
    for name in CONFIGS:
        out = subprocess.run([sys.executable, __file__, "--only", name, "--model", args.model, "--steps",
                              str(args.steps), "--batch", str(args.batch), "--seq", str(args.seq)],
                             check=True, capture_output=True, text=True,
                             env=os.environ | {"MALLOC_MMAP_THRESHOLD_": "65536"}).stdout
        rows[name] = json.loads(out.strip().splitlines()[-1])
        print(f"{name}: {rows[name]}", file=sys.stderr)
    print(f"machine: {machine()}")
    print(f"model: {Path(args.model).name}, AdamW, batch {args.batch} x {args.seq} tokens, {args.steps} steps, fp32\n")
    print("| configuration | trainable params | RSS after load | peak RSS | peak / full | s/step |")
    print("|---|---:|---:|---:|---:|---:|")
    full = rows["full"]["peak_mb"]
    for name, r in rows.items():
        print(f"| {name} | {r['trainable'] / 1e6:.2f} M | {r['loaded_mb']:.0f} MB | {r['peak_mb']:.0f} MB | "
              f"{r['peak_mb'] / full:.2f} | {r['s_per_step']:.1f} |")
    print(f"\n(python + torch before loading: {rows['full']['baseline_mb']:.0f} MB)")


if __name__ == "__main__":
    main()
