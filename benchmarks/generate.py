"""Prefill and decode speed of lmforge against transformers (and llama-cpp-python when installed).

All engines run the same GGUF file, one after the other in one run (each in its own process), so the
printed ratios compare like with like on the same machine state. Absolute numbers drift on shared machines; ratios
are what to read.

    python benchmarks/generate.py [--model smollm2-135m-instruct] [--prompt-tokens 512] [--decode-tokens 256]
    python benchmarks/generate.py --engines lmforge --device cuda   # lmforge alone, in the device's dtype (bf16)

lmforge-fp32 is lmforge with LMFORGE_CPU_BF16=0: on CPUs with fast bf16 (AVX-512 BF16 or AMX) it shows what
the bf16 products of prefill and batched decode gain; elsewhere the two columns run the same code.

transformers runs twice: as its users get it, and with KMP_BLOCKTIME=0, the OpenMP setting lmforge
applies to itself when it loads a model (without it, MKL's and OpenMP's thread pools spin against each other
between small ops on CPUs, which slows any PyTorch decode loop several times).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import decode_rate, machine, plain_engine

# lmforge runs only in its own process: loading a model sets KMP_BLOCKTIME, which must not leak into
# the process that measures transformers as its users get it.


def prompt_ids(vocab: int, n: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, vocab - 100, (n,), generator=g).tolist()


def bench_lmforge(path: Path, prompt: list[int], short: list[int], n_decode: int,
                  device: str = "cpu") -> dict[str, float]:
    from lmforge.engine import SamplingParams
    from lmforge.formats import load_checkpoint

    # Every step returns sampled tokens to the host, so CUDA timings include the device's work.
    ck = load_checkpoint(path, device=device)
    eng = plain_engine(ck.model, ck.tokenizer, max_batch=32)
    greedy = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    eng.generate([short], greedy)  # warm-up
    t = time.perf_counter()
    eng.generate([prompt], greedy)
    out = {"prefill": len(prompt) / (time.perf_counter() - t)}
    for b in (1, 8, 32):
        out[f"decode_b{b}"] = decode_rate(eng, short, b, n_decode)
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


def bench_llama_cpp(path: Path, prompt: list[int], short: list[int], n_decode: int) -> dict[str, float]:
    try:
        from llama_cpp import Llama
    except ImportError:
        raise SystemExit("llama-cpp-python is not installed") from None
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


ENGINES = {
    # name: (function, extra environment); None removes a variable
    "lmforge": ("bench_lmforge", {}),
    # The same engine with every product in fp32 (quant/cpu.py's bf16 dispatch off), where bf16 is fast
    "lmforge-fp32": ("bench_lmforge", {"LMFORGE_CPU_BF16": "0"}),
    "transformers": ("bench_transformers", {"KMP_BLOCKTIME": None}),
    "transformers+KMP_BLOCKTIME=0": ("bench_transformers", {"KMP_BLOCKTIME": "0"}),
    "llama.cpp": ("bench_llama_cpp", {}),
}


def run_engine(name: str, args: argparse.Namespace) -> dict[str, float] | None:
    """Each engine runs in its own process: separate thread pools, memory, and environment."""
    env = {k: v for k, v in os.environ.items() if k != "KMP_BLOCKTIME"}
    for k, v in ENGINES[name][1].items():
        if v is not None:
            env[k] = v
    cmd = [sys.executable, __file__, "--engine", name, "--model", str(args.path), "--vocab", str(args.vocab),
           "--prompt-tokens", str(args.prompt_tokens), "--decode-tokens", str(args.decode_tokens),
           "--device", args.device]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        print(f"{name} failed:\n{out.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--decode-tokens", type=int, default=256)
    ap.add_argument("--engines", default=",".join(ENGINES), help="comma-separated subset of " + ", ".join(ENGINES))
    ap.add_argument("--device", default="cpu", help="lmforge's device: cpu (default), cuda, cuda:N")
    ap.add_argument("--engine", help=argparse.SUPPRESS)  # internal: run one engine, print JSON
    ap.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.engine:
        path = Path(args.model)
        prompt, short = prompt_ids(args.vocab, args.prompt_tokens), prompt_ids(args.vocab, 16, seed=1)
        extra = {"device": args.device} if args.engine.startswith("lmforge") else {}
        result = globals()[ENGINES[args.engine][0]](path, prompt, short, args.decode_tokens, **extra)
        print(json.dumps(result))
        return

    from lmforge.formats.gguf import GGUFFile
    from lmforge.registry import resolve

    if args.device != "cpu" and args.engines != "lmforge":
        raise SystemExit("--device applies to lmforge only: pass --engines lmforge with it")
    path = args.path = resolve(args.model)
    args.vocab = GGUFFile(path).config().vocab_size
    print(f"machine: {machine()}" + (f"; lmforge on {args.device}" if args.device != "cpu" else ""))
    print(f"model: {path.name}; prefill {args.prompt_tokens} tokens; decode {args.decode_tokens} greedy tokens")
    results: dict[str, dict[str, float]] = {}
    for name in args.engines.split(","):
        r = run_engine(name, args)
        if r is None:
            print(f"{name}: not available, skipped")
        else:
            results[name] = r
    if "lmforge" not in results:
        raise SystemExit("lmforge failed")

    metrics = [("prefill", "prefill tok/s"), ("decode_b1", "decode tok/s, batch 1"),
               ("decode_b8", "decode tok/s, batch 8"), ("decode_b32", "decode tok/s, batch 32")]
    peers = [p for p in results if p != "lmforge"]
    print()
    print("| " + " | ".join(["metric", *results, *(f"lmforge / {p}" for p in peers)]) + " |")
    print("|" + "---|" * (1 + len(results) + len(peers)))
    for key, label in metrics:
        ours = results["lmforge"].get(key)
        cells = [f"{r[key]:.1f}" if key in r else "n/a" for r in results.values()]
        ratios = [f"{ours / results[p][key]:.2f}x" if key in results[p] and ours else "n/a" for p in peers]
        print("| " + " | ".join([label, *cells, *ratios]) + " |")


if __name__ == "__main__":
    main()
