"""Code generation (HumanEval): the pass@k estimator, code extraction, real problems run through the real
sandbox, the task end to end with a scripted model, and self-refine feeding the real test failure back."""

from __future__ import annotations

import gzip
import json
import math
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from tiny import ScriptedModel, make_tiny_llama_dir

from lmforge.errors import LMForgeError
from lmforge.eval import EvalOptions, Strategy, get_task, load_items, run_task
from lmforge.eval.code import (
    CHAT_INSTRUCTION,
    build_program,
    entry_point,
    extract_code,
    pass_at_k,
    pass_ks,
    run_tests,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
HUMANEVAL = DATA / "humaneval" / "HumanEval.jsonl.gz"
needs_data = pytest.mark.skipif(not HUMANEVAL.is_file(), reason=f"needs {HUMANEVAL}")


def _problems() -> dict[str, dict]:
    with gzip.open(HUMANEVAL, "rt", encoding="utf-8") as f:
        return {r["task_id"]: r for r in map(json.loads, f)}


def _tests(p: dict) -> str:
    return f"{p['test']}\ncheck({p['entry_point']})"


# -- pass@k -------------------------------------------------------------------------------------------------
def _exact(n: int, c: int, k: int) -> Fraction:
    return 1 - Fraction(math.comb(n - c, k), math.comb(n, k))


@pytest.mark.parametrize(("n", "c", "k", "want"), [
    (5, 2, 1, 0.4),  # 1 - C(3,1)/C(5,1) = 1 - 3/5
    (10, 3, 5, 1 - 21 / 252),  # 1 - C(7,5)/C(10,5)
    (10, 1, 10, 1.0),  # n == k: one pass among all n is in every k-subset
    (4, 1, 4, 1.0),
    (20, 0, 5, 0.0),  # c == 0
    (20, 20, 5, 1.0),  # c == n
    (1, 1, 1, 1.0),
    (1, 0, 1, 0.0),
    (6, 3, 4, 1.0),  # n - c < k
])
def test_pass_at_k_matches_hand_computed_values(n: int, c: int, k: int, want: float) -> None:
    torch.testing.assert_close(pass_at_k(n, c, k), want, rtol=1e-12, atol=1e-12)


def test_pass_at_k_is_stable_where_the_binomials_are_huge() -> None:
    # C(1000, 500) has ~300 digits: the product form still matches exact rational arithmetic.
    for n, c, k in [(1000, 3, 500), (1000, 997, 2), (200, 10, 100), (200, 1, 1)]:
        torch.testing.assert_close(pass_at_k(n, c, k), float(_exact(n, c, k)), rtol=1e-12, atol=1e-15)


def test_pass_at_k_refuses_impossible_counts() -> None:
    for n, c, k in [(5, 6, 1), (5, 2, 6), (5, -1, 1), (5, 2, 0)]:
        with pytest.raises(LMForgeError, match="pass@k needs"):
            pass_at_k(n, c, k)


def test_pass_ks_keeps_what_n_samples_can_estimate() -> None:
    assert pass_ks(["pass@1", "pass@10", "pass@100"], 1) == [1]
    assert pass_ks(["pass@1", "pass@10", "pass@100"], 20) == [1, 10]
    with pytest.raises(LMForgeError, match="pass@K"):
        pass_ks(["exact_match"], 5)


# -- code in a completion ----------------------------------------------------------------------------------
def test_extract_code_from_fenced_and_unfenced_completions() -> None:
    chat = "Here is the function:\n```python\ndef add(a, b):\n    return a + b\n```\n\nIt adds two numbers."
    assert extract_code(chat, "add") == "def add(a, b):\n    return a + b"
    # Several blocks: the one that defines the function, whatever its order or language tag.
    two = "```\nprint(add(1, 2))\n```\nand\n```py\ndef add(a, b):\n    return a + b\n```"
    assert extract_code(two, "add") == "def add(a, b):\n    return a + b"
    # No block defines it: the first Python (or untagged) block.
    assert extract_code("```text\nx\n```\n```python\ny = 1\n```", "add") == "y = 1"
    # A fence cut off by max_tokens (or a stop string) runs to the end.
    assert extract_code("```python\ndef add(a, b):\n    return a", "add") == "def add(a, b):\n    return a"
    # An indented block that defines the function is dedented.
    assert extract_code("  ```python\n  def add(a, b):\n      return a + b\n  ```", "add") == \
        "def add(a, b):\n    return a + b"
    # A plain completion (a function body) is taken as it is.
    body = "    return a + b\n"
    assert extract_code(body, "add") == body


def test_build_program_replaces_the_stub_or_continues_the_body() -> None:
    prompt = 'from typing import List\n\n\ndef add(a: int, b: int) -> int:\n    """Sum."""\n'
    assert entry_point(prompt) == "add"
    whole = build_program(prompt, "def add(a, b):\n    return a + b", "assert add(1, 2) == 3")
    assert whole.startswith(prompt + "\n") and "def add(a, b):" in whole
    body = build_program(prompt, "    return a + b\n", "assert add(1, 2) == 3")
    assert body.startswith(prompt + "    return a + b\n")
    for program in (whole, body):  # both are valid programs that pass
        assert run_tests(program, timeout=20).passed


# -- the real sandbox, real problems ---------------------------------------------------------------------
@needs_data
@pytest.mark.parametrize("task_id", ["HumanEval/0", "HumanEval/32", "HumanEval/38", "HumanEval/53"])
def test_canonical_solutions_pass_in_the_sandbox(task_id: str) -> None:
    p = _problems()[task_id]  # 32 and 38 call helper functions the prompt defines
    out = run_tests(build_program(p["prompt"], p["canonical_solution"], _tests(p)), timeout=20)
    assert out.passed and out.reason is None, out.feedback


@needs_data
def test_a_wrong_solution_fails_with_its_reason_and_the_failing_assertion() -> None:
    p = _problems()["HumanEval/0"]
    wrong = "def has_close_elements(numbers, threshold):\n    return False\n"
    out = run_tests(build_program(p["prompt"], wrong, _tests(p)), timeout=20)
    assert not out.passed
    assert out.reason == "AssertionError"
    assert "assert candidate(" in out.feedback and "AssertionError" in out.feedback
    assert "lmforge-sandbox-" not in out.feedback  # the temporary directory's name is not the model's business
    broken = run_tests(build_program(p["prompt"], "def has_close_elements(:\n", _tests(p)), timeout=20)
    assert not broken.passed and broken.reason.startswith("SyntaxError")


@needs_data
def test_an_infinite_loop_times_out_as_a_failure() -> None:
    p = _problems()["HumanEval/53"]
    out = run_tests(build_program(p["prompt"], "    while True:\n        pass\n", _tests(p)), timeout=2)
    assert not out.passed
    assert "timeout" in out.reason or "CPU time" in out.reason
    assert "[stopped:" in out.feedback


# -- the task, end to end --------------------------------------------------------------------------------
def _one_problem_task(tmp_path: Path, problem: dict) -> tuple[Path, Path]:
    data = tmp_path / "one.jsonl"
    data.write_text(json.dumps(problem) + "\n", encoding="utf-8")
    spec = tmp_path / "one.toml"
    spec.write_text('name = "one"\nkind = "code"\ncontext = "{{ prompt }}"\n'
                    'answer = "{{ test }}\\ncheck({{ entry_point }})"\nmax_tokens = 64\ntimeout = 20\n', encoding="utf-8")
    return spec, data


def test_humaneval_spec_resolves_its_data_under_lmforge_data(monkeypatch: pytest.MonkeyPatch,
                                                               tmp_path: Path) -> None:
    spec = get_task("humaneval")
    assert (spec.kind, spec.data, spec.n) == ("code", "humaneval/HumanEval.jsonl.gz", 1)
    monkeypatch.setenv("LMFORGE_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(LMForgeError, match=r"humaneval/HumanEval.jsonl.gz under \$LMFORGE_DATA"):
        load_items(spec)
    if HUMANEVAL.is_file():
        monkeypatch.setenv("LMFORGE_DATA", str(DATA))
        items, path = load_items(spec)
        assert path == HUMANEVAL and len(items) == 164
        assert items[0].question == items[0].doc["prompt"]
        assert str(items[0].gold).endswith("check(has_close_elements)")


@needs_data
def test_a_model_that_writes_the_canonical_solution_scores_pass_at_1_of_one(tmp_path: Path) -> None:
    from lmforge import load

    p = _problems()["HumanEval/53"]
    spec_path, data = _one_problem_task(tmp_path, p)
    lm = load(make_tiny_llama_dir(tmp_path / "m", context=512), device="cpu")
    tok = lm.tokenizer
    prompt = tok.encode_chat([{"role": "user", "content": CHAT_INSTRUCTION.format(question=p["prompt"])}])
    reply = "Sure:\n```python\ndef add(x: int, y: int):\n    return x + y\n```\nDone."
    script = tok.encode(reply, add_special_tokens=False) + [tok.token_to_id("<|im_end|>")]
    lm.model = ScriptedModel(script, len(prompt), lm.config.vocab_size, context=512)
    lm.configure_engine(max_batch=4)
    spec = get_task(str(spec_path))
    r = run_task(lm, spec, data, EvalOptions(chat=True, batch_size=4))
    assert [(row["metric"], row["value"]) for row in r["rows"]] == [("pass@1", 1.0)]
    s = r["samples"][0]
    assert s["tests"] == [{"passed": True, "reason": None}]
    assert s["completions"] == ["Sure:\n```python\ndef add(x: int, y: int):\n    return x + y"]  # cut at the fence


@needs_data
def test_self_refine_feeds_the_real_test_failure_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lmforge import load

    torch.set_num_threads(1)
    p = _problems()["HumanEval/53"]
    spec_path, data = _one_problem_task(tmp_path, p)
    lm = load(make_tiny_llama_dir(tmp_path / "m", context=2048), device="cpu")
    seen: list[list[dict]] = []
    real = lm.chat_prompt

    def recording(messages, tools=None):  # noqa: ANN001, ANN202 - observes, then renders as usual
        seen.append([dict(m) for m in messages])
        return real(messages, tools)

    monkeypatch.setattr(lm, "chat_prompt", recording)
    spec = get_task(str(spec_path))
    opt = EvalOptions(chat=True, batch_size=2, strategy=Strategy("self-refine", max_rounds=1))
    r = run_task(lm, spec, data, opt)
    s = r["samples"][0]
    draft = s["drafts"][0]["completion"]
    assert s["drafts"][0]["passed"] is False  # a random model's draft fails
    expected = run_tests(build_program(p["prompt"], extract_code(draft, "add"), _tests(p)), timeout=20).feedback
    assert expected.strip()
    revise = [m for m in seen if len(m) == 3]  # question, draft, feedback
    assert len(revise) == 1 and revise[0][1]["content"] == draft
    assert expected in revise[0][2]["content"]
    assert s["rounds"] == [1]
    metrics = {row["metric"]: row["value"] for row in r["rows"]}
    assert set(metrics) == {"pass@1", "draft_pass@1"} and metrics["draft_pass@1"] == 0.0


def test_code_tasks_refuse_strategies_they_cannot_use(tmp_path: Path) -> None:
    from lmforge import load

    spec_path, data = _one_problem_task(tmp_path, {"prompt": "def f():\n", "test": "", "entry_point": "f"})
    lm = load(make_tiny_llama_dir(tmp_path / "m", context=512), device="cpu")
    with pytest.raises(LMForgeError, match="code tasks take --strategy direct or self-refine, not cot"):
        run_task(lm, get_task(str(spec_path)), data, EvalOptions(strategy=Strategy("cot")))
    many = tmp_path / "many.toml"
    many.write_text(spec_path.read_text() + "n = 4\ntemperature = 0\n", encoding="utf-8")
    with pytest.raises(LMForgeError, match="greedy samples would all be the same"):
        run_task(lm, get_task(str(many)), data, EvalOptions())


def test_cli_runs_humaneval_with_self_refine_and_writes_the_run(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from lmforge.cli import main

    torch.set_num_threads(1)
    problem = {"task_id": "T/0", "prompt": "def f():\n", "test": "def check(c):\n    assert c() == 1\n",
               "entry_point": "f"}
    spec_path, data = _one_problem_task(tmp_path, problem)
    model = make_tiny_llama_dir(tmp_path / "m", context=2048)
    out = tmp_path / "run"
    rc = main(["eval", str(model), "--tasks", str(spec_path), "--data", str(data), "--strategy", "self-refine",
               "--max-rounds", "1", "--max-tokens", "16", "--out", str(out), "--quiet", "--device", "cpu"])
    assert rc == 0
    doc = json.loads((out / "results.json").read_text())
    assert {r["metric"] for r in doc["results"]} == {"pass@1", "draft_pass@1"}
    rec = json.loads((out / "samples_one.jsonl").read_text())
    assert rec["task_id"] == "T/0" and rec["tests"][0]["passed"] is False and rec["tests"][0]["reason"]
    assert "pass@1" in capsys.readouterr().out
    rc = main(["eval", str(model), "--tasks", str(spec_path), "--data", str(data), "--strategy", "cot", "--quiet",
               "--device", "cpu"])
    assert rc == 1
    assert "code tasks take --strategy direct or self-refine, not cot" in capsys.readouterr().err
