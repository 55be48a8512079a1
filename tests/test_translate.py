"""`lmforge translate` and `lmforge summarize`: T5-style prefixes checked against the tasks a model
declares, chat instructions for decoder models, and bad input as one-line errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from tiny import make_tiny_llama_dir

from lmforge.api import load
from lmforge.cli import main
from lmforge.formats.export import save_hf
from lmforge.model import ModelConfig
from lmforge.model.seq2seq import EncoderDecoder
from lmforge.tokenizer import Tokenizer
from lmforge.train.seq2seq import declare_task, declared_task, translation_prefix
from lmforge.train.tokenizer import train_unigram
from lmforge.translate import instruction, prompt_ids

pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = ["a small dog runs over the river", "the woman looks at a tree"]


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random T5 that declares en->de translation, as `lmforge train` writes one."""
    tmp = tmp_path_factory.mktemp("t5")
    corpus = tmp / "text.txt"
    corpus.write_text("\n".join(TEXTS * 20 + ["ein kleiner Hund läuft über den Fluss", "summarize: translate to"]),
                      encoding="utf-8")
    tok = Tokenizer.from_dir(train_unigram([corpus], 120, tmp / "tok", progress=False))
    cfg = ModelConfig(family="t5", vocab_size=tok.vocab_size, dim=64, n_layers=2, decoder_layers=2, n_heads=4,
                      head_dim=16, ffn_dim=128, mlp="gelu", activation="relu", position="relative",
                      relative_buckets=16, relative_max_distance=32, tie_embeddings=True, output_scale=True,
                      context_length=48)
    declare_task(cfg, translation_prefix("en", "de"))
    torch.manual_seed(0)
    model = EncoderDecoder(cfg)
    model.init_weights()
    return save_hf(model, tmp / "model", tok)


def test_prefixes_and_declared_tasks() -> None:
    assert translation_prefix("en", "fr") == "translate English to French: "
    assert declared_task("translate English to German: ") == {
        "translation_en_to_de": {"prefix": "translate English to German: "}}
    assert declared_task("summarize: ") == {"summarization": {"prefix": "summarize: "}}
    assert declared_task("question: ") == {}


def test_translate_reads_the_t5_prefix_and_matches_generate(t5_dir: Path, capsys) -> None:
    config = json.loads((t5_dir / "config.json").read_text())
    assert config["task_specific_params"] == {"translation_en_to_de": {"prefix": "translate English to German: "}}
    lm = load(t5_dir)
    assert prompt_ids(lm, "translate", TEXTS[0]) == lm.tokenizer.encode("translate English to German: " + TEXTS[0])
    want = lm.generate(["translate English to German: " + t for t in TEXTS], max_tokens=8, temperature=0.0)
    assert main(["translate", str(t5_dir), *TEXTS, "--max-tokens", "8"]) == 0
    assert capsys.readouterr().out.splitlines() == [w.strip() for w in want]


def test_translate_refuses_a_pair_the_model_was_not_trained_for(t5_dir: Path, capsys) -> None:
    assert main(["translate", str(t5_dir), "hello", "--to", "fr"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "trained for other tasks (it translates en->de), not en->fr" in err
    assert main(["summarize", str(t5_dir), str(t5_dir / "config.json")]) == 1
    assert "not summarization" in capsys.readouterr().err
    assert main(["translate", str(t5_dir), "hello", "--to", "xx"]) == 1
    assert "unknown language code 'xx'" in capsys.readouterr().err


def test_bad_input_is_a_one_line_error(t5_dir: Path, tmp_path: Path, capsys) -> None:
    bare = tmp_path / "bare"
    shutil.copytree(t5_dir, bare)
    for f in bare.glob("tokenizer*"):
        f.unlink()
    assert main(["translate", str(bare), "hello"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no tokenizer" in err
    assert main(["translate", str(t5_dir), " ".join(["river"] * 200)]) == 1  # the encoder holds 48 positions
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "48" in err
    assert main(["summarize", str(t5_dir), str(tmp_path / "missing.txt")]) == 1
    assert "missing.txt: cannot read" in capsys.readouterr().err


def test_summarize_a_file_with_a_model_that_declares_no_tasks(t5_dir: Path, tmp_path: Path, capsys) -> None:
    plain = tmp_path / "plain"
    shutil.copytree(t5_dir, plain)
    config = json.loads((plain / "config.json").read_text())
    del config["task_specific_params"]
    (plain / "config.json").write_text(json.dumps(config))
    doc = tmp_path / "doc.txt"
    doc.write_text("the woman looks\n\n  at a tree\n", encoding="utf-8")  # read as one paragraph
    lm = load(plain)
    want = lm.generate("summarize: the woman looks at a tree", max_tokens=6, temperature=0.0)
    assert main(["summarize", str(plain), str(doc), "--max-tokens", "6"]) == 0
    assert capsys.readouterr().out.strip() == want.strip()


def test_a_chat_model_gets_an_instruction(tmp_path: Path, capsys) -> None:
    path = make_tiny_llama_dir(tmp_path / "llama", context=256)
    lm = load(path)
    ids = prompt_ids(lm, "translate", "hello there", "en", "fr")
    assert ids == lm.chat_prompt([{"role": "user", "content": instruction("translate", "hello there", "en", "fr")}])
    assert "into French" in instruction("translate", "x", "en", "fr")
    want = lm.tokenizer.decode(lm.generate_sequences([ids], _greedy(4))[0].output_ids)
    assert main(["translate", str(path), "hello there", "--to", "fr", "--max-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip() == want.strip()


def _greedy(n: int):
    from lmforge.engine import SamplingParams

    return SamplingParams(max_tokens=n, temperature=0.0)
