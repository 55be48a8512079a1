"""One config for every architecture: each family is a set of switches, not a subclass."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..errors import LMForgeError

FAMILIES = ("llama", "qwen2", "gpt2", "bert", "t5", "bart")
ENCODER_DECODERS = ("t5", "bart")
NORMS = ("rmsnorm", "layernorm")
MLPS = ("swiglu", "gelu")
ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu")
POSITIONS = ("rope", "learned", "none", "relative")
HEADS = ("lm", "mlm", "none")
ROPE_SCALINGS = ("linear", "llama3")
_INTS = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim", "context_length")
_COUNTS = ("sliding_window", "type_vocab_size", "decoder_layers", "relative_buckets", "relative_max_distance")


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
    # Sliding-window attention (Mistral): a token attends to itself and the sliding_window - 1 tokens
    # before it; 0 attends to the whole context. ``sliding_layers`` lists the layers that slide (Qwen2
    # slides only some); None: all of them.
    sliding_window: int = 0
    sliding_layers: list[int] | None = None
    causal: bool = True  # False for encoders (bidirectional attention)
    type_vocab_size: int = 0  # BERT token-type embeddings; 0 disables them
    # Output head: "lm" (next-token matrix), "mlm" (BERT's dense + norm transform before a tied, biased
    # matrix) or "none" (a bare encoder: forward returns hidden states).
    head: str = "lm"
    pooler: bool = False  # BERT's pooler: dense + tanh over the first token's hidden state
    # Encoder-decoder (T5, BART): the decoder's depth, n_layers being the encoder's; 0: not an encoder-decoder.
    decoder_layers: int = 0
    # T5's relative position bias (position "relative"): the number of buckets, and the distance from
    # which all positions share the last bucket. Attention scores are then not scaled by 1/sqrt(head_dim).
    relative_buckets: int = 32
    relative_max_distance: int = 128
    output_scale: bool = False  # T5 with tied embeddings: final decoder states times dim**-0.5 before the head
    embed_scale: bool = False  # BART's scale_embedding: token embeddings times sqrt(dim)
    logits_bias: bool = False  # BART's final_logits_bias: a fixed vector added to the logits
    # Training only: dropout on each block's attention, cross-attention and MLP outputs, and (encoder-
    # decoders) on the embeddings; evaluation and generation never drop.
    dropout: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)  # family-specific values carried for export

    def __post_init__(self) -> None:
        self._check_types()
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            if self.n_heads > 0 and self.dim % self.n_heads:
                raise LMForgeError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
            self.head_dim = self.dim // self.n_heads if self.n_heads > 0 else 0  # validate() names n_heads
        self.validate()

    def _check_types(self) -> None:
        """Each field's JSON type, before any arithmetic on it: a one-line error naming the field."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in _INTS or f.name in _COUNTS:
                ok, want = isinstance(value, int) and not isinstance(value, bool), "an integer"
                if value is None and f.name in ("n_kv_heads", "head_dim"):
                    ok = True
            elif f.name in ("norm_eps", "rope_theta", "dropout"):
                ok, want = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
            elif f.type == "bool":
                ok, want = isinstance(value, bool), "true or false"
            elif f.type == "str":
                ok, want = isinstance(value, str), "a string"
            elif f.name == "rope_scaling":
                ok, want = value is None or isinstance(value, dict), "an object or null"
            elif f.name == "sliding_layers":
                ok = value is None or (isinstance(value, list) and all(
                    isinstance(i, int) and not isinstance(i, bool) for i in value))
                want = "a list of layer indices or null"
            else:  # extra
                ok, want = isinstance(value, dict), "an object"
            if not ok:
                raise LMForgeError(f"config value {f.name} must be {want}, got {value!r}")

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
        self._check_types()
        for name in _INTS:
            if getattr(self, name) <= 0:
                raise LMForgeError(f"config value {name} must be positive, got {getattr(self, name)}")
        if self.n_heads % self.n_kv_heads:
            raise LMForgeError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if self.norm_eps <= 0:
            raise LMForgeError(f"norm_eps must be positive, got {self.norm_eps}")
        if not 0 <= self.dropout < 1:
            raise LMForgeError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.rope_theta <= 0:
            raise LMForgeError(f"rope_theta must be positive, got {self.rope_theta}")
        if self.type_vocab_size < 0:
            raise LMForgeError(f"type_vocab_size must not be negative, got {self.type_vocab_size}")
        self._check_rope_scaling()
        self._check_encoder_decoder()
        if self.sliding_window < 0:
            raise LMForgeError(f"sliding_window must not be negative, got {self.sliding_window}")
        if self.sliding_window and not self.causal:
            raise LMForgeError("sliding_window applies to causal (decoder) attention only")
        if self.sliding_layers is not None:
            bad = [i for i in self.sliding_layers if not 0 <= i < self.n_layers]
            if bad:
                raise LMForgeError(f"sliding_layers names layer {bad[0]}, but the model has {self.n_layers} layers")

    def _check_encoder_decoder(self) -> None:
        seq2seq = self.family in ENCODER_DECODERS
        if seq2seq != (self.decoder_layers > 0):
            raise LMForgeError(f"decoder_layers must be positive for a {self.family} model and 0 otherwise, "
                               f"got {self.decoder_layers}" if seq2seq else
                               f"decoder_layers applies to encoder-decoders ({', '.join(ENCODER_DECODERS)}) only, "
                               f"got {self.decoder_layers} for a {self.family} model")
        if (self.family == "t5") != (self.position == "relative"):
            raise LMForgeError("a t5 model, and only a t5 model, has relative positions (position 'relative')")
        if self.family == "t5" and self.norm_position != "pre":
            raise LMForgeError("a t5 model is pre-norm (norm_position 'pre')")
        if self.output_scale and self.family != "t5":
            raise LMForgeError("output_scale applies to t5 models only")
        bart = ("post", "learned", "layernorm")
        if self.family == "bart" and (self.norm_position, self.position, self.norm) != bart:
            raise LMForgeError("a bart model is post-norm with LayerNorm and learned positions")
        for name in ("embed_scale", "logits_bias"):
            if getattr(self, name) and self.family != "bart":
                raise LMForgeError(f"{name} applies to bart models only")
        # The bucketing takes a logarithm of distance / exact range: both must be positive.
        if self.relative_buckets < 4:
            raise LMForgeError(f"relative_buckets must be at least 4, got {self.relative_buckets}")
        if self.relative_max_distance <= self.relative_buckets // 2:
            raise LMForgeError(f"relative_max_distance must exceed relative_buckets / 2, "
                               f"got {self.relative_max_distance}")

    def _check_rope_scaling(self) -> None:
        sc = self.rope_scaling
        if not sc:
            return
        kind = sc.get("rope_type", sc.get("type"))
        if kind in (None, "default"):
            return
        if kind not in ROPE_SCALINGS:
            raise LMForgeError(f"unsupported rope scaling type {kind!r} (supported: {', '.join(ROPE_SCALINGS)})")
        need = ("factor", "original_max_position_embeddings") if kind == "llama3" else ("factor",)
        for key in need:
            value = sc.get(key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise LMForgeError(f"rope scaling {kind!r} needs a positive number {key}, got {value!r}")

    def window(self, layer: int) -> int:
        """The sliding window of one layer; 0: it attends to the whole context."""
        if self.sliding_layers is not None and layer not in self.sliding_layers:
            return 0
        return self.sliding_window

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
