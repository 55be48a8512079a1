"""Prefill and decode speed of lmforge against transformers (and llama-cpp-python when installed).

All engines run the same GGUF file in the same process, one after the other, so the printed ratios
compare like with like on the same machine state. Absolute numbers drift on shared machines; ratios
are what to read.

    python benchmarks/generate.py [--model smollm2-135m-instruct] [--prompt-tokens 512] [--decode-tokens 256]
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import time
from pathlib import Path

import torch

from lmforge.engine import SamplingParams
from lmforge.formats import load_checkpoint
from lmforge.registry import resolve


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"({torch.backends.cpu.get_cpu_capability()}), {torch.get_num_threads()} threads")


def prompt_ids(vocab: int, n: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, vocab - 100, (n,), generator=g).tolist()


def bench_lmforge(path: Path, prompt: list[int], short: list[int], n_decode: int) -> dict[str, float]:
    from lmforge.engine import Engine

    ck = load_checkpoint(path, device="cpu")
    eng = Engine(ck.model, ck.tokenizer, max_batch=8)
    greedy = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    eng.generate([short], greedy)  # warm-up
    t = time.perf_counter()
    eng.generate([prompt], greedy)
    out = {"prefill": len(prompt) / (time.perf_counter() - t)}
    for b in (1, 8):
        params = SamplingParams(temperature=0, max_tokens=n_decode, ignore_eos=True)
        seqs = [eng.add(short, params) for _ in range(b)]
        eng.step()  # prefill, not timed
        t = time.perf_counter()
        while not all(s.done for s in seqs):
            eng.step()
        out[f"decode_b{b}"] = b * (n_decode - 1) / (time.perf_counter() - t)
    del eng, ck
    gc.collect()
    return out


def bench_transformers(path: Path, prompt: list[int], short: list[int], n_decode: int) -> dict[str, float]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    out = {}
    with torch.inference_mode():
        model(torch.tensor([short]))  # warm-up
        t = time.perf_counter()
        model(torch.tensor([prompt]))
        out["prefill"] = len(prompt) / (time.perf_counter() - t)
        for b in (1, 8):
            ids = torch.tensor([short] * b)
            kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
            t = time.perf_counter()
            model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
            t_prefill = time.perf_counter() - t
            t = time.perf_counter()
            model.generate(ids, max_new_tokens=n_decode, min_new_tokens=n_decode, **kw)
            out[f"decode_b{b}"] = b * (n_decode - 1) / (time.perf_counter() - t - t_prefill)
    del model
    gc.collect()
    return out


def bench_llama_cpp(path: Path, prompt: list[int], short: list[int], n_decode: int) -> dict[str, float] | None:
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    llm = Llama(model_path=str(path), n_ctx=2048, n_batch=512, n_threads=os.cpu_count(), verbose=False)
    llm.eval(short)  # warm-up
    llm.reset()
    t = time.perf_counter()
    llm.eval(prompt)
    out = {"prefill": len(prompt) / (time.perf_counter() - t)}
    llm.reset()
    llm.eval(short)
    t = time.perf_counter()
    for _ in range(n_decode - 1):
        tok = llm.sample(temp=0.0)
        llm.eval([tok])
    out["decode_b1"] = (n_decode - 1) / (time.perf_counter() - t)
    del llm
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--decode-tokens", type=int, default=256)
    ap.add_argument("--skip-transformers", action="store_true")
    args = ap.parse_args()

    path = resolve(args.model)
    ck = load_checkpoint(path, device="cpu")
    vocab = ck.config.vocab_size
    del ck
    prompt, short = prompt_ids(vocab, args.prompt_tokens), prompt_ids(vocab, 16, seed=1)
    print(f"machine: {machine()}")
    print(f"model: {path.name}; prefill {args.prompt_tokens} tokens; decode {args.decode_tokens} greedy tokens")

    results = {"lmforge": bench_lmforge(path, prompt, short, args.decode_tokens)}
    if not args.skip_transformers:
        results["transformers"] = bench_transformers(path, prompt, short, args.decode_tokens)
    llama = bench_llama_cpp(path, prompt, short, args.decode_tokens)
    if llama is not None:
        results["llama.cpp"] = llama
    else:
        print("llama-cpp-python not installed: skipping llama.cpp")

    metrics = [("prefill", "prefill tok/s"), ("decode_b1", "decode tok/s, batch 1"),
               ("decode_b8", "decode tok/s, batch 8")]
    peers = [p for p in results if p != "lmforge"]
    header = "| metric | " + " | ".join(results) + " | " + " | ".join(f"lmforge / {p}" for p in peers) + " |"
    print()
    print(header)
    print("|" + "---|" * (1 + len(results) + len(peers)))
    for key, label in metrics:
        ours = results["lmforge"].get(key)
        cells = [f"{r[key]:.1f}" if key in r else "n/a" for r in results.values()]
        ratios = [f"{ours / results[p][key]:.2f}x" if key in results[p] and ours else "n/a" for p in peers]
        print(f"| {label} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")


if __name__ == "__main__":
    main()
