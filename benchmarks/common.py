"""What the benchmarks print about the machine they ran on, and how they run lmforge commands."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

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


def plain_engine(model: Any, tokenizer: Any, max_batch: int) -> Any:
    """An Engine that decodes token by token, speculation off: what decode speed figures measure
    (speculative decoding is measured in speculative.py)."""
    from lmforge.engine import Engine

    eng = Engine(model, tokenizer, max_batch=max_batch)
    eng.speculate(None)
    return eng


def decode_rate(eng: Any, prompt: list[int], batch: int, n_decode: int,
                clock: Callable[[], float] = time.perf_counter) -> float:
    """Greedy tokens per second of ``clock`` for ``batch`` copies of ``prompt``, ``n_decode`` tokens each
    (``ignore_eos``); the prefill step is not timed."""
    from lmforge.engine import SamplingParams

    seqs = [eng.add(prompt, SamplingParams(temperature=0, max_tokens=n_decode, ignore_eos=True)) for _ in range(batch)]
    eng.step()  # prefill, not timed
    t = clock()
    while not all(s.done for s in seqs):
        eng.step()
    return batch * (n_decode - 1) / (clock() - t)
