"""Reasoning strategies: the majority vote, answer extraction through a strategy, self-refine's stopping rule,
every generation of a stage batched through one engine run, tools inside a chain, the CLI and eval plumbing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny import ScriptedModel, make_tiny_llama_dir

import lmforge
from lmforge.cli import main
from lmforge.errors import LMForgeError
from lmforge.eval import extract_answer
from lmforge.eval.strategies import (
    COT_PROMPT,
    Strategy,
    majority_vote,
    parse_critique,
    self_refine,
    solve,
)
from lmforge.tools import get_tool, to_openai
from lmforge.tools.inline import result_text

pytestmark = pytest.mark.usefixtures("one_thread")

Q = "Natalia sold 48 clips in April and half as many in May. How many in May?"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama_dir(tmp_path_factory.mktemp("reason") / "m", context=2048)


class TwoWayModel(ScriptedModel):
    """A scripted model that, at output position ``fork``, puts equal mass on two tokens, so sampled chains
    split between two answers (greedy takes the lower id)."""

    def __init__(self, script: list[int], prompt_len: int, vocab_size: int, fork: int, other: int) -> None:
        super().__init__(script, prompt_len, vocab_size, context=2048)
        self.fork, self.other = fork, other

    def _row(self, pos: int) -> torch.Tensor:
        row = super()._row(pos)
        if pos - self.prompt_len == self.fork:
            row[self.other] = 10.0
        return row


def scripted(model_dir: Path, text: str, question: str = Q, tools: list[str] | None = None,
             fork: tuple[int, int] | None = None) -> lmforge.LM:
    """An LM whose model writes ``text`` (special tokens allowed), then ends its turn, in answer to the
    chain-of-thought prompt of ``question`` (offering ``tools``)."""
    lm = lmforge.load(model_dir)
    tok = lm.tokenizer
    offered = [to_openai(get_tool(t)) for t in tools] if tools else None
    prompt = lm.chat_prompt([{"role": "user", "content": COT_PROMPT.format(question=question)}], offered)
    script = tok.encode(text, add_special_tokens=False) + [tok.token_to_id("<|im_end|>")]
    if fork is None:
        lm.model = ScriptedModel(script, len(prompt), lm.config.vocab_size, context=2048)
    else:
        lm.model = TwoWayModel(script, len(prompt), lm.config.vocab_size, *fork)
    lm.configure_engine(32)
    return lm


def spy(lm: lmforge.LM) -> list[tuple[str, int]]:
    """Record the engine's adds, and after each step how many sequences were decoding together."""
    events: list[tuple[str, int]] = []
    engine = lm.engine
    add, step = engine.add, engine.step

    def spy_add(*a, **k):
        events.append(("add", 0))
        return add(*a, **k)

    def spy_step():
        out = step()
        events.append(("step", len(engine.running) + sum(s.done for s, _ in out)))
        return out

    engine.add, engine.step = spy_add, spy_step
    return events


def runs(events: list[tuple[str, int]]) -> list[int]:
    """Sequences added per engine run (a run: adds, then steps until the next add)."""
    out: list[int] = []
    for i, (kind, _) in enumerate(events):
        if kind == "add":
            if i == 0 or events[i - 1][0] == "step":
                out.append(0)
            out[-1] += 1
    return out


# -- the vote and the critique ----------------------------------------------------------------------------
def test_majority_vote_counts_answers_ignores_unreadable_chains_and_breaks_ties_by_first_seen():
    assert majority_vote(["4", None, "7", "7", None, None]) == ("7", {"4": 1, "7": 2})
    assert majority_vote(["3", "4", "4", "3"]) == ("3", {"3": 2, "4": 2})
    assert majority_vote(["4", "3", "3", "4"]) == ("4", {"4": 2, "3": 2})
    assert majority_vote([None, None]) == (None, {})


def test_a_model_critique_saying_no_issues_is_none():
    assert parse_critique("No issues.") is None and parse_critique("  NO ISSUES") is None
    assert parse_critique("   ") is None
    assert parse_critique("48 / 2 is 24, not 22.\n") == "48 / 2 is 24, not 22."


def test_bad_settings_are_refused_by_name():
    for kw, word in [({"name": "tree"}, "unknown strategy"), ({"name": "self-consistency", "n": 0}, "n >= 1"),
                     ({"name": "self-refine", "max_rounds": -1}, "max_rounds"),
                     ({"extract": "digits"}, "extraction"), ({"temperature": -1.0}, "temperature")]:
        with pytest.raises(LMForgeError, match=word):
            Strategy(**kw)


# -- strategies on a scripted model -----------------------------------------------------------------------
def test_cot_reads_the_answer_after_the_marker(model_dir):
    lm = scripted(model_dir, "In May she sold 48 / 2 = 24 clips, 72 in all.\n#### 24")
    sol = solve(lm, Q, "cot")
    assert sol.answer == "24" and sol.text.endswith("#### 24") and sol.chains == [sol.text]
    assert solve(lm, Q, "cot", extract="regex:sold (\\d+) /").answer == "48"


def test_self_consistency_samples_distinct_chains_together_and_takes_the_majority(model_dir):
    text = "Half of 48 is 24.\n#### 24"
    tok = lmforge.load(model_dir).tokenizer
    ids = tok.encode(text, add_special_tokens=False)
    at = max(i for i in range(len(ids)) if tok.decode(ids[i:]).strip() == "24")  # where the answer starts
    other = tok.encode(tok.decode(ids[at:at + 1]).replace("2", "7"), add_special_tokens=False)
    assert len(other) == 1
    alternative = extract_answer(tok.decode(ids[:at] + other + ids[at + 1:]))
    assert alternative not in (None, "24")
    lm = scripted(model_dir, text, fork=(at, other[0]))
    events = spy(lm)
    sol = solve(lm, Q, "self-consistency", n=9, temperature=1.0, seed=3)
    assert runs(events) == [9] and max(n for kind, n in events if kind == "step") == 9  # one run, decoded together
    assert len(sol.chains) == 9 and set(sol.answers) == {"24", alternative}
    winner = max(sol.votes, key=lambda a: sol.votes[a])
    assert sol.votes == {a: sol.answers.count(a) for a in sol.votes} and sum(sol.votes.values()) == 9
    assert sol.answer == winner and sol.text == sol.chains[sol.answers.index(winner)]
    # The same seed gives the same chains; the chains' seeds differ from each other.
    assert solve(lm, Q, "self-consistency", n=9, temperature=1.0, seed=3).answers == sol.answers


def test_tools_run_inside_a_chain(model_dir):
    def call(expr: str) -> str:
        return f'<tool_call>\n{{"name": "calculator", "arguments": {{"expression": "{expr}"}}}}\n</tool_call>'

    probe = lmforge.load(model_dir)
    offered = [to_openai(get_tool("calculator"))]
    wrong = result_text(probe.tokenizer, offered, "calculator", {"expression": "48/2"}, "99")
    lm = scripted(model_dir, "48/2 = " + call("48/2") + wrong + "So 24.\n#### 24", tools=["calculator"])
    sol = solve(lm, Q, "cot", tools=["calculator"])
    # The calculator's result (24), not what the script had where it goes (99), is in the chain.
    assert "<tool_response>\n24\n" in sol.text and "99" not in sol.text and sol.answer == "24"
    with pytest.raises(LMForgeError, match="unknown tool"):
        solve(lm, Q, "cot", tools=["abacus"])


# -- self-refine ------------------------------------------------------------------------------------------
def test_self_refine_stops_when_the_critic_finds_nothing_and_after_max_rounds(model_dir):
    lm = lmforge.load(model_dir)
    lm.configure_engine(8)
    calls: list[tuple[str, str]] = []

    def critic(question: str, draft: str) -> str | None:
        calls.append((question, draft))
        return None if question == "q-ok" else "The test failed: expected 24."

    events = spy(lm)
    ok, bad = self_refine(lm, ["q-ok", "q-bad"], critic=critic, max_rounds=3, strategy=Strategy(max_tokens=8))
    assert ok.critiques == [None] and len(ok.chains) == 1
    assert bad.critiques == ["The test failed: expected 24."] * 3 and len(bad.chains) == 4
    # The critic always sees the latest draft; drafts of a round are generated together.
    assert [c for c in calls if c[0] == "q-bad"] == [("q-bad", d) for d in bad.chains[:3]]
    assert runs(events) == [2, 1, 1, 1]
    assert bad.text == bad.chains[-1]
    calls.clear()
    (sol,) = self_refine(lm, ["q-bad"], critic=critic, max_rounds=0, drafts=["#### 5"])
    assert calls == [] and sol.chains == ["#### 5"] and sol.answer == "5"


def test_self_refine_with_the_model_as_critic_batches_each_stage(model_dir):
    lm = lmforge.load(model_dir)
    lm.configure_engine(8)
    events = spy(lm)
    sols = solve(lm, ["a", "b", "c"], "self-refine", max_rounds=2, max_tokens=6)
    # A random model never says it has no issues: 2 rounds of (critique, revision) for all three at once.
    assert runs(events) == [3, 3, 3, 3, 3]
    assert all(len(s.chains) == 3 and len(s.critiques) == 2 and None not in s.critiques for s in sols)
    with pytest.raises(LMForgeError, match="critic"):
        solve(lm, "a", "cot", critic=lambda q, d: None)


# -- the command line -------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv,message", [
    (["--strategy", "self-consistency", "--n", "0"], "n >= 1"),
    (["--strategy", "cot", "--n", "3"], "--n applies to self-consistency"),
    (["--strategy", "direct", "--max-rounds", "2"], "--max-rounds applies to self-refine"),
    (["--tools", "calculator,abacus"], "unknown tool 'abacus'"),
    (["--extract", "digits"], "unknown answer extraction"),
    (["--temperature", "9"], "temperature"),
])
def test_solve_refuses_bad_input_in_one_line(model_dir, capsys, argv, message):
    assert main(["solve", str(model_dir), Q, *argv]) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_solve_rejects_an_unknown_strategy(model_dir, capsys):
    with pytest.raises(SystemExit) as e:
        main(["solve", str(model_dir), Q, "--strategy", "tree-of-thought"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "invalid choice: 'tree-of-thought'" in err and err.count("\n") == 1


def test_solve_prints_the_answer_and_the_chains(model_dir, capsys):
    argv = ["solve", str(model_dir), "What is 2 + 3?", "--strategy", "self-consistency", "--n", "3",
            "--max-tokens", "12", "--seed", "1", "--extract", "text"]
    assert main(argv) == 0
    plain = capsys.readouterr().out
    assert main([*argv, "--chains"]) == 0
    out = capsys.readouterr().out
    assert out.count("--- chain ") == 3 and "--- votes: " in out
    assert out.endswith(plain) and plain.strip()  # the answer is still the last thing printed


def gsm8k_file(tmp: Path) -> Path:
    p = tmp / "gsm.jsonl"
    rows = [{"question": f"What is {a} + {b}?", "answer": f"{a} plus {b}.\n#### {a + b}"} for a, b in [(2, 3), (4, 4)]]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def test_eval_with_a_strategy_records_chains_and_refuses_other_task_kinds(model_dir, tmp_path, capsys):
    data = gsm8k_file(tmp_path)
    out = tmp_path / "run"
    assert main(["eval", str(model_dir), "--tasks", "gsm8k", "--data", str(data), "--strategy", "self-consistency",
                 "--n", "2", "--max-tokens", "6", "--quiet", "--out", str(out)]) == 0
    doc = json.loads((out / "results.json").read_text())
    assert doc["strategy"]["name"] == "self-consistency" and doc["strategy"]["n"] == 2
    (row,) = doc["results"]
    assert row["n"] == 2 and row["shots"] == 0 and row["strategy"] == "self-consistency"
    assert "| gsm8k (self-consistency) | exact_match |" in (out / "report.md").read_text()
    samples = [json.loads(line) for line in (out / "samples_gsm8k.jsonl").read_text().splitlines()]
    assert [len(s["chains"]) for s in samples] == [2, 2] and all("votes" in s for s in samples)
    assert [s["reference"].split("#### ")[1] for s in samples] == ["5", "8"]
    capsys.readouterr()
    for argv, message in [(["--tasks", "hellaswag", "--strategy", "cot"], "generative tasks; hellaswag is a "
                                                                           "multiple-choice task"),
                          (["--tasks", "gsm8k", "--strategy", "cot", "--shots", "2"], "0-shot"),
                          (["--tasks", "gsm8k", "--max-rounds", "2"], "--max-rounds needs --strategy"),
                          (["--tasks", "gsm8k", "--strategy", "cot", "--tools", "calculator", "--tool-execution",
                            "off"], "cannot be combined with --strategy")]:
        assert main(["eval", str(model_dir), *argv, "--data", str(data)]) == 1
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1


def test_a_question_that_does_not_fit_fails_by_name_and_leaves_the_engine_empty(model_dir):
    lm = lmforge.load(model_dir)
    with pytest.raises(LMForgeError, match="context window"):
        solve(lm, ["What is 2 + 3?", "word " * 3000], "self-consistency", n=2)
    assert not lm.engine.has_work


def test_eval_with_a_strategy_and_tools_offers_them(model_dir, tmp_path, monkeypatch):
    offered = []
    chat_prompt = lmforge.LM.chat_prompt

    def spy_prompt(self, messages, tools=None):
        offered.append([t["function"]["name"] for t in tools or []])
        return chat_prompt(self, messages, tools)

    monkeypatch.setattr(lmforge.LM, "chat_prompt", spy_prompt)
    out = tmp_path / "run"
    assert main(["eval", str(model_dir), "--tasks", "gsm8k", "--data", str(gsm8k_file(tmp_path)), "--strategy", "cot",
                 "--tools", "calculator", "--max-tokens", "6", "--quiet", "--out", str(out)]) == 0
    doc = json.loads((out / "results.json").read_text())
    assert doc["options"]["tools"] == ["calculator"] and doc["strategy"]["name"] == "cot"
    assert offered == [["calculator"], ["calculator"]]
