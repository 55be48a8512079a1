"""Run directories (results.json, report.md, per-task samples), the report card, and run comparison."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..errors import LMForgeError
from ..fsutil import atomic_dir, read_json

MARKER = "results.json"


def _fmt(v: float | None, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.{digits}f}"


def report_card(doc: dict[str, Any]) -> str:
    """The markdown report card: one table, one row per (task, metric)."""
    lines = ["| model | task | metric | value | stderr | n | shots |", "|---|---|---|---:|---:|---:|---:|"]
    for r in doc["results"]:
        task = f"{r['task']} ({r['strategy']})" if r.get("strategy") else r["task"]  # a reasoning strategy's run
        lines.append(f"| {doc['model']} | {task} | {r['metric']} | {_fmt(r['value'])} | {_fmt(r['stderr'])} "
                     f"| {r['n']} | {r['shots']} |")
    # sacrebleu's signature (tokenizer, smoothing, version ...) makes a BLEU or chrF figure reproducible
    sigs = [f"{r['task']} {r['metric']}: {r['signature']}" for r in doc["results"] if r.get("signature")]
    return "\n".join(lines) + "\n" + "".join(f"\nsignature {x}" for x in sigs) + ("\n" if sigs else "")


def write_run(out: str | Path, doc: dict[str, Any]) -> Path:
    """Write results.json, report.md and samples_<task>.jsonl into ``out``, atomically."""
    samples = doc.get("samples", {})
    body = _clean({k: v for k, v in doc.items() if k != "samples"})
    with atomic_dir(out, marker=MARKER) as tmp:
        (tmp / MARKER).write_text(json.dumps(body, indent=2, allow_nan=False) + "\n", encoding="utf-8")
        (tmp / "report.md").write_text(report_card(doc), encoding="utf-8")
        for task, rows in samples.items():
            with open(tmp / f"samples_{task}.jsonl", "w", encoding="utf-8") as f:
                for r in rows:
                    f.write(json.dumps(r) + "\n")
    return Path(out)


def _clean(doc: dict[str, Any]) -> dict[str, Any]:
    """NaN stderrs (n < 2) become null so the file is strict JSON."""
    doc["results"] = [dict(r) for r in doc["results"]]
    for r in doc["results"]:
        if isinstance(r.get("stderr"), float) and math.isnan(r["stderr"]):
            r["stderr"] = None
    return doc


def load_run(path: str | Path) -> dict[str, Any]:
    p = Path(path).expanduser()
    f = p / MARKER if p.is_dir() else p
    if not f.is_file():
        raise LMForgeError(f"{path}: not an eval run (no {MARKER})")
    doc = read_json(f)
    if not isinstance(doc, dict) or not isinstance(doc.get("results"), list):
        raise LMForgeError(f"{f}: not an eval results file (no results list)")
    doc["samples"] = {}
    for sf in sorted(f.parent.glob("samples_*.jsonl")):  # per-item results allow a paired comparison
        try:
            doc["samples"][sf.stem[len("samples_"):]] = [json.loads(x) for x in sf.read_text(encoding="utf-8").splitlines()]
        except json.JSONDecodeError:
            continue
    return doc


def _paired(a: dict[str, Any], b: dict[str, Any], task: str, metric: str) -> float | None:
    """stderr of the mean per-item difference when both runs scored the same items (more sensitive than
    treating the runs as independent samples); None when per-item results are missing or differ in items."""
    sa, sb = a.get("samples", {}).get(task), b.get("samples", {}).get(task)
    if not sa or not sb or len(sa) != len(sb) or len(sa) < 2:
        return None
    if any(x.get("index") != y.get("index") or metric not in x or metric not in y for x, y in zip(sa, sb)):
        return None
    d = [float(y[metric]) - float(x[metric]) for x, y in zip(sa, sb)]
    mean = sum(d) / len(d)
    return math.sqrt(sum((v - mean) ** 2 for v in d) / (len(d) - 1) / len(d))


def compare(a: dict[str, Any], b: dict[str, Any]) -> tuple[list[dict[str, Any]], str]:
    """Deltas B - A for every (task, metric) both runs have, with a z-score: from the per-item differences
    when both runs hold the same items' samples (paired), else from the two stderrs (independent);
    |z| >= 1.96 is marked significant at 95%."""
    ra = {(r["task"], r["metric"]): r for r in a["results"]}
    rows = []
    for r in b["results"]:
        key = (r["task"], r["metric"])
        if key not in ra:
            continue
        x = ra[key]
        d = r["value"] - x["value"]
        se, test = _paired(a, b, *key), "paired"
        if se is None:
            test = "independent"
            if x.get("stderr") is not None and r.get("stderr") is not None:
                se = math.sqrt(x["stderr"] ** 2 + r["stderr"] ** 2)
        z = d / se if se else None
        rows.append({"task": key[0], "metric": key[1], "a": x["value"], "b": r["value"], "delta": d, "stderr": se,
                     "z": z, "test": test, "significant": bool(z is not None and abs(z) >= 1.96)})
    if not rows:
        raise LMForgeError("the two runs have no (task, metric) in common")
    lines = [f"A: {a.get('model')}   B: {b.get('model')}",
             "| task | metric | A | B | B - A | stderr | z | test | significant |",
             "|---|---|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        lines.append(f"| {r['task']} | {r['metric']} | {_fmt(r['a'])} | {_fmt(r['b'])} | {r['delta']:+.4f} | "
                     f"{_fmt(r['stderr'])} | {_fmt(r['z'], 2)} | {r['test']} | {'yes' if r['significant'] else 'no'} |")
    return rows, "\n".join(lines) + "\n"
