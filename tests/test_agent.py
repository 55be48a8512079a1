"""`lmforge agent` and `lmforge.agent.run`: the loop (plan, act, observe, revise, answer) driven by a scripted
backend, its budgets, malformed calls fed back, a real `lmforge serve` over HTTP, local models, and the CLI."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from serve_util import RunningServer, free_port
from tiny import make_tiny_llama_dir

import lmforge
from lmforge.agent import AgentError, OpenAIBackend, Reply, endpoint_url, run
from lmforge.cli import main
from lmforge.tools.calling import check_messages, check_tools


def call(name: str, arguments: Any) -> dict[str, Any]:
    args = arguments if isinstance(arguments, str) else json.dumps(arguments)
    return {"role": "assistant", "content": None,
            "tool_calls": [{"id": f"call_{name}", "type": "function", "function": {"name": name, "arguments": args}}]}


def last_result(messages: list[dict[str, Any]]) -> str:
    """The tool result the model saw last, without the loop's progress note."""
    return [m for m in messages if m["role"] == "tool"][-1]["content"].split("\n\n[task done")[0]


class Scripted:
    """A backend that replays fixed assistant turns (or turns computed from the conversation so far), checks
    every request as a server would, and records what it was asked."""

    def __init__(self, script: list[Any], tokens: int = 10, delay: float = 0.0) -> None:
        self.script, self.tokens, self.delay = list(script), tokens, delay
        self.requests: list[dict[str, Any]] = []
        self.name = "scripted"

    def complete(self, messages, tools, tool_choice, max_tokens, deadline) -> Reply:
        check_messages(messages)  # what lmforge serve checks: a malformed history would be a 400
        check_tools(tools, tool_choice)
        self.requests.append({"messages": [dict(m) for m in messages], "tool_choice": tool_choice,
                              "max_tokens": max_tokens, "tools": [t["function"]["name"] for t in tools]})
        time.sleep(self.delay)
        turn = self.script[min(len(self.requests), len(self.script)) - 1]
        return Reply(turn(messages) if callable(turn) else turn, 100, self.tokens, "tool_calls")


def read_transcript(path: Path) -> list[dict[str, Any]]:
    events = [json.loads(line) for line in path.read_text().splitlines()]
    assert events[0]["type"] == "start" and events[-1]["type"] == "stop"
    assert [e["type"] for e in events].count("stop") == 1 and len({e["run"] for e in events}) == 1
    return events


def test_plans_uses_two_tools_feeds_their_results_forward_and_answers(tmp_path: Path) -> None:
    backend = Scripted([
        call("plan", {"tasks": ["multiply 17 by 23", "add 9 to the product"]}),
        call("calculator", {"expression": "17*23"}),
        lambda msgs: call("python", {"code": f"print({last_result(msgs)} + 9)"}),
        lambda msgs: call("final_answer", {"answer": f"17*23+9 = {last_result(msgs)}"}),
    ])
    seen: list[dict[str, Any]] = []
    result = run("What is 17*23+9?", backend, ["calculator", "python"], transcript=tmp_path / "t.jsonl",
                 on_event=seen.append, max_steps=6)
    assert (result.answer, result.stop_reason, result.steps) == ("17*23+9 = 400", "final_answer", 4)
    assert result.usage == {"prompt_tokens": 400, "completion_tokens": 40}
    assert result.tasks == [{"task": "multiply 17 by 23", "status": "done"},
                            {"task": "add 9 to the product", "status": "done"}]
    # The first turn must plan; the tools offered are the agent's own and the two asked for.
    assert backend.requests[0]["tool_choice"] == {"type": "function", "function": {"name": "plan"}}
    assert [r["tool_choice"] for r in backend.requests[1:]] == ["required"] * 3
    assert backend.requests[0]["tools"] == ["plan", "final_answer", "calculator", "python"]
    # A plan is followed by an action: the turn after it is not offered `plan`; later turns are again.
    assert backend.requests[1]["tools"] == ["final_answer", "calculator", "python"]
    assert backend.requests[2]["tools"] == backend.requests[0]["tools"]
    # The python turn saw the calculator's result, and was told which task came next.
    tool_msgs = [m for m in backend.requests[2]["messages"] if m["role"] == "tool"]
    assert tool_msgs[-1]["content"] == "391\n\n[task done: multiply 17 by 23. Next task: add 9 to the product]"

    events = read_transcript(tmp_path / "t.jsonl")
    assert events == seen and events == result.events
    actions = [(e["tool"], e["arguments"], e["task"]) for e in events if e["type"] == "action"]
    assert actions == [("plan", {"tasks": ["multiply 17 by 23", "add 9 to the product"]}, None),
                       ("calculator", {"expression": "17*23"}, "multiply 17 by 23"),
                       ("python", {"code": "print(391 + 9)"}, "add 9 to the product"),
                       ("final_answer", {"answer": "17*23+9 = 400"}, None)]
    observations = [(e["tool"], e["content"], e["error"]) for e in events if e["type"] == "observation"]
    assert observations[1:3] == [("calculator", "391", False), ("python", "400", False)]
    assert [e["by"] for e in events if e["type"] == "plan"] == ["model", "progress", "progress"]
    stop = events[-1]
    assert (stop["reason"], stop["answer"], stop["steps"]) == ("final_answer", "17*23+9 = 400", 4)
    assert [e["step"] for e in events if e["type"] == "reply"] == [1, 2, 3, 4]


def test_the_model_revises_its_task_list(tmp_path: Path) -> None:
    backend = Scripted([
        call("plan", {"tasks": ["a", "b", "c"]}),
        call("calculator", {"expression": "2**10"}),
        call("plan", {"tasks": ["d"]}),
        call("calculator", {"expression": "1+1"}),
        call("final_answer", {"answer": "done"}),
    ])
    result = run("goal", backend, ["calculator"])
    assert result.stop_reason == "final_answer"
    assert result.tasks == [{"task": "a", "status": "done"}, {"task": "d", "status": "done"}]
    assert "All tasks are done" in backend.requests[4]["messages"][-1]["content"]
    # With every task done there is nothing to act on: that turn may only revise the plan or answer.
    assert [r["tools"] for r in backend.requests] == [
        ["plan", "final_answer", "calculator"], ["final_answer", "calculator"], ["plan", "final_answer", "calculator"],
        ["final_answer", "calculator"], ["plan", "final_answer"]]


def test_step_and_token_budgets_stop_the_run(tmp_path: Path) -> None:
    forever = [call("plan", {"tasks": ["loop"]}), call("calculator", {"expression": "1+1"})]
    result = run("never ends", Scripted(forever), ["calculator"], max_steps=3, transcript=tmp_path / "a.jsonl")
    assert (result.stop_reason, result.steps, result.answer) == ("max_steps", 3, None)
    assert read_transcript(tmp_path / "a.jsonl")[-1]["reason"] == "max_steps"

    backend = Scripted(forever, tokens=100)
    result = run("never ends", backend, ["calculator"], max_steps=50, max_tokens=250, step_tokens=120)
    # A turn starts only while all its tokens fit in the budget, so the run never goes past it.
    assert (result.stop_reason, result.steps, result.usage["completion_tokens"]) == ("max_tokens", 2, 200)
    assert [r["max_tokens"] for r in backend.requests] == [120, 120]


def test_the_time_budget_stops_the_run(tmp_path: Path) -> None:
    forever = [call("plan", {"tasks": ["loop"]}), call("calculator", {"expression": "1+1"})]
    result = run("never ends", Scripted(forever, delay=0.3), ["calculator"], max_steps=1000, timeout=1.0,
                 transcript=tmp_path / "t.jsonl")
    assert result.stop_reason == "timeout" and result.steps < 1000 and result.seconds >= 1.0
    assert read_transcript(tmp_path / "t.jsonl")[-1]["reason"] == "timeout"


def test_malformed_calls_are_observed_and_the_run_recovers(tmp_path: Path) -> None:
    def broken(x: int) -> int:
        """A user tool with a bug.

        Args:
            x: a number
        """
        raise ValueError("bug in the tool")

    script = [
        call("plan", {"tasks": ["compute"]}),
        call("calculator", '{"expression": '),  # cut-off JSON
        call("weather", {"city": "Paris"}),  # a tool that is not offered
        {"role": "assistant", "content": None, "tool_calls": [{"id": "x", "type": "function", "function": {}}]},
        call("calculator", {"expr": "1"}),  # a missing required argument
        call("calculator", {"expression": "1/0"}),  # the tool refuses
        call("broken", {"x": 1}),  # the tool raises
        {"role": "assistant", "content": "I think the answer is 4."},  # no call although one is required
        call("plan", {"tasks": []}),  # plan without tasks
        call("calculator", {"expression": "2+2"}),
        call("final_answer", {"answer": "4"}),
    ]
    backend = Scripted(script)
    result = run("2+2?", backend, ["calculator", broken], max_steps=20, transcript=tmp_path / "t.jsonl")
    assert (result.answer, result.stop_reason, result.steps) == ("4", "final_answer", 11)
    errors = [e["content"] for e in read_transcript(tmp_path / "t.jsonl") if e["type"] == "observation" and e["error"]]
    assert len(errors) == 8, errors
    for pattern in [r"not valid JSON", r"unknown tool 'weather'; the tools are: plan, final_answer, calculator, broken",
                    r"no function name", r"missing required argument\(s\) expression", r"[Dd]ivision by zero",
                    r"broken failed: ValueError: bug in the tool", r"called no tool", r"plan needs"]:
        assert any(re.search(pattern, e) for e in errors), (pattern, errors)
    # Every error reached the model as an observation, and the task was done only by the call that worked.
    fed_back = [m["content"] for m in backend.requests[-1]["messages"] if m["role"] in ("tool", "user")]
    assert sum(c.startswith("Error: ") for c in fed_back) == 8
    assert result.tasks == [{"task": "compute", "status": "done"}]


def test_a_malformed_call_beside_a_good_one_is_observed_too() -> None:
    mixed = call("calculator", {"expression": "3*3"})
    mixed["tool_calls"].append({"id": "y", "type": "function", "function": {"name": "calculator", "arguments": "{"}})
    backend = Scripted([call("plan", {"tasks": ["square 3"]}), mixed, call("final_answer", {"answer": "9"})])
    result = run("3 squared?", backend, ["calculator"])
    assert (result.answer, result.stop_reason) == ("9", "final_answer")
    observations = [(e["content"], e["error"]) for e in result.events if e["type"] == "observation"]
    assert observations[1] == ("9", False) and observations[2][1] and "not valid JSON" in observations[2][0]
    # The model got the good call's result and the error, and its history holds only the call that ran.
    sent = backend.requests[2]["messages"]
    assert [m["role"] for m in sent[-3:]] == ["assistant", "tool", "user"] and len(sent[-3]["tool_calls"]) == 1
    assert sent[-1]["content"].startswith("Error: the call to 'calculator' could not be used: arguments are not")


def test_auto_mode_takes_a_plain_answer_as_final() -> None:
    backend = Scripted([call("plan", {"tasks": ["answer"]}), {"role": "assistant", "content": "Paris."}])
    result = run("Capital of France?", backend, [], tool_choice="auto")
    assert (result.answer, result.stop_reason, result.steps) == ("Paris.", "final_answer", 2)


def test_backend_errors_are_raised_and_recorded(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    with pytest.raises(AgentError, match=r"^cannot reach http://127\.0\.0\.1:\d+/v1/models: "):
        run("goal", OpenAIBackend(f"http://127.0.0.1:{port}", model=None), ["calculator"],
            transcript=tmp_path / "t.jsonl")
    events = read_transcript(tmp_path / "t.jsonl")
    assert [e["type"] for e in events] == ["start", "error", "stop"] and events[-1]["reason"] == "error"
    with pytest.raises(lmforge.LMForgeError, match="unknown tool 'nope'"):
        run("goal", Scripted([]), ["nope"])
    with pytest.raises(AgentError, match="'plan' is the agent's own"):
        run("goal", Scripted([]), [lmforge.tools.Tool("plan", "x", {"type": "object"}, print)])


def test_endpoint_urls() -> None:
    assert endpoint_url("http://127.0.0.1:8000") == "http://127.0.0.1:8000/v1/chat/completions"
    assert endpoint_url("http://127.0.0.1:8000/v1/") == "http://127.0.0.1:8000/v1/chat/completions"
    assert endpoint_url("https://api.example.com/openai/v1") == "https://api.example.com/openai/v1/chat/completions"
    for bad in ("127.0.0.1:8000", "ftp://host/v1", "http://", "http://host:port/v1"):
        with pytest.raises(AgentError, match="--base-url"):
            endpoint_url(bad)


# -- real models ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # The built-in tool format is long in a tiny byte-level vocabulary: a long context holds it.
    return make_tiny_llama_dir(tmp_path_factory.mktemp("agent") / "m", context=4096)


def check_bounded(result: Any, max_steps: int, path: Path) -> None:
    assert result.stop_reason in ("final_answer", "max_steps", "max_tokens", "timeout", "context_full")
    assert 1 <= result.steps <= max_steps
    events = read_transcript(path)
    assert events[-1]["reason"] == result.stop_reason and events[-1]["steps"] == result.steps
    assert len([e for e in events if e["type"] == "reply"]) == result.steps


def test_over_http_against_lmforge_serve(tiny_dir: Path, tmp_path: Path, one_thread: None) -> None:
    with RunningServer(tiny_dir, api_keys=["sk-test"]) as srv:
        backend = OpenAIBackend(srv.url + "/v1", api_key="sk-test", temperature=1.0, seed=3)
        result = run("What is 6*7?", backend, ["calculator"], max_steps=3, step_tokens=100,
                     transcript=tmp_path / "t.jsonl")
        check_bounded(result, 3, tmp_path / "t.jsonl")
        assert backend.model == "tiny"  # the name /v1/models gave
        # Constrained decoding: every turn of the random model was a valid call to an offered function.
        replies = [e for e in result.events if e["type"] == "reply"]
        assert all(e["tool_calls"] == 1 or e["finish_reason"] == "length" for e in replies), replies
        assert result.events[2]["type"] == "action" and result.events[2]["tool"] == "plan"
        with pytest.raises(AgentError, match=r"answered HTTP 401: "):
            run("goal", OpenAIBackend(srv.url, api_key="wrong"), ["calculator"])
        with pytest.raises(AgentError, match=r"answered HTTP 404: the model 'gpt-4' does not exist"):
            run("goal", OpenAIBackend(srv.url, api_key="sk-test", model="gpt-4"), ["calculator"])

        # The command, as a user runs it, against the same server.
        out = subprocess.run([sys.executable, "-m", "lmforge", "agent", "What is 6*7?", "--base-url", srv.url,
                              "--api-key", "sk-test", "--tools", "calculator", "--max-steps", "2",
                              "--step-tokens", "100", "--transcript", str(tmp_path / "cli.jsonl")],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode in (0, 3), out.stderr
        assert out.stdout.startswith(f"transcript: {tmp_path / 'cli.jsonl'}\ngoal: What is 6*7?\n")
        assert re.search(r"^stopped: \w+ after [12] steps", out.stdout, re.M), out.stdout
        assert read_transcript(tmp_path / "cli.jsonl")[-1]["steps"] <= 2


def test_a_local_model_drives_the_same_loop(tiny_dir: Path, tmp_path: Path, one_thread: None) -> None:
    lm = lmforge.load(tiny_dir)
    result = run("What is 6*7?", lm, ["calculator"], max_steps=3, step_tokens=40, transcript=tmp_path / "t.jsonl")
    check_bounded(result, 3, tmp_path / "t.jsonl")
    # A context too small for the prompt stops the run (a budget), it does not fail it.
    small = lmforge.load(make_tiny_llama_dir(tmp_path / "small", context=64))
    result = run("What is 6*7?", small, ["calculator"], transcript=tmp_path / "s.jsonl")
    assert (result.stop_reason, result.steps) == ("context_full", 1)
    assert read_transcript(tmp_path / "s.jsonl")[-1]["reason"] == "context_full"


def test_a_local_generation_is_cut_at_the_deadline(tiny_dir: Path, one_thread: None) -> None:
    lm = lmforge.load(tiny_dir)
    # The random model's first call runs to about 2000 tokens: far longer than the time budget.
    result = run("goal", lm, ["calculator"], max_steps=1, step_tokens=2000, max_tokens=10**6, timeout=0.5)
    assert result.stop_reason == "timeout" and result.steps == 1
    assert result.events[-2]["type"] == "reply" and result.events[-2]["finish_reason"] == "timeout"


# -- the command line ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["goal", "--tools", "calculator,nope"], "unknown tool 'nope'"),
    (["goal", "--tools", "search"], "--tools search needs --index"),
    (["goal", "--base-url", "localhost:8000"], "--base-url must be an http:// or https:// URL"),
    (["goal", "--base-url", "http://127.0.0.1:{port}/v1"], "cannot reach http://127.0.0.1:"),
    (["m", "goal", "--base-url", "http://127.0.0.1:1/v1"], "give either MODEL ('m') or --base-url"),
    (["goal", "--api-key", "k"], "--api-key and --model go with --base-url"),
    (["goal", "--max-steps", "0"], "--max-steps must be at least 1"),
    (["goal", "--timeout", "0"], "--timeout must be above 0"),
    (["goal", "--transcript", "/nonexistent/dir/t.jsonl"], "--transcript: the folder /nonexistent/dir does not"),
])
def test_cli_errors_are_one_line(argv: list[str], message: str, capsys: pytest.CaptureFixture[str],
                                 tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the default transcript lands here
    argv = [a.replace("{port}", str(free_port())) for a in argv]
    assert main(["agent", *argv]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"lmforge: error: {message}") and err.count("\n") == 1, err


# -- SmolLM2 ----------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_smollm2_runs_bounded_with_a_valid_transcript(smollm2_path: Path, tmp_path: Path) -> None:
    lm = lmforge.load(smollm2_path, device="cpu")
    result = run("What is 17 * 23 + 9? Use the tools.", lm, ["calculator", "python"], max_steps=3,
                 step_tokens=64, timeout=240, transcript=tmp_path / "t.jsonl")
    check_bounded(result, 3, tmp_path / "t.jsonl")
    actions = [e for e in result.events if e["type"] == "action"]
    assert actions and actions[0]["tool"] == "plan"  # the first turn plans (constrained to a valid call)
    assert all(e["tool_calls"] == 1 or e["finish_reason"] == "length" for e in result.events if e["type"] == "reply")
