"""GGUF K-quants (Q4_K, Q5_K, Q6_K) and Q5_0 / Q5_1 decode straight from their codes, like Q4_1 does.

Blocks are random but valid (random code bytes, sane fp16 scales), so every bit pattern of the layouts is
exercised; the reference is gguf-py's own `dequantize`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter
from gguf.quants import dequantize
from numerics import assert_close_scaled
from tiny import SPECIAL_TOKENS, train_tokenizer

from lmforge.formats import kernel_dir, load_checkpoint
from lmforge.quant import PackedLinear, PackedWeight, cpu, kernels
from lmforge.quant.kernels import MAX_ROWS, packed_matmul
from lmforge.quant.packed import from_gguf_blocks, use_packed

needs_kernel = pytest.mark.skipif(kernels.load(kernel_dir()) is None, reason="no C compiler or no AVX2 on this machine")

NEW_TYPES = ["Q4_K", "Q5_K", "Q6_K", "Q5_0", "Q5_1"]
KIND = {"Q4_K": "q4", "Q5_K": "q5", "Q6_K": "q6", "Q5_0": "q5", "Q5_1": "q5", "Q4_1": "q4", "Q8_0": "q8"}
# Where each type keeps its fp16 scales in a block, and a range that gives weights of ~0.1: (offset, low, high).
_SCALES = {"Q4_K": [(0, 2e-4, 4e-4), (2, 1e-4, 3e-4)], "Q5_K": [(0, 1e-4, 2e-4), (2, 1e-4, 3e-4)],
           "Q6_K": [(208, 2e-5, 4e-5)], "Q5_0": [(0, -0.02, 0.02)], "Q5_1": [(0, 0.005, 0.01), (2, -0.1, 0.0)],
           "Q4_1": [(0, 0.01, 0.02), (2, -0.1, 0.0)], "Q8_0": [(0, -1e-3, 1e-3)]}


def random_blocks(qtype: str, n: int, k: int, seed: int) -> np.ndarray:
    """Valid GGUF blocks uint8 [n, bytes]: random code, scale and min bytes, with fp16 super-scales in range."""
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (n, k // block * size), dtype=np.uint8)
    b = raw.reshape(n, -1, size)
    for off, lo, hi in _SCALES[qtype]:
        b[..., off:off + 2] = rng.uniform(lo, hi, b.shape[:2]).astype(np.float16).view(np.uint8).reshape(*b.shape[:2], 2)
    return raw


def reference(raw: np.ndarray, qtype: str, n: int, k: int) -> np.ndarray:
    return dequantize(raw, GGMLQuantizationType[qtype]).reshape(n, k)


@pytest.mark.parametrize("qtype", NEW_TYPES)
def test_blocks_decode_like_gguf(qtype: str) -> None:
    n, k = 24, 768 if qtype.endswith("_K") else 608  # 608: an odd number of groups of 32
    raw = random_blocks(qtype, n, k, seed=1)
    pw = from_gguf_blocks(raw, qtype, n, k)
    assert pw is not None and pw.kind == KIND[qtype] and pw.shape == (n, k)
    ref = reference(raw, qtype, n, k)
    assert_close_scaled(pw.dequantize().numpy(), ref, 1e-6)
    assert np.unique(ref).size > 100  # really random weights, not a constant
    # the codes take fewer bytes than fp32 weights: about 4.5 + 1.5 (q4) to 6 + 2 (q6) bits a weight
    assert pw.nbytes <= n * k


def test_k_quants_need_whole_super_blocks() -> None:
    raw = random_blocks("Q4_K", 4, 256, seed=0)
    assert from_gguf_blocks(raw, "Q4_K", 8, 128) is None  # rows of 128: not a super-block of 256


def test_segments_of_different_kinds_stack() -> None:
    """A fused q/k/v matrix whose parts the file stores in different types keeps every part's codes."""
    k = 512
    parts = [from_gguf_blocks(random_blocks(t, n, k, seed), t, n, k)
             for t, n, seed in (("Q4_K", 32, 1), ("Q4_K", 16, 2), ("Q6_K", 16, 3), ("Q5_K", 8, 4))]
    w = PackedWeight.cat(parts)
    assert w.kinds == "q4+q6+q5" and w.shape == (72, k)
    torch.testing.assert_close(w.dequantize(), torch.cat([p.dequantize() for p in parts]), rtol=0, atol=0)
    assert w.nbytes == sum(p.nbytes for p in parts)
    with pytest.raises(ValueError, match="permutation"):
        w.map_rows(lambda t: t)


def _products(pw: PackedWeight, rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _, k = pw.shape
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(seed))
    return x, packed_matmul(x, pw), x @ pw.dequantize().T


def _check(x: torch.Tensor, got: torch.Tensor, want: torch.Tensor, pw: PackedWeight, act16: bool) -> None:
    if not act16:  # fp32 activations: float rounding only
        assert_close_scaled(got, want, 5e-6)
        return
    # int16 activations: each is off by at most half a step (group max / 32767 / 2), so each output is off
    # by at most that step times the group's sum of |w|, summed over groups (plus float rounding).
    n, k = pw.shape
    rows = x.shape[0]
    w = pw.dequantize().abs().view(n, k // 32, 32).sum(-1)
    step = x.abs().view(rows, k // 32, 32).amax(-1) / 32767 / 2
    bound = step @ w.T + 2.5e-6 * want.abs().max()
    err = (got - want).abs()
    assert (err <= bound).all(), (err - bound).max()
    assert err.max() > 0  # the int16 path really ran


@needs_kernel
@pytest.mark.parametrize("qtype", NEW_TYPES)
@pytest.mark.parametrize("act16", [False, True])
def test_kernel_matches_dense(qtype: str, act16: bool, monkeypatch) -> None:
    monkeypatch.setenv("LMFORGE_ACT16", "1" if act16 else "0")
    n, k = 96, 512 if qtype.endswith("_K") else 608
    pw = from_gguf_blocks(random_blocks(qtype, n, k, seed=2), qtype, n, k)
    for rows in (1, 2, 3, 5, MAX_ROWS):
        x, got, want = _products(pw, rows, seed=rows)
        assert got.shape == (rows, n)
        _check(x, got, want, pw, act16)
    if act16:  # a row's product is bit-identical alone and at any place in any batch
        x = torch.randn(MAX_ROWS, k, generator=torch.Generator().manual_seed(7))
        alone = torch.cat([packed_matmul(x[i:i + 1], pw) for i in range(MAX_ROWS)])
        for m in (2, 3, 5, MAX_ROWS):
            assert torch.equal(packed_matmul(x[:m], pw), alone[:m])


@needs_kernel
@pytest.mark.parametrize("qtype", ["Q4_K", "Q5_K", "Q6_K"])
@pytest.mark.parametrize("bf16", ["0", None])  # LMFORGE_CPU_BF16=0: up to MAX_ROWS rows packed; None: default
def test_packed_linear_gives_the_dense_product(qtype: str, bf16: str | None, monkeypatch) -> None:
    """A PackedLinear over K-quant codes takes the packed path for 1..MAX_ROWS rows (as many as this
    machine's dispatch gives it) and computes the dense layer's product."""
    if bf16 is None:
        monkeypatch.delenv("LMFORGE_CPU_BF16", raising=False)
    else:
        monkeypatch.setenv("LMFORGE_CPU_BF16", bf16)
    n, k = 256, 512  # wide enough for the bf16 path where it is the default
    pw = from_gguf_blocks(random_blocks(qtype, n, k, seed=3), qtype, n, k)
    bias = torch.randn(n, generator=torch.Generator().manual_seed(0))
    layer = PackedLinear(pw.dequantize(), bias.clone(), pw)
    packed_rows = cpu.packed_rows(MAX_ROWS)
    assert packed_rows == MAX_ROWS or bf16 is None
    for rows in range(1, MAX_ROWS + 1):
        x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows))
        with torch.inference_mode():
            got = layer(x)
        dense = torch.nn.functional.linear(x, layer.weight, layer.bias)
        assert use_packed(x, layer.packed) == (rows <= packed_rows)
        if rows <= packed_rows:  # exactly the codes' product (plus the bias)
            assert torch.equal(got, packed_matmul(x, pw) + bias)
            _check(x, got - bias, dense - bias, pw, kernels.act16())
        else:  # fp32 or (where bf16 is fast) bf16 dense matmuls: ~1.5% of the range at worst
            assert_close_scaled(got, dense, 3e-2 if cpu.use_bf16(x, n, MAX_ROWS) else 1e-5)


# -- a tiny model GGUF with K-quant matrices ------------------------------------------------------------------
DIM, FFN, HEADS, KV_HEADS, LAYERS = 256, 512, 4, 2, 2
# Per layer: q, k, v, output, gate, up, down. Layer 0 is Q4_K_M-like (v and down in Q6_K); layer 1 mixes the
# types llama.cpp falls back to (Q5_0, Q5_1, Q8_0) with K-quants, so q/k/v and gate/up stack different kinds.
TYPES = [("Q4_K", "Q4_K", "Q6_K", "Q5_K", "Q4_K", "Q4_K", "Q6_K"),
         ("Q5_0", "Q5_0", "Q8_0", "Q5_1", "Q4_K", "Q5_K", "Q4_K")]


def write_kquant_gguf(path: Path) -> Path:
    tok = train_tokenizer()
    vocab_map = tok.get_vocab(with_added_tokens=True)
    tokens = [t for t, _ in sorted(vocab_map.items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in json.loads(tok.to_str())["model"]["merges"]]
    hd = DIM // HEADS
    w = GGUFWriter(str(path), "llama")
    w.add_name("tiny-kquants")
    for add, value in ((w.add_block_count, LAYERS), (w.add_context_length, 64), (w.add_embedding_length, DIM),
                       (w.add_feed_forward_length, FFN), (w.add_head_count, HEADS), (w.add_head_count_kv, KV_HEADS),
                       (w.add_layer_norm_rms_eps, 1e-5), (w.add_rope_dimension_count, hd),
                       (w.add_vocab_size, len(tokens))):
        add(value)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in SPECIAL_TOKENS else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_eos_token_id(vocab_map["<|im_end|>"])

    def add(name: str, qtype: str, n: int, k: int, seed: int) -> None:
        w.add_tensor(name, random_blocks(qtype, n, k, seed), raw_dtype=GGMLQuantizationType[qtype])

    add("token_embd.weight", "Q6_K", len(tokens), DIM, 0)  # tied: also the output matrix
    shapes = {"attn_q": (DIM, DIM), "attn_k": (KV_HEADS * hd, DIM), "attn_v": (KV_HEADS * hd, DIM),
              "attn_output": (DIM, DIM), "ffn_gate": (FFN, DIM), "ffn_up": (FFN, DIM), "ffn_down": (DIM, FFN)}
    for i, types in enumerate(TYPES):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(DIM, np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(DIM, np.float32))
        for j, ((name, (n, k)), qtype) in enumerate(zip(shapes.items(), types, strict=True)):
            add(f"blk.{i}.{name}.weight", qtype, n, k, 10 * i + j + 1)
    w.add_tensor("output_norm.weight", np.ones(DIM, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def kquant_gguf(tmp_path_factory) -> Path:
    return write_kquant_gguf(tmp_path_factory.mktemp("kquants") / "tiny-kquants.gguf")


PROMPTS = [[5, 9, 13], [7] * 11, [3, 1, 4, 1, 5, 9, 2]]


def _generate(model: torch.nn.Module) -> list:
    from lmforge.engine import Engine, SamplingParams

    eng = Engine(model, None, max_batch=4)
    params = SamplingParams(max_tokens=8, temperature=0, logprobs=True, top_logprobs=3, ignore_eos=True)
    return [(s.output_ids, [(lp.logprob, lp.top) for lp in s.logprobs]) for s in eng.generate(PROMPTS, params)]


@needs_kernel
def test_kquant_gguf_loads_with_codes_and_generates_like_dense(kquant_gguf: Path, monkeypatch) -> None:
    monkeypatch.setenv("LMFORGE_CPU_BF16", "0")
    packed = load_checkpoint(kquant_gguf, device="cpu", dtype=torch.float32)
    dense = load_checkpoint(kquant_gguf, device="cpu", dtype=torch.float32, packed=False)
    assert packed.tensor_types == {"F32": 5, "Q4_K": 6, "Q5_K": 2, "Q6_K": 3, "Q5_0": 2, "Q8_0": 1, "Q5_1": 1}
    kinds = {name: m.packed.kinds for name, m in packed.model.named_modules() if isinstance(m, PackedLinear)}
    assert kinds == {"layers.0.attn.qkv": "q4+q6", "layers.0.attn.o": "q5", "layers.0.mlp.gate_up": "q4",
                     "layers.0.mlp.down": "q6", "layers.1.attn.qkv": "q5+q8", "layers.1.attn.o": "q5",
                     "layers.1.mlp.gate_up": "q4+q5", "layers.1.mlp.down": "q4"}
    assert packed.model.head_packed is not None and packed.model.head_packed.kind == "q6"
    assert not any(isinstance(m, PackedLinear) for m in dense.model.modules())
    for a, b in zip(packed.model.state_dict().values(), dense.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)  # the dense weights are the codes' exact dequantization

    monkeypatch.setenv("LMFORGE_ACT16", "0")  # fp32 activations: the packed products differ only by rounding
    got, want = _generate(packed.model), _generate(dense.model)
    assert [ids for ids, _ in got] == [ids for ids, _ in want]
    scale = max(abs(lp) for _, lps in want for lp, _ in lps) + 1.0  # log-probs near 0 come from ~this scale
    for (_, g), (_, w) in zip(got, want, strict=True):
        assert_close_scaled([lp for lp, _ in g], [lp for lp, _ in w], 1e-4, scale=scale)
    assert len({tuple(ids) for ids, _ in want}) > 1  # the prompts really lead to different continuations


@needs_kernel
def test_fused_decode_stack_takes_kquant_layers(kquant_gguf: Path, monkeypatch) -> None:
    """The whole-stack C call runs K-quant blocks (segments of different kinds included) and gives exactly
    the per-operation path's tokens and log-probs."""
    from lmforge.quant import fused

    monkeypatch.setenv("LMFORGE_CPU_BF16", "0")  # three rows a step: all of them packed
    monkeypatch.setenv("LMFORGE_ACT16", "1")
    model = load_checkpoint(kquant_gguf, device="cpu", dtype=torch.float32).model
    assert fused.plan(model) is not None
    together = _generate(model)
    monkeypatch.setattr(fused, "plan", lambda m: None)
    assert _generate(model) == together
