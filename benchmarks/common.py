"""What the benchmarks print about the machine they ran on."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    """CPU model and core count, plus torch's build, CPU capability and threads when torch is loaded."""
    import sys

    out = f"{cpu_name()}, {os.cpu_count()} cores"
    torch = sys.modules.get("torch")
    if torch is not None:
        out += (f", torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()}), "
                f"{torch.get_num_threads()} threads")
    return out
