"""The training loop every run shares: pretraining, fine-tuning (SFT, DPO, reward models), classification.

A run plugs in an `Objective` (a loss over a batch, and an evaluation) and a `DataSource` (this rank's
micro-batches, with a state that resumes the order exactly). `TrainLoop` owns the rest: optimizer steps
with gradient accumulation and clipping, the learning-rate schedule, evaluation and checkpoint cadence,
checkpoints (staged and renamed whole, rotated, resumable bit for bit), SIGINT/SIGTERM (save the step
just finished, then stop), metrics.jsonl (cut back to the checkpoint on resume) and rank-0 logging.

Under torchrun each rank computes the loss of its own micro-batches; gradients are synchronised by
the DDP or FSDP wrapper when the run made one (`distributed.parallelize`), else averaged by one flat
all-reduce before the optimizer step. The logged values are averaged over ranks in one collective
per step, which also tells every rank whether any was signalled, so all stop after the same step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from ..errors import LMForgeError
from ..fsutil import atomic_dir, atomic_file, remove_dir, sweep_leftovers
from ..quant import cpu
from .distributed import DistInfo, average_gradients, barrier, leave_distributed, mean_over_ranks

TRAINER_STATE = "trainer.pt"
METRICS = "metrics.jsonl"


# -- optimisation --------------------------------------------------------------------------------------
OPTIMIZERS = ("adamw", "adafactor")


@dataclass
class OptimConfig:
    """How a run optimises: the schedule, the optimizer, and the step cadence of evaluations and saves."""

    lr: float
    max_iters: int  # optimizer steps
    min_lr: float = 0.0
    warmup_iters: int = 0
    schedule: str = "cosine"  # "cosine" or "wsd" (warmup-stable-decay; decays over the last 20%)
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0  # 0: no clipping
    grad_accum: int = 1  # micro-batches per optimizer step (per rank)
    eval_every: int = 0  # 0: only at the last step
    save_every: int = 0  # 0: only at the last step
    keep_last: int = 2  # checkpoints kept
    # A wall-clock budget in seconds (0: none): the run stops when it is spent, and the schedule decays
    # over the steps the run is on course to take in it; max_iters is then only an upper bound.
    max_seconds: float = 0.0
    # "adamw", or "adafactor": T5's optimizer, whose steps are relative to each tensor's RMS (T5's
    # initial scales differ by tensor, which a single AdamW rate serves badly); betas are AdamW's alone.
    optimizer: str = "adamw"
    # Warmup as a fraction of the steps (fine-tuning's --warmup), else 0: warmup_iters as given. Under a
    # time budget the fraction is of the steps the run is on course to take, not of max_iters.
    warmup_fraction: float = 0.0

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise LMForgeError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")


class Schedule(Protocol):
    """The settings a learning-rate schedule reads (an `OptimConfig`, or pretraining's TrainConfig)."""

    lr: float
    min_lr: float
    warmup_iters: int
    max_iters: int
    schedule: str


def learning_rate(cfg: Schedule, it: int) -> float:
    """Linear warmup, then cosine decay to min_lr (or, for "wsd", constant until the last 20%, then linear)."""
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


def timed_schedule(cfg: OptimConfig, step: int, seconds: float) -> OptimConfig:
    """The schedule of a run with a time budget: max_iters becomes the number of steps the run will have
    taken when the budget is spent, at its pace so far (and a warmup fraction is of those steps)."""
    if not cfg.max_seconds or step == 0 or seconds <= 0:
        return cfg
    expected = max(step + 1, min(cfg.max_iters, int(step * cfg.max_seconds / seconds)))
    warmup = int(cfg.warmup_fraction * expected) if cfg.warmup_fraction else cfg.warmup_iters
    return dataclasses.replace(cfg, max_iters=expected, warmup_iters=warmup)


def make_optimizer(module: nn.Module, cfg: OptimConfig, device: torch.device, sharded: bool = False
                   ) -> torch.optim.Optimizer:
    """AdamW (or Adafactor) over the trainable parameters; matrices decay, vectors (norms, biases) do not."""
    params = [p for p in module.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    if cfg.optimizer == "adafactor":
        return torch.optim.Adafactor(groups, lr=cfg.lr)
    # Fused kernels (one per parameter group, also on CPU); FSDP's sharded (DTensor) parameters take the
    # default multi-tensor path.
    fused = device.type in ("cuda", "cpu") and not sharded
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=fused)


# Training's products have batch x block rows, so bf16 pays off on narrower models than inference's
# (cpu.BF16_MIN_WIDTH). Measured on a Zen 5 core (AVX-512 BF16), a training step of a 4-layer model with
# 12 x 64 tokens: width 128 1.9x faster in bf16, width 96 1.5x, width 64 1.3x (narrower stays exact).
TRAIN_BF16_MIN_WIDTH = 128


def use_bf16(precision: str, device: torch.device, width: int) -> bool:
    """Whether `precision` means bf16 autocast here for a model of hidden size `width`: "bf16"; "fp32";
    "auto": bf16 on CUDA, and on CPUs whose bf16 matmuls are fast (quant.cpu) for models of at least
    TRAIN_BF16_MIN_WIDTH; fp32 elsewhere."""
    if precision != "auto":
        return precision == "bf16"
    return device.type == "cuda" or (device.type == "cpu" and width >= TRAIN_BF16_MIN_WIDTH and cpu.fast_bf16())


def autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on `device`, or nothing."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


# -- what a run plugs in ---------------------------------------------------------------------------------
class Objective(Protocol):
    """What a run optimises and how it is measured."""

    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        """The scalar loss of one micro-batch (to backpropagate) and any values to log with it."""
        ...

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Held-out metrics (the model is in eval mode, gradients off)."""
        ...


class DataSource(Protocol):
    """This rank's micro-batches, in an order that a checkpoint's state resumes exactly."""

    def next_batch(self) -> Any: ...

    def state_dict(self) -> dict[str, Any]:
        """Entries saved in the trainer state (and handed back, with the rest of it, on resume)."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


# -- run directories ----------------------------------------------------------------------------------------
def checkpoints(out: Path) -> list[Path]:
    """A run directory's complete checkpoints (those with trainer state), oldest first."""
    return sorted(p for p in out.glob("step_*") if (p / TRAINER_STATE).exists())


def prune_checkpoints(out: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` checkpoints; an interrupted deletion leaves no `step_*` behind."""
    for old in checkpoints(out)[:-keep_last]:
        remove_dir(old)


def clean_run_dir(out: Path, log: Callable[[str], None] = print) -> list[Path]:
    """Remove what a killed run left in its directory (and say so); returns what went.

    That is checkpoint staging and half-done swaps and prunings (see `fsutil.sweep_leftovers`), and
    `step_*` directories without trainer state, which no complete save leaves (earlier versions' prunings
    deleted checkpoints in place).
    """
    if not out.is_dir():
        return []
    gone = sweep_leftovers(out, r"step_\d+|final|metrics\.jsonl")
    for p in out.glob("step_*"):
        if re.fullmatch(r"step_\d+", p.name) and p.is_dir() and not (p / TRAINER_STATE).exists():
            remove_dir(p)
            gone.append(p)
    if gone:
        log(f"removed {len(gone)} leftover(s) of an interrupted run from {out}")
    return gone


def latest_checkpoint(out: Path) -> Path:
    """The checkpoint `--resume` continues from; a one-line error when there is none."""
    ckpts = checkpoints(out)
    if not ckpts:
        raise LMForgeError(f"nothing to resume: no checkpoint in {out}")
    return ckpts[-1]


def read_trainer_state(path: Path) -> dict[str, Any]:
    """A checkpoint's trainer state, or a one-line error naming it."""
    try:
        return torch.load(path / TRAINER_STATE, weights_only=True)  # our own file; never arbitrary pickles
    except Exception as e:
        raise LMForgeError(f"{path / TRAINER_STATE}: cannot read trainer state ({e})") from None


def truncate_metrics(metrics: Path, step: int) -> None:
    """Forget the metrics logged after `step` (those of a run's steps lost since its last checkpoint)."""
    if not metrics.exists():
        return
    kept = [line for line in metrics.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step]
    with atomic_file(metrics) as tmp:
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


@contextlib.contextmanager
def on_signals(handler: Callable[[int, Any], None]) -> Iterator[None]:
    """Route SIGINT/SIGTERM to `handler` inside the block (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


# -- the loop -----------------------------------------------------------------------------------------------
class TrainLoop:
    """Steps, checkpoints and resume around a run's objective and data.

    A run sets the attributes below, then calls `start(resume)`. It writes its weights in
    `write_checkpoint` and reads them back in `restore`; the other hooks have defaults. A run without
    a run directory (`out` None) keeps no checkpoints or metrics, and a signal simply stops it.
    """

    desc = "training"  # the progress bar's label
    optim: OptimConfig
    out: Path | None  # the run directory: checkpoints and metrics.jsonl
    dist: DistInfo
    device: torch.device
    log: Callable[[str], None]
    progress: bool  # show a progress bar (on a terminal)
    module: nn.Module  # what is trained (its trainable parameters are optimised)
    train_model: nn.Module  # what a training step calls: `module`, or its DDP wrapper
    opt: torch.optim.Optimizer
    objective: Objective
    data: DataSource
    step: int = 0

    def start(self, resume: bool) -> None:
        """Clear a killed run's leftovers from the run directory, then continue from its checkpoint."""
        self.metrics = self.out / METRICS if self.out is not None else None
        self.last_eval: dict[str, float] = {}  # the latest evaluation fit ran
        self.seconds = 0.0  # wall time spent in fit, over every resumed part of the run
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        if self.dist.main and self.out is not None:
            clean_run_dir(self.out, self.log)
        barrier()  # every rank sees the cleaned directory before choosing a checkpoint
        if resume:
            self.resume()

    def close(self) -> None:
        """Leave the process group (torchrun); harmless otherwise."""
        # Drop DDP first: freeing its reducer after the group is destroyed can free the group itself
        # while holding the GIL, deadlocking against gloo's worker threads.
        self.train_model = self.module
        leave_distributed()

    # -- hooks ------------------------------------------------------------------------------------------
    def batch_loss(self, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        return self.objective.loss(self.train_model, batch)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        with self.eval_mode():
            return self.objective.evaluate(self.module)

    @contextlib.contextmanager
    def eval_mode(self) -> Iterator[None]:
        was = self.module.training
        self.module.eval()
        try:
            yield
        finally:
            self.module.train(was)

    def eval_samples(self) -> list[Any]:
        """Generations logged with an evaluation (none by default)."""
        return []

    def describe_sample(self, sample: Any) -> str:
        return repr(sample)

    def step_metrics(self, seconds: float) -> dict[str, float]:
        """Values logged with each step beside the loss (e.g. throughput); `seconds` the step's wall time."""
        return {}

    def postfix(self, record: dict[str, Any]) -> dict[str, str]:
        """The progress bar's figures."""
        return {"loss": f"{record['loss']:.4f}", "lr": f"{record['lr']:.2e}",
                **{k: f"{v:.4f}" for k, v in self.last_eval.items()}}

    def checkpoint_tensors(self) -> tuple[Any, Any]:
        """(weights, optimizer state) to save; every rank calls it (a gather, when weights are sharded)."""
        return None, self.opt.state_dict()

    def write_checkpoint(self, tmp: Path, weights: Any) -> None:
        """Write the weights (and the run's settings) into a staging checkpoint directory (rank 0)."""
        raise NotImplementedError

    def run_state(self) -> dict[str, Any]:
        """Entries of the trainer state beyond the loop's and the data's."""
        return {}

    def check_resumable(self, path: Path, state: dict[str, Any]) -> None:
        """Refuse a checkpoint this run cannot continue (a different model or settings)."""

    def restore(self, path: Path, state: dict[str, Any]) -> None:
        """Load a checkpoint's weights and optimizer state."""
        raise NotImplementedError

    def finish(self) -> None:
        """Work when the last step is done (fine-tuning writes `final/`)."""

    # -- state ------------------------------------------------------------------------------------------
    def save(self) -> Path:
        """Write `step_N/` (rank 0; staged, then renamed into place) and prune old ones; every rank waits."""
        if self.out is None:
            raise LMForgeError("this run has no run directory to save checkpoints in")
        weights, optim = self.checkpoint_tensors()
        path = self.out / f"step_{self.step:07d}"
        if self.dist.main:
            state = {"step": self.step, "optimizer": optim, "torch_rng": torch.get_rng_state(),
                     "train_seconds": self.seconds,
                     **self.data.state_dict(), **self.run_state()}
            if self.device.type == "cuda":
                state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
            with atomic_dir(path) as tmp:
                self.write_checkpoint(tmp, weights)
                torch.save(state, tmp / TRAINER_STATE)
            prune_checkpoints(self.out, self.optim.keep_last)
        barrier()
        return path

    def resume(self) -> None:
        if self.out is None:
            raise LMForgeError("this run has no run directory to resume from")
        path = latest_checkpoint(self.out)
        state = read_trainer_state(path)
        self.check_resumable(path, state)
        self.restore(path, state)
        torch.set_rng_state(state["torch_rng"])
        if "cuda_rng" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)
        self.data.load_state_dict(state)
        self.step = int(state["step"])
        self.seconds = float(state.get("train_seconds", 0.0))
        if self.dist.main and self.metrics is not None:
            truncate_metrics(self.metrics, self.step)
        self.log(f"resumed from {path} at step {self.step}")

    # -- steps --------------------------------------------------------------------------------------------
    def fit(self, until: int | None = None) -> list[float]:
        """Train to the last step (or stop after step `until`); returns the loss of each step taken.

        A signal stops it after the current step, which is saved; then KeyboardInterrupt is raised."""
        from tqdm import tqdm

        if self.dist.main and self.out is not None:
            self.out.mkdir(parents=True, exist_ok=True)
        losses: list[float] = []
        stop: list[int] = []
        total = None if self.optim.max_seconds else self.optim.max_iters  # a time budget: steps unknown
        bar = tqdm(total=total, initial=self.step, desc=self.desc, unit="step", leave=False,
                   disable=None if self.progress else True, file=sys.stderr)
        try:
            with on_signals(lambda signum, frame: stop.append(signum)):
                interrupted = self._loop(bar, losses, stop, until)
        finally:
            bar.close()
        if interrupted and self.out is None:
            self.log(f"stopped at step {self.step}")
            raise KeyboardInterrupt
        if interrupted:  # the step just finished is saved, then the signal's usual effect follows
            path = self.save()
            self.log(f"stopped at step {self.step}; saved {path} (continue with --resume)")
            raise KeyboardInterrupt
        if self.step >= self.optim.max_iters:
            self.finish()
        return losses

    def _sync(self, last: bool) -> contextlib.AbstractContextManager[Any]:
        """Gradient synchronisation for one micro-batch: only after the last one of a step."""
        if hasattr(self.module, "set_requires_gradient_sync"):  # FSDP2: reduce-scatter once per step
            self.module.set_requires_gradient_sync(last)
        if hasattr(self.train_model, "no_sync") and not last:  # DDP
            return self.train_model.no_sync()
        return contextlib.nullcontext()

    def _loop(self, bar: Any, losses: list[float], stop: list[int], until: int | None) -> bool:
        """Run steps; True when a signal stopped it (every rank agrees on the step it stops after)."""
        cfg = self.optim
        wrapped = self.train_model is not self.module or hasattr(self.module, "set_requires_gradient_sync")
        self.module.train()
        t0 = started = time.time()
        spent = self.seconds
        while self.step < min(cfg.max_iters, until or cfg.max_iters):
            lr = learning_rate(timed_schedule(cfg, self.step, self.seconds), self.step)
            for g in self.opt.param_groups:
                g["lr"] = lr
            total = torch.zeros((), device=self.device)
            stats: dict[str, float] = {}
            for micro in range(cfg.grad_accum):
                with self._sync(micro == cfg.grad_accum - 1):
                    loss, st = self.batch_loss(self.data.next_batch())
                    loss = loss / cfg.grad_accum
                    loss.backward()
                total += loss.detach()
                for k, v in st.items():
                    stats[k] = stats.get(k, 0.0) + v / cfg.grad_accum
            if not wrapped:
                average_gradients(self.params)
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            self.step += 1
            # One collective per step: the logged values and the wall time averaged over ranks (so all
            # agree on when a time budget is spent), and whether any was signalled.
            keys = sorted(stats)
            logged = mean_over_ranks(torch.cat([
                total.reshape(1).double(),
                torch.tensor([*(stats[k] for k in keys), spent + time.time() - started, float(bool(stop))],
                             dtype=torch.float64, device=self.device)]))
            loss_value, interrupted = float(logged[0]), bool(logged[-1] > 0)
            losses.append(loss_value)
            self.seconds = float(logged[-2])
            if cfg.max_seconds and self.seconds >= cfg.max_seconds:
                cfg.max_iters = self.step  # the budget is spent: this is the last step
            record: dict[str, Any] = {"step": self.step, "loss": loss_value, "lr": lr,
                                      **{k: float(v) for k, v in zip(keys, logged[1:-2])},
                                      **self.step_metrics(time.time() - t0), "elapsed_s": round(self.seconds, 2)}
            if (cfg.eval_every and self.step % cfg.eval_every == 0) or self.step == cfg.max_iters:
                self.last_eval = self.evaluate()
                record |= self.last_eval
                samples = self.eval_samples()
                if samples:
                    record["samples"] = samples
                    for s in samples:
                        self.log(f"sample at step {self.step}: {self.describe_sample(s)}")
            if self.dist.main and self.metrics is not None:
                with self.metrics.open("a", encoding="utf-8") as f:
                    f.write(json.dumps(record) + "\n")
            bar.set_postfix(**self.postfix(record))
            bar.update(1)
            if interrupted:
                return True
            if self.out is not None and ((cfg.save_every and self.step % cfg.save_every == 0)
                                         or self.step == cfg.max_iters):
                self.save()
            t0 = time.time()
        return False
