"""Inference: KV cache, sampling (parameters, defaults, the sampler), the batched generation engine, prompt scoring."""

from .engine import Engine, Sequence
from .kv_cache import KVCache
from .sampling import SamplingParams, TokenLogprob

__all__ = ["Engine", "KVCache", "SamplingParams", "Sequence", "TokenLogprob"]
