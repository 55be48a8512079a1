"""`lmforge serve`: the OpenAI-compatible API, exercised with the official openai client over loopback."""

from __future__ import annotations

import asyncio
import base64
import json
import math
import re
import time

import httpx
import jsonschema
import numpy as np
import openai
import pytest
import torch
from numerics import assert_close_scaled
from serve_util import RunningServer, serve_process
from tiny import make_tiny_bert_dir, make_tiny_llama_dir

from lmforge.cli import main

KEY = "sk-test-key"
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0},
        "mood": {"enum": ["happy", "sad"]},
        "tags": {"type": "array", "items": {"type": "string"}},
        "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "integer"}},
                    "required": ["city", "zip"]},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "mood", "tags", "address", "active"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_llama_dir(tmp_path_factory.mktemp("serve") / "tiny", context=1024)


@pytest.fixture(scope="module")
def srv(tiny_dir, one_thread):
    with RunningServer(tiny_dir, api_keys=[KEY, "sk-other"], max_batch=16, max_queue=32,
                       max_body_bytes=64 * 1024, max_messages=50) as s:
        yield s


@pytest.fixture(scope="module")
def client(srv):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def chat(client, content, **kw):
    kw = {"model": "tiny", "max_tokens": 24, "temperature": 0} | kw
    return client.chat.completions.create(messages=[{"role": "user", "content": content}], **kw)


def metric(srv, name):
    text = httpx.get(srv.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else None


# -- the happy paths ------------------------------------------------------------------------------------
def test_health_is_open_and_models_lists_the_model(srv, client):
    r = httpx.get(srv.url + "/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"


def test_chat_non_streaming_and_streaming_agree(srv, client):
    full = chat(client, "hello there")
    choice = full.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    n_prompt = httpx.post(srv.url + "/tokenize", headers={"Authorization": f"Bearer {KEY}"},
                          json={"messages": [{"role": "user", "content": "hello there"}]}).json()["count"]
    assert full.usage.prompt_tokens == n_prompt
    assert full.usage.total_tokens == n_prompt + full.usage.completion_tokens

    chunks = list(chat(client, "hello there", stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    with_choices = [c for c in chunks if c.choices]
    assert with_choices[-1].choices[0].finish_reason == choice.finish_reason
    assert all(c.choices[0].finish_reason is None for c in with_choices[:-1])
    assert "".join(c.choices[0].delta.content or "" for c in with_choices) == choice.message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_raw_sse_ends_with_done(srv):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "stream": True}
    with httpx.stream("POST", srv.url + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["choices"][0]["delta"]["role"] == "assistant"


def test_completions_non_streaming_and_streaming(client):
    full = client.completions.create(model="tiny", prompt="The cat sat", max_tokens=12, temperature=0)
    assert full.object == "text_completion" and full.choices[0].text
    parts = list(client.completions.create(model="tiny", prompt="The cat sat", max_tokens=12, temperature=0,
                                           stream=True))
    assert "".join(p.choices[0].text for p in parts if p.choices) == full.choices[0].text
    assert parts[-1].choices[0].finish_reason == full.choices[0].finish_reason
    # token-id prompts and several prompts in one request
    multi = client.completions.create(model="tiny", prompt=["The cat sat", "Hello world"], max_tokens=12,
                                      temperature=0)
    assert [c.index for c in multi.choices] == [0, 1] and multi.choices[0].text == full.choices[0].text


def test_n_choices(client):
    r = chat(client, "tell me", n=3, temperature=1.0, seed=5)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert len({c.message.content for c in r.choices}) > 1  # distinct samples, not one copied
    chunks = list(chat(client, "tell me", n=2, temperature=1.0, seed=5, stream=True))
    texts = ["", ""]
    for c in chunks:
        for ch in c.choices:
            texts[ch.index] += ch.delta.content or ""
    assert texts == [r.choices[0].message.content, r.choices[1].message.content]


def test_stop_strings(client):
    base = client.completions.create(model="tiny", prompt="We generate", max_tokens=40, temperature=0).choices[0].text
    assert len(base) > 8
    stop = base[5:8]
    cut = base.index(stop)
    r = client.completions.create(model="tiny", prompt="We generate", max_tokens=40, temperature=0, stop=[stop, "zzz"])
    assert r.choices[0].text == base[:cut] and r.choices[0].finish_reason == "stop"
    parts = list(client.completions.create(model="tiny", prompt="We generate", max_tokens=40, temperature=0,
                                           stop=stop, stream=True))
    assert "".join(p.choices[0].text for p in parts if p.choices) == base[:cut]


def test_seed_reproducibility(client):
    a = chat(client, "a story", temperature=1.0, seed=1234).choices[0].message.content
    b = chat(client, "a story", temperature=1.0, seed=1234).choices[0].message.content
    others = {chat(client, "a story", temperature=1.0, seed=s).choices[0].message.content for s in (1, 2, 3)}
    assert a == b
    assert others - {a}


def test_chat_logprobs(client):
    r = chat(client, "hello", logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for t in content:
        assert t.logprob <= 0 and len(t.top_logprobs) == 3
        assert t.top_logprobs[0].logprob == pytest.approx(t.logprob)  # greedy takes the best token
        assert t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob >= t.top_logprobs[2].logprob
    assert chat(client, "hello").choices[0].logprobs is None


def test_completion_echo_with_prompt_logprobs(srv, client):
    prompt = "The quick brown fox"
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=4, temperature=0, logprobs=2, echo=True)
    c = r.choices[0]
    lp = c.logprobs
    assert c.text.startswith(prompt)
    assert len(lp.tokens) == r.usage.prompt_tokens + r.usage.completion_tokens
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert "".join(lp.tokens[: r.usage.prompt_tokens]) == prompt
    assert lp.text_offset[: 3] == [0, len(lp.tokens[0]), len(lp.tokens[0]) + len(lp.tokens[1])]
    # the prompt logprobs are the model's own, token by token
    ids = srv.lm.tokenizer.encode(prompt)
    with torch.inference_mode():
        ref = torch.log_softmax(srv.lm.model(torch.tensor([ids])).float(), -1)[0]
    want = [float(ref[i - 1, ids[i]]) for i in range(1, len(ids))]
    assert_close_scaled(lp.token_logprobs[1: len(ids)], want, 1e-5, scale=ref.abs().max().item())
    # max_tokens 0 scores the prompt only (what lm-eval's loglikelihood requests need)
    r0 = client.completions.create(model="tiny", prompt=prompt, max_tokens=0, logprobs=1, echo=True)
    assert r0.choices[0].text == prompt and r0.usage.completion_tokens == 0
    assert_close_scaled(r0.choices[0].logprobs.token_logprobs[1:], want, 1e-5, scale=ref.abs().max().item())


def test_json_schema_output_validates(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    r = chat(client, "Describe a person as JSON", max_tokens=200, temperature=1.0, seed=7, n=3,
             response_format=fmt)
    for c in r.choices:
        jsonschema.validate(json.loads(c.message.content), PERSON)
    # a tight budget still closes the document
    tight = chat(client, "Describe a person as JSON", max_tokens=100, temperature=1.0, seed=3, response_format=fmt)
    jsonschema.validate(json.loads(tight.choices[0].message.content), PERSON)
    assert tight.choices[0].finish_reason == "stop" and tight.usage.completion_tokens < 100
    parts = list(chat(client, "JSON please", max_tokens=150, temperature=0, stream=True, response_format=fmt))
    jsonschema.validate(json.loads("".join(p.choices[0].delta.content or "" for p in parts if p.choices)), PERSON)


def test_json_object_mode(client):
    r = chat(client, "any JSON", max_tokens=60, temperature=1.0, seed=11, response_format={"type": "json_object"})
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    r = client.completions.create(model="tiny", prompt="{", max_tokens=40, temperature=0,
                                  extra_body={"response_format": {"type": "json_object"}})
    assert isinstance(json.loads(r.choices[0].text), dict)


def test_embeddings(srv, client):
    r = client.embeddings.create(model="tiny", input=["hello world", "the cat sat", "hello world"])
    vecs = [np.array(d.embedding) for d in r.data]
    assert [d.index for d in r.data] == [0, 1, 2]
    assert len(vecs[0]) == srv.lm.config.dim
    assert all(abs(np.linalg.norm(v) - 1) < 1e-5 for v in vecs)
    assert np.allclose(vecs[0], vecs[2]) and not np.allclose(vecs[0], vecs[1])
    ids = srv.lm.tokenizer.encode("hello world")
    with torch.inference_mode():
        ref = torch.nn.functional.normalize(srv.lm.model(torch.tensor([ids]), return_hidden=True)[0].mean(0), dim=-1)
    assert np.allclose(vecs[0], ref.numpy(), atol=1e-5)
    assert r.usage.prompt_tokens == 2 * len(ids) + len(srv.lm.tokenizer.encode("the cat sat"))
    raw = httpx.post(srv.url + "/v1/embeddings", headers={"Authorization": f"Bearer {KEY}"},
                     json={"model": "tiny", "input": "hello world", "encoding_format": "base64"}).json()
    decoded = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
    assert np.allclose(decoded, vecs[0], atol=1e-6)


def test_tokenize_detokenize(srv):
    h = {"Authorization": f"Bearer {KEY}"}
    t = httpx.post(srv.url + "/tokenize", headers=h, json={"prompt": "The cat sat on the mat."}).json()
    assert t["count"] == len(t["tokens"]) > 0 and t["max_model_len"] == 1024
    assert httpx.post(srv.url + "/detokenize", headers=h, json={"tokens": t["tokens"]}).json()["prompt"] == \
        "The cat sat on the mat."


def test_extra_fields_are_ignored(client):
    r = chat(client, "hi", max_tokens=3, extra_body={"not_a_real_option": 1, "top_k": 5, "min_p": 0.1,
                                                     "repetition_penalty": 1.2})
    assert r.choices[0].message.content is not None


# -- errors ---------------------------------------------------------------------------------------------
def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


def test_401_missing_or_wrong_key(srv):
    with pytest.raises(openai.AuthenticationError):
        chat(openai.OpenAI(base_url=srv.url + "/v1", api_key="sk-wrong", max_retries=0), "hi")
    _error(httpx.get(srv.url + "/v1/models"), 401)
    assert httpx.get(srv.url + "/v1/models", headers={"Authorization": "Bearer sk-other"}).status_code == 200
    assert httpx.get(srv.url + "/health").status_code == 200


def test_404_unknown_model_and_route(srv, client):
    with pytest.raises(openai.NotFoundError) as e:
        chat(client, "hi", model="gpt-9")
    assert "gpt-9" in str(e.value)
    _error(httpx.get(srv.url + "/v2/nothing", headers={"Authorization": f"Bearer {KEY}"}), 404)


def test_400_invalid_parameters(srv, client):
    h = {"Authorization": f"Bearer {KEY}"}
    with pytest.raises(openai.BadRequestError):
        chat(client, "hi", temperature=5)
    # validation errors are 400 in the OpenAI envelope, not FastAPI's 422
    err = _error(httpx.post(srv.url + "/v1/chat/completions", headers=h, json={"model": "tiny"}), 400)
    assert err["param"] == "messages"
    _error(httpx.post(srv.url + "/v1/chat/completions", headers=h, content=b"{not json"), 400)
    err = _error(httpx.post(srv.url + "/v1/completions", headers=h,
                            json={"model": "tiny", "prompt": "hi", "logit_bias": {"99999": 1}}), 400)
    assert "99999" in err["message"]
    msgs = [{"role": "user", "content": "x"}] * 51
    err = _error(httpx.post(srv.url + "/v1/chat/completions", headers=h, json={"model": "tiny", "messages": msgs}),
                 400)
    assert "51" in err["message"]
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}
    _error(httpx.post(srv.url + "/v1/chat/completions", headers=h,
                      json={"model": "tiny", "messages": msgs[:1], "response_format": fmt}), 400)


def test_400_context_overflow_states_both_counts(client):
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, "hi", max_tokens=5000)
    msg = str(e.value)
    assert "1024" in msg and "5000" in msg
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt=[5] * 1100, max_tokens=1)
    assert "1100" in str(e.value) and "1024" in str(e.value)


def test_413_oversized_body(srv):
    r = httpx.post(srv.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                   json={"model": "tiny", "prompt": "x" * 100_000})
    _error(r, 413)

    def chunks():  # no Content-Length: the limit holds for a chunked body too
        for _ in range(20):
            yield b"x" * 10_000

    _error(httpx.post(srv.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, content=chunks()), 413)


def test_429_when_queue_full_and_disconnect_frees_the_slot(tiny_dir, one_thread):
    with RunningServer(tiny_dir, max_batch=1, max_queue=1) as s:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0)
        long = {"model": "tiny", "prompt": "The", "max_tokens": 1000, "temperature": 0, "extra_body": {"ignore_eos": True}}
        first = c.completions.create(stream=True, **long)
        next(iter(first))  # running
        second = c.completions.create(stream=True, **long)  # waits for the slot
        with pytest.raises(openai.RateLimitError):
            c.completions.create(**long)
        first.close()
        second.close()
        deadline = time.monotonic() + 5
        while (metric(s, "lmforge_running_sequences"), metric(s, "lmforge_queue_depth")) != (0, 0):
            assert time.monotonic() < deadline, "cancelled sequences kept their slots"
            time.sleep(0.05)
        generated = metric(s, "lmforge_generation_tokens_total")
        assert 0 < generated < 1000  # the first was stopped early, the second barely started
        r = c.completions.create(model="tiny", prompt="The", max_tokens=3, temperature=0)
        assert r.choices[0].text is not None

        # a non-streaming request whose client goes away is cancelled too
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(s.url + "/v1/completions", json={**{k: v for k, v in long.items() if k != "extra_body"},
                                                        "ignore_eos": True}, timeout=0.3)
        deadline = time.monotonic() + 5
        while metric(s, "lmforge_running_sequences") != 0:
            assert time.monotonic() < deadline, "an abandoned request kept its slot"
            time.sleep(0.05)


def test_metrics(srv, client):
    chat(client, "count me", max_tokens=4)
    text = httpx.get(srv.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    assert re.search(r'lmforge_requests_total\{endpoint="/v1/chat/completions",status="200"\} [1-9]', text)
    for name in ("lmforge_prompt_tokens_total", "lmforge_generation_tokens_total",
                 "lmforge_time_to_first_token_seconds_count", "lmforge_inter_token_latency_seconds_count"):
        assert metric(srv, name) > 0, name
    assert metric(srv, "lmforge_queue_depth") == 0
    assert '# TYPE lmforge_time_to_first_token_seconds histogram' in text


def test_index_page(srv):
    r = httpx.get(srv.url + "/")
    assert r.status_code == 200 and "<textarea id=\"system\"" in r.text
    assert "http://" not in r.text and "https://" not in r.text.replace("(https?:", "")  # nothing fetched remotely


# -- continuous batching ---------------------------------------------------------------------------------
def test_16_concurrent_streams_match_serving_alone(srv):
    prompts = [f"{w} number {i}" for i, w in enumerate(["hello", "the cat", "we", "language", "stop", "quick",
                                                          "fox", "mat"] * 2)]
    aclient = openai.AsyncOpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0, timeout=120)

    async def one(p: str) -> str:
        stream = await aclient.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": p}], max_tokens=40, temperature=0, stream=True)
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    async def run() -> tuple[list[str], list[str]]:
        alone = [await one(p) for p in prompts]
        together = await asyncio.gather(*(one(p) for p in prompts))
        return alone, list(together)

    alone, together = asyncio.run(run())
    assert len(set(alone)) > 8  # the prompts really lead to different answers
    assert together == alone


def test_cli_serve_rejects_bad_flags(capsys):
    assert main(["serve", "whatever", "--max-batch", "0"]) == 1
    assert "lmforge: error: --max-batch" in capsys.readouterr().err


# -- the real model, through the real command ---------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_through_lmforge_serve(smollm2_path, tmp_path):
    env = {"LMFORGE_HOME": str(smollm2_path.parent.parent.parent)}
    with serve_process(smollm2_path, "--api-key", "k1", "--max-batch", "4", log=tmp_path / "serve.log",
                       env=env) as (_, url):
        c = openai.OpenAI(base_url=url + "/v1", api_key="k1", max_retries=0, timeout=120)
        name = smollm2_path.name
        r = c.chat.completions.create(model=name, messages=[{"role": "user", "content": "What is the capital of France?"}],
                                      max_tokens=30, temperature=0)
        assert "Paris" in r.choices[0].message.content
        schema = {"type": "object", "properties": {"city": {"type": "string"}, "country": {"type": "string"},
                                                   "population": {"type": "integer"}},
                  "required": ["city", "country", "population"]}
        r = c.chat.completions.create(
            model=name, messages=[{"role": "user", "content": "Give the capital of France as JSON."}],
            max_tokens=80, temperature=0,
            response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema}})
        doc = json.loads(r.choices[0].message.content)
        jsonschema.validate(doc, schema)
        assert math.isfinite(doc["population"])


def test_encoder_model_serves_embeddings_and_refuses_chat(tmp_path):
    """An encoder behind /v1/embeddings gives LM.embed's vectors; generation routes answer 400."""

    path = make_tiny_bert_dir(tmp_path / "bert", ["hello", "world", "the", "cat", "sat"])
    with RunningServer(path) as s:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0)
        texts = ["hello world", "the cat sat"]
        got = np.array([d.embedding for d in c.embeddings.create(model="tiny", input=texts).data])
        ref = s.lm.embed(texts)
        ref = ref / np.linalg.norm(ref, axis=-1, keepdims=True)
        assert np.allclose(got, ref, atol=1e-5)
        with pytest.raises(openai.BadRequestError):
            c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
