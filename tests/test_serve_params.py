"""OpenAI parameters through `lmforge serve`: each one is honoured or refused with a 400 naming it, never
dropped; structured output always ends as a complete document; an encoder never generates. The parameter
table in docs/serving.md is checked against the request schemas."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import jsonschema
import pydantic
import pytest
from serve_util import RunningServer
from tiny import make_tiny_bert_dir, make_tiny_llama_dir

from lmforge.serve import schemas

CITY = {"type": "object", "properties": {"city": {"type": "string"}, "tags": {"type": "array", "items": {"type": "string"}}},
        "required": ["city", "tags"]}
DOCS = Path(__file__).resolve().parent.parent / "docs" / "serving.md"


@pytest.fixture(scope="module")
def srv(tmp_path_factory, one_thread):
    with RunningServer(make_tiny_llama_dir(tmp_path_factory.mktemp("params") / "tiny", context=1024)) as s:
        yield s


def post(srv, path: str, **body) -> httpx.Response:
    return httpx.post(srv.url + path, json={"model": "tiny"} | body, timeout=120)


def chat(srv, content="hi", **body) -> httpx.Response:
    return post(srv, "/v1/chat/completions", messages=[{"role": "user", "content": content}], **body)


def refused(r: httpx.Response, param: str) -> str:
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param, err
    return err["message"]


def content(r: httpx.Response) -> str:
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}


# -- structured output ends complete ---------------------------------------------------------------------
def test_schema_without_a_finite_document_is_a_400_and_recursion_that_can_end_works(srv):
    endless = {"$ref": "#/$defs/n", "$defs": {"n": {"type": "object", "properties": {"next": {"$ref": "#/$defs/n"}},
                                                    "required": ["next"]}}}
    refused(chat(srv, max_tokens=30, response_format=schema_format(endless)), "response_format")
    tree = {"$ref": "#/$defs/n", "$defs": {"n": {"type": "object", "properties": {
        "kids": {"type": "array", "items": {"$ref": "#/$defs/n"}}}, "required": ["kids"]}}}
    for seed in range(3):
        doc = json.loads(content(chat(srv, max_tokens=40, temperature=1.0, seed=seed,
                                      response_format=schema_format(tree))))
        jsonschema.validate(doc, tree)


def test_budget_of_exactly_the_smallest_document_completes_it(srv):
    smallest = len(srv.lm.tokenizer.encode('{"city": "", "tags": []}', add_special_tokens=False))
    for seed in range(4):
        for budget in (smallest, smallest + 1, smallest + 3):
            r = chat(srv, max_tokens=budget, temperature=1.0, seed=seed, response_format=schema_format(CITY))
            jsonschema.validate(json.loads(content(r)), CITY)
    msg = refused(chat(srv, max_tokens=smallest - 1, response_format=schema_format(CITY)), "max_tokens")
    assert str(smallest) in msg


# -- parameters: honoured or refused by name ---------------------------------------------------------------
def test_non_text_content_parts_are_refused(srv):
    parts = [{"type": "text", "text": "what is this?"},
             {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]
    r = post(srv, "/v1/chat/completions", max_tokens=2, messages=[{"role": "user", "content": parts}])
    assert "image_url" in refused(r, "messages.0.content.1.type")
    r = post(srv, "/v1/chat/completions", max_tokens=2, messages=[{"role": "user", "content": parts[:1]}])
    assert r.status_code == 200, r.text


def test_suffix_best_of_and_modalities(srv):
    refused(post(srv, "/v1/completions", prompt="def f(", suffix="return x", max_tokens=2), "suffix")
    refused(post(srv, "/v1/completions", prompt="hi", best_of=3, max_tokens=2), "best_of")
    r = post(srv, "/v1/completions", prompt="hi", best_of=2, n=2, max_tokens=2)
    assert r.status_code == 200 and len(r.json()["choices"]) == 2
    refused(chat(srv, max_tokens=2, modalities=["text", "audio"]), "modalities")
    assert chat(srv, max_tokens=2, modalities=["text"]).status_code == 200


def test_guided_json_is_honoured_and_other_grammars_refused(srv):
    for guided in (CITY, json.dumps(CITY)):
        doc = json.loads(content(chat(srv, max_tokens=40, temperature=1.0, seed=1, guided_json=guided)))
        jsonschema.validate(doc, CITY)
    r = post(srv, "/v1/completions", prompt="x", max_tokens=40, guided_json=CITY)
    jsonschema.validate(json.loads(r.json()["choices"][0]["text"]), CITY)
    refused(chat(srv, max_tokens=4, grammar="root ::= \"a\""), "grammar")
    refused(chat(srv, max_tokens=4, guided_regex="[a-z]+"), "guided_regex")
    refused(chat(srv, max_tokens=4, guided_choice=["a", "b"]), "guided_choice")
    refused(chat(srv, max_tokens=40, guided_json=CITY, response_format=schema_format(CITY)), "guided_json")


def test_min_tokens_holds_back_end_of_turn_and_stop_strings(srv):
    # Biased so that the model ends at once: min_tokens must still get its tokens out of it.
    bias = {str(i): 100 for i in srv.lm.tokenizer.stop_token_ids}
    for path, body in (("/v1/completions", {"prompt": "The cat"}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})):
        r = post(srv, path, max_tokens=20, temperature=0, logit_bias=bias, **body)
        assert r.json()["usage"]["completion_tokens"] == 0, r.text
        r = post(srv, path, max_tokens=20, min_tokens=5, temperature=0, logit_bias=bias, **body)
        assert r.json()["usage"]["completion_tokens"] == 5, r.text
        assert r.json()["choices"][0]["finish_reason"] == "stop"
    # A stop string met before min_tokens does not end the output.
    free = post(srv, "/v1/completions", prompt="The cat", max_tokens=8, temperature=0).json()["choices"][0]["text"]
    stop = free[:1]
    early = post(srv, "/v1/completions", prompt="The cat", max_tokens=8, temperature=0, stop=[stop]).json()
    assert early["choices"][0]["text"] == ""
    late = post(srv, "/v1/completions", prompt="The cat", max_tokens=8, min_tokens=4, temperature=0, stop=[stop]).json()
    assert late["choices"][0]["text"].startswith(stop) and late["usage"]["completion_tokens"] >= 4
    refused(post(srv, "/v1/completions", prompt="x", max_tokens=3, min_tokens=4), "min_tokens")
    refused(chat(srv, max_tokens=40, min_tokens=2, response_format=schema_format(CITY)), "min_tokens")
    # The Python API takes it as a sampling parameter too.
    seqs = srv.lm.generate_sequences([srv.lm.tokenizer.encode("The cat")],
                                     _params(max_tokens=20, min_tokens=6, temperature=0,
                                             logit_bias={i: 100 for i in srv.lm.tokenizer.stop_token_ids}))
    assert len(seqs[0].output_ids) == 6 and seqs[0].finish_reason == "stop"


def _params(**kw):
    from lmforge.engine import SamplingParams

    return SamplingParams(**kw)


def test_final_assistant_message_is_continued_on_request(srv):
    msgs = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "The cat sat"}]
    prefix = "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\nThe cat sat"
    want = post(srv, "/v1/completions", prompt=prefix, max_tokens=8, temperature=0).json()
    r = post(srv, "/v1/chat/completions", messages=msgs, continue_final_message=True, max_tokens=8, temperature=0)
    assert content(r) == want["choices"][0]["text"]
    assert r.json()["usage"]["prompt_tokens"] == want["usage"]["prompt_tokens"]
    # Without it, the assistant message is a closed turn and a new one is answered (OpenAI's meaning).
    closed = prefix + "<|im_end|>\n<|im_start|>assistant\n"
    want = post(srv, "/v1/completions", prompt=closed, max_tokens=8, temperature=0).json()
    r = post(srv, "/v1/chat/completions", messages=msgs, max_tokens=8, temperature=0)
    assert r.json()["usage"]["prompt_tokens"] == want["usage"]["prompt_tokens"]
    refused(post(srv, "/v1/chat/completions", messages=msgs[:1], continue_final_message=True, max_tokens=2),
            "continue_final_message")
    refused(post(srv, "/v1/chat/completions", messages=msgs, continue_final_message=True, add_generation_prompt=True,
                 max_tokens=2), "add_generation_prompt")


def test_deprecated_functions_are_refused_and_bookkeeping_fields_accepted(srv):
    # Tool calling itself is tested in test_tool_calling.py; the functions API it replaced is refused.
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    refused(chat(srv, max_tokens=2, functions=[tool["function"]]), "functions")
    refused(chat(srv, max_tokens=2, function_call="auto"), "function_call")
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "function_call": {"name": "f"}}]
    refused(post(srv, "/v1/chat/completions", messages=msgs, max_tokens=2), "messages.1.function_call")
    ok = chat(srv, max_tokens=2, tools=[], tool_choice="none", user="u", store=False, metadata={"a": "b"},
              service_tier="auto", parallel_tool_calls=False)
    assert ok.status_code == 200, ok.text


# -- an encoder does not generate --------------------------------------------------------------------------
def test_encoder_refuses_every_form_of_generation(tmp_path):
    with RunningServer(make_tiny_bert_dir(tmp_path / "bert", ["hello", "world", "the", "cat"])) as s:
        for body in ({"prompt": "hello world", "echo": True, "logprobs": 1, "max_tokens": 0},
                     {"prompt": "hello world", "echo": True, "logprobs": 1, "max_tokens": 1},
                     {"prompt": "hello world", "max_tokens": 2}):
            assert "encoder" in refused(post(s, "/v1/completions", **body), "model")
        refused(chat(s, max_tokens=2), "model")
        assert post(s, "/v1/embeddings", input="hello").status_code == 200


# -- the docs' parameter table matches the schemas ---------------------------------------------------------
def _request_models() -> list[type[pydantic.BaseModel]]:
    return [m for m in vars(schemas).values() if isinstance(m, type) and issubclass(m, pydantic.BaseModel)
            and m.__module__ == schemas.__name__ and not m.__name__.startswith("_")]


def test_docs_parameter_table_names_every_request_field():
    text = DOCS.read_text("utf-8")
    section = text.split("## Parameters", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    documented = {name for row in rows for name in re.findall(r"`([a-z_.]+)`", row.split("|")[1])}
    leaves = {d.rsplit(".", 1)[-1] for d in documented}  # `messages.content.type` documents ContentPart.type
    fields = {f.alias or name for m in _request_models() for name, f in m.model_fields.items()}
    assert fields - leaves == set(), "fields missing from docs/serving.md"
    assert leaves - fields == set(), "docs/serving.md names parameters the schemas do not have"
    for row in rows:  # every row says what happens to it
        assert re.search(r"\| (supported|400|ignored)\b", row), row
