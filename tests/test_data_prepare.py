"""`lmforge data prepare`: streamed, parallel tokenization into flat token shards."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
from tiny import train_tokenizer
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models

from lmforge.errors import LMForgeError
from lmforge.tokenizer import Tokenizer
from lmforge.train.data import load_split, prepare

DOCS = [f"Story {i}: the little fox ran {'far ' * (i % 5)}and found a red ball.\nThe end.\n" for i in range(12)]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer(train_tokenizer(), eos_token="<|endoftext|>")


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    for i, text in enumerate(DOCS[:6]):  # one document per text file
        (d / "sub" / f"doc{i:02d}.txt").write_text(text, encoding="utf-8")
    with gzip.open(d / "more.jsonl.gz", "wt", encoding="utf-8") as f:
        for text in DOCS[6:]:
            f.write(json.dumps({"text": text, "id": 1}) + "\n")
        f.write(json.dumps({"other": "no text field here"}) + "\n")
    return d


def _documents(tokens: np.ndarray, boundary: int) -> list[list[int]]:
    cuts = np.flatnonzero(tokens == boundary)
    assert len(cuts) and cuts[0] == 0  # every document starts with the boundary token
    return [tokens[a + 1:b].tolist() for a, b in zip(cuts, [*cuts[1:], len(tokens)])]


def test_prepare_round_trip_and_split(tmp_path: Path, corpus: Path, tok: Tokenizer) -> None:
    meta = prepare([corpus], tok, tmp_path / "data", val_fraction=0.25, workers=1, progress=False)
    assert meta["dtype"] == "uint16" and meta["documents"] == 12
    b = meta["boundary_token_id"]
    assert b == tok.token_to_id("<|endoftext|>")
    train, val = load_split(tmp_path / "data", "train"), load_split(tmp_path / "data", "val")
    assert train.dtype == np.uint16
    texts = [tok.decode(d) for d in _documents(np.asarray(train), b) + _documents(np.asarray(val), b)]
    assert sorted(texts) == sorted(DOCS)
    assert len(_documents(np.asarray(val), b)) == 3  # every 4th document
    assert meta["train"]["tokens"] + meta["val"]["tokens"] == len(train) + len(val)


def test_workers_and_shards_give_the_same_tokens(tmp_path: Path, corpus: Path, tok: Tokenizer) -> None:
    one = prepare([corpus], tok, tmp_path / "one", val_fraction=0.25, workers=1, progress=False)
    two = prepare([corpus], tok, tmp_path / "two", val_fraction=0.25, workers=2, shard_tokens=50, progress=False)
    assert len(two["train"]["shards"]) > 1 and all(s["tokens"] <= 50 for s in two["train"]["shards"])
    for split in ("train", "val"):
        assert np.array_equal(load_split(tmp_path / "one", split), load_split(tmp_path / "two", split))
    assert one["train"]["tokens"] == two["train"]["tokens"]


def test_large_vocab_uses_uint32_and_refuses_uint16(tmp_path: Path, corpus: Path) -> None:
    vocab = {f"t{i}": i for i in range(70_000)} | {"<|endoftext|>": 70_000, "[UNK]": 70_001}
    big = Tokenizer(HFTokenizer(models.WordLevel(vocab, unk_token="[UNK]")), eos_token="<|endoftext|>")
    with pytest.raises(LMForgeError, match="70002 tokens does not fit uint16"):
        prepare([corpus], big, tmp_path / "d16", dtype="uint16", workers=1, progress=False)
    assert not (tmp_path / "d16").exists()
    meta = prepare([corpus], big, tmp_path / "d32", workers=1, progress=False)
    assert meta["dtype"] == "uint32" and load_split(tmp_path / "d32").dtype == np.uint32


def test_bad_inputs(tmp_path: Path, tok: Tokenizer) -> None:
    with pytest.raises(LMForgeError, match="no such file, directory or match: .*missing.txt"):
        prepare([tmp_path / "missing.txt"], tok, tmp_path / "out", progress=False)
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"title": "x"}) + "\n", encoding="utf-8")
    with pytest.raises(LMForgeError, match="empty corpus"):
        prepare([empty], tok, tmp_path / "out", workers=1, progress=False)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp dirs left behind
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me", encoding="utf-8")
    (tmp_path / "c.txt").write_text("some text", encoding="utf-8")
    with pytest.raises(LMForgeError, match="refusing to replace it"):
        prepare([tmp_path / "c.txt"], tok, precious, workers=1, progress=False)
    assert (precious / "notes.txt").read_text(encoding="utf-8") == "keep me"


def test_single_small_file_still_gets_a_val_split(tmp_path: Path, tok: Tokenizer) -> None:
    (tmp_path / "one.txt").write_text("".join(DOCS), encoding="utf-8")
    meta = prepare([tmp_path / "one.txt"], tok, tmp_path / "d", val_fraction=0.1, workers=1, progress=False)
    train, val = load_split(tmp_path / "d", "train"), load_split(tmp_path / "d", "val")
    b = meta["boundary_token_id"]
    assert val[0] == b and train[0] == b
    assert 0.08 < (len(val) - 1) / (len(train) + len(val) - 1) < 0.12
    # the two splits are the whole file, cut once
    assert tok.decode(np.concatenate([train[1:], val[1:]]).tolist()) == "".join(DOCS)
