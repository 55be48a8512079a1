"""The C kernels' instruction-set variants (cpu.KERNEL_VARIANTS: AVX2, AVX-VNNI, AVX-512, AVX-512 VNNI):
every variant this CPU can run gives the AVX2 variant's results bit for bit, for every code kind, int16
and fp32 activations and 1..MAX_ROWS rows, and a variant needing a feature the CPU lacks is never built
or loaded."""

from __future__ import annotations

import ctypes
import dataclasses
from pathlib import Path

import pytest
import torch
from numerics import assert_close_scaled
from test_kquants import _generate, write_kquant_gguf

from lmforge.errors import LMForgeError
from lmforge.formats import kernel_dir, load_checkpoint
from lmforge.quant import cpu, kernels
from lmforge.quant.kernels import MAX_ROWS, packed_matmul
from lmforge.quant.packed import PackedWeight

needs_kernel = pytest.mark.skipif(kernels.load(kernel_dir()) is None, reason="no C compiler or no AVX2 on this machine")

DOT = {"avx512-vnni": "AVX-512 VNNI", "avx512": "AVX-512", "avx-vnni": "AVX-VNNI", "avx2": "AVX2"}
GROUP_BYTES = {"q4": 16, "q5": 20, "q6": 24, "q8": 32}


@pytest.fixture(scope="module")
def libs() -> dict[str, ctypes.CDLL]:
    """Every variant this CPU can run that the compiler builds (AVX2 always), by name."""
    built = {v: kernels.build(v, kernel_dir()) for v in cpu.kernel_variants()}
    built = {v: so for v, so in built.items() if so is not None}
    assert "avx2" in built
    return built


def random_packed(kind: str, n: int, k: int, seed: int) -> PackedWeight:
    """Random codes (every bit pattern of the layout) with scales and zero points giving weights of ~0.1."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 256, (n, k // 32 * GROUP_BYTES[kind]), dtype=torch.uint8, generator=g)
    if kind == "q8":
        codes = codes.view(torch.int8).view(n, k)
    scale = (torch.rand(n, k // 32, *((2,) if kind == "q6" else ()), generator=g) + 0.5) * (0.1 / 32)
    zero = -torch.rand(n, k // 32, generator=g) * 0.1 * (kind in ("q4", "q5"))  # q6, q8: no zero points
    return PackedWeight(kind, codes, scale, zero)


def test_variants_follow_the_features(monkeypatch: pytest.MonkeyPatch) -> None:
    f = cpu.features()
    usable = cpu.kernel_variants()
    assert usable[-1:] == (["avx2"] if f.avx2 and f.fma else [])
    assert ("avx512-vnni" in usable) == (f.avx512 and f.avx512_vnni)
    assert ("avx512" in usable) == f.avx512 and ("avx-vnni" in usable) == f.avx_vnni
    monkeypatch.delenv("LMFORGE_KERNELS", raising=False)
    assert cpu.kernel_variant() == (usable[0] if usable else None)
    assert cpu.compile_flags() == list(cpu.KERNEL_VARIANTS[usable[0] if usable else "avx2"][0])
    monkeypatch.setenv("LMFORGE_KERNELS", "0")
    assert cpu.kernel_variant() is None
    monkeypatch.setenv("LMFORGE_KERNELS", "sse2")  # refused, never ignored
    with pytest.raises(LMForgeError, match="LMFORGE_KERNELS must be .* got 'sse2'"):
        cpu.kernel_variant()


@needs_kernel
def test_each_variant_reports_its_dot_product_path(libs: dict[str, ctypes.CDLL], monkeypatch) -> None:
    for variant, so in libs.items():
        assert kernels.dot_path(so) == DOT[variant]
    monkeypatch.delenv("LMFORGE_KERNELS", raising=False)
    # the default library is the best variant the compiler builds, and `info --system` says which
    assert kernels.dot_path() == DOT[next(v for v in cpu.kernel_variants() if v in libs)]
    path = cpu.paths(MAX_ROWS, True, kernels.dot_path())
    assert any(p.endswith(f"(int16 activations, {kernels.dot_path()} dot products)") for p in path.values())


@needs_kernel
@pytest.mark.parametrize("kind", ["q4", "q5", "q6", "q8"])
@pytest.mark.parametrize("act16", [True, False])
@pytest.mark.parametrize("k", [512, 608, 32])  # 16 groups, 19 (an odd last group), 1 (no pair at all)
def test_variants_match_avx2_bit_for_bit(libs: dict[str, ctypes.CDLL], kind: str, act16: bool, k: int,
                                         monkeypatch) -> None:
    monkeypatch.setenv("LMFORGE_ACT16", "1" if act16 else "0")
    n = 40
    pw = random_packed(kind, n, k, seed=k)
    x = torch.randn(MAX_ROWS, k, generator=torch.Generator().manual_seed(1)) * 3
    x[:, :32] *= 50  # groups of very different magnitudes: the int16 scales differ per group
    dense = x @ pw.dequantize().T
    for rows in range(1, MAX_ROWS + 1):
        want = packed_matmul(x[:rows], pw, libs["avx2"])
        # the reference really is the product (int16 activations: within ~1e-4 of the output range)
        assert_close_scaled(want, dense[:rows], 2e-4 if act16 else 5e-6)
        for variant, so in libs.items():
            got = packed_matmul(x[:rows], pw, so)
            assert torch.equal(got, want), (variant, rows, (got - want).abs().max())


@needs_kernel
def test_segments_of_kinds_match_across_variants(libs: dict[str, ctypes.CDLL], monkeypatch) -> None:
    monkeypatch.setenv("LMFORGE_ACT16", "1")
    parts = [random_packed(kind, 8 * (i + 1), 288, seed=i) for i, kind in enumerate(("q4", "q6", "q5", "q8"))]
    pw = PackedWeight.cat(parts)
    x = torch.randn(5, 288, generator=torch.Generator().manual_seed(2))
    want = packed_matmul(x, pw, libs["avx2"])
    for so in libs.values():
        assert torch.equal(packed_matmul(x, pw, so), want)


@needs_kernel
def test_fused_decode_stack_is_bit_identical_across_variants(libs, tmp_path: Path, monkeypatch) -> None:
    """Whole-model greedy decoding (the fused C block stack, three rows a step) gives the same tokens and
    log-probs, bit for bit, on every variant."""
    from lmforge.quant import fused

    monkeypatch.setenv("LMFORGE_CPU_BF16", "0")
    monkeypatch.setenv("LMFORGE_ACT16", "1")
    model = load_checkpoint(write_kquant_gguf(tmp_path / "k.gguf"), device="cpu", dtype=torch.float32).model
    assert fused.plan(model) is not None
    runs = {}
    try:
        for variant in libs:
            monkeypatch.setenv("LMFORGE_KERNELS", variant)
            kernels.lib.cache_clear()
            assert kernels.dot_path() == DOT[variant]
            runs[variant] = _generate(model)
    finally:
        monkeypatch.delenv("LMFORGE_KERNELS")
        kernels.lib.cache_clear()
    assert all(run == runs["avx2"] for run in runs.values())
    assert len(runs) == len(libs)


def test_a_variant_the_cpu_lacks_is_never_built_or_loaded(tmp_path: Path, monkeypatch) -> None:
    """On a CPU with AVX2 + FMA only, asking for a wider variant is refused before anything is compiled, and
    the default loads the AVX2 build."""
    real = cpu.features()
    avx2_only = dataclasses.replace(real, avx2=True, fma=True, avx512=False, avx512_vnni=False,
                                    avx_vnni=False)
    monkeypatch.setattr(cpu, "features", lambda: avx2_only)
    assert cpu.kernel_variants() == ["avx2"]
    for variant in ("avx512-vnni", "avx512", "avx-vnni"):
        with pytest.raises(LMForgeError, match=f"kernel variant '{variant}' needs CPU features"):
            kernels.build(variant, tmp_path)
        monkeypatch.setenv("LMFORGE_KERNELS", variant)
        with pytest.raises(LMForgeError, match=f"LMFORGE_KERNELS={variant} needs CPU features this CPU lacks"):
            cpu.kernel_variant()
    assert list(tmp_path.iterdir()) == []  # nothing was compiled
    if not (real.avx2 and real.fma):
        return  # (this CPU cannot load even the AVX2 build; the refusals above are what it can check)
    monkeypatch.setenv("LMFORGE_KERNELS", "1")
    kernels.lib.cache_clear()
    kernels.use_build_dir(tmp_path)
    try:
        so = kernels.lib()
        assert so is not None and kernels.dot_path(so) == "AVX2"
        assert [p.name for p in tmp_path.glob("*.so")] == [kernels.library_name(["-mavx2", "-mfma", "-mf16c"])]
    finally:
        kernels.lib.cache_clear()
        kernels.use_build_dir(kernel_dir())
