"""Inference: KV cache, sampling and the batched generation engine."""

from .engine import Engine, Sequence
from .kv_cache import KVCache
from .sampling import SamplingParams, TokenLogprob

__all__ = ["Engine", "KVCache", "SamplingParams", "Sequence", "TokenLogprob"]
