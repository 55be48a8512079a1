"""Sequence classification: a linear head on a pooled encoder (or a decoder's last token).

A classifier directory is an HF model directory (the fine-tuned base, which every lmforge command loads)
plus ``classifier.json`` (labels, pooling, metrics) and ``classifier.safetensors`` (the head); `finetune`
trains one.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import LMForgeError
from ..formats import load_checkpoint
from ..formats.export import write_hf
from ..fsutil import atomic_dir, read_json
from ..model import Transformer
from ..tokenizer import Tokenizer
from .pooling import encode_texts, pad_batch, pad_id, pool, read_pooling

CLASSIFIER_CONFIG = "classifier.json"
CLASSIFIER_WEIGHTS = "classifier.safetensors"


# -- data ---------------------------------------------------------------------------------------------
def read_labelled(path: str | Path, text_field: str, label_field: str) -> list[tuple[str, str]]:
    """(text, label) pairs from a CSV, TSV or JSONL file; labels are kept as strings."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise LMForgeError(f"no such file: {path}")
    suffix = path.suffix.lower()
    rows: list[dict[str, Any]] = []
    with open(path, encoding="utf-8", newline="") as f:
        if suffix == ".jsonl":
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise LMForgeError(f"{path}:{n}: invalid JSON ({e.msg})") from None
                    if not isinstance(rec, dict):
                        raise LMForgeError(f"{path}:{n}: expected a JSON object")
                    rows.append(rec)
        elif suffix in (".csv", ".tsv"):
            # TSV as GLUE writes it: tab-separated, quotes are plain characters.
            reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if suffix == ".tsv" \
                else csv.DictReader(f)
            rows = list(reader)
            columns = reader.fieldnames or []
            for field in (text_field, label_field):
                if field not in columns:
                    raise LMForgeError(f"{path}: no column {field!r} (columns: {', '.join(columns) or 'none'})")
        else:
            raise LMForgeError(f"{path}: unsupported file type {suffix or '(none)'} (use .csv, .tsv or .jsonl)")
    if not rows:
        raise LMForgeError(f"{path}: no examples")
    out = []
    for n, rec in enumerate(rows, 1):
        for field in (text_field, label_field):
            if rec.get(field) is None:
                raise LMForgeError(f"{path}: example {n} has no field {field!r} "
                                   f"(fields: {', '.join(map(str, rec)) or 'none'})")
        out.append((str(rec[text_field]), str(rec[label_field]).strip()))
    return out


def label_names(labels: Sequence[str]) -> list[str]:
    names = set(labels)
    try:  # numeric labels in numeric order (so "0", "1", ... "10" keep their meaning)
        return sorted(names, key=float)
    except ValueError:
        return sorted(names)


# -- the model ------------------------------------------------------------------------------------------
class SequenceClassifier(nn.Module):
    """Base transformer -> pooled vector -> dropout -> linear head over the labels."""

    def __init__(self, base: Transformer, labels: list[str], pooling: str, dropout: float = 0.1) -> None:
        super().__init__()
        self.base, self.labels, self.pooling = base, list(labels), pooling
        self.dropout = nn.Dropout(dropout)
        p = next(base.parameters())
        self.head = nn.Linear(base.cfg.dim, len(labels), device=p.device, dtype=p.dtype)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden = self.base(ids, attn_mask=mask, return_hidden=True)
        return self.head(self.dropout(pool(hidden, mask, self.pooling, self.base)))


def default_pooling(path: Path, base: Transformer) -> str:
    """Encoders pool as their embedding config says (mean for sentence-transformers models); decoders
    use the last token, the only one that has seen the whole text."""
    if base.cfg.causal:
        return "last"
    return read_pooling(path).mode


def metrics(pred: Sequence[int], gold: Sequence[int], n_labels: int) -> dict[str, float]:
    """Accuracy and macro-averaged F1 (for two labels, also the F1 of the second, 'positive' one)."""
    p, g = np.asarray(pred), np.asarray(gold)
    f1s = []
    for c in range(n_labels):
        tp, fp, fn = int(((p == c) & (g == c)).sum()), int(((p == c) & (g != c)).sum()), int(((p != c) & (g == c)).sum())
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    out = {"accuracy": float((p == g).mean()) if len(g) else 0.0, "f1_macro": float(np.mean(f1s))}
    if n_labels == 2:
        out["f1"] = f1s[1]
    return out


def predict_logits(clf: SequenceClassifier, rows: list[list[int]], pid: int, batch_size: int) -> torch.Tensor:
    """[n, n_labels] logits, batched by length; the classifier's train/eval mode is restored."""
    dev = next(clf.parameters()).device
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    out = torch.zeros(len(rows), len(clf.labels))
    was = clf.training
    clf.eval()
    with torch.inference_mode():
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            ids, mask = pad_batch([rows[i] for i in idx], pid, dev)
            out[idx] = clf(ids, mask).float().cpu()
    clf.train(was)
    return out


def save_classifier(clf: SequenceClassifier, tok: Tokenizer, out: str | Path, max_length: int,
                    info: dict[str, Any]) -> Path:
    with atomic_dir(out) as tmp:
        write_hf(clf.base, tmp, tok)
        save_file({"weight": clf.head.weight.detach().float().cpu().contiguous(),
                   "bias": clf.head.bias.detach().float().cpu().contiguous()}, str(tmp / CLASSIFIER_WEIGHTS))
        meta = {"labels": clf.labels, "pooling": clf.pooling, "max_length": max_length} | info
        (tmp / CLASSIFIER_CONFIG).write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return Path(out).expanduser()


class Classifier:
    """A fine-tuned classifier directory, loaded for prediction."""

    def __init__(self, path: str | Path, device: str | None = None) -> None:
        from ..registry import resolve

        self.path = resolve(str(path))
        meta_file = self.path / CLASSIFIER_CONFIG
        if not meta_file.exists():
            raise LMForgeError(f"{self.path}: not a classifier (no {CLASSIFIER_CONFIG}; "
                               "make one with `lmforge finetune classify`)")
        self.meta = read_json(meta_file)
        ck = load_checkpoint(self.path, device=device, dtype=torch.float32)
        if ck.tokenizer is None:
            raise LMForgeError(f"{self.path}: no tokenizer.json")
        self.tokenizer = ck.tokenizer
        self.clf = SequenceClassifier(ck.model, self.meta["labels"], self.meta["pooling"])
        head = load_file(str(self.path / CLASSIFIER_WEIGHTS))
        self.clf.head.load_state_dict({k: v.to(self.clf.head.weight) for k, v in head.items()})
        self.clf.eval()

    @property
    def labels(self) -> list[str]:
        return self.clf.labels

    def probabilities(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """[n, n_labels] class probabilities, columns in `labels` order."""
        rows = encode_texts(self.tokenizer, list(texts), int(self.meta["max_length"]))
        return predict_logits(self.clf, rows, pad_id(self.tokenizer), batch_size).softmax(-1).numpy()

    def predict(self, texts: Sequence[str]) -> list[str]:
        return [self.labels[i] for i in self.probabilities(texts).argmax(-1)]
