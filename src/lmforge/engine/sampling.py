"""Sampling parameters (OpenAI's names and ranges) and the per-row logits processing that applies them."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import torch

from ..errors import LMForgeError

# The one default temperature, for the server, the CLI, the Python API and the web page. Below OpenAI's 1.0
# (llama.cpp's server and Ollama choose 0.8): small models sampled at 1.0 wander off topic within a sentence.
# Clients that want OpenAI's default send temperature: 1.
DEFAULT_TEMPERATURE = 0.7
# Temperatures below this decode greedily (vLLM's threshold): dividing logits by less overflows fp32, and the
# limit of sampling as the temperature goes to 0 is the argmax anyway.
GREEDY_BELOW = 1e-5
TEMPERATURE_MAX = 2.0
REPETITION_PENALTY_MAX = 10.0
# Seeds are 64-bit signed integers, as in vLLM; torch's generators accept the whole range.
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1
_FMAX = torch.finfo(torch.float32).max
MAX_BEAMS = 16
# Sampling options that beam search does not apply: a request setting one with num_beams > 1 is refused.
BEAMLESS = ("top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty", "logprobs")


class SamplingError(LMForgeError):
    """A sampling parameter out of its range; `param` names it (OpenAI's name)."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def choice_seed(seed: int | None, index: int) -> int | None:
    """The seed of choice `index` of a request seeded with `seed`: distinct per choice, reproducible, and
    wrapped into the 64-bit range so that no valid seed overflows."""
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, int) or not SEED_MIN <= seed <= SEED_MAX:
        raise SamplingError(f"seed must be a 64-bit signed integer (between {SEED_MIN} and {SEED_MAX}), got {seed!r}",
                            "seed")
    return (seed + index - SEED_MIN) % 2**64 + SEED_MIN


def _finite(logits: torch.Tensor) -> torch.Tensor:
    """Keep processed logits finite: +inf (a huge penalty or a tiny temperature) becomes the largest float,
    NaN (inf x 0) a masked token, so softmax and multinomial never see NaN. -inf stays a mask."""
    return torch.nan_to_num(logits, nan=float("-inf"), posinf=_FMAX)


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = DEFAULT_TEMPERATURE  # 0 (or below GREEDY_BELOW) means greedy
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
    # End-of-turn tokens and stop strings do not end the output before this many tokens (vLLM's min_tokens).
    min_tokens: int = 0
    # Beam search (encoder-decoders), with transformers' generate defaults: beams > 1 decode deterministically
    # (the temperature does not apply); a finished hypothesis scores its summed logprob / length**length_penalty;
    # early_stopping: True stops at num_beams finished ones, False when no running beam can still beat them
    # (transformers' heuristic), "never" when none can in the best case.
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in (self.stop or []) if s]
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.logit_bias:
            self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}
        self.validate()

    def validate(self) -> None:
        """Check every value against its range; raises SamplingError naming the parameter."""

        def bad(name: str, rule: str) -> SamplingError:
            return SamplingError(f"{name} must be {rule}, got {getattr(self, name)!r}", name)

        def number(name: str) -> float:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or math.isnan(v):
                raise bad(name, "a number")
            return v

        def integer(name: str) -> int:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                raise bad(name, "an integer")
            return v

        if integer("max_tokens") < 1:
            raise bad("max_tokens", "a positive integer")
        if not 0.0 <= number("temperature") <= TEMPERATURE_MAX:
            raise bad("temperature", f"between 0 and {TEMPERATURE_MAX:g}")
        if not 0.0 < number("top_p") <= 1.0:
            raise bad("top_p", "in (0, 1]")
        if integer("top_k") < 0:
            raise bad("top_k", "a non-negative integer (0 disables it)")
        if not 0.0 <= number("min_p") <= 1.0:
            raise bad("min_p", "between 0 and 1")
        if not 0.0 < number("repetition_penalty") <= REPETITION_PENALTY_MAX:
            raise bad("repetition_penalty", f"in (0, {REPETITION_PENALTY_MAX:g}]")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= number(name) <= 2.0:
                raise bad(name, "between -2 and 2")
        if not 0 <= integer("top_logprobs") <= 20:
            raise bad("top_logprobs", "an integer between 0 and 20")
        if not 0 <= integer("min_tokens") <= self.max_tokens:
            raise bad("min_tokens", f"an integer between 0 and max_tokens ({self.max_tokens})")
        if self.seed is not None and not SEED_MIN <= integer("seed") <= SEED_MAX:
            raise bad("seed", f"a 64-bit signed integer (between {SEED_MIN} and {SEED_MAX})")
        if not 1 <= integer("num_beams") <= MAX_BEAMS:
            raise bad("num_beams", f"an integer between 1 and {MAX_BEAMS}")
        number("length_penalty")
        if self.early_stopping not in (True, False, "never"):
            raise bad("early_stopping", 'true, false or "never"')
        if self.num_beams > 1:
            d = SamplingParams.__dataclass_fields__
            unsupported = [k for k in BEAMLESS if getattr(self, k) != d[k].default]
            if unsupported or self.logit_bias or self.stop:
                name = (unsupported or ["logit_bias" if self.logit_bias else "stop"])[0]
                raise SamplingError(f"{name} cannot be combined with num_beams > 1 (beam search ranks whole "
                                    "hypotheses by their logprobs)", name)
        for tok, v in (self.logit_bias or {}).items():
            if not -100.0 <= v <= 100.0:
                raise SamplingError(f"logit_bias for token {tok} must be between -100 and 100, got {v}", "logit_bias")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


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
            self.generator.manual_seed(int(params.seed))
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
        """Apply penalties, bias, temperature and truncation to one row of fp32 logits.

        Any accepted parameter values give finite logits with at least one token left to sample."""
        p = self.p
        if self.seen is not None:
            penalised = torch.where(logits > 0, logits / p.repetition_penalty, logits * p.repetition_penalty)
            logits = torch.where(self.seen, penalised, logits)
        if self.counts is not None:
            logits = logits - p.frequency_penalty * self.counts - p.presence_penalty * (self.counts > 0).float()
        if self.bias is not None:
            logits = logits.index_add(0, self.bias[0], self.bias[1])
        logits = _finite(logits)
        if p.greedy:
            return logits
        logits = _finite(logits / p.temperature)
        if p.top_k and p.top_k < logits.shape[-1]:
            kth = torch.topk(logits, p.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True)
            probs = sorted_logits.softmax(-1)
            drop = probs.cumsum(-1) - probs >= p.top_p  # keep the smallest prefix reaching top_p
            drop[0] = False  # and always the most likely token (a top_p below fp32's resolution rounds to 0)
            logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
        if p.min_p > 0.0:
            probs = logits.softmax(-1)
            logits = logits.masked_fill(probs < p.min_p * probs.max(), float("-inf"))
        return logits

    def sample(self, logits: torch.Tensor, draft: int | None = None) -> int:
        """The next token. With ``draft`` (speculative decoding's guess, a deterministic proposal), the
        standard acceptance rule keeps the guess with probability p(draft) and otherwise samples from p
        without it, so the token's distribution is p either way."""
        processed = self.process(logits)
        if self.p.greedy:
            return int(processed.argmax())
        probs = processed.softmax(-1)
        if draft is not None:
            if float(torch.rand((), generator=self.generator, device=probs.device)) < float(probs[draft]):
                return draft
            probs[draft] = 0.0
        return int(torch.multinomial(probs, 1, generator=self.generator))


def token_logprob(logits: torch.Tensor, token: int, n: int) -> TokenLogprob:
    """Log-probability of the chosen token under the model's raw distribution, with the top-n alternatives."""
    lp = torch.log_softmax(logits.float(), -1)
    top: list[tuple[int, float]] = []
    if n:
        vals, idx = torch.topk(lp, n)
        top = list(zip(idx.tolist(), vals.tolist()))
    return TokenLogprob(token, float(lp[token]), top)
