"""The packed decode path computes what the dense (dequantized) weights compute."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize

from lmforge.model.quant import MAX_ROWS, PackedLinear, from_gguf_blocks, kernel, packed_matmul

N, K = 96, 128

needs_kernel = pytest.mark.skipif(kernel() is None, reason="no C compiler or no AVX2 on this machine")


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
    np.testing.assert_allclose(pw.dequantize().numpy(), ref, rtol=0, atol=1e-6)
    assert np.abs(ref - weight).max() > 1e-3  # really quantized: the test compares codes, not a copy


def test_other_types_are_not_packed(weight: np.ndarray) -> None:
    raw = quantize(weight, GGMLQuantizationType.Q5_0)
    assert from_gguf_blocks(raw, "Q5_0", N, K) is None


@needs_kernel
@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0"])
@pytest.mark.parametrize("rows", [1, 3, MAX_ROWS])
def test_kernel_matches_dense(weight: np.ndarray, qtype: str, rows: int) -> None:
    pw = from_gguf_blocks(quantize(weight, GGMLQuantizationType[qtype]), qtype, N, K)
    x = torch.randn(rows, K, generator=torch.Generator().manual_seed(rows))
    got = packed_matmul(x, pw, kernel())
    want = x @ pw.dequantize().T
    assert got.shape == (rows, N)
    torch.testing.assert_close(got, want, rtol=0, atol=2e-4)


@needs_kernel
def test_packed_linear_paths_and_staleness(weight: np.ndarray) -> None:
    pw = from_gguf_blocks(quantize(weight, GGMLQuantizationType.Q4_1), "Q4_1", N, K)
    bias = torch.randn(N)
    layer = PackedLinear(pw.dequantize(), bias.clone(), pw)
    x1, x_many = torch.randn(1, 1, K), torch.randn(2, 16, K)
    with torch.inference_mode():
        torch.testing.assert_close(layer(x1), torch.nn.functional.linear(x1, layer.weight, layer.bias), atol=2e-4, rtol=0)
        torch.testing.assert_close(layer(x_many), torch.nn.functional.linear(x_many, layer.weight, layer.bias))
    assert layer.packed is not None
    with torch.no_grad():
        layer.weight.mul_(2.0)  # e.g. an optimizer step: the codes no longer describe the weight
    with torch.inference_mode():
        torch.testing.assert_close(layer(x1), torch.nn.functional.linear(x1, layer.weight, layer.bias))
    assert layer.packed is None
    assert list(dict(layer.state_dict())) == ["weight", "bias"]  # the codes are not part of the checkpoint
