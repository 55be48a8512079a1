"""Property-based fuzzing of the server (schemathesis + hypothesis) on a tiny-model server.

1. From the server's own /openapi.json: requests that fit the schema and requests that break it, to
   every route.
2. Generation requests that the schema alone rarely produces in a servable form (prompts inside the
   vocabulary, short budgets) with sampling values at and beyond their edges: subnormal and huge floats,
   seeds past 64 bits, extreme logit biases, streams.

No request may get a 5xx or go unanswered, a stream must end with `[DONE]`, and the server must still
serve an ordinary request afterwards. Generation is derandomized, so a failure here is reproducible.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from serve_util import RunningServer
from tiny import make_tiny_llama_dir

pytestmark = pytest.mark.slow

TIMEOUT_S = 30  # per request: a tiny model answers anything valid in well under this
EXAMPLES = {GenerationMode.POSITIVE: 90, GenerationMode.NEGATIVE: 30}  # per POST route
ROUTES = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/tokenize", "/detokenize"]
SETTINGS = {"deadline": None, "derandomize": True, "database": None, "phases": [Phase.generate],
            "suppress_health_check": list(HealthCheck)}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = make_tiny_llama_dir(tmp_path_factory.mktemp("fuzz"), context=64)  # small context: short generations
    with RunningServer(d, max_batch=4, max_queue=16) as srv:
        yield srv


class Prober:
    """Sends requests and records every 5xx, unanswered request and stream cut short."""

    def __init__(self, url: str) -> None:
        self.url, self.session = url, requests.Session()
        self.sent, self.failures, self.hung = 0, [], False
        self.statuses: dict[int, int] = {}

    def send(self, what: str, call: Any) -> None:
        if self.hung:  # a server that stopped answering would make every later request wait out its timeout
            return
        self.sent += 1
        try:
            r = call()
        except requests.Timeout:
            self.hung = True
            self.failures.append(f"no answer in {TIMEOUT_S} s: {what}")
            return
        except requests.ConnectionError as e:
            self.failures.append(f"connection dropped ({e}): {what}")
            return
        self.statuses[r.status_code] = self.statuses.get(r.status_code, 0) + 1
        ctype = r.headers.get("content-type", [])
        ctype = " ".join(ctype) if isinstance(ctype, list) else ctype
        if r.status_code >= 500:
            self.failures.append(f"{r.status_code}: {what} -> {r.text[:300]}")
        elif ("text/event-stream" in ctype and not r.text.rstrip().endswith("data: [DONE]")
              and not getattr(r, "stream_cut_short", False)):  # schemathesis reads 20 events, then hangs up
            self.failures.append(f"stream cut short: {what} -> ...{r.text[-300:]}")

    def case(self, case: Any) -> None:
        self.send(f"{case.method} {case.path} {case.body!r:.400}",
                  lambda: case.call(base_url=self.url, session=self.session, timeout=TIMEOUT_S))

    def post(self, path: str, body: dict[str, Any]) -> None:
        self.send(f"POST {path} {body!r:.400}",
                  lambda: self.session.post(self.url + path, json=body, timeout=TIMEOUT_S))

    def check(self, at_least: int, min_ok: int) -> None:
        assert not self.failures, f"{len(self.failures)} of {self.sent} requests failed:\n" + "\n".join(
            self.failures[:20])
        assert self.sent >= at_least
        assert self.statuses.get(200, 0) >= min_ok, self.statuses  # the routes' work was done, not only refused
        # The server is still whole: an ordinary request is answered.
        r = httpx.post(f"{self.url}/v1/chat/completions", timeout=TIMEOUT_S,
                       json={"messages": [{"role": "user", "content": "hello"}], "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")
        assert httpx.get(f"{self.url}/health", timeout=TIMEOUT_S).json()["status"] == "ok"


def test_schema_fuzzing_never_gets_a_server_error_or_hangs(server) -> None:
    # The description the app generates; that it is what /openapi.json serves is checked at the end.
    schema = schemathesis.openapi.from_dict(server.app.openapi())
    ops = {op.path: op for op in (r.ok() for r in schema.get_all_operations())}
    assert set(ROUTES) <= set(ops), sorted(ops)
    probe = Prober(server.url)
    for path in ROUTES:
        for mode, n in EXAMPLES.items():
            @settings(max_examples=n, **SETTINGS)
            @given(case=ops[path].as_strategy(generation_mode=mode))
            def fuzz(case) -> None:
                probe.case(case)

            fuzz()
    for path in sorted(set(ops) - set(ROUTES)):  # the GET routes: few inputs, a few tries each
        @settings(max_examples=10, **SETTINGS)
        @given(case=ops[path].as_strategy())
        def fuzz_get(case) -> None:
            probe.case(case)

        fuzz_get()
    probe.check(at_least=500, min_ok=50)
    served = httpx.get(f"{server.url}/openapi.json", timeout=TIMEOUT_S)
    assert served.status_code == 200 and served.json() == server.app.openapi()


# -- generation requests with sampling values at their edges ---------------------------------------------
EDGE_FLOATS = st.one_of(
    st.sampled_from([0.0, 5e-324, 1e-300, 1e-40, 1e-8, 0.5, 1.0, 2.0, 10.0, 100.0, 1e300, -1e-300, -1.0]),
    st.floats(allow_nan=False, allow_infinity=False),
)
SEEDS = st.one_of(st.sampled_from([0, -1, 2**31, 2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63) - 1]),
                  st.integers(min_value=-(2**70), max_value=2**70))
SAMPLING = {
    "temperature": EDGE_FLOATS, "top_p": EDGE_FLOATS, "top_k": st.integers(-2, 1000), "min_p": EDGE_FLOATS,
    "repetition_penalty": EDGE_FLOATS, "presence_penalty": EDGE_FLOATS, "frequency_penalty": EDGE_FLOATS,
    "seed": SEEDS, "n": st.integers(1, 4), "stream": st.booleans(), "ignore_eos": st.booleans(),
    "stop": st.one_of(st.text(max_size=3), st.lists(st.text(max_size=3), max_size=3)),
    "logit_bias": st.dictionaries(st.integers(-1, 400).map(str), EDGE_FLOATS, max_size=3),
    "max_tokens": st.integers(0, 70), "min_tokens": st.integers(0, 20),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
}


def _body(required: dict[str, Any], optional: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(required, optional=SAMPLING | optional)


def test_sampling_edge_values_never_get_a_server_error_or_hang(server) -> None:
    vocab = server.lm.config.vocab_size
    text = st.text(max_size=40)
    completion = _body({"prompt": st.one_of(text, st.lists(st.integers(0, vocab - 1), min_size=1, max_size=30))},
                       {"echo": st.booleans(), "logprobs": st.one_of(st.none(), st.integers(0, 5))})
    message = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]), "content": text})
    chat = _body({"messages": st.lists(message, min_size=1, max_size=3)},
                 {"logprobs": st.booleans(), "top_logprobs": st.integers(0, 5),
                  "response_format": st.sampled_from([{"type": "text"}, {"type": "json_object"}])})
    probe = Prober(server.url)

    def fuzz(path: str, bodies: st.SearchStrategy[dict[str, Any]]) -> None:
        @settings(max_examples=100, **SETTINGS)
        @given(body=bodies)
        def run(body: dict[str, Any]) -> None:
            probe.post(path, body)

        run()

    fuzz("/v1/completions", completion)
    fuzz("/v1/chat/completions", chat)
    probe.check(at_least=200, min_ok=40)
