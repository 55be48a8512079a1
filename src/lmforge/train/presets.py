"""Named training recipes: model shape plus optimisation settings, overridable key by key."""

from __future__ import annotations

from typing import Any

PRESETS: dict[str, dict[str, Any]] = {
    # nanoGPT's CPU "baby GPT" on Shakespeare, character level.
    "shakespeare-char": {
        "tokenizer": "char", "val_fraction": 0.1, "default_data": "shakespeare",  # a registry dataset
        "model": {"family": "gpt2", "dim": 128, "n_layers": 4, "n_heads": 4, "ffn_dim": 512, "norm": "layernorm",
                  "mlp": "gelu", "activation": "gelu_tanh", "position": "learned", "tie_embeddings": True,
                  "qkv_bias": True, "out_bias": True, "mlp_bias": True},
        "batch_size": 12, "block_size": 64, "max_iters": 2000, "lr": 1e-3, "min_lr": 1e-4, "warmup_iters": 100,
        "betas": (0.9, 0.99), "weight_decay": 0.1, "grad_clip": 1.0, "eval_interval": 250, "eval_iters": 200,
        "save_interval": 500,
    },
    # A small Llama-style model for TinyStories-like text with a BPE tokenizer.
    "tinystories-bpe": {
        "tokenizer": "bpe", "vocab_size": 4096, "val_fraction": 0.05,
        "model": {"family": "llama", "dim": 256, "n_layers": 6, "n_heads": 8, "n_kv_heads": 4, "ffn_dim": 704,
                  "tie_embeddings": True},
        "batch_size": 16, "block_size": 256, "max_iters": 3000, "lr": 1e-3, "min_lr": 1e-4, "warmup_iters": 200,
        "eval_interval": 250, "eval_iters": 50, "save_interval": 500,
    },
}
