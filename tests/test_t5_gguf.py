"""T5 encoder-decoders as GGUF files (llama.cpp's `t5` architecture): export, reload with the same outputs,
llama.cpp's metadata names, the Unigram tokenizer round trip, and files lmforge cannot honour refused."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
import transformers
from gguf import GGUFReader, GGUFValueType, GGUFWriter, Keys
from numerics import assert_close_scaled
from tiny import TEXTS, make_bart_dir, make_t5_dir, train_t5_unigram

from lmforge.cli import main
from lmforge.errors import LMForgeError
from lmforge.formats import load_checkpoint, load_tokenizer
from lmforge.formats.export import export_model
from lmforge.formats.gguf_t5 import unigram_metadata
from lmforge.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

# llama.cpp computes T5's buckets up to a fixed distance of 128, so the v1.1 model uses that one.
KW = {"v1.0": {}, "v1.1": {"relative_attention_max_distance": 128}}


@pytest.fixture(scope="module")
def unigram() -> Any:
    return train_t5_unigram()


@pytest.fixture(scope="module", params=["v1.0", "v1.1"])
def t5(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, unigram: Any
       ) -> tuple[str, Path, Path]:
    """(variant, HF directory with T5's tokenizer.json, its f32 GGUF export)."""
    variant = request.param
    tmp = tmp_path_factory.mktemp(variant.replace(".", ""))
    path = make_t5_dir(tmp / "hf", variant, vocab=unigram.get_vocab_size(), **KW[variant])
    unigram.save(str(path / "tokenizer.json"))
    out = export_model(path, "gguf", tmp / "t5.gguf", quant="f32")
    assert out.tensor_types == {"F32": out.tensors}
    return variant, path, out.path


def _batch(vocab: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two source rows (the second right-padded) and teacher-forced targets from the start token 0."""
    g = torch.Generator().manual_seed(1)
    src = torch.randint(3, vocab, (2, 11), generator=g)
    mask = torch.ones_like(src)
    mask[1, 7:] = 0
    tgt = torch.randint(3, vocab, (2, 9), generator=g)
    tgt[:, 0] = 0
    return src, mask, tgt


def _outputs(path: Path, src: torch.Tensor, mask: torch.Tensor, tgt: torch.Tensor) -> tuple[torch.Tensor, ...]:
    model = load_checkpoint(path, device="cpu", dtype=torch.float32).model
    with torch.inference_mode():
        memory = model.encode(src, mask)
        return memory, model.decode(tgt, memory, mask)


def test_gguf_reloads_with_the_hf_directorys_outputs(t5: tuple[str, Path, Path], monkeypatch) -> None:
    monkeypatch.setenv("LMFORGE_CPU_BF16", "0")
    variant, path, file = t5
    ck = load_checkpoint(file, device="cpu", dtype=torch.float32)
    want = load_checkpoint(path, device="cpu", dtype=torch.float32).config
    assert (ck.format, ck.config.family, ck.config.mlp, ck.config.n_layers, ck.config.decoder_layers) == (
        "gguf", "t5", want.mlp, 2, 3)
    src, mask, tgt = _batch(want.vocab_size)
    memory, logits = _outputs(file, src, mask, tgt)
    ref_memory, ref_logits = _outputs(path, src, mask, tgt)
    # fp32 throughout; v1.0's d_model ** -0.5 is folded into the output matrix, a rounding apart
    assert_close_scaled(memory, ref_memory, 1e-6)
    assert_close_scaled(logits, ref_logits, 1e-6)
    if variant == "v1.0":  # and against transformers itself
        ref = transformers.T5ForConditionalGeneration.from_pretrained(path).eval()
        with torch.inference_mode():
            out = ref(input_ids=src, attention_mask=mask, decoder_input_ids=tgt)
        assert_close_scaled(memory, out.encoder_last_hidden_state, 1e-5)
        assert_close_scaled(logits, out.logits, 1e-5)


# Weights within the type's rounding, relative to the tensor's largest magnitude: F16 keeps 11 significant
# bits, BF16 8; Q8_0 rounds each block of 32 to steps of its largest magnitude / 127 (half a step at most,
# plus the F16 rounding of the step itself over 127 steps).
Q8_0_TOL = (0.5 + 127 * 2.0 ** -11) / 127


@pytest.mark.parametrize("quant, tol", [("f16", 2.0 ** -11), ("bf16", 2.0 ** -8), ("q8_0", Q8_0_TOL)])
def test_quantized_exports(t5: tuple[str, Path, Path], tmp_path: Path, quant: str, tol: float) -> None:
    _, path, file = t5
    out = export_model(path, "gguf", tmp_path / f"t5-{quant}.gguf", quant=quant)
    types = {t.name: t.tensor_type.name for t in GGUFReader(str(out.path)).tensors}
    # norms and the relative position tables stay F32, as llama.cpp reads them
    assert {v for k, v in types.items() if "norm" in k or "attn_rel_b" in k} == {"F32"}
    assert types["enc.blk.0.attn_q.weight"] == types["dec.blk.2.cross_attn_v.weight"] == quant.upper()
    got = load_checkpoint(out.path, device="cpu", dtype=torch.float32).model.state_dict()
    want = load_checkpoint(file, device="cpu", dtype=torch.float32).model.state_dict()
    assert got.keys() == want.keys()
    for name, w in want.items():
        assert_close_scaled(got[name], w, tol * 1.01, name)
        if w.dim() == 2 and "pos_bias" not in name:
            assert not torch.equal(got[name], w), name  # stored in the smaller type indeed


def test_metadata_and_tensors_as_llama_cpp_names_them(t5: tuple[str, Path, Path]) -> None:
    variant, path, file = t5
    r = GGUFReader(str(file))
    meta = {k: f.contents() for k, f in r.fields.items()}
    arch = "t5"
    hf = transformers.T5Config.from_pretrained(path)
    want = {
        Keys.General.ARCHITECTURE: arch,
        Keys.LLM.CONTEXT_LENGTH.format(arch=arch): 512,  # config.json names none: llama.cpp's default
        Keys.LLM.EMBEDDING_LENGTH.format(arch=arch): hf.d_model,
        Keys.LLM.FEED_FORWARD_LENGTH.format(arch=arch): hf.d_ff,
        Keys.LLM.BLOCK_COUNT.format(arch=arch): hf.num_layers,
        Keys.LLM.DECODER_BLOCK_COUNT.format(arch=arch): hf.num_decoder_layers,
        Keys.LLM.DECODER_START_TOKEN_ID.format(arch=arch): hf.decoder_start_token_id,
        Keys.Attention.HEAD_COUNT.format(arch=arch): hf.num_heads,
        Keys.Attention.KEY_LENGTH.format(arch=arch): hf.d_kv,
        Keys.Attention.VALUE_LENGTH.format(arch=arch): hf.d_kv,
        Keys.Attention.REL_BUCKETS_COUNT.format(arch=arch): hf.relative_attention_num_buckets,
        Keys.Tokenizer.MODEL: "t5",
        Keys.Tokenizer.ADD_BOS: False,
        Keys.Tokenizer.ADD_EOS: True,
        Keys.Tokenizer.ADD_PREFIX: True,
        Keys.Tokenizer.REMOVE_EXTRA_WS: True,
        Keys.Tokenizer.EOS_ID: 1,
        Keys.Tokenizer.PAD_ID: 0,
        Keys.Tokenizer.UNK_ID: 2,
    }
    assert {k: meta.get(k) for k in want} == want
    eps = meta[Keys.Attention.LAYERNORM_RMS_EPS.format(arch=arch)]
    assert eps == pytest.approx(hf.layer_norm_epsilon, rel=1e-6)
    assert len(meta[Keys.Tokenizer.LIST]) == len(meta[Keys.Tokenizer.SCORES]) == hf.vocab_size
    # every tensor is one of llama.cpp's T5 tensors; the gated MLP has ffn_gate, an own output matrix
    # is written for both (v1.0's tied one carries the output scaling)
    allowed = {gguf.TENSOR_NAMES[t].format(bid=i) + ".weight" for t in gguf.MODEL_TENSORS[gguf.MODEL_ARCH.T5]
               for i in range(3)}
    names = {t.name for t in r.tensors}
    assert names <= allowed
    assert ("enc.blk.0.ffn_gate.weight" in names) == (variant == "v1.1")
    assert {"output.weight", "enc.blk.0.attn_rel_b.weight", "dec.blk.0.attn_rel_b.weight",
            "dec.blk.2.cross_attn_k.weight", "enc.output_norm.weight", "dec.output_norm.weight"} <= names
    assert "enc.blk.2.attn_q.weight" not in names and "enc.blk.1.attn_rel_b.weight" not in names


def test_tokenizer_round_trip(t5: tuple[str, Path, Path]) -> None:
    _, path, file = t5
    ours = Tokenizer.from_dir(path)
    again = load_tokenizer(file)
    fast = transformers.T5TokenizerFast(tokenizer_file=str(path / "tokenizer.json"))
    theirs = transformers.AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
    assert (again.eos_token, again.pad_token, again.unk_token, again.bos_token) == ("</s>", "<pad>", "<unk>", None)
    for text in TEXTS:
        ids = fast(text).input_ids
        assert ours.encode(text) == again.encode(text) == ids == theirs(text).input_ids, text
        assert again.decode(ids) == fast.decode(ids, skip_special_tokens=True), text
        assert again.decode(ids, skip_special_tokens=False) == fast.decode(ids, skip_special_tokens=False), text
    assert again.encode("<extra_id_0>") == [again.vocab_size - 1, 1]


def test_transformers_reads_our_tensors(tmp_path: Path, unigram: Any) -> None:
    """transformers' GGUF loader takes T5 files to be flan-T5 with equal stack depths: for such a model it
    reads back every weight exactly. (It assumes a ReLU gate and a scaled output where llama.cpp, whose
    reading lmforge follows, runs a tanh-GELU gate and no scaling; so its logits are not compared.)"""
    path = make_t5_dir(tmp_path / "hf", "v1.1", vocab=unigram.get_vocab_size(), num_decoder_layers=2,
                       relative_attention_max_distance=128)
    unigram.save(str(path / "tokenizer.json"))
    export_model(path, "gguf", tmp_path / "flan.gguf", quant="f32")
    ref = transformers.T5ForConditionalGeneration.from_pretrained(path).state_dict()
    got = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path, gguf_file="flan.gguf").state_dict()
    for name in ("shared.weight", "lm_head.weight", "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                 "decoder.block.1.layer.1.EncDecAttention.k.weight", "decoder.block.1.layer.2.DenseReluDense.wi_0.weight",
                 "encoder.final_layer_norm.weight"):
        assert torch.equal(got[name], ref[name]), name
    assert all(torch.equal(got[k], v) for k, v in ref.items())


def test_unigram_metadata_round_trip_without_a_model(unigram: Any, tmp_path: Path) -> None:
    unigram.save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer.from_dir(tmp_path)
    vocab = tok.vocab_size + 3  # ids beyond the tokenizer's become unused [PAD{id}] tokens
    meta = unigram_metadata(tok, vocab)
    assert meta["tokenizer.ggml.tokens"][-1] == f"[PAD{vocab - 1}]" and meta["tokenizer.ggml.token_type"][-1] == 5
    again = Tokenizer.from_gguf_metadata(meta)
    assert [again.encode(t) for t in TEXTS] == [tok.encode(t) for t in TEXTS]
    with pytest.raises(LMForgeError, match="more than the model's vocabulary"):
        unigram_metadata(tok, tok.vocab_size - 1)


def _rewrite(src: Path, dst: Path, drop: tuple[str, ...] = (), add: dict[str, np.ndarray] | None = None,
             meta: dict[str, Any] | None = None) -> Path:
    """A copy of an F32 GGUF file with tensors dropped or added and metadata values replaced (or, for byte
    arrays, added)."""
    r = GGUFReader(str(src))
    w = GGUFWriter(str(dst), "t5")
    for key, f in r.fields.items():
        if key.startswith("GGUF.") or key == Keys.General.ARCHITECTURE:
            continue
        value = (meta or {}).get(key, f.contents())
        sub = f.types[-1] if f.types[0] == GGUFValueType.ARRAY else None
        w.add_key_value(key, value, f.types[0], sub_type=sub)
    for key, value in (meta or {}).items():
        if key not in r.fields:  # a new byte array, as the precompiled charsmap is stored
            w.add_array(key, value)
    for t in r.tensors:
        if t.name not in drop:
            w.add_tensor(t.name, np.array(t.data))
    for name, arr in (add or {}).items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def _error(path: Path) -> str:
    with pytest.raises(LMForgeError) as ei:
        load_checkpoint(path, device="cpu")
    assert "\n" not in str(ei.value)
    return str(ei.value)


def test_t5_files_lmforge_cannot_honour_are_refused(t5: tuple[str, Path, Path], tmp_path: Path) -> None:
    _, _, file = t5
    ok = _rewrite(file, tmp_path / "copy.gguf")
    assert load_checkpoint(ok, device="cpu").config.decoder_layers == 3  # the copy itself loads
    assert "'dec.blk.1.cross_attn_v.weight' missing" in _error(
        _rewrite(file, tmp_path / "a.gguf", drop=("dec.blk.1.cross_attn_v.weight",)))
    # UMT5 keeps a relative position table in every block; lmforge shares the first block's
    table = np.zeros((32, 4), dtype=np.float32)
    assert "unsupported tensor 'enc.blk.1.attn_rel_b.weight'" in _error(
        _rewrite(file, tmp_path / "b.gguf", add={"enc.blk.1.attn_rel_b.weight": table}))
    assert "t5.decoder_block_count=2, but the file holds 3 decoder blocks" in _error(
        _rewrite(file, tmp_path / "c.gguf", meta={"t5.decoder_block_count": 2}))
    bad = _rewrite(file, tmp_path / "d.gguf", meta={Keys.Tokenizer.PRECOMPILED_CHARSMAP: bytes(range(1, 6))})
    with pytest.raises(LMForgeError, match=r"^unsupported GGUF tokenizer.ggml.precompiled_charsmap \(.*\)$"):
        load_tokenizer(bad)


def test_bart_gguf_export_is_unsupported(tmp_path: Path, capsys) -> None:
    path = make_bart_dir(tmp_path / "bart")
    with pytest.raises(LMForgeError, match=r"^unsupported: cannot write a bart model as GGUF"):
        export_model(path, "gguf", tmp_path / "bart.gguf")
    capsys.readouterr()
    assert main(["export", str(path), "--to", "gguf", str(tmp_path / "bart.gguf")]) == 1
    err = capsys.readouterr().err.strip()
    assert "unsupported" in err and "bart" in err and "\n" not in err
    assert not (tmp_path / "bart.gguf").exists()


def test_t5_without_a_llama_cpp_form_is_refused(tmp_path: Path, unigram: Any) -> None:
    """A v1.1 model with a relative max distance other than llama.cpp's fixed 128 is refused by name."""
    path = make_t5_dir(tmp_path / "hf", "v1.1", vocab=unigram.get_vocab_size())
    unigram.save(str(path / "tokenizer.json"))
    with pytest.raises(LMForgeError, match="relative_attention_max_distance at 128; this model's is 12"):
        export_model(path, "gguf", tmp_path / "t5.gguf")
    assert not (tmp_path / "t5.gguf").exists()


def test_sentinels_written_as_placeholders_are_named_back(unigram: Any, tmp_path: Path) -> None:
    """llama.cpp's converter leaves T5's sentinels as unused [PAD{id}] tokens: read as transformers does."""
    unigram.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "config.json").write_text('{"model_type": "t5"}')
    tok = Tokenizer.from_dir(tmp_path)
    meta = unigram_metadata(tok, tok.vocab_size)
    n = tok.vocab_size
    assert meta["tokenizer.ggml.tokens"][n - 100:] == [f"<extra_id_{i}>" for i in range(99, -1, -1)]
    meta["tokenizer.ggml.tokens"][n - 100:] = [f"[PAD{i}]" for i in range(n - 100, n)]
    meta["tokenizer.ggml.token_type"][n - 100:] = [5] * 100
    again = Tokenizer.from_gguf_metadata(meta)
    assert [again.encode(t) for t in TEXTS] == [tok.encode(t) for t in TEXTS]
    assert again.encode("a <extra_id_0>", add_special_tokens=False)[-1] == n - 1
    assert again.decode([n - 1], skip_special_tokens=False) == "<extra_id_0>"


def test_gguf_back_to_hf_and_gguf(t5: tuple[str, Path, Path], tmp_path: Path, monkeypatch) -> None:
    """A T5 GGUF exports on: to an HF directory transformers runs with the same logits, and to GGUF again."""
    monkeypatch.setenv("LMFORGE_CPU_BF16", "0")
    _, path, file = t5
    hf_dir = export_model(file, "hf", tmp_path / "hf").path
    again = export_model(file, "gguf", tmp_path / "again.gguf", quant="q4_1").path
    src, mask, tgt = _batch(load_checkpoint(file, device="cpu").config.vocab_size)
    memory, logits = _outputs(file, src, mask, tgt)
    ref = transformers.T5ForConditionalGeneration.from_pretrained(hf_dir).eval()
    with torch.inference_mode():
        out = ref(input_ids=src, attention_mask=mask, decoder_input_ids=tgt)
    assert_close_scaled(out.encoder_last_hidden_state, memory, 1e-5)
    assert_close_scaled(out.logits, logits, 1e-4)
    assert Tokenizer.from_dir(hf_dir).encode(TEXTS[0]) == load_tokenizer(file).encode(TEXTS[0])
    types = {t.name: t.tensor_type.name for t in GGUFReader(str(again)).tensors}
    assert types["dec.blk.0.ffn_up.weight"] == "Q4_1" and types["output.weight"] == "Q8_0"
    assert load_checkpoint(again, device="cpu").config.decoder_layers == 3
