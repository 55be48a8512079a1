"""One request never hurts another: hostile or unlucky requests against `lmforge serve` fail alone, with an
answer that names what was wrong, while every other request goes on."""

from __future__ import annotations

import asyncio
import inspect
import json
import threading

import httpx
import pytest
import torch
from serve_util import RunningServer
from tiny import make_tiny_llama_dir

import lmforge
from lmforge.cli import build_parser, main
from lmforge.engine import Engine, SamplingParams
from lmforge.engine.sampling import SamplerState
from lmforge.errors import LMForgeError
from lmforge.serve import ServerConfig
from lmforge.serve.scheduler import Scheduler
from lmforge.serve.schemas import ChatCompletionRequest, CompletionRequest

TIMEOUT = 30  # per request: a server that stopped answering fails the test instead of hanging it
LONG = {"model": "tiny", "prompt": "The", "max_tokens": 200, "temperature": 1.0, "seed": 3, "ignore_eos": True}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_llama_dir(tmp_path_factory.mktemp("hardening") / "tiny", context=1024)


@pytest.fixture(scope="module")
def srv(tiny_dir, one_thread):
    with RunningServer(tiny_dir, max_batch=2, max_queue=2, max_body_bytes=2**20) as s:
        yield s


def post(srv, path, body, **kw):
    return httpx.post(srv.url + path, json=body, timeout=TIMEOUT, **kw)


def error_of(r, status):
    assert r.status_code == status, r.text
    return r.json()["error"]


def complete(srv, **kw):
    r = post(srv, "/v1/completions", {"model": "tiny", "prompt": "hello", "max_tokens": 4, "temperature": 0} | kw)
    assert r.status_code == 200, r.text
    return r.json()


def sse_events(lines) -> list[str]:
    """The `data:` payloads of a server-sent event stream, in order."""
    return [line[len("data: "):] for line in lines if line.startswith("data: ")]


def assert_healthy(srv):
    r = httpx.get(srv.url + "/health", timeout=TIMEOUT)
    assert r.status_code == 200 and r.json()["status"] == "ok", r.text


# -- 1. an out-of-range seed ----------------------------------------------------------------------------------
def test_out_of_range_seed_is_a_400_naming_seed_and_generation_goes_on(srv):
    for seed in (2**64, 2**63, -(2**63) - 1):
        err = error_of(post(srv, "/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 2,
                                                      "seed": seed}), 400)
        assert err["param"] == "seed", err
    # the largest seed with n=2: each choice gets its own seed, still within range
    r = complete(srv, seed=2**63 - 1, n=2, temperature=1.0)
    assert len(r["choices"]) == 2
    assert complete(srv, seed=-1, temperature=1.0)["choices"][0]["finish_reason"] == "length"
    complete(srv)
    assert_healthy(srv)


def test_the_scheduler_survives_a_failing_request_and_health_reports_a_dead_loop(tiny_dir):
    with RunningServer(tiny_dir, max_batch=2, max_queue=2) as s:
        server = s.app.state.server

        class Broken:  # a decoding constraint whose mask fails: that request fails, the server does not
            def mask(self, logits, remaining):
                raise RuntimeError("broken constraint")

        async def broken_request():
            job = server.scheduler.submit([[1, 2, 3]], [SamplingParams(max_tokens=4)], [Broken()])
            return await asyncio.wait_for(job.events.get(), TIMEOUT)

        assert isinstance(asyncio.run(broken_request()), RuntimeError)
        complete(s)
        assert_healthy(s)

        # A loop that cannot go on (here: an exit raised inside it) is reported by /health, and requests
        # get a 503 at once instead of hanging.
        def exit_step():
            raise SystemExit("injected")

        server.engine.step = exit_step
        err = error_of(post(s, "/v1/completions", {"model": "tiny", "prompt": "hello", "max_tokens": 4}), 503)
        assert "scheduler" in err["message"]
        r = httpx.get(s.url + "/health", timeout=TIMEOUT)
        assert r.status_code == 503 and r.json()["status"] == "error" and "SystemExit" in r.json()["error"]
        error_of(post(s, "/v1/embeddings", {"model": "tiny", "input": "hello"}), 503)


# -- 2. tiny sampling values ----------------------------------------------------------------------------------
TINY_VALUES = [{"repetition_penalty": 1e-300}, {"repetition_penalty": 5e-324}, {"temperature": 1e-40},
               {"top_p": 1e-300}, {"temperature": 2.0, "top_p": 1e-300, "repetition_penalty": 5e-324}]


def test_tiny_sampling_values_are_safe_and_do_not_hurt_a_concurrent_stream(srv, tiny_dir):
    with httpx.stream("POST", srv.url + "/v1/completions", json=LONG | {"stream": True}, timeout=TIMEOUT) as r:
        lines = r.iter_lines()
        first = next(lines)  # the long request is running
        for kw in TINY_VALUES:
            out = complete(srv, **({"temperature": 1.0, "seed": 5} | kw))
            assert out["choices"][0]["finish_reason"] == "length", kw
        events = sse_events([first, *lines])
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert not any("error" in c for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"

    # Below 1e-5 the temperature decodes greedily; the processed logits stay finite for every value.
    lm = lmforge.load(tiny_dir)
    greedy = lm.generate("The cat", max_tokens=8, temperature=0)
    assert lm.generate("The cat", max_tokens=8, temperature=1e-40) == greedy
    logits = torch.randn(lm.config.vocab_size, generator=torch.Generator().manual_seed(0)) * 10
    for kw in TINY_VALUES:
        state = SamplerState(SamplingParams(**kw), list(range(0, 200, 3)), lm.config.vocab_size, torch.device("cpu"))
        processed = state.process(logits)
        assert not processed.isnan().any() and not processed.isposinf().any(), kw
        assert 0 <= state.sample(logits) < lm.config.vocab_size


def test_cli_tiny_temperature_and_huge_seed(tiny_dir, capsys):
    capsys.readouterr()
    args = ["generate", str(tiny_dir), "The cat", "--max-tokens", "6"]
    assert main([*args, "--temperature", "0"]) == 0
    greedy = capsys.readouterr().out
    assert main([*args, "--temperature", "1e-40"]) == 0
    assert capsys.readouterr().out == greedy
    assert main([*args, "--seed", str(2**64)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("lmforge: error: seed") and len(err.strip().splitlines()) == 1, err
    assert main([*args, "--seed", str(2**63 - 1), "--temperature", "1"]) == 0


# -- 3. errors in mid-stream ----------------------------------------------------------------------------------
def test_a_failure_mid_stream_is_an_error_event_then_done_and_fails_that_request_alone(srv, monkeypatch):
    real_sample = SamplerState.sample

    def sample(self, logits, draft=None):  # an internal failure in one request's sampling (seed 666 marks it)
        if self.p.seed == 666:
            raise RuntimeError("sampling exploded")
        return real_sample(self, logits, draft)

    monkeypatch.setattr(SamplerState, "sample", sample)
    with httpx.stream("POST", srv.url + "/v1/completions", json=LONG | {"max_tokens": 30, "stream": True},
                      timeout=TIMEOUT) as good:
        lines = good.iter_lines()
        first = next(lines)
        for path, body in (("/v1/completions", {"prompt": "hi"}),
                           ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})):
            with httpx.stream("POST", srv.url + path, timeout=TIMEOUT,
                              json={"model": "tiny", "max_tokens": 8, "temperature": 1.0, "seed": 666, "stream": True}
                              | body) as bad:
                events = sse_events(bad.iter_lines())
            assert events[-1] == "[DONE]", events
            err = json.loads(events[-2])["error"]
            assert "sampling exploded" in err["message"] and err["type"] == "server_error"
        rest = sse_events([first, *lines])
    assert rest[-1] == "[DONE]" and not any("error" in json.loads(e) for e in rest[:-1])
    assert json.loads(rest[-2])["choices"][0]["finish_reason"] == "length"
    # a non-streaming request with the same failure gets a 500 envelope; the server goes on
    error_of(post(srv, "/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 4, "temperature": 1.0,
                                           "seed": 666}), 500)
    complete(srv)


# -- 4. embeddings and prompt scoring share the limits and the loop fairly -------------------------------------
def test_embeddings_and_echo_scoring_count_against_the_limits(tiny_dir):
    rows = [[(i * 7 + j) % 200 + 5 for j in range(100)] for i in range(256)]
    bodies = [("/v1/embeddings", {"input": rows})] * 8 + \
        [("/v1/completions", {"prompt": rows[0] * 9, "echo": True, "logprobs": 1, "max_tokens": 0})] * 8

    async def burst(url):
        async with httpx.AsyncClient(base_url=url, timeout=TIMEOUT) as c:
            return await asyncio.gather(*(c.post(path, json={"model": "tiny"} | body) for path, body in bodies))

    with RunningServer(tiny_dir, max_batch=1, max_queue=0) as s:  # room for one thing at a time
        answers = asyncio.run(burst(s.url))
        codes = [r.status_code for r in answers]
        assert set(codes) == {200, 429}, codes  # some served, the rest told to come back
        for kind in ("/v1/embeddings", "/v1/completions"):  # both kinds count against the limit
            assert 429 in [r.status_code for (path, _), r in zip(bodies, answers) if path == kind], (kind, codes)
        busy = [r for r in answers if r.status_code == 429]
        assert all(int(r.headers["Retry-After"]) >= 1 and r.json()["error"]["code"] == "queue_full" for r in busy)
        health = httpx.get(s.url + "/health", timeout=TIMEOUT).json()
        assert (health["running"], health["waiting"]) == (0, 0)
        assert post(s, "/v1/embeddings", {"model": "tiny", "input": "hello"}).status_code == 200


def test_scheduler_tasks_run_in_chunks_between_engine_steps(tiny_dir):
    lm = lmforge.load(tiny_dir)
    engine = Engine(lm.model, lm.tokenizer, max_batch=2)
    sched = Scheduler(engine, max_queue=2)

    async def run():
        job = sched.submit([[1, 2, 3]], [SamplingParams(max_tokens=100, temperature=0, ignore_eos=True)])
        await asyncio.wait_for(job.events.get(), TIMEOUT)  # decoding
        progress, load = [], []

        def work():  # runs on the scheduler thread, one chunk per loop turn
            for _ in range(5):
                progress.append(len(job.seqs[0].output_ids))
                load.append((sched.running, sched.waiting))
                yield
            return "scored"

        result = await asyncio.wait_for(sched.call(work), TIMEOUT)
        sched.cancel(job)
        return result, progress, load

    try:
        result, progress, load = asyncio.run(run())
    finally:
        sched.close()
    assert result == "scored"
    assert all(b > a for a, b in zip(progress, progress[1:])), progress  # the sequence decoded between chunks
    assert load == [(2, 0)] * 5  # the task counts as running, with the sequence


def test_long_echo_scoring_runs_in_chunks_and_is_exact(srv):
    ids = [(7 * i) % 200 + 5 for i in range(700)]  # more positions than one chunk scores
    scoring = srv.app.state.server.prompt_logprobs(ids, 1)  # what the scheduler runs, one chunk per turn
    assert inspect.isgenerator(scoring)
    chunks = 0
    with pytest.raises(StopIteration) as done:
        while True:
            next(scoring)
            chunks += 1
    assert chunks >= 3 and len(done.value.value) == len(ids)
    r = post(srv, "/v1/completions", {"model": "tiny", "prompt": ids, "echo": True, "logprobs": 1, "max_tokens": 0})
    assert r.status_code == 200, r.text
    got = r.json()["choices"][0]["logprobs"]["token_logprobs"]
    with torch.inference_mode():
        ref = torch.log_softmax(srv.lm.model(torch.tensor([ids])).float(), -1)[0]
    want = torch.tensor([float(ref[i - 1, ids[i]]) for i in range(1, len(ids))])
    assert got[0] is None
    torch.testing.assert_close(torch.tensor(got[1:len(ids)]), want, rtol=1e-4, atol=1e-4)


# -- 5. CPU work off the event loop; oversized text refused before tokenizing -----------------------------------
def test_tokenizing_runs_off_the_event_loop_and_oversized_prompts_are_refused_unread(srv, monkeypatch):
    tok = srv.app.state.server.tok
    calls: list[threading.Thread] = []
    real_encode = tok.encode

    def encode(*args, **kwargs):  # records the thread, then tokenizes for real
        calls.append(threading.current_thread())
        return real_encode(*args, **kwargs)

    monkeypatch.setattr(tok, "encode", encode)
    complete(srv)
    r = post(srv, "/v1/chat/completions", {"model": "tiny", "max_tokens": 2,
                                           "messages": [{"role": "user", "content": "hello"}]})
    assert r.status_code == 200, r.text
    assert post(srv, "/v1/embeddings", {"model": "tiny", "input": "hello"}).status_code == 200
    assert post(srv, "/tokenize", {"prompt": "hello"}).status_code == 200
    assert len(calls) >= 4
    assert all(t is not srv.thread for t in calls), "the event loop's thread tokenized"

    calls.clear()
    huge = "word " * 20_000  # 100 kB: more than 64 bytes per token of the 1,024-token window
    err = error_of(post(srv, "/v1/completions", {"model": "tiny", "prompt": huge, "max_tokens": 1}), 400)
    assert err["param"] == "prompt" and "bytes" in err["message"]
    err = error_of(post(srv, "/v1/chat/completions", {"model": "tiny",
                                                      "messages": [{"role": "user", "content": huge}]}), 400)
    assert err["param"] == "messages"
    error_of(post(srv, "/v1/embeddings", {"model": "tiny", "input": ["hello", huge]}), 400)
    assert calls == []  # refused by size alone
    assert_healthy(srv)


# -- 6. status codes and the field named ----------------------------------------------------------------------
def test_status_codes_and_param_names(srv):
    # more choices than the server can ever hold at once (2 running + 2 waiting): not retryable
    err = error_of(post(srv, "/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 2, "n": 5}), 400)
    assert err["param"] == "n"
    err = error_of(httpx.post(srv.url + "/v1/chat/completions", content=b'{"model": "tiny", "messages": [}',
                              headers={"Content-Type": "application/json"}, timeout=TIMEOUT), 400)
    assert err["param"] is None
    err = error_of(post(srv, "/v1/chat/completions", {"model": "tiny", "max_tokens": 1,
                                                      "messages": [{"role": "user", "content": "hello " * 1100}]}), 400)
    assert err["param"] == "messages" and err["code"] == "context_length_exceeded"
    err = error_of(post(srv, "/v1/completions", {"model": "tiny", "prompt": "hi", "logit_bias": {"5": 200}}), 400)
    assert err["param"] == "logit_bias"


# -- 7. an empty API key ---------------------------------------------------------------------------------------
def test_an_empty_api_key_is_refused(capsys, monkeypatch):
    monkeypatch.delenv("LMFORGE_API_KEYS", raising=False)
    for argv, env in ((["--api-key", ""], None), (["--api-key", "sk-a", "--api-key", " "], None),
                      ([], "sk-a,,sk-b"), ([], "")):
        if env is not None:
            monkeypatch.setenv("LMFORGE_API_KEYS", env)
        capsys.readouterr()
        assert main(["serve", "no-such-model", *argv]) == 1
        err = capsys.readouterr().err
        assert err.startswith("lmforge: error: ") and "API key must not be empty" in err, err
        assert len(err.strip().splitlines()) == 1
    with pytest.raises(LMForgeError, match="must not be empty"):
        ServerConfig(model_name="tiny", api_keys=[""])


# -- one default temperature -----------------------------------------------------------------------------------
def test_one_default_temperature_for_server_cli_and_api(srv):
    from lmforge.engine.sampling import DEFAULT_TEMPERATURE

    assert SamplingParams().temperature == DEFAULT_TEMPERATURE
    assert build_parser().parse_args(["generate", "m", "p"]).temperature == DEFAULT_TEMPERATURE
    server = srv.app.state.server
    assert server.sampling(CompletionRequest(prompt="x"), 4, False, 0, 0).temperature == DEFAULT_TEMPERATURE
    chat = ChatCompletionRequest(messages=[{"role": "user", "content": "x"}])
    assert server.sampling(chat, 4, False, 0, 0).temperature == DEFAULT_TEMPERATURE
