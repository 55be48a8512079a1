"""Training's CPU fast paths: the short-sequence attention computes the model's attention (values and
gradients), is installed only where it applies, and bf16, fused AdamW and it are what a CPU run uses."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from numerics import assert_close_scaled
from tiny import train_tokenizer

from lmforge.model import ModelConfig, Transformer
from lmforge.model.blocks import Attention
from lmforge.quant import cpu
from lmforge.tokenizer import Tokenizer
from lmforge.train.attention import SHORT_ATTENTION_MAX_POSITIONS, ShortAttention, use_short_attention
from lmforge.train.data import prepare
from lmforge.train.loop import OptimConfig, make_optimizer, use_bf16
from lmforge.train.pretrain import TrainConfig, Trainer

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")
GPT2 = dict(family="gpt2", vocab_size=61, dim=64, n_layers=2, n_heads=4, ffn_dim=128, norm="layernorm",
            mlp="gelu", activation="gelu", position="learned", tie_embeddings=True, qkv_bias=True,
            out_bias=True, mlp_bias=True, context_length=32)
LLAMA = dict(family="llama", vocab_size=61, dim=64, n_layers=2, n_heads=4, ffn_dim=96, context_length=32)


def _pair(**cfg: object) -> tuple[Transformer, Transformer, int]:
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**cfg))
    model.init_weights()
    fast = copy.deepcopy(model)
    return model, fast, use_short_attention(fast, CPU, True, 32)


@pytest.mark.parametrize("cfg", [GPT2, LLAMA], ids=["gpt2", "llama-rope"])
def test_short_attention_computes_the_models_attention(cfg: dict) -> None:
    model, fast, n = _pair(**cfg)
    assert n == 2 and all(type(blk.attn) is ShortAttention for blk in fast.layers)
    x = torch.randint(0, 61, (3, 29))
    want, got = model(x), fast(x)
    assert_close_scaled(got, want, 1e-5)
    want.square().mean().backward()
    got.square().mean().backward()
    for (name, p), q in zip(model.named_parameters(), fast.parameters()):
        assert_close_scaled(q.grad, p.grad, 1e-5, msg=name)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # how training runs it: within bf16's rounding
        assert_close_scaled(fast(x).float(), model(x).float(), 5e-2)


def test_short_attention_leaves_masks_and_caches_to_the_model() -> None:
    model, fast, _ = _pair(**GPT2)
    x = torch.randint(0, 61, (2, 12))
    pad = torch.ones(2, 12, dtype=torch.long)
    pad[1, 8:] = 0
    with torch.no_grad():  # the model's own path, so the very same numbers
        assert torch.equal(fast(x, attn_mask=pad), model(x, attn_mask=pad))


def test_short_attention_only_where_it_pays() -> None:
    assert _pair(**GPT2)[2] == 2
    for device, bf16, block in ((CPU, False, 32), (torch.device("cuda"), True, 32),
                                (CPU, True, SHORT_ATTENTION_MAX_POSITIONS + 1)):
        model = Transformer(ModelConfig(**GPT2))
        assert use_short_attention(model, device, bf16, block) == 0
        assert all(type(blk.attn) is Attention for blk in model.layers)
    for other in ({"n_kv_heads": 2}, {"sliding_window": 8}):  # grouped or windowed heads keep SDPA
        assert _pair(**(LLAMA | other))[2] == 0


def test_cpu_training_precision_and_optimizer(monkeypatch: pytest.MonkeyPatch) -> None:
    for forced, fast in (("1", True), ("0", False)):
        monkeypatch.setenv("LMFORGE_CPU_BF16", forced)
        assert use_bf16("auto", CPU, 128) is fast  # training's many rows: bf16 from width 128
        assert use_bf16("auto", CPU, 96) is False
    model = Transformer(ModelConfig(**GPT2))
    opt = make_optimizer(model, OptimConfig(lr=1e-3, max_iters=1, weight_decay=0.1), CPU)
    assert [g["fused"] for g in opt.param_groups] == [True, True]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]


def test_a_bf16_cpu_run_trains_with_short_attention(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LMFORGE_CPU_BF16", "1")
    text = "".join(f"line {i}: the {w} cat sat on the mat.\n" for i, w in enumerate(["red", "big", "old"] * 60))
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in text.splitlines()))
    tok = Tokenizer(train_tokenizer(), eos_token="<|endoftext|>")
    prepare([tmp_path / "c.jsonl"], tok, tmp_path / "data", val_fraction=0.2, workers=1, progress=False)
    cfg = TrainConfig(data=str(tmp_path / "data"), out=str(tmp_path / "run"), model={
        k: v for k, v in GPT2.items() if k not in ("vocab_size", "context_length")} | {"dim": 128},
        batch_size=4, block_size=16, max_iters=40, lr=3e-3, warmup_iters=2, eval_interval=40, eval_iters=2,
        save_interval=40, device="cpu", samples=0)
    trainer = Trainer(cfg, log=lambda s: None)
    assert trainer.bf16 is cpu.fast_bf16() is True
    assert all(type(blk.attn) is ShortAttention for blk in trainer.model.layers)
    losses = trainer.fit()
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:3]) / 3
