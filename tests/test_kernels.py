"""The packed decode path computes what the dense (dequantized) weights compute."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize
from numerics import assert_close_scaled

from lmforge.formats import kernel_dir
from lmforge.quant import accelerate, kernels
from lmforge.quant.kernels import MAX_ROWS, packed_matmul
from lmforge.quant.packed import PackedLinear, from_gguf_blocks

N, K = 96, 128

needs_kernel = pytest.mark.skipif(kernels.load(kernel_dir()) is None, reason="no C compiler or no AVX2 on this machine")


@pytest.fixture(scope="module")
def weight() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((N, K)).astype(np.float32)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0"])
def test_blocks_decode_like_gguf(weight: np.ndarray, qtype: str) -> None:
    t = GGMLQuantizationType[qtype]
    raw = quantize(weight, t)
    pw = from_gguf_blocks(raw, qtype, N, K)
    ref = dequantize(raw, t).reshape(N, K)
    assert pw is not None
    assert_close_scaled(pw.dequantize().numpy(), ref, 1e-6)
    assert np.abs(ref - weight).max() > 1e-3  # really quantized: the test compares codes, not a copy


def test_other_types_are_not_packed() -> None:
    raw = np.zeros((N, 2 * 110), np.uint8)  # two Q3_K super-blocks a row: a type without packed codes
    assert from_gguf_blocks(raw, "Q3_K", N, 2 * 256) is None


@needs_kernel
@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0"])
@pytest.mark.parametrize("rows", [1, 3, MAX_ROWS])
@pytest.mark.parametrize("act16", [False, True])
def test_kernel_matches_dense(weight: np.ndarray, qtype: str, rows: int, act16: bool, monkeypatch) -> None:
    monkeypatch.setenv("LMFORGE_ACT16", "1" if act16 else "0")
    pw = from_gguf_blocks(quantize(weight, GGMLQuantizationType[qtype]), qtype, N, K)
    x = torch.randn(rows, K, generator=torch.Generator().manual_seed(rows))
    got = packed_matmul(x, pw)
    want = x @ pw.dequantize().T
    assert got.shape == (rows, N)
    if not act16:  # fp32 activations: float rounding only (outputs reach ~40; measured 6e-7 of that)
        assert_close_scaled(got, want, 5e-6)
        return
    # int16 activations: each is off by at most half a step (group max / 32767 / 2), so each output
    # is off by at most that step times the group's sum of |w|, summed over groups.
    w = pw.dequantize().abs().view(N, K // 32, 32).sum(-1)  # [N, G]
    step = x.abs().view(rows, K // 32, 32).amax(-1) / 32767 / 2  # [rows, G]
    bound = step @ w.T + 2.5e-6 * want.abs().max()  # plus float rounding, as above
    err = (got - want).abs()
    assert (err <= bound).all(), (err - bound).max()
    assert err.max() > 0  # the int16 path really ran


@needs_kernel
@pytest.mark.parametrize("qtype", ["Q4_1", "Q8_0"])
@pytest.mark.parametrize("k", [K, 96])  # an odd number of groups too
def test_rows_do_not_depend_on_their_batch(qtype: str, k: int, monkeypatch) -> None:
    """With int16 activations a row's product is bit-identical alone and at any place in any batch, so a
    request decodes the same whether it is served alone or with others."""
    monkeypatch.setenv("LMFORGE_ACT16", "1")
    w = np.random.default_rng(1).standard_normal((N, k)).astype(np.float32)
    pw = from_gguf_blocks(quantize(w, GGMLQuantizationType[qtype]), qtype, N, k)
    x = torch.randn(MAX_ROWS, k, generator=torch.Generator().manual_seed(5))
    alone = torch.cat([packed_matmul(x[i:i + 1], pw) for i in range(MAX_ROWS)])
    for m in (2, 3, 5, MAX_ROWS):
        assert torch.equal(packed_matmul(x[:m], pw), alone[:m])


@needs_kernel
def test_packed_linear_paths_and_staleness(weight: np.ndarray) -> None:
    pw = from_gguf_blocks(quantize(weight, GGMLQuantizationType.Q4_1), "Q4_1", N, K)
    bias = torch.randn(N)
    layer = PackedLinear(pw.dequantize(), bias.clone(), pw)
    x1, x_many = torch.randn(1, 1, K), torch.randn(2, 16, K)
    with torch.inference_mode():
        assert_close_scaled(layer(x1), torch.nn.functional.linear(x1, layer.weight, layer.bias), 1.5e-4)  # int16
        torch.testing.assert_close(layer(x_many), torch.nn.functional.linear(x_many, layer.weight, layer.bias))
    assert layer.packed is not None
    with torch.no_grad():
        layer.weight.mul_(2.0)  # e.g. an optimizer step: the codes no longer describe the weight
    with torch.inference_mode():
        torch.testing.assert_close(layer(x1), torch.nn.functional.linear(x1, layer.weight, layer.bias))
    assert layer.packed is None
    assert list(dict(layer.state_dict())) == ["weight", "bias"]  # the codes are not part of the checkpoint


@needs_kernel
def test_fused_ops_match_pytorch() -> None:
    from lmforge.model.blocks import apply_rotary

    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(3, 5, 64, generator=g), torch.randn(64, generator=g)
    ref = w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
    torch.testing.assert_close(kernels.rms_norm(x, w, 1e-6), ref)

    h = torch.randn(2, 1, 2 * 48, generator=g)
    torch.testing.assert_close(kernels.swiglu(h), torch.nn.functional.silu(h[..., :48]) * h[..., 48:])
    # the vectorized exp over a batch large enough to thread, with gates far into both tails (and a
    # width that leaves a scalar remainder)
    h = torch.randn(16, 2 * 1540, generator=g) * 8
    h[0, :9] = torch.tensor([-1e4, -100.0, -88.0, -20.0, 0.0, 20.0, 88.0, 100.0, 1e4])
    ref = torch.nn.functional.silu(h[:, :1540].double()) * h[:, 1540:].double()
    torch.testing.assert_close(kernels.swiglu(h).double(), ref, rtol=2e-6, atol=1e-30)

    # rotary in place on a [b, t, heads * hd] projection: the first 3 heads (q, k) rotate, the last does not
    b, t, heads, hd = 2, 3, 4, 16
    proj = torch.randn(b, t, heads * hd, generator=g)
    angles = torch.rand(b, t, hd // 2, generator=g) * 6
    cos, sin = torch.cat([angles.cos()] * 2, -1)[:, None], torch.cat([angles.sin()] * 2, -1)[:, None]
    heads_view = proj.view(b, t, heads, hd).transpose(1, 2)
    want = torch.cat([apply_rotary(heads_view[:, :3], cos, sin), heads_view[:, 3:]], dim=1)
    kernels.rope_(proj, cos, sin, 3, hd)
    torch.testing.assert_close(proj.view(b, t, heads, hd).transpose(1, 2), want)


@needs_kernel
def test_attn_decode_rows_matches_sdpa_per_slot() -> None:
    """Rows continuing different slots at different positions: each stores its key/value in place and
    attends to its own slot's prefix, as SDPA over that slot would."""
    g = torch.Generator().manual_seed(1)
    nh, nkv, hd, cap = 6, 2, 32, 64
    kc, vc = torch.randn(4, nkv, cap, hd, generator=g), torch.randn(4, nkv, cap, hd, generator=g)
    before_k, before_v = kc.clone(), vc.clone()
    slots, pos = torch.tensor([3, 0, 2]), torch.tensor([36, 0, 9])
    proj = torch.randn(3, 1, (nh + 2 * nkv) * hd, generator=g)
    got = kernels.attn_decode_rows(proj, kc, vc, slots, pos, nh, nkv, hd)
    for r, (s, p) in enumerate(zip(slots.tolist(), pos.tolist())):
        q, k, v = proj[r, 0].view(nh + 2 * nkv, hd).split([nh, nkv, nkv])
        torch.testing.assert_close(kc[s, :, p], k)
        torch.testing.assert_close(vc[s, :, p], v)
        keys = torch.cat([before_k[s, :, :p], k[:, None]], 1)[None]
        vals = torch.cat([before_v[s, :, :p], v[:, None]], 1)[None]
        want = torch.nn.functional.scaled_dot_product_attention(q[None, :, None], keys, vals, enable_gqa=True)
        assert_close_scaled(got[r, 0], want.reshape(-1), 1e-5)
    untouched = torch.ones(4, cap, dtype=torch.bool)
    untouched[slots, pos] = False
    assert torch.equal(kc.transpose(1, 2)[untouched], before_k.transpose(1, 2)[untouched])


def _packed_tiny(qkv_bias: bool) -> torch.nn.Module:
    """A tiny Llama-style model whose block products carry GGUF codes, as the GGUF loader leaves them."""
    from lmforge.model import ModelConfig, Transformer

    cfg = ModelConfig(vocab_size=200, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, qkv_bias=qkv_bias,
                      context_length=64)
    model = Transformer(cfg)
    torch.manual_seed(0)
    for p in model.parameters():
        torch.nn.init.normal_(p, 0.0, 0.3)
    for blk in model.layers:
        for parent, attr, qtype in ((blk.attn, "qkv", "Q4_1"), (blk.attn, "o", "Q8_0"), (blk.mlp, "gate_up", "Q4_0"),
                                    (blk.mlp, "down", "Q4_1")):
            old = getattr(parent, attr)
            n, k = old.weight.shape
            pw = from_gguf_blocks(quantize(old.weight.detach().numpy(), GGMLQuantizationType[qtype]), qtype, n, k)
            bias = old.bias.detach().clone() if old.bias is not None else None
            setattr(parent, attr, PackedLinear(pw.dequantize(), bias, pw))
    return accelerate(model.eval(), kernel_dir())


@needs_kernel
@pytest.mark.parametrize("qkv_bias", [False, True])
def test_decode_stack_in_one_call_is_bit_identical(qkv_bias: bool, monkeypatch) -> None:
    """The whole-stack C call gives exactly the per-operation path's tokens and log-probs, for rows at
    different positions in different slots; a weight changed in place sends decoding back to the
    per-operation path (whose codes are then stale and unused)."""
    from lmforge.engine import Engine, SamplingParams
    from lmforge.quant import fused

    model = _packed_tiny(qkv_bias)
    prompts = [[5, 9, 13], [7] * 11, [3, 1, 4, 1, 5, 9, 2]]

    def run() -> list:
        eng = Engine(model, None, max_batch=4)
        params = SamplingParams(max_tokens=8, temperature=0, logprobs=True, top_logprobs=2)
        seqs = eng.generate(prompts, params)
        return [(s.output_ids, [(lp.logprob, lp.top) for lp in s.logprobs]) for s in seqs]

    together = run()
    assert fused.plan(model) is not None
    assert fused.plan(copy.deepcopy(model)) is not None  # the cached plan's raw pointers stay behind
    monkeypatch.setattr(fused, "plan", lambda m: None)
    assert run() == together
    monkeypatch.undo()
    with torch.no_grad():
        model.layers[1].mlp.down.weight.mul_(1.5)
    assert fused.plan(model) is None
    # LoRA wrappers (no packed codes of their own) keep the per-operation path too, and still decode.
    from lmforge.finetune.lora import LoraConfig, apply_lora

    model = _packed_tiny(qkv_bias)
    apply_lora(model, LoraConfig(r=2))
    assert fused.plan(model) is None
    assert len(run()[0][0]) == 8
