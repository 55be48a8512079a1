"""LoRA / QLoRA adapters: exact start, frozen base, merging, NF4, PEFT-format saving, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from numerics import assert_close_scaled
from tiny import make_tiny_llama_dir, write_tiny_gguf

from lmforge.cli import main
from lmforge.errors import LMForgeError
from lmforge.finetune.lora import (
    LoraConfig,
    LoraLinear,
    adapter_state_dict,
    adapters_disabled,
    apply_lora,
    attach_adapter,
    load_adapter,
    lora_layers,
    lora_parameters,
    merge_lora,
    save_adapter,
)
from lmforge.finetune.qlora import load_quantized
from lmforge.formats import load_checkpoint
from lmforge.model import ModelConfig, Transformer
from lmforge.quant import PackedLinear
from lmforge.quant.accel import FastLinear
from lmforge.quant.nf4 import NF4_LEVELS, NF4_MAX_ERROR, NF4Linear, nf4_dequantize, nf4_quantize

pytestmark = pytest.mark.usefixtures("one_thread")
IDS = torch.tensor([[5, 17, 300, 42, 99, 7, 250, 3], [64, 128, 1, 277, 31, 260, 8, 200]])
# More rows than the packed decode kernel takes: GGUF layers then run dense, exactly, on both sides.
LONG = IDS.repeat(2, 4)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama_dir(tmp_path_factory.mktemp("lora") / "base")


@pytest.fixture(scope="module")
def q4_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny GGUF with every matrix stored as Q4_1 blocks, as llama.cpp quantizes them."""
    from gguf import GGMLQuantizationType, GGUFWriter
    from gguf.quants import quantize

    q4 = GGMLQuantizationType.Q4_1
    orig = GGUFWriter.add_tensor

    def add(self: GGUFWriter, name: str, arr: np.ndarray, **kw: object) -> None:
        if arr.ndim == 2 and not kw:
            return orig(self, name, quantize(arr, q4), raw_dtype=q4)
        return orig(self, name, arr, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(GGUFWriter, "add_tensor", add)
        return write_tiny_gguf(tmp_path_factory.mktemp("lora") / "q4.gguf")


def load(path: Path, **kw: object) -> Transformer:
    return load_checkpoint(path, device="cpu", dtype=torch.float32, **kw).model


def randomize_adapters(model: torch.nn.Module, seed: int = 0, std: float = 0.05) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(std * torch.randn(p.shape, generator=g))


def logits(model: torch.nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids)


# -- the adapter layer ---------------------------------------------------------------------------------------------
def test_init_output_equals_base_and_base_is_frozen(base_dir: Path) -> None:
    model = load(base_dir)
    before = logits(model)
    names = apply_lora(model, LoraConfig(r=4, dropout=0.1))
    assert names == [f"layers.{i}.{n}" for i in range(2) for n in ("attn.qkv", "attn.o", "mlp.gate_up", "mlp.down")]
    model.train()  # dropout on the adapter path cannot matter while B is zero
    with torch.no_grad():
        assert torch.equal(model(IDS), before)
    trainable = {id(p) for p in lora_parameters(model)}
    assert len(trainable) == 2 * len(names)
    for name, p in model.named_parameters():  # embeddings, norms and every base matrix are frozen
        assert p.requires_grad == (id(p) in trainable), name
    layer = model.get_submodule("layers.0.attn.qkv")
    assert layer.lora_A.shape == (4, 32) and layer.lora_B.shape == (64, 4) and not layer.lora_B.any()
    assert layer.scale == 16.0 / 4


def test_targets_accept_hf_names(base_dir: Path) -> None:
    model = load(base_dir)
    assert apply_lora(model, LoraConfig(targets=("q_proj", "v_proj", "down_proj"))) == \
        ["layers.0.attn.qkv", "layers.0.mlp.down", "layers.1.attn.qkv", "layers.1.mlp.down"]
    with pytest.raises(LMForgeError, match="already has LoRA"):
        apply_lora(model, LoraConfig())
    with pytest.raises(LMForgeError, match="no linear layer matches the LoRA targets nope"):
        apply_lora(load(base_dir), LoraConfig(targets=("nope",)))
    with pytest.raises(LMForgeError, match="quantization"):
        LoraConfig(quant="int3")


def test_one_step_changes_only_the_adapters(base_dir: Path) -> None:
    model = load(base_dir)
    apply_lora(model, LoraConfig(r=4))
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    adapters = {k: v.clone() for k, v in model.state_dict().items() if "lora_" in k}
    opt = torch.optim.AdamW(lora_parameters(model), lr=1e-2, weight_decay=0.1)
    model.train()
    out = model(IDS[:, :-1])
    F.cross_entropy(out.flatten(0, 1), IDS[:, 1:].flatten()).backward()
    opt.step()
    after = model.state_dict()
    assert len(frozen) == 2 + 2 * 2 + 2 * 4 + 1  # embeddings, head, norms, base matrices
    for k, v in frozen.items():
        assert torch.equal(after[k], v), k
    assert all(not torch.equal(after[k], v) for k, v in adapters.items())  # A and B both moved
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)


def test_adapters_disabled_gives_the_base(base_dir: Path) -> None:
    model = load(base_dir)
    before = logits(model)
    apply_lora(model, LoraConfig())
    randomize_adapters(model)
    adapted = logits(model)
    assert (adapted - before).abs().max() > 1e-2
    with adapters_disabled(model):
        assert torch.equal(logits(model), before)
    assert torch.equal(logits(model), adapted)


def test_merge_equals_base_plus_adapter(base_dir: Path) -> None:
    model = load(base_dir)
    apply_lora(model, LoraConfig(targets=("qkv", "o", "gate_up", "down", "lm_head")))
    randomize_adapters(model)
    x = torch.randn(3, 32)
    layer = model.get_submodule("layers.0.attn.qkv")
    with torch.no_grad():
        expect_layer = layer(x)
        assert_close_scaled(expect_layer, layer.base(x) + x @ layer.lora_A.T @ layer.lora_B.T * layer.scale, 1e-5)
    expect = logits(model)
    merge_lora(model)
    assert not list(lora_layers(model)) and not hasattr(model, "lora_config")
    # Plain dense layers (FastLinear: nn.Linear with the CPU bf16 products of quant/cpu.py)
    assert all(type(model.get_submodule(n)) in (torch.nn.Linear, FastLinear) for n in ("layers.0.attn.qkv", "lm_head"))
    with torch.no_grad():
        assert_close_scaled(model.get_submodule("layers.0.attn.qkv")(x), expect_layer, 1e-5)
    assert_close_scaled(logits(model), expect, 1e-5)


# -- GGUF codes ----------------------------------------------------------------------------------------------------
def test_packed_base_merges_to_dense_and_keeps_codes_for_qlora(q4_gguf: Path, tmp_path: Path) -> None:
    model = load(q4_gguf, packed=True)
    qkv = model.get_submodule("layers.0.attn.qkv")
    assert isinstance(qkv, PackedLinear)
    dense_w = qkv.weight.detach().clone()
    before = logits(model)
    apply_lora(model, LoraConfig())
    assert isinstance(model.get_submodule("layers.0.attn.qkv").base, PackedLinear)
    randomize_adapters(model)
    adapted, adapted_long = logits(model), logits(model, LONG)
    save_adapter(model, tmp_path / "ad", str(q4_gguf))
    merge_lora(model)  # the codes would be stale: the layer becomes a plain dense one
    assert type(model.get_submodule("layers.0.attn.qkv")) is torch.nn.Linear
    assert_close_scaled(logits(model, LONG), adapted_long, 1e-5)

    # For inference the adapter stays beside the codes (the decode kernel), with the same result.
    served = load(q4_gguf, packed=True)
    assert attach_adapter(served, tmp_path / "ad") is False
    assert_close_scaled(logits(served), adapted, 1e-4)

    # QLoRA on the file's own codes: no dense copy, the same function as the dense dequantization.
    qmodel = load(q4_gguf, packed=True)
    apply_lora(qmodel, LoraConfig(quant="packed"))
    base = qmodel.get_submodule("layers.0.attn.qkv").base
    assert isinstance(base, PackedLinear) and base.weight is None and base.packed.kind == "q4"
    assert torch.equal(base.dequantize(), dense_w)
    assert not [n for n, p in qmodel.named_parameters() if n.startswith("layers.") and p.dim() == 2 and "lora_" not in n]
    assert_close_scaled(logits(qmodel), before, 1e-4)
    streamed = load_quantized(q4_gguf, "packed", device="cpu")
    assert torch.equal(streamed.model.get_submodule("layers.0.mlp.down").dequantize(),
                       load(q4_gguf, packed=True).get_submodule("layers.0.mlp.down").weight)
    with pytest.raises(LMForgeError, match="packed codes"):
        apply_lora(load(write_tiny_gguf(tmp_path / "f32.gguf")), LoraConfig(quant="packed"))


# -- NF4 -----------------------------------------------------------------------------------------------------------
def test_nf4_dequantization_error_is_bounded() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(37, 90, generator=g)  # 3330 values: the last block is padded
    w[0, :64] = 0.0  # an all-zero block stays exactly zero
    codes, absmax = nf4_quantize(w)
    assert codes.dtype == torch.uint8 and codes.numel() == 53 * 32 and absmax.shape == (53,)
    back = nf4_dequantize(codes, absmax, w.shape)
    assert back.shape == w.shape and torch.equal(back[0, :64], torch.zeros(64))
    # Each value is the nearest of the 16 levels times its block's absmax ...
    blocks = torch.cat([w.flatten(), w.new_zeros(-w.numel() % 64)]).view(-1, 64)
    scale = blocks.abs().amax(1, keepdim=True).clamp_min(1e-12)
    nearest = NF4_LEVELS[((blocks / scale)[..., None] - NF4_LEVELS).abs().argmin(-1)] * scale
    assert torch.allclose(back.flatten(), nearest.flatten()[: w.numel()], atol=1e-7)
    # ... so the error is at most half the widest gap between levels, relative to absmax.
    err = (back - w).flatten().abs()
    assert (err <= NF4_MAX_ERROR * scale.expand(-1, 64).flatten()[: w.numel()] + 1e-7).all()
    assert NF4_MAX_ERROR < 0.16 and err.max() > 1e-3
    assert (back - w).norm() / w.norm() < 0.11  # about 9% for normally distributed weights


def test_qlora_nf4_trains(base_dir: Path) -> None:
    torch.manual_seed(0)
    model = load(base_dir)
    dense = sum(p.numel() * 4 for n, p in model.named_parameters() if n.startswith("layers.") and p.dim() == 2)
    apply_lora(model, LoraConfig(r=8, alpha=16, quant="nf4"))
    bases = [m.base for _, m in lora_layers(model)]
    assert all(isinstance(b, NF4Linear) for b in bases)
    stored = sum(b.codes.numel() + 4 * b.absmax.numel() for b in bases)
    assert stored < 0.15 * dense  # 4.5 bits per weight instead of 32
    # Backward through the dequantized matrix equals autograd through a dense copy of it.
    b = bases[0]
    x = torch.randn(4, b.in_features, requires_grad=True)
    b(x).square().sum().backward()
    x2 = x.detach().clone().requires_grad_()
    F.linear(x2, b.dequantize()).square().sum().backward()
    assert_close_scaled(x.grad, x2.grad, 1e-5)
    # Overfit one batch: the loss falls well below where it starts.
    opt = torch.optim.AdamW(lora_parameters(model), lr=1e-2)
    model.train()
    losses = []
    for _ in range(25):
        loss = F.cross_entropy(model(IDS[:, :-1]).flatten(0, 1), IDS[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses
    # Merging dequantizes and folds: an ordinary dense model with the same outputs.
    model.eval()
    expect = logits(model)
    merge_lora(model)
    assert not [m for m in model.modules() if isinstance(m, NF4Linear | LoraLinear)]
    assert_close_scaled(logits(model), expect, 1e-5)


# -- saving and loading --------------------------------------------------------------------------------------------
def test_save_load_round_trip(base_dir: Path, tmp_path: Path) -> None:
    model = load(base_dir)
    apply_lora(model, LoraConfig(r=4, alpha=8, dropout=0.05))
    randomize_adapters(model)
    out = save_adapter(model, tmp_path / "adapter", base_model=str(base_dir))
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging directory left
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM"
    assert (cfg["r"], cfg["lora_alpha"], cfg["lora_dropout"]) == (4, 8, 0.05)
    assert cfg["base_model_name_or_path"] == str(base_dir)
    assert cfg["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    from safetensors.torch import load_file

    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in load_file(out / "adapter_model.safetensors")

    fresh = load(base_dir)
    got = load_adapter(fresh, out)
    assert (got.r, got.alpha, got.dropout, got.targets) == (4, 8.0, 0.05, ("down", "gate_up", "o", "qkv"))
    fresh.eval()
    model.eval()
    assert torch.equal(logits(fresh), logits(model))
    # Loading onto a model that already has the adapters (resuming) copies into the same parameters.
    params = lora_parameters(fresh)
    load_adapter(fresh, out)
    assert all(a is b for a, b in zip(params, lora_parameters(fresh)))
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    with pytest.raises(LMForgeError, match="refusing to replace"):
        save_adapter(model, tmp_path / "notes", base_model="x")


def test_peft_names_round_trip_fused_layers_exactly(base_dir: Path, tmp_path: Path) -> None:
    model = load(base_dir)
    apply_lora(model, LoraConfig(r=4))
    randomize_adapters(model)
    sd = adapter_state_dict(model)
    qkv, gate_up = model.get_submodule("layers.1.attn.qkv"), model.get_submodule("layers.1.mlp.gate_up")
    p = "base_model.model.model.layers.1."
    for part, rows in (("q_proj", slice(0, 32)), ("k_proj", slice(32, 48)), ("v_proj", slice(48, 64))):
        assert torch.equal(sd[p + f"self_attn.{part}.lora_A.weight"], qkv.lora_A)  # one shared A
        assert torch.equal(sd[p + f"self_attn.{part}.lora_B.weight"], qkv.lora_B[rows])  # B split by rows
    assert torch.equal(sd[p + "mlp.up_proj.lora_B.weight"], gate_up.lora_B[64:])
    save_adapter(model, tmp_path / "ad", "tiny")
    again = load(base_dir)
    load_adapter(again, tmp_path / "ad")
    for (n1, a), (n2, b) in zip(lora_layers(model), lora_layers(again)):
        assert n1 == n2 and torch.equal(a.lora_A, b.lora_A) and torch.equal(a.lora_B, b.lora_B) and a.scale == b.scale


def test_separate_peft_adapters_fuse_block_diagonally(base_dir: Path, tmp_path: Path) -> None:
    """PEFT trains q and v separately (own A, own rank and scale): one fused layer computes the same."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(1)
    aq, bq = torch.randn(4, 32, generator=g), torch.randn(32, 4, generator=g)
    av, bv = torch.randn(2, 32, generator=g), torch.randn(16, 2, generator=g)
    p = "base_model.model.model.layers.0.self_attn."
    out = tmp_path / "peft"
    out.mkdir()
    save_file({p + "q_proj.lora_A.weight": aq, p + "q_proj.lora_B.weight": bq,
               p + "v_proj.lora_A.weight": av, p + "v_proj.lora_B.weight": bv}, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"],
        "rank_pattern": {"v_proj": 2}, "alpha_pattern": {"v_proj": 6}}))
    model = load(base_dir)
    load_adapter(model, out)
    layer = model.get_submodule("layers.0.attn.qkv")
    assert layer.r == 6 and list(n for n, _ in lora_layers(model)) == ["layers.0.attn.qkv"]
    x = torch.randn(5, 32, generator=g)
    with torch.no_grad():
        base = layer.base(x)
        expect = base + torch.cat([x @ aq.T @ bq.T * (8 / 4), torch.zeros(5, 16), x @ av.T @ bv.T * (6 / 2)], dim=1)
        assert_close_scaled(layer(x), expect, 1e-5)  # outputs reach ~40: 1e-5 absolute is below fp32's resolution
    # Saved again, the fused layer keeps its rank through rank_pattern and loads back the same.
    save_adapter(model, tmp_path / "ours", "tiny")
    cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    full = [f"model.layers.0.self_attn.{n}_proj" for n in "kqv"]
    assert cfg["target_modules"] == full  # layer 0 only: short names would select layer 1 too
    assert (cfg["r"], cfg["lora_alpha"]) == (4, 8) and cfg["rank_pattern"] == dict.fromkeys(full, 6)
    assert cfg["alpha_pattern"] == dict.fromkeys(full, 12.0)  # scale 8/4 at rank 6
    again = load(base_dir)
    load_adapter(again, tmp_path / "ours")
    with torch.no_grad():
        assert_close_scaled(again.get_submodule("layers.0.attn.qkv")(x), expect, 1e-5)


def test_adapter_for_another_base_is_refused(base_dir: Path, tmp_path: Path) -> None:
    model = load(base_dir)
    apply_lora(model, LoraConfig(r=4))
    save_adapter(model, tmp_path / "ad", "tiny")
    wider = Transformer(ModelConfig(vocab_size=model.cfg.vocab_size, dim=48, n_layers=2, n_heads=4, n_kv_heads=2,
                                    ffn_dim=64))
    with pytest.raises(LMForgeError, match=r"different base model: .*lora_[AB].weight has shape \((4, 32|32, 4)\), "
                                           r"this model's .* needs \((4, 48|48, 4)\)"):
        load_adapter(wider, tmp_path / "ad")
    shallow = Transformer(ModelConfig(vocab_size=model.cfg.vocab_size, dim=32, n_layers=1, n_heads=4, n_kv_heads=2,
                                      ffn_dim=64))
    with pytest.raises(LMForgeError, match="layers.1.* names a layer this model does not have"):
        load_adapter(shallow, tmp_path / "ad")
    with pytest.raises(LMForgeError, match="not an adapter directory"):
        load_adapter(load(base_dir), tmp_path)


def test_transformers_peft_gives_the_same_logits(base_dir: Path, tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    import transformers

    model = load(base_dir)
    apply_lora(model, LoraConfig(r=4, alpha=8, targets=("qkv", "o", "gate_up", "down")))
    randomize_adapters(model, std=0.1)
    save_adapter(model, tmp_path / "ad", str(base_dir))
    hf = transformers.AutoModelForCausalLM.from_pretrained(base_dir).float().eval()
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "ad").eval()(IDS).logits
    ours = logits(model)
    assert (ours - logits(load(base_dir))).abs().max() > 1e-2  # the adapter matters
    assert_close_scaled(ours, theirs, 1e-4)


# -- CLI -----------------------------------------------------------------------------------------------------------
def test_cli_merge_and_generate_with_adapter(base_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model = load(base_dir)
    apply_lora(model, LoraConfig())
    randomize_adapters(model, std=0.3)
    ad = save_adapter(model, tmp_path / "ad", str(base_dir))
    assert main(["merge", str(base_dir), "--adapter", str(ad), "--out", str(tmp_path / "merged")]) == 0
    assert "merged" in capsys.readouterr().out
    merged = load(tmp_path / "merged")
    assert_close_scaled(logits(merged), logits(model), 1e-4)
    gen = ["The cat", "--temperature", "0", "--max-tokens", "12", "--device", "cpu"]
    assert main(["generate", str(base_dir), *gen, "--adapter", str(ad)]) == 0
    with_adapter = capsys.readouterr().out
    assert main(["generate", str(tmp_path / "merged"), *gen]) == 0
    assert capsys.readouterr().out == with_adapter
    assert main(["generate", str(ad), *gen]) == 0  # an adapter as the model: the base it names, adapted
    assert capsys.readouterr().out == with_adapter
    assert main(["generate", str(base_dir), *gen]) == 0
    assert capsys.readouterr().out != with_adapter  # the adapter changes what the model says
    assert main(["generate", str(base_dir), *gen, "--adapter", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "not an adapter directory" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert main(["merge", str(base_dir), "--adapter", str(ad), "--out", str(ad)]) == 1
    assert (ad / "adapter_config.json").exists()
