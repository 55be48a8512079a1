"""Text classification fine-tuning: a linear head on a pooled encoder (or a decoder's last token).

The whole network is fine-tuned. The output directory is an HF model directory (the fine-tuned base,
which every lmforge command loads) plus ``classifier.json`` (labels, pooling, metrics) and
``classifier.safetensors`` (the head).
"""

from __future__ import annotations

import csv
import json
import math
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from ..embeddings import encode_texts, pad_batch, pad_id, pool, read_pooling
from ..errors import LMForgeError
from ..formats import load_checkpoint
from ..formats.export import write_hf
from ..fsutil import atomic_dir, read_json
from ..model import Transformer
from ..tokenizer import Tokenizer
from .pretrain import TrainConfig, learning_rate, make_optimizer

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


def _label_names(labels: Sequence[str]) -> list[str]:
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


@dataclass
class ClassifyConfig:
    epochs: float = 1.0
    batch_size: int = 32
    lr: float = 5e-5
    warmup_fraction: float = 0.06
    weight_decay: float = 0.01
    max_length: int = 128
    max_train: int | None = None  # use at most this many training examples (a random subset)
    max_eval: int | None = None
    dropout: float = 0.1
    seed: int = 0
    pooling: str | None = None  # None: see default_pooling
    # The token embedding is half of a small encoder; its dense gradient and AdamW update dominate a CPU
    # step while barely moving accuracy, so it is frozen by default.
    freeze_embeddings: bool = True

    def validate(self) -> None:
        if self.epochs <= 0 or self.batch_size < 1 or self.lr <= 0 or self.max_length < 2:
            raise LMForgeError("epochs, batch size, lr must be positive and max_length at least 2")


def _batches(rows: list[list[int]], ys: list[int], batch_size: int, rng: random.Random
             ) -> list[tuple[list[list[int]], list[int]]]:
    """One shuffled epoch of batches. Examples are grouped by length within windows of 50 batches, so a
    batch pads to a similar length (several times less wasted compute on short-text data such as SST-2)
    while batch order and membership stay random."""
    idx = list(range(len(rows)))
    rng.shuffle(idx)
    window = 50 * batch_size
    idx = [i for w in range(0, len(idx), window) for i in sorted(idx[w:w + window], key=lambda i: len(rows[i]))]
    batches = [idx[s:s + batch_size] for s in range(0, len(idx), batch_size)]
    rng.shuffle(batches)
    return [([rows[i] for i in b], [ys[i] for i in b]) for b in batches]


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


def _predict_logits(clf: SequenceClassifier, rows: list[list[int]], pid: int, batch_size: int) -> torch.Tensor:
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


def finetune_classifier(model: str | Path, train_file: str | Path, eval_file: str | Path | None, out: str | Path,
                        text_field: str = "text", label_field: str = "label", cfg: ClassifyConfig | None = None,
                        device: str | None = None, log: Callable[[str], None] = print,
                        progress: bool = False) -> dict[str, Any]:
    """Fine-tune MODEL (registry name, HF dir or .gguf) on labelled text; write OUT; return the report."""
    from tqdm import tqdm

    from ..registry import resolve

    cfg = cfg or ClassifyConfig()
    cfg.validate()
    train = read_labelled(train_file, text_field, label_field)
    evals = read_labelled(eval_file, text_field, label_field) if eval_file else []
    rng = random.Random(cfg.seed)
    if cfg.max_train and len(train) > cfg.max_train:
        train = rng.sample(train, cfg.max_train)
    if cfg.max_eval and len(evals) > cfg.max_eval:
        evals = rng.sample(evals, cfg.max_eval)
    labels = _label_names([y for _, y in train])
    if len(labels) < 2:
        raise LMForgeError(f"{train_file}: column {label_field!r} has only one label ({labels[0]!r}); need two or more")
    unseen = sorted({y for _, y in evals} - set(labels))
    if unseen:
        raise LMForgeError(f"{eval_file}: labels {', '.join(map(repr, unseen[:5]))} do not occur in the training file")
    index = {name: i for i, name in enumerate(labels)}

    path = resolve(str(model))
    torch.manual_seed(cfg.seed)
    ck = load_checkpoint(path, device=device, dtype=torch.float32, packed=False)
    if ck.tokenizer is None:
        raise LMForgeError(f"{path}: the model has no tokenizer")
    tok, base = ck.tokenizer, ck.model
    pooling = cfg.pooling or default_pooling(path, base)
    clf = SequenceClassifier(base, labels, pooling, cfg.dropout)
    base.tok_emb.weight.requires_grad_(not cfg.freeze_embeddings)
    max_len = min(cfg.max_length, base.cfg.context_length)
    train_rows = encode_texts(tok, [t for t, _ in train], max_len)
    train_ys = [index[y] for _, y in train]
    eval_rows = encode_texts(tok, [t for t, _ in evals], max_len) if evals else []
    eval_ys = [index[y] for _, y in evals]

    steps = max(1, math.ceil(cfg.epochs * math.ceil(len(train_rows) / cfg.batch_size)))
    # The pretraining schedule and optimizer groups, reused: warmup then cosine decay to 10% of lr.
    tc = TrainConfig(data="", out=str(out), lr=cfg.lr, min_lr=cfg.lr * 0.1, max_iters=steps,
                     warmup_iters=int(cfg.warmup_fraction * steps), weight_decay=cfg.weight_decay, betas=(0.9, 0.999))
    dev = next(base.parameters()).device
    opt = make_optimizer(clf, tc, dev)
    pid = pad_id(tok)
    log(f"fine-tuning {sum(p.numel() for p in clf.parameters()) / 1e6:.1f}M parameters on {len(train_rows)} "
        f"examples, {len(labels)} labels, {steps} steps (pooling: {pooling})")
    clf.train()
    t0 = time.perf_counter()
    step, losses = 0, []
    with tqdm(total=steps, desc="fine-tuning", disable=not progress, leave=False, file=sys.stderr) as bar:
        while step < steps:
            for xs, ys in _batches(train_rows, train_ys, cfg.batch_size, rng):
                if step >= steps:
                    break
                lr = learning_rate(tc, step)
                for g in opt.param_groups:
                    g["lr"] = lr
                ids, mask = pad_batch(xs, pid, dev)
                loss = F.cross_entropy(clf(ids, mask), torch.tensor(ys, device=dev))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(clf.parameters(), 1.0)
                opt.step()
                losses.append(loss.item())
                step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
    train_seconds = time.perf_counter() - t0
    report: dict[str, Any] = {"examples": len(train_rows), "steps": steps, "train_seconds": round(train_seconds, 1),
                              "final_loss": float(np.mean(losses[-50:]))}
    if eval_rows:
        pred = _predict_logits(clf, eval_rows, pid, 64).argmax(-1).tolist()
        report["eval"] = metrics(pred, eval_ys, len(labels)) | {"examples": len(eval_rows)}
    report["seconds"] = round(time.perf_counter() - t0, 1)
    save_classifier(clf, tok, out, max_len, {"base_model": str(model), "settings": asdict(cfg)} | report)
    return report


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
        return _predict_logits(self.clf, rows, pad_id(self.tokenizer), batch_size).softmax(-1).numpy()

    def predict(self, texts: Sequence[str]) -> list[str]:
        return [self.labels[i] for i in self.probabilities(texts).argmax(-1)]
