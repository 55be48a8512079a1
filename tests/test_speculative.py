"""Speculative decoding (engine/speculative.py): guesses verified in one step give exactly plain decoding's
greedy output, keep the sampling distribution, and run only where verification is exact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_kquants import needs_kernel, write_kquant_gguf
from tiny import write_tiny_gguf

from lmforge.engine import Engine, SamplingParams
from lmforge.engine.sampling import SamplerState
from lmforge.engine.speculative import DraftModel, DraftState, PromptLookup
from lmforge.errors import LMForgeError
from lmforge.formats import load_checkpoint
from lmforge.quant import exact_rows


@pytest.fixture(scope="module")
def packed_model(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LMFORGE_CPU_BF16", "0")
        path = write_kquant_gguf(tmp_path_factory.mktemp("spec") / "tiny-kquants.gguf")
        return load_checkpoint(path, device="cpu", dtype=torch.float32).model


# Prompts that repeat themselves, so that lookup finds matches, of different lengths (different positions).
PROMPTS = [[5, 9, 13, 21, 5, 9, 13, 21, 5, 9], [7, 8] * 9, [3, 1, 4, 1, 5, 9, 2, 6, 3, 1, 4], [40, 41, 42]]


def run(model, prompts, params, drafter="lookup", draft_tokens=8, max_batch=4):
    eng = Engine(model, None, max_batch=max_batch)
    if drafter is None:
        eng.speculate(None)
    elif drafter != "lookup":
        eng.speculate(drafter, draft_tokens)
    else:
        eng.speculate(PromptLookup(), draft_tokens)
    return eng, eng.generate(prompts, params)


def test_lookup_continues_the_latest_earlier_occurrence() -> None:
    from lmforge.engine.engine import Sequence

    seq = Sequence(prompt_ids=[1, 2, 3, 9, 1, 2, 4, 7, 8, 1, 2], params=SamplingParams(), max_tokens=10)
    seq.spec = DraftState()
    lookup = PromptLookup(max_ngram=3, min_ngram=2)
    assert lookup.propose(seq, 3) == [4, 7, 8]  # "1 2" last seen before position 4, followed by 4 7 8
    seq.output_ids += [4, 7]
    assert lookup.propose(seq, 5) == [8, 1, 2, 4, 7]  # now "2 4 7": its continuation runs into the tail
    seq.output_ids += [5]
    assert lookup.propose(seq, 5) == []  # "7 5" and "4 7 5" never occurred
    with pytest.raises(LMForgeError, match="n-grams"):
        PromptLookup(max_ngram=1, min_ngram=2)


@needs_kernel
def test_greedy_output_is_bit_identical_to_plain_decoding(packed_model, monkeypatch) -> None:
    monkeypatch.setenv("LMFORGE_CPU_BF16", "0")
    assert exact_rows(packed_model) == 16
    params = SamplingParams(max_tokens=40, temperature=0, logprobs=True, top_logprobs=2, ignore_eos=True)
    _, plain = run(packed_model, PROMPTS, params, drafter=None)
    eng, spec = run(packed_model, PROMPTS, params)
    assert [s.output_ids for s in spec] == [s.output_ids for s in plain]
    # The log-probs too, bit for bit: every token comes from a row computed as its own step would be.
    assert [[(lp.logprob, lp.top) for lp in s.logprobs] for s in spec] == \
        [[(lp.logprob, lp.top) for lp in s.logprobs] for s in plain]
    proposed = sum(s.spec.proposed for s in spec if s.spec)
    accepted = sum(s.spec.accepted for s in spec if s.spec)
    assert 0 < accepted < proposed  # guesses were both kept and refused, so both paths ran
    assert sum(len(s.output_ids) for s in spec) == 4 * 40


@needs_kernel
def test_stops_and_budgets_end_inside_a_verified_run(packed_model, monkeypatch) -> None:
    """A guess run that passes max_tokens, or a stop token, ends exactly where plain decoding ends."""
    monkeypatch.setenv("LMFORGE_CPU_BF16", "0")
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    _, plain = run(packed_model, PROMPTS, params, drafter=None)
    for s in plain:
        budget = SamplingParams(max_tokens=len(s.output_ids) - 3, temperature=0, ignore_eos=True)
        stop = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, stop_token_ids=[s.output_ids[25]])
        for p in (budget, stop):
            _, (a,) = run(packed_model, [s.prompt_ids], p, drafter=None)
            _, (b,) = run(packed_model, [s.prompt_ids], p)
            assert (b.output_ids, b.finish_reason) == (a.output_ids, a.finish_reason)
            assert b.cached == a.cached  # the slot's valid keys: what prefix reuse relies on


@needs_kernel
def test_a_draft_model_gives_the_same_output(packed_model, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("LMFORGE_CPU_BF16", "0")
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    _, plain = run(packed_model, PROMPTS, params, drafter=None)
    # The model drafting for itself: every guess is kept.
    _, same = run(packed_model, PROMPTS, params, drafter=DraftModel(packed_model, packed_model.cfg.vocab_size))
    assert [s.output_ids for s in same] == [s.output_ids for s in plain]
    assert all(s.spec.accepted == s.spec.proposed > 0 for s in same)
    # Another model of the same vocabulary (random weights): most guesses are refused, the output is the same.
    other = load_checkpoint(write_kquant_gguf(tmp_path / "other.gguf"), device="cpu", dtype=torch.float32).model
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(-1.0)
    _, mixed = run(packed_model, PROMPTS, params, drafter=DraftModel(other, packed_model.cfg.vocab_size))
    assert [s.output_ids for s in mixed] == [s.output_ids for s in plain]
    assert sum(s.spec.accepted for s in mixed) < sum(s.spec.proposed for s in mixed)
    tiny = load_checkpoint(write_tiny_gguf(tmp_path / "t.gguf"), device="cpu", dtype=torch.float32).model
    with pytest.raises(LMForgeError, match="vocabulary"):
        DraftModel(tiny, packed_model.cfg.vocab_size + 1)


@needs_kernel
def test_seeded_sampling_is_not_speculated_unseeded_is(packed_model, monkeypatch) -> None:
    monkeypatch.setenv("LMFORGE_CPU_BF16", "0")
    seeded = SamplingParams(max_tokens=20, temperature=0.8, seed=7, ignore_eos=True)
    _, (a,) = run(packed_model, [PROMPTS[1]], seeded, drafter=None)
    _, (b,) = run(packed_model, [PROMPTS[1]], seeded)
    assert b.output_ids == a.output_ids and b.spec is None
    # Unseeded: guessed and verified by the acceptance rule (at a low temperature this random model loops,
    # so lookup finds its guesses).
    _, unseeded = run(packed_model, PROMPTS, SamplingParams(max_tokens=30, temperature=0.1, ignore_eos=True))
    assert all(len(s.output_ids) == 30 for s in unseeded)
    assert sum(s.spec.proposed for s in unseeded if s.spec) > 0


def test_acceptance_rule_keeps_the_distribution() -> None:
    """SamplerState.sample with a guess: kept with probability p(guess), else drawn from p without it, so
    the token's distribution is p, whichever token is guessed."""
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    p = torch.softmax(logits / 0.9, -1)
    n = 20000
    for guess in (0, 3):
        state = SamplerState(SamplingParams(temperature=0.9, seed=guess), [], 5, torch.device("cpu"))
        counts = torch.bincount(torch.tensor([state.sample(logits, guess) for _ in range(n)]), minlength=5)
        freq = counts.float() / n
        # Binomial standard error of each frequency, 4.5 sigma.
        assert torch.all((freq - p).abs() <= 4.5 * (p * (1 - p) / n).sqrt()), (guess, freq, p)


def test_refused_where_verification_is_not_exact(tmp_path: Path) -> None:
    dense = load_checkpoint(write_tiny_gguf(tmp_path / "t.gguf"), device="cpu", dtype=torch.float32).model
    eng = Engine(dense, None)
    assert exact_rows(dense) == 0 and eng.drafter is None  # F32 file: no packed codes, so nothing is guessed
    with pytest.raises(LMForgeError, match="speculative decoding needs"):
        eng.speculate(PromptLookup())


def test_configure_engine_and_serve_flags(tmp_path: Path) -> None:
    import subprocess
    import sys

    import lmforge

    lm = lmforge.load(write_tiny_gguf(tmp_path / "t.gguf"))  # F32: verification would not be exact
    assert lm.configure_engine(max_batch=2, draft_tokens=0).drafter is None
    assert lm.configure_engine(max_batch=2).drafter is None  # the default asks for nothing: plain decoding
    with pytest.raises(LMForgeError, match="speculative decoding needs"):
        lm.configure_engine(max_batch=2, draft_tokens=4)  # asked for, it is refused by name, not dropped
    with pytest.raises(LMForgeError, match="draft_tokens must be"):
        lm.configure_engine(max_batch=2, draft_tokens=-1)
    bad = subprocess.run([sys.executable, "-m", "lmforge", "serve", str(tmp_path / "t.gguf"), "--draft-tokens", "-1"],
                         capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stderr.strip() == "lmforge: error: --draft-tokens must be at least 0, got -1"


@needs_kernel
@pytest.mark.slow
def test_smollm2_server_streams_the_same_greedy_text_with_speculation(smollm2_path: Path) -> None:
    """SmolLM2 through the server (real HTTP, streamed): quoting a passage with speculation on (the default)
    gives exactly the text of plain decoding, in fewer decode steps."""
    import httpx
    from serve_util import RunningServer

    import lmforge

    story = ("Once upon a time, in a small village by the sea, there lived an old fisherman named Tom. Every "
             "morning he rowed his little blue boat out past the rocks, and every evening he came home with a "
             "basket of silver fish for his neighbours.")
    body = {"model": "tiny", "max_tokens": 80, "temperature": 0, "stream": True,
            "messages": [{"role": "user", "content": f"Repeat this story exactly:\n\n{story}"}]}
    lm = lmforge.load(smollm2_path)
    texts, steps = {}, {}
    for draft_tokens in (0, None):
        with RunningServer(lm, draft_tokens=draft_tokens, stream_interval=0) as srv:  # an event a step
            assert (srv.app.state.server.engine.drafter is None) == (draft_tokens == 0)
            with httpx.stream("POST", f"{srv.url}/v1/chat/completions", json=body, timeout=120) as r:
                chunks = [line for line in r.iter_lines() if line.startswith("data: {")]
            events = [json.loads(line[len("data: "):]) for line in chunks]
            texts[draft_tokens] = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
            steps[draft_tokens] = len(chunks)
            metrics = httpx.get(f"{srv.url}/metrics").text
            accepted = [ln for ln in metrics.splitlines() if ln.startswith('lmforge_draft_tokens_total{result="accepted"}')]
            assert (float(accepted[0].split()[-1]) > 0) if draft_tokens is None else not accepted
    assert texts[None] == texts[0] and "basket of silver fish" in texts[0]
    assert steps[None] < steps[0]  # guessed tokens arrive several per event
