"""Export to GGUF (and HF through the CLI): tiny random Llama, Qwen2 and GPT-2 models written with
`formats.gguf_write`, then read back by lmforge, transformers' GGUF loader and llama.cpp.

Tolerances. A quantized file cannot reproduce the source's logits exactly, so two checks split the
question in two:
* layout: the reloaded model must equal the source whose matrices went through the same rounding
  (gguf's quantize -> dequantize, row by row) to float32 precision (1e-4), for every type. Any wrong
  name, split, q/k permutation or per-tensor type choice breaks this by orders of magnitude.
* rounding: against the unrounded source, the relative logit error (max |diff| / max |logit|) is
  about the per-weight relative rounding error times the network's amplification (~4 for these tiny
  random models): f16 keeps 11 significant bits (~2.4e-4 rms) -> ~1e-3; q8_0 rounds to 1/127 of each
  32-block's largest weight (~0.5% rms) -> ~2e-2; q4_1 to 1/15 of each block's range (~8% rms) -> ~0.25.
  The bounds below are ~2-3x those measurements, and the errors must grow in that order.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from gguf.quants import dequantize, quantize  # noqa: E402
from numerics import assert_close_scaled  # noqa: E402
from tiny import CHATML_TEMPLATE, randomize, train_tokenizer  # noqa: E402

from lmforge.cli import main  # noqa: E402
from lmforge.errors import LMForgeError  # noqa: E402
from lmforge.formats import gguf_write, load_checkpoint  # noqa: E402
from lmforge.formats.export import export_model  # noqa: E402
from lmforge.formats.gguf import GGUFFile  # noqa: E402
from lmforge.tokenizer import Tokenizer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

QUANTS = ("f32", "f16", "q8_0", "q4_1")
REL_TOL = {"f32": 1e-6, "f16": 3e-3, "q8_0": 5e-2, "q4_1": 0.5}
TEXT = "The quick brown fox jumps over the lazy dog. Hello world! 42"
QT = gguf.GGMLQuantizationType


# -- tiny source models ----------------------------------------------------------------------------
def _hf_dir(path: Path, model: torch.nn.Module) -> Path:
    tok = train_tokenizer()
    model.save_pretrained(path)
    tok.save(str(path / "tokenizer.json"))
    tc = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
          "chat_template": CHATML_TEMPLATE}
    (path / "tokenizer_config.json").write_text(json.dumps(tc), encoding="utf-8")
    return path


def _llama(ffn: int = 128, tied: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=384, hidden_size=64, intermediate_size=ffn, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=tied)
    m = transformers.LlamaForCausalLM(cfg).eval()
    randomize(m, 0, std=0.08)
    return m


def _qwen2() -> torch.nn.Module:
    torch.manual_seed(1)
    cfg = transformers.Qwen2Config(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=True)
    m = transformers.Qwen2ForCausalLM(cfg).eval()
    randomize(m, 1, std=0.08)
    return m


def _gpt2() -> torch.nn.Module:
    torch.manual_seed(2)
    # transformers reads a GGUF GPT-2's positions from n_positions (default 1024), not context_length
    cfg = transformers.GPT2Config(vocab_size=384, n_embd=64, n_layer=2, n_head=4, n_positions=1024)
    m = transformers.GPT2LMHeadModel(cfg).eval()
    randomize(m, 2, std=0.08)
    return m


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _hf_dir(tmp_path_factory.mktemp("llama"), _llama())


@pytest.fixture(scope="module")
def llama_files(llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("llama-gguf")
    return {q: export_model(llama_dir, "gguf", out / f"tiny-{q}.gguf", q).path for q in QUANTS}


def _ids(tok: Tokenizer) -> list[int]:
    return tok.encode(TEXT)


def _logits(model: torch.nn.Module, ids: list[int], hf: bool = False) -> torch.Tensor:
    with torch.no_grad():
        out = model(torch.tensor([ids]))
    return (out.logits if hf else out)[0].float()


def _cpu(path: Path):  # noqa: ANN202
    return load_checkpoint(path, device="cpu", dtype=torch.float32)


def _rounded(model: torch.nn.Module, quant: str) -> torch.nn.Module:
    """The source with every matrix rounded as the writer rounds it (rows are the blocks' axis)."""
    cfg = model.cfg
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() != 2 or name == "pos_emb.weight" or quant == "f32":
                continue
            head = name == "lm_head.weight" or (name == "tok_emb.weight" and cfg.tie_embeddings)
            qtype = gguf_write._matrix_type(gguf_write.QUANTS[quant][0], p.shape[1], head)
            w = p.numpy()
            if qtype == QT.F16:
                r = w.astype(np.float16).astype(np.float32)
            else:
                r = dequantize(quantize(np.ascontiguousarray(w), qtype), qtype).reshape(w.shape)
            p.copy_(torch.from_numpy(np.ascontiguousarray(r, dtype=np.float32)))
    return model


# -- lmforge reads back what it wrote --------------------------------------------------------------
@pytest.mark.parametrize("quant", QUANTS)
def test_lmforge_reload_matches_source(llama_dir: Path, llama_files: dict[str, Path], quant: str) -> None:
    src = _cpu(llama_dir)
    ids = _ids(src.tokenizer)
    ref = _logits(src.model, ids)
    ck = _cpu(llama_files[quant])
    assert ck.format == "gguf" and ck.config.family == "llama" and not ck.config.tie_embeddings
    got = _logits(ck.model, ids)
    assert_close_scaled(got, _logits(_rounded(_cpu(llama_dir).model, quant), ids), 1e-4,
                        msg=f"{quant}: layout error against the identically rounded source")
    rel = (got - ref).abs().max().item() / ref.abs().max().item()
    assert rel <= REL_TOL[quant], f"{quant}: relative logit error {rel:.2e}"
    types = {"f32": "F32", "f16": "F16", "q8_0": "Q8_0", "q4_1": "Q4_1"}[quant]
    matrices = 2 * 7 + 2  # per block q, k, v, o, gate, up, down; token_embd and output
    if quant == "q4_1":  # the output matrix is kept at Q8_0
        assert ck.tensor_types == {"Q4_1": matrices - 1, "Q8_0": 1, "F32": 2 * 2 + 1}
    elif quant != "f32":
        assert ck.tensor_types == {types: matrices, "F32": 2 * 2 + 1}
    assert ck.tokenizer.encode(TEXT) == src.tokenizer.encode(TEXT)


def test_errors_grow_as_bits_shrink(llama_dir: Path, llama_files: dict[str, Path]) -> None:
    src = _cpu(llama_dir)
    ids = _ids(src.tokenizer)
    ref = _logits(src.model, ids)
    errs = [(_logits(_cpu(llama_files[q]).model, ids) - ref).abs().max().item() for q in QUANTS]
    assert errs[0] <= 1e-5 * max(1.0, ref.abs().max().item()) < errs[1] < errs[2] < errs[3], errs
    sizes = [llama_files[q].stat().st_size for q in QUANTS]
    assert sizes == sorted(sizes, reverse=True), sizes


def test_metadata(llama_dir: Path, llama_files: dict[str, Path]) -> None:
    g = GGUFFile(llama_files["q8_0"])
    m = g.meta
    expect = {
        "general.architecture": "llama", "general.file_type": 7, "llama.context_length": 64,
        "llama.embedding_length": 64, "llama.block_count": 2, "llama.feed_forward_length": 128,
        "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2, "llama.rope.dimension_count": 16,
        "llama.vocab_size": 384, "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.add_bos_token": False, "tokenizer.chat_template": CHATML_TEMPLATE,
    }
    assert {k: m.get(k) for k in expect} == expect
    assert m["llama.rope.freq_base"] == 10000.0 and abs(m["llama.attention.layer_norm_rms_epsilon"] - 1e-5) < 1e-9
    tok = train_tokenizer()
    assert m["tokenizer.ggml.eos_token_id"] == tok.token_to_id("<|im_end|>")
    assert m["tokenizer.ggml.padding_token_id"] == tok.token_to_id("<|endoftext|>")
    assert "tokenizer.ggml.bos_token_id" not in m
    assert len(m["tokenizer.ggml.tokens"]) == 384 and len(m["tokenizer.ggml.merges"]) > 0
    types = dict(zip(m["tokenizer.ggml.tokens"], m["tokenizer.ggml.token_type"]))
    assert types["<|im_start|>"] == 3 and types["Ġthe"] == 1
    assert g.tensors["blk.0.attn_norm.weight"].tensor_type == QT.F32
    assert g.tensors["output.weight"].tensor_type == QT.Q8_0


# -- transformers and llama.cpp ----------------------------------------------------------------------
@pytest.mark.parametrize("quant", QUANTS)
def test_transformers_loads_the_file(llama_dir: Path, llama_files: dict[str, Path], quant: str) -> None:
    path = llama_files[quant]
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                               dtype=torch.float32).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    ck = _cpu(path)
    assert hf_tok(TEXT)["input_ids"] == ck.tokenizer.encode(TEXT) == _cpu(llama_dir).tokenizer.encode(TEXT)
    ids = _ids(ck.tokenizer)
    assert_close_scaled(_logits(theirs, ids, hf=True), _logits(ck.model, ids), 1e-4,
                        msg=f"{quant}: transformers vs lmforge on the same file")


def _llama_cpp_logits(path: Path, ids: list[int]) -> np.ndarray:
    llama_cpp = pytest.importorskip("llama_cpp")
    # F32 KV cache (type 0): llama.cpp's default F16 cache would round keys and values
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_threads=1, logits_all=True, type_k=0, type_v=0,
                          verbose=False)
    assert llm.tokenize(TEXT.encode(), add_bos=False, special=True) == ids
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_every_architecture_round_trips(arch: str, tmp_path: Path) -> None:
    """F32 files of all three architectures: lmforge, transformers and llama.cpp give the source's logits."""
    src_dir = _hf_dir(tmp_path / "src", {"llama": _llama, "qwen2": _qwen2, "gpt2": _gpt2}[arch]())
    src = _cpu(src_dir)
    out = export_model(src_dir, "gguf", tmp_path / f"{arch}.gguf", "f32")
    g = GGUFFile(out.path)
    assert g.arch == arch and out.tensors == len(g.tensors)
    assert ("output.weight" in g.tensors) == (not src.config.tie_embeddings)
    ids = _ids(src.tokenizer)
    ref = _logits(src.model, ids)
    ck = _cpu(out.path)
    assert ck.config.tie_embeddings == src.config.tie_embeddings and ck.config.qkv_bias == src.config.qkv_bias
    assert_close_scaled(_logits(ck.model, ids), ref, 1e-5)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=out.path.name,
                                                               dtype=torch.float32).eval()
    assert_close_scaled(_logits(theirs, ids, hf=True), ref, 1e-4)
    diff = np.abs(_llama_cpp_logits(out.path, ids) - ref.numpy()).max()
    assert diff <= 1e-3 * ref.abs().max().item(), f"llama.cpp vs source: {diff:.2e}"


def test_llama_cpp_reads_quantized_files(llama_dir: Path, llama_files: dict[str, Path]) -> None:
    """llama.cpp also rounds activations to 8 bits in quantized matmuls, so only closeness is expected."""
    src = _cpu(llama_dir)
    ids = _ids(src.tokenizer)
    ours = _logits(_cpu(llama_files["q8_0"]).model, ids)
    diff = np.abs(_llama_cpp_logits(llama_files["q8_0"], ids) - ours.numpy()).max()
    assert diff <= 0.05 * ours.abs().max().item()


# -- types, ties and tokenizers ----------------------------------------------------------------------
def test_rows_not_in_whole_blocks_fall_back_to_f16(tmp_path: Path) -> None:
    src_dir = _hf_dir(tmp_path / "src", _llama(ffn=80, tied=True))  # ffn_down rows have 80 weights
    out = export_model(src_dir, "gguf", tmp_path / "odd.gguf", "q4_1")
    g = GGUFFile(out.path)
    assert g.tensors["blk.0.ffn_down.weight"].tensor_type == QT.F16
    assert g.tensors["blk.0.ffn_up.weight"].tensor_type == QT.Q4_1
    assert g.tensors["token_embd.weight"].tensor_type == QT.Q8_0  # tied: it is the output matrix too
    assert "output.weight" not in g.tensors
    assert out.tensor_types == {"F16": 2, "Q4_1": 12, "Q8_0": 1, "F32": 5}
    src = _cpu(src_dir)
    ids = _ids(src.tokenizer)
    assert_close_scaled(_logits(_cpu(out.path).model, ids), _logits(_rounded(src.model, "q4_1"), ids), 1e-4)


def test_gguf_source_keeps_its_pre_tokenizer_name(llama_dir: Path, tmp_path: Path) -> None:
    src = _cpu(llama_dir)
    first = gguf_write.write_gguf(src.model, src.tokenizer, tmp_path / "a.gguf", "f32", name="tiny-default",
                                  pre="default").path
    # lmforge rebuilds "default" and "gpt-2" as the same byte-level split: only the source file can tell
    out = export_model(first, "gguf", tmp_path / "b.gguf", "f32").path
    meta = GGUFFile(out).meta
    assert meta["tokenizer.ggml.pre"] == "default" and meta["general.name"] == "tiny-default"
    a, b = _cpu(first), _cpu(out)
    ids = a.tokenizer.encode(TEXT)
    assert b.tokenizer.encode(TEXT) == ids == src.tokenizer.encode(TEXT)
    assert torch.equal(_logits(a.model, ids), _logits(b.model, ids))


def test_pre_tokenizer_names() -> None:
    from tokenizers import Regex, pre_tokenizers

    from lmforge.tokenizer import GPT4_SPLIT

    tok = Tokenizer(train_tokenizer(), eos_token="<|im_end|>")
    assert gguf_write.tokenizer_metadata(tok, 384)["tokenizer.ggml.pre"] == "gpt-2"
    tok.hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(GPT4_SPLIT), behavior="isolated"),
                                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    meta = gguf_write.tokenizer_metadata(tok, 400)  # also: 16 unused ids up to the model's vocabulary
    assert meta["tokenizer.ggml.pre"] == "llama-bpe"
    assert meta["tokenizer.ggml.tokens"][-1] == "[PAD399]" and meta["tokenizer.ggml.token_type"][-16:] == [5] * 16
    tok.hf.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(LMForgeError, match="cannot name this tokenizer's pre-tokenizer"):
        gguf_write.tokenizer_metadata(tok, 384)
    tok.hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    with pytest.raises(LMForgeError, match="more than the model's vocabulary of 300"):
        gguf_write.tokenizer_metadata(tok, 300)
    # A name that splits text differently is caught before anything is written: SmolLM's split cuts
    # numbers into digits, so a GPT-2-split vocabulary with merged digits would change.
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, trainers

    digits = HFTokenizer(models.BPE())
    digits.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    digits.decoder = decoders.ByteLevel()
    digits.train_from_iterator(["12345 apples in 2024"] * 8, trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    num = Tokenizer(digits)
    assert gguf_write.tokenizer_metadata(num, 300)["tokenizer.ggml.pre"] == "gpt-2"
    with pytest.raises(LMForgeError, match="does not survive GGUF"):
        gguf_write.tokenizer_metadata(num, 300, pre="smollm")


# -- the command line ------------------------------------------------------------------------------
def _cli(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_gguf(capsys: pytest.CaptureFixture[str], llama_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.gguf"
    rc, stdout, err = _cli(capsys, "export", llama_dir, "--to", "gguf", out, "--quant", "q8_0")
    assert rc == 0, err
    assert re.fullmatch(rf"wrote {re.escape(str(out))} \(gguf, [\d.]+ MB, 21 tensors: 5 F32, 16 Q8_0\)\n", stdout)
    assert _cpu(out).tensor_types == {"Q8_0": 16, "F32": 5}


def test_cli_hf(capsys: pytest.CaptureFixture[str], llama_files: dict[str, Path], tmp_path: Path) -> None:
    src = llama_files["q8_0"]
    out = tmp_path / "hf"
    rc, stdout, err = _cli(capsys, "export", src, "--to", "hf", out)
    assert rc == 0, err
    assert stdout.startswith(f"wrote {out} (hf, ") and "21 tensors: 21 F32" in stdout
    ck = _cpu(src)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    ids = _ids(ck.tokenizer)
    assert hf_tok(TEXT)["input_ids"] == ids
    assert_close_scaled(_logits(theirs, ids, hf=True), _logits(ck.model, ids), 1e-5)


def test_cli_bad_quant_is_one_line_and_leaves_the_old_file(capsys: pytest.CaptureFixture[str], llama_dir: Path,
                                                           tmp_path: Path) -> None:
    out = tmp_path / "keep.gguf"
    out.write_bytes(b"old contents")
    rc, stdout, err = _cli(capsys, "export", llama_dir, "--to", "gguf", out, "--quant", "q5_k")
    assert rc == 1 and stdout == ""
    assert err == "lmforge: error: unsupported GGUF quantization 'q5_k' (supported: f32, f16, bf16, q8_0, q4_1)\n"
    for argv in (("--to", "gguf", tmp_path / "x.bin"), ("--to", "onnx", tmp_path / "x"),
                 ("--to", "hf", tmp_path / "x", "--quant", "q8_0")):
        rc, _, err = _cli(capsys, "export", llama_dir, *argv)
        assert rc == 1 and err.startswith("lmforge: error: ") and err.count("\n") == 1, err
    assert out.read_bytes() == b"old contents"


def test_failed_write_leaves_the_old_file(llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = export_model(llama_dir, "gguf", tmp_path / "m.gguf", "f16").path
    before = out.read_bytes()
    real, calls = gguf_write._encode, []

    def failing(e):  # noqa: ANN001, ANN202
        calls.append(e.name)
        if len(calls) == 5:
            raise OSError("disk full")
        return real(e)

    monkeypatch.setattr(gguf_write, "_encode", failing)
    with pytest.raises(OSError, match="disk full"):
        export_model(llama_dir, "gguf", out, "q8_0")
    assert len(calls) == 5 and out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]  # no temporary file left behind


# -- the real model --------------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_q8_0_runs_in_llama_cpp(smollm2_path: Path, tmp_path: Path) -> None:
    llama_cpp = pytest.importorskip("llama_cpp")
    import lmforge
    from lmforge.engine import SamplingParams

    out = export_model(smollm2_path, "gguf", tmp_path / "smollm2-q8_0.gguf", "q8_0").path
    meta = GGUFFile(out).meta
    assert meta["tokenizer.ggml.pre"] == "smollm" and meta["general.file_type"] == 7
    lm = lmforge.load(out, device="cpu")
    assert lm.config.tie_embeddings and lm.config.n_layers == 30
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=256, n_threads=2, verbose=False)
    n = 8
    # Prompts whose greedy continuations are not near-ties. llama.cpp rounds activations to 8-bit
    # blocks inside quantized matmuls, moving SmolLM2's logits by ~1; where the top two candidates
    # are closer than that (e.g. the first token answering "What is the capital of France?" as a
    # chat turn: "The" vs "L"), the two greedy paths may part. The F32 test above shows the file
    # itself is exact.
    for prompt in (lm.chat_prompt("Write one sentence about the sea."), lm.tokenizer.encode("def fibonacci(n):"),
                   lm.tokenizer.encode("The capital of France is")):
        ours = lm.generate_sequences([prompt], SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))[0]
        llm.reset()
        theirs = []
        for t in llm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0):
            theirs.append(t)
            if len(theirs) == n:
                break
        assert theirs == ours.output_ids, (lm.tokenizer.decode(theirs), lm.tokenizer.decode(ours.output_ids))
