"""Models are never silently wrong: sliding-window attention matches transformers, options lmforge cannot
honour are refused by name, malformed config.json values give one-line errors, and a config that
disagrees with its weights is refused before the model is built."""

from __future__ import annotations

import copy
import json
import shutil
import tracemalloc
from pathlib import Path

import pytest
import torch
from tiny import make_tiny_llama_dir, randomize

from lmforge.cli import main
from lmforge.engine import Engine, SamplingParams
from lmforge.errors import LMForgeError
from lmforge.formats import kernel_dir, load_checkpoint
from lmforge.model import ModelConfig, Transformer
from lmforge.quant import kernels

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 300
PROMPT_LENGTHS = (5, 11, 17)  # shorter and longer than the windows
NEW_TOKENS = 24
ATOL = RTOL = 1e-4  # logits are of magnitude ~5; fp32 differences are ~1e-6
_BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=False,
             bos_token_id=None, eos_token_id=None, pad_token_id=None)
VARIANTS = {
    "mistral-w4": ("MistralForCausalLM", dict(_BASE, sliding_window=4)),
    "mistral-w8": ("MistralForCausalLM", dict(_BASE, sliding_window=8, num_hidden_layers=3)),
    # Qwen2 slides only the layers from max_window_layers on: layer 0 full, layers 1-2 windowed.
    "qwen2-w4-from-1": ("Qwen2ForCausalLM", dict(_BASE, num_hidden_layers=3, use_sliding_window=True, sliding_window=4,
                                                 max_window_layers=1)),
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def windowed(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    cls_name, config = VARIANTS[request.param]
    cls = getattr(transformers, cls_name)
    torch.manual_seed(7)
    hf = cls(cls.config_class(**config)).float().eval()
    randomize(hf, 7, std=0.15)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    ck = load_checkpoint(path, device="cpu", dtype=torch.float32)
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]
    return request.param, path, hf, ck, prompts


def test_sliding_window_is_read_from_config(windowed) -> None:
    name, _, _, ck, _ = windowed
    want = {"mistral-w4": (4, None), "mistral-w8": (8, None), "qwen2-w4-from-1": (4, [1, 2])}[name]
    assert (ck.config.sliding_window, ck.config.sliding_layers) == want


def test_sliding_window_prefill_matches_transformers(windowed) -> None:
    name, _, hf, ck, prompts = windowed
    t = max(PROMPT_LENGTHS)
    ids = torch.zeros(len(prompts), t, dtype=torch.long)
    mask = torch.zeros(len(prompts), t, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, : len(p)], mask[i, : len(p)] = torch.tensor(p), 1
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits
        ours = ck.model(ids, attn_mask=mask)
    real = mask.bool()
    torch.testing.assert_close(ours[real], ref[real], atol=ATOL, rtol=RTOL)
    # Unpadded single rows (the plain causal path without an explicit padding mask).
    for i, p in enumerate(prompts):
        with torch.no_grad():
            torch.testing.assert_close(ck.model(torch.tensor([p]))[0], ref[i, : len(p)], atol=ATOL, rtol=RTOL)
    # The window matters here: full causal attention gives clearly different logits past the window.
    full = copy.deepcopy(ck.model)
    for blk in full.layers:
        blk.attn.window = 0
    full.windows = []
    with torch.no_grad():
        assert (full(ids, attn_mask=mask)[real] - ref[real]).abs().max() > 100 * ATOL


def _hf_greedy(hf: torch.nn.Module, prompts: list[list[int]]) -> list[list[int]]:
    out = []
    for p in prompts:
        ids = torch.tensor([p])
        with torch.no_grad():
            seq = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=NEW_TOKENS,
                              min_new_tokens=NEW_TOKENS, eos_token_id=None, pad_token_id=0)
        out.append(seq[0, len(p):].tolist())
    return out


@pytest.mark.parametrize("c_kernels", [True, False], ids=["c-kernels", "pytorch"])
def test_sliding_window_generation_matches_transformers(windowed, c_kernels: bool, monkeypatch) -> None:
    """Greedy decoding through the engine's KV cache, three rows of different lengths decoded together,
    equals transformers' generate, on the C decode kernel and on the plain PyTorch path."""
    name, _, hf, ck, prompts = windowed
    if not c_kernels:
        monkeypatch.setattr(kernels, "fast_path", lambda x: False)
    expected = _hf_greedy(hf, prompts)
    seqs = Engine(ck.model, tokenizer=None, max_batch=4).generate(
        [list(p) for p in prompts], SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True))
    assert [s.output_ids for s in seqs] == expected, name
    assert len({t for e in expected for t in e}) > 3  # not one token repeated: the comparison means something


def test_sliding_window_export_round_trip(windowed, tmp_path: Path) -> None:
    """save_hf writes the window back, so transformers computes the same model."""
    from lmforge.formats.export import save_hf

    name, _, hf, ck, prompts = windowed
    save_hf(ck.model, tmp_path / "out")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").float().eval()
    ids = torch.tensor([prompts[-1]])
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, hf(input_ids=ids).logits, atol=ATOL, rtol=RTOL)


def test_sliding_window_gguf_round_trip(windowed, tmp_path: Path) -> None:
    """A GGUF carries a llama model's window (llama.attention.sliding_window); a Qwen2 model whose layers
    slide only in part has no place for that there and is refused."""
    from tiny import train_tokenizer

    from lmforge.formats.gguf_write import write_gguf
    from lmforge.tokenizer import Tokenizer

    name, _, hf, ck, prompts = windowed
    tok = Tokenizer(train_tokenizer(VOCAB), eos_token="<|endoftext|>")
    out = tmp_path / "m.gguf"
    if name.startswith("qwen2"):
        with pytest.raises(LMForgeError, match="sliding-window"):
            write_gguf(ck.model, tok, out, "f32")
        assert not out.exists()
        return
    write_gguf(ck.model, tok, out, "f32")
    back = load_checkpoint(out, device="cpu", dtype=torch.float32)
    assert back.config.sliding_window == ck.config.sliding_window
    ids = torch.tensor([prompts[-1]])
    with torch.no_grad():
        torch.testing.assert_close(back.model(ids), hf(input_ids=ids).logits, atol=ATOL, rtol=RTOL)


@pytest.mark.skipif(kernels.load(kernel_dir()) is None, reason="needs the C kernels (AVX2 and a C compiler)")
def test_attn_decode_rows_window_matches_sdpa() -> None:
    """The C decode attention with a window attends to exactly the last `window` positions of each slot."""
    g = torch.Generator().manual_seed(3)
    nh, nkv, hd, cap, window = 4, 2, 16, 32, 5
    kc, vc = torch.randn(3, nkv, cap, hd, generator=g), torch.randn(3, nkv, cap, hd, generator=g)
    slots, pos = torch.tensor([2, 0, 1]), torch.tensor([20, 3, 5])  # past, before and at the window
    proj = torch.randn(3, 1, (nh + 2 * nkv) * hd, generator=g)
    got = kernels.attn_decode_rows(proj, kc, vc, slots, pos, nh, nkv, hd, window)
    for r, (s, p) in enumerate(zip(slots.tolist(), pos.tolist(), strict=True)):
        q = proj[r, 0].view(nh + 2 * nkv, hd)[:nh]
        lo = max(0, p + 1 - window)
        want = torch.nn.functional.scaled_dot_product_attention(
            q[None, :, None], kc[s, :, lo:p + 1][None], vc[s, :, lo:p + 1][None], enable_gqa=True)
        torch.testing.assert_close(got[r, 0], want.reshape(-1), atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(kernels.load(kernel_dir()) is None, reason="needs the C kernels (AVX2 and a C compiler)")
def test_fused_decode_stack_honours_the_window(monkeypatch) -> None:
    """The whole-stack C decode of a packed model slides its window exactly as the per-operation path."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    from lmforge.model import Transformer
    from lmforge.quant import accelerate, fused
    from lmforge.quant.packed import PackedLinear, from_gguf_blocks

    def packed(window: int) -> torch.nn.Module:
        cfg = ModelConfig(vocab_size=200, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, context_length=64,
                          sliding_window=window)
        model = Transformer(cfg)
        torch.manual_seed(0)
        for p in model.parameters():
            torch.nn.init.normal_(p, 0.0, 0.3)
        for blk in model.layers:
            for parent, attr in ((blk.attn, "qkv"), (blk.attn, "o"), (blk.mlp, "gate_up"), (blk.mlp, "down")):
                old = getattr(parent, attr)
                n, k = old.weight.shape
                codes = quantize(old.weight.detach().numpy(), GGMLQuantizationType.Q8_0)
                pw = from_gguf_blocks(codes, "Q8_0", n, k)
                setattr(parent, attr, PackedLinear(pw.dequantize(), None, pw))
        return accelerate(model.eval(), kernel_dir())

    prompts = [[5, 9, 13], [7] * 11, [3, 1, 4, 1, 5, 9, 2]]

    def run(model: torch.nn.Module) -> list:
        seqs = Engine(model, None, max_batch=4).generate(
            prompts, SamplingParams(max_tokens=10, temperature=0, logprobs=True, top_logprobs=2))
        return [(s.output_ids, [(lp.logprob, lp.top) for lp in s.logprobs]) for s in seqs]

    model = packed(4)
    if fused.plan(model) is None:
        pytest.skip("the fused decode stack does not run here (LMFORGE_ACT16=0)")
    together = run(model)
    assert together != run(packed(0))  # the window changes the result
    monkeypatch.setattr(fused, "plan", lambda m: None)
    assert run(model) == together


# -- options that cannot be honoured are refused ------------------------------------------------------
def _llama_config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama_dir(tmp_path_factory.mktemp("tiny") / "model", context=64)


def _with_config(src: Path, dst: Path, **changes: object) -> Path:
    shutil.copytree(src, dst)
    cfg = _llama_config(src) | changes
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("changes, words", [
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}}, ["yarn"]),
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, ["dynamic"]),
    ({"partial_rotary_factor": 0.5}, ["partial_rotary_factor"]),
    ({"model_type": "mistral", "sliding_window": 4, "layer_types": ["full_attention", "sliding_attention"]},
     ["layer_types"]),
    ({"layer_types": ["full_attention", "chunked_attention"]}, ["chunked_attention"]),
    ({"quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}}, ["quantization_config", "fp8"]),
], ids=["yarn", "dynamic", "partial-rotary", "mistral-mixed-layers", "unknown-layer-type", "fp8-quantized"])
def test_unsupported_options_are_refused(tiny_dir: Path, tmp_path: Path, changes: dict, words: list[str]) -> None:
    """Refused, naming the option, as soon as config.json is read (before any weight or model)."""
    from lmforge.formats import open_source

    path = _with_config(tiny_dir, tmp_path / "m", **changes)
    with pytest.raises(LMForgeError) as e:
        open_source(path)
    for w in words:
        assert w in str(e.value)
    assert "\n" not in str(e.value)


def test_gpt2_options_that_change_the_math_are_refused(tmp_path: Path) -> None:
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2, n_positions=32,
                                  scale_attn_by_inverse_layer_idx=True)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path)
    with pytest.raises(LMForgeError, match="scale_attn_by_inverse_layer_idx"):
        load_checkpoint(tmp_path, device="cpu")


def _train_tiny(tmp_path: Path, capsys: pytest.CaptureFixture[str], setting: str) -> tuple[int, list[str]]:
    """`lmforge train` of a one-layer model with one extra `--set`: exit code and stderr lines."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("The quick brown fox jumps over the lazy dog.\n" * 60)
    capsys.readouterr()
    rc = main(["train", "--data", str(corpus), "--out", str(tmp_path / "run"), "--set", setting,
               "--set", "model.dim=32", "--set", "model.n_layers=1", "--set", "model.n_heads=2",
               "--set", "model.ffn_dim=64", "--set", "block_size=16", "--set", "max_iters=1", "--device", "cpu"])
    return rc, capsys.readouterr().err.strip().splitlines()


def test_t5_family_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Family t5 is an encoder-decoder: without its decoder stack it is a one-line error, and it is never
    built or trained as a decoder LM under its name."""
    with pytest.raises(LMForgeError, match="decoder_layers must be positive for a t5 model"):
        ModelConfig.from_dict({"family": "t5"})
    with pytest.raises(LMForgeError, match="encoder-decoder"):
        Transformer(ModelConfig(family="t5", decoder_layers=1, position="relative"))
    rc, err = _train_tiny(tmp_path, capsys, "model.family=t5")
    assert rc == 1 and len(err) == 1 and "decoder_layers must be positive for a t5 model" in err[0], err
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").rglob("model.safetensors"))


def test_unknown_model_setting_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`--set model.KEY` with a key ModelConfig lacks names it in one line, instead of a TypeError traceback."""
    rc, err = _train_tiny(tmp_path, capsys, "model.widht=32")
    assert rc == 1 and len(err) == 1 and "widht" in err[0], err


# -- malformed config.json values: one line through the CLI -------------------------------------------------
def _assert_one_line(rc: int, err: str, *words: str) -> None:
    assert rc == 1, err
    assert "Traceback" not in err
    lines = err.strip("\n").splitlines()
    assert len(lines) == 1 and lines[0].startswith("lmforge: error: "), err
    for w in words:
        assert w in lines[0], (w, lines[0])


@pytest.mark.parametrize("key, value, words", [
    ("hidden_size", "wide", ["hidden_size", "positive integer", "'wide'"]),
    ("num_hidden_layers", 2.5, ["num_hidden_layers", "positive integer", "2.5"]),
    ("tie_word_embeddings", 1, ["tie_word_embeddings", "true or false"]),
    ("num_key_value_heads", True, ["num_key_value_heads", "positive integer"]),
    ("rms_norm_eps", "small", ["rms_norm_eps", "a number"]),
    ("intermediate_size", None, ["intermediate_size"]),  # null for a required value
], ids=["str-size", "float-layers", "int-as-bool", "bool-as-int", "str-eps", "null-required"])
def test_bad_config_types_are_one_line_errors(tiny_dir: Path, tmp_path: Path, capsys, monkeypatch,
                                              key: str, value: object, words: list[str]) -> None:
    monkeypatch.setenv("LMFORGE_HOME", str(tmp_path / "home"))
    path = _with_config(tiny_dir, tmp_path / "m", **{key: value})
    capsys.readouterr()
    rc = main(["generate", str(path), "hello", "--max-tokens", "2", "--device", "cpu"])
    _assert_one_line(rc, capsys.readouterr().err, *words)


def test_bad_gpt2_config_type_is_a_one_line_error(tiny_dir: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("LMFORGE_HOME", str(tmp_path / "home"))
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2, n_positions=32)
    path = tmp_path / "gpt2"
    transformers.GPT2LMHeadModel(cfg).save_pretrained(path)
    shutil.copy(tiny_dir / "tokenizer.json", path / "tokenizer.json")
    hf = json.loads((path / "config.json").read_text()) | {"n_embd": "wide"}
    (path / "config.json").write_text(json.dumps(hf))
    capsys.readouterr()
    rc = main(["generate", str(path), "hello", "--max-tokens", "2", "--device", "cpu"])
    _assert_one_line(rc, capsys.readouterr().err, "n_embd", "positive integer", "'wide'")


# -- a config that disagrees with its weights, refused before the model is built ---------------------------
def test_layer_count_mismatch_is_refused_before_building(tiny_dir: Path, tmp_path: Path) -> None:
    """A config naming far more layers than the file holds is refused from the headers alone: almost no
    memory is allocated (building 2000 blocks, even on the meta device, takes tens of MB of Python objects)."""
    path = _with_config(tiny_dir, tmp_path / "m", num_hidden_layers=2000)
    tracemalloc.start()
    try:
        with pytest.raises(LMForgeError) as e:
            load_checkpoint(path, device="cpu")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "num_hidden_layers=2000" in str(e.value) and "2 layers" in str(e.value)
    assert peak < 8e6, f"{peak / 1e6:.1f} MB allocated before refusing"


def test_width_mismatch_names_the_tensor(tiny_dir: Path, tmp_path: Path) -> None:
    path = _with_config(tiny_dir, tmp_path / "m", intermediate_size=96)
    with pytest.raises(LMForgeError, match=r"config.json does not match the weights: tensor 'layers.0.mlp.gate_up"):
        load_checkpoint(path, device="cpu")


def test_gguf_layer_count_mismatch_is_refused(tmp_path: Path) -> None:
    """The same check on a GGUF file: its block_count against its tensors."""
    from tiny import write_tiny_gguf

    from lmforge.formats import check_layout
    from lmforge.formats.gguf import GGUFFile

    g = GGUFFile(write_tiny_gguf(tmp_path / "t.gguf"))
    cfg = g.config()
    bad = ModelConfig.from_dict(cfg.to_dict() | {"n_layers": cfg.n_layers + 2})
    with pytest.raises(LMForgeError, match=rf"llama.block_count={cfg.n_layers + 2}, but the weights hold "
                                           rf"{cfg.n_layers} layer"):
        check_layout(bad, set(g.tensors), lambda: g.state_dict(bad, headers_only=True), "GGUF metadata",
                     "llama.block_count")
