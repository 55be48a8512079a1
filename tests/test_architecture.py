"""The package layering: the model core computes in plain PyTorch, acceleration is installed from outside."""

from __future__ import annotations

import ast
import copy
import re
from pathlib import Path

import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import quantize
from numerics import assert_close_scaled

import lmforge
from lmforge.engine.kv_cache import KVCache
from lmforge.model import ModelConfig, Transformer

SRC = Path(lmforge.__file__).resolve().parent


def _lmforge_imports(path: Path) -> list[str]:
    """Absolute names of the lmforge modules a file imports (relative imports resolved)."""
    package = ["lmforge", *path.parent.relative_to(SRC).parts]
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names if a.name.split(".")[0] == "lmforge"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                names.append(".".join(base + ([node.module] if node.module else [])))
            elif node.module and node.module.split(".")[0] == "lmforge":
                names.append(node.module)
    return names


def test_model_core_imports_nothing_from_lmforge_but_its_error_type() -> None:
    files = sorted((SRC / "model").rglob("*.py"))
    assert len(files) >= 4
    bad = {f"{f.relative_to(SRC)}: {name}" for f in files for name in _lmforge_imports(f)
           if not (name == "lmforge.errors" or name == "lmforge.model" or name.startswith("lmforge.model."))}
    assert not bad, sorted(bad)


def _llama(**kw) -> Transformer:
    cfg = ModelConfig(vocab_size=200, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, context_length=64, **kw)
    model = Transformer(cfg)
    torch.manual_seed(0)
    for p in model.parameters():
        torch.nn.init.normal_(p, 0.0, 0.3)
    return model.eval()


def _prefill_and_decode(model: Transformer, steps: int = 4) -> list[torch.Tensor]:
    """Logits of a two-row prefill into a KV cache, then of one-token decode steps."""
    prompts = torch.tensor([[5, 9, 13, 2, 7], [3, 1, 4, 1, 5]])
    cache = KVCache(model.cfg, 2, 32)
    outs = []
    with torch.inference_mode():
        x = model(prompts, cache=cache, start_pos=[0, 0])
        outs.append(x)
        for i in range(steps):
            x = model(x[:, -1:].argmax(-1), cache=cache, start_pos=[5 + i, 5 + i])
            outs.append(x)
    return outs


def test_forward_uses_c_kernels_only_once_accelerated(monkeypatch: pytest.MonkeyPatch) -> None:
    from lmforge.formats import kernel_dir
    from lmforge.quant import accelerate, kernels
    from lmforge.quant import packed as packed_module
    from lmforge.quant.packed import from_gguf_blocks

    if kernels.load(kernel_dir()) is None:
        pytest.skip("needs the C kernels (AVX2 and a C compiler)")
    plain = _llama()
    fast = accelerate(copy.deepcopy(plain), kernel_dir())
    calls: list[str] = []
    for mod, name in ((kernels, "rms_norm"), (kernels, "swiglu"), (kernels, "rope_"), (kernels, "attn_decode_rows"),
                      (packed_module, "packed_matmul")):
        real = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, _n=name, _f=real: calls.append(_n) or _f(*a))

    expected = _prefill_and_decode(plain)
    assert calls == []  # the model core alone never reaches the C kernels
    got = _prefill_and_decode(fast)
    assert {"rms_norm", "swiglu", "rope_", "attn_decode_rows"} <= set(calls)
    # Dense fp32: the same arithmetic in another order (C loops, not MKL / SDPA); logits reach ~30.
    for g, e in zip(got, expected, strict=True):
        assert_close_scaled(g, e, 1e-5)

    # Packed GGUF codes: products straight from the codes, with int16 activations by default. The dense
    # weights are the codes' exact dequantization, so the plain model computes the same function.
    packed = {}
    for name, m in plain.named_modules():
        if name.endswith(("attn.qkv", "attn.o", "mlp.gate_up", "mlp.down")):
            n, k = m.weight.shape
            pw = from_gguf_blocks(quantize(m.weight.detach().numpy(), GGMLQuantizationType.Q8_0), "Q8_0", n, k)
            m.weight.data = pw.dequantize()
            packed[name] = pw
    expected = _prefill_and_decode(plain)
    for act16, tol in (("0", 1e-5), ("1", 5e-3)):  # int16 rounding: ~1e-3 of the logits' magnitude
        monkeypatch.setenv("LMFORGE_ACT16", act16)
        calls.clear()
        got = _prefill_and_decode(accelerate(copy.deepcopy(plain), kernel_dir(), packed))
        assert "packed_matmul" in calls or act16 == "1"  # with int16 activations the fused stack runs instead
        for g, e in zip(got, expected, strict=True):
            assert_close_scaled(g, e, tol)


# -- the import graph ------------------------------------------------------------------------------------
# Each top-level module or package of lmforge has a level; a module may import only from its own level or
# below, and packages of one level use each other one way (no cycles). docs/architecture.md draws this.
LEVELS = {
    "errors": 0,
    "fsutil": 1, "device": 1, "registry": 1, "tokenizer": 1,  # neutral helpers, usable from anywhere above
    "model": 2,
    "quant": 3,
    "formats": 4,
    "engine": 5, "tools": 5, "train": 5, "finetune": 5, "eval": 5, "encoders": 5, "analysis": 5,
    "api": 6,
    "chat": 7, "translate": 7, "retrieval": 7, "agent": 7, "serve": 7, "cli": 7, "__main__": 7, "": 7,  # "": the lmforge package itself
}
MAX_LINES = 500


def _modules() -> dict[str, Path]:
    """lmforge module name -> source file, for every module of the package."""
    out = {}
    for f in sorted(SRC.rglob("*.py")):
        parts = ["lmforge", *f.relative_to(SRC).with_suffix("").parts]
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def _unit(module: str) -> str:
    """The top-level module or package a module belongs to ("" for the lmforge package itself)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _package(module: str, modules: dict[str, Path]) -> str:
    return module if modules[module].name == "__init__.py" else module.rpartition(".")[0]


def _imports(module: str, modules: dict[str, Path]) -> list[tuple[str, str | None, int]]:
    """(imported module, imported name or None, line) for each lmforge import in a module, lazy ones included."""
    package = _package(module, modules).split(".")
    out: list[tuple[str, str | None, int]] = []
    for node in ast.walk(ast.parse(modules[module].read_text(), str(modules[module]))):
        if isinstance(node, ast.Import):
            out += [(a.name, None, node.lineno) for a in node.names if a.name.split(".")[0] == "lmforge"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                target = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
            elif node.module and node.module.split(".")[0] == "lmforge":
                target = node.module
            else:
                continue
            for a in node.names:
                sub = f"{target}.{a.name}"
                out.append((sub, None, node.lineno) if sub in modules else (target, a.name, node.lineno))
    return out


def test_imports_flow_one_way_down_the_layers() -> None:
    modules = _modules()
    assert {_unit(m) for m in modules} <= set(LEVELS), "a new top-level module needs a level in LEVELS (and docs)"
    bad, edges = [], {}
    for module in modules:
        for target, name, line in _imports(module, modules):
            src, dst = _unit(module), _unit(target)
            if src == dst or (dst == "" and name is not None and name.startswith("__")):  # __version__
                continue
            where = f"{modules[module].relative_to(SRC)}:{line} imports {target}"
            if LEVELS[dst] > LEVELS[src]:
                bad.append(f"{where} (level {LEVELS[dst]} above {src}'s {LEVELS[src]})")
            edges.setdefault(src, {}).setdefault(dst, where)
    assert not bad, "\n".join(bad)
    # Within a level the packages use each other one way: no cycle.
    for start in edges:
        stack = [(start, [start])]
        while stack:
            node, path = stack.pop()
            for nxt in edges.get(node, {}):
                if nxt == start:
                    chain = [edges[a][b] for a, b in zip(path, [*path[1:], start])]
                    raise AssertionError("import cycle between packages:\n" + "\n".join(chain))
                if nxt not in path:
                    stack.append((nxt, [*path, nxt]))


def test_no_private_name_crosses_a_package() -> None:
    """`_name`s stay inside their package: imported by name, or reached as an attribute of an imported module."""
    modules = _modules()
    bad = []
    for module, path in modules.items():
        imported = _imports(module, modules)
        for target, name, line in imported:
            if name and name.startswith("_") and not name.startswith("__") and _unit(target) != _unit(module):
                bad.append(f"{path.relative_to(SRC)}:{line} imports {target}.{name}")
        # `from lmforge.x import y` (a module) then `y._z`
        aliases = {}
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                for a in node.names:
                    hit = [t for t, n, _ in imported if n is None and t.endswith("." + a.name)]
                    if hit and _unit(hit[0]) != _unit(module):
                        aliases[a.asname or a.name] = hit[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                bad.append(f"{path.relative_to(SRC)}:{node.lineno} uses {aliases[node.value.id]}.{node.attr}")
    assert not bad, "\n".join(bad)


def test_no_source_file_is_over_500_lines() -> None:
    files = [f for f in SRC.rglob("*") if f.suffix in (".py", ".c", ".h")]
    assert len(files) > 40
    long = [f"{f.relative_to(SRC)}: {n} lines" for f in files if (n := len(f.read_text().splitlines())) > MAX_LINES]
    assert not long, "\n".join(long)


def test_architecture_doc_lists_the_same_layers() -> None:
    """docs/architecture.md's layer table names every module at the level LEVELS gives it."""
    doc = (SRC.parents[1] / "docs" / "architecture.md").read_text()
    documented = {}
    for line in doc.splitlines():
        cells = line.split("|")
        if len(cells) > 3 and cells[1].strip().split(" ")[0].isdigit():
            level = int(cells[1].split()[0])
            for name in re.findall(r"`([a-z_]+)(?:\.py|/)`", cells[2]):
                documented[name] = level
    assert documented == {k: v for k, v in LEVELS.items() if k not in ("", "__main__")}
