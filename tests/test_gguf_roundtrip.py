"""GGUF round trip: tiny random HF models written to GGUF exactly as llama.cpp's converter would
(F32, Q8_0 and Q4_1 matrices), then read back by lmforge and by transformers' GGUF loader.

The Llama q/k matrices are stored permuted for llama.cpp's interleaved rope; matching the original HF
model's logits on the F32 file proves lmforge undoes that permutation. Plus: damaged and unsupported
inputs must fail with an LMForgeError that names the problem.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

from gguf import GGMLQuantizationType, GGUFWriter  # noqa: E402
from gguf.quants import quantize  # noqa: E402
from numerics import assert_close_scaled  # noqa: E402
from tiny import randomize  # noqa: E402

from lmforge.errors import LMForgeError  # noqa: E402
from lmforge.formats import load_checkpoint  # noqa: E402
from lmforge.tokenizer import _byte_alphabet  # noqa: E402

VOCAB = 320  # a multiple of 32, so token_embd / output rows can be block-quantized
DIM, FFN, N_HEADS, N_KV_HEADS, N_LAYERS = 64, 128, 4, 2, 2
HEAD_DIM = DIM // N_HEADS
LLAMA_CTX = 128
# transformers' GGUF loader maps gpt2.context_length to `n_ctx`, which GPT2Config ignores (it reads
# `n_positions`, default 1024), so a GPT-2 GGUF only loads there with context_length 1024.
GPT2_CTX = 1024
TOL = 1e-4  # relative to the logits' magnitude (see numerics.assert_close_scaled)
QTYPES = ("F32", "Q8_0", "Q4_1")
PROMPT = [319, 5, 17, 300, 42, 99, 7, 250, 3, 64, 128, 1, 277, 31, 260, 8, 200]


pytestmark = pytest.mark.usefixtures("one_thread")


# -- a minimal GPT-2 byte-level BPE vocabulary -----------------------------------------------------
def _vocab() -> tuple[list[str], list[int], list[str]]:
    alphabet = _byte_alphabet()
    tokens = [alphabet[b] for b in range(256)]
    merges = []
    letters = "etaoinshrdlucmfw"
    for a in letters:
        for b in letters:
            if len(tokens) < VOCAB - 1:
                merges.append(f"{a} {b}")
                tokens.append(a + b)
    tokens.append("<|endoftext|>")
    types = [1] * (VOCAB - 1) + [3]  # normal tokens, then one control token
    assert len(tokens) == VOCAB
    return tokens, types, merges


TOKENS, TOKEN_TYPES, MERGES = _vocab()
EOS = VOCAB - 1


# -- writing GGUF the way convert_hf_to_gguf.py does -----------------------------------------------
def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py LlamaModel.permute: half-split rope rows -> llama.cpp's interleaved rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _add_tokenizer(w: GGUFWriter) -> None:
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(TOKENS)
    w.add_token_types(TOKEN_TYPES)
    w.add_token_merges(MERGES)
    w.add_bos_token_id(EOS)
    w.add_eos_token_id(EOS)


class _Tensors:
    """Adds tensors to a writer: 2-D weights in the chosen type, 1-D (norms, biases) always F32."""

    def __init__(self, w: GGUFWriter, qtype: str) -> None:
        self.w, self.qtype = w, GGMLQuantizationType[qtype]

    def __call__(self, name: str, arr: np.ndarray) -> None:
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        if arr.ndim == 2 and self.qtype != GGMLQuantizationType.F32:
            self.w.add_tensor(name, quantize(arr, self.qtype), raw_dtype=self.qtype)
        else:
            self.w.add_tensor(name, arr)


def _finish(w: GGUFWriter) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_llama_gguf(path: Path, sd: dict[str, np.ndarray], qtype: str, arch: str = "llama") -> Path:
    w = GGUFWriter(str(path), arch)
    w.add_name("tiny-llama")
    w.add_block_count(N_LAYERS)
    w.add_context_length(LLAMA_CTX)
    w.add_embedding_length(DIM)
    w.add_feed_forward_length(FFN)
    w.add_head_count(N_HEADS)
    w.add_head_count_kv(N_KV_HEADS)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_vocab_size(VOCAB)
    w.add_file_type({"F32": 0, "Q8_0": 7, "Q4_1": 3}[qtype])
    _add_tokenizer(w)
    t = _Tensors(w, qtype)
    t("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(N_LAYERS):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        t(b + "attn_norm.weight", sd[p + "input_layernorm.weight"])
        t(b + "attn_q.weight", llama_cpp_permute(sd[p + "self_attn.q_proj.weight"], N_HEADS))
        t(b + "attn_k.weight", llama_cpp_permute(sd[p + "self_attn.k_proj.weight"], N_KV_HEADS))
        t(b + "attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        t(b + "attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        t(b + "ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        t(b + "ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        t(b + "ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        t(b + "ffn_down.weight", sd[p + "mlp.down_proj.weight"])
    t("output_norm.weight", sd["model.norm.weight"])
    t("output.weight", sd["lm_head.weight"])
    _finish(w)
    return path


def write_gpt2_gguf(path: Path, sd: dict[str, np.ndarray], qtype: str) -> Path:
    w = GGUFWriter(str(path), "gpt2")
    w.add_name("tiny-gpt2")
    w.add_block_count(N_LAYERS)
    w.add_context_length(GPT2_CTX)
    w.add_embedding_length(DIM)
    w.add_feed_forward_length(4 * DIM)
    w.add_head_count(N_HEADS)
    w.add_layer_norm_eps(1e-5)
    w.add_vocab_size(VOCAB)
    _add_tokenizer(w)
    t = _Tensors(w, qtype)
    t("token_embd.weight", sd["transformer.wte.weight"])
    t("position_embd.weight", sd["transformer.wpe.weight"])
    for i in range(N_LAYERS):
        p, b = f"transformer.h.{i}.", f"blk.{i}."
        for ours, theirs in (("attn_norm", "ln_1"), ("ffn_norm", "ln_2")):
            t(b + ours + ".weight", sd[p + theirs + ".weight"])
            t(b + ours + ".bias", sd[p + theirs + ".bias"])
        # Conv1D stores [in, out]; the converter transposes to [out, in].
        for ours, theirs in (("attn_qkv", "attn.c_attn"), ("attn_output", "attn.c_proj"),
                             ("ffn_up", "mlp.c_fc"), ("ffn_down", "mlp.c_proj")):
            t(b + ours + ".weight", sd[p + theirs + ".weight"].T)
            t(b + ours + ".bias", sd[p + theirs + ".bias"])
    t("output_norm.weight", sd["transformer.ln_f.weight"])
    t("output_norm.bias", sd["transformer.ln_f.bias"])
    t("output.weight", sd["transformer.wte.weight"])  # the converter writes the tied head out explicitly
    _finish(w)
    return path


# -- reference models ----------------------------------------------------------------------------
def _hf_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=DIM, intermediate_size=FFN, num_hidden_layers=N_LAYERS,
        num_attention_heads=N_HEADS, num_key_value_heads=N_KV_HEADS, max_position_embeddings=LLAMA_CTX,
        rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=EOS, eos_token_id=EOS)
    m = transformers.LlamaForCausalLM(cfg).float().eval()
    randomize(m, 0, std=0.15)
    return m


def _hf_gpt2() -> torch.nn.Module:
    torch.manual_seed(1)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=DIM, n_layer=N_LAYERS, n_head=N_HEADS,
                                  n_positions=GPT2_CTX, layer_norm_epsilon=1e-5, bos_token_id=EOS, eos_token_id=EOS)
    m = transformers.GPT2LMHeadModel(cfg).float().eval()
    randomize(m, 1, std=0.15)
    return m


@dataclass
class Files:
    arch: str
    hf: torch.nn.Module  # the original model the GGUF files were written from
    paths: dict[str, Path]  # qtype -> .gguf


_BUILDERS = {"llama": (_hf_llama, write_llama_gguf), "gpt2": (_hf_gpt2, write_gpt2_gguf)}


@pytest.fixture(scope="module", params=sorted(_BUILDERS))
def files(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Files:
    make, write = _BUILDERS[request.param]
    hf = make()
    sd = {k: v.detach().float().numpy() for k, v in hf.state_dict().items()}
    d = tmp_path_factory.mktemp(f"gguf-{request.param}")
    paths = {q: write(d / f"tiny-{request.param}-{q}.gguf", sd, q) for q in QTYPES}
    return Files(request.param, hf, paths)


def _logits(model: torch.nn.Module, ids: list[int], hf: bool) -> torch.Tensor:
    x = torch.tensor([ids])
    with torch.no_grad():
        return (model(x).logits if hf else model(x))[0].float()


@pytest.mark.parametrize("qtype", QTYPES)
def test_lmforge_matches_transformers_gguf_loader(files: Files, qtype: str) -> None:
    path = files.paths[qtype]
    ck = load_checkpoint(path, device="cpu", dtype=torch.float32)
    assert ck.format == "gguf"
    assert ck.config.family == files.arch and ck.config.vocab_size == VOCAB and ck.config.n_layers == N_LAYERS
    n_matrices = N_LAYERS * (7 if files.arch == "llama" else 4) + 2 + (files.arch == "gpt2")
    if qtype == "F32":
        assert set(ck.tensor_types) == {"F32"}
    else:
        assert ck.tensor_types[qtype] == n_matrices
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    ours_l = _logits(ck.model, PROMPT, hf=False)
    ref_l = _logits(theirs, PROMPT, hf=True)
    assert ref_l.abs().max() > 1.0
    assert_close_scaled(ours_l, ref_l, TOL, msg=f"{files.arch} {qtype}: logits vs transformers")


def test_f32_gguf_matches_original_model(files: Files) -> None:
    ck = load_checkpoint(files.paths["F32"], device="cpu", dtype=torch.float32)
    orig = _logits(files.hf, PROMPT, hf=True)
    assert_close_scaled(_logits(ck.model, PROMPT, hf=False), orig, TOL, msg=f"{files.arch}: F32 GGUF vs the original")
    # Quantization error grows as bits shrink: Q8_0 is close, Q4_1 further, both clearly not F32.
    errs = {}
    for q in ("Q8_0", "Q4_1"):
        m = load_checkpoint(files.paths[q], device="cpu", dtype=torch.float32).model
        errs[q] = (_logits(m, PROMPT, hf=False) - orig).abs().max().item()
    assert TOL * max(1.0, orig.abs().max().item()) < errs["Q8_0"] < errs["Q4_1"]
    assert errs["Q8_0"] < 0.1 * orig.abs().max().item()


def test_llama_permutation_is_visible() -> None:
    """Sensitivity check: had the loader skipped the q/k un-permutation, the F32 comparison would fail."""
    hf = _hf_llama()
    orig = _logits(hf, PROMPT, hf=True)
    with torch.no_grad():
        for layer in hf.model.layers:
            for proj, n in ((layer.self_attn.q_proj, N_HEADS), (layer.self_attn.k_proj, N_KV_HEADS)):
                proj.weight.copy_(torch.from_numpy(llama_cpp_permute(proj.weight.numpy(), n)))
    wrong = _logits(hf, PROMPT, hf=True)
    assert (wrong - orig).abs().max().item() > 1000 * TOL * max(1.0, orig.abs().max().item())


def test_gguf_tokenizer_matches_transformers(files: Files) -> None:
    path = files.paths["F32"]
    ck = load_checkpoint(path, device="cpu", dtype=torch.float32)
    assert ck.tokenizer is not None
    theirs = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    text = "the cat sat on a mat, then ate 12 fish!"
    ids = ck.tokenizer.encode(text, add_special_tokens=False)
    assert ids == theirs(text, add_special_tokens=False)["input_ids"]
    assert any(i >= 256 for i in ids), "no merge applied: the BPE merges were not read"
    assert ck.tokenizer.decode(ids) == text
    assert EOS in ck.tokenizer.stop_token_ids


# -- bad inputs ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def good_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    sd = {k: v.detach().float().numpy() for k, v in _hf_llama().state_dict().items()}
    return write_llama_gguf(tmp_path_factory.mktemp("good") / "good.gguf", sd, "F32")


def test_truncated_gguf(good_gguf: Path, tmp_path: Path) -> None:
    data = good_gguf.read_bytes()
    bad = tmp_path / "truncated.gguf"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(LMForgeError, match=re.escape(str(bad))) as ei:
        load_checkpoint(bad, device="cpu", dtype=torch.float32)
    assert re.search(r"not a valid GGUF|truncated", str(ei.value)), str(ei.value)


def test_random_bytes_gguf(tmp_path: Path) -> None:
    bad = tmp_path / "x.gguf"
    bad.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(LMForgeError, match=re.escape(str(bad)) + r".*not a valid GGUF"):
        load_checkpoint(bad, device="cpu", dtype=torch.float32)


def test_unsupported_gguf_architecture(tmp_path: Path) -> None:
    sd = {k: v.detach().float().numpy() for k, v in _hf_llama().state_dict().items()}
    bad = write_llama_gguf(tmp_path / "mamba.gguf", sd, "F32", arch="mamba")
    with pytest.raises(LMForgeError, match=r"unsupported GGUF architecture 'mamba'") as ei:
        load_checkpoint(bad, device="cpu", dtype=torch.float32)
    assert str(bad) in str(ei.value)


def test_truncated_safetensors(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=DIM, intermediate_size=FFN, num_hidden_layers=1,
                                   num_attention_heads=N_HEADS, num_key_value_heads=N_KV_HEADS,
                                   max_position_embeddings=LLAMA_CTX)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    st = tmp_path / "model.safetensors"
    data = st.read_bytes()
    st.write_bytes(data[: len(data) // 2])
    with pytest.raises(LMForgeError, match=re.escape(str(st))) as ei:
        load_checkpoint(tmp_path, device="cpu", dtype=torch.float32)
    assert re.search(r"not a valid safetensors|truncated", str(ei.value)), str(ei.value)


def test_nonexistent_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "model.gguf"
    with pytest.raises(LMForgeError, match=r"no such file or directory: .*" + re.escape(str(missing))):
        load_checkpoint(missing, device="cpu", dtype=torch.float32)


def test_unsupported_tensor_type_is_named(tmp_path: Path) -> None:
    path = tmp_path / "iq.gguf"
    w = GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    # IQ4_NL: blocks of 32 weights in 18 bytes, a type lmforge does not read.
    w.add_tensor("token_embd.weight", np.zeros((4, 18), dtype=np.uint8), raw_dtype=GGMLQuantizationType.IQ4_NL)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(LMForgeError, match=r"unsupported GGUF tensor type IQ4_NL in token_embd\.weight"):
        load_checkpoint(path)
