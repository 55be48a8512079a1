"""The KV cache is sized by a memory budget (`--kv-memory`), not by slots x the full context: it never grows
past the budget, requests that never fit get a 400, and outputs are those of an unbounded cache. Admission
is optimistic (current lengths plus headroom, not full spans), so requests without a max_tokens limit run
together; sequences that outgrow the budget are preempted and resumed by recomputation, with outputs,
random streams and streamed text unchanged. The last test measures a real server's resident memory."""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from serve_util import RunningServer, free_port, serve_process
from tiny import make_tiny_llama_dir

import lmforge
from lmforge.cli import main
from lmforge.engine import Engine, SamplingParams, Sequence

CONTEXT = 64
GREEDY = dict(temperature=0.0, ignore_eos=True)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama_dir(tmp_path_factory.mktemp("tiny"), context=CONTEXT)


@pytest.fixture(scope="module")
def lm(model_dir: Path) -> lmforge.LM:
    return lmforge.load(model_dir, device="cpu")


def _token_bytes(lm: lmforge.LM) -> int:
    cfg = lm.config  # keys and values, every layer, fp32
    return 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * 4


def _prompts(lm: lmforge.LM) -> list[list[int]]:
    texts = ["The cat", "Hello world! This is a prompt", "We generate text, and stop", "The quick brown fox",
             "Language models predict", "The cat sat on the mat"]
    return [lm.tokenizer.encode(t) for t in texts]


def _solo(lm: lmforge.LM, prompt: list[int], max_tokens: int) -> Sequence:
    params = SamplingParams(max_tokens=max_tokens, **GREEDY)
    return Engine(lm.model, lm.tokenizer, max_batch=1).generate([prompt], params)[0]


def _run(eng: Engine, seqs: list[Sequence], deltas: dict[int, list[str]] | None = None) -> tuple[int, bool]:
    """Step until `seqs` finish, checking the budget every step; returns (most running at once, whether a
    sequence ever waited while a slot was free). Collects each sequence's text deltas into `deltas`."""
    most, waited = 0, False
    while not all(s.done for s in seqs):
        for s, delta in eng.step():
            if deltas is not None:
                deltas.setdefault(s.id, []).append(delta)
        assert eng.cache is not None and eng.cache.nbytes <= eng.kv_memory
        assert eng.cache.rows * eng.cache.max_len <= eng.kv_tokens
        most = max(most, len(eng.running))
        waited |= bool(eng.waiting) and len(eng.running) < eng.max_batch
    return most, waited


def _solo_run(lm: lmforge.LM, prompt: list[int], params: SamplingParams) -> Sequence:
    return Engine(lm.model, lm.tokenizer, max_batch=1).generate([prompt], params)[0]


def _assert_same(seqs: list[Sequence], ref: list[Sequence]) -> None:
    """Same tokens, text and finish reasons; logprobs equal to fp32 rounding (recomputed keys may round
    differently from the ones decoded step by step)."""
    assert [s.output_ids for s in seqs] == [r.output_ids for r in ref]
    assert [s.text for s in seqs] == [r.text for r in ref]
    assert [s.finish_reason for s in seqs] == [r.finish_reason for r in ref]
    for s, r in zip(seqs, ref):
        assert [lp.token_id for lp in s.logprobs] == [lp.token_id for lp in r.logprobs]
        torch.testing.assert_close(torch.tensor([lp.logprob for lp in s.logprobs]),
                                   torch.tensor([lp.logprob for lp in r.logprobs]), rtol=1e-4, atol=1e-4)


# -- the engine ------------------------------------------------------------------------------------------
def test_default_budget_holds_one_full_context_sequence(lm: lmforge.LM) -> None:
    eng = Engine(lm.model, lm.tokenizer, max_batch=1)
    assert eng.context == CONTEXT and eng.kv_tokens >= CONTEXT
    assert eng.kv_token_bytes == _token_bytes(lm)
    # A full-context sequence runs to its end, as before.
    prompt = (lm.tokenizer.encode("The cat sat on the mat. ") * 10)[: CONTEXT - 10]
    seq = eng.generate([prompt], SamplingParams(max_tokens=100, **GREEDY))[0]
    assert len(seq.output_ids) == 10 and seq.finish_reason == "length"


def test_sequences_are_admitted_optimistically_and_outputs_are_unchanged(lm: lmforge.LM) -> None:
    prompts = [(p * 10)[:10] for p in _prompts(lm)]  # each sequence spans 22 tokens
    params = SamplingParams(max_tokens=12, **GREEDY)
    unbounded = Engine(lm.model, lm.tokenizer, max_batch=4)
    ref = unbounded.generate(prompts, params)
    assert len({tuple(s.output_ids) for s in ref}) == len(prompts), "degenerate model: a weak comparison"
    # 50 tokens hold two of these sequences at full length, three at their start: three start together,
    # one is preempted as they grow, and the others wait for room.
    eng = Engine(lm.model, lm.tokenizer, max_batch=4, kv_memory=50 * _token_bytes(lm))
    assert eng.kv_tokens == 50
    seqs = [eng.add(p, params) for p in prompts]
    most, waited = _run(eng, seqs)
    assert most == 3 and waited and eng.preemptions >= 1
    assert eng.kv_info["preemptions"] == eng.preemptions
    _assert_same(seqs, ref)
    assert [s.finish_reason for s in seqs] == ["length"] * len(prompts)


def test_requests_without_max_tokens_run_together(lm: lmforge.LM) -> None:
    """Four requests whose max_tokens is the rest of the context, in a budget for two at that length: all
    four start at once (a full-span reservation would run two), and preemption keeps them within the
    budget with every output, greedy or seeded, what each would give alone."""
    prompts = _prompts(lm)[:4]
    budget = 2 * CONTEXT * _token_bytes(lm)
    for params in [SamplingParams(max_tokens=10_000, **GREEDY),
                   SamplingParams(max_tokens=10_000, temperature=0.9, top_p=0.95, seed=7, ignore_eos=True)]:
        ref = [_solo_run(lm, p, params) for p in prompts]
        assert all(len(p) + len(r.output_ids) == CONTEXT for p, r in zip(prompts, ref))
        eng = Engine(lm.model, lm.tokenizer, max_batch=4, kv_memory=budget)
        seqs = [eng.add(p, params) for p in prompts]
        most, _ = _run(eng, seqs)
        assert most == 4 and eng.preemptions >= 1
        _assert_same(seqs, ref)


def test_preempted_sequences_resume_by_recomputation(lm: lmforge.LM) -> None:
    """A budget of 100 tokens for six long generations: sequences are preempted, their keys dropped with
    their slots, and recomputed on readmission. Greedy and seeded sampling (with a repetition penalty,
    whose state must survive) give what each request gives alone; the streamed deltas add up to the text
    exactly, with nothing repeated or lost; the oldest is never preempted."""
    prompts = _prompts(lm)
    for params in [SamplingParams(max_tokens=40, logprobs=True, top_logprobs=2, **GREEDY),
                   SamplingParams(max_tokens=40, temperature=0.8, seed=3, repetition_penalty=1.3,
                                  logprobs=True, ignore_eos=True)]:
        ref = [_solo_run(lm, p, params) for p in prompts]
        eng = Engine(lm.model, lm.tokenizer, max_batch=4, kv_memory=100 * _token_bytes(lm))
        seqs = [eng.add(p, params) for p in prompts]
        deltas: dict[int, list[str]] = {}
        dropped = set()  # preempted sequences whose keys no slot holds any more
        while not all(s.done for s in seqs):
            for s, delta in eng.step():
                deltas.setdefault(s.id, []).append(delta)
            assert eng.cache is not None and eng.cache.nbytes <= eng.kv_memory
            assert all(w is not seqs[0] for w in eng.waiting) or not seqs[0].output_ids, "oldest preempted"
            held = {id(h) for h in eng.holder.values()}
            dropped |= {s.id for s in eng.waiting if s.output_ids and id(s) not in held}
        assert dropped and eng.preemptions >= len(dropped)
        _assert_same(seqs, ref)
        for s in seqs:
            assert "".join(deltas[s.id]) == s.text and s.text


def test_cache_reshaped_under_running_sequences_keeps_their_keys(lm: lmforge.LM) -> None:
    """A long sequence arrives while a short one runs in the last slot: the cache becomes fewer, longer
    rows, the running sequence moves to a lower slot, and a finished prompt's keys stay for prefix reuse."""
    enc = lm.tokenizer.encode
    eng = Engine(lm.model, lm.tokenizer, max_batch=4, kv_memory=128 * _token_bytes(lm))
    prompts = _prompts(lm)[:4]
    short = [eng.add(p, SamplingParams(max_tokens=m, **GREEDY)) for p, m in zip(prompts, [2, 2, 2, 16])]
    while not all(s.done for s in short[:3]):
        eng.step()
    assert eng.cache is not None and eng.cache.rows == 4
    assert not short[3].done and short[3].slot == 3
    # Extends the first prompt, so what its finished sequence left in the cache can be reused.
    long_prompt = (prompts[0] + enc(" sat on the mat, then the cat ate the fish. The quick brown fox") * 3)[:40]
    before = eng.reused_tokens
    long = eng.add(long_prompt, SamplingParams(max_tokens=20, **GREEDY))
    most, _ = _run(eng, [short[3], long])
    assert eng.cache.rows == 2 and eng.cache.max_len >= 60 and most == 2 and short[3].slot < 2
    assert eng.reused_tokens - before >= len(prompts[0]) - 1
    assert short[3].output_ids == _solo(lm, prompts[3], 16).output_ids
    assert long.output_ids == _solo(lm, long_prompt, 20).output_ids


def test_prefill_beside_a_long_reused_prefix_stays_in_the_cache(lm: lmforge.LM) -> None:
    """One admitted prompt reuses 40 cached tokens and runs 1, another runs 30 from scratch: padded into one
    forward they would write positions up to 70 of a 64-token cache, so they are prefilled apart."""
    enc = lm.tokenizer.encode
    base = (enc("The cat sat on the mat, then the cat ate the fish. The quick brown fox") * 3)[:40]
    other = (enc("Hello world! This is a prompt, and more of it here.") * 4)[:30]
    params = SamplingParams(max_tokens=4, **GREEDY)
    eng = Engine(lm.model, lm.tokenizer, max_batch=4)
    eng.generate([base], params)
    seqs = [eng.add(base + enc(" jumps"), params), eng.add(other, params)]
    before = eng.reused_tokens
    _run(eng, seqs)
    assert eng.reused_tokens - before == len(base)
    assert [s.output_ids for s in seqs] == [_solo(lm, s.prompt_ids, 4).output_ids for s in seqs]


def test_small_budget_shortens_the_context(lm: lmforge.LM) -> None:
    eng = Engine(lm.model, lm.tokenizer, max_batch=2, kv_memory=40 * _token_bytes(lm) + 7)
    assert (eng.kv_tokens, eng.context) == (40, 40)
    seq = eng.generate([_prompts(lm)[1]], SamplingParams(max_tokens=1000, **GREEDY))[0]
    assert len(seq.prompt_ids) + len(seq.output_ids) == 40 and seq.finish_reason == "length"
    with pytest.raises(lmforge.LMForgeError, match="holds 0 tokens"):
        Engine(lm.model, lm.tokenizer, kv_memory=100)


# -- the server ------------------------------------------------------------------------------------------
def test_server_refuses_what_never_fits_and_queues_what_fits_later(lm: lmforge.LM, model_dir: Path) -> None:
    budget = 40 * _token_bytes(lm)
    prompts = _prompts(lm)
    with RunningServer(model_dir, max_batch=4, kv_memory=budget) as srv, httpx.Client(timeout=60) as http:
        health = http.get(f"{srv.url}/health").json()
        assert health["kv_cache"]["tokens"] == 40 and health["kv_cache"]["bytes"] == budget
        assert http.get(f"{srv.url}/v1/models").json()["data"][0]["max_model_len"] == 40

        r = http.post(f"{srv.url}/v1/completions", json={"prompt": prompts[0], "max_tokens": 50})
        err = r.json()["error"]
        assert r.status_code == 400 and err["param"] == "max_tokens"
        assert "40 tokens" in err["message"] and f"{len(prompts[0]) + 50}" in err["message"]
        assert "--kv-memory" in err["message"]
        r = http.post(f"{srv.url}/v1/completions", json={"prompt": list(range(5, 50)), "max_tokens": 1})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
        r = http.post(f"{srv.url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "cat " * 60}]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages"

        # Each fits alone (at most 34 tokens), no two at full length: they start optimistically, the budget
        # preempts what does not fit, and all are answered as if alone.
        def complete(p: list[int]) -> httpx.Response:
            return http.post(f"{srv.url}/v1/completions", json={"prompt": p, "max_tokens": 12, "temperature": 0,
                                                                "ignore_eos": True})

        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(complete, prompts[:4]))
        assert [a.status_code for a in answers] == [200] * 4
        expected = [_solo(lm, p, 12).text for p in prompts[:4]]
        assert [a.json()["choices"][0]["text"] for a in answers] == expected
        kv = http.get(f"{srv.url}/health").json()["kv_cache"]
        assert 0 < kv["allocated_bytes"] <= budget


def test_server_streams_chats_without_max_tokens_through_preemption(model_dir: Path) -> None:
    """Chat clients rarely send max_tokens. Four such streams in a budget for two full-length sequences
    all run, some are preempted, and each stream's deltas are exactly the answer the request gets alone."""
    budget = 2 * CONTEXT * _token_bytes(lmforge.load(model_dir, device="cpu"))
    bodies = [{"messages": [{"role": "user", "content": text}], "temperature": 0, "ignore_eos": True}
              for text in ["The cat", "Hello world!", "The quick brown fox", "We generate text"]]
    with RunningServer(model_dir, max_batch=4, kv_memory=budget) as srv, httpx.Client(timeout=60) as http:
        def stream(body: dict) -> tuple[str, list[str]]:
            with http.stream("POST", f"{srv.url}/v1/chat/completions", json=body | {"stream": True}) as r:
                assert r.status_code == 200
                events = [line.removeprefix("data: ") for line in r.iter_lines() if line]
            assert events[-1] == "[DONE]"
            chunks = [json.loads(e) for e in events[:-1]]
            assert all("error" not in c for c in chunks), chunks
            return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks), \
                [c["choices"][0]["finish_reason"] for c in chunks if c["choices"][0]["finish_reason"]]

        with ThreadPoolExecutor(4) as pool:
            streamed = list(pool.map(stream, bodies))
        preemptions = http.get(f"{srv.url}/health").json()["kv_cache"]["preemptions"]
        assert preemptions >= 1
        metrics = http.get(f"{srv.url}/metrics").text
        assert f"lmforge_preemptions_total {preemptions}" in metrics.splitlines()
        alone = [http.post(f"{srv.url}/v1/chat/completions", json=b).json()["choices"][0] for b in bodies]
        assert [t for t, _ in streamed] == [a["message"]["content"] for a in alone]
        assert all(a["message"]["content"] for a in alone)
        assert [f for _, f in streamed] == [["length"]] * 4 == [[a["finish_reason"]] for a in alone]


def test_cli_refuses_a_bad_kv_memory(capsys: pytest.CaptureFixture[str], model_dir: Path) -> None:
    for bad in ["lots", "0", "-5M", "1.5X"]:
        assert main(["serve", str(model_dir), f"--kv-memory={bad}"]) == 1
        err = capsys.readouterr().err.strip()
        assert err == f"lmforge: error: --kv-memory must be a size such as 512M, 2G or a number of bytes, got {bad!r}"
    assert main(["serve", str(model_dir), "--kv-memory", "100", "--port", str(free_port())]) == 1
    err = capsys.readouterr().err
    assert "lmforge: error: a KV cache of 100 bytes holds 0 tokens" in err and "Traceback" not in err


# -- resident memory of a real server ----------------------------------------------------------------------
def _status(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {key} in /proc/{pid}/status")


@pytest.mark.slow
def test_serve_resident_memory_stays_within_the_kv_budget(smollm2_path: Path, tmp_path: Path) -> None:
    """`lmforge serve` on SmolLM2-135M with the default settings, after one 2,000-token request: the peak
    resident memory grew by at most the default KV budget (512 MiB for this model) and some working memory,
    where 16 slots of the request's length would take 1.4 GiB."""
    budget, working = 512 * 2**20, 320 * 2**20
    err = tmp_path / "stderr.txt"
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(Path(lmforge.__file__).parents[1]),
                                                       os.environ.get("PYTHONPATH")]))}
    with serve_process(smollm2_path, log=err, env=env) as (proc, url):
        # A short request first: where bf16 is fast, the first prefill makes the bf16 copy of the weights
        # (quant/cpu.py, ~270 MB for this model), which is model memory, not KV memory.
        warm = httpx.post(f"{url}/v1/completions", json={"prompt": "Hello there, how are you? " * 8, "max_tokens": 2},
                          timeout=600)
        assert warm.status_code == 200, warm.text
        base = _status(proc.pid, "VmRSS")
        prompt = "the quick brown fox jumps over the lazy dog " * 222
        r = httpx.post(f"{url}/v1/completions", json={"prompt": prompt, "max_tokens": 4, "temperature": 0},
                       timeout=600)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["prompt_tokens"] > 1900
        peak = _status(proc.pid, "VmHWM")
        assert peak - base <= budget + working, (
            f"resident memory grew by {(peak - base) / 2**20:.0f} MiB for a {budget / 2**20:.0f} MiB KV budget")
        kv = httpx.get(f"{url}/health", timeout=5).json()["kv_cache"]
        assert kv["bytes"] == budget and 0 < kv["allocated_bytes"] <= budget
    line = next(x for x in err.read_text().splitlines() if x.startswith("KV cache:"))
    assert line == f"KV cache: 16 slots, up to 8192 tokens each, {budget // (30 * 3 * 64 * 2 * 4)} tokens in all, " \
                   "512 MiB (--kv-memory)"
    assert json.loads(r.text)["choices"][0]["finish_reason"] == "length"
