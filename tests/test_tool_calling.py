"""Function calling as OpenAI's API defines it, through the official `openai` client against a real server:
every tool_choice mode, calls that always parse and validate (constrained decoding), streamed deltas,
parallel calls, a round trip, malformed requests; the Python API and `lmforge chat --tools`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest
from serve_util import RunningServer
from tiny import ScriptedModel, make_tiny_llama_dir

import lmforge

pytestmark = pytest.mark.usefixtures("one_thread")

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
SCHEMAS = {
    "get_weather": WEATHER,
    "add": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "required": ["a", "b"], "additionalProperties": False},
    "book": {"type": "object", "additionalProperties": False, "required": ["guest", "nights", "extras"],
             "properties": {"guest": {"type": "object", "additionalProperties": False, "required": ["name", "age"],
                                      "properties": {"name": {"type": "string"},
                                                     "age": {"type": "integer", "minimum": 0, "maximum": 130}}},
                            "nights": {"type": "integer", "minimum": 1},
                            "extras": {"type": "array", "items": {"enum": ["breakfast", "parking", "spa"]}},
                            "vip": {"type": "boolean"}}},
    "search": {"type": "object", "properties": {"query": {"type": "string"}, "tags": {"type": "array",
                                                                                       "items": {"type": "string"}}},
               "required": ["query"], "additionalProperties": False},
}
TOOLS = [{"type": "function", "function": {"name": n, "description": f"the {n} function", "parameters": s}}
         for n, s in SCHEMAS.items()]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # The built-in tool format is long in a tiny byte-level vocabulary: a long context holds it.
    return make_tiny_llama_dir(tmp_path_factory.mktemp("tools") / "m", context=4096)


@pytest.fixture(scope="module")
def srv(model_dir: Path):
    with RunningServer(model_dir) as s:
        yield s


@pytest.fixture(scope="module")
def client(srv: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{srv.url}/v1", api_key="none", max_retries=0)


def check_calls(choice, names: set[str], parallel: bool = True) -> list:
    """Every call in a choice parses and validates against its function's schema."""
    assert choice.finish_reason == "tool_calls", choice
    calls = choice.message.tool_calls
    assert calls and (parallel or len(calls) == 1), calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    return calls


# -- every call parses and validates -----------------------------------------------------------------------
@pytest.mark.parametrize("named", [None, "book", "get_weather"])
def test_required_and_named_calls_always_parse_and_validate(client, named):
    choice = "required" if named is None else {"type": "function", "function": {"name": named}}
    names = set(SCHEMAS) if named is None else {named}
    checked = 0
    for k, temperature in enumerate((0.4, 0.8, 1.2, 1.6)):
        r = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice=choice, n=13,
                                           temperature=temperature, seed=100 + k, max_tokens=220,
                                           parallel_tool_calls=k % 2 == 0)
        for c in r.choices:
            assert c.message.content is None
            check_calls(c, names, parallel=k % 2 == 0 and named is None)
            checked += 1
    assert checked >= 52


def test_required_calls_stay_valid_when_the_budget_is_tight(client):
    # The shortest call of `add` is far below 90 tokens; random text would run past the budget, the closing
    # plan ends every call in time instead.
    for seed in range(3):
        r = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS[1:2], tool_choice="required",
                                           n=8, temperature=1.5, seed=seed, max_tokens=90)
        for c in r.choices:
            check_calls(c, {"add"})


def test_parallel_calls(client):
    counts = []
    for seed in range(4):  # short calls (two integers), so that several fit the budget
        r = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS[1:2], tool_choice="required",
                                           n=8, temperature=1.0, seed=seed, max_tokens=400)
        for c in r.choices:
            counts.append(len(check_calls(c, {"add"})))
    assert max(counts) >= 2, counts  # several calls in one answer, each with its own id
    r = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice="required", n=8,
                                       temperature=1.0, seed=0, max_tokens=300, parallel_tool_calls=False)
    assert all(len(check_calls(c, set(SCHEMAS), parallel=False)) == 1 for c in r.choices)


# -- streaming ---------------------------------------------------------------------------------------------
def reassemble(stream) -> tuple[str, list[dict], str]:
    content, calls, reason = "", {}, None
    for chunk in stream:
        for ch in chunk.choices:
            d = ch.delta
            assert "<tool_call>" not in (d.content or "")
            content += d.content or ""
            for tc in d.tool_calls or []:
                if tc.index not in calls:  # a call's first delta: id, type, name and empty arguments
                    assert tc.id.startswith("call_") and tc.type == "function" and tc.function.name
                    assert tc.function.arguments == ""
                    calls[tc.index] = {"name": tc.function.name, "arguments": ""}
                else:
                    assert tc.id is None and not tc.function.name
                    calls[tc.index]["arguments"] += tc.function.arguments
            reason = ch.finish_reason or reason
    assert sorted(calls) == list(range(len(calls)))
    return content, [calls[i] for i in sorted(calls)], reason


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "book"}}])
def test_streamed_deltas_reassemble_to_the_whole_calls(client, tool_choice):
    for seed in range(4):
        kw = dict(model="tiny", messages=ASK, tools=TOOLS, tool_choice=tool_choice, temperature=1.0, seed=seed,
                  max_tokens=250)
        whole = client.chat.completions.create(**kw).choices[0]
        want = [{"name": c.function.name, "arguments": c.function.arguments} for c in whole.message.tool_calls]
        content, calls, reason = reassemble(client.chat.completions.create(stream=True, **kw))
        assert calls == want and reason == "tool_calls" and content == ""


# -- auto and none -----------------------------------------------------------------------------------------
def test_none_and_auto_without_a_call_answer_in_text(client):
    for choice in ("none", "auto"):
        r = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice=choice, n=4,
                                           temperature=1.0, seed=1, max_tokens=40)
        for c in r.choices:
            assert isinstance(c.message.content, str) and c.finish_reason in ("stop", "length")
            assert not c.message.tool_calls  # a random model does not write the call opening


def scripted_server(model_dir: Path, text: str, messages: list[dict], tools: list[dict]) -> RunningServer:
    """A server whose model writes `text` (then ends its turn) in answer to `messages`."""
    lm = lmforge.load(model_dir)
    prompt = lm.chat_prompt(messages, tools)
    lm.model = ScriptedModel(lm.tokenizer.encode(text) + [lm.tokenizer.token_to_id("<|im_end|>")], len(prompt),
                             lm.config.vocab_size, context=4096)
    return RunningServer(lm)


def test_auto_text_then_a_call_is_constrained_once_it_opens(model_dir):
    # The model opens a call and then writes an argument its schema forbids ("kelvin") and a key it does not
    # have: from the opening on, the call is constrained, so what comes out is still a valid call.
    text = ('Let me check. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "kelvin", '
            '"x": 1}}\n</tool_call>')
    with scripted_server(model_dir, text, ASK, TOOLS) as s:
        client = openai.OpenAI(base_url=f"{s.url}/v1", api_key="none", max_retries=0)
        kw = dict(model="tiny", messages=ASK, tools=TOOLS, temperature=0, max_tokens=120)
        c = client.chat.completions.create(**kw).choices[0]
        assert c.message.content.startswith("Let me check.")
        calls = check_calls(c, {"get_weather"})
        assert json.loads(calls[0].function.arguments)["city"] == "Paris"
        content, streamed, reason = reassemble(client.chat.completions.create(stream=True, **kw))
        assert content == c.message.content and reason == "tool_calls"
        assert streamed == [{"name": x.function.name, "arguments": x.function.arguments} for x in calls]
        # With tool_choice none the same output is text: nothing is parsed.
        c = client.chat.completions.create(**(kw | {"tool_choice": "none"})).choices[0]
        assert "<tool_call>" in c.message.content and not c.message.tool_calls and c.finish_reason == "stop"


# -- a round trip ------------------------------------------------------------------------------------------
def test_round_trip_call_tool_result_answer(client, srv):
    first = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS,
                                           tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                           temperature=0.7, seed=3, max_tokens=200).choices[0]
    call = check_calls(first, {"get_weather"})[0]
    messages = [*ASK, first.message.model_dump(exclude_none=True),
                {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 18, "sky": "clear"}'}]
    final = client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS, tool_choice="none",
                                           temperature=0.7, seed=3, max_tokens=20).choices[0]
    assert isinstance(final.message.content, str) and final.finish_reason in ("stop", "length")
    # The call and its result are in the prompt, in the built-in format (the tiny model's ChatML has no tools).
    prompt = srv.lm.tokenizer.decode(srv.lm.chat_prompt(messages, TOOLS))
    assert f'<tool_call>\n{{"name": "get_weather", "arguments": {call.function.arguments}}}\n</tool_call>' in prompt
    assert '<tool_response>\n{"temperature": 18, "sky": "clear"}\n</tool_response>' in prompt
    assert "<tools>\n" + json.dumps(TOOLS[0]) in prompt


# -- malformed requests ------------------------------------------------------------------------------------
@pytest.mark.parametrize("body, param, says", [
    ({"tools": [{"type": "function", "function": {"parameters": WEATHER}}]}, "tools.0.function.name", "name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]},
     "tools.0.function.parameters", "object"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]}, "tools.0.function.parameters",
     "object"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "'nope'"),
    ({"tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"tool_choice": {"type": "function", "function": {"name": "add"}}}, "tool_choice", "not among the tools"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice", "sometimes"),
    ({"messages": [*ASK, {"role": "tool", "content": "18C"}]}, "messages.1.tool_call_id", "tool_call_id"),
    ({"messages": [*ASK, {"role": "assistant", "tool_calls": [{"id": "1", "type": "function",
                                                               "function": {"arguments": "{}"}}]}]},
     "messages.1.tool_calls.0.function.name", "name"),
    ({"functions": [TOOLS[0]["function"]]}, "functions", "deprecated"),
    ({"function_call": "auto"}, "function_call", "deprecated"),
    ({"tools": TOOLS, "response_format": {"type": "json_object"}}, "response_format", "tool calls"),
    ({"tools": TOOLS, "tool_choice": "required", "max_tokens": 5}, "max_tokens", "shortest tool call"),
])
def test_malformed_tool_requests_are_400_naming_the_field(srv, body, param, says):
    r = httpx.post(f"{srv.url}/v1/chat/completions", json={"messages": ASK, "max_tokens": 4} | body, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.text
    assert says in r.json()["error"]["message"], r.text


# -- rendering ---------------------------------------------------------------------------------------------
def test_a_template_with_tools_renders_them_itself(tmp_path):
    template = ("{% for t in tools or [] %}[{{ t.function.name }}]{% endfor %}{% for m in messages %}"
                "{{ m.role }}:{{ m.content }}{% for c in m.tool_calls or [] %}<{{ c.function.name }} "
                "{{ c.function.arguments.city }}>{% endfor %}|{% endfor %}")
    lm = lmforge.load(make_tiny_llama_dir(tmp_path / "m", context=256, chat_template=template))
    messages = [*ASK, {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18C"}]
    text = lm.tokenizer.decode(lm.chat_prompt(messages, TOOLS[:2]))
    assert text == "[get_weather][add]user:What is the weather in Paris?|assistant:<get_weather Paris>|tool:18C|"


def test_fallback_format_and_parsing():
    from lmforge.tools.calling import fallback_messages, parse_calls

    msgs = fallback_messages([{"role": "system", "content": "Be brief."}, *ASK,
                              {"role": "assistant", "content": None, "tool_calls": [
                                  {"id": "a", "function": {"name": "add", "arguments": {"a": 1, "b": 2}}},
                                  {"id": "b", "function": {"name": "add", "arguments": {"a": 3, "b": 4}}}]},
                              {"role": "tool", "tool_call_id": "a", "content": "3"},
                              {"role": "tool", "tool_call_id": "b", "content": "7"}], TOOLS[1:2])
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]
    assert msgs[0]["content"].startswith("Be brief.\n\n# Tools") and "<tools>\n" in msgs[0]["content"]
    assert msgs[2]["content"] == ('<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>\n'
                                  '<tool_call>\n{"name": "add", "arguments": {"a": 3, "b": 4}}\n</tool_call>')
    assert msgs[3]["content"] == "<tool_response>\n3\n</tool_response>\n<tool_response>\n7\n</tool_response>"
    content, calls = parse_calls(f"Sure.\n{msgs[2]['content']}", {"add"})
    assert content == "Sure." and [json.loads(c["function"]["arguments"]) for c in calls] == [
        {"a": 1, "b": 2}, {"a": 3, "b": 4}]
    # A block that is not a call to an offered function stays text.
    assert parse_calls('<tool_call>{"name": "rm", "arguments": {}}</tool_call>', {"add"})[1] == []


# -- Python API and CLI --------------------------------------------------------------------------------------
def test_python_api_returns_openai_messages(srv):
    lm = srv.lm
    msg = lm.chat(ASK, tools=TOOLS, tool_choice="required", temperature=1.0, seed=5, max_tokens=200)
    assert msg["role"] == "assistant" and msg["content"] is None and msg["tool_calls"]
    for call in msg["tool_calls"]:
        jsonschema.validate(json.loads(call["function"]["arguments"]), SCHEMAS[call["function"]["name"]])
    answer = lm.chat([*ASK, msg, *({"role": "tool", "tool_call_id": c["id"], "content": "ok"}
                                   for c in msg["tool_calls"])], tools=TOOLS, tool_choice="none", max_tokens=5)
    assert set(answer) == {"role", "content"} and isinstance(answer["content"], str)
    assert isinstance(lm.chat("hi", max_tokens=3), str)  # without tools, text as before


def test_cli_chat_with_tools(model_dir, tmp_path):
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps(TOOLS[:1]))
    cmd = [sys.executable, "-m", "lmforge", "chat", str(model_dir), "--tools", str(tools), "--tool-choice",
           "get_weather", "--max-tokens", "200", "--seed", "1"]
    r = subprocess.run(cmd, input="weather in Paris?", capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    call = json.loads(r.stdout.strip().splitlines()[-1])
    assert call["function"]["name"] == "get_weather" and call["id"].startswith("call_")
    jsonschema.validate(json.loads(call["function"]["arguments"]), WEATHER)
    tools.write_text(json.dumps([{"type": "function", "function": {"parameters": WEATHER}}]))
    r = subprocess.run(cmd[:-4], input="hi", capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "Traceback" not in r.stderr and "tools.0.function.name" in r.stderr, r.stderr


# -- a real model ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_calls_get_weather(smollm2_path):
    # With "auto" a 135M model mostly answers in prose; "required" makes it call, and the call is valid.
    tool = {"type": "function", "function": {"name": "get_weather", "description": "Get the current weather in a city",
                                             "parameters": WEATHER}}
    with RunningServer(smollm2_path) as s:
        client = openai.OpenAI(base_url=f"{s.url}/v1", api_key="none", max_retries=0)
        c = client.chat.completions.create(model="tiny", messages=ASK, tools=[tool], tool_choice="required",
                                           temperature=0, max_tokens=80).choices[0]
    calls = check_calls(c, {"get_weather"})
    assert calls[0].function.name == "get_weather"
    assert "paris" in json.loads(calls[0].function.arguments)["city"].lower()
