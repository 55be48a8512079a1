"""Run GGUF block-quantized matrices without dequantizing them: the CPU decode fast path.

Decoding one token reads every weight once, so on a CPU it is bound by memory bandwidth. A
`PackedLinear` keeps the file's 4-/8-bit codes next to the dense fp32 weight and, for the few rows
of a decode step, multiplies with the codes through a small AVX2 kernel (csrc/qgemv.c, compiled on
first use). Everything else (prefill, training, other devices) uses the dense weight, which is the
exact dequantization of the same codes, so both paths compute the same function.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

GROUP = 32
MAX_ROWS = 8  # the kernel's row limit; larger batches are compute-bound and go to the dense matmul
THREADS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@dataclass
class PackedWeight:
    """Codes of an [N, K] matrix in groups of 32 along K: w = code * scale + zero (per row and group).

    kind "q4": uint8 [N, K/2], GGML nibble order (byte j of a group: element j low, j + 16 high).
    kind "q8": int8 [N, K], zero unused.
    """

    kind: str
    codes: torch.Tensor
    scale: torch.Tensor  # float32 [N, K / 32]
    zero: torch.Tensor  # float32 [N, K / 32]

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes.shape[0], self.scale.shape[1] * GROUP

    def dequantize(self) -> torch.Tensor:
        # numpy: several times faster than torch's uint8 ops here, and loading does this per matrix.
        n, k = self.shape
        c = self.codes.numpy().reshape(n, k // GROUP, -1)
        q = np.concatenate([c & 0x0F, c >> 4], axis=-1) if self.kind == "q4" else c
        w = q.astype(np.float32) * self.scale.numpy()[..., None] + self.zero.numpy()[..., None]
        return torch.from_numpy(w.reshape(n, k))

    def map_rows(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> PackedWeight:
        """Apply a row permutation (e.g. undoing llama.cpp's q/k order) to every part."""
        return PackedWeight(self.kind, fn(self.codes), fn(self.scale), fn(self.zero))

    @staticmethod
    def cat(parts: list[PackedWeight]) -> PackedWeight | None:
        """Stack along rows (fusing q/k/v or gate/up); None when the parts are of different kinds."""
        if len({p.kind for p in parts}) != 1:
            return None
        return PackedWeight(parts[0].kind, *(torch.cat([getattr(p, a) for p in parts]) for a in ("codes", "scale", "zero")))


def from_gguf_blocks(raw: np.ndarray, qtype: str, n: int, k: int) -> PackedWeight | None:
    """Split raw Q4_0 / Q4_1 / Q8_0 blocks (uint8 [n, bytes]) into codes, scales, zeros; None for other types."""
    if k % GROUP:
        return None
    nb = k // GROUP
    size = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}.get(qtype)
    if size is None:
        return None
    b = np.asarray(raw).reshape(n, nb, size)
    d = b[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))
    if qtype == "Q4_0":  # w = d * (q - 8)
        return PackedWeight("q4", t(b[..., 2:].reshape(n, nb * 16)), t(d), t(-8 * d))
    if qtype == "Q4_1":  # w = d * q + m
        m = b[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        return PackedWeight("q4", t(b[..., 4:].reshape(n, nb * 16)), t(d), t(m))
    return PackedWeight("q8", t(b[..., 2:].reshape(n, nb * GROUP).view(np.int8)), t(d), t(np.zeros_like(d)))


# -- the kernel ---------------------------------------------------------------------------------------
_SOURCE = Path(__file__).with_name("csrc") / "qgemv.c"


@lru_cache(maxsize=1)
def kernel() -> ctypes.CDLL | None:
    """Compile (once, cached under $LMFORGE_HOME/kernels) and load the kernel; None where unavailable."""
    if os.environ.get("LMFORGE_KERNELS", "1") == "0" or sys.platform != "linux":
        return None
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return None
    from ..registry import home

    src = _SOURCE.read_bytes()
    out = home() / "kernels" / f"qgemv-{hashlib.sha256(src).hexdigest()[:16]}.so"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
        os.close(fd)
        cmd = [os.environ.get("CC", "cc"), "-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC",
               str(_SOURCE), "-o", tmp]
        try:
            subprocess.run(cmd, check=True, capture_output=True, timeout=120)
            os.replace(tmp, out)
        except (OSError, subprocess.SubprocessError):
            Path(tmp).unlink(missing_ok=True)
            return None  # no compiler: the dense path still works, just slower
    try:
        lib = ctypes.CDLL(str(out))
    except OSError:
        return None
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    i32 = ctypes.c_int
    lib.q4_gemv.argtypes = [p, p, p, p, p, i64, i64, i64, i32]
    lib.q8_gemv.argtypes = [p, p, p, p, i64, i64, i64, i32]
    lib.q4_gemv.restype = lib.q8_gemv.restype = None
    return lib


def packed_matmul(x: torch.Tensor, w: PackedWeight, lib: ctypes.CDLL) -> torch.Tensor:
    """x [..., K] @ w.T for at most MAX_ROWS rows, fp32 on CPU."""
    n, k = w.shape
    x2 = x.reshape(-1, k)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    m = x2.shape[0]
    y = torch.empty(m, n, dtype=torch.float32)
    if w.kind == "q4":
        lib.q4_gemv(x2.data_ptr(), w.codes.data_ptr(), w.scale.data_ptr(), w.zero.data_ptr(), y.data_ptr(), m, n, k, THREADS)
    else:
        lib.q8_gemv(x2.data_ptr(), w.codes.data_ptr(), w.scale.data_ptr(), y.data_ptr(), m, n, k, THREADS)
    return y.reshape(*x.shape[:-1], n)


def use_packed(x: torch.Tensor, w: PackedWeight | None) -> ctypes.CDLL | None:
    """The kernel, if this call can take the fast path: CPU fp32 inference on a few rows."""
    if w is None or x.device.type != "cpu" or x.dtype != torch.float32 or x.numel() > MAX_ROWS * w.shape[1]:
        return None
    if torch.is_grad_enabled() and x.requires_grad:
        return None
    return kernel()


class PackedLinear(nn.Linear):
    """nn.Linear (same parameters and state dict) that also holds the file's packed codes."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, packed: PackedWeight) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.weight = nn.Parameter(weight, requires_grad=weight.requires_grad)
        self.bias = nn.Parameter(bias) if bias is not None else None
        self.packed: PackedWeight | None = packed
        self._version = self.weight._version

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None and self.weight._version != self._version:
            self.packed = None  # the dense weight was changed (e.g. fine-tuned): the codes are stale
        lib = use_packed(x, self.packed)
        if lib is None:
            return F.linear(x, self.weight, self.bias)
        y = packed_matmul(x, self.packed, lib)
        return y + self.bias if self.bias is not None else y
