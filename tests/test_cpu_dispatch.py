"""Run-time CPU dispatch (quant/cpu.py): feature detection, kernels built per feature set, and the bf16
path for large CPU products, which every test here can force (LMFORGE_CPU_BF16=1), so it is checked on
machines where it is not the default too."""

from __future__ import annotations

import ctypes
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from numerics import assert_close_scaled
from torch import nn

from lmforge.errors import LMForgeError
from lmforge.formats import kernel_dir
from lmforge.quant import accelerate, cpu, kernels
from lmforge.quant.packed import PackedLinear, PackedWeight
from lmforge.train.loop import use_bf16

WIDE = 512  # at least cpu.BF16_MIN_WIDTH
ROWS = cpu.PACKED_ROWS_BF16 + 4  # more rows than the packed products take where bf16 is fast


def test_features_agree_with_pytorch() -> None:
    f = cpu.features()
    assert f.avx2 == torch.cpu._is_avx2_supported()
    assert f.avx512_bf16 == torch.cpu._is_avx512_bf16_supported()
    if torch.cpu._is_amx_tile_supported():  # (a VM may list AMX flags that PyTorch does not take up)
        assert f.amx_bf16 or f.amx_int8
    assert f.model
    assert ("AVX-512 BF16" in f.names) == f.avx512_bf16


def test_default_choice_follows_the_features(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LMFORGE_CPU_BF16", raising=False)
    monkeypatch.delenv("LMFORGE_EXACT", raising=False)
    f = cpu.features()
    assert cpu.fast_bf16() == (f.avx512_bf16 or f.amx_bf16)
    assert cpu.packed_rows(16) == (cpu.PACKED_ROWS_BF16 if cpu.fast_bf16() else 16)
    monkeypatch.setenv("LMFORGE_EXACT", "1")
    assert not cpu.fast_bf16() and cpu.packed_rows(16) == 16 and not kernels.act16()
    monkeypatch.setenv("LMFORGE_EXACT", "0")
    monkeypatch.setenv("LMFORGE_CPU_BF16", "1")
    assert cpu.fast_bf16() and cpu.packed_rows(16) == cpu.PACKED_ROWS_BF16
    monkeypatch.setenv("LMFORGE_CPU_BF16", "0")
    assert not cpu.fast_bf16()
    for name, bad in (("LMFORGE_CPU_BF16", "yes"), ("LMFORGE_EXACT", "true")):  # refused, never ignored
        with monkeypatch.context() as m:
            m.setenv(name, bad)
            with pytest.raises(LMForgeError, match=f"{name} must be .* got '{bad}'"):
                cpu.fast_bf16()


@pytest.mark.skipif(kernels.load(kernel_dir()) is None, reason="no C compiler or no AVX2 on this machine")
def test_kernels_are_built_and_named_per_instruction_set(tmp_path: Path) -> None:
    """The library's name carries its compiler flags, so a cache shared with another machine (another
    feature set, other flags) is never loaded here: this machine builds its own beside it."""
    flags = cpu.compile_flags()
    assert flags[:2] == ["-mavx2", "-mfma"]
    assert ("-mavx512f" in flags) == cpu.features().avx512
    mine, other = kernels.library_name(flags), kernels.library_name(["-mavx2", "-mfma", "-mamx-tile"])
    assert mine != other and mine == kernels.library_name(list(flags))
    (tmp_path / other).write_bytes(b"not a library")  # another machine's build
    kernels.lib.cache_clear()
    kernels.use_build_dir(tmp_path)
    try:
        so = kernels.lib()
        assert so is not None and Path(so._name) == tmp_path / mine
        assert isinstance(so.q4_gemv, ctypes._CFuncPtr)
    finally:
        kernels.lib.cache_clear()
        kernels.use_build_dir(kernel_dir())
        assert kernels.lib() is not None


def _layer(width: int = WIDE, out: int = 384, bias: bool = True) -> nn.Linear:
    torch.manual_seed(0)
    lin = nn.Linear(width, out, bias=bias)
    accelerate(nn.Sequential(lin), kernel_dir())
    return lin


def test_bf16_path_for_many_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LMFORGE_CPU_BF16", "1")
    lin = _layer()
    assert type(lin).__name__ == "FastLinear"
    x = torch.randn(2, ROWS, WIDE)
    with torch.no_grad():
        got = lin(x)
        exact = F.linear(x, lin.weight, lin.bias)
        bf16 = F.linear(x.bfloat16(), lin.weight.bfloat16()).float() + lin.bias
    assert got.dtype == torch.float32
    assert torch.equal(got, bf16)  # really the bf16 product
    assert not torch.equal(got, exact)
    assert_close_scaled(got, exact, 1e-2)  # bf16 inputs, fp32 accumulation: ~3 significant digits


def test_exact_where_bf16_does_not_apply(monkeypatch: pytest.MonkeyPatch) -> None:
    """Narrow layers, training (gradients), the exact mode and LMFORGE_CPU_BF16=0 all compute in fp32."""
    monkeypatch.setenv("LMFORGE_CPU_BF16", "1")
    narrow = _layer(width=64)
    x = torch.randn(ROWS, 64)
    with torch.no_grad():
        assert torch.equal(narrow(x), F.linear(x, narrow.weight, narrow.bias))
    lin = _layer()
    x = torch.randn(ROWS, WIDE, requires_grad=True)
    y = lin(x)
    assert torch.equal(y, F.linear(x, lin.weight, lin.bias))
    y.sum().backward()  # differentiable: the plain product
    assert x.grad is not None
    for env in (("LMFORGE_EXACT", "1"), ("LMFORGE_CPU_BF16", "0")):
        with monkeypatch.context() as m:
            m.setenv(*env)
            with torch.no_grad():
                assert torch.equal(lin(x.detach()), F.linear(x.detach(), lin.weight, lin.bias))


def test_bf16_copy_follows_weight_updates(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LMFORGE_CPU_BF16", "1")
    lin = _layer(bias=False)
    x = torch.randn(ROWS, WIDE)
    with torch.no_grad():
        before = lin(x)
        lin.weight.mul_(2)  # an in-place update, as an optimizer step makes
        after = lin(x)
    assert_close_scaled(after, 2 * before, 1e-2)
    assert torch.equal(after, F.linear(x.bfloat16(), lin.weight.bfloat16()).float())
    assert "_bf16_weight" not in lin.state_dict() and len(list(lin.parameters())) == 1


@pytest.mark.skipif(kernels.load(kernel_dir()) is None, reason="no C compiler or no AVX2 on this machine")
def test_packed_layer_takes_codes_for_few_rows_and_bf16_for_more(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LMFORGE_CPU_BF16", "1")
    torch.manual_seed(0)
    n, k = 256, WIDE
    codes = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8)
    pw = PackedWeight("q4", codes, torch.rand(n, k // 32) / 8, -torch.rand(n, k // 32))
    dense = pw.dequantize()
    lin = PackedLinear(dense.clone(), None, pw)
    with torch.no_grad():
        few = torch.randn(cpu.PACKED_ROWS_BF16, k)
        assert torch.equal(lin(few), kernels.packed_matmul(few, pw))
        many = torch.randn(cpu.PACKED_ROWS_BF16 + 1, k)
        assert torch.equal(lin(many), F.linear(many.bfloat16(), dense.bfloat16()).float())
    monkeypatch.setenv("LMFORGE_CPU_BF16", "0")  # without bf16 the codes serve up to MAX_ROWS rows
    with torch.no_grad():
        rows = torch.randn(kernels.MAX_ROWS, k)
        assert torch.equal(lin(rows), kernels.packed_matmul(rows, pw))


def test_training_precision_auto(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu_dev = torch.device("cpu")
    for forced, fast in (("1", True), ("0", False)):
        monkeypatch.setenv("LMFORGE_CPU_BF16", forced)
        assert use_bf16("auto", cpu_dev, 576) is fast
        assert use_bf16("auto", cpu_dev, 64) is False  # narrow models stay in fp32
        assert use_bf16("fp32", cpu_dev, 576) is False and use_bf16("bf16", cpu_dev, 64) is True


def test_info_system_prints_features_and_paths() -> None:
    out = subprocess.run([sys.executable, "-m", "lmforge", "info", "--system"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    lines = dict(line.split(": ", 1) for line in out.stdout.splitlines())
    f = cpu.features()
    assert lines["cpu"].startswith(f.model)
    assert lines["cpu features"] == ", ".join(f.names)
    want = "bf16 matmul" if cpu.fast_bf16() else "fp32 matmul"
    assert lines["path (prefill, batched decode, scoring)"].startswith(want)
    assert "cuda" in lines
    bad = subprocess.run([sys.executable, "-m", "lmforge", "info"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "--system" in bad.stderr and "Traceback" not in bad.stderr
