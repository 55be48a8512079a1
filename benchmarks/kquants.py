"""Batch-1 decode from K-quant codes (Q4_K, Q5_K, Q6_K) against Q4_1, per byte of codes read.

SmolLM2-135M-Instruct's Q4_1 file is dequantized and re-quantized with numpy ports of ggml's reference
quantizers (`quantize_row_q4_K_ref`, `..._q5_K_ref`, `..._q6_K_ref`; gguf-py writes no K-quants). As
llama.cpp does, a matrix whose rows are not whole super-blocks of 256 (SmolLM2's 576-wide ones: all but
ffn_down) takes the fallback type (Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0). "Q4_K_M" follows
llama.cpp's mix: the output matrix and, in the layers `use_more_bits` picks, attn_v and ffn_down in Q6_K.

Two tables: one product per code kind on SmolLM2's ffn_down matrix (576 x 1536, the one K-quant shape of
this model), and whole-model batch-1 decode. "per byte" = tok/s x bytes of codes read per token, relative
to Q4_1: 1.0 means the kind decodes as fast as Q4_1 for the bytes it reads.

    OMP_NUM_THREADS=2 python benchmarks/kquants.py [--decode-tokens 32] [--rounds 5] [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from common import decode_rate, machine, plain_engine
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter, LlamaFileType
from gguf.quants import quantize

QK = 256
FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
FILE_TYPES = {"Q4_K": LlamaFileType.MOSTLY_Q4_K_S, "Q5_K": LlamaFileType.MOSTLY_Q5_K_S,
              "Q6_K": LlamaFileType.MOSTLY_Q6_K, "Q4_K_M": LlamaFileType.MOSTLY_Q4_K_M}


# -- ggml's reference K-quantizers, vectorized over sub-blocks ---------------------------------------------
def _f16(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float16)


def make_qkx2(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int
              ) -> tuple[np.ndarray, np.ndarray]:
    """ggml's make_qkx2_quants for rows x [R, n] with weights w: (scale, -min) per row."""
    mn, mx = np.minimum(x.min(1), 0), x.max(1)
    sum_w, sum_x = w.sum(1), (w * x).sum(1)
    flat = mx <= mn
    span = np.where(flat, 1, mx - mn)
    iscale = nmax / span
    scale = 1 / iscale
    L = np.clip(np.rint(iscale[:, None] * (x - mn[:, None])), 0, nmax)
    best = (w * (scale[:, None] * L + mn[:, None] - x) ** 2).sum(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        for step in range(nstep + 1):
            la = np.clip(np.rint(((rmin + rdelta * step + nmax) / span)[:, None] * (x - mn[:, None])), 0, nmax)
            sl, sl2, sxl = (w * la).sum(1), (w * la * la).sum(1), (w * la * x).sum(1)
            d = sum_w * sl2 - sl * sl
            this_scale, this_min = (sum_w * sxl - sum_x * sl) / d, (sl2 * sum_x - sl * sxl) / d
            pos = this_min > 0
            this_min, this_scale = np.where(pos, 0, this_min), np.where(pos, sxl / sl2, this_scale)
            err = (w * (this_scale[:, None] * la + this_min[:, None] - x) ** 2).sum(1)
            better = (d > 0) & (err < best)
            best, scale, mn = np.where(better, err, best), np.where(better, this_scale, scale), \
                np.where(better, this_min, mn)
    return np.where(flat, 0, scale).astype(np.float32), (-mn).astype(np.float32)


def _pack_k_scales(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """8 six-bit scales and mins [nb, 8] -> GGML's 12 bytes."""
    s = np.zeros((ls.shape[0], 12), np.uint8)
    s[:, 0:4], s[:, 4:8] = ls[:, :4], lm[:, :4]
    s[:, 8:12] = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    s[:, 0:4] |= (ls[:, 4:] >> 4) << 6
    s[:, 4:8] |= (lm[:, 4:] >> 4) << 6
    return s


def quantize_q45_k(x: np.ndarray, bits: int) -> np.ndarray:
    """quantize_row_q4_K_ref (bits 4) / quantize_row_q5_K_ref (bits 5): rows [R, K] -> blocks uint8."""
    rows = x.shape[0]
    xb = x.reshape(-1, 8, 32).astype(np.float32)
    nb = xb.shape[0]
    nmax = (1 << bits) - 1
    weights = np.sqrt((xb ** 2).mean(-1, keepdims=True)) + np.abs(xb)
    args = (-1.0, 0.1, 20) if bits == 4 else (-0.5, 0.1, 15)
    scales, mins = (a.reshape(nb, 8) for a in make_qkx2(xb.reshape(-1, 32), weights.reshape(-1, 32), nmax, *args))
    max_scale, max_min = scales.max(1), mins.max(1)
    inv_s = np.where(max_scale > 0, 63 / np.where(max_scale > 0, max_scale, 1), 0)
    inv_m = np.where(max_min > 0, 63 / np.where(max_min > 0, max_min, 1), 0)
    ls = np.minimum(np.rint(inv_s[:, None] * scales), 63).astype(np.uint8)
    lm = np.minimum(np.rint(inv_m[:, None] * mins), 63).astype(np.uint8)
    d, dmin = _f16(max_scale / 63), _f16(max_min / 63)
    dd = d.astype(np.float32)[:, None] * ls
    dm = dmin.astype(np.float32)[:, None] * lm
    with np.errstate(divide="ignore", invalid="ignore"):
        L = np.where(dd[..., None] > 0, np.clip(np.rint((xb + dm[..., None]) / dd[..., None]), 0, nmax), 0)
    L = L.astype(np.uint8).reshape(nb, 4, 2, 32)  # chunk of 64: sub-blocks 2c (low nibbles), 2c + 1 (high)
    qs = ((L[:, :, 0] & 0xF) | ((L[:, :, 1] & 0xF) << 4)).reshape(nb, 128)
    parts = [d.view(np.uint8).reshape(nb, 2), dmin.view(np.uint8).reshape(nb, 2), _pack_k_scales(ls, lm)]
    if bits == 5:  # qh[l]: bit s = the fifth bit of sub-block s's element l
        hi = (L.reshape(nb, 8, 32) >> 4) & 1
        parts.append((hi << np.arange(8, dtype=np.uint8)[:, None]).sum(1).astype(np.uint8))
    return np.concatenate([*parts, qs], 1).reshape(rows, -1)


def make_qx(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """ggml's make_qx_quants(n, nmax, x, L, rmse_type=1, NULL) for rows x [R, n]: (scale, L + nmax)."""
    amax_i = np.abs(x).argmax(1)
    mx = x[np.arange(x.shape[0]), amax_i]
    zero = np.abs(mx) < 1e-15
    mx = np.where(zero, 1, mx)
    w = x * x

    def fit(iscale: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        q = np.clip(np.rint(iscale[:, None] * x), -nmax, nmax - 1)
        return q, (w * x * q).sum(1), (w * q * q).sum(1)

    L, sumlx, suml2 = fit(-nmax / mx)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(suml2 > 0, sumlx / suml2, 0)
        best = scale * sumlx
        for step in [i for i in range(-9, 10) if i]:
            q, slx, sl2 = fit(-(nmax + 0.1 * step) / mx)
            better = (sl2 > 0) & (slx * slx > best * sl2)
            L = np.where(better[:, None], q, L)
            scale = np.where(better, slx / sl2, scale)
            best = np.where(better, scale * slx, best)
    return np.where(zero, 0, scale).astype(np.float32), np.where(zero[:, None], 0, L + nmax)


def quantize_q6_k(x: np.ndarray) -> np.ndarray:
    """quantize_row_q6_K_ref: rows [R, K] -> blocks uint8."""
    rows = x.shape[0]
    xb = x.reshape(-1, 16, 16).astype(np.float32)
    nb = xb.shape[0]
    scales, L = make_qx(xb.reshape(-1, 16), 32)
    scales, L = scales.reshape(nb, 16), L.reshape(nb, 16, 16)
    pick = np.abs(scales).argmax(1)
    max_scale = scales[np.arange(nb), pick]
    empty = np.abs(max_scale) < 1e-15
    iscale = np.where(empty, 0, -128 / np.where(empty, 1, max_scale))
    d = _f16(np.where(empty, 0, 1 / np.where(iscale == 0, 1, iscale)))
    sc = np.minimum(127, np.rint(iscale[:, None] * scales)).astype(np.int8)
    dq = d.astype(np.float32)[:, None] * sc
    with np.errstate(divide="ignore", invalid="ignore"):
        requant = np.clip(np.rint(xb / dq[..., None]), -32, 31) + 32
    L = np.where(dq[..., None] != 0, requant, L)
    L = np.where(empty[:, None, None], 0, L).astype(np.uint8).reshape(nb, 2, 4, 32)  # halves of 128, quarters
    ql = np.concatenate([(L[:, :, 0] & 0xF) | ((L[:, :, 2] & 0xF) << 4),
                         (L[:, :, 1] & 0xF) | ((L[:, :, 3] & 0xF) << 4)], -1).reshape(nb, 128)
    qh = ((L[:, :, 0] >> 4) | ((L[:, :, 1] >> 4) << 2) | ((L[:, :, 2] >> 4) << 4) | ((L[:, :, 3] >> 4) << 6))
    parts = [ql, qh.reshape(nb, 64), sc.view(np.uint8), d.view(np.uint8).reshape(nb, 2)]
    return np.concatenate(parts, 1).reshape(rows, -1)


def quantize_any(x: np.ndarray, qtype: str) -> np.ndarray:
    if qtype in ("Q4_K", "Q5_K"):
        return np.concatenate([quantize_q45_k(c, 4 if qtype == "Q4_K" else 5) for c in np.array_split(x, 8)])
    if qtype == "Q6_K":
        return np.concatenate([quantize_q6_k(c) for c in np.array_split(x, 8)])
    return quantize(x, GGMLQuantizationType[qtype])


# -- files -----------------------------------------------------------------------------------------------
def use_more_bits(i: int, n: int) -> bool:  # llama.cpp's choice of the layers that keep more bits
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def type_for(name: str, cols: int, target: str, n_layers: int) -> str:
    qtype = target
    if target == "Q4_K_M":
        qtype = "Q4_K"
        layer = int(name.split(".")[1]) if name.startswith("blk.") else -1
        if name in ("token_embd.weight", "output.weight") or (
                name.endswith(("attn_v.weight", "ffn_down.weight")) and use_more_bits(layer, n_layers)):
            qtype = "Q6_K"
    return qtype if cols % QK == 0 or qtype not in FALLBACK else FALLBACK[qtype]


def write_variant(src: Path, out: Path, target: str, cache: dict) -> dict[str, int]:
    """Re-quantize every matrix of ``src`` (a GGUF) for ``target``; returns the tensor-type counts."""
    from lmforge.formats.gguf import GGUFFile

    reader, g = GGUFReader(src), GGUFFile(src)
    n_layers = int(g.meta[f"{g.arch}.block_count"])
    w = GGUFWriter(str(out) + ".tmp", g.arch)
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name in ("general.architecture", "general.file_type"):
            continue
        sub = field.types[-1] if field.types[0] == GGUFValueType.ARRAY else None
        w.add_key_value(field.name, field.contents(), field.types[0], sub)
    w.add_file_type(FILE_TYPES[target])
    counts: dict[str, int] = {}
    for name, t in g.tensors.items():
        if len(t.shape) != 2:
            w.add_tensor(name, np.asarray(t.data).view(np.float32).reshape(-1))
            counts["F32"] = counts.get("F32", 0) + 1
            continue
        qtype = type_for(name, int(t.shape[0]), target, n_layers)
        if (name, qtype) not in cache:
            cache[(name, qtype)] = quantize_any(g.tensor(name).numpy(), qtype)
        w.add_tensor(name, cache[(name, qtype)], raw_dtype=GGMLQuantizationType[qtype])
        counts[qtype] = counts.get(qtype, 0) + 1
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    Path(str(out) + ".tmp").replace(out)
    return counts


# -- measurements ----------------------------------------------------------------------------------------
def bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes of weights a decode step reads: packed codes where a product has them, fp32 elsewhere."""
    from lmforge.quant import PackedLinear

    total = 0
    for m in model.modules():
        if isinstance(m, PackedLinear) and m.packed is not None:
            total += m.packed.nbytes
        elif isinstance(m, torch.nn.Linear):
            total += m.weight.numel() * m.weight.element_size()
    head = getattr(model, "head_packed", None)
    return total + (head.nbytes if head is not None else model.tok_emb.weight.numel() * 4)


class Decoder:
    """One loaded file, ready to time batch-1 greedy decoding."""

    def __init__(self, path: Path) -> None:
        from lmforge.engine import SamplingParams
        from lmforge.formats import load_checkpoint
        from lmforge.quant import fused

        self.ck = load_checkpoint(path, device="cpu", dtype=torch.float32)
        self.eng = plain_engine(self.ck.model, self.ck.tokenizer, max_batch=1)
        self.prompt = self.ck.tokenizer.encode("The history of the printing press begins")
        self.eng.generate([self.prompt], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))  # warm-up
        self.path = "fused stack" if fused.plan(self.ck.model) is not None else "per operation"
        self.nbytes = bytes_per_token(self.ck.model)

    def tok_s(self, n_decode: int) -> tuple[float, float]:
        """Tokens per second of wall time (all threads), and per second of CPU time on one thread (the
        kernels and PyTorch both held to the calling thread), which time slices lost to other processes
        on a shared machine do not inflate."""
        from lmforge.quant import kernels

        out = []
        threads, torch_threads = kernels.THREADS, torch.get_num_threads()
        for one in (False, True):
            if one:
                kernels.THREADS = 1
                torch.set_num_threads(1)
            out.append(decode_rate(self.eng, self.prompt, 1, n_decode, time.thread_time if one else time.perf_counter))
        kernels.THREADS = threads
        torch.set_num_threads(torch_threads)
        return out[0], out[1]


def kernel_table(src: Path, cache: dict, rounds: int) -> None:
    from lmforge.formats import kernel_dir
    from lmforge.formats.gguf import GGUFFile
    from lmforge.quant import kernels
    from lmforge.quant.packed import from_gguf_blocks

    kernels.load(kernel_dir())
    name = "blk.0.ffn_down.weight"
    dense = GGUFFile(src).tensor(name).numpy()
    n, k = dense.shape
    x = torch.randn(1, k)
    weights = {}
    for qtype in ("Q4_1", "Q4_K", "Q5_K", "Q6_K", "Q5_0", "Q5_1", "Q8_0"):
        if (name, qtype) not in cache:
            cache[(name, qtype)] = quantize_any(dense, qtype)
        weights[qtype] = from_gguf_blocks(cache[(name, qtype)], qtype, n, k)
    best = dict.fromkeys(weights, float("inf"))
    threads, kernels.THREADS = kernels.THREADS, 1  # one thread, timed by its own CPU time: what the kernel
    for _ in range(rounds):  # costs, whatever else a shared machine runs; kinds interleaved all the same
        for qtype, pw in weights.items():
            for _ in range(20):
                kernels.packed_matmul(x, pw)
            t = time.thread_time()
            for _ in range(200):
                kernels.packed_matmul(x, pw)
            best[qtype] = min(best[qtype], (time.thread_time() - t) / 200)
    kernels.THREADS = threads
    print(f"\none product, 1 row, {name} [{n} x {k}], 1 thread (CPU time), int16 activations, best of "
          f"{rounds}:\n")
    print("| type | kind | bytes read | us | GB/s | per byte vs Q4_1 |")
    print("|---|---|---|---|---|---|")
    base = weights["Q4_1"].nbytes / best["Q4_1"]
    for qtype, pw in weights.items():
        gbs = pw.nbytes / best[qtype]
        print(f"| {qtype} | {pw.kind} | {pw.nbytes / 1e6:.2f} MB | {best[qtype] * 1e6:.1f} | {gbs / 1e9:.1f} | "
              f"{gbs / base:.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds; each figure is the best")
    ap.add_argument("--out-dir", type=Path, help="where the re-quantized files go (default: $LMFORGE_HOME/bench)")
    args = ap.parse_args()
    from lmforge import registry
    from lmforge.formats.gguf import GGUFFile
    from lmforge.quant import cpu, kernels

    src = Path(registry.resolve("smollm2-135m-instruct"))
    out_dir = args.out_dir or registry.home() / "bench"
    out_dir.mkdir(parents=True, exist_ok=True)
    f = cpu.features()
    print(f"machine: {machine()}")
    print(f"CPU: {f.model}; features: {', '.join(f.names)}")
    cache: dict = {}
    files = {"Q4_1": (src, {})}
    for target in ("Q4_K", "Q5_K", "Q6_K", "Q4_K_M"):
        out = out_dir / f"{src.stem.rsplit('.', 1)[0]}.{target}.gguf"
        t = time.perf_counter()
        counts = write_variant(src, out, target, cache) if not out.exists() else {}
        if counts:
            print(f"wrote {out.name} in {time.perf_counter() - t:.0f} s: {counts}")
        files[target] = (out, counts)
    kernel_table(src, cache, args.rounds)
    decoders = {target: Decoder(path) for target, (path, _) in files.items()}
    best = {target: (0.0, 0.0) for target in decoders}
    for _ in range(args.rounds):  # files interleaved, as above
        for target, dec in decoders.items():
            best[target] = tuple(max(a, b) for a, b in zip(best[target], dec.tok_s(args.decode_tokens)))
    print(f"\nbatch-1 decode, {args.decode_tokens} greedy tokens, best of {args.rounds}, SmolLM2-135M-Instruct; "
          f"tok/s: {kernels.THREADS} threads, wall time; 1 thread: tokens per second of that thread's CPU time:\n")
    print("| file | tensor types | decode path | tok/s | tok/s, 1 thread | MB read / token | per byte vs Q4_1 | "
          "per byte, 1 thread |")
    print("|---|---|---|---|---|---|---|---|")
    base = [b * decoders["Q4_1"].nbytes for b in best["Q4_1"]]
    for target, dec in decoders.items():
        types: dict[str, int] = {}
        for t in GGUFFile(files[target][0]).tensors.values():
            if len(t.shape) == 2:
                types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
        desc = ", ".join(f"{v} {k}" for k, v in sorted(types.items(), key=lambda kv: -kv[1]))
        (wall, cpu_rate), mb = best[target], dec.nbytes / 1e6
        print(f"| {target} | {desc} | {dec.path} | {wall:.1f} | {cpu_rate:.1f} | {mb:.1f} | "
              f"{wall * dec.nbytes / base[0]:.2f} | {cpu_rate * dec.nbytes / base[1]:.2f} |")


if __name__ == "__main__":
    main()
