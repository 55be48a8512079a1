"""Evaluation: scoring arithmetic, acc_norm, few-shot sampling, declarative specs, answer extraction,
perplexity, the CLI and run comparison."""

from __future__ import annotations

import bz2
import json
import math
import os
from pathlib import Path

import pytest
import torch
from numerics import assert_close_scaled
from tiny import make_tiny_llama_dir

from lmforge.errors import LMForgeError
from lmforge.eval import (
    TaskSpec,
    compare,
    extract_answer,
    get_task,
    load_items,
    load_run,
    load_spec,
    mc_metrics,
    perplexity,
    sample_fewshot,
    score_groups,
)
from lmforge.eval.generate import is_correct
from lmforge.eval.runner import EvalOptions, encode_pair, run_task
from lmforge.eval.tasks import Item
from lmforge.model import ModelConfig, Transformer


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory: pytest.TempPathFactory):
    from lmforge import load

    torch.set_num_threads(1)
    return load(make_tiny_llama_dir(tmp_path_factory.mktemp("tiny"), context=128), device="cpu")


def _full_logprob(model: Transformer, ctx: list[int], cont: list[int]) -> float:
    with torch.inference_mode():
        lp = model(torch.tensor([ctx + cont])).float().log_softmax(-1)[0]
    return sum(float(lp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont))


# -- scoring arithmetic ----------------------------------------------------------------------------------
def test_scoring_uniform_model_gives_known_logprobs() -> None:
    # All-zero weights: every hidden state and logit is 0, so each token has log-prob -log(V) exactly.
    cfg = ModelConfig(vocab_size=50, dim=16, n_layers=1, n_heads=2, ffn_dim=32, context_length=32)
    model = Transformer(cfg).eval()
    for p in model.parameters():
        torch.nn.init.zeros_(p)
    groups = [[([1, 2, 3], [4]), ([1, 2, 3], [5, 6, 7])], [([9], [1, 2])]]
    got = score_groups(model, groups, batch_size=2)
    want = [-1 * math.log(50), -3 * math.log(50), -2 * math.log(50)]
    assert [s.logprob for g in got for s in g] == pytest.approx(want, rel=1e-6)
    assert [[s.tokens for s in g] for g in got] == [[1, 3], [2]]


def test_shared_prefix_scoring_equals_full_forward(tiny_lm) -> None:
    m = tiny_lm.model
    # Shared contexts (HellaSwag-like), different contexts with a shared continuation (Winogrande-like),
    # a context too long for the window (left-truncated), and singleton groups, all in uneven batches.
    groups = [
        [([5, 6, 7, 8, 9], [10, 11]), ([5, 6, 7, 8, 9], [12]), ([5, 6, 7, 8, 9], [13, 14, 15, 16])],
        [([20, 21, 22], [30, 31]), ([20, 21, 23], [30, 31])],
        [([40], [41, 42, 43])],
        [([7] * 10, [8, 9]), ([7] * 10, [10])],
    ]
    got = score_groups(m, groups, batch_size=3, token_budget=8)
    for g, scores in zip(groups, got):
        for (c, x), s in zip(g, scores):
            assert_close_scaled(s.logprob, _full_logprob(m, c, x), 1e-4)
    trunc = score_groups(m, [[(list(range(1, 200)), [5, 6])]], max_len=20)[0][0]
    assert_close_scaled(trunc.logprob, _full_logprob(m, list(range(1, 200))[-18:], [5, 6]), 1e-4)


def test_acc_and_acc_norm_as_defined() -> None:
    # Item 1: raw log-likelihood prefers "no" (-4 > -6); per character "a long answer" wins (-6/13 > -4/2).
    # Item 2: both metrics pick choice 1.
    lls = [[-4.0, -6.0], [-9.0, -1.0]]
    texts = [["no", "a long answer"], ["x", "y"]]
    per = mc_metrics(lls, [1, 1], texts)
    assert per == {"acc": [0, 1], "acc_norm": [1, 1]}


def test_encode_pair_moves_trailing_space(tiny_lm) -> None:
    tok = tiny_lm.tokenizer
    c1, x1 = encode_pair(tok, "The cat sat ", "on the mat")
    c2, x2 = encode_pair(tok, "The cat sat", " on the mat")
    assert (c1, x1) == (c2, x2)
    assert tok.decode(c1 + x1) == "The cat sat on the mat"


# -- few-shot ----------------------------------------------------------------------------------------------
def _items(n: int) -> list[Item]:
    return [Item(i, [f"q{i}"], [f"a{i}"], 0, [f"a{i}"], {}) for i in range(n)]


def test_fewshot_sampling_is_reproducible_and_excludes_the_item() -> None:
    pool = _items(20)
    a = [s.index for s in sample_fewshot(pool, 5, 3, seed=7, same_set=True)]
    b = [s.index for s in sample_fewshot(_items(20), 5, 3, seed=7, same_set=True)]
    assert a == b and len(set(a)) == 5 and 3 not in a
    assert all(3 not in [s.index for s in sample_fewshot(pool, 19, 3, seed=s, same_set=True)] for s in range(5))
    assert a != [s.index for s in sample_fewshot(pool, 5, 3, seed=8, same_set=True)]
    assert sample_fewshot(pool, 0, 3, seed=7, same_set=True) == []
    with pytest.raises(LMForgeError, match="only 19"):
        sample_fewshot(pool, 20, 3, seed=7, same_set=True)


# -- declarative specs -----------------------------------------------------------------------------------
def test_csv_spec_loads_without_code(tmp_path: Path) -> None:
    (tmp_path / "quiz.csv").write_text("prompt,A,B,C,answer\nSky is,blue,green,red,A\nGrass is,blue,green,red,B\n")
    (tmp_path / "quiz.toml").write_text(
        'name = "quiz"\nformat = "csv"\ncontext = "Q: {{ prompt }}\\nA:"\nchoices = "[A, B, C]"\n'
        'gold = "{\'A\': 0, \'B\': 1, \'C\': 2}[answer]"\n')
    spec = get_task(str(tmp_path / "quiz.toml"))
    items, _ = load_items(spec, tmp_path / "quiz.csv")
    assert [it.contexts[0] for it in items] == ["Q: Sky is\nA:", "Q: Grass is\nA:"]
    assert items[1].continuations == ["blue", "green", "red"] and [it.gold for it in items] == [0, 1]


def test_piqa_labels_file_and_winogrande_partial_scoring(tmp_path: Path) -> None:
    (tmp_path / "valid.jsonl").write_text(
        json.dumps({"goal": "Open a jar", "sol1": "twist the lid", "sol2": "eat the lid"}) + "\n"
        + json.dumps({"goal": "Dry hair", "sol1": "use water", "sol2": "use a towel"}) + "\n")
    (tmp_path / "valid-labels.lst").write_text("0\n1\n")
    items, _ = load_items(get_task("piqa"), tmp_path / "valid.jsonl")
    assert items[0].contexts[0] == "Question: Open a jar\nAnswer:"
    assert items[1].continuations == ["use water", "use a towel"] and [it.gold for it in items] == [0, 1]

    (tmp_path / "wino.jsonl").write_text(json.dumps(
        {"sentence": "The trophy did not fit in the suitcase because the _ was too big.", "option1": "trophy",
         "option2": "suitcase", "answer": "1"}) + "\n")
    (it,), _ = load_items(get_task("winogrande"), tmp_path / "wino.jsonl")
    assert it.contexts == ["The trophy did not fit in the suitcase because the trophy",
                           "The trophy did not fit in the suitcase because the suitcase"]
    assert it.continuations == ["was too big.", "was too big."] and it.gold == 0


def test_hellaswag_lines_format_and_bad_specs(tmp_path: Path) -> None:
    text = "Cooking: A man cracks an egg. he\n2\nsings.\nflies away.\nfries it in a pan.\nsleeps.\n"
    (tmp_path / "hs.txt.bz2").write_bytes(bz2.compress(text.encode()))
    (it,), _ = load_items(get_task("hellaswag"), tmp_path / "hs.txt.bz2")
    assert it.contexts[0] == "Cooking: A man cracks an egg. he" and it.gold == 2 and len(it.choice_texts) == 4
    with pytest.raises(LMForgeError, match="--data"):
        load_items(TaskSpec(name="nodata", choices="c", data="missing/file.jsonl"))
    with pytest.raises(LMForgeError, match="exactly one of"):
        TaskSpec(name="bad")
    (tmp_path / "bad.toml").write_text('name = "x"\nchoices = "c"\nfield = 1\n')
    with pytest.raises(LMForgeError, match="unknown task key"):
        load_spec(tmp_path / "bad.toml")
    (tmp_path / "g.jsonl").write_text(json.dumps({"context": "c", "c": ["a", "b"], "gold": 5}) + "\n")
    with pytest.raises(LMForgeError, match="record 0: gold 5"):
        load_items(TaskSpec(name="g", choices="c"), tmp_path / "g.jsonl")


# -- answer extraction -------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, want", [
    ("She makes 9 * 2 = $<<9*2=18>>18 every day.\n#### 18", "18"),
    ("#### 1,234", "1234"),
    ("The answer is $1,234.50.", "1234.5"),
    ("So the total is 18.00 dollars.", "18"),
    ("It dropped by -3 degrees, from 5 to 2.", "2"),
    ("#### -7\n\nQuestion: how many", "-7"),
    ("First 3 apples, then 4 more. The answer is 7.", "7"),
    ("#### $42", "42"),
    ("I don't know.", None),
    ("#### the answer is 12", "12"),
    ("Total: .5 hours", "0.5"),
    # Beyond a float's range (a model that loops writing digits): the digits, not a crash
    ("So it is 1" + "0" * 400 + " apples.", "1" + "0" * 400),
    ("#### " + "9" * 320, "9" * 320),
])
def test_gsm8k_answer_extraction(text: str, want: str | None) -> None:
    assert extract_answer(text) == want


def test_exact_match_against_reference() -> None:
    ref = "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\n#### 18"
    assert is_correct(extract_answer("so she earns $18.00"), ref)
    assert not is_correct(extract_answer("so she earns 9"), ref)
    assert not is_correct(None, ref)
    assert extract_answer("Answer: (B)", "regex:\\(([A-D])\\)") == "B"


# -- perplexity ---------------------------------------------------------------------------------------------
def test_perplexity_equals_exp_mean_nll_by_hand(tiny_lm, tmp_path: Path) -> None:
    m, tok = tiny_lm.model, tiny_lm.tokenizer
    text = "The quick brown fox jumps over the lazy dog. The cat sat on the mat."
    ids = tok.encode(text, add_special_tokens=False)
    bos = tok.token_to_id(tok.eos_token)
    seq = [bos] + ids
    with torch.inference_mode():
        lp = m(torch.tensor([seq])).double().log_softmax(-1)[0]
    nll_hand = -sum(float(lp[i, seq[i + 1]]) for i in range(len(seq) - 1))
    nll, n = perplexity(m, ids, prefix_id=bos)
    assert n == len(ids)
    assert math.exp(nll / n) == pytest.approx(math.exp(nll_hand / n), rel=1e-4)
    # A sliding window predicts every token exactly once, each with at most `window` tokens of context.
    w, s = 8, 3
    hand, done = 0.0, 1
    while done < len(seq):
        end = min(len(seq), w if done == 1 else done + s)
        begin = max(0, end - w)
        with torch.inference_mode():
            lpw = m(torch.tensor([seq[begin:end]])).double().log_softmax(-1)[0]
        hand -= sum(float(lpw[i - 1 - begin, seq[i]]) for i in range(done, end))
        done = end
    nll_w, n_w = perplexity(m, ids, window=w, stride=s, prefix_id=bos)
    assert n_w == len(ids) and nll_w == pytest.approx(hand, rel=1e-4)
    # The task path reports the same perplexity, and bits per byte from the same NLL.
    (tmp_path / "t.txt").write_text(text)
    r = run_task(tiny_lm, get_task("perplexity"), tmp_path / "t.txt", EvalOptions())
    vals = {row["metric"]: row["value"] for row in r["rows"]}
    assert vals["perplexity"] == pytest.approx(math.exp(nll_hand / n), rel=1e-4)
    assert vals["bits_per_byte"] == pytest.approx(nll_hand / math.log(2) / len(text.encode()), rel=1e-4)


# -- end to end ---------------------------------------------------------------------------------------------
def test_cli_eval_writes_run_and_compare(tiny_lm, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lmforge.cli import main

    rows = [{"query": f"Question: item {i} is", "choices": ["the cat", "a dog", "hello world"], "gold": i % 3}
            for i in range(6)]
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    gsm = [{"question": f"What is {i} + 1?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"} for i in range(3)]
    (tmp_path / "gsm.jsonl").write_text("".join(json.dumps(r) + "\n" for r in gsm))
    model = str(tiny_lm.path)
    args = ["eval", model, "--tasks", "arc_easy,gsm8k", "--data", f"arc_easy={tmp_path / 'mc.jsonl'}",
            "--data", f"gsm8k={tmp_path / 'gsm.jsonl'}", "--quiet", "--batch-size", "4"]
    assert main(args + ["--out", str(tmp_path / "a"), "--shots", "0"]) == 0
    assert main(args + ["--out", str(tmp_path / "b"), "--shots", "2", "--chat"]) == 0
    a, b = load_run(tmp_path / "a"), load_run(tmp_path / "b")
    assert {(r["task"], r["metric"]) for r in a["results"]} == {
        ("arc_easy", "acc"), ("arc_easy", "acc_norm"), ("gsm8k", "exact_match")}
    assert all(r["n"] == (6 if r["task"] == "arc_easy" else 3) for r in a["results"])
    assert {r["shots"] for r in b["results"]} == {2}
    card = (tmp_path / "a" / "report.md").read_text()
    assert card.startswith("| model | task | metric | value | stderr | n | shots |") and "arc_easy" in card
    samples = [json.loads(x) for x in (tmp_path / "a" / "samples_gsm8k.jsonl").read_text().splitlines()]
    assert all(s["prediction"] == extract_answer(s["completion"]) for s in samples)
    capsys.readouterr()
    assert main(["eval", "compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    assert "| arc_easy | acc_norm |" in out and "significant" in out
    same, _ = compare(a, a)
    assert all(r["delta"] == 0 and not r["significant"] for r in same)
    # Clear one-line errors.
    assert main(["eval", model, "--tasks", "hellaswag", "--data", str(tmp_path / "nope.txt")]) == 1
    assert "no such data file" in capsys.readouterr().err
    assert main(["eval", model, "--tasks", "nosuchtask"]) == 1
    assert "unknown task" in capsys.readouterr().err


def test_interrupted_run_resumes_where_it_stopped(tiny_lm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lmforge.eval import runner

    monkeypatch.setenv("LMFORGE_HOME", str(tmp_path / "home"))
    rows = [{"query": f"Question: item {i} is", "choices": ["the cat", "a dog", "hello world"], "gold": i % 3}
            for i in range(10)]
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec, opt = get_task("arc_easy"), EvalOptions(batch_size=4)
    whole = run_task(tiny_lm, spec, data, EvalOptions(batch_size=4, resume=False))
    assert whole["resumed"] == 0

    calls = []
    save = runner.Progress.append

    def interrupt_after_one_batch(self, scores):
        save(self, scores)
        calls.append(len(scores))
        raise KeyboardInterrupt

    monkeypatch.setattr(runner.Progress, "append", interrupt_after_one_batch)
    with pytest.raises(KeyboardInterrupt):
        run_task(tiny_lm, spec, data, opt)
    monkeypatch.setattr(runner.Progress, "append", save)
    saved = list((tmp_path / "home" / "eval-progress").glob("arc_easy-*.jsonl"))
    assert calls == [4] and len(saved) == 1
    again = run_task(tiny_lm, spec, data, opt)
    assert again["resumed"] == 4
    assert again["rows"] == whole["rows"]
    assert_close_scaled([lp for s in again["samples"] for lp in s["logprobs"]],
                        [lp for s in whole["samples"] for lp in s["logprobs"]], 1e-4)
    assert not saved[0].exists()  # a finished task leaves no progress behind
    # The same base model with a LoRA adapter on top is another model: its progress is kept apart.
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    plain = runner.Progress(tiny_lm, spec, data, opt, 0).path
    monkeypatch.setattr(tiny_lm, "adapter", adapter, raising=False)
    assert runner.Progress(tiny_lm, spec, data, opt, 0).path != plain
    monkeypatch.setattr(tiny_lm, "adapter", None)
    # The data is known by its content: a fresh copy elsewhere (new path, new mtime) continues the same
    # run, and changed content starts another.
    copy = tmp_path / "elsewhere" / "mc.jsonl"
    copy.parent.mkdir()
    copy.write_bytes(data.read_bytes())
    os.utime(copy, (1, 1))
    assert runner.Progress(tiny_lm, spec, copy, opt, 0).path == plain
    copy.write_text(copy.read_text().replace("the cat", "the cow"))
    assert runner.Progress(tiny_lm, spec, copy, opt, 0).path != plain


# Short continuations (16 tokens or fewer a batch) go through the packed products, whose int16 activations
# move logits by up to ~1e-2 (docs/benchmarks.md): a few 1e-3 over a 9-token sum (~-40). Where bf16 is fast
# (quant/cpu.py), longer batches take bf16 products: ~5e-2 over the same sum (measured 0.051).
HELLASWAG_TOL = {"0": 1.25e-4, "1": 2.5e-3}


@pytest.mark.slow
@pytest.mark.parametrize("bf16", ["0", "1"])
def test_smollm2_hellaswag_matches_transformers(smollm2_path: Path, tmp_path: Path, bf16: str,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The scorer's log-likelihoods equal transformers' on the same GGUF (a few items; benchmarks/eval.py
    runs 500), in fp32 and with the bf16 products (forced, so this runs on every CPU)."""
    from transformers import AutoModelForCausalLM

    from lmforge import load

    monkeypatch.setenv("LMFORGE_CPU_BF16", bf16)
    lm = load(smollm2_path, device="cpu")
    text = ("Roof shingle removal: A man is sitting on a roof. he\n3\nis using wrap to wrap a pair of skis.\n"
            "is ripping level tiles off.\nis holding a rubik's cube.\nstarts pulling up roofing on a roof.\n")
    (tmp_path / "hs.txt").write_text(text)
    items, _ = load_items(get_task("hellaswag"), tmp_path / "hs.txt")
    groups = [[encode_pair(lm.tokenizer, c, " " + x) for c, x in zip(it.contexts, it.continuations)] for it in items]
    ours = [s.logprob for s in score_groups(lm.model, groups)[0]]
    hf = AutoModelForCausalLM.from_pretrained(smollm2_path.parent, gguf_file=smollm2_path.name,
                                              dtype=torch.float32).eval()
    theirs = []
    with torch.inference_mode():
        for c, x in groups[0]:
            lp = hf(input_ids=torch.tensor([c + x])).logits.float().log_softmax(-1)[0]
            theirs.append(sum(float(lp[len(c) - 1 + j, t]) for j, t in enumerate(x)))
    assert_close_scaled(ours, theirs, HELLASWAG_TOL[bf16])
    assert torch.tensor(ours).argsort().tolist() == torch.tensor(theirs).argsort().tolist()  # the endings' ranking


def test_compare_paired_and_independent_stderr(tmp_path: Path) -> None:
    from lmforge.eval import write_run

    def run(name: str, correct: list[int]) -> dict:
        n, p = len(correct), sum(correct) / len(correct)
        se = math.sqrt(sum((c - p) ** 2 for c in correct) / (n - 1) / n)
        return {"model": name, "results": [{"task": "t", "metric": "acc", "value": p, "stderr": se, "n": n, "shots": 0}],
                "samples": {"t": [{"index": i, "acc": c} for i, c in enumerate(correct)]}}

    a, b = run("a", [0, 0, 1, 1, 0, 1, 0, 0]), run("b", [1, 0, 1, 1, 1, 1, 0, 1])
    write_run(tmp_path / "a", a)
    write_run(tmp_path / "b", b)
    (row,), text = compare(load_run(tmp_path / "a"), load_run(tmp_path / "b"))
    d = [1, 0, 0, 0, 1, 0, 0, 1]  # per-item differences b - a
    mean = sum(d) / 8
    assert row["test"] == "paired" and row["delta"] == pytest.approx(3 / 8)
    assert row["stderr"] == pytest.approx(math.sqrt(sum((x - mean) ** 2 for x in d) / 7 / 8))
    (tmp_path / "b" / "samples_t.jsonl").unlink()  # without per-item results: independent samples
    (row,), _ = compare(load_run(tmp_path / "a"), load_run(tmp_path / "b"))
    assert row["test"] == "independent"
    assert row["stderr"] == pytest.approx(math.hypot(a["results"][0]["stderr"], b["results"][0]["stderr"]))
