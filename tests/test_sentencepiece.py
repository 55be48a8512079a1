"""SentencePiece tokenizers through HF `tokenizers`: T5's Unigram (tokenizer.json), `lmforge tokenizer train
--model unigram`, and SentencePiece-BPE GGUF vocabularies (`tokenizer.ggml.model = "llama"`), each against
transformers on the same files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from tiny import EOS, PAD, SENTINELS, TEXTS, UNK, write_llama_gguf
from tiny import SPM_CORPUS as CORPUS
from tiny import train_t5_unigram as _train_unigram
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers, trainers
from transformers.tokenization_utils_base import generate_merges

import lmforge
from lmforge.cli import main
from lmforge.errors import LMForgeError
from lmforge.formats import load_tokenizer
from lmforge.tokenizer import Tokenizer, spm_merges


@pytest.fixture(scope="module")
def t5_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A T5 tokenizer directory with tokenizer_config.json, and one with tokenizer.json + config.json only."""
    hf = _train_unigram()
    full, bare = tmp_path_factory.mktemp("t5"), tmp_path_factory.mktemp("t5bare")
    for d in (full, bare):
        hf.save(str(d / "tokenizer.json"))
    cfg = {"tokenizer_class": "T5Tokenizer", "eos_token": EOS, "unk_token": UNK, "pad_token": PAD,
           "extra_ids": 100, "additional_special_tokens": SENTINELS}
    (full / "tokenizer_config.json").write_text(json.dumps(cfg), encoding="utf-8")
    (bare / "config.json").write_text(json.dumps({"model_type": "t5", "vocab_size": hf.get_vocab_size()}))
    return full, bare


def test_t5_unigram_matches_transformers(t5_dirs: tuple[Path, Path]) -> None:
    full, _ = t5_dirs
    tok = Tokenizer.from_dir(full)
    fast = transformers.T5TokenizerFast(tokenizer_file=str(full / "tokenizer.json"))
    auto = transformers.AutoTokenizer.from_pretrained(full)
    n = tok.vocab_size
    assert (tok.pad_token, tok.eos_token, tok.unk_token, tok.bos_token) == (PAD, EOS, UNK, None)
    assert [tok.token_to_id(t) for t in (PAD, EOS, UNK)] == [0, 1, 2]
    assert tok.stop_token_ids == [1]
    # T5 numbers its sentinels down from the end of the vocabulary.
    assert [tok.token_to_id(s) for s in SENTINELS] == list(range(n - 1, n - 101, -1))
    assert tok.encode("<extra_id_7>") == [n - 8, 1]
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == fast(text).input_ids == auto(text).input_ids, text
        assert ids[-1] == 1, text  # </s> appended, as T5's post-processor does
        assert tok.encode(text, add_special_tokens=False) == ids[:-1]
        assert tok.decode(ids) == fast.decode(ids, skip_special_tokens=True) == auto.decode(
            ids, skip_special_tokens=True), text
        assert tok.decode(ids, skip_special_tokens=False) == auto.decode(ids, skip_special_tokens=False), text
    assert tok.encode_batch(TEXTS) == auto(TEXTS).input_ids
    # Characters it has seen round-trip, with whitespace collapsed as T5's pre-tokenizer does.
    for text in CORPUS:
        assert tok.decode(tok.encode(text)) == " ".join(text.split())
    assert tok.encode("Ж") == [tok.token_to_id("▁"), 2, 1]  # never seen: <unk>
    assert "<extra_id_0>" not in tok.decode(tok.encode("a <extra_id_0> b"))
    assert "<extra_id_0>" in tok.decode(tok.encode("a <extra_id_0> b"), skip_special_tokens=False)


def test_t5_directory_without_tokenizer_config(t5_dirs: tuple[Path, Path]) -> None:
    """What the original T5 checkpoints ship: tokenizer.json and config.json, no special-token names."""
    full, bare = t5_dirs
    tok = Tokenizer.from_dir(bare)
    auto = transformers.AutoTokenizer.from_pretrained(bare)
    assert (tok.pad_token, tok.eos_token, tok.unk_token) == (auto.pad_token, auto.eos_token, auto.unk_token) \
        == (PAD, EOS, UNK)
    assert tok.stop_token_ids == [1]
    assert [tok.encode(t) for t in TEXTS] == [Tokenizer.from_dir(full).encode(t) for t in TEXTS]


# -- lmforge tokenizer train --model unigram ------------------------------------------------------------
@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    lines = [json.dumps({"text": t}, ensure_ascii=False) for _ in range(12) for t in CORPUS]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_train_unigram_cli_loads_in_lmforge_and_transformers(corpus_file: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "uni"
    assert main(["tokenizer", "train", "--input", str(corpus_file), "--model", "unigram", "--vocab-size", "400",
                 "--sentinels", "100", "--special-tokens", "<sep>", "--held-out", "0", "--out", str(out)]) == 0
    assert "wrote Unigram tokenizer" in capsys.readouterr().out
    tok = Tokenizer.from_dir(out)
    auto = transformers.AutoTokenizer.from_pretrained(out)
    fast = transformers.T5TokenizerFast(tokenizer_file=str(out / "tokenizer.json"))
    n = tok.vocab_size
    assert 200 < n <= 400
    assert [tok.token_to_id(t) for t in (PAD, EOS, UNK, "<sep>")] == [0, 1, 2, 3]
    assert (tok.pad_token, tok.eos_token, tok.unk_token) == (PAD, EOS, UNK)
    assert [tok.token_to_id(s) for s in SENTINELS] == list(range(n - 1, n - 101, -1))
    assert set(SENTINELS) <= set(auto.all_special_tokens)
    for text in [*TEXTS, "a <sep> b"]:
        ids = tok.encode(text)
        assert ids == auto(text).input_ids == fast(text).input_ids, text
        assert ids[-1] == 1
        assert tok.decode(ids) == auto.decode(ids, skip_special_tokens=True), text
    # Seen text round-trips exactly: spaces (runs too), tabs and newlines are kept.
    for text in CORPUS:
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode("<sep>", add_special_tokens=False) == [3]


def test_train_model_flags(corpus_file: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "bpe"
    # --model bpe stays the default: byte-level, so any text round-trips.
    assert main(["tokenizer", "train", "--input", str(corpus_file), "--vocab-size", "400", "--held-out", "0",
                 "--out", str(out)]) == 0
    assert "byte-level BPE" in capsys.readouterr().out
    bpe = Tokenizer.from_dir(out)
    assert bpe.decode(bpe.encode("unseen: ŧ 🦀")) == "unseen: ŧ 🦀"
    assert bpe.token_to_id("<|endoftext|>") == 0
    for argv, msg in ((["--model", "bpe", "--vocab-size", "400", "--sentinels", "4"], "--sentinels needs"),
                      (["--model", "unigram", "--char"], "--char and --model unigram"),
                      (["--model", "unigram", "--vocab-size", "50", "--sentinels", "100"], "too small")):
        assert main(["tokenizer", "train", "--input", str(corpus_file), "--out", str(tmp_path / "x"), *argv]) == 1
        err = capsys.readouterr().err
        assert msg in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "x").exists()


# -- SentencePiece-BPE GGUF (Llama 2 style) -------------------------------------------------------------
BYTES = [f"<0x{b:02X}>" for b in range(256)]


def _spm_pieces(n: int = 400) -> list[str]:
    """`▁`-prefixed pieces in merge order, as a SentencePiece BPE vocabulary lists them (best first)."""
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    hf.train_from_iterator(CORPUS * 10, trainers.BpeTrainer(vocab_size=n, show_progress=False))
    return [p for p, _ in sorted(hf.get_vocab().items(), key=lambda kv: kv[1])]


def _write_spm_gguf(path: Path, **flags: bool) -> Path:
    """A tiny F32 llama GGUF with a Llama 2-style vocabulary: <unk>, <s>, </s>, 256 byte tokens, scored
    pieces, a control token and a user-defined one."""
    pieces = [p for p in _spm_pieces() if p not in ("<", ">")]  # so "<" and ">" take the byte fallback
    tokens = ["<unk>", "<s>", "</s>", *BYTES, *pieces, "<|im_end|>", "<think>"]
    types = [2, 3, 3, *[6] * 256, *[1] * len(pieces), 3, 4]
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))] + [0.0, 0.0]

    def tokenizer(w: Any) -> None:
        w.add_tokenizer_model("llama")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        w.add_unk_token_id(0)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        if "add_space_prefix" in flags:
            w.add_add_space_prefix(flags["add_space_prefix"])
        if "add_bos" in flags:
            w.add_add_bos_token(flags["add_bos"])

    return write_llama_gguf(path, "tiny-spm", len(tokens), tokenizer)


@pytest.fixture(scope="module")
def spm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("spm")
    _write_spm_gguf(d / "llama2.gguf")  # no add_* keys: a space prefix and BOS by default
    _write_spm_gguf(d / "plain.gguf", add_space_prefix=False, add_bos=False)
    return d


GGUF_TEXTS = [*TEXTS, "x<|im_end|>y <think> z</s>", "<s>hi</s>", "a<unk>b", "\n\t  ", "<think>"]


def test_spm_gguf_matches_transformers(spm_dir: Path) -> None:
    tok = load_tokenizer(spm_dir / "llama2.gguf")
    ref = transformers.AutoTokenizer.from_pretrained(spm_dir, gguf_file="llama2.gguf")
    assert (tok.bos_token, tok.eos_token, tok.unk_token) == ("<s>", "</s>", "<unk>")
    assert tok.stop_token_ids == [2, tok.token_to_id("<|im_end|>")]
    for text in GGUF_TEXTS:
        ids = tok.encode(text)
        assert ids == ref(text).input_ids, text
        assert ids[:1] == [1], text  # BOS, as llama.cpp adds it to a SentencePiece vocabulary by default
        assert tok.encode(text, add_special_tokens=False) == ids[1:]
        assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=True), text
        assert tok.decode(ids, skip_special_tokens=False) == ref.decode(ids, skip_special_tokens=False), text
    # Bytes outside the vocabulary go through <0xNN> and come back whole; spacing is kept.
    for text in ["unseen: ŧ Ж ℵ 🦀 ǅ", "Tabs\tand ŧ\nЖ   runs", "中文 😀 ①"]:
        ids = tok.encode(text, add_special_tokens=False)
        assert any(tok.id_to_token(i) in BYTES for i in ids), text
        assert tok.decode(ids) == text
    assert [tok.id_to_token(i) for i in tok.encode("🦀", add_special_tokens=False)] == \
        ["▁", "<0xF0>", "<0x9F>", "<0xA6>", "<0x80>"]
    # Control tokens are special (skipped when decoding); user-defined ones match whole and are kept.
    ids = tok.encode("a<|im_end|>b<think>c", add_special_tokens=False)
    assert tok.token_to_id("<|im_end|>") in ids and tok.token_to_id("<think>") in ids
    assert tok.decode(ids) == "ab<think>c"


def test_spm_merges_as_transformers_derives_them(spm_dir: Path) -> None:
    from lmforge.formats.gguf import GGUFFile

    meta = GGUFFile(spm_dir / "llama2.gguf").meta
    tokens, scores = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.scores"]
    ours = spm_merges(tokens, scores)
    assert len(ours) > 100
    assert ours == generate_merges({t: i for i, t in enumerate(tokens)}, dict(zip(tokens, scores)))


def test_spm_gguf_without_space_prefix_or_bos(spm_dir: Path) -> None:
    """add_space_prefix = false (transformers ignores the key; llama.cpp honours it) and add_bos_token = false."""
    tok = load_tokenizer(spm_dir / "plain.gguf")
    ref = transformers.AutoTokenizer.from_pretrained(spm_dir, gguf_file="plain.gguf")
    for text in GGUF_TEXTS:
        # Text that starts with a space reads the same either way.
        assert tok.encode(" " + text) == ref(" " + text).input_ids, text
        if text and not text.startswith(("<", " ")):
            assert not tok.id_to_token(tok.encode(text)[0]).startswith("▁"), text
    spaced = load_tokenizer(spm_dir / "llama2.gguf")
    assert tok.encode("hello world") != spaced.encode("hello world", add_special_tokens=False)
    for text in ["  two leading spaces", "hello world", "Tabs\tand newlines\n"]:
        assert tok.decode(tok.encode(text)) == text  # no prefix added, none stripped


def test_spm_gguf_loads_and_generates(spm_dir: Path) -> None:
    lm = lmforge.load(spm_dir / "llama2.gguf", device="cpu", dtype=torch.float32)
    ref = transformers.AutoTokenizer.from_pretrained(spm_dir, gguf_file="llama2.gguf")
    prompt = "Le renard 😀"
    assert lm.tokenizer.encode(prompt) == ref(prompt).input_ids
    seq = lm.generate_sequences([lm.tokenizer.encode(prompt)],
                                lmforge.SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))[0]
    out = seq.output_ids
    assert 1 <= len(out) <= 6 and all(0 <= i < lm.tokenizer.vocab_size for i in out)
    # The text continues the prompt's (a leading `▁` is a space here, not the start of a text).
    ids = lm.tokenizer.encode(prompt) + [i for i in out if i not in lm.tokenizer.stop_token_ids]
    assert prompt + seq.text == lm.tokenizer.decode(ids)
    assert isinstance(lm.generate(prompt, max_tokens=4, temperature=0), str)


def test_unknown_gguf_tokenizer_model_is_one_line_error(tmp_path: Path, spm_dir: Path) -> None:
    from gguf import GGUFWriter

    path = tmp_path / "rwkv.gguf"
    w = GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("rwkv-world")
    w.add_token_list(["a", "b"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(LMForgeError) as ei:
        load_tokenizer(path)
    msg = str(ei.value)
    assert "'rwkv-world'" in msg and "llama" in msg and "\n" not in msg
    # A SentencePiece vocabulary that other architectures spell differently is refused by name, not guessed.
    from lmforge.formats.gguf import GGUFFile

    meta = {**GGUFFile(spm_dir / "llama2.gguf").meta, "general.architecture": "gemma2"}
    with pytest.raises(LMForgeError, match="'gemma2'"):
        Tokenizer.from_gguf_metadata(meta)
    del meta["tokenizer.ggml.scores"]
    meta["general.architecture"] = "llama"
    with pytest.raises(LMForgeError, match="tokenizer.ggml.scores"):
        Tokenizer.from_gguf_metadata(meta)
