"""The packed kernels' instruction-set variants (AVX2, AVX-VNNI, AVX-512, AVX-512 VNNI; every one this CPU
can run), which give bit-identical results, timed against each other.

Two tables: one product per code kind on SmolLM2-135M-Instruct's ffn_down matrix (576 x 1536) at 1, 4 and
16 rows, int16 activations (fp32 with --fp32-activations), one thread timed by its own CPU time (what the
kernel costs, whatever else a shared machine runs); and whole-model greedy decode of the Q4_1 file at batch 1 and batch 8, the library
swapped in place between runs (LMFORGE_KERNELS=<variant>). Variants are interleaved in every round and
each figure is the best of the rounds.

    OMP_NUM_THREADS=2 python benchmarks/kernel_variants.py [--rounds 5] [--decode-tokens 32]
    OMP_NUM_THREADS=2 python benchmarks/kernel_variants.py --fp32-activations --skip-decode
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from common import decode_rate, machine, plain_engine
from gguf import GGMLQuantizationType
from kquants import quantize_any

from lmforge import registry
from lmforge.formats import kernel_dir, load_checkpoint
from lmforge.formats.gguf import GGUFFile
from lmforge.quant import cpu, kernels
from lmforge.quant.packed import from_gguf_blocks

TYPES = ("Q4_1", "Q5_1", "Q6_K", "Q8_0")  # one per code kind: q4, q5, q6, q8


def product_table(src, variants: list[str], rounds: int) -> None:
    name = "blk.0.ffn_down.weight"
    g = GGUFFile(src)
    dense = g.tensor(name).numpy()
    n, k = dense.shape
    weights = {}
    for qtype in TYPES:
        raw = g.tensors[name].data if g.tensors[name].tensor_type == GGMLQuantizationType[qtype] else \
            quantize_any(dense, qtype)
        weights[qtype] = from_gguf_blocks(raw.reshape(n, -1), qtype, n, k)
    libs = {v: kernels.build(v, kernel_dir()) for v in variants}
    best = {(q, r, v): float("inf") for q in TYPES for r in (1, 4, 16) for v in variants}
    threads, kernels.THREADS = kernels.THREADS, 1
    for _ in range(rounds):
        for (qtype, rows, variant) in best:
            x, pw, so = torch.randn(rows, k), weights[qtype], libs[variant]
            for _ in range(10):
                kernels.packed_matmul(x, pw, so)
            reps = 400 // rows
            t = time.thread_time()
            for _ in range(reps):
                kernels.packed_matmul(x, pw, so)
            best[(qtype, rows, variant)] = min(best[(qtype, rows, variant)], (time.thread_time() - t) / reps)
    kernels.THREADS = threads
    print(f"\none product, {name} [{n} x {k}], {'int16' if kernels.act16() else 'fp32'} activations, 1 thread (CPU time), us, best of {rounds}; "
          f"in brackets: speed-up over avx2\n")
    print("| type (kind) | rows | " + " | ".join(variants) + " |")
    print("|---|---|" + "---|" * len(variants))
    for qtype in TYPES:
        for rows in (1, 4, 16):
            base = best[(qtype, rows, "avx2")]
            cells = [f"{best[(qtype, rows, v)] * 1e6:.1f} ({base / best[(qtype, rows, v)]:.2f}x)" for v in variants]
            print(f"| {qtype} ({weights[qtype].kind}) | {rows} | " + " | ".join(cells) + " |")


def decode_table(src, variants: list[str], rounds: int, n_decode: int) -> None:
    from lmforge.engine import SamplingParams
    from lmforge.quant import fused

    ck = load_checkpoint(src, device="cpu", dtype=torch.float32)
    eng = plain_engine(ck.model, ck.tokenizer, max_batch=8)
    prompt = ck.tokenizer.encode("The history of the printing press begins")
    best = {(b, v): 0.0 for b in (1, 8) for v in variants}
    outputs = {}
    try:
        for _ in range(rounds):
            for (batch, variant) in best:
                os.environ["LMFORGE_KERNELS"] = variant
                kernels.lib.cache_clear()
                if (batch, variant) not in outputs:  # warm-up, and the tokens each variant decodes
                    outputs[batch, variant] = [s.output_ids for s in eng.generate(
                        [prompt] * batch, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))]
                best[(batch, variant)] = max(best[(batch, variant)], decode_rate(eng, prompt, batch, n_decode))
    finally:
        os.environ.pop("LMFORGE_KERNELS")
        kernels.lib.cache_clear()
    same = all(outputs[b, v] == outputs[b, "avx2"] for b, v in outputs)
    print(f"\nwhole-model greedy decode, SmolLM2-135M-Instruct Q4_1 ({'fused stack' if fused.plan(ck.model) else 'per operation'}), "
          f"{n_decode} tokens a sequence, {kernels.THREADS} threads, wall time, tok/s, best of {rounds}; tokens "
          f"identical across variants: {same}\n")
    print("| batch | " + " | ".join(variants) + " |")
    print("|---|" + "---|" * len(variants))
    for batch in (1, 8):
        base = best[(batch, "avx2")]
        print(f"| {batch} | " + " | ".join(f"{best[(batch, v)]:.1f} ({best[(batch, v)] / base:.2f}x)" for v in variants)
              + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--skip-decode", action="store_true")
    ap.add_argument("--fp32-activations", action="store_true", help="products with fp32 activations (LMFORGE_ACT16=0)")
    args = ap.parse_args()
    if args.fp32_activations:
        os.environ["LMFORGE_ACT16"] = "0"
    os.environ.setdefault("LMFORGE_CPU_BF16", "0")  # batch 8 on the packed path on every machine
    src = registry.resolve("smollm2-135m-instruct")
    variants = list(reversed(cpu.kernel_variants()))  # avx2 first
    kernels.load(kernel_dir())
    print(f"machine: {machine()}")
    print(f"CPU: {cpu.features().model}; features: {', '.join(cpu.features().names)}; variants: {', '.join(variants)}")
    product_table(src, variants, args.rounds)
    if not args.skip_decode:
        decode_table(src, variants, args.rounds, args.decode_tokens)


if __name__ == "__main__":
    main()
