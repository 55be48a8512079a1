"""Named training recipes: model shape plus optimisation settings, overridable key by key.

`batch_size` and `grad_accum` are per process: under torchrun the global batch is
batch_size * grad_accum * world_size sequences of block_size tokens.
"""

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
    # A small BERT pretrained with masked-LM on CPU; exports as BertForMaskedLM.
    "bert-mini-mlm": {
        "tokenizer": "bpe", "vocab_size": 8192, "val_fraction": 0.05, "objective": "mlm",
        "model": {"family": "bert", "dim": 256, "n_layers": 4, "n_heads": 4, "ffn_dim": 1024, "norm": "layernorm",
                  "norm_eps": 1e-12, "norm_position": "post", "mlp": "gelu", "activation": "gelu",
                  "position": "learned", "causal": False, "type_vocab_size": 2, "head": "mlm",
                  "tie_embeddings": True, "qkv_bias": True, "out_bias": True, "mlp_bias": True},
        "batch_size": 16, "block_size": 128, "max_iters": 3000, "lr": 5e-4, "min_lr": 5e-5, "warmup_iters": 200,
        "betas": (0.9, 0.98), "weight_decay": 0.01, "eval_interval": 250, "eval_iters": 50, "save_interval": 500,
    },
    # A small T5 (ReLU MLP as v1.0, an unscaled tied output as AdamW wants it) trained from scratch for
    # translation on CPU: Multi30k en->de (29k caption pairs) in 45 minutes on two cores; one Unigram
    # vocabulary for both sides.
    "t5-multi30k": {
        "objective": "seq2seq", "tokenizer": "unigram", "vocab_size": 8000, "val_fraction": 0.02,
        "source_prefix": "translate English to German: ",  # the prefix `eval` and `translate` write
        "model": {"family": "t5", "dim": 256, "n_layers": 3, "decoder_layers": 3, "n_heads": 4, "head_dim": 64,
                  "ffn_dim": 1024, "mlp": "gelu", "activation": "relu", "position": "relative", "norm_eps": 1e-6,
                  "tie_embeddings": True, "output_scale": True, "dropout": 0.1},
        # T5's optimizer and tied layout (std-1 embeddings, the output scaled by dim**-0.5): Adafactor's
        # relative steps suit tensors initialised at such different scales, where one AdamW rate does not.
        "optimizer": "adafactor", "batch_size": 64, "block_size": 128, "max_iters": 1_000_000, "max_seconds": 2700,
        "lr": 1e-2, "min_lr": 1e-3, "warmup_iters": 300, "weight_decay": 0.0, "grad_clip": 1.0,
        "label_smoothing": 0.1, "eval_interval": 500, "save_interval": 500, "keep_last": 20,
    },
    # T5's span-corruption pretraining at a small scale, on any text corpus (with sentinels in the vocabulary).
    "t5-span": {
        "objective": "span-corruption", "tokenizer": "unigram", "vocab_size": 8000, "sentinels": 100,
        "val_fraction": 0.02,
        "model": {"family": "t5", "dim": 256, "n_layers": 4, "decoder_layers": 4, "n_heads": 4, "head_dim": 64,
                  "ffn_dim": 1024, "mlp": "swiglu", "activation": "gelu_tanh", "position": "relative",
                  "norm_eps": 1e-6, "tie_embeddings": False},
        "batch_size": 32, "block_size": 128, "max_iters": 3000, "lr": 1e-3, "min_lr": 1e-4, "warmup_iters": 200,
        "weight_decay": 0.01, "eval_interval": 250, "eval_iters": 20, "save_interval": 500,
    },
    # GPT-2 small (124M) as nanoGPT trains it on OpenWebText: ~0.5M tokens per step on 8 GPUs
    # (12 x 1024 tokens x 5 micro-steps x 8 processes); on one GPU use --set grad_accum=40.
    "gpt2-124m": {
        "tokenizer": "bpe", "vocab_size": 50257, "val_fraction": 0.005,
        "model": {"family": "gpt2", "dim": 768, "n_layers": 12, "n_heads": 12, "ffn_dim": 3072, "norm": "layernorm",
                  "mlp": "gelu", "activation": "gelu_tanh", "position": "learned", "tie_embeddings": True,
                  "qkv_bias": True, "out_bias": True, "mlp_bias": True},
        "batch_size": 12, "block_size": 1024, "grad_accum": 5, "max_iters": 600000, "lr": 6e-4, "min_lr": 6e-5,
        "warmup_iters": 2000, "betas": (0.9, 0.95), "weight_decay": 0.1, "grad_clip": 1.0, "eval_interval": 1000,
        "eval_iters": 200, "save_interval": 1000, "keep_last": 3, "compile": True,
    },
    # A small Llama for GPUs, shaped like SmolLM2-135M (30 layers, 576 wide, GQA 9/3), trained with WSD.
    "llama-135m": {
        "tokenizer": "bpe", "vocab_size": 49152, "val_fraction": 0.005,
        "model": {"family": "llama", "dim": 576, "n_layers": 30, "n_heads": 9, "n_kv_heads": 3, "ffn_dim": 1536,
                  "rope_theta": 10000.0, "tie_embeddings": True},
        "batch_size": 16, "block_size": 2048, "grad_accum": 4, "max_iters": 100000, "lr": 3e-3, "min_lr": 0.0,
        "warmup_iters": 2000, "schedule": "wsd", "betas": (0.9, 0.95), "weight_decay": 0.01, "grad_clip": 1.0,
        "eval_interval": 1000, "eval_iters": 100, "save_interval": 1000, "keep_last": 3, "compile": True,
    },
}
