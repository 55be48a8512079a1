"""`lmforge finetune seq2seq`: supervised source -> target training of an encoder-decoder (T5, BART),
full or LoRA, with teacher forcing and label smoothing, through the run every fine-tuning shares.

The batches and the loss are the encoder-decoder trainer's (`train.seq2seq`); this run adds what
fine-tuning adds: a loaded model, adapters, checkpoints of the kind `finetune sft` writes, and sample
outputs for held-out sources at each evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import LMForgeError
from ..train.seq2seq import (
    IdPair,
    Seq2SeqLoss,
    cut_keeping_end,
    declare_task,
    encode_pairs,
    pair_length,
    read_pairs,
)
from .data import split_val
from .sft import FinetuneConfig, FinetuneRun


@dataclass
class Seq2SeqConfig(FinetuneConfig):
    source_field: str = "source"  # JSONL fields of a pair
    target_field: str = "target"
    target_data: str | None = None  # the targets, line-aligned with the sources in --data
    source_prefix: str = ""  # T5's task prefix, e.g. "translate English to German: "
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        if self.lora_targets is None:  # cross-attention and either MLP kind too, not only a decoder LM's layers
            self.lora_targets = ("qkv", "o", "q", "kv", "fc", "gate_up", "down")

    def validate(self) -> None:
        super().validate()
        if self.method == "qlora":
            raise LMForgeError("method qlora is not supported for encoder-decoders (use lora or full)")
        if not 0 <= self.label_smoothing < 1:
            raise LMForgeError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")


@dataclass
class PairStats:
    pairs: int = 0
    truncated: int = 0  # pairs with a side cut to max_length

    def summary(self) -> str:
        return f"{self.pairs} pairs, {self.truncated} cut to the length limit"


class Seq2SeqRun(FinetuneRun):
    kind = "seq2seq"
    default_lr = {"full": 1e-4, "lora": 1e-3, "qlora": 1e-3}
    config_type = Seq2SeqConfig
    cfg: Seq2SeqConfig

    def check_model(self, path: Path, cfg: Any) -> None:
        if not cfg.decoder_layers:
            raise LMForgeError(f"{path}: `finetune seq2seq` trains encoder-decoders (T5, BART); this is a "
                               f"{cfg.family} model (use `finetune sft`)")

    def prepare_data(self, data: str | Path) -> None:
        cfg = self.cfg
        pairs = read_pairs(data, cfg.target_data, cfg.source_field, cfg.target_field)
        full = encode_pairs(self.tokenizer, pairs, cfg.source_prefix)  # tokenized once, then cut
        n = self.max_length
        cut = [len(s) > n or len(t) > n for s, t in full]
        rows = [(cut_keeping_end(s, n), cut_keeping_end(t, n)) for s, t in full]
        if cfg.overlong == "skip":
            rows = [r for r, c in zip(rows, cut) if not c]
        self.stats = PairStats(len(rows), sum(cut) if cfg.overlong == "truncate" else 0)
        self.log(f"{data}: {self.stats.summary()}")
        self.train_set, self.val_set = split_val(rows, cfg.val_fraction, cfg.seed)
        self.lengths = [pair_length(p) for p in self.train_set]
        self.start_id = self.model.cfg.extra.get("decoder_start_token_id", self.pad)
        declare_task(self.model.cfg, cfg.source_prefix)

    def make_objective(self, val_batches: list[list[Any]]) -> Any:
        return Seq2SeqLoss(self.pad, self.start_id, self.device, self.bf16, val_batches, self.cfg.label_smoothing)

    @staticmethod
    def example_length(item: Any) -> int:
        return pair_length(item)

    @torch.no_grad()
    def sample(self) -> list[dict[str, str]]:
        """Greedy outputs for a few held-out sources, through the generation engine."""
        from ..engine import Engine, SamplingParams

        pool: list[IdPair] = (self.val_set or self.train_set)[: self.cfg.samples]
        if not pool or not self.cfg.sample_tokens:
            return []
        rng = torch.get_rng_state()
        with self.eval_mode():
            engine = Engine(self.model, self.tokenizer, max_batch=len(pool))
            seqs = engine.generate([src for src, _ in pool],
                                   SamplingParams(max_tokens=self.cfg.sample_tokens, temperature=0.0))
        torch.set_rng_state(rng)
        return [{"prompt": self.tokenizer.decode(src), "reply": s.text} for (src, _), s in zip(pool, seqs)]
