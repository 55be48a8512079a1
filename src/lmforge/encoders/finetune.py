"""Text classification fine-tuning of a `SequenceClassifier` (`lmforge finetune classify`).

The whole network is fine-tuned. The output directory is an HF model directory (the fine-tuned base,
which every lmforge command loads) plus ``classifier.json`` (labels, pooling, metrics) and
``classifier.safetensors`` (the head).
"""

from __future__ import annotations

import math
import random
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LMForgeError
from ..formats import load_checkpoint
from ..train.distributed import DistInfo
from ..train.loop import OptimConfig, TrainLoop, make_optimizer
from .classify import (
    SequenceClassifier,
    default_pooling,
    label_names,
    metrics,
    predict_logits,
    read_labelled,
    save_classifier,
)
from .pooling import encode_texts, pad_batch, pad_id


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


class LabelLoss:
    """Cross-entropy over the labels. The held-out report (accuracy, F1) is computed once, after training."""

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
             ) -> tuple[torch.Tensor, dict[str, float]]:
        ids, mask, ys = batch
        return F.cross_entropy(model(ids, mask), ys), {}

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return {}


class LabelledBatches:
    """Shuffled, length-grouped epochs of (ids, mask, labels) batches, one epoch after another."""

    def __init__(self, rows: list[list[int]], ys: list[int], batch_size: int, rng: random.Random, pad: int,
                 device: torch.device) -> None:
        self.rows, self.ys, self.batch_size, self.rng, self.pad, self.device = rows, ys, batch_size, rng, pad, device
        self.epoch: Iterator[tuple[list[list[int]], list[int]]] = iter(())

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        batch = next(self.epoch, None)
        if batch is None:
            self.epoch = iter(_batches(self.rows, self.ys, self.batch_size, self.rng))
            batch = next(self.epoch)
        ids, mask = pad_batch(batch[0], self.pad, self.device)
        return ids, mask, torch.tensor(batch[1], device=self.device)

    def state_dict(self) -> dict[str, Any]:
        return {}  # no run directory, so nothing resumes

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class ClassifierTraining(TrainLoop):
    """The whole classifier trained in one process; its output is written once, at the end, so the run
    has no run directory (no checkpoints)."""

    desc = "fine-tuning"

    def __init__(self, clf: SequenceClassifier, optim: OptimConfig, data: LabelledBatches,
                 log: Callable[[str], None], progress: bool) -> None:
        self.optim, self.out, self.dist, self.log, self.progress = optim, None, DistInfo(), log, progress
        self.device = next(clf.parameters()).device
        self.module = self.train_model = clf
        self.opt = make_optimizer(clf, optim, self.device)
        self.objective, self.data = LabelLoss(), data
        self.recent: deque[float] = deque(maxlen=50)
        self.start(resume=False)

    def postfix(self, record: dict[str, Any]) -> dict[str, str]:
        self.recent.append(record["loss"])
        return {"loss": f"{np.mean(self.recent):.4f}"}


def finetune_classifier(model: str | Path, train_file: str | Path, eval_file: str | Path | None, out: str | Path,
                        text_field: str = "text", label_field: str = "label", cfg: ClassifyConfig | None = None,
                        device: str | None = None, log: Callable[[str], None] = print,
                        progress: bool = False) -> dict[str, Any]:
    """Fine-tune MODEL (registry name, HF dir or .gguf) on labelled text; write OUT; return the report."""
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
    labels = label_names([y for _, y in train])
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
    # Warmup, then cosine decay to 10% of lr.
    optim = OptimConfig(lr=cfg.lr, max_iters=steps, min_lr=cfg.lr * 0.1, warmup_iters=int(cfg.warmup_fraction * steps),
                        weight_decay=cfg.weight_decay, betas=(0.9, 0.999), grad_clip=1.0)
    dev = next(base.parameters()).device
    pid = pad_id(tok)
    log(f"fine-tuning {sum(p.numel() for p in clf.parameters()) / 1e6:.1f}M parameters on {len(train_rows)} "
        f"examples, {len(labels)} labels, {steps} steps (pooling: {pooling})")
    t0 = time.perf_counter()
    run = ClassifierTraining(clf, optim, LabelledBatches(train_rows, train_ys, cfg.batch_size, rng, pid, dev),
                             log, progress)
    losses = run.fit()
    train_seconds = time.perf_counter() - t0
    report: dict[str, Any] = {"examples": len(train_rows), "steps": steps, "train_seconds": round(train_seconds, 1),
                              "final_loss": float(np.mean(losses[-50:]))}
    if eval_rows:
        pred = predict_logits(clf, eval_rows, pid, 64).argmax(-1).tolist()
        report["eval"] = metrics(pred, eval_ys, len(labels)) | {"examples": len(eval_rows)}
    report["seconds"] = round(time.perf_counter() - t0, 1)
    save_classifier(clf, tok, out, max_len, {"base_model": str(model), "settings": asdict(cfg)} | report)
    return report
