"""Pretraining: a fresh model trained on prepared token shards (next-token or masked-token prediction).

`Trainer` plugs the `TokenPrediction` objective and the `TokenStream` of random windows into the shared
training loop (`train.loop`), which steps, evaluates, checkpoints and resumes exactly. Under `torchrun`
every process trains a slice of each global batch, with DDP (replicated weights) or FSDP2
(`fully_shard`, sharded weights, gradients and optimizer state). Only rank 0 logs and writes.

Checkpoints are HF directories (config.json + model.safetensors, plus the data's tokenizer.json) with
the trainer state beside them (optimizer, step, RNG), so a checkpoint is also a model every lmforge
command loads. Weights and optimizer state are saved whole (gathered from the shards, keyed by
parameter name), so a checkpoint resumes in one process, under DDP or under FSDP, on any world size.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from ..errors import LMForgeError
from ..formats.export import hf_config, write_hf
from ..fsutil import read_json
from ..model import ModelConfig, Transformer
from ..tokenizer import Tokenizer
from .attention import use_short_attention
from .data import load_split
from .distributed import DistInfo, mean_over_ranks, parallelize, setup_distributed
from .loop import OptimConfig, TrainLoop, autocast, make_optimizer, use_bf16

OBJECTIVES = ("clm", "mlm", "seq2seq", "span-corruption")


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
    betas: tuple[float, float] = (0.9, 0.99)  # AdamW's
    optimizer: str = "adamw"  # or "adafactor" (loop.OptimConfig)
    grad_clip: float = 1.0
    eval_interval: int = 250
    eval_iters: int = 20
    save_interval: int = 500
    keep_last: int = 2
    seed: int = 1337
    device: str | None = None
    precision: str = "auto"  # "auto": bf16 autocast on CUDA and fast-bf16 CPUs (loop.use_bf16); "fp32"; "bf16"
    compile: bool = False  # torch.compile each block
    activation_checkpointing: bool = False  # recompute block activations in backward: less memory
    fsdp: bool = False  # under torchrun: shard with FSDP2 instead of replicating with DDP
    samples: int = 2  # sample generations logged at each evaluation (0: none)
    sample_tokens: int = 64
    # "clm": next-token prediction; "mlm": BERT-style masked tokens (encoders); encoder-decoders
    # (train/seq2seq.py): "seq2seq" (source -> target pairs), "span-corruption" (T5's denoising)
    objective: str = "clm"
    mask_prob: float = 0.15  # mlm: fraction of tokens to predict (80% masked, 10% random, 10% kept)
    whole_word_mask: bool = False  # mlm: mask every piece of a chosen word together
    noise_density: float = 0.15  # span-corruption: fraction of each window's tokens dropped
    mean_noise_span: float = 3.0  # span-corruption: mean length of a dropped span
    label_smoothing: float = 0.0  # encoder-decoders: cross-entropy label smoothing
    val_fraction: float = 0.1  # of a raw corpus's documents, or of seq2seq's pairs (the first ones)
    target_data: str | None = None  # seq2seq: the target file, line-aligned with `data` (else pairs in `data`)
    source_field: str = "source"  # seq2seq: JSONL fields of a pair
    target_field: str = "target"
    source_prefix: str = ""  # seq2seq: written before every source, e.g. "translate English to German: "
    max_target_length: int = 0  # seq2seq: target tokens kept (0: block_size, which bounds the source)
    max_seconds: float = 0.0  # a wall-clock budget: stop when spent, the schedule fitted to it (0: none)

    def validate(self) -> None:
        for name in ("batch_size", "block_size", "grad_accum", "max_iters", "eval_iters", "keep_last"):
            if int(getattr(self, name)) < 1:
                raise LMForgeError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.schedule not in ("cosine", "wsd"):
            raise LMForgeError(f"schedule must be cosine or wsd, got {self.schedule!r}")
        if not 0 < self.lr:
            raise LMForgeError(f"lr must be positive, got {self.lr}")
        self.optim()  # the optimizer's own checks (its name)
        if self.optimizer != "adamw" and tuple(self.betas) != TrainConfig.betas:
            raise LMForgeError(f"betas are AdamW's; optimizer {self.optimizer} has none (drop betas)")
        if self.optimizer == "adafactor" and self.fsdp:  # its factored moments need whole matrices
            raise LMForgeError("optimizer adafactor cannot be combined with fsdp (it factors whole matrices); use DDP")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise LMForgeError(f"precision must be auto, fp32 or bf16, got {self.precision!r}")
        if self.objective not in OBJECTIVES:
            raise LMForgeError(f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if not 0 < self.noise_density < 1 or self.mean_noise_span < 1:
            raise LMForgeError(f"noise_density must be between 0 and 1 and mean_noise_span at least 1, got "
                               f"{self.noise_density} and {self.mean_noise_span}")
        if not 0 <= self.label_smoothing < 1 or not 0 <= self.val_fraction < 1 or self.max_seconds < 0:
            raise LMForgeError("label_smoothing and val_fraction must be in [0, 1) and max_seconds not negative, "
                               f"got {self.label_smoothing}, {self.val_fraction} and {self.max_seconds}")
        if not 0 < self.mask_prob < 1:
            raise LMForgeError(f"mask_prob must be between 0 and 1, got {self.mask_prob}")
        for name in ("samples", "sample_tokens", "warmup_iters"):
            if int(getattr(self, name)) < 0:
                raise LMForgeError(f"{name} must be zero or positive, got {getattr(self, name)}")

    def optim(self) -> OptimConfig:
        return OptimConfig(lr=self.lr, max_iters=self.max_iters, min_lr=self.min_lr, warmup_iters=self.warmup_iters,
                           schedule=self.schedule, weight_decay=self.weight_decay, betas=self.betas,
                           grad_clip=self.grad_clip, grad_accum=self.grad_accum, eval_every=self.eval_interval,
                           save_every=self.save_interval, keep_last=self.keep_last, max_seconds=self.max_seconds,
                           optimizer=self.optimizer)


def flops_per_token(cfg: ModelConfig, n_params: int) -> float:
    """Training FLOPs per token (forward + backward): 6 per weight plus attention's 12 * L * T * d."""
    return 6 * n_params + 12 * cfg.n_layers * cfg.context_length * cfg.q_dim


def matmul_peak(device: torch.device, n: int = 1024, reps: int = 5, bf16: bool = False) -> float:
    """Measured matmul FLOP/s, bf16 on a GPU or when `bf16`, else fp32: the denominator of MFU."""
    dtype = torch.bfloat16 if device.type == "cuda" or bf16 else torch.float32
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


class TokenStream:
    """The training split as a `DataSource`: this rank's (inputs, targets) on the device, masked for MLM."""

    def __init__(self, batches: Batches, device: torch.device, masking: Masking | None) -> None:
        self.batches, self.device, self.masking = batches, device, masking

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.batches.next(self.device, self.masking)

    def state_dict(self) -> dict[str, Any]:
        return {"data_rng": self.batches.gen.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batches.gen.set_state(state["data_rng"])


class TokenPrediction:
    """The pretraining objective: cross-entropy on the next token (clm) or on the masked tokens (mlm);
    evaluated on fixed validation windows, with bits per byte for clm."""

    def __init__(self, cfg: TrainConfig, meta: dict[str, Any], val: np.ndarray | None, masking: Masking | None,
                 info: DistInfo, device: torch.device, bf16: bool) -> None:
        self.cfg, self.meta, self.val, self.masking = cfg, meta, val, masking
        self.info, self.device, self.bf16 = info, device, bf16

    def loss(self, model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]
             ) -> tuple[torch.Tensor, dict[str, float]]:
        x, y = batch
        with autocast(self.device, self.bf16):
            logits = model(x)
        return F.cross_entropy(logits.view(-1, logits.size(-1)).float(), y.reshape(-1), ignore_index=-100), {}

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        """Mean validation loss over eval_iters fixed windows, and bits per byte."""
        if self.val is None:
            return {}
        batches = Batches(self.val, self.cfg, 0, self.info.rank, self.info.world)  # the same windows each time
        losses = torch.stack([self.loss(model, batches.next(self.device, self.masking))[0]
                              for _ in range(self.cfg.eval_iters)])
        loss = float(mean_over_ranks(losses.mean()).item())
        out = {"val_loss": loss}
        n_bytes, tokens = self.meta.get("bytes"), self.meta["train"]["tokens"] + self.meta["val"]["tokens"]
        if n_bytes and tokens and self.masking is None:  # nats/token -> bits/byte, with the corpus's tokens/byte
            out["val_bpb"] = loss / math.log(2) * tokens / n_bytes
        return out


class Trainer(TrainLoop):
    """A pretraining run: a fresh model from TrainConfig, trained on a prepared data directory."""

    out: Path

    def __init__(self, cfg: TrainConfig, resume: bool = False, log: Callable[[str], None] = print) -> None:
        cfg.validate()
        self.cfg = cfg
        self.optim = cfg.optim()
        self.dist, self.device = setup_distributed(cfg.device)
        self.log = log if self.dist.main else (lambda s: None)
        self.progress = self.dist.main
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
        hf_config(self.model_cfg)  # checkpoints are HF directories: a shape they cannot hold fails now, not at one
        self.bf16 = use_bf16(cfg.precision, self.device, self.model_cfg.dim)
        self.out = Path(cfg.out)
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        self.model = Transformer(self.model_cfg).to(self.device)
        self.model.init_weights()
        self.model.grad_checkpointing = cfg.activation_checkpointing
        use_short_attention(self.model, self.device, self.bf16, cfg.block_size)
        if cfg.compile:  # block by block: FSDP's hooks sit between blocks, and every block is the same graph
            for layer in self.model.layers:
                layer.compile()
        self.module = self.model
        self.train_model = parallelize(self.model, self.dist, self.device, cfg.fsdp)
        self.opt = make_optimizer(self.model, self.optim, self.device, sharded=cfg.fsdp)
        self.masking = self._masking() if cfg.objective == "mlm" else None
        self.train = Batches(load_split(data, "train"), cfg, cfg.seed, self.dist.rank, self.dist.world)
        self.data = TokenStream(self.train, self.device, self.masking)
        val = load_split(data, "val")
        self.objective = TokenPrediction(cfg, self.meta, val if len(val) > cfg.block_size + 1 else None,
                                         self.masking, self.dist, self.device, self.bf16)
        self.start(resume)

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

    # -- checkpoints ----------------------------------------------------------------------------------------
    def checkpoint_tensors(self) -> tuple[Any, Any]:
        """Whole weights and optimizer state, gathered from the shards and keyed by parameter name."""
        whole = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return (get_model_state_dict(self.model, options=whole),
                get_optimizer_state_dict(self.model, self.opt, options=whole))

    def write_checkpoint(self, tmp: Path, weights: Any) -> None:
        write_hf(self.model, tmp, self.tokenizer, state_dict=weights)
        (tmp / "train_config.json").write_text(json.dumps(dataclasses.asdict(self.cfg), indent=2), encoding="utf-8")

    def run_state(self) -> dict[str, Any]:
        return {"model_config": dataclasses.asdict(self.model_cfg)}

    def check_resumable(self, path: Path, state: dict[str, Any]) -> None:
        if state["model_config"] != dataclasses.asdict(self.model_cfg):
            raise LMForgeError(f"{path}: the checkpoint's model config differs from this run's; cannot resume")

    def restore(self, path: Path, state: dict[str, Any]) -> None:
        from ..formats.hf import load_hf_weights

        try:
            weights = dict(load_hf_weights(path, self.model_cfg))
        except Exception as e:
            raise LMForgeError(f"{path}: cannot read the checkpoint's weights ({e})") from None
        whole = StateDictOptions(full_state_dict=True)  # whole tensors in; each rank keeps its shard
        set_model_state_dict(self.model, weights, options=whole)
        set_optimizer_state_dict(self.model, self.opt, state["optimizer"], options=whole)

    # -- logging --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, temperature: float = 0.8, top_k: int = 50) -> list[str]:
        """A few generations from a document boundary, to read progress (seeded: no effect on training)."""
        from ..engine.sampling import SamplerState, SamplingParams, choice_seed

        start = self.meta.get("boundary_token_id")
        if not self.cfg.samples or self.tokenizer is None or start is None or self.masking is not None:
            return []
        n, cpu = self.cfg.samples, torch.device("cpu")
        states = [SamplerState(SamplingParams(max_tokens=max(1, self.cfg.sample_tokens), temperature=temperature,
                                              top_k=top_k, seed=choice_seed(self.cfg.seed, i)),
                               [int(start)], self.model_cfg.vocab_size, cpu) for i in range(n)]
        x = torch.full((n, 1), int(start), dtype=torch.long, device=self.device)
        with self.eval_mode():
            for _ in range(self.cfg.sample_tokens):  # no KV cache: a handful of short samples, readable code
                with autocast(self.device, self.bf16):
                    logits = self.model(x[:, -self.cfg.block_size:])[:, -1].float().cpu()
                picked = [[s.sample(row)] for s, row in zip(states, logits)]
                x = torch.cat([x, torch.tensor(picked, device=self.device)], dim=1)
        return [self.tokenizer.decode(row[1:].tolist()) for row in x]

    def eval_samples(self) -> list[Any]:
        return self.sample()  # every rank: under FSDP the forward pass is a collective

    def fit(self, until: int | None = None) -> list[float]:
        self.peak = matmul_peak(self.device, bf16=self.bf16) * self.dist.world
        self.flops_per_token = flops_per_token(self.model_cfg, sum(p.numel() for p in self.model.parameters()))
        return super().fit(until)

    def step_metrics(self, seconds: float) -> dict[str, float]:
        cfg = self.cfg
        tok_s = cfg.batch_size * cfg.block_size * cfg.grad_accum * self.dist.world / max(seconds, 1e-9)
        return {"tokens_per_s": tok_s, "mfu": tok_s * self.flops_per_token / self.peak}

    def postfix(self, record: dict[str, Any]) -> dict[str, str]:
        return {"loss": f"{record['loss']:.3f}", "tok_s": f"{record['tokens_per_s']:.0f}",
                "mfu": f"{100 * record['mfu']:.1f}%"}
