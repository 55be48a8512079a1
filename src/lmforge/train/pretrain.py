"""The pretraining loop: next-token prediction on prepared token shards, with exact resume.

One loop for one process and for many: under `torchrun` every process joins the process group and
trains a slice of each global batch, with DDP (replicated weights) or FSDP2 (`fully_shard`, sharded
weights, gradients and optimizer state). Only rank 0 logs and writes.

Checkpoints are HF directories (config.json + model.safetensors, plus the data's tokenizer.json) with
the trainer state beside them (optimizer, step, RNG), so a checkpoint is also a model every lmforge
command loads. Weights and optimizer state are saved whole (gathered from the shards, keyed by
parameter name), so a checkpoint resumes in one process, under DDP or under FSDP, on any world size.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from ..errors import LMForgeError
from ..formats import default_device
from ..formats.export import write_hf
from ..fsutil import atomic_dir, atomic_file, read_json, remove_dir, sweep_leftovers
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
    precision: str = "auto"  # "auto": bf16 autocast on CUDA, fp32 elsewhere; or "fp32" / "bf16"
    compile: bool = False  # torch.compile each block
    activation_checkpointing: bool = False  # recompute block activations in backward: less memory
    fsdp: bool = False  # under torchrun: shard with FSDP2 instead of replicating with DDP
    samples: int = 2  # sample generations logged at each evaluation (0: none)
    sample_tokens: int = 64
    objective: str = "clm"  # "clm": next-token prediction; "mlm": BERT-style masked tokens (encoders)
    mask_prob: float = 0.15  # mlm: fraction of tokens to predict (80% masked, 10% random, 10% kept)
    whole_word_mask: bool = False  # mlm: mask every piece of a chosen word together

    def validate(self) -> None:
        for name in ("batch_size", "block_size", "grad_accum", "max_iters", "eval_iters", "keep_last"):
            if int(getattr(self, name)) < 1:
                raise LMForgeError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.schedule not in ("cosine", "wsd"):
            raise LMForgeError(f"schedule must be cosine or wsd, got {self.schedule!r}")
        if not 0 < self.lr:
            raise LMForgeError(f"lr must be positive, got {self.lr}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise LMForgeError(f"precision must be auto, fp32 or bf16, got {self.precision!r}")
        if self.objective not in ("clm", "mlm"):
            raise LMForgeError(f"objective must be clm or mlm, got {self.objective!r}")
        if not 0 < self.mask_prob < 1:
            raise LMForgeError(f"mask_prob must be between 0 and 1, got {self.mask_prob}")
        for name in ("samples", "sample_tokens", "warmup_iters"):
            if int(getattr(self, name)) < 0:
                raise LMForgeError(f"{name} must be zero or positive, got {getattr(self, name)}")


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
    # Fused kernels on CUDA; FSDP's sharded (DTensor) parameters take the default multi-tensor path.
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=device.type == "cuda" and not cfg.fsdp)


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in a torchrun job (rank 0 of 1 when run alone)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str | None = None) -> tuple[DistInfo, torch.device]:
    """Join torchrun's process group (NCCL on GPUs, gloo on CPUs); a no-op outside torchrun."""
    base = torch.device(device) if device else default_device()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return DistInfo(), base
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if base.type == "cuda":
        base = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(base)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if base.type == "cuda" else "gloo")
    return info, base


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def mean_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """Average a tensor over the ranks of a torchrun job (every rank must call this); unchanged when alone."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        values = values / dist.get_world_size()
    return values


class Batches:
    """Random windows of block_size + 1 tokens from a split, from a seeded generator (part of the state).

    Every rank draws the same global batch of `batch_size * world` windows and keeps its own slice, so a
    run on N processes sees exactly the data of one process with an N times larger batch.
    """

    def __init__(self, tokens: np.ndarray, cfg: TrainConfig, seed: int, rank: int = 0, world: int = 1) -> None:
        if len(tokens) <= cfg.block_size + 1:
            raise LMForgeError(f"the split has {len(tokens)} tokens, fewer than block_size + 1 = {cfg.block_size + 1}")
        self.tokens, self.cfg, self.rank, self.world = tokens, cfg, rank, world
        self.gen = torch.Generator().manual_seed(seed)

    def _draw(self, fn: Callable[..., torch.Tensor], *args: Any) -> torch.Tensor:
        """One draw for the global batch (the same on every rank), then this rank's rows."""
        b = self.cfg.batch_size
        return fn(*args, generator=self.gen)[self.rank * b:(self.rank + 1) * b]

    def next(self, device: torch.device, masking: Masking | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets): the next tokens, or with `masking` the masked inputs and the tokens to recover
        (-100 where nothing is predicted)."""
        t, b = self.cfg.block_size, self.cfg.batch_size
        starts = self._draw(torch.randint, len(self.tokens) - t - 1, (b * self.world,)).tolist()
        rows = torch.from_numpy(np.stack([np.asarray(self.tokens[s:s + t + 1], dtype=np.int64) for s in starts]))
        x, y = rows[:, :-1], rows[:, 1:]
        if masking is not None:
            x, y = masking.apply(x, self)
        return x.to(device, non_blocking=True), y.to(device, non_blocking=True)


@dataclass
class Masking:
    """BERT's masked-LM corruption: choose `prob` of the tokens (or of the words); of those, 80% become the
    mask token, 10% a random token and 10% stay, and only they are predicted."""

    mask_id: int
    vocab_size: int
    prob: float = 0.15
    never: tuple[int, ...] = ()  # special tokens (the document boundary) are never chosen
    word_start: torch.Tensor | None = None  # bool per vocabulary id: the token begins a word

    def apply(self, x: torch.Tensor, batches: Batches) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (x.shape[0] * batches.world, x.shape[1])
        u = batches._draw(torch.rand, shape)
        r = batches._draw(torch.rand, shape)
        rnd = batches._draw(torch.randint, self.vocab_size, shape)
        if self.word_start is not None:  # every piece of a word takes the draw of the word's first piece
            starts = self.word_start[x]
            starts[:, 0] = True
            pos = torch.arange(x.shape[1]).expand_as(x)
            u = u.gather(1, torch.where(starts, pos, 0).cummax(dim=1).values)
        chosen = u < self.prob
        for tok in self.never:
            chosen &= x != tok
        if not chosen.any():  # a loss needs at least one target
            chosen[0, x.shape[1] // 2] = True
        labels = torch.where(chosen, x, torch.full_like(x, -100))
        inputs = torch.where(chosen & (r < 0.8), torch.full_like(x, self.mask_id), x)
        inputs = torch.where(chosen & (r >= 0.8) & (r < 0.9), rnd, inputs)
        return inputs, labels


def _word_starts(tok: Tokenizer, vocab_size: int) -> torch.Tensor:
    """Which ids begin a word. WordPiece marks continuations with '##'; byte-level BPE and character
    vocabularies continue a word with pieces that start with a letter or digit (a new word carries its
    leading space, 'Ġ')."""
    wordpiece = type(tok.hf.model).__name__ == "WordPiece"
    special = set(tok.hf.get_added_tokens_decoder())
    out = torch.ones(vocab_size, dtype=torch.bool)
    for token, i in tok.hf.get_vocab().items():
        if i < vocab_size and i not in special:
            out[i] = not token.startswith("##") if wordpiece else not token[:1].isalnum()
    return out


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


class Trainer:
    def __init__(self, cfg: TrainConfig, resume: bool = False, log: Callable[[str], None] = print) -> None:
        cfg.validate()
        self.cfg = cfg
        self.dist, self.device = setup_distributed(cfg.device)
        self.log = log if self.dist.main else (lambda s: None)
        self.bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and self.device.type == "cuda")
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls that remain run on tensor cores
            torch.backends.cudnn.allow_tf32 = True
        data = Path(cfg.data)
        if not (data / "metadata.json").exists():
            raise LMForgeError(f"{data}: not a prepared data directory (run `lmforge data prepare`)")
        self.meta = read_json(data / "metadata.json")
        self.tokenizer = Tokenizer.from_dir(data) if (data / "tokenizer.json").exists() else None
        self.model_cfg = ModelConfig.from_dict({"vocab_size": self.meta["vocab_size"],
                                                "context_length": cfg.block_size, **cfg.model})
        self.out = Path(cfg.out)
        self.step = 0
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        self.model = Transformer(self.model_cfg).to(self.device)
        self.model.init_weights()
        self.model.grad_checkpointing = cfg.activation_checkpointing
        if cfg.compile:  # block by block: FSDP's hooks sit between blocks, and every block is the same graph
            for layer in self.model.layers:
                layer.compile()
        self.ddp: torch.nn.Module | None = None
        if self.dist.world > 1 and cfg.fsdp:
            from torch.distributed.fsdp import fully_shard

            for layer in self.model.layers:
                fully_shard(layer)
            fully_shard(self.model)
        elif self.dist.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(self.model, device_ids=ids)
        self.opt = make_optimizer(self.model, cfg, self.device)
        self.masking = self._masking() if cfg.objective == "mlm" else None
        self.train = Batches(load_split(data, "train"), cfg, cfg.seed, self.dist.rank, self.dist.world)
        val = load_split(data, "val")
        self.val = val if len(val) > cfg.block_size + 1 else None
        self.metrics = self.out / "metrics.jsonl"
        self.last_eval: dict[str, float] = {}  # the latest evaluation fit ran
        if self.dist.main:
            clean_run_dir(self.out, self.log)
        barrier()  # every rank sees the cleaned directory before choosing a checkpoint
        if resume:
            self._resume()

    def _masking(self) -> Masking:
        from .tokenizer import MASK_TOKEN

        mc = self.model_cfg
        if mc.causal or mc.head != "mlm":
            raise LMForgeError("objective mlm trains a bidirectional encoder with a masked-LM head: set "
                               "model.family=bert, model.causal=false, model.head=mlm (see the bert-mini-mlm preset)")
        tok = self.tokenizer
        mask = tok.token_to_id(tok.mask_token) if tok is not None and tok.mask_token else None
        if tok is None or mask is None:
            raise LMForgeError(f"objective mlm needs a mask token ({MASK_TOKEN}, [MASK] or <mask>) in the data's "
                               "tokenizer; tokenizers from `lmforge tokenizer train` have one")
        boundary = self.meta.get("boundary_token_id")
        return Masking(mask, mc.vocab_size, self.cfg.mask_prob, () if boundary is None else (int(boundary),),
                       _word_starts(tok, mc.vocab_size) if self.cfg.whole_word_mask else None)

    def close(self) -> None:
        """Leave the process group (torchrun); harmless otherwise."""
        # Drop DDP first: freeing its reducer after the group is destroyed can free the group itself
        # while holding the GIL, deadlocking against gloo's worker threads.
        self.ddp = None
        if dist.is_initialized():
            dist.destroy_process_group()

    # -- state -------------------------------------------------------------------------------------------
    def save(self) -> Path:
        """Gather whole weights and optimizer state (a collective), then rank 0 writes the checkpoint."""
        whole = StateDictOptions(full_state_dict=True, cpu_offload=True)
        weights = get_model_state_dict(self.model, options=whole)
        optim = get_optimizer_state_dict(self.model, self.opt, options=whole)
        path = self.out / f"step_{self.step:07d}"
        if self.dist.main:
            with atomic_dir(path) as tmp:
                write_hf(self.model, tmp, self.tokenizer, state_dict=weights)
                torch.save({"step": self.step, "optimizer": optim,
                            "torch_rng": torch.get_rng_state(), "data_rng": self.train.gen.get_state(),
                            "model_config": dataclasses.asdict(self.model_cfg)}, tmp / TRAINER_STATE)
                (tmp / "train_config.json").write_text(json.dumps(dataclasses.asdict(self.cfg), indent=2),
                                                       encoding="utf-8")
            prune_checkpoints(self.out, self.cfg.keep_last)
        barrier()
        return path

    def _resume(self) -> None:
        from ..formats.hf import load_hf_weights

        path = latest_checkpoint(self.out)
        try:
            state = torch.load(path / TRAINER_STATE, weights_only=True)  # our own file; never arbitrary pickles
        except Exception as e:
            raise LMForgeError(f"{path / TRAINER_STATE}: cannot read trainer state ({e})") from None
        if state["model_config"] != dataclasses.asdict(self.model_cfg):
            raise LMForgeError(f"{path}: the checkpoint's model config differs from this run's; cannot resume")
        try:
            weights = dict(load_hf_weights(path, self.model_cfg))
        except Exception as e:
            raise LMForgeError(f"{path}: cannot read the checkpoint's weights ({e})") from None
        whole = StateDictOptions(full_state_dict=True)  # whole tensors in; each rank keeps its shard
        set_model_state_dict(self.model, weights, options=whole)
        set_optimizer_state_dict(self.model, self.opt, state["optimizer"], options=whole)
        torch.set_rng_state(state["torch_rng"])
        self.train.gen.set_state(state["data_rng"])
        self.step = int(state["step"])
        if self.dist.main and self.metrics.exists():  # forget metrics logged after the checkpoint
            kept = [line for line in self.metrics.read_text(encoding="utf-8").splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= self.step]
            with atomic_file(self.metrics) as tmp:
                tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        self.log(f"resumed from {path} at step {self.step}")

    # -- loop ----------------------------------------------------------------------------------------------
    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def loss(self, x: torch.Tensor, y: torch.Tensor, model: torch.nn.Module | None = None) -> torch.Tensor:
        with self._autocast():
            logits = (model or self.model)(x)
        return F.cross_entropy(logits.view(-1, logits.size(-1)).float(), y.reshape(-1), ignore_index=-100)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean validation loss over eval_iters fixed windows, and bits per byte."""
        if self.val is None:
            return {}
        self.model.eval()
        batches = Batches(self.val, self.cfg, 0, self.dist.rank, self.dist.world)  # the same windows each time
        losses = torch.stack([self.loss(*batches.next(self.device, self.masking))
                              for _ in range(self.cfg.eval_iters)])
        self.model.train()
        loss = float(mean_over_ranks(losses.mean()).item())
        out = {"val_loss": loss}
        n_bytes, tokens = self.meta.get("bytes"), self.meta["train"]["tokens"] + self.meta["val"]["tokens"]
        if n_bytes and tokens and self.masking is None:  # nats/token -> bits/byte, with the corpus's tokens/byte
            out["val_bpb"] = loss / math.log(2) * tokens / n_bytes
        return out

    @torch.no_grad()
    def sample(self, temperature: float = 0.8, top_k: int = 50) -> list[str]:
        """A few generations from a document boundary, to read progress (seeded: no effect on training)."""
        start = self.meta.get("boundary_token_id")
        if not self.cfg.samples or self.tokenizer is None or start is None or self.masking is not None:
            return []
        gen = torch.Generator().manual_seed(self.cfg.seed)
        x = torch.full((self.cfg.samples, 1), int(start), dtype=torch.long, device=self.device)
        self.model.eval()
        for _ in range(self.cfg.sample_tokens):  # no KV cache: a handful of short samples, readable code
            with self._autocast():
                logits = self.model(x[:, -self.cfg.block_size:])[:, -1].float().cpu() / temperature
            top = torch.topk(logits, min(top_k, logits.size(-1)))
            choice = torch.multinomial(torch.softmax(top.values, dim=-1), 1, generator=gen)
            x = torch.cat([x, top.indices.gather(1, choice).to(self.device)], dim=1)
        self.model.train()
        return [self.tokenizer.decode(row[1:].tolist()) for row in x]

    def fit(self, until: int | None = None) -> list[float]:
        """Train to max_iters (or stop early at step `until`); returns the loss of each step taken."""
        from tqdm import tqdm

        if self.dist.main:
            self.out.mkdir(parents=True, exist_ok=True)
        self.model.train()
        losses: list[float] = []
        bar = tqdm(total=self.cfg.max_iters, initial=self.step, desc="training", unit="step", leave=False,
                   disable=None if self.dist.main else True)
        self.peak = matmul_peak(self.device) * self.dist.world
        self.flops_per_token = flops_per_token(self.model_cfg, sum(p.numel() for p in self.model.parameters()))
        stop: list[int] = []
        handlers = _on_signals(lambda signum, frame: stop.append(signum))
        try:
            interrupted = self._loop(bar, losses, stop, until)
        finally:
            _restore_signals(handlers)
            bar.close()
        if interrupted:  # the step just finished is saved, then the signal's usual effect follows
            path = self.save()
            self.log(f"stopped at step {self.step}; saved {path} (continue with --resume)")
            raise KeyboardInterrupt
        return losses

    def _loop(self, bar: Any, losses: list[float], stop: list[int], until: int | None) -> bool:
        """Run steps; True when a signal stopped it (every rank agrees on the step it stops after)."""
        cfg = self.cfg
        tokens_per_step = cfg.batch_size * cfg.block_size * cfg.grad_accum * self.dist.world
        train_model = self.ddp or self.model
        t0 = time.time()
        while self.step < min(cfg.max_iters, until or cfg.max_iters):
            lr = learning_rate(cfg, self.step)
            for g in self.opt.param_groups:
                g["lr"] = lr
            total = torch.zeros((), device=self.device)
            for micro in range(cfg.grad_accum):
                last = micro == cfg.grad_accum - 1
                if hasattr(self.model, "set_requires_gradient_sync"):  # FSDP2: reduce-scatter once per step
                    self.model.set_requires_gradient_sync(last)
                sync = self.ddp.no_sync() if self.ddp is not None and not last else contextlib.nullcontext()
                with sync:
                    loss = self.loss(*self.train.next(self.device, self.masking), train_model) / cfg.grad_accum
                    loss.backward()
                total += loss.detach()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            self.step += 1
            # One collective per step: the mean loss for the log, and whether any rank was signalled.
            stats = mean_over_ranks(torch.stack([total.float(), torch.tensor(float(bool(stop)), device=self.device)]))
            loss_value, interrupted = float(stats[0]), bool(stats[1] > 0)
            losses.append(loss_value)
            tok_s = tokens_per_step / max(time.time() - t0, 1e-9)
            record: dict[str, Any] = {"step": self.step, "loss": loss_value, "lr": lr, "tokens_per_s": tok_s,
                                      "mfu": tok_s * self.flops_per_token / self.peak}
            if self.step % cfg.eval_interval == 0 or self.step == cfg.max_iters:
                self.last_eval = self.evaluate()
                record |= self.last_eval
                samples = self.sample()
                if samples:
                    record["samples"] = samples
                    for text in samples:
                        self.log(f"sample at step {self.step}: {text!r}")
            if self.dist.main:
                with self.metrics.open("a", encoding="utf-8") as f:
                    f.write(json.dumps(record) + "\n")
            bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{tok_s:.0f}", mfu=f"{100 * record['mfu']:.1f}%")
            bar.update(1)
            if interrupted:
                return True
            if self.step % cfg.save_interval == 0 or self.step == cfg.max_iters:
                self.save()
            t0 = time.time()
        return False


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
