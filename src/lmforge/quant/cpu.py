"""What this CPU can do, detected at run time, and the compute path each kind of product takes on it.

The same code runs on AVX2-only machines (where bf16 matmuls are emulated and slower than fp32) and on
machines with AVX-512 BF16 or AMX (where oneDNN's bf16 matmuls run at 3-5x fp32). So nothing is fixed
at install time: `features()` reads the CPU's flags once per process, the C kernels are compiled per
feature set (kernels.py names the library by its flags, so a cache carried to another machine never
runs an instruction that machine lacks), and these choices follow:

- products of a few rows (a decode step of up to PACKED_ROWS_BF16 sequences where bf16 is fast, up to
  the kernels' 16 elsewhere) read a GGUF file's packed codes through the C kernels: bound by memory
  bandwidth, they gain from reading 4-bit codes;
- larger products (prefill, batched decode, scoring) are compute-bound: bf16 matmuls with fp32
  accumulation where bf16 is fast, fp32 elsewhere;
- training autocasts to bf16 where bf16 is fast ("auto" precision).

`LMFORGE_EXACT=1` is the exact mode: fp32 for every product and fp32 activations in the packed
kernels, on every machine. `LMFORGE_CPU_BF16=0|1` and `LMFORGE_ACT16=0|1` set one choice each;
`LMFORGE_KERNELS` names the kernels' instruction set (KERNEL_VARIANTS; all give the same bits) or turns
them off (0).
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from functools import lru_cache

import torch

from ..errors import LMForgeError

# bf16 products need matrices at least this wide: narrower ones gain little and would lose digits for nothing.
BF16_MIN_WIDTH = 256
# Products with more rows than this use dense bf16 matmuls where bf16 is fast. Measured on a Zen 5 core
# pair (SmolLM2, batched decode): a decode step of up to 12 rows is faster through the packed kernels, with
# the whole block stack in one C call (fused.py), than through bf16 matmuls and per-operation dispatch;
# from 16 rows bf16 wins, and by 2.5x at 32 (docs/benchmarks.md, "Run-time CPU dispatch").
PACKED_ROWS_BF16 = 12


@dataclass(frozen=True)
class CpuFeatures:
    model: str
    avx2: bool
    fma: bool
    avx512: bool  # F, BW and VL together: what the compiler's 512-bit code paths need
    avx512_vnni: bool
    avx_vnni: bool
    avx512_bf16: bool
    amx_bf16: bool
    amx_int8: bool

    @property
    def names(self) -> list[str]:
        """The present features, by their usual names."""
        names = {"avx2": "AVX2", "fma": "FMA", "avx512": "AVX-512", "avx512_vnni": "AVX-512 VNNI",
                 "avx_vnni": "AVX-VNNI", "avx512_bf16": "AVX-512 BF16", "amx_bf16": "AMX-BF16",
                 "amx_int8": "AMX-INT8"}
        return [label for attr, label in names.items() if getattr(self, attr)]


def _cpuinfo() -> tuple[str, set[str]]:
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return platform.processor() or platform.machine(), set()
    model, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and not model:
            model = value.strip()
        elif key.strip() == "flags" and not flags:
            flags = set(value.split())
    return model or platform.machine(), flags


@lru_cache(maxsize=1)
def features() -> CpuFeatures:
    """This machine's CPU features (Linux: /proc/cpuinfo; elsewhere what PyTorch reports)."""
    model, flags = _cpuinfo()
    if not flags:  # no /proc: PyTorch's own detection, which covers the same features
        cap = torch.backends.cpu.get_cpu_capability()
        avx512 = cap == "AVX512"
        return CpuFeatures(model, cap in ("AVX2", "AVX512"), cap in ("AVX2", "AVX512"), avx512,
                           avx512 and torch.cpu._is_vnni_supported(), False, torch.cpu._is_avx512_bf16_supported(),
                           torch.cpu._is_amx_tile_supported(), torch.cpu._is_amx_tile_supported())
    return CpuFeatures(
        model, "avx2" in flags, "fma" in flags, {"avx512f", "avx512bw", "avx512vl"} <= flags,
        "avx512_vnni" in flags, "avx_vnni" in flags, "avx512_bf16" in flags,
        {"amx_tile", "amx_bf16"} <= flags, {"amx_tile", "amx_int8"} <= flags)


def _switch(name: str, allowed: tuple[str, ...], default: str) -> str:
    value = os.environ.get(name, default)
    if value not in allowed:
        raise LMForgeError(f"{name} must be {', '.join(allowed[:-1])} or {allowed[-1]}, got {value!r}")
    return value


def exact() -> bool:
    """LMFORGE_EXACT=1: fp32 everywhere, no bf16 products, no int16 activations."""
    return _switch("LMFORGE_EXACT", ("0", "1"), "0") == "1"


def fast_bf16() -> bool:
    """Whether large CPU products run in bf16: where bf16 matmuls are fast (AVX-512 BF16 or AMX), unless
    the exact mode is on. LMFORGE_CPU_BF16=1 / 0 forces the choice (1 works on any CPU, slowly on most)."""
    choice = _switch("LMFORGE_CPU_BF16", ("auto", "0", "1"), "auto")
    if exact() or choice == "0":
        return False
    f = features()
    return choice == "1" or f.avx512_bf16 or f.amx_bf16


def packed_rows(max_rows: int) -> int:
    """How many rows a product may have and still read packed codes (``max_rows``: what the kernels take)."""
    return min(PACKED_ROWS_BF16, max_rows) if fast_bf16() else max_rows


_AVX2 = ("-mavx2", "-mfma", "-mf16c")
_AVX512 = (*_AVX2, "-mavx512f", "-mavx512bw", "-mavx512vl")
# The instruction sets the C kernels are built for, best first: each one's compiler flags and the features
# (CpuFeatures fields) it needs. All of them give bit-identical results; they differ only in speed.
KERNEL_VARIANTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "avx512-vnni": ((*_AVX512, "-mavx512vnni"), ("avx2", "fma", "avx512", "avx512_vnni")),
    "avx512": (_AVX512, ("avx2", "fma", "avx512")),
    "avx-vnni": ((*_AVX2, "-mavxvnni"), ("avx2", "fma", "avx_vnni")),
    "avx2": (_AVX2, ("avx2", "fma")),
}


def kernel_variants() -> list[str]:
    """The kernel variants this CPU can run, best first."""
    f = features()
    return [name for name, (_, needs) in KERNEL_VARIANTS.items() if all(getattr(f, n) for n in needs)]


def kernel_variant() -> str | None:
    """The variant the C kernels are built for: LMFORGE_KERNELS=1 (the default) the best this CPU can run,
    a variant's name that one (refused where the CPU lacks what it needs), 0 none (plain PyTorch). None
    also where the CPU has no AVX2 + FMA."""
    choice = _switch("LMFORGE_KERNELS", ("0", "1", *KERNEL_VARIANTS), "1")
    usable = kernel_variants()
    if choice not in ("0", "1") and choice not in usable:
        missing = [n for n in KERNEL_VARIANTS[choice][1] if not getattr(features(), n)]
        raise LMForgeError(f"LMFORGE_KERNELS={choice} needs CPU features this CPU lacks: {', '.join(missing)}")
    return None if choice == "0" or not usable else usable[0] if choice == "1" else choice


def compile_flags(variant: str | None = None) -> list[str]:
    """The C compiler's instruction-set flags for a kernel variant (default: `kernel_variant()`'s, or
    AVX2 + FMA's where that is none)."""
    return list(KERNEL_VARIANTS[variant or kernel_variant() or "avx2"][0])


def paths(max_rows: int, act16: bool, dot: str | None = None) -> dict[str, str]:
    """The compute path each kind of work takes on this machine, in words (for `lmforge info --system`);
    ``max_rows`` and ``act16``: what the packed kernels take and whether they round activations to int16;
    ``dot``: the instruction set of their int16 dot products (kernels.dot_path)."""
    dense = "bf16 matmul, fp32 accumulation (oneDNN)" if fast_bf16() else "fp32 matmul"
    rows = packed_rows(max_rows)
    packed = "packed GGUF codes, C kernels"
    if act16:
        packed += f" (int16 activations, {dot} dot products)" if dot else " (int16 activations)"
    return {
        f"decode, up to {rows} rows": packed,
        "prefill, batched decode, scoring": dense,
        "training, precision auto": "bf16 autocast" if fast_bf16() else "fp32",
        "exact mode, LMFORGE_EXACT=1": "on" if exact() else "off",
    }


def use_bf16(x: torch.Tensor, out_features: int, max_rows: int) -> bool:
    """Whether the product of ``x`` with an [out_features, in] matrix takes the bf16 path: CPU fp32 inference
    (nothing to differentiate, nothing being traced), both sides at least BF16_MIN_WIDTH, more rows than the
    packed products take, on a CPU where bf16 is fast."""
    return (x.dtype == torch.float32 and x.device.type == "cpu" and min(x.shape[-1], out_features) >= BF16_MIN_WIDTH
            and x.numel() > packed_rows(max_rows) * x.shape[-1]
            and not (x.requires_grad and torch.is_grad_enabled()) and not torch.compiler.is_compiling()
            and fast_bf16())


def bf16_linear(owner: torch.nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
                ) -> torch.Tensor:
    """x @ weight.T + bias with bf16 inputs and fp32 accumulation, returned in fp32.

    The bf16 copy of ``weight`` is made on first use and kept on ``owner`` (outside its parameters and
    state dict); a weight changed in place (fine-tuning) or moved gets a fresh copy."""
    key = (weight.data_ptr(), weight._version)
    cached = owner.__dict__.get("_bf16_weight")
    if cached is None or cached[0] != key:
        cached = owner.__dict__["_bf16_weight"] = (key, weight.detach().to(torch.bfloat16))
    y = torch.nn.functional.linear(x.to(torch.bfloat16), cached[1]).float()
    return y + bias if bias is not None else y
