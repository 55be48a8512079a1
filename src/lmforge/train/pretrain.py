"""The pretraining loop: next-token prediction on prepared token shards, with exact resume.

Single process for now. Checkpoints are HF directories (config.json + model.safetensors, plus the
data's tokenizer.json) with the trainer state beside them (optimizer, step, RNG), so a checkpoint is
also a model every lmforge command loads.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import LMForgeError
from ..formats import default_device
from ..formats.export import write_hf
from ..fsutil import atomic_dir
from ..model import ModelConfig, Transformer
from ..tokenizer import Tokenizer
from .data import load_split

TRAINER_STATE = "trainer.pt"


@dataclass
class TrainConfig:
    data: str  # a `lmforge data prepare` directory
    out: str
    model: dict[str, Any] = field(default_factory=dict)  # ModelConfig fields; vocab_size comes from the data
    batch_size: int = 12
    block_size: int = 64
    grad_accum: int = 1
    max_iters: int = 2000
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_iters: int = 100
    schedule: str = "cosine"  # "cosine" or "wsd" (warmup-stable-decay; decays over the last 20%)
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.99)
    grad_clip: float = 1.0
    eval_interval: int = 250
    eval_iters: int = 20
    save_interval: int = 500
    keep_last: int = 2
    seed: int = 1337
    device: str | None = None

    def validate(self) -> None:
        for name in ("batch_size", "block_size", "grad_accum", "max_iters", "eval_iters", "keep_last"):
            if int(getattr(self, name)) < 1:
                raise LMForgeError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.schedule not in ("cosine", "wsd"):
            raise LMForgeError(f"schedule must be cosine or wsd, got {self.schedule!r}")
        if not 0 < self.lr:
            raise LMForgeError(f"lr must be positive, got {self.lr}")


def learning_rate(cfg: TrainConfig, it: int) -> float:
    if it < cfg.warmup_iters:
        return cfg.lr * (it + 1) / (cfg.warmup_iters + 1)
    if cfg.schedule == "wsd":
        decay_start = int(0.8 * cfg.max_iters)
        if it < decay_start:
            return cfg.lr
        frac = (it - decay_start) / max(1, cfg.max_iters - decay_start)
        return cfg.min_lr + (cfg.lr - cfg.min_lr) * (1 - frac)
    frac = min(1.0, (it - cfg.warmup_iters) / max(1, cfg.max_iters - cfg.warmup_iters))
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * frac)) * (cfg.lr - cfg.min_lr)


def flops_per_token(cfg: ModelConfig, n_params: int) -> float:
    """Training FLOPs per token (forward + backward): 6 per weight plus attention's 12 * L * T * d."""
    return 6 * n_params + 12 * cfg.n_layers * cfg.context_length * cfg.q_dim


def matmul_peak(device: torch.device, n: int = 1024, reps: int = 5) -> float:
    """Measured fp32 (CPU) or bf16 (GPU) matmul FLOP/s: the denominator of MFU."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW; matrices decay, vectors (norms, biases) do not."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=device.type == "cuda")


class Batches:
    """Random windows of block_size + 1 tokens from a split, from a seeded generator (part of the state)."""

    def __init__(self, tokens: np.ndarray, cfg: TrainConfig, seed: int) -> None:
        if len(tokens) <= cfg.block_size + 1:
            raise LMForgeError(f"the split has {len(tokens)} tokens, fewer than block_size + 1 = {cfg.block_size + 1}")
        self.tokens, self.cfg = tokens, cfg
        self.gen = torch.Generator().manual_seed(seed)

    def next(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.cfg.block_size
        starts = torch.randint(len(self.tokens) - t - 1, (self.cfg.batch_size,), generator=self.gen).tolist()
        rows = torch.from_numpy(np.stack([np.asarray(self.tokens[s:s + t + 1], dtype=np.int64) for s in starts]))
        return rows[:, :-1].to(device), rows[:, 1:].to(device)


def _checkpoints(out: Path) -> list[Path]:
    return sorted(p for p in out.glob("step_*") if (p / TRAINER_STATE).exists())


class Trainer:
    def __init__(self, cfg: TrainConfig, resume: bool = False, log: Callable[[str], None] = print) -> None:
        cfg.validate()
        self.cfg, self.log = cfg, log
        self.device = torch.device(cfg.device) if cfg.device else default_device()
        data = Path(cfg.data)
        if not (data / "metadata.json").exists():
            raise LMForgeError(f"{data}: not a prepared data directory (run `lmforge data prepare`)")
        self.meta = json.loads((data / "metadata.json").read_text(encoding="utf-8"))
        self.tokenizer = Tokenizer.from_dir(data) if (data / "tokenizer.json").exists() else None
        self.model_cfg = ModelConfig(**{"vocab_size": self.meta["vocab_size"],
                                        "context_length": cfg.block_size, **cfg.model})
        self.out = Path(cfg.out)
        self.step = 0
        torch.manual_seed(cfg.seed)
        self.model = Transformer(self.model_cfg).to(self.device)
        self.model.init_weights()
        self.opt = make_optimizer(self.model, cfg, self.device)
        self.train = Batches(load_split(data, "train"), cfg, cfg.seed)
        val = load_split(data, "val")
        self.val = val if len(val) > cfg.block_size + 1 else None
        self.metrics = self.out / "metrics.jsonl"
        if resume:
            self._resume()

    # -- state -------------------------------------------------------------------------------------------
    def save(self) -> Path:
        path = self.out / f"step_{self.step:07d}"
        with atomic_dir(path) as tmp:
            write_hf(self.model, tmp, self.tokenizer)
            torch.save({"step": self.step, "optimizer": self.opt.state_dict(),
                        "torch_rng": torch.get_rng_state(), "data_rng": self.train.gen.get_state(),
                        "model_config": dataclasses.asdict(self.model_cfg)}, tmp / TRAINER_STATE)
            (tmp / "train_config.json").write_text(json.dumps(dataclasses.asdict(self.cfg), indent=2),
                                                   encoding="utf-8")
        for old in _checkpoints(self.out)[: -self.cfg.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        return path

    def _resume(self) -> None:
        from ..formats.hf import load_hf_weights

        ckpts = _checkpoints(self.out)
        if not ckpts:
            raise LMForgeError(f"nothing to resume: no checkpoint in {self.out}")
        path = ckpts[-1]
        try:
            state = torch.load(path / TRAINER_STATE, weights_only=True)  # our own file; never arbitrary pickles
        except Exception as e:
            raise LMForgeError(f"{path / TRAINER_STATE}: cannot read trainer state ({e})") from None
        if state["model_config"] != dataclasses.asdict(self.model_cfg):
            raise LMForgeError(f"{path}: the checkpoint's model config differs from this run's; cannot resume")
        weights = dict(load_hf_weights(path, self.model_cfg))
        self.model.load_state_dict(weights, strict=True)
        self.opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        self.train.gen.set_state(state["data_rng"])
        self.step = int(state["step"])
        self.log(f"resumed from {path} at step {self.step}")

    # -- loop ----------------------------------------------------------------------------------------------
    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = self.model(x)
        return F.cross_entropy(logits.view(-1, logits.size(-1)).float(), y.reshape(-1))

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean validation loss over eval_iters fixed windows, and bits per byte."""
        if self.val is None:
            return {}
        self.model.eval()
        batches = Batches(self.val, self.cfg, seed=0)  # the same windows at every evaluation
        losses = [self.loss(*batches.next(self.device)).item() for _ in range(self.cfg.eval_iters)]
        self.model.train()
        loss = float(np.mean(losses))
        out = {"val_loss": loss}
        n_bytes, tokens = self.meta.get("bytes"), self.meta["train"]["tokens"] + self.meta["val"]["tokens"]
        if n_bytes and tokens:  # nats/token -> bits/byte, with the corpus's average tokens per byte
            out["val_bpb"] = loss / math.log(2) * tokens / n_bytes
        return out

    def fit(self, until: int | None = None) -> list[float]:
        """Train to max_iters (or stop early at step `until`); returns the loss of each step taken."""
        from tqdm import tqdm

        self.out.mkdir(parents=True, exist_ok=True)
        self.model.train()
        losses = []
        bar = tqdm(total=self.cfg.max_iters, initial=self.step, desc="training", unit="step", leave=False,
                   disable=None)
        tokens_per_step = self.cfg.batch_size * self.cfg.block_size * self.cfg.grad_accum
        self.peak = matmul_peak(self.device)
        self.flops_per_token = flops_per_token(self.model_cfg, sum(p.numel() for p in self.model.parameters()))
        t0 = time.time()
        stop: list[int] = []
        handlers = _on_signals(lambda signum, frame: stop.append(signum))
        try:
            self._loop(bar, losses, tokens_per_step, t0, stop, until)
        finally:
            _restore_signals(handlers)
            bar.close()
        if stop:  # interrupted: the step just finished is saved, then the signal's usual effect follows
            path = self.save()
            self.log(f"stopped at step {self.step}; saved {path} (continue with --resume)")
            raise KeyboardInterrupt
        return losses

    def _loop(self, bar: Any, losses: list[float], tokens_per_step: int, t0: float, stop: list[int],
              until: int | None) -> None:
        while self.step < min(self.cfg.max_iters, until or self.cfg.max_iters) and not stop:
            lr = learning_rate(self.cfg, self.step)
            for g in self.opt.param_groups:
                g["lr"] = lr
            total = 0.0
            for _ in range(self.cfg.grad_accum):
                loss = self.loss(*self.train.next(self.device)) / self.cfg.grad_accum
                loss.backward()
                total += loss.item()
            if self.cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            self.step += 1
            losses.append(total)
            tok_s = tokens_per_step / max(time.time() - t0, 1e-9)
            record: dict[str, Any] = {"step": self.step, "loss": total, "lr": lr, "tokens_per_s": tok_s,
                                      "mfu": tok_s * self.flops_per_token / self.peak}
            t0 = time.time()
            if self.step % self.cfg.eval_interval == 0 or self.step == self.cfg.max_iters:
                record |= self.evaluate()
            with self.metrics.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            bar.set_postfix(loss=f"{total:.3f}", tok_s=f"{tok_s:.0f}", mfu=f"{100 * record['mfu']:.1f}%")
            bar.update(1)
            if self.step % self.cfg.save_interval == 0 or self.step == self.cfg.max_iters:
                self.save()


def _on_signals(handler: Callable[[int, Any], None]) -> dict[int, Any]:
    """Route SIGINT/SIGTERM to `handler` (main thread only); returns the previous handlers."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return {}
    return {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}


def _restore_signals(previous: dict[int, Any]) -> None:
    import signal

    for s, h in previous.items():
        signal.signal(s, h)
