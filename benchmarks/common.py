"""What the benchmarks print about the machine they ran on, and how they run lmforge commands."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time

from lmforge.quant import cpu


def machine() -> str:
    """CPU model, core count and features, the dense-product path lmforge takes on it, plus torch's build,
    CPU capability and threads when torch is loaded."""
    import sys

    f = cpu.features()
    out = (f"{f.model}, {os.cpu_count()} cores [{', '.join(f.names) or 'no AVX2'}; "
           f"lmforge large products in {'bf16' if cpu.fast_bf16() else 'fp32'}]")
    torch = sys.modules.get("torch")
    if torch is not None:
        out += (f", torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()}), "
                f"{torch.get_num_threads()} threads")
    return out


def run_lmforge(args: list[str], threads: int | None = None) -> tuple[float, str]:
    """Run an lmforge command in a fresh process (with `threads` torch threads when given), echoing it;
    returns (wall seconds, stdout)."""
    env = os.environ | ({"OMP_NUM_THREADS": str(threads)} if threads else {})
    print(f"$ {f'OMP_NUM_THREADS={threads} ' if threads else ''}{shlex.join(['lmforge', *args])}", flush=True)
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "lmforge", *args], check=True, stdout=subprocess.PIPE, text=True,
                         env=env).stdout
    return time.perf_counter() - t, out
