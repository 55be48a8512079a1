"""The README's Python example runs as written, and loading stays within 2x the loaded model's memory."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def _env(smollm2_path: Path) -> dict[str, str]:
    # smollm2_path lives at $LMFORGE_HOME/models/<name>/<file>: point the child at the same cache.
    return {**os.environ, "LMFORGE_HOME": str(smollm2_path.parents[2])}


def test_readme_python_example_runs(smollm2_path: Path) -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert blocks, "README has no python example"
    out = subprocess.run([sys.executable, "-c", blocks[0]], capture_output=True, text=True, timeout=600,
                         env=_env(smollm2_path))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Paris" in out.stdout
    assert "Traceback" not in out.stderr


PROBE = """
import json, sys
import lmforge
from lmforge.formats import load_checkpoint
from lmforge.quant import PackedLinear

def rss():
    return int(open('/proc/self/statm').read().split()[1]) * 4096
before = rss()
m = load_checkpoint(sys.argv[1]).model
size = sum(p.numel() * p.element_size() for p in m.parameters())
packs = [mod.packed for mod in m.modules() if isinstance(mod, PackedLinear)] + [m.head_packed]
size += sum(t.numel() * t.element_size() for p in packs if p is not None for t in (p.codes, p.scale, p.zero))
# VmHWM, not ru_maxrss: Linux keeps ru_maxrss across exec, so a child forked from a large process (the
# test runner, after it loaded a model) would report the parent's peak as its own.
peak = next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmHWM:'))
print(json.dumps({"before": before, "peak": peak, "model": size}))
"""


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs Linux /proc")
def test_loading_peak_memory_under_twice_the_model(smollm2_path: Path) -> None:
    out = subprocess.run([sys.executable, "-c", PROBE, str(smollm2_path)], capture_output=True, text=True,
                         timeout=600, env=_env(smollm2_path))
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    growth = r["peak"] - r["before"]
    assert r["model"] > 400 * 2**20  # the fp32 weights of a 135M model, so the probe measured the real thing
    assert growth < 2 * r["model"], f"loading grew RSS by {growth / 2**20:.0f} MB for a {r['model'] / 2**20:.0f} MB model"
