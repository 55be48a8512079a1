"""Supervised fine-tuning (instruction tuning), and the training loop DPO and reward models share.

A run directory holds ``step_*`` checkpoints, ``metrics.jsonl`` and, at the end, ``final/``. With
``--method full`` every checkpoint (and ``final``) is an HF model directory that every lmforge command
loads; with ``lora``/``qlora`` it is an adapter directory (``adapter_model.safetensors`` +
``adapter_config.json``) for the base model. Beside the weights, ``trainer.pt`` holds the optimizer,
the step and the RNG state, so ``--resume`` continues exactly where the run stopped (the data order is
a function of the seed and the epoch). Ctrl-C (SIGINT/SIGTERM) saves a checkpoint before stopping.

Under torchrun every process holds the whole model and trains on its own micro-batches of each step
(data parallel): gradients are averaged over the processes before every optimizer step, so N processes
with batch B step like one process with B per micro-batch and N times the gradient accumulation. Only
rank 0 logs, samples and writes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..errors import LMForgeError
from ..formats import load_checkpoint, parse_device
from ..fsutil import atomic_dir, atomic_file
from ..train.pretrain import (
    TRAINER_STATE,
    TrainConfig,
    _on_signals,
    _restore_signals,
    barrier,
    clean_run_dir,
    latest_checkpoint,
    learning_rate,
    make_optimizer,
    mean_over_ranks,
    prune_checkpoints,
    setup_distributed,
)
from .data import IGNORE, Example, build_sft_examples, iter_batches, load_conversations, split_val

RUN_CONFIG = "finetune_config.json"
METHODS = ("full", "lora", "qlora")
# Settings that may change between a run and its resume (they do not affect the trained weights).
_RESUMABLE_CHANGES = {"device", "eval_every", "save_every", "keep_last", "samples", "sample_tokens"}


@dataclass
class FinetuneConfig:
    method: str = "full"  # full | lora | qlora (LoRA on a base frozen in NF4)
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] | None = None  # None: the LoRA default (attention and MLP projections)
    epochs: float = 1.0
    max_steps: int | None = None  # overrides epochs
    batch_size: int = 4
    grad_accum: int = 1
    lr: float | None = None  # None: the command's default for the method
    warmup_fraction: float = 0.03
    min_lr_fraction: float = 0.1  # cosine decay ends at lr * this
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    max_length: int | None = None  # None: the model's context
    overlong: str = "truncate"  # truncate | skip
    format: str = "auto"
    val_fraction: float = 0.05
    eval_every: int = 50
    save_every: int = 200
    keep_last: int = 2
    samples: int = 2  # held-out prompts generated at each evaluation
    sample_tokens: int = 48
    seed: int = 0
    device: str | None = None
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 elsewhere
    beta: float = 0.1  # DPO

    def validate(self) -> None:
        if self.method not in METHODS:
            raise LMForgeError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        for name in ("batch_size", "grad_accum", "eval_every", "save_every", "keep_last", "lora_r"):
            if int(getattr(self, name)) < 1:
                raise LMForgeError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise LMForgeError(f"max_steps must be a positive integer, got {self.max_steps}")
        if self.epochs <= 0:
            raise LMForgeError(f"epochs must be positive, got {self.epochs}")
        if self.lr is not None and self.lr <= 0:
            raise LMForgeError(f"lr must be positive, got {self.lr}")
        if self.max_length is not None and self.max_length < 2:
            raise LMForgeError(f"max_length must be at least 2, got {self.max_length}")
        if self.overlong not in ("truncate", "skip"):
            raise LMForgeError(f"overlong must be truncate or skip, got {self.overlong!r}")
        if not 0 <= self.val_fraction < 1:
            raise LMForgeError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if not 0 <= self.lora_dropout < 1 or self.lora_alpha <= 0:
            raise LMForgeError("lora_dropout must be in [0, 1) and lora_alpha positive")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise LMForgeError(f"precision must be auto, fp32 or bf16, got {self.precision!r}")
        if self.beta <= 0:
            raise LMForgeError(f"beta must be positive, got {self.beta}")
        for name in ("samples", "sample_tokens"):
            if int(getattr(self, name)) < 0:
                raise LMForgeError(f"{name} must be zero or positive, got {getattr(self, name)}")


def pad_rows(rows: Sequence[Sequence[int]], value: int, device: torch.device) -> torch.Tensor:
    """Right-pad integer rows into a [b, T] tensor. Causal attention never looks right, so the real tokens'
    outputs do not depend on the padding and no attention mask is needed."""
    t = max(len(r) for r in rows)
    out = torch.full((len(rows), t), value, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.tensor(list(r), dtype=torch.long)
    return out.to(device)


def collate(batch: Sequence[Example], pad: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return pad_rows([e.ids for e in batch], pad, device), pad_rows([e.labels for e in batch], IGNORE, device)


def sft_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy counted only where labels are set (assistant tokens): logits at position
    t predict labels[t + 1]."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE, reduction=reduction)


def _pad_id(tok: Any) -> int:
    for t in (tok.pad_token, tok.eos_token):
        i = tok.token_to_id(t) if t else None
        if i is not None:
            return i
    return 0


class FinetuneRun:
    """Load a model (full, LoRA or QLoRA), train it on a subclass's examples, checkpoint and resume.

    Subclasses set `kind` and `default_lr`, and implement `prepare_data` (train_set, val_set, lengths),
    `batch_loss` and `evaluate`; they may extend `trainable`, `save_weights`, `load_weights` and the extra
    state kept in trainer.pt.
    """

    kind = "sft"
    default_lr = {"full": 2e-5, "lora": 2e-4, "qlora": 2e-4}

    def __init__(self, model: str | Path, data: str | Path, out: str | Path, cfg: FinetuneConfig | None = None,
                 resume: bool = False, log: Callable[[str], None] = print, progress: bool = False) -> None:
        from ..registry import resolve

        self.cfg = cfg = cfg or FinetuneConfig()
        cfg.validate()
        # A no-op outside torchrun; under it, join the process group (each rank on its own GPU).
        self.dist, self.device = setup_distributed(str(parse_device(cfg.device)) if cfg.device else None)
        if not self.dist.main:
            log, progress = (lambda s: None), False
        self.log, self.progress, self.out = log, progress, Path(out).expanduser()
        self.bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and self.device.type == "cuda")
        path = resolve(str(model))
        # Adapters record their base; a path is stored absolute so the adapter loads from anywhere.
        self.base_model = str(model) if not Path(str(model)).expanduser().exists() else str(path.resolve())
        torch.manual_seed(cfg.seed)
        if cfg.method == "qlora":
            from .qlora import load_quantized

            # NF4 as the weights stream in: the dense fp32 model never exists, so peak memory is the 4-bit one's.
            ck = load_quantized(path, "nf4", device=self.device, dtype=torch.float32)
        else:
            ck = load_checkpoint(path, device=self.device, dtype=torch.float32, packed=False)
        if ck.tokenizer is None:
            raise LMForgeError(f"{path}: the model has no tokenizer")
        if not ck.config.causal or ck.config.head != "lm":
            raise LMForgeError(f"{path}: fine-tuning needs a causal language model (this one is an encoder)")
        self.model, self.tokenizer = ck.model, ck.tokenizer
        self.pad = _pad_id(self.tokenizer)
        ctx = ck.config.context_length
        self.max_length = min(cfg.max_length or ctx, ctx)
        self.train_set: list[Any] = []
        self.val_set: list[Any] = []
        self.lengths: list[int] = []
        self.prepare_data(data)
        if not self.train_set:
            raise LMForgeError(f"{data}: no training examples left")
        self.lr = cfg.lr or self.default_lr[cfg.method]
        micro = math.ceil(len(self.train_set) / cfg.batch_size)
        self.total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * micro / (cfg.grad_accum * self.dist.world)))
        self.tc = TrainConfig(data="", out=str(self.out), lr=self.lr, min_lr=self.lr * cfg.min_lr_fraction,
                              max_iters=self.total_steps, warmup_iters=int(cfg.warmup_fraction * self.total_steps),
                              weight_decay=cfg.weight_decay, betas=(0.9, 0.999), grad_clip=cfg.grad_clip)
        self.lora = cfg.method != "full"
        if self.lora:
            self._apply_lora()
        self.module = self.trainable()
        self.module.train()
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        self.opt = make_optimizer(self.module, self.tc, self.device)
        self.step = 0
        self.consumed = 0  # micro-batches drawn from the data order, by all ranks together
        self.metrics = self.out / "metrics.jsonl"
        self.last_eval: dict[str, float] = {}
        self.setup()
        if self.dist.main:
            clean_run_dir(self.out, self.log)
        barrier()  # every rank sees the cleaned directory before choosing a checkpoint
        if resume:
            self._resume()

    # -- hooks ---------------------------------------------------------------------------------------------
    def prepare_data(self, data: str | Path) -> None:
        convs = load_conversations(data, self.cfg.format)
        examples, self.stats = build_sft_examples(self.tokenizer, convs, self.max_length, self.cfg.overlong)
        self.log(f"{data}: {self.stats.summary()}")
        self.train_set, self.val_set = split_val(examples, self.cfg.val_fraction, self.cfg.seed)
        self.lengths = [len(e) for e in self.train_set]

    def trainable(self) -> nn.Module:
        return self.model

    def setup(self) -> None:
        """Work after the model is final and before training (DPO: reference log-probabilities)."""

    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    def batch_loss(self, batch: list[Any]) -> tuple[torch.Tensor, dict[str, float]]:
        ids, labels = collate(batch, self.pad, self.device)
        with self.autocast():
            logits = self.model(ids)
        return sft_loss(logits, labels), {}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Token-weighted mean loss over the validation examples."""
        if not self.val_set:
            return {}
        total, count = 0.0, 0
        with self.eval_mode():
            for batch in self.val_batches():
                ids, labels = collate(batch, self.pad, self.device)
                with self.autocast():
                    logits = self.model(ids)
                total += float(sft_loss(logits, labels, reduction="sum"))
                count += int((labels[:, 1:] != IGNORE).sum())
        return {"val_loss": total / max(count, 1)}

    # -- model -----------------------------------------------------------------------------------------------
    def _lora_config(self) -> Any:
        from .lora import LoraConfig

        kw: dict[str, Any] = {"r": self.cfg.lora_r, "alpha": self.cfg.lora_alpha, "dropout": self.cfg.lora_dropout,
                              "quant": "nf4" if self.cfg.method == "qlora" else None}
        if self.cfg.lora_targets:
            kw["targets"] = tuple(self.cfg.lora_targets)
        return LoraConfig(**kw)

    def _apply_lora(self) -> None:
        from .lora import apply_lora

        names = apply_lora(self.model, self._lora_config())
        if not names:
            raise LMForgeError(f"no layer matches the LoRA targets {self._lora_config().targets}")
        self.model.to(self.device)
        self.log(f"{self.cfg.method}: adapters on {len(names)} layers, "
                 f"{sum(p.numel() for p in self.model.parameters() if p.requires_grad) / 1e6:.2f}M trainable "
                 "parameters")

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    @contextlib.contextmanager
    def eval_mode(self) -> Any:
        was = self.module.training
        self.module.eval()
        try:
            yield
        finally:
            self.module.train(was)

    def val_batches(self) -> list[list[Any]]:
        order = sorted(range(len(self.val_set)), key=lambda i: self._length(self.val_set[i]))
        bs = self.cfg.batch_size
        return [[self.val_set[i] for i in order[s:s + bs]] for s in range(0, len(order), bs)]

    @staticmethod
    def _length(item: Any) -> int:
        return len(item) if isinstance(item, Example) else max(len(item.chosen), len(item.rejected))

    # -- samples ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self) -> list[dict[str, str]]:
        """Greedy replies to a few held-out prompts, through the generation engine (no effect on training)."""
        from ..engine import Engine, SamplingParams

        pool = self.val_set or self.train_set
        prompts = []
        for item in pool[: self.cfg.samples]:
            msgs = item.prompt if isinstance(item, Example) else item.chosen.prompt
            ids = self.tokenizer.encode_chat(msgs)
            if msgs and len(ids) + self.cfg.sample_tokens <= self.model.cfg.context_length:
                prompts.append((msgs, ids))
        if not prompts or not self.cfg.sample_tokens:
            return []
        rng = torch.get_rng_state()
        with self.eval_mode():
            engine = Engine(self.model, self.tokenizer, max_batch=len(prompts))
            seqs = engine.generate([ids for _, ids in prompts],
                                   SamplingParams(max_tokens=self.cfg.sample_tokens, temperature=0.0))
        torch.set_rng_state(rng)
        return [{"prompt": msgs[-1]["content"][:200], "reply": s.text} for (msgs, _), s in zip(prompts, seqs)]

    # -- state -------------------------------------------------------------------------------------------------
    def save_weights(self, out: Path) -> None:
        if self.lora:
            from .lora import save_adapter

            save_adapter(self.model, out, self.base_model)
        else:
            from ..formats.export import write_hf

            write_hf(self.model, out, self.tokenizer)

    def load_weights(self, path: Path) -> None:
        if self.lora:
            from .lora import load_adapter

            load_adapter(self.model, path)  # the layers exist: their weights are copied in place
        else:
            from ..formats.hf import load_hf_weights

            weights = dict(load_hf_weights(path, self.model.cfg))
            self.model.load_state_dict({k: v.to(self.device) for k, v in weights.items()})

    def _run_config(self) -> dict[str, Any]:
        return {"kind": self.kind, "base_model": self.base_model, "train_examples": len(self.train_set),
                "settings": dataclasses.asdict(self.cfg)}

    def save(self) -> Path:
        """Rank 0 writes the checkpoint (the ranks' weights are identical); every rank waits for it."""
        path = self.out / f"step_{self.step:07d}"
        if self.dist.main:
            with atomic_dir(path) as tmp:
                self.save_weights(tmp)
                state = {"step": self.step, "micro_batches": self.consumed, "optimizer": self.opt.state_dict(),
                         "torch_rng": torch.get_rng_state(), "extra": self.extra_state()}
                if self.device.type == "cuda":
                    state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
                torch.save(state, tmp / TRAINER_STATE)
                (tmp / RUN_CONFIG).write_text(json.dumps(self._run_config(), indent=2), encoding="utf-8")
            prune_checkpoints(self.out, self.cfg.keep_last)
        barrier()
        return path

    def save_final(self) -> Path:
        path = self.out / "final"
        if self.dist.main:
            with atomic_dir(path) as tmp:
                self.save_weights(tmp)
                info = self._run_config() | {"steps": self.step, "data": dataclasses.asdict(self.stats),
                                             "final_eval": self.last_eval}
                (tmp / RUN_CONFIG).write_text(json.dumps(info, indent=2), encoding="utf-8")
        barrier()
        return path

    def close(self) -> None:
        """Leave the process group (torchrun); harmless otherwise."""
        if dist.is_initialized():
            dist.destroy_process_group()

    def _resume(self) -> None:
        from ..fsutil import read_json

        path = latest_checkpoint(self.out)
        saved = read_json(path / RUN_CONFIG)
        mine = self._run_config()
        if saved.get("kind") != self.kind or saved.get("train_examples") != mine["train_examples"]:
            raise LMForgeError(f"{path}: a {saved.get('kind')} run on {saved.get('train_examples')} examples; "
                               f"this is a {self.kind} run on {mine['train_examples']}; cannot resume")
        diff = sorted(k for k, v in mine["settings"].items() if k not in _RESUMABLE_CHANGES
                      and json.loads(json.dumps(v)) != saved["settings"].get(k))
        if diff:
            raise LMForgeError(f"{path}: settings differ from the checkpoint's ({', '.join(diff)}); cannot resume")
        try:
            state = torch.load(path / TRAINER_STATE, weights_only=True)  # our own file; never arbitrary pickles
        except Exception as e:
            raise LMForgeError(f"{path / TRAINER_STATE}: cannot read trainer state ({e})") from None
        self.load_weights(path)
        self.opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        if "cuda_rng" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)
        self.load_extra_state(state.get("extra") or {})
        self.step = int(state["step"])
        self.consumed = int(state.get("micro_batches", self.step * self.cfg.grad_accum))
        if self.metrics.exists() and self.dist.main:  # forget metrics logged after the checkpoint
            kept = [line for line in self.metrics.read_text(encoding="utf-8").splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= self.step]
            with atomic_file(self.metrics) as tmp:
                tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        self.log(f"resumed from {path} at step {self.step}")

    # -- loop ------------------------------------------------------------------------------------------------
    @classmethod
    def train(cls, model: str | Path, data: str | Path, out: str | Path, cfg: FinetuneConfig | None = None,
              resume: bool = False, log: Callable[[str], None] = print, progress: bool = False) -> Any:
        """Build a run, train it to the end and leave any process group; returns the finished run."""
        run = cls(model, data, out, cfg, resume=resume, log=log, progress=progress)
        try:
            run.fit()
        finally:
            run.close()
        return run

    def fit(self, until: int | None = None) -> list[float]:
        """Train to the last step (or stop after step `until`); returns each step's loss. Writes `final/`
        when the run completes."""
        from tqdm import tqdm

        self.out.mkdir(parents=True, exist_ok=True)
        losses: list[float] = []
        stop: list[int] = []
        handlers = _on_signals(lambda signum, frame: stop.append(signum))
        bar = tqdm(total=self.total_steps, initial=self.step, desc=self.kind, unit="step", leave=False,
                   disable=not self.progress, file=sys.stderr)
        try:
            interrupted = self._loop(bar, losses, stop, until)
        finally:
            _restore_signals(handlers)
            bar.close()
        if interrupted:
            path = self.save()
            self.log(f"stopped at step {self.step}; saved {path} (continue with --resume)")
            raise KeyboardInterrupt
        if self.step >= self.total_steps:
            self.final = self.save_final()
        return losses

    def _loop(self, bar: Any, losses: list[float], stop: list[int], until: int | None) -> bool:
        cfg = self.cfg
        end = min(self.total_steps, until or self.total_steps)
        world, rank = self.dist.world, self.dist.rank
        batches = iter_batches(self.lengths, cfg.batch_size, cfg.seed, self.consumed)
        self.module.train()
        while self.step < end:
            lr = learning_rate(self.tc, self.step)
            for g in self.opt.param_groups:
                g["lr"] = lr
            total = 0.0
            stats: dict[str, float] = {}
            for _ in range(cfg.grad_accum):
                mine = [next(batches) for _ in range(world)][rank]  # each rank its own micro-batch
                self.consumed += world
                loss, st = self.batch_loss([self.train_set[i] for i in mine])
                (loss / cfg.grad_accum).backward()
                total += float(loss.detach()) / cfg.grad_accum
                for k, v in st.items():
                    stats[k] = stats.get(k, 0.0) + v / cfg.grad_accum
            self._average_gradients()
            # One collective a step: the logged values averaged over ranks, and whether any was signalled.
            total, stats, interrupted = self._average_log(total, stats, bool(stop))
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            self.step += 1
            losses.append(total)
            record: dict[str, Any] = {"step": self.step, "loss": total, "lr": lr, **stats}
            if self.step % cfg.eval_every == 0 or self.step == self.total_steps:
                self.last_eval = self.evaluate()
                record |= self.last_eval
                if cfg.samples and self.dist.main:
                    samples = self.sample()
                    if samples:
                        record["samples"] = samples
                        for s in samples:
                            self.log(f"sample at step {self.step}: {s['prompt'][:60]!r} -> {s['reply'][:200]!r}")
            if self.dist.main:
                with self.metrics.open("a", encoding="utf-8") as f:
                    f.write(json.dumps(record) + "\n")
            bar.set_postfix(loss=f"{total:.4f}", lr=f"{lr:.2e}", **{k: f"{v:.4f}" for k, v in self.last_eval.items()})
            bar.update(1)
            if interrupted:
                return True
            if self.step % cfg.save_every == 0 or self.step == self.total_steps:
                self.save()
        return False

    def _average_gradients(self) -> None:
        """Average the trainable parameters' gradients over ranks: one all-reduce of them all, flattened."""
        if self.dist.world == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        flat = mean_over_ranks(torch.cat([g.reshape(-1) for g in grads]))
        offset = 0
        for p in self.params:
            p.grad = flat[offset:offset + p.numel()].view_as(p)
            offset += p.numel()

    def _average_log(self, total: float, stats: dict[str, float], stop: bool) -> tuple[float, dict[str, float], bool]:
        keys = sorted(stats)
        t = mean_over_ranks(torch.tensor([total, *(stats[k] for k in keys), float(stop)], dtype=torch.float64,
                                         device=self.device))
        return float(t[0]), {k: float(v) for k, v in zip(keys, t[1:-1])}, bool(t[-1] > 0)


def finetune_sft(model: str | Path, data: str | Path, out: str | Path, cfg: FinetuneConfig | None = None,
                 resume: bool = False, log: Callable[[str], None] = print, progress: bool = False) -> FinetuneRun:
    """Instruction-tune MODEL on DATA; returns the finished run (its `final` directory, `last_eval`)."""
    return FinetuneRun.train(model, data, out, cfg, resume, log, progress)

