"""Classification fine-tuning: data files, an end-to-end run on a tiny encoder and decoder, reload, errors."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from tiny import make_tiny_bert_dir, make_tiny_llama_dir

import lmforge
from lmforge.cli import main
from lmforge.encoders.classify import Classifier, metrics, read_labelled

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

POSITIVE = ["great", "good", "lovely", "superb", "wonderful"]
NEGATIVE = ["awful", "bad", "dull", "terrible", "boring"]
FILLER = ["the", "film", "was", "a", "plot", "and", "acting", "really", "quite", "story", "cast", "it"]


def _examples(n: int, seed: int) -> list[tuple[str, str]]:
    """Sentences whose label is given by one sentiment word among fillers (a task a tiny model can learn)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        label = rng.choice(["positive", "negative"])
        words = rng.sample(FILLER, 5)
        words.insert(rng.randrange(6), rng.choice(POSITIVE if label == "positive" else NEGATIVE))
        out.append((" ".join(words), label))
    return out


def _write(path: Path, rows: list[tuple[str, str]]) -> Path:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps({"review": t, "sentiment": y}) + "\n" for t, y in rows), encoding="utf-8")
    else:
        sep = "\t" if path.suffix == ".tsv" else ","
        path.write_text(f"review{sep}sentiment\n" + "".join(f"{t}{sep}{y}\n" for t, y in rows), encoding="utf-8")
    return path


def test_read_labelled_formats(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_text('text,label\n"hello, ""world""",1\nplain,0\n', encoding="utf-8")
    assert read_labelled(tmp_path / "a.csv", "text", "label") == [('hello, "world"', "1"), ("plain", "0")]
    # GLUE TSVs use quotes as ordinary characters.
    (tmp_path / "a.tsv").write_text('sentence\tlabel\n"quoted\t1\nit \'s fine \t0\n', encoding="utf-8")
    assert read_labelled(tmp_path / "a.tsv", "sentence", "label") == [('"quoted', "1"), ("it 's fine ", "0")]
    (tmp_path / "a.jsonl").write_text('{"t": "x", "y": 3}\n\n{"t": "z", "y": 4}\n', encoding="utf-8")
    assert read_labelled(tmp_path / "a.jsonl", "t", "y") == [("x", "3"), ("z", "4")]
    m = metrics([1, 1, 0, 0], [1, 0, 0, 0], 2)
    assert m["accuracy"] == 0.75 and m["f1"] == pytest.approx(2 / 3) and m["f1_macro"] == pytest.approx((2 / 3 + 0.8) / 2)


def test_finetune_tiny_encoder_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    words = POSITIVE + NEGATIVE + FILLER
    base = make_tiny_bert_dir(tmp_path / "bert", words, layers=2, std=0.1)
    train = _write(tmp_path / "train.tsv", _examples(512, 0))
    held = _examples(64, 1)
    evals = _write(tmp_path / "eval.jsonl", held)
    out = tmp_path / "clf"
    # Different files may spell the fields the same way: TSV columns and JSONL keys are both review/sentiment.
    rc = main(["finetune", "classify", str(base), "--train", str(train), "--eval", str(evals),
               "--text-field", "review", "--label-field", "sentiment", "--out", str(out), "--epochs", "6",
               "--batch-size", "16", "--lr", "3e-3", "--device", "cpu"])
    assert rc == 0
    printed = capsys.readouterr().out
    acc = float(printed.split("accuracy ")[1].split(",")[0])
    assert acc >= 0.9, printed
    meta = json.loads((out / "classifier.json").read_text())
    assert meta["labels"] == ["negative", "positive"] and meta["pooling"] == "mean"
    assert meta["eval"]["accuracy"] == pytest.approx(acc, abs=1e-4) and 0 < meta["eval"]["f1"] <= 1

    clf = Classifier(out, device="cpu")
    probs = clf.probabilities([t for t, _ in held])
    assert np.allclose(probs.sum(1), 1.0, atol=1e-5)
    assert np.mean([clf.labels[i] == y for i, (_, y) in zip(probs.argmax(1), held)]) == pytest.approx(acc, abs=1e-4)
    # The folder is also a plain model directory: it loads and embeds.
    assert lmforge.load(out, device="cpu").embed(["great film"]).shape == (1, 32)
    assert main(["classify", str(out), "the film was superb", "a dull and boring plot", "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[0] for line in lines] == ["positive", "negative"]


def test_finetune_decoder_last_token(tmp_path: Path) -> None:
    from lmforge.encoders.finetune import ClassifyConfig, finetune_classifier

    base = make_tiny_llama_dir(tmp_path / "llama")
    train = _write(tmp_path / "train.csv", _examples(32, 2))
    report = finetune_classifier(base, train, train, tmp_path / "clf", "review", "sentiment",
                                 ClassifyConfig(epochs=1, batch_size=8, lr=1e-3), device="cpu", log=lambda s: None)
    assert report["steps"] == 4 and report["eval"]["examples"] == 32
    clf = Classifier(tmp_path / "clf", device="cpu")
    assert clf.meta["pooling"] == "last" and set(clf.predict(["the film was good"])) <= {"negative", "positive"}
    # The head sees each text's last real token: padding in a batch must not change a prediction.
    alone = clf.probabilities(["the film was good"])
    batched = clf.probabilities(["the film was good", "a much longer text about the plot and the acting"])
    assert np.allclose(alone[0], batched[0], atol=1e-5)


def _error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    capsys.readouterr()
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("lmforge: error:") and len(err.splitlines()) == 1
    return err


def test_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    train = _write(tmp_path / "train.tsv", _examples(8, 3))
    args = ["finetune", "classify", str(tmp_path / "nomodel"), "--train", str(train), "--out", str(tmp_path / "o"),
            "--text-field", "review"]
    err = _error(capsys, [*args, "--label-field", "stars"])
    assert "no column 'stars'" in err and "review, sentiment" in err
    err = _error(capsys, [*args[:-2], "--text-field", "body", "--label-field", "sentiment"])
    assert "no column 'body'" in err
    (tmp_path / "one.jsonl").write_text('{"review": "a", "sentiment": "x"}\n', encoding="utf-8")
    err = _error(capsys, ["finetune", "classify", "m", "--train", str(tmp_path / "one.jsonl"), "--out", "o",
                          "--text-field", "review", "--label-field", "sentiment"])
    assert "only one label" in err
    (tmp_path / "bad.jsonl").write_text('{"review": "a"}\n', encoding="utf-8")
    assert "no field 'sentiment'" in _error(capsys, ["finetune", "classify", "m", "--train", str(tmp_path / "bad.jsonl"),
                                                     "--out", "o", "--text-field", "review", "--label-field", "sentiment"])
    (tmp_path / "x.xlsx").write_text("nope", encoding="utf-8")
    assert "unsupported file type" in _error(capsys, ["finetune", "classify", "m", "--train", str(tmp_path / "x.xlsx"),
                                                      "--out", "o"])
    other = _write(tmp_path / "other.jsonl", [("great", "neutral")])
    base = make_tiny_bert_dir(tmp_path / "bert", ["great"])
    err = _error(capsys, ["finetune", "classify", str(base), "--train", str(train), "--eval", str(other), "--out",
                          str(tmp_path / "o"), "--text-field", "review", "--label-field", "sentiment"])
    assert "'neutral'" in err and "do not occur" in err
    assert "not a classifier" in _error(capsys, ["classify", str(base), "hello"])
    assert not (tmp_path / "o").exists()
