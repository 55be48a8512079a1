"""One config for every architecture: each family is a set of switches, not a subclass."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..errors import LMForgeError

FAMILIES = ("llama", "qwen2", "gpt2", "bert", "t5")
NORMS = ("rmsnorm", "layernorm")
MLPS = ("swiglu", "gelu")
ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu")
POSITIONS = ("rope", "learned", "none")
HEADS = ("lm", "mlm", "none")


@dataclass
class ModelConfig:
    family: str = "llama"
    vocab_size: int = 32000
    dim: int = 512
    n_layers: int = 8
    n_heads: int = 8
    n_kv_heads: int | None = None  # None: same as n_heads (MHA); fewer gives GQA, 1 gives MQA
    head_dim: int | None = None  # None: dim // n_heads
    ffn_dim: int = 1376
    norm: str = "rmsnorm"
    norm_eps: float = 1e-5
    norm_position: str = "pre"  # "pre" (GPT/Llama) or "post" (BERT)
    mlp: str = "swiglu"
    activation: str = "silu"
    position: str = "rope"
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # {"type": "linear"|"llama3", "factor": ..., ...}
    qkv_bias: bool = False
    out_bias: bool = False
    mlp_bias: bool = False
    tie_embeddings: bool = False
    context_length: int = 2048
    causal: bool = True  # False for encoders (bidirectional attention)
    type_vocab_size: int = 0  # BERT token-type embeddings; 0 disables them
    # Output head: "lm" (next-token matrix), "mlm" (BERT's dense + norm transform before a tied, biased
    # matrix) or "none" (a bare encoder: forward returns hidden states).
    head: str = "lm"
    pooler: bool = False  # BERT's pooler: dense + tanh over the first token's hidden state
    extra: dict[str, Any] = field(default_factory=dict)  # family-specific values carried for export

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            if self.n_heads <= 0 or self.dim % self.n_heads:
                raise LMForgeError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
            self.head_dim = self.dim // self.n_heads
        self.validate()

    def validate(self) -> None:
        for name, allowed in (
            ("family", FAMILIES),
            ("norm", NORMS),
            ("mlp", MLPS),
            ("activation", ACTIVATIONS),
            ("position", POSITIONS),
            ("norm_position", ("pre", "post")),
            ("head", HEADS),
        ):
            value = getattr(self, name)
            if value not in allowed:
                raise LMForgeError(f"unsupported {name} {value!r} (supported: {', '.join(allowed)})")
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim", "context_length"):
            if int(getattr(self, name)) <= 0:
                raise LMForgeError(f"config value {name} must be positive, got {getattr(self, name)}")
        if self.n_heads % self.n_kv_heads:
            raise LMForgeError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if self.norm_eps <= 0:
            raise LMForgeError(f"norm_eps must be positive, got {self.norm_eps}")

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise LMForgeError(f"unknown config keys: {', '.join(unknown)}")
        return cls(**d)
