"""`lmforge tokenizer train`: byte-level BPE and char-level training, inputs, atomic output, CLI."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import pytest

from lmforge.cli import main
from lmforge.errors import LMForgeError
from lmforge.tokenizer import Tokenizer
from lmforge.train import tokenizer as tt
from lmforge.train.corpus import iter_texts
from lmforge.train.tokenizer import SPECIAL_TOKENS, bytes_per_token, train_bpe, train_char

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SAMPLES = [
    "The quick brown fox jumps over the lazy dog. It's 2024!",
    "Le cœur a ses raisons que la raison ne connaît point. Où êtes-vous ?",
    "我们今天去公园散步，天气很好。",
    "今日はとても良い天気ですね。カタカナとひらがな。",
    "مرحبا بالعالم، كيف حالك اليوم؟",
    "Emoji: 🎉🚀👩‍👩‍👧 and ümlauts\ttabs\r\nCRLF",
    "def add(a, b):\n    return a + b  # sum\n\n\nprint(add(1, 2))\n",
]


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(SAMPLES * 40), encoding="utf-8")
    return path


def test_bpe_round_trip_specials_and_transformers(corpus: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    out = train_bpe([corpus], 600, tmp_path / "tok", progress=False)
    assert {p.name for p in out.iterdir()} == {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}
    tok = Tokenizer.from_dir(out)
    assert 300 < tok.vocab_size <= 600
    unseen = "Ελληνικά, русский, हिन्दी, 한국어 \x00\x7f"  # never in training: bytes still cover it
    for s in [*SAMPLES, unseen, "".join(SAMPLES)]:
        assert tok.decode(tok.encode(s), skip_special_tokens=False) == s
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.encode(t) == [i]
    assert tok.eos_token == tok.bos_token == "<|endoftext|>"
    fast = PreTrainedTokenizerFast.from_pretrained(out)
    auto = AutoTokenizer.from_pretrained(out)
    text = "".join(SAMPLES) + "<|im_start|>user\nhi<|im_end|><tool_call>{}</tool_call><|endoftext|>"
    assert fast.encode(text) == auto.encode(text) == tok.encode(text)
    assert fast.decode(tok.encode(text)) == text
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Bonjour 你好 🎉"}]
    rendered = tok.apply_chat_template(messages)
    assert rendered == fast.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == auto.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert tok.encode_chat(messages)[0] == tok.token_to_id("<|im_start|>")


def test_bpe_reaches_50k_vocab(tmp_path: Path) -> None:
    files = [DATA / "tinyshakespeare" / "input.txt", DATA / "tinystories" / "tinystories.txt"]
    for f in files:
        if not f.exists():
            pytest.skip(f"{f} not present (shared data sets missing)")
    # The two corpora alone give ~23k tokens with min_frequency=1; random words over a large
    # alphabet (Latin, Greek, CJK) supply the rest.
    rng = random.Random(0)
    alphabet = [chr(c) for c in range(0x61, 0x7B)] + [chr(c) for c in range(0x3B1, 0x3C9)]
    alphabet += [chr(c) for c in range(0x4E00, 0x4E00 + 300)]
    synthetic = tmp_path / "synthetic.txt"
    with synthetic.open("w", encoding="utf-8") as f:
        for _ in range(4000):
            f.write(" ".join("".join(rng.choices(alphabet, k=rng.randint(3, 9))) for _ in range(12)) + "\n")
    out = train_bpe([*files, synthetic], 50_000, tmp_path / "tok", min_frequency=1, progress=False)
    tok = Tokenizer.from_dir(out)
    assert tok.hf.get_vocab_size() >= 50_000
    text = files[0].read_text(encoding="utf-8")[:5000]
    assert tok.decode(tok.encode(text)) == text
    assert bytes_per_token(tok, [text]) > 3


def test_char_level(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    text = "héllo wörld\n你好 🎉\tend"
    (tmp_path / "c.txt").write_text(text, encoding="utf-8")
    out = train_char([tmp_path / "c.txt"], tmp_path / "tok")
    tok = Tokenizer.from_dir(out)
    assert tok.vocab_size == len(set(text)) + len(SPECIAL_TOKENS) + 1  # + <unk>
    ids = tok.encode(text + "<|im_end|>")
    assert len(ids) == len(text) + 1 and ids[-1] == SPECIAL_TOKENS.index("<|im_end|>")
    assert tok.decode(ids, skip_special_tokens=False) == text + "<|im_end|>"
    assert tok.decode(tok.encode("X"), skip_special_tokens=False) == tt.CHAR_UNK
    assert AutoTokenizer.from_pretrained(out).encode(text) == tok.encode(text)


def test_inputs_jsonl_gz_directory_and_glob(tmp_path: Path) -> None:
    with gzip.open(tmp_path / "d.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps({"body": "from jsonl", "text": "ignored"}) + "\n\n")
        f.write(json.dumps({"other": 1}) + "\n")
    assert list(iter_texts([tmp_path / "d.jsonl.gz"], text_field="body")) == ["from jsonl"]
    tree = tmp_path / "tree" / "sub"
    tree.mkdir(parents=True)
    (tree / "a.md").write_text("para one\n\npara two\n", encoding="utf-8")
    (tree / "b.txt").write_text("bee", encoding="utf-8")
    (tree / "blob.bin").write_bytes(b"\x00\x01binary")
    (tree / ".hidden.txt").write_text("hidden", encoding="utf-8")
    assert list(iter_texts([tmp_path / "tree"])) == ["para one\n\n", "para two\n", "bee"]
    assert list(iter_texts([str(tmp_path / "tree" / "**" / "*.txt")])) == ["bee"]
    out = train_bpe([tmp_path / "tree", tmp_path / "d.jsonl.gz"], 300, tmp_path / "tok", text_field="body",
                    min_frequency=1, progress=False)
    assert Tokenizer.from_dir(out).decode(Tokenizer.from_dir(out).encode("from jsonl")) == "from jsonl"


def test_bad_inputs(corpus: Path, tmp_path: Path) -> None:
    with pytest.raises(LMForgeError, match="nope.txt"):
        train_bpe([corpus, tmp_path / "nope.txt"], 1000, tmp_path / "tok")
    with pytest.raises(LMForgeError, match="no-match"):
        list(iter_texts([str(tmp_path / "no-match*.txt")]))
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    with pytest.raises(LMForgeError, match="empty corpus"):
        train_bpe([tmp_path / "empty.txt"], 1000, tmp_path / "tok", progress=False)
    with pytest.raises(LMForgeError, match=r"200.*262"):
        train_bpe([corpus], 200, tmp_path / "tok")
    assert not (tmp_path / "tok").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tok")]


def test_existing_out_replaced_only_when_complete(corpus: Path, tmp_path: Path, monkeypatch) -> None:
    out = train_bpe([corpus], 400, tmp_path / "tok", progress=False)
    before = (out / "tokenizer.json").read_bytes()

    def broken_save(self, path: str, pretty: bool = True) -> None:
        Path(path).write_text("{half", encoding="utf-8")
        raise RuntimeError("disk full")

    monkeypatch.setattr(tt.HFTokenizer, "save", broken_save, raising=False)
    with pytest.raises(RuntimeError, match="disk full"):
        train_bpe([corpus], 500, out, progress=False)
    monkeypatch.undo()
    assert (out / "tokenizer.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.txt", "tok"]
    train_bpe([corpus], 500, out, progress=False)
    assert Tokenizer.from_dir(out).vocab_size > 400
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("keep me", encoding="utf-8")
    with pytest.raises(LMForgeError, match="refusing"):
        train_bpe([corpus], 400, tmp_path / "precious", progress=False)


def test_cli(corpus: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    out = tmp_path / "tok"
    assert main(["tokenizer", "train", "--input", str(corpus), "--vocab-size", "500", "--out", str(out),
                 "--held-out", "0.1"]) == 0
    stdout = capsys.readouterr().out
    assert "vocab size:" in stdout and "training time:" in stdout
    assert "new tokenizer" in stdout and "smollm2-135m-instruct" in stdout  # a score, or "not pulled"
    assert (out / "tokenizer.json").exists()
    monkeypatch.setattr("lmforge.registry.is_pulled", lambda name: False)
    assert main(["tokenizer", "train", "--input", str(corpus), "--vocab-size", "500", "--out", str(out)]) == 0
    assert "smollm2-135m-instruct is not pulled" in capsys.readouterr().out
    assert main(["tokenizer", "train", "--input", str(corpus), "--char", "--out", str(tmp_path / "c")]) == 0
    assert "character-level" in capsys.readouterr().out

    for argv in (["--input", str(tmp_path / "missing.txt"), "--vocab-size", "500"],
                 ["--input", str(corpus), "--vocab-size", "100"],
                 ["--input", str(corpus)]):
        assert main(["tokenizer", "train", *argv, "--out", str(out)]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("lmforge: error:")
