"""The server's stream interval (`--stream-interval-ms`): text decoded within one interval goes out in one
chunk, with its log-probs, and the stream's content is the same as with a chunk every step."""

from __future__ import annotations

import json

import httpx
import pytest
from serve_util import RunningServer
from tiny import make_tiny_llama_dir

import lmforge

BODY = {"model": "tiny", "prompt": "the cat sat on", "max_tokens": 40, "temperature": 0, "stream": True,
        "logprobs": 2, "ignore_eos": True}


def stream(srv: RunningServer) -> list[dict]:
    with httpx.stream("POST", f"{srv.url}/v1/completions", json=BODY, timeout=60) as r:
        assert r.status_code == 200
        return [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]


@pytest.fixture(scope="module")
def lm(tmp_path_factory, one_thread):
    return lmforge.load(make_tiny_llama_dir(tmp_path_factory.mktemp("interval") / "tiny", context=256))


def test_chunks_merge_within_the_interval_and_carry_the_same_text_and_logprobs(lm) -> None:
    with RunningServer(lm, stream_interval=0) as srv:
        each = stream(srv)
    with RunningServer(lm, stream_interval=60.0) as srv:  # longer than the whole request
        merged = stream(srv)
    per_step = [c for c in each if c["choices"]]
    assert len(per_step) == 41  # a chunk every step (one token each), then the one with the finish reason

    def content(chunks: list[dict]) -> tuple[str, list, str | None]:
        choices = [c["choices"][0] for c in chunks if c["choices"]]
        lps = [t for ch in choices for t in (ch.get("logprobs") or {}).get("tokens", [])]
        return "".join(ch["text"] for ch in choices), lps, choices[-1]["finish_reason"]

    assert content(merged) == content(each)
    assert content(each)[2] == "length" and len(content(each)[1]) == 40
    # The first token goes out at once (time to first token is not delayed), the other 39 together when the
    # choice ends, then the finish reason.
    assert [len((c["choices"][0]["logprobs"] or {}).get("tokens", [])) for c in merged if c["choices"]] == [1, 39, 0]


def test_stream_interval_flag_is_checked() -> None:
    import subprocess
    import sys

    bad = subprocess.run([sys.executable, "-m", "lmforge", "serve", "x.gguf", "--stream-interval-ms", "-5"],
                         capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stderr.strip() == "lmforge: error: --stream-interval-ms must be 0 or more, got -5.0"
