"""`lmforge plot RUN_DIR`: the loss curves of a training run as a PNG (matplotlib, an optional extra)."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import LMForgeError


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    run = Path(run_dir)
    metrics = run / "metrics.jsonl"
    if not metrics.exists():
        raise LMForgeError(f"{run}: no metrics.jsonl (is it a `lmforge train` run directory?)")
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise LMForgeError("lmforge plot needs matplotlib: pip install 'lmforge[plot]'") from None
    records = []
    for n, line in enumerate(metrics.read_text(encoding="utf-8").splitlines(), 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            raise LMForgeError(f"{metrics}:{n}: invalid JSON") from None
    if not records:
        raise LMForgeError(f"{metrics} is empty: nothing to plot")
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    ax.plot([r["step"] for r in records], [r["loss"] for r in records], lw=0.8, alpha=0.7, label="train loss")
    val = [r for r in records if "val_loss" in r]
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="val loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(run.resolve().name)
    ax.grid(alpha=0.3)
    ax.legend()
    path = Path(out) if out else run / "loss.png"
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
