"""Preference tuning: DPO, and reward models trained on the same preference pairs.

DPO (Rafailov et al., 2023) raises the policy's log-probability of the chosen reply relative to a
frozen reference, against the rejected one: loss = -log σ(β[(π_c - ref_c) - (π_r - ref_r)]), with
π and ref the summed log-probabilities of the reply tokens. The reference is the starting model: its
log-probabilities are computed once per example before the first update (with LoRA, by the same model
with its adapters disabled), so no second copy of the weights is kept in memory.

A reward model is the base plus a scalar head on the hidden state of the last token, trained with the
pairwise loss -log σ(r_chosen - r_rejected). Its directory is an HF model directory (the fine-tuned
base, loadable by every lmforge command) plus ``reward_head.safetensors`` (``weight`` [1, dim], ``bias``
[1]) and ``reward.json`` (max_length, base model, settings); `RewardModel.load` reads it back and
`score` rates conversations.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import LMForgeError
from ..model import Transformer
from ..train.batching import sorted_batches
from ..train.loop import autocast
from .data import IGNORE, Messages, PairExample, build_pairs, encode_conversation, split_val
from .sft import FinetuneConfig, FinetuneRun, pad_rows

REWARD_CONFIG = "reward.json"
REWARD_HEAD = "reward_head.safetensors"


# -- DPO ----------------------------------------------------------------------------------------------
def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed log-probability of each row's labelled tokens: [b, T, V], [b, T] -> [b]."""
    tgt = labels[:, 1:]
    nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), tgt, ignore_index=IGNORE, reduction="none")
    return -nll.sum(-1)


def dpo_loss(pc: torch.Tensor, pr: torch.Tensor, rc: torch.Tensor, rr: torch.Tensor, beta: float
             ) -> tuple[torch.Tensor, dict[str, float]]:
    """Sigmoid DPO loss from policy (p) and reference (r) log-probs of chosen (c) and rejected (r) replies."""
    chosen, rejected = beta * (pc - rc), beta * (pr - rr)
    loss = -F.logsigmoid(chosen - rejected).mean()
    d = (chosen - rejected).detach()
    return loss, {"reward_chosen": float(chosen.detach().mean()), "reward_rejected": float(rejected.detach().mean()),
                  "reward_margin": float(d.mean()), "reward_accuracy": float((d > 0).float().mean())}


def _pair_rows(batch: Sequence[PairExample], pad: int, device: torch.device
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Chosen rows then rejected rows, padded together: ids, labels, lengths."""
    exs = [p.chosen for p in batch] + [p.rejected for p in batch]
    ids = pad_rows([e.ids for e in exs], pad, device)
    labels = pad_rows([e.labels for e in exs], IGNORE, device)
    return ids, labels, torch.tensor([len(e) for e in exs], device=device)


def _logits(model: nn.Module, ids: torch.Tensor, device: torch.device, bf16: bool) -> torch.Tensor:
    with autocast(device, bf16):
        return model(ids)


class PairRun(FinetuneRun):
    """A fine-tuning run on preference pairs (DPO, reward models)."""

    def prepare_data(self, data: str | Path) -> None:
        pairs, self.stats = build_pairs(self.tokenizer, data, self.max_length, self.cfg.overlong)
        self.log(f"{data}: {self.stats.summary()}")
        self.train_set, self.val_set = split_val(pairs, self.cfg.val_fraction, self.cfg.seed)
        self.lengths = [self.example_length(p) for p in self.train_set]

    @staticmethod
    def example_length(item: PairExample) -> int:
        return max(len(item.chosen), len(item.rejected))

    @staticmethod
    def prompt_of(item: PairExample) -> Messages:
        return item.chosen.prompt


@dataclass
class DPOConfig(FinetuneConfig):
    beta: float = 0.1  # the KL temperature: how far the policy may move from the reference

    def validate(self) -> None:
        super().validate()
        if self.beta <= 0:
            raise LMForgeError(f"beta must be positive, got {self.beta}")


class DPOLoss:
    """The DPO objective against reference log-probabilities stored on each pair; evaluated as the mean
    validation loss, reward accuracy and margin."""

    def __init__(self, beta: float, pad: int, device: torch.device, bf16: bool,
                 val_batches: list[list[PairExample]]) -> None:
        self.beta, self.pad, self.device, self.bf16, self.val_batches = beta, pad, device, bf16, val_batches

    def policy_logps(self, model: nn.Module, batch: Sequence[PairExample]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, labels, _ = _pair_rows(batch, self.pad, self.device)
        logps = sequence_logps(_logits(model, ids, self.device, self.bf16), labels)
        return logps[:len(batch)], logps[len(batch):]

    def references(self, batch: Sequence[PairExample]) -> tuple[torch.Tensor, torch.Tensor]:
        rc = torch.tensor([p.ref_chosen for p in batch], device=self.device)
        rr = torch.tensor([p.ref_rejected for p in batch], device=self.device)
        return rc, rr

    def loss(self, model: nn.Module, batch: list[PairExample]) -> tuple[torch.Tensor, dict[str, float]]:
        pc, pr = self.policy_logps(model, batch)
        return dpo_loss(pc, pr, *self.references(batch), self.beta)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        if not self.val_batches:
            return {}
        n, sums = 0, {"val_loss": 0.0, "val_reward_accuracy": 0.0, "val_reward_margin": 0.0}
        for batch in self.val_batches:
            loss, st = self.loss(model, batch)
            k = len(batch)
            sums["val_loss"] += float(loss) * k
            sums["val_reward_accuracy"] += st["reward_accuracy"] * k
            sums["val_reward_margin"] += st["reward_margin"] * k
            n += k
        return {key: v / n for key, v in sums.items()}


class DPORun(PairRun):
    kind = "dpo"
    default_lr = {"full": 5e-6, "lora": 5e-5, "qlora": 5e-5}
    config_type = DPOConfig
    cfg: DPOConfig

    def make_objective(self, val_batches: list[list[Any]]) -> DPOLoss:
        return DPOLoss(self.cfg.beta, self.pad, self.device, self.bf16, val_batches)

    def reference(self) -> Any:
        """The reference model's context: the base under disabled adapters, or the untouched starting model."""
        import contextlib

        if self.lora:
            from .lora import adapters_disabled

            return adapters_disabled(self.model)
        if self.step:
            raise LMForgeError("the full-model reference exists only before the first update")
        return contextlib.nullcontext()

    def policy_logps(self, batch: Sequence[PairExample]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.objective.policy_logps(self.model, batch)

    @torch.no_grad()
    def setup(self) -> None:
        # Runs on the freshly loaded model (before any resume), so these are the starting model's values.
        with self.eval_mode(), self.reference():
            for batch in sorted_batches(self.train_set + self.val_set, self.example_length, self.cfg.batch_size):
                pc, pr = self.policy_logps(batch)
                for p, c, r in zip(batch, pc.tolist(), pr.tolist()):
                    p.ref_chosen, p.ref_rejected = c, r


# -- reward model --------------------------------------------------------------------------------------
class RewardModel(nn.Module):
    """A causal LM's hidden state at the last real token -> one scalar."""

    def __init__(self, base: Transformer) -> None:
        super().__init__()
        self.base = base
        p = next(base.parameters())
        self.head = nn.Linear(base.cfg.dim, 1, device=p.device, dtype=torch.float32)
        nn.init.normal_(self.head.weight, std=1.0 / base.cfg.dim ** 0.5)
        nn.init.zeros_(self.head.bias)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """ids [b, T] right-padded, lengths [b] -> rewards [b] (float32)."""
        hidden = self.base(ids, last_index=lengths - 1, return_hidden=True)
        return self.head(hidden.float()).squeeze(-1)

    @classmethod
    def load(cls, path: str | Path, device: str | None = None) -> tuple[RewardModel, Any, dict[str, Any]]:
        """A `finetune reward` directory -> (model in eval mode, tokenizer, reward.json)."""
        from ..formats import load_checkpoint
        from ..fsutil import read_json

        path = Path(path).expanduser()
        if not (path / REWARD_CONFIG).exists():
            raise LMForgeError(f"{path}: not a reward model (no {REWARD_CONFIG}; make one with `lmforge finetune reward`)")
        meta = read_json(path / REWARD_CONFIG)
        ck = load_checkpoint(path, device=device, dtype=torch.float32, packed=False)
        rm = cls(ck.model)
        head = load_file(str(path / REWARD_HEAD))
        rm.head.load_state_dict({k: v.to(rm.head.weight) for k, v in head.items()})
        return rm.eval(), ck.tokenizer, meta


def score(model: str | Path | tuple[RewardModel, Any, dict[str, Any]],
          conversations: Sequence[Messages | tuple[str, str]], batch_size: int = 16) -> list[float]:
    """Rewards for conversations (message lists, or (prompt, reply) pairs), rendered as in training."""
    rm, tok, meta = RewardModel.load(model) if isinstance(model, (str, Path)) else model
    max_len = int(meta.get("max_length") or rm.base.cfg.context_length)
    rows = []
    for conv in conversations:
        if isinstance(conv, tuple):
            conv = [{"role": "user", "content": conv[0]}, {"role": "assistant", "content": conv[1]}]
        rows.append(encode_conversation(tok, list(conv)).ids[:max_len])
    dev = next(rm.parameters()).device
    pad = tok.token_to_id(tok.pad_token) if tok.pad_token else None
    out: list[float] = []
    with torch.no_grad():
        for s in range(0, len(rows), batch_size):
            chunk = rows[s:s + batch_size]
            ids = pad_rows(chunk, pad or 0, dev)
            out += rm(ids, torch.tensor([len(r) for r in chunk], device=dev)).tolist()
    return out


class PairwiseRewardLoss:
    """A reward model's objective: -log σ(r_chosen - r_rejected); evaluated as the validation loss,
    accuracy (the chosen reply scored higher) and mean margin."""

    def __init__(self, pad: int, device: torch.device, bf16: bool, val_batches: list[list[PairExample]]) -> None:
        self.pad, self.device, self.bf16, self.val_batches = pad, device, bf16, val_batches

    def rewards(self, model: nn.Module, batch: Sequence[PairExample]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, _, lengths = _pair_rows(batch, self.pad, self.device)
        with autocast(self.device, self.bf16):
            r = model(ids, lengths)
        return r[:len(batch)], r[len(batch):]

    def loss(self, model: nn.Module, batch: list[PairExample]) -> tuple[torch.Tensor, dict[str, float]]:
        rc, rr = self.rewards(model, batch)
        d = rc - rr
        dd = d.detach()
        return -F.logsigmoid(d).mean(), {"accuracy": float((dd > 0).float().mean()), "margin": float(dd.mean())}

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        if not self.val_batches:
            return {}
        d = torch.cat([rc - rr for rc, rr in (self.rewards(model, batch) for batch in self.val_batches)])
        return {"val_loss": float(-F.logsigmoid(d).mean()), "val_accuracy": float((d > 0).float().mean()),
                "val_margin": float(d.mean())}


class RewardRun(PairRun):
    kind = "reward"
    default_lr = {"full": 1e-5, "lora": 1e-4, "qlora": 1e-4}

    def trainable(self) -> nn.Module:
        self.reward = RewardModel(self.model)
        return self.reward

    def make_objective(self, val_batches: list[list[Any]]) -> PairwiseRewardLoss:
        return PairwiseRewardLoss(self.pad, self.device, self.bf16, val_batches)

    def sample(self) -> list[dict[str, str]]:
        return []

    def save_weights(self, out: Path) -> None:
        super().save_weights(out)
        save_file({k: v.detach().float().cpu().contiguous() for k, v in self.reward.head.state_dict().items()},
                  str(out / REWARD_HEAD))
        meta = {"max_length": self.max_length, "base_model": self.base_model, "adapter": self.lora}
        (out / REWARD_CONFIG).write_text(json.dumps(meta, indent=2), encoding="utf-8")

    def load_weights(self, path: Path) -> None:
        super().load_weights(path)
        head = load_file(str(path / REWARD_HEAD))
        self.reward.head.load_state_dict({k: v.to(self.reward.head.weight) for k, v in head.items()})

    def save_final(self) -> Path:
        if self.lora:  # the final reward model is always a whole HF directory: fold the adapters in
            from .lora import merge_lora

            merge_lora(self.model)
            self.lora = False
        return super().save_final()


def finetune_dpo(model: str | Path, data: str | Path, out: str | Path, cfg: FinetuneConfig | None = None,
                 resume: bool = False, log: Callable[[str], None] = print, progress: bool = False) -> DPORun:
    return DPORun.train(model, data, out, cfg, resume, log, progress)


def finetune_reward(model: str | Path, data: str | Path, out: str | Path, cfg: FinetuneConfig | None = None,
                    resume: bool = False, log: Callable[[str], None] = print, progress: bool = False) -> RewardRun:
    return RewardRun.train(model, data, out, cfg, resume, log, progress)
