"""Small C kernels for CPU decoding (csrc/kernels.c), compiled on first use and called through ctypes.

At one token per step, a decode step is a few hundred tiny operations; PyTorch's per-op dispatch
costs more than their arithmetic, and its weight-only int4/int8 kernels are slow on AVX2-only CPUs.
These kernels cover the hot spots: products with GGUF-packed weights, RMSNorm and SwiGLU. Where no
C compiler or no AVX2 is available, `lib()` is None and every caller uses plain PyTorch instead.
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import os
import subprocess
import sys
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import LMForgeError
from . import cpu

if TYPE_CHECKING:
    from .packed import PackedWeight

GROUP = 32  # weights per quantization group (GGUF's block size)
MAX_ROWS = 16  # rows the packed products take; larger batches are compute-bound and go to dense matmuls
THREADS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
_SOURCE = Path(__file__).with_name("csrc") / "kernels.c"  # one translation unit: it includes the headers beside it
_build_dir: Path | None = None  # where `lib` compiles and caches the library; set by `use_build_dir`


def act16() -> bool:
    """Whether packed products round each group of 32 activations to int16 (scale = group max / 32767), so
    integer multiply-adds do the work: ~1.2x faster decoding. That is finer than the bf16 activations of
    GPU inference (logits move by ~1e-2 of ~20); LMFORGE_ACT16=0 keeps exact fp32 activations (~1e-5)."""
    return os.environ.get("LMFORGE_ACT16", "1") == "1" and not cpu.exact()


def use_build_dir(directory: Path) -> None:
    """Build and cache the library under `directory` (once one has loaded, it stays)."""
    global _build_dir
    if lib.cache_info().currsize and lib() is not None:
        return
    _build_dir = directory
    lib.cache_clear()


def load(directory: Path) -> ctypes.CDLL | None:
    """`use_build_dir(directory)`, then the library (None where unavailable)."""
    use_build_dir(directory)
    return lib()


@lru_cache(maxsize=1)
def lib() -> ctypes.CDLL | None:
    """Compile (once, cached in the build directory) and load the kernels for `cpu.kernel_variant()`; None
    where unavailable, or before `use_build_dir` named a directory."""
    if _build_dir is None or sys.platform != "linux":
        return None
    variant = cpu.kernel_variant()
    if variant is None:
        return None
    if os.environ.get("LMFORGE_KERNELS", "1") != "1":  # a variant asked for by name: that one or an error
        so = build(variant, _build_dir)
        if so is None:
            raise LMForgeError(f"LMFORGE_KERNELS={variant}: the C kernels for it could not be compiled")
        return so
    usable = cpu.kernel_variants()
    for v in usable[usable.index(variant):]:  # an older compiler may not know every flag: the next best
        so = build(v, _build_dir)
        if so is not None:
            return so
    return None


def build(variant: str, directory: Path) -> ctypes.CDLL | None:
    """The kernels for one instruction-set variant (cpu.KERNEL_VARIANTS), compiled once into ``directory``
    and loaded; None where the compiler cannot build them. Refused for a variant this CPU cannot run."""
    if variant not in cpu.kernel_variants():
        raise LMForgeError(f"kernel variant {variant!r} needs CPU features this CPU lacks "
                           f"(it can run: {', '.join(cpu.kernel_variants()) or 'none'})")
    # One library per source and instruction set: a cache directory shared with (or copied from) another
    # machine holds that machine's build under another name, never one this CPU cannot run.
    flags = cpu.compile_flags(variant)
    out = directory / library_name(flags)
    if not (out.exists() or _compile(flags, out)):
        return None
    try:
        so = ctypes.CDLL(str(out))
    except OSError:
        return None
    p, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    signatures = {
        "q4_gemv": [p, p, p, p, p, i64, i64, i64, i32], "q4_gemv16": [p, p, p, p, p, i64, i64, i64, i32],
        "q8_gemv": [p, p, p, p, i64, i64, i64, i32], "q8_gemv16": [p, p, p, p, i64, i64, i64, i32],
        "rms_norm": [p, p, p, i64, i64, f32], "swiglu": [p, p, i64, i64],
        "rope_inplace": [p, p, p, i64, i64, i64, i64],
        "attn_decode_rows": [p, p, p, p, p, p, i64, i64, i64, i64, i64, i64, f32, i32],
        "decode_stack": [p, i64, p, i64, p, p, p, p, p, p, i64, i64, i64, i64, i64, i64, i64, f32, f32, i32],
    }
    for name, args in signatures.items():
        fn = getattr(so, name)
        fn.argtypes, fn.restype = args, None
    so.dot_path.argtypes, so.dot_path.restype = [], ctypes.c_char_p
    return so


def library_name(flags: list[str]) -> str:
    """The library's file name for compiler ``flags``: a hash of the flags and every source file (so an edit
    to any of them, headers included, builds a new library)."""
    sources = [_SOURCE, *sorted(_SOURCE.parent.glob("*.h"))]
    key = hashlib.sha256(b"".join(p.read_bytes() for p in sources) + " ".join(flags).encode()).hexdigest()[:16]
    return f"kernels-{key}.so"


def dot_path(so: ctypes.CDLL | None = None) -> str | None:
    """The instruction set of the int16 dot products in ``so`` (default: `lib()`), e.g. "AVX-512 VNNI";
    None where no library is loaded."""
    so = so if so is not None else lib()
    return so.dot_path().decode() if so is not None else None


def _compile(flags: list[str], out: Path) -> bool:
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    cmd = [os.environ.get("CC", "cc"), "-O3", *flags, "-fopenmp", "-shared", "-fPIC", str(_SOURCE), "-o", tmp, "-lm"]
    try:
        subprocess.run(cmd, check=True, capture_output=True, timeout=120)
        os.replace(tmp, out)  # atomic: concurrent first uses never load a half-written library
        return True
    except (OSError, subprocess.SubprocessError):
        Path(tmp).unlink(missing_ok=True)
        return False


def fast_path(x: torch.Tensor) -> bool:
    """Whether `x` may go through the C kernels: fp32 on CPU, not being differentiated, not being traced
    by torch.compile (which cannot see through raw pointers, and fuses these ops itself)."""
    return (x.dtype == torch.float32 and x.device.type == "cpu" and not (x.requires_grad and torch.is_grad_enabled())
            and not torch.compiler.is_compiling() and lib() is not None)


# PackedWeight kinds as the C side numbers them (csrc/kernels.c KIND_*).
KINDS = {"q8": 0, "q4": 1, "q5": 2, "q6": 3}
_ZERO_KINDS = ("q4", "q5")  # kinds whose products take zero points


def _gemv(so: ctypes.CDLL, kind: str) -> Any:
    """The C product for ``kind`` (int16 or fp32 activations, as `act16` says), its argument types set."""
    fn = getattr(so, f"{kind}_gemv16" if act16() else f"{kind}_gemv")
    if fn.argtypes is None:
        p, i64 = ctypes.c_void_p, ctypes.c_int64
        fn.argtypes = [p] * (5 if kind in _ZERO_KINDS else 4) + [i64, i64, i64, ctypes.c_int]
        fn.restype = None
    return fn


def packed_matmul(x: torch.Tensor, w: PackedWeight, so: ctypes.CDLL | None = None) -> torch.Tensor:
    """x [..., K] @ w.T for at most MAX_ROWS rows, by the kernels of ``so`` (default: `lib()`)."""
    so = so if so is not None else lib()
    if w.rest is not None:  # segments of different kinds: each its own product, the outputs side by side
        return torch.cat([packed_matmul(x, dataclasses.replace(w, rest=None), so), packed_matmul(x, w.rest, so)], -1)
    n, k = w.shape
    if not x.is_contiguous():
        x = x.contiguous()
    m = x.numel() // k
    y = torch.empty(*x.shape[:-1], n, dtype=torch.float32)
    zero = (w.zero.data_ptr(),) if w.kind in _ZERO_KINDS else ()
    _gemv(so, w.kind)(x.data_ptr(), w.codes.data_ptr(), w.scale.data_ptr(), *zero, y.data_ptr(), m, n, k, THREADS)
    return y


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.contiguous()
    y = torch.empty_like(x)
    dim = x.shape[-1]
    lib().rms_norm(x.data_ptr(), weight.data_ptr(), y.data_ptr(), x.numel() // dim, dim, eps)
    return y


def swiglu(h: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for h = [..., gate | up]."""
    h = h.contiguous()
    ffn = h.shape[-1] // 2
    y = torch.empty(*h.shape[:-1], ffn, dtype=h.dtype)
    lib().swiglu(h.data_ptr(), y.data_ptr(), h.numel() // (2 * ffn), ffn)
    return y


def rope_(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_rot: int, head_dim: int) -> None:
    """Rotate the first n_rot heads of a fresh, contiguous qkv projection [..., heads * hd] in place."""
    rows = cos.numel() // head_dim
    lib().rope_inplace(qkv.data_ptr(), cos.contiguous().data_ptr(), sin.contiguous().data_ptr(), rows,
                       qkv.shape[-1] // head_dim, n_rot, head_dim)


def attn_decode_rows(proj: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                     pos: torch.Tensor, n_heads: int, n_kv_heads: int, head_dim: int, window: int = 0
                     ) -> torch.Tensor:
    """One decode step's attention for b rows: proj [b, 1, (nh + 2 nkv) * hd] (q, k, v; rope applied),
    k_cache / v_cache one layer [slots, nkv, cap, hd]. Stores each row's key/value at ``pos`` of its slot
    and attends to that slot's positions 0..pos (the last ``window`` of them if > 0); returns [b, 1, nh * hd]."""
    b = proj.shape[0]
    proj = proj.contiguous()
    out = torch.empty(b, 1, n_heads * head_dim, dtype=torch.float32)
    lib().attn_decode_rows(proj.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), slots.data_ptr(), pos.data_ptr(),
                           out.data_ptr(), b, n_heads, n_kv_heads, k_cache.shape[2], head_dim, window, head_dim ** -0.5,
                           THREADS)
    return out
