"""Sampling parameters (OpenAI's names and ranges) and the per-row logits processing that applies them."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import LMForgeError


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 0.7  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 disables
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # multiplicative, over prompt and output (HF/vLLM semantics)
    presence_penalty: float = 0.0  # additive, over output (OpenAI semantics)
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)  # stop strings; never emitted
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in (self.stop or []) if s]
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.logit_bias:
            self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}
        self.validate()

    def validate(self) -> None:
        def bad(name: str, rule: str) -> LMForgeError:
            return LMForgeError(f"{name} must be {rule}, got {getattr(self, name)!r}")

        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise bad("max_tokens", "a positive integer")
        if not 0.0 <= self.temperature <= 2.0:
            raise bad("temperature", "between 0 and 2")
        if not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", "in (0, 1]")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise bad("top_k", "a non-negative integer (0 disables it)")
        if not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", "between 0 and 1")
        if not 0.0 < self.repetition_penalty <= 10.0:
            raise bad("repetition_penalty", "in (0, 10]")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise bad(name, "between -2 and 2")
        if not isinstance(self.top_logprobs, int) or not 0 <= self.top_logprobs <= 20:
            raise bad("top_logprobs", "an integer between 0 and 20")
        for tok, v in (self.logit_bias or {}).items():
            if not -100.0 <= v <= 100.0:
                raise LMForgeError(f"logit_bias for token {tok} must be between -100 and 100, got {v}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # the top-n alternatives, best first


class SamplerState:
    """Per-sequence sampling state: the RNG and the token statistics the penalties need."""

    def __init__(self, params: SamplingParams, prompt_ids: list[int], vocab: int, device: torch.device) -> None:
        self.p = params
        self.generator = torch.Generator(device=device)
        if params.seed is not None:
            self.generator.manual_seed(params.seed)
        else:
            self.generator.seed()
        self.counts: torch.Tensor | None = None
        self.seen: torch.Tensor | None = None
        if params.presence_penalty or params.frequency_penalty:
            self.counts = torch.zeros(vocab, device=device)
        if params.repetition_penalty != 1.0:
            self.seen = torch.zeros(vocab, dtype=torch.bool, device=device)
            ids = [i for i in prompt_ids if 0 <= i < vocab]
            if ids:
                self.seen[torch.tensor(ids, device=device)] = True
        self.bias: tuple[torch.Tensor, torch.Tensor] | None = None
        if params.logit_bias:
            ids = [i for i in params.logit_bias if 0 <= i < vocab]
            self.bias = (torch.tensor(ids, dtype=torch.long, device=device),
                         torch.tensor([params.logit_bias[i] for i in ids], device=device))

    def observe(self, token: int) -> None:
        if self.counts is not None:
            self.counts[token] += 1
        if self.seen is not None:
            self.seen[token] = True

    def process(self, logits: torch.Tensor) -> torch.Tensor:
        """Apply penalties, bias, temperature and truncation to one row of fp32 logits."""
        p = self.p
        if self.seen is not None:
            penalised = torch.where(logits > 0, logits / p.repetition_penalty, logits * p.repetition_penalty)
            logits = torch.where(self.seen, penalised, logits)
        if self.counts is not None:
            logits = logits - p.frequency_penalty * self.counts - p.presence_penalty * (self.counts > 0).float()
        if self.bias is not None:
            logits = logits.index_add(0, self.bias[0], self.bias[1])
        if p.greedy:
            return logits
        logits = logits / p.temperature
        if p.top_k and p.top_k < logits.shape[-1]:
            kth = torch.topk(logits, p.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True)
            cum = sorted_logits.softmax(-1).cumsum(-1)
            drop = cum - sorted_logits.softmax(-1) >= p.top_p  # keep the smallest prefix reaching top_p
            logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
        if p.min_p > 0.0:
            probs = logits.softmax(-1)
            logits = logits.masked_fill(probs < p.min_p * probs.max(), float("-inf"))
        return logits

    def sample(self, logits: torch.Tensor) -> int:
        processed = self.process(logits)
        if self.p.greedy:
            return int(processed.argmax())
        return int(torch.multinomial(processed.softmax(-1), 1, generator=self.generator))


def token_logprob(logits: torch.Tensor, token: int, n: int) -> TokenLogprob:
    """Log-probability of the chosen token under the model's raw distribution, with the top-n alternatives."""
    lp = torch.log_softmax(logits.float(), -1)
    top: list[tuple[int, float]] = []
    if n:
        vals, idx = torch.topk(lp, n)
        top = list(zip(idx.tolist(), vals.tolist()))
    return TokenLogprob(token, float(lp[token]), top)
