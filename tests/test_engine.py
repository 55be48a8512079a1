"""The generation engine on tiny models: batching, continuous batching, cancellation, sampling controls,
stop handling, length limits and logprobs (the sampler alone: test_sampling.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from numerics import assert_close_scaled
from tiny import ScriptedModel, make_tiny_llama_dir, train_tokenizer

import lmforge
from lmforge.engine import Engine, SamplingParams
from lmforge.errors import LMForgeError
from lmforge.tokenizer import Tokenizer

CONTEXT = 64


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lm(tmp_path_factory: pytest.TempPathFactory) -> lmforge.LM:
    return lmforge.load(make_tiny_llama_dir(tmp_path_factory.mktemp("tiny"), context=CONTEXT), device="cpu")


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer(train_tokenizer(), eos_token="<|im_end|>")


def _prompts(lm: lmforge.LM) -> list[list[int]]:
    texts = ["The cat", "Hello world! This is a longer prompt for the batch", "We generate text, and stop"]
    ids = [lm.tokenizer.encode(t) for t in texts]
    assert len({len(i) for i in ids}) == 3
    return ids


def _engine(lm: lmforge.LM, max_batch: int = 8) -> Engine:
    return Engine(lm.model, lm.tokenizer, max_batch=max_batch)


GREEDY = dict(temperature=0.0, max_tokens=12, ignore_eos=True)


def _solo(lm: lmforge.LM, prompt: list[int], **kw: object) -> list[int]:
    return _engine(lm).generate([prompt], SamplingParams(**{**GREEDY, **kw}))[0].output_ids


# -- batching ----------------------------------------------------------------------------------------
def test_greedy_batch_equals_solo_runs(lm: lmforge.LM) -> None:
    prompts = _prompts(lm)
    solo = [_solo(lm, p) for p in prompts]
    assert len({tuple(s) for s in solo}) == 3, "degenerate model: the comparison would be weak"
    assert len({t for s in solo for t in s}) > 5
    batch = _engine(lm).generate(prompts, SamplingParams(**GREEDY))
    assert [s.output_ids for s in batch] == solo
    assert all(s.finish_reason == "length" and len(s.output_ids) == 12 for s in batch)
    assert [s.text for s in batch] == [lm.tokenizer.decode(s) for s in solo]


def test_continuous_batching_equals_solo_runs(lm: lmforge.LM) -> None:
    prompts = _prompts(lm)
    solo = [_solo(lm, p) for p in prompts]
    eng = _engine(lm)
    params = SamplingParams(**GREEDY)
    a = eng.add(prompts[0], params)
    eng.step()  # prefill a
    eng.step()
    eng.step()  # a has 3 tokens
    assert len(a.output_ids) == 3
    b = eng.add(prompts[1], params)
    eng.step()  # prefill b while a waits
    assert len(a.output_ids) == 3 and len(b.output_ids) == 1
    for _ in range(4):
        eng.step()
    c = eng.add(prompts[2], params)
    while eng.has_work:
        eng.step()
    assert [s.output_ids for s in (a, b, c)] == solo
    assert all(s.done for s in (a, b, c)) and not eng.running


def test_cancel_frees_the_slot(lm: lmforge.LM) -> None:
    prompts = _prompts(lm)
    solo_c = _solo(lm, prompts[2])
    eng = _engine(lm, max_batch=2)
    params = SamplingParams(**GREEDY)
    a, b = eng.add(prompts[0], params), eng.add(prompts[1], params)
    eng.step()
    c = eng.add(prompts[2], params)
    eng.step()
    eng.step()
    assert c.slot == -1 and c in eng.waiting  # no free slot: c waits
    n_b = len(b.output_ids)
    eng.cancel(a)
    assert a.finish_reason == "cancelled" and a.slot not in eng.running
    eng.step()  # c takes a's slot
    assert c.slot == a.slot and len(c.output_ids) == 1
    while not (b.done and c.done):
        eng.step()
    assert c.output_ids == solo_c
    assert len(b.output_ids) == 12 > n_b
    assert len(a.output_ids) < 12  # a stopped where it was cancelled


def test_cancel_waiting_sequence(lm: lmforge.LM) -> None:
    eng = _engine(lm, max_batch=1)
    a = eng.add(_prompts(lm)[0], SamplingParams(**GREEDY))
    b = eng.add(_prompts(lm)[1], SamplingParams(**GREEDY))
    eng.cancel(b)
    assert b.finish_reason == "cancelled" and b not in eng.waiting
    while eng.has_work:
        eng.step()
    assert a.finish_reason == "length" and b.output_ids == []



def test_cancel_after_finish_leaves_other_sequences_alone(lm: lmforge.LM) -> None:
    prompts = _prompts(lm)
    eng = _engine(lm, max_batch=1)
    a = eng.generate([prompts[0]], SamplingParams(**{**GREEDY, "max_tokens": 2}))[0]
    b = eng.add(prompts[1], SamplingParams(**GREEDY))
    eng.step()  # b is prefilled into slot 0, a's old slot
    assert b.slot == a.slot
    eng.cancel(a)  # a no-op for a finished sequence...
    assert a.finish_reason == "length"
    assert eng.running.get(b.slot) is b  # ...that must not evict b


def test_stream_matches_generate_and_closing_cancels(lm: lmforge.LM) -> None:
    p = _prompts(lm)[1]
    eng = _engine(lm)
    full = eng.generate([p], SamplingParams(**GREEDY))[0].text
    assert "".join(eng.stream(p, SamplingParams(**GREEDY))) == full
    it = eng.stream(p, SamplingParams(**GREEDY))
    next(it)
    it.close()
    assert not eng.has_work  # the abandoned sequence was cancelled and its slot freed


# -- sampling controls on the model -----------------------------------------------------------------
def test_seed_reproducibility(lm: lmforge.LM) -> None:
    p = _prompts(lm)[0]
    kw = dict(temperature=1.5, max_tokens=16, ignore_eos=True)
    runs = [_engine(lm).generate([p], SamplingParams(seed=s, **kw))[0].output_ids for s in (7, 7, 8)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]
    assert runs[0] != _solo(lm, p, max_tokens=16)  # it really sampled


def test_top_k_1_equals_greedy(lm: lmforge.LM) -> None:
    p = _prompts(lm)[1]
    sampled = _engine(lm).generate([p], SamplingParams(temperature=1.5, top_k=1, seed=3, **{
        k: v for k, v in GREEDY.items() if k != "temperature"}))[0].output_ids
    assert sampled == _solo(lm, p)


def test_logit_bias_forces_and_bans(lm: lmforge.LM) -> None:
    p = _prompts(lm)[0]
    greedy = _solo(lm, p)
    forced = lm.tokenizer.encode("fox")[0]
    out = _solo(lm, p, logit_bias={forced: 100})
    assert out == [forced] * 12
    banned = greedy[0]
    out = _solo(lm, p, logit_bias={banned: -100})
    assert banned not in out
    assert out[0] != greedy[0]


def test_sampled_tokens_respect_top_k(lm: lmforge.LM) -> None:
    p = _prompts(lm)[2]
    eng = _engine(lm)
    seq = eng.generate([p], SamplingParams(temperature=2.0, top_k=3, max_tokens=10, seed=1, ignore_eos=True,
                                           logprobs=True, top_logprobs=3))[0]
    for lp in seq.logprobs:  # every sampled token is among the model's 3 most likely
        assert lp.token_id in [i for i, _ in lp.top]


# -- engine input checks ---------------------------------------------------------------------------------
def test_engine_rejects_bad_prompts(lm: lmforge.LM) -> None:
    eng = _engine(lm)
    with pytest.raises(LMForgeError, match="empty"):
        eng.add([])
    with pytest.raises(LMForgeError, match=r"prompt is 64 tokens, but the context window is 64 tokens"):
        eng.add([5] * CONTEXT)
    with pytest.raises(LMForgeError, match=f"token id {lm.config.vocab_size} is outside the vocabulary"):
        eng.add([1, lm.config.vocab_size])
    assert not eng.has_work


def test_stop_strings_need_a_tokenizer(lm: lmforge.LM) -> None:
    with pytest.raises(LMForgeError, match="stop strings need a tokenizer"):
        Engine(lm.model, None).add([1, 2], SamplingParams(stop=["x"]))


# -- stop strings, stop tokens, lengths (scripted model) -----------------------------------------------
def _scripted(tok: Tokenizer, text: str, prompt: list[int], tail: list[int] = ()) -> Engine:
    script = tok.encode(text) + list(tail)
    return Engine(ScriptedModel(script, len(prompt), tok.vocab_size), tok)


def _run(eng: Engine, prompt: list[int], **kw: object) -> tuple[list[str], object]:
    seq = eng.add(prompt, SamplingParams(temperature=0.0, **kw))
    deltas = []
    while not seq.done:
        for s, d in eng.step():
            if s is seq:
                deltas.append(d)
    return deltas, seq


def test_scripted_model_says_its_script(tok: Tokenizer) -> None:
    prompt = tok.encode("Q:")
    eng = _scripted(tok, "Hello world! The cat sat.", prompt)
    deltas, seq = _run(eng, prompt, max_tokens=len(tok.encode("Hello world! The cat sat.")))
    assert seq.text == "".join(deltas) == "Hello world! The cat sat."
    assert seq.finish_reason == "length"


def test_stop_string_spanning_several_tokens(tok: Tokenizer) -> None:
    stop = "XQZ"
    assert len(tok.encode(stop)) == 3  # one token per letter
    prompt = tok.encode("Q:")
    text = "Hello worldXQZ and more"
    eng = _scripted(tok, text, prompt)
    deltas, seq = _run(eng, prompt, max_tokens=40, stop=[stop])
    assert seq.finish_reason == "stop"
    assert seq.text == "".join(deltas) == "Hello world"
    assert all(c not in d for d in deltas for c in "XQZ")  # no part of the stop string ever leaks
    n_before = len(tok.encode("Hello world"))
    assert len(seq.output_ids) == n_before + 3  # it stopped on the token completing the stop string


def test_stop_string_inside_one_token(tok: Tokenizer) -> None:
    prompt = tok.encode("Q:")
    eng = _scripted(tok, "The quick brown fox jumps", prompt)
    deltas, seq = _run(eng, prompt, max_tokens=40, stop=["ick"])
    assert seq.text == "".join(deltas) == "The qu"
    assert seq.finish_reason == "stop"


def test_first_of_several_stop_strings_wins(tok: Tokenizer) -> None:
    prompt = tok.encode("Q:")
    eng = _scripted(tok, "one, two; three. four", prompt)
    _, seq = _run(eng, prompt, max_tokens=40, stop=[".", ";"])
    assert seq.text == "one, two"


def test_held_back_tail_is_released_when_it_is_not_a_stop(tok: Tokenizer) -> None:
    prompt = tok.encode("Q:")
    text = "abXQ then XQ again XQY end"
    eng = _scripted(tok, text, prompt)
    deltas, seq = _run(eng, prompt, max_tokens=len(tok.encode(text)), stop=["XQZ"])
    assert seq.finish_reason == "length"
    assert seq.text == "".join(deltas) == text  # every held-back "XQ" came out in the end
    # While "X" / "XQ" could still start the stop string it was held back: the delta emitted with the
    # token "X" is empty.
    ids = tok.encode(text)
    x = tok.token_to_id("X")
    assert deltas[ids.index(x)] == ""


def test_held_back_tail_is_released_at_the_length_limit(tok: Tokenizer) -> None:
    prompt = tok.encode("Q:")
    text = "the endXQ"
    eng = _scripted(tok, text, prompt)
    deltas, seq = _run(eng, prompt, max_tokens=len(tok.encode(text)), stop=["XQZ"])
    assert seq.finish_reason == "length"
    assert deltas[-2] == "" and deltas[-1] == "XQ"  # held back until the end, then released
    assert seq.text == "".join(deltas) == text


def test_stop_token_ids(tok: Tokenizer) -> None:
    prompt = tok.encode("Q:")
    text = "Hello world"
    stop_id = tok.token_to_id("<|endoftext|>")
    eng = _scripted(tok, text, prompt, tail=[stop_id, *tok.encode(" more")])
    _, seq = _run(eng, prompt, max_tokens=40, stop_token_ids=[stop_id], logprobs=True, ignore_eos=True)
    assert seq.finish_reason == "stop"
    assert seq.output_ids == tok.encode(text) and stop_id not in seq.output_ids
    # the stop token is left out of the output, but its logprob entry stays (it was sampled)
    assert [lp.token_id for lp in seq.logprobs] == seq.output_ids + [stop_id]
    assert seq.text == text


def test_eos_from_the_tokenizer_stops_unless_ignored(tok: Tokenizer) -> None:
    prompt = tok.encode("Q:")
    eos = tok.token_to_id("<|im_end|>")
    tail = tok.encode(" after")
    eng = _scripted(tok, "Hi", prompt, tail=[eos, *tail])
    _, seq = _run(eng, prompt, max_tokens=40)
    assert (seq.text, seq.finish_reason) == ("Hi", "stop")
    n = len(tok.encode("Hi")) + 1 + len(tail)
    _, seq = _run(eng, prompt, max_tokens=n, ignore_eos=True)
    assert seq.finish_reason == "length"
    assert eos in seq.output_ids and seq.text.endswith(" after")


def test_max_tokens_gives_length(lm: lmforge.LM) -> None:
    seq = _engine(lm).generate([_prompts(lm)[0]], SamplingParams(**{**GREEDY, "max_tokens": 5}))[0]
    assert len(seq.output_ids) == 5 and seq.finish_reason == "length"


def test_max_tokens_is_clamped_to_the_context(lm: lmforge.LM) -> None:
    prompt = (lm.tokenizer.encode("The cat sat on the mat. ") * 30)[:60]
    eng = _engine(lm)
    seq = eng.generate([prompt], SamplingParams(**{**GREEDY, "max_tokens": 100}))[0]
    assert seq.max_tokens == CONTEXT - 60
    assert len(seq.output_ids) == CONTEXT - 60 and seq.finish_reason == "length"
    assert eng.cache is not None and eng.cache.max_len <= CONTEXT


# -- logprobs -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_logprobs(lm: lmforge.LM, temperature: float) -> None:
    p = _prompts(lm)[1]
    seq = _engine(lm).generate([p], SamplingParams(temperature=temperature, seed=5, max_tokens=8, ignore_eos=True,
                                                   logprobs=True, top_logprobs=4))[0]
    assert len(seq.logprobs) == len(seq.output_ids) == 8
    for k, (tok_id, lp) in enumerate(zip(seq.output_ids, seq.logprobs, strict=True)):
        assert lp.token_id == tok_id
        assert len(lp.top) == 4
        values = [v for _, v in lp.top]
        assert values == sorted(values, reverse=True)
        assert len({i for i, _ in lp.top}) == 4
        # The chosen token's logprob is the model's own log-softmax at that step (no cache, full prefix).
        with torch.no_grad():
            ref = torch.log_softmax(lm.model(torch.tensor([p + seq.output_ids[:k]]))[0, -1].float(), -1)
        scale = ref.abs().max().item()  # cached decode and a full forward round differently
        assert_close_scaled(lp.logprob, ref[tok_id].item(), 1e-5, scale=scale)
        assert_close_scaled([v for _, v in lp.top], [ref[i].item() for i, _ in lp.top], 1e-5, scale=scale)
        assert [i for i, _ in lp.top] == ref.topk(4).indices.tolist()
        if temperature == 0.0:
            assert lp.top[0][0] == tok_id
        assert lp.logprob <= 0.0


def test_no_logprobs_unless_asked(lm: lmforge.LM) -> None:
    seq = _engine(lm).generate([_prompts(lm)[0]], SamplingParams(**GREEDY))[0]
    assert seq.logprobs == []


def test_api_generate_matches_engine(lm: lmforge.LM, tmp_path: Path) -> None:
    texts = ["The cat", "Hello world!"]
    out = lm.generate(texts, temperature=0.0, max_tokens=6, ignore_eos=True)
    assert out == [_engine(lm).generate([lm.tokenizer.encode(t)], SamplingParams(
        temperature=0.0, max_tokens=6, ignore_eos=True))[0].text for t in texts]
    assert lm.generate("The cat", temperature=0.0, max_tokens=6, ignore_eos=True) == out[0]


# -- prefix reuse --------------------------------------------------------------------------------------
def test_prefix_reuse_gives_the_same_output(lm: lmforge.LM) -> None:
    """A prompt that starts like what a slot holds (a running sequence's prompt, a finished turn) is only
    prefilled past that prefix, and decodes exactly as a fresh engine would."""
    enc = lm.tokenizer.encode
    base = enc("Hello world! This is a longer prompt")
    first = base + enc(" for the batch")
    eng = _engine(lm, max_batch=2)
    params = SamplingParams(**GREEDY)
    a = eng.add(first, params)
    eng.step()
    eng.step()
    b = eng.add(base + enc(" and the cat"), params)  # shares `base` with the running sequence a
    while not (a.done and b.done):
        eng.step()
    assert eng.reused_tokens >= len(base) - 1
    assert b.output_ids == _solo(lm, b.prompt_ids)
    # The next turn of a's conversation: its whole cached history is already in its old slot.
    before = eng.reused_tokens
    turn = first + a.output_ids + enc(" The cat")
    c = eng.generate([turn], params)[0]
    assert eng.reused_tokens - before >= len(first) + len(a.output_ids) - 1
    assert c.output_ids == _solo(lm, turn)


def test_prefix_reuse_when_a_slot_is_both_source_and_target(lm: lmforge.LM) -> None:
    enc = lm.tokenizer.encode
    p1, p2 = enc("The cat sat on the mat, then"), enc("We generate text, stream text")
    eng = _engine(lm, max_batch=2)
    eng.generate([p1, p2], SamplingParams(**GREEDY))
    # Both new prompts extend p2, which only one slot holds; whichever takes that slot, the other must
    # copy the prefix before anything is overwritten.
    new = [p2 + enc(" and stop"), p2 + enc(" then the fish")]
    out = eng.generate(new, SamplingParams(**GREEDY))
    assert [s.output_ids for s in out] == [_solo(lm, p) for p in new]
    off = _engine(lm, max_batch=2)
    off.prefix_reuse = False
    off.generate([p1, p2, *new], SamplingParams(**GREEDY))
    assert off.reused_tokens == 0 and eng.reused_tokens >= 2 * (len(p2) - 1)
