"""Semantic search and knowledge-base QA: chunking, an index over a few files, search, ask, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tiny import make_tiny_bert_dir, make_tiny_llama_dir

import lmforge
from lmforge import SamplingParams
from lmforge.cli import main
from lmforge.retrieval import Index, answer, build_index, chunk_text

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

DOCS = {
    "baking/sourdough.md": "# Sourdough bread\n\nTo bake sourdough bread, feed your starter the night before. "
                           "Mix flour, water and salt with the active starter, let the dough rise for eight hours, "
                           "shape the loaf and bake it in a hot Dutch oven at 250 degrees for forty minutes.",
    "volcanoes.txt": "Volcanoes form where magma from the Earth's mantle reaches the surface. Lava, ash and gases "
                     "erupt through vents. Mount Etna in Sicily is one of the most active volcanoes in the world.",
    "python_lists.md": "Python lists are mutable sequences. Use append() to add an item, pop() to remove the last "
                       "one, and sort() to order the list in place. List comprehensions build lists concisely.",
    "solar_system.txt": "The solar system has eight planets. Jupiter is the largest planet, a gas giant with a "
                        "great red spot. Mercury is closest to the Sun and Neptune is the farthest.",
    "football.md": "Football is played by two teams of eleven players. A match lasts ninety minutes and the team "
                   "that scores more goals wins. The World Cup is held every four years.",
}


@pytest.fixture(scope="module")
def docs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("docs")
    for name, text in DOCS.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text + "\n", encoding="utf-8")
    (root / ".hidden.md").write_text("Sourdough sourdough sourdough bread bake.", encoding="utf-8")  # skipped
    return root


@pytest.fixture(scope="module")
def index_dir(docs: Path, minilm_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("idx") / "index"
    assert main(["index", "build", str(docs), "--embed-model", str(minilm_path), "--out", str(out),
                 "--chunk-words", "24", "--overlap", "6", "--device", "cpu"]) == 0
    return out


def test_chunking_overlaps_and_tracks_lines() -> None:
    text = "\n".join(f"w{i}" for i in range(25))  # one word per line
    chunks = list(chunk_text(text, chunk_words=10, overlap_words=3))
    assert [line for line, _ in chunks] == [1, 8, 15, 22]
    assert chunks[0][1].split() == [f"w{i}" for i in range(10)]
    assert chunks[1][1].split()[:3] == ["w7", "w8", "w9"]  # shared with the previous chunk
    assert chunks[-1][1].split()[-1] == "w24"
    assert list(chunk_text("   \n  ")) == []
    with pytest.raises(lmforge.LMForgeError):
        list(chunk_text("a b", chunk_words=4, overlap_words=4))


def test_index_persists_and_search_finds_the_right_file(index_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    info = json.loads((index_dir / "index.json").read_text())
    assert info["files"] == 5 and info["dim"] == 384 and info["chunks"] >= 6
    chunks = [json.loads(line) for line in (index_dir / "chunks.jsonl").read_text().splitlines()]
    assert {c["source"] for c in chunks} == set(DOCS)  # hidden files skipped, nested paths kept
    vecs = np.load(index_dir / "embeddings.npy")
    assert vecs.shape == (info["chunks"], 384) and np.allclose(np.linalg.norm(vecs, axis=1), 1, atol=1e-5)

    index = Index.load(index_dir, device="cpu")
    for query, want in (("how long should I bake a loaf of bread?", "baking/sourdough.md"),
                        ("which planet is the biggest?", "solar_system.txt"),
                        ("how do I remove the last element of a list", "python_lists.md"),
                        ("eruption of lava and ash", "volcanoes.txt")):
        hits = index.search(query, k=3)
        assert hits[0].source == want, (query, [(h.source, h.score) for h in hits])
        assert hits[0].score > hits[1].score and len(hits) == 3
    capsys.readouterr()
    assert main(["index", "search", str(index_dir), "who wins a football match?", "-k", "2", "--device", "cpu"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[2].startswith("football.md:1") and float(out[0].split()[1]) > 0.3
    assert sum(line[:2] in ("1.", "2.") for line in out) == 2


def test_ask_cites_the_source(index_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    chat = make_tiny_llama_dir(tmp_path / "chat", context=512)
    capsys.readouterr()
    assert main(["ask", str(index_dir), "Which planet is the largest?", "--model", str(chat), "-k", "2",
                 "--max-tokens", "8", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    sources = out.split("Sources:\n", 1)[1].splitlines()
    assert sources[0] == "[1] solar_system.txt"
    # The model's prompt numbers the passages and names their files.
    index = Index.load(index_dir, device="cpu")
    lm = lmforge.load(chat, device="cpu")
    result = answer(lm, index, "Which planet is the largest?", k=2, params=SamplingParams(temperature=0, max_tokens=8))
    assert result.hits[0].source == "solar_system.txt" and result.sources[0] == "solar_system.txt"


@pytest.mark.slow
def test_ask_with_smollm2(index_dir: Path, smollm2_path: Path) -> None:
    index = Index.load(index_dir, device="cpu")
    result = answer(lmforge.load(smollm2_path, device="cpu"), index, "Which planet is the largest?", k=2)
    assert "jupiter" in result.text.lower(), result.text
    assert result.sources[0] == "solar_system.txt"


def _error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    capsys.readouterr()
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("lmforge: error:") and len(err.splitlines()) == 1, err
    return err


def test_errors(index_dir: Path, minilm_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "blank.txt").write_text("  \n\n", encoding="utf-8")
    err = _error(capsys, ["index", "build", str(tmp_path / "empty"), "--out", str(tmp_path / "i"),
                          "--embed-model", str(minilm_path)])
    assert "no documents" in err and not (tmp_path / "i").exists()
    err = _error(capsys, ["index", "build", str(tmp_path / "missing"), "--out", str(tmp_path / "i")])
    assert "missing" in err
    # An index searched with a different embedding model is refused, by dimension or by its vectors.
    bert_a = make_tiny_bert_dir(tmp_path / "a", ["sourdough", "bread"], seed=1)
    bert_b = make_tiny_bert_dir(tmp_path / "b", ["sourdough", "bread"], seed=2)
    err = _error(capsys, ["index", "search", str(index_dir), "bread", "--embed-model", str(bert_a), "--device", "cpu"])
    assert "was built with embedding model" in err and "384-dim" in err
    small = tmp_path / "small"
    (tmp_path / "docs2").mkdir()
    (tmp_path / "docs2" / "d.txt").write_text("sourdough bread", encoding="utf-8")
    build_index(tmp_path / "docs2", small, embed_model=str(bert_a), device="cpu")
    assert Index.load(small, device="cpu").search("bread", k=5)[0].source == "d.txt"
    err = _error(capsys, ["ask", str(small), "bread?", "--embed-model", str(bert_b), "--device", "cpu"])
    assert "embeds differently" in err
    assert "not an index" in _error(capsys, ["index", "search", str(tmp_path), "bread"])
    err = _error(capsys, ["ask", str(small), "bread?", "--model", str(bert_a), "--device", "cpu"])
    assert "chat (decoder) model" in err
