"""nanoGPT's own `train.py` as the peer of `benchmarks/train.py` on shakespeare-char: its data, its CPU
recipe (README: the "baby GPT" on a CPU), and its timings read from what it prints.

The checkout is only read: the run happens in a scratch directory holding the prepared data
(`data/shakespeare_char/{train,val}.bin`, `meta.pkl`, as nanoGPT's prepare.py writes them, made here
from a local input.txt instead of a download) and links to its configurator.py and config/.
"""

from __future__ import annotations

import os
import pickle
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# nanoGPT's README command for shakespeare-char on a CPU (max_iters and lr_decay_iters are set per run).
CPU_RECIPE = ["config/train_shakespeare_char.py", "--device=cpu", "--compile=False", "--eval_iters=20",
              "--log_interval=1", "--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4",
              "--n_embd=128", "--dropout=0.0"]
EVAL_INTERVAL = 250  # config/train_shakespeare_char.py's
EVAL_ITERS = 20
_ITER = re.compile(r"iter (\d+): loss ([\d.]+), time ([\d.]+)ms")
_EVAL = re.compile(r"step (\d+): train loss ([\d.]+), val loss ([\d.]+)")


def split_text(text: str) -> tuple[str, str]:
    """nanoGPT's shakespeare_char split: the first 90% of the characters train, the rest validate."""
    n = int(len(text) * 0.9)
    return text[:n], text[n:]


def prepare(text_path: Path, nanogpt: Path, workdir: Path) -> Path:
    """A working directory for nanoGPT's train.py: its data made from `text_path`, its config linked."""
    text = text_path.read_text(encoding="utf-8")
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    data = workdir / "data" / "shakespeare_char"
    data.mkdir(parents=True, exist_ok=True)
    for name, part in zip(("train", "val"), split_text(text)):
        np.array([stoi[c] for c in part], dtype=np.uint16).tofile(data / f"{name}.bin")
    with open(data / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": stoi}, f)
    for name in ("configurator.py", "config"):
        (workdir / name).symlink_to(nanogpt / name)
    return workdir


@dataclass
class PeerRun:
    """What nanoGPT printed, timed from its training start (the clock its per-iteration times start)."""

    command: list[str]
    evals: list[tuple[int, float, float]] = field(default_factory=list)  # (step, seconds at its print, val loss)
    iter_ms: list[float] = field(default_factory=list)  # each iteration's time as nanoGPT reports it
    seconds: float = 0.0  # to the end of the last iteration


def run(nanogpt: Path, workdir: Path, max_iters: int, threads: int) -> PeerRun:
    """Run nanoGPT's train.py in `workdir` with the CPU recipe and `threads` threads.

    Each printed line is stamped on arrival. nanoGPT's training clock starts just before its loop and
    each "iter N" line reports the time since the previous one, so the start is the arrival of an iter
    line less the sum of the reported times so far (the smallest such value: the least delayed line).
    """
    cmd = [sys.executable, str(nanogpt / "train.py"), *CPU_RECIPE, f"--max_iters={max_iters}",
           f"--lr_decay_iters={max_iters}"]
    env = os.environ | {"OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    out = PeerRun(cmd)
    evals: list[tuple[int, float, float]] = []
    starts, total_ms, last = [], 0.0, 0.0
    with subprocess.Popen(cmd, cwd=workdir, env=env, stdout=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            now = time.perf_counter()
            if m := _ITER.match(line):
                out.iter_ms.append(float(m.group(3)))
                total_ms += float(m.group(3))
                starts.append(now - total_ms / 1e3)
                last = now
            elif m := _EVAL.match(line):
                evals.append((int(m.group(1)), now, float(m.group(3))))
    if proc.returncode != 0 or not starts:
        raise SystemExit(f"nanoGPT's train.py failed (exit {proc.returncode}): {' '.join(cmd)}")
    start = min(starts)
    out.evals = [(step, t - start, val) for step, t, val in evals]
    out.seconds = last - start
    return out
