"""Text-to-text evaluation: BLEU / chrF / ROUGE against sacrebleu and rouge-score called directly, the
translation specs on the shared data, `lmforge eval` end to end with a decoder and with a T5 model,
summarization on a small set written here, and one-line errors for bad data."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import sacrebleu
import torch
from rouge_score import rouge_scorer
from tiny import make_t5_dir, make_tiny_llama_dir, train_t5_unigram

from lmforge.cli import main
from lmforge.errors import LMForgeError
from lmforge.eval import get_task, load_items, load_run, load_spec
from lmforge.eval.report import report_card
from lmforge.eval.seq2seq import cut_at_stop, overlap_scores, prompts

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
MULTI30K = DATA / "multi30k"
TATOEBA = DATA / "tatoeba-fra-eng" / "fra.txt"
REL = 1e-9  # the same library computing the same figure: equal up to float rounding

HYPS = ["A man is riding a bicycle down the street.", "Two dogs play in the snow", "The children were singing",
        "a woman cooks dinner in her kitchen", ""]
REFS = ["A man rides a bike down the street.", "Two dogs are playing in the snow.", "Children sing a song.",
        "A woman is cooking dinner in a kitchen.", "Nothing was said."]

# A small summarization set: short documents with one-sentence reference summaries.
DOCS = [
    {"document": "The city council voted on Tuesday to build a new public library in the town centre. The "
                 "library will open in two years and will hold more than fifty thousand books.",
     "summary": "The council approved a new library in the town centre."},
    {"document": "Heavy rain flooded several roads in the north of the county overnight. Police closed two "
                 "bridges and asked drivers to avoid the area until the water goes down.",
     "summary": "Floods closed roads and bridges in the north of the county."},
    {"document": "A local baker won the national bread competition with a sourdough loaf made from an old "
                 "family recipe. She said she would use the prize money to open a second shop.",
     "summary": "A local baker won the national bread prize with her sourdough."},
    {"document": "Scientists have found a new species of frog in the rainforest. The small green frog was "
                 "discovered by a team studying insects near a river.",
     "summary": "A new frog species was found in the rainforest."},
]


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory: pytest.TempPathFactory):
    from lmforge import load

    torch.set_num_threads(1)
    return load(make_tiny_llama_dir(tmp_path_factory.mktemp("tiny"), context=256), device="cpu")


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _rouge_direct(hyps: list[str], refs: list[str]) -> dict[str, float]:
    sc = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    got = [sc.score(r, h) for h, r in zip(hyps, refs)]
    return {m: sum(g[m].fmeasure for g in got) / len(got) for m in ("rouge1", "rouge2", "rougeL")}


# -- metrics ------------------------------------------------------------------------------------------
def test_metrics_equal_sacrebleu_and_rouge_score_called_directly() -> None:
    values, per_item, sigs = overlap_scores(HYPS, REFS, ["bleu", "chrf", "rouge1", "rouge2", "rougeL"])
    assert math.isclose(values["bleu"], sacrebleu.corpus_bleu(HYPS, [REFS]).score, rel_tol=REL)
    assert math.isclose(values["chrf"], sacrebleu.corpus_chrf(HYPS, [REFS]).score, rel_tol=REL)
    for m, v in _rouge_direct(HYPS, REFS).items():
        assert math.isclose(values[m], v, rel_tol=REL), m
    assert 0 < values["bleu"] < 100 and 0 < values["rouge1"] < 1
    assert len(per_item["rouge1"]) == len(HYPS) and per_item["rouge1"][-1] == 0.0  # the empty output
    assert set(sigs) == {"bleu", "chrf"}
    assert "nrefs:1" in sigs["bleu"] and "tok:13a" in sigs["bleu"] and f"version:{sacrebleu.__version__}" in sigs["bleu"]
    assert sigs["chrf"].startswith("nrefs:1") and "nc:6" in sigs["chrf"]


def test_identical_outputs_score_100_and_disjoint_ones_0() -> None:
    values, _, _ = overlap_scores(REFS, REFS, ["bleu", "chrf", "rouge1", "rouge2", "rougeL"])
    assert values["bleu"] == pytest.approx(100.0, rel=1e-12)
    assert values["chrf"] == pytest.approx(100.0, rel=1e-12)
    assert all(values[m] == pytest.approx(1.0, rel=1e-12) for m in ("rouge1", "rouge2", "rougeL"))
    values, _, _ = overlap_scores(["xyz qqq"] * 2, ["A cat sat.", "Dogs run."], ["bleu", "rouge1"])
    assert values["bleu"] == 0.0 and values["rouge1"] == 0.0


# -- specs ----------------------------------------------------------------------------------------------
def test_translation_specs_read_the_shared_data() -> None:
    de, _ = load_items(get_task("multi30k_en_de"), MULTI30K)
    fr, _ = load_items(get_task("multi30k_en_fr"), MULTI30K)
    assert len(de) == len(fr) == 1014
    assert de[0].source == fr[0].source == "A group of men are loading cotton onto a truck"
    assert de[0].gold == "Eine Gruppe von Männern lädt Baumwolle auf einen Lastwagen"
    assert fr[0].gold == "Un groupe d'hommes chargent du coton dans un camion"
    assert de[0].contexts[0] == "English: A group of men are loading cotton onto a truck\nGerman:"
    spec = get_task("tatoeba_fr_en")
    tat, _ = load_items(spec, TATOEBA)
    lines = TATOEBA.read_text(encoding="utf-8").split("\n")
    complete = lines[:-1]  # the file's last line has no newline: cut short mid-sentence
    assert len(tat) == -(-len(complete) // 76) == 1001
    for k in (0, 1, 500, 1000):
        en, fr_text = complete[76 * k].split("\t")[:2]
        assert (tat[k].source, tat[k].gold) == (fr_text, en)
    assert spec.prefix == "translate French to English: " and (spec.source_lang, spec.target_lang) == ("fr", "en")


def test_parallel_files_must_align_and_fields_must_exist(tmp_path: Path) -> None:
    (tmp_path / "val.en.gz").write_bytes(__import__("gzip").compress(b"one\ntwo\n"))
    (tmp_path / "val.de.gz").write_bytes(__import__("gzip").compress(b"eins\n"))
    with pytest.raises(LMForgeError, match="differ in line count"):
        load_items(get_task("multi30k_en_de"), tmp_path)
    with pytest.raises(LMForgeError, match="no such data directory"):
        load_items(get_task("multi30k_en_de"), tmp_path / "nope")
    bad = _jsonl(tmp_path / "s.jsonl", [{"article": "a text", "highlights": "a summary"}])
    with pytest.raises(LMForgeError, match="record 0 has no field 'document'"):
        load_items(get_task("summarization"), bad)
    spec = tmp_path / "own.toml"
    spec.write_text('name = "own"\nkind = "seq2seq"\nsource_field = "text"\nmetrics = ["bleu", "meteor"]\n')
    with pytest.raises(LMForgeError, match="needs `source_field` and `target_field`"):
        load_spec(spec)
    spec.write_text('name = "own"\nkind = "seq2seq"\nsource_field = "a"\ntarget_field = "b"\nmetrics = ["meteor"]\n')
    with pytest.raises(LMForgeError, match="unknown metric"):
        load_spec(spec)


# -- end to end ---------------------------------------------------------------------------------------------
def _check_against_samples(run: Path, task: str, metrics: list[str], n: int) -> dict:
    doc = load_run(run)
    rows = {r["metric"]: r for r in doc["results"] if r["task"] == task}
    assert sorted(rows) == sorted(metrics) and all(r["n"] == n for r in rows.values())
    samples = doc["samples"][task]
    hyps, refs = [s["prediction"] for s in samples], [s["reference"] for s in samples]
    assert len(samples) == n
    if "bleu" in rows:
        assert math.isclose(rows["bleu"]["value"], sacrebleu.corpus_bleu(hyps, [refs]).score, rel_tol=REL,
                            abs_tol=1e-12)
        assert math.isclose(rows["chrf"]["value"], sacrebleu.corpus_chrf(hyps, [refs]).score, rel_tol=REL,
                            abs_tol=1e-12)
        assert rows["bleu"]["signature"].startswith("nrefs:1|") and 0 <= rows["bleu"]["value"] <= 100
    if "rouge1" in rows:
        for m, v in _rouge_direct(hyps, refs).items():
            assert math.isclose(rows[m]["value"], v, rel_tol=REL, abs_tol=1e-12), m
    return doc


def test_cli_eval_translation_with_a_decoder_model(tiny_lm, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    capsys.readouterr()
    assert main(["eval", str(tiny_lm.path), "--tasks", "multi30k_en_de", "--data", str(MULTI30K), "--limit", "3",
                 "--shots", "1", "--batch-size", "3", "--quiet", "--out", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    doc = _check_against_samples(tmp_path / "run", "multi30k_en_de", ["bleu", "chrf"], 3)
    assert "signature multi30k_en_de bleu: nrefs:1|" in out and out == report_card(doc)
    assert {r["shots"] for r in doc["results"]} == {1}
    refs = [s["reference"] for s in doc["samples"]["multi30k_en_de"]]
    assert refs[0] == "Eine Gruppe von Männern lädt Baumwolle auf einen Lastwagen"


def test_summarization_pipeline_on_a_small_set(tiny_lm, tmp_path: Path) -> None:
    data = _jsonl(tmp_path / "docs.jsonl", DOCS)
    assert main(["eval", str(tiny_lm.path), "--tasks", "summarization", "--data", str(data), "--quiet",
                 "--out", str(tmp_path / "run")]) == 0
    doc = _check_against_samples(tmp_path / "run", "summarization", ["rouge1", "rouge2", "rougeL"], len(DOCS))
    assert [s["reference"] for s in doc["samples"]["summarization"]] == [d["summary"] for d in DOCS]
    # Other field names (CNN/DailyMail's) through the spec that names them; its max_tokens (128) leaves the
    # tiny model's 256-token context 128 for the article, so the articles are the documents' first sentences.
    cnn = _jsonl(tmp_path / "cnn.jsonl", [{"article": d["document"].split(". ")[0] + ".", "highlights": d["summary"]}
                                          for d in DOCS])
    assert main(["eval", str(tiny_lm.path), "--tasks", "cnn_dailymail", "--data", str(cnn), "--quiet",
                 "--out", str(tmp_path / "cnn")]) == 0
    _check_against_samples(tmp_path / "cnn", "cnn_dailymail", ["rouge1", "rouge2", "rougeL"], len(DOCS))


def test_bad_data_path_and_missing_field_are_one_line_errors(tiny_lm, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture) -> None:
    model = str(tiny_lm.path)
    capsys.readouterr()
    assert main(["eval", model, "--tasks", "multi30k_en_de", "--data", str(tmp_path / "nope")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no such data directory" in err[0], err
    bad = _jsonl(tmp_path / "bad.jsonl", [{"article": "some text", "summary": "text"}])
    assert main(["eval", model, "--tasks", "summarization", "--data", str(bad), "--quiet"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has no field 'document'" in err[0], err
    # A source the context cannot hold beside the output is refused, not cut.
    long = _jsonl(tmp_path / "long.jsonl", [{"article": " ".join(d["document"] for d in DOCS), "highlights": "x"}])
    assert main(["eval", model, "--tasks", "cnn_dailymail", "--data", str(long), "--quiet"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "item 0's prompt is" in err[0] and "leaves 128" in err[0], err


def test_encoder_decoder_reads_the_prefix_and_source(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from lmforge import load

    tok = train_t5_unigram()  # T5's tokenizer shape: `</s>` ends every encoded source
    path = make_t5_dir(tmp_path / "t5", "v1.0", vocab=tok.get_vocab_size())
    tok.save(str(path / "tokenizer.json"))
    lm = load(path, device="cpu")
    spec = get_task("multi30k_en_de")
    items, _ = load_items(spec, MULTI30K)
    ids = prompts(lm, spec, items[:2], items, True, 3, False, 0, None)
    assert ids == [lm.tokenizer.encode("translate English to German: " + it.source) for it in items[:2]]
    assert all(x[-1] == tok.token_to_id("</s>") for x in ids)
    capsys.readouterr()
    assert main(["eval", str(path), "--tasks", "multi30k_en_de", "--data", str(MULTI30K), "--limit", "3",
                 "--quiet", "--out", str(tmp_path / "run"), "--device", "cpu"]) == 0
    doc = _check_against_samples(tmp_path / "run", "multi30k_en_de", ["bleu", "chrf"], 3)
    assert {r["shots"] for r in doc["results"]} == {0}  # the spec's few-shot default is for decoders
    # The same outputs as the model's own greedy generation from prefix + source.
    want = lm.generate(["translate English to German: " + it.source for it in items[:3]], temperature=0.0,
                       max_tokens=spec.max_tokens, stop=spec.stop)
    assert [x["prediction"] for x in doc["samples"]["multi30k_en_de"]] == [w.strip() for w in want]
    assert any(w.strip() for w in want)
    capsys.readouterr()
    assert main(["eval", str(path), "--tasks", "multi30k_en_de", "--data", str(MULTI30K), "--shots", "2",
                 "--quiet", "--device", "cpu"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "without exemplars" in err[0], err
    # --num-beams: the same outputs as the model's own beam search, cut at the spec's stop strings; refused
    # by name for a decoder model or a task that is not seq2seq.
    capsys.readouterr()
    assert main(["eval", str(path), "--tasks", "multi30k_en_de", "--data", str(MULTI30K), "--limit", "5",
                 "--batch-size", "2", "--num-beams", "3", "--quiet", "--out", str(tmp_path / "beams"),
                 "--device", "cpu"]) == 0
    doc = _check_against_samples(tmp_path / "beams", "multi30k_en_de", ["bleu", "chrf"], 5)
    assert doc["options"]["num_beams"] == 3
    want = lm.generate(["translate English to German: " + it.source for it in items[:5]], temperature=0.0,
                       max_tokens=spec.max_tokens, num_beams=3)
    assert [x["prediction"] for x in doc["samples"]["multi30k_en_de"]] == [cut_at_stop(w, spec.stop).strip()
                                                                          for w in want]
    capsys.readouterr()
    for argv, msg in ((["--tasks", "hellaswag"], "--num-beams applies to seq2seq tasks; hellaswag is a multiple"),
                      (["--tasks", "multi30k_en_de", "--num-beams", "0"], "--num-beams must be positive")):
        assert main(["eval", str(path), "--num-beams", "2", *argv, "--data", str(MULTI30K), "--quiet"]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and msg in err[0], err


def test_beam_search_is_refused_for_a_decoder_model(tiny_lm, capsys: pytest.CaptureFixture) -> None:
    capsys.readouterr()
    assert main(["eval", str(tiny_lm.path), "--tasks", "multi30k_en_de", "--data", str(MULTI30K), "--limit", "2",
                 "--num-beams", "2", "--quiet"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--num-beams searches an encoder-decoder's outputs; llama is a decoder" in err[0], err


def test_cut_at_stop() -> None:
    assert cut_at_stop("Ein Hund.\nA dog.", ["\n"]) == "Ein Hund."
    assert cut_at_stop("a|b;c", [";", "|"]) == "a"
    assert cut_at_stop("nothing to cut", ["\n", ""]) == "nothing to cut"
