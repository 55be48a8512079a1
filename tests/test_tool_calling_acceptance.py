"""Function calling against a random model, over many function schemas: with tool_choice "required" and with a
named function, every call parses and validates (the 13 schemas of benchmarks/data, each case's own tool set and
request); streamed parallel calls keep their indexes; `lmforge serve`, started as a user starts it, does a
streamed round trip with the official `openai` client."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jsonschema
import openai
import pytest
from serve_util import RunningServer, serve_process
from test_tool_calling import reassemble
from tiny import make_tiny_llama_dir

pytestmark = pytest.mark.usefixtures("one_thread")

DATA = Path(__file__).resolve().parent.parent / "benchmarks" / "data"
TOOLS = {t["function"]["name"]: t for t in json.loads((DATA / "function_calling_tools.json").read_text())}
CASES = [json.loads(line) for line in (DATA / "function_calling.jsonl").read_text().splitlines() if line]
ADD = {"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"],
    "additionalProperties": False}}}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # The built-in tool format is long in a tiny byte-level vocabulary: a long context holds it.
    return make_tiny_llama_dir(tmp_path_factory.mktemp("acceptance") / "m", context=4096)


@pytest.fixture(scope="module")
def client(model_dir: Path):
    with RunningServer(model_dir) as s:
        yield openai.OpenAI(base_url=f"{s.url}/v1", api_key="none", max_retries=0)


def validated(call, names: set[str]) -> dict:
    """A call's arguments, once it is known to be well formed and valid against its function's schema."""
    assert call.type == "function" and call.id.startswith("call_"), call
    assert call.function.name in names, (call.function.name, names)
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, TOOLS[call.function.name]["function"]["parameters"])
    return args


def test_the_set_spans_varied_schemas():
    # What the tests below (and the benchmark) rely on: 50+ cases, 10+ functions, every JSON type.
    assert len(CASES) >= 50 and len({c["expected"]["name"] for c in CASES}) >= 10
    types = {p.get("type") for t in TOOLS.values() for p in t["function"]["parameters"]["properties"].values()}
    assert {"string", "integer", "number", "boolean", "array", "object"} <= types
    for case in CASES:
        assert case["expected"]["name"] in case["tools"] and len(case["tools"]) >= 3
        jsonschema.validate(case["expected"]["arguments"], TOOLS[case["expected"]["name"]]["function"]["parameters"])


@pytest.mark.parametrize("named", [False, True])
def test_required_and_named_calls_validate_over_every_schema(client, named):
    # One generation per case: 60 requests, each with its own tool set (the right function among distractors),
    # at varied temperatures and seeds, sent together so that the server batches them; with a named function
    # the call must be to that one.
    def ask(i: int, case: dict):
        want = case["expected"]["name"]
        r = client.chat.completions.create(
            model="tiny", messages=case["messages"], tools=[TOOLS[n] for n in case["tools"]],
            tool_choice={"type": "function", "function": {"name": want}} if named else "required",
            temperature=(0.5, 1.0, 1.5)[i % 3], seed=i, max_tokens=160, parallel_tool_calls=not named and i % 2 == 0)
        return r.choices[0]

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(len(CASES)), CASES))
    checked = set()
    for i, (case, c) in enumerate(zip(CASES, answers)):
        assert c.finish_reason == "tool_calls" and c.message.content is None, c
        assert c.message.tool_calls and (len(c.message.tool_calls) == 1 or (not named and i % 2 == 0))
        for call in c.message.tool_calls:
            validated(call, {case["expected"]["name"]} if named else set(case["tools"]))
            checked.add(call.function.name)
    # Every function of the set was called: each is named once at least, or chosen by the random model.
    assert (len(checked) == len(TOOLS)) if named else (len(checked) >= 8), checked


def test_streamed_parallel_calls_keep_their_indexes(client):
    offered = [ADD, TOOLS["set_timer"]]
    for seed in range(6):
        kw = dict(model="tiny", messages=CASES[0]["messages"], tools=offered, tool_choice="required",
                  temperature=1.0, seed=seed, max_tokens=300)
        whole = client.chat.completions.create(**kw).choices[0].message.tool_calls
        content, streamed, reason = reassemble(client.chat.completions.create(stream=True, **kw))
        assert content == "" and reason == "tool_calls"
        assert streamed == [{"name": c.function.name, "arguments": c.function.arguments} for c in whole]
        assert len({c.id for c in whole}) == len(whole)
        if len(whole) >= 2:
            break
    assert len(whole) >= 2  # parallel calls were streamed, each under its own index


def test_lmforge_serve_round_trip_streamed(model_dir, tmp_path):
    # `lmforge serve` in its own process; the call streamed, its result sent back, the answer streamed.
    case = next(c for c in CASES if c["expected"]["name"] == "get_weather")
    offered = [TOOLS[n] for n in case["tools"]]
    with serve_process(model_dir, log=tmp_path / "serve.log", env={"OMP_NUM_THREADS": "1"}) as (_, url):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        stream = client.chat.completions.create(
            model="m", messages=case["messages"], tools=offered, stream=True, temperature=0.8, seed=1,
            tool_choice={"type": "function", "function": {"name": "get_weather"}}, max_tokens=300)
        ids, name, arguments, reason = [], None, "", None
        for chunk in stream:
            for d in chunk.choices[0].delta.tool_calls or []:
                ids += [d.id] if d.id else []
                name = d.function.name or name
                arguments += d.function.arguments or ""
            reason = chunk.choices[0].finish_reason or reason
        assert reason == "tool_calls" and len(ids) == 1 and name == "get_weather"
        jsonschema.validate(json.loads(arguments), TOOLS["get_weather"]["function"]["parameters"])
        messages = [*case["messages"],
                    {"role": "assistant", "content": None, "tool_calls": [
                        {"id": ids[0], "type": "function", "function": {"name": name, "arguments": arguments}}]},
                    {"role": "tool", "tool_call_id": ids[0], "content": '{"temperature": 18, "sky": "clear"}'}]
        answer, reason = "", None
        for chunk in client.chat.completions.create(model="m", messages=messages, tools=offered, stream=True,
                                                    tool_choice="none", temperature=0.8, seed=1, max_tokens=24):
            answer += chunk.choices[0].delta.content or ""
            assert not chunk.choices[0].delta.tool_calls
            reason = chunk.choices[0].finish_reason or reason
        assert answer and reason in ("stop", "length")
