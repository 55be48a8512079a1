"""What the benchmarks print about the machine they ran on."""

from __future__ import annotations

import os

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
