"""Supervised fine-tuning (instruction tuning), and the run every fine-tuning objective shares.

A run directory holds ``step_*`` checkpoints, ``metrics.jsonl`` and, at the end, ``final/``. With
``--method full`` every checkpoint (and ``final``) is an HF model directory that every lmforge command
loads; with ``lora``/``qlora`` it is an adapter directory (``adapter_model.safetensors`` +
``adapter_config.json``) for the base model. Beside the weights, ``trainer.pt`` holds the optimizer,
the step and the RNG state, so ``--resume`` continues exactly where the run stopped (the data order is
a function of the seed and the epoch). Ctrl-C (SIGINT/SIGTERM) saves a checkpoint before stopping.

`FinetuneRun` loads the model (full, LoRA or QLoRA) and plugs an objective and its examples into the
shared training loop (`lmforge.train.loop`); SFT's objective is `SFTLoss`, DPO's and reward models'
live in `finetune.dpo`.

Under torchrun every process holds the whole model and trains on its own micro-batches of each step
(data parallel): gradients are averaged over the processes before every optimizer step, so N processes
with batch B step like one process with B per micro-batch and N times the gradient accumulation. Only
rank 0 logs, samples and writes.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..device import parse_device
from ..errors import LMForgeError
from ..formats import load_checkpoint
from ..fsutil import atomic_dir, read_json
from ..train.batching import ExampleStream, sorted_batches
from ..train.distributed import barrier, setup_distributed
from ..train.loop import OptimConfig, TrainLoop, autocast, make_optimizer, use_bf16
from .data import (
    IGNORE,
    Example,
    build_sft_examples,
    load_conversations,
    split_val,
)

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
    max_seconds: float = 0.0  # a wall-clock budget (0: none): stop when spent, the schedule fitted to it
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
    precision: str = "auto"  # auto: bf16 autocast on CUDA and fast-bf16 CPUs (train.loop.use_bf16), else fp32

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
        if self.max_seconds < 0:
            raise LMForgeError(f"max_seconds must not be negative, got {self.max_seconds}")
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
        for name in ("samples", "sample_tokens"):
            if int(getattr(self, name)) < 0:
                raise LMForgeError(f"{name} must be zero or positive, got {getattr(self, name)}")

    def optim(self, lr: float, steps: int) -> OptimConfig:
        """Warmup over `warmup_fraction` of the steps, then cosine decay to lr * `min_lr_fraction`."""
        return OptimConfig(lr=lr, max_iters=steps, min_lr=lr * self.min_lr_fraction,
                           warmup_iters=int(self.warmup_fraction * steps), weight_decay=self.weight_decay,
                           betas=(0.9, 0.999), grad_clip=self.grad_clip, grad_accum=self.grad_accum,
                           eval_every=self.eval_every, save_every=self.save_every, keep_last=self.keep_last,
                           max_seconds=self.max_seconds, warmup_fraction=self.warmup_fraction)


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


class SFTLoss:
    """Next-token cross-entropy on the assistant tokens; evaluated as the token-weighted validation loss."""

    def __init__(self, pad: int, device: torch.device, bf16: bool, val_batches: list[list[Example]]) -> None:
        self.pad, self.device, self.bf16, self.val_batches = pad, device, bf16, val_batches

    def loss(self, model: nn.Module, batch: list[Example]) -> tuple[torch.Tensor, dict[str, float]]:
        ids, labels = collate(batch, self.pad, self.device)
        with autocast(self.device, self.bf16):
            logits = model(ids)
        return sft_loss(logits, labels), {}

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        if not self.val_batches:
            return {}
        total, count = 0.0, 0
        for batch in self.val_batches:
            ids, labels = collate(batch, self.pad, self.device)
            with autocast(self.device, self.bf16):
                logits = model(ids)
            total += float(sft_loss(logits, labels, reduction="sum"))
            count += int((labels[:, 1:] != IGNORE).sum())
        return {"val_loss": total / max(count, 1)}


class FinetuneRun(TrainLoop):
    """Load a model (full, LoRA or QLoRA), train it on a subclass's examples, checkpoint and resume.

    Subclasses set `kind`, `default_lr` and `config_type`, and implement `prepare_data` (train_set,
    val_set, lengths) and `make_objective`; they may extend `trainable`, `setup`, `save_weights` and
    `load_weights`.
    """

    out: Path
    kind = "sft"
    default_lr = {"full": 2e-5, "lora": 2e-4, "qlora": 2e-4}
    config_type: type[FinetuneConfig] = FinetuneConfig

    def __init__(self, model: str | Path, data: str | Path, out: str | Path, cfg: FinetuneConfig | None = None,
                 resume: bool = False, log: Callable[[str], None] = print, progress: bool = False) -> None:
        from ..registry import resolve

        cfg = cfg or self.config_type()
        if not isinstance(cfg, self.config_type):  # the common settings, and this kind's defaults for its own
            cfg = self.config_type(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)})
        self.cfg = cfg
        cfg.validate()
        self.desc = self.kind
        # A no-op outside torchrun; under it, join the process group (each rank on its own GPU).
        self.dist, self.device = setup_distributed(str(parse_device(cfg.device)) if cfg.device else None)
        if not self.dist.main:
            log, progress = (lambda s: None), False
        self.log, self.progress, self.out = log, progress, Path(out).expanduser()
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
        self.check_model(path, ck.config)
        self.model, self.tokenizer = ck.model, ck.tokenizer
        self.bf16 = use_bf16(cfg.precision, self.device, ck.config.dim)
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
        self.optim = cfg.optim(self.lr, self.total_steps)
        self.lora = cfg.method != "full"
        if self.lora:
            self._apply_lora()
        self.module = self.train_model = self.trainable()
        self.module.train()
        self.opt = make_optimizer(self.module, self.optim, self.device)
        self.data = ExampleStream(self.train_set, self.lengths, cfg.batch_size, cfg.seed, cfg.grad_accum,
                                  self.dist.rank, self.dist.world)
        self.objective = self.make_objective(sorted_batches(self.val_set, self.example_length, cfg.batch_size))
        self.step = 0
        self.setup()
        self.start(resume)

    # -- hooks ---------------------------------------------------------------------------------------------
    def check_model(self, path: Path, cfg: Any) -> None:
        """Refuse a model this kind of run cannot train."""
        if cfg.decoder_layers:
            raise LMForgeError(f"{path}: a {cfg.family} model is an encoder-decoder: fine-tune it with "
                               "`lmforge finetune seq2seq`")
        if not cfg.causal or cfg.head != "lm":
            raise LMForgeError(f"{path}: fine-tuning needs a causal language model (this one is an encoder)")

    def prepare_data(self, data: str | Path) -> None:
        convs = load_conversations(data, self.cfg.format)
        examples, self.stats = build_sft_examples(self.tokenizer, convs, self.max_length, self.cfg.overlong)
        self.log(f"{data}: {self.stats.summary()}")
        self.train_set, self.val_set = split_val(examples, self.cfg.val_fraction, self.cfg.seed)
        self.lengths = [len(e) for e in self.train_set]

    def make_objective(self, val_batches: list[list[Any]]) -> Any:
        return SFTLoss(self.pad, self.device, self.bf16, val_batches)

    @staticmethod
    def example_length(item: Any) -> int:
        return len(item)

    @staticmethod
    def prompt_of(item: Any) -> list[dict[str, str]]:
        """The conversation before the trained reply (what samples are generated from)."""
        return item.prompt

    def trainable(self) -> nn.Module:
        return self.model

    def setup(self) -> None:
        """Work after the model is final and before training (DPO: reference log-probabilities)."""

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

    # -- samples ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self) -> list[dict[str, str]]:
        """Greedy replies to a few held-out prompts, through the generation engine (no effect on training)."""
        from ..engine import Engine, SamplingParams

        pool = self.val_set or self.train_set
        prompts = []
        for item in pool[: self.cfg.samples]:
            msgs = self.prompt_of(item)
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

    def eval_samples(self) -> list[Any]:
        return self.sample() if self.cfg.samples and self.dist.main else []

    def describe_sample(self, sample: dict[str, str]) -> str:
        return f"{sample['prompt'][:60]!r} -> {sample['reply'][:200]!r}"

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

    def write_checkpoint(self, tmp: Path, weights: Any) -> None:
        self.save_weights(tmp)
        (tmp / RUN_CONFIG).write_text(json.dumps(self._run_config(), indent=2), encoding="utf-8")

    def check_resumable(self, path: Path, state: dict[str, Any]) -> None:
        saved = read_json(path / RUN_CONFIG)
        mine = self._run_config()
        if saved.get("kind") != self.kind or saved.get("train_examples") != mine["train_examples"]:
            raise LMForgeError(f"{path}: a {saved.get('kind')} run on {saved.get('train_examples')} examples; "
                               f"this is a {self.kind} run on {mine['train_examples']}; cannot resume")
        diff = sorted(k for k, v in mine["settings"].items() if k not in _RESUMABLE_CHANGES
                      and json.loads(json.dumps(v)) != saved["settings"].get(k))
        if diff:
            raise LMForgeError(f"{path}: settings differ from the checkpoint's ({', '.join(diff)}); cannot resume")

    def restore(self, path: Path, state: dict[str, Any]) -> None:
        self.load_weights(path)
        self.opt.load_state_dict(state["optimizer"])

    def finish(self) -> None:
        self.final = self.save_final()

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


def finetune_sft(model: str | Path, data: str | Path, out: str | Path, cfg: FinetuneConfig | None = None,
                 resume: bool = False, log: Callable[[str], None] = print, progress: bool = False) -> FinetuneRun:
    """Instruction-tune MODEL on DATA; returns the finished run (its `final` directory, `last_eval`)."""
    return FinetuneRun.train(model, data, out, cfg, resume, log, progress)

