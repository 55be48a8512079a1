"""Encoder-decoders (T5 v1.0, v1.1, BART) through the one generation engine: greedy decoding of a batch, submitted
together and staggered, and beam search equal to transformers' generate; streaming, the front-ends (LM, CLI,
server) and the over-long source refused at the edge."""

from __future__ import annotations

import collections
import io
import json
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from test_t5 import make_bart_dir
from tiny import make_t5_dir
from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

import lmforge
from lmforge.engine import Engine, SamplingParams
from lmforge.errors import LMForgeError
from lmforge.formats import load_checkpoint
from lmforge.serve import ServerConfig, create_app

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 32
LENGTHS = (5, 11, 8)  # sources of different lengths, padded differently in every batch they share


@pytest.fixture(scope="module", params=["v1.0", "v1.1", "bart"])
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """(transformers' model, lmforge's model, the sources) for each tiny random model."""
    path = tmp_path_factory.mktemp(request.param.replace(".", "")) / "model"
    if request.param == "bart":
        ref = transformers.BartForConditionalGeneration.from_pretrained(make_bart_dir(path)).eval()
        low = 3  # BART's special tokens are 0-3
    else:
        ref = transformers.T5ForConditionalGeneration.from_pretrained(make_t5_dir(path, request.param)).eval()
        low = 2
    ours = load_checkpoint(path, device="cpu", dtype=torch.float32).model
    g = torch.Generator().manual_seed(5)
    sources = [torch.randint(low, ours.cfg.vocab_size, (n,), generator=g).tolist() for n in LENGTHS]
    return ref, ours, sources


def _reference(ref, source: list[int], **kw) -> list[int]:
    """transformers' generated tokens for one source (without the decoder start token). transformers sizes its
    decoding cache by the encoder's depth, which fails with a deeper decoder: it decodes without one."""
    with torch.inference_mode():
        out = ref.generate(input_ids=torch.tensor([source]), do_sample=False, max_new_tokens=STEPS, use_cache=False,
                           **kw)
    return out[0, 1:].tolist()


def _greedy_params(ours) -> SamplingParams:
    # End-of-sequence held back for all 32 steps, as min_new_tokens does, so that every step is compared.
    return SamplingParams(temperature=0, max_tokens=STEPS, min_tokens=STEPS,
                          stop_token_ids=[ours.cfg.extra["eos_token_id"]])


def test_greedy_batch_together_and_staggered_equals_generate(pair) -> None:
    ref, ours, sources = pair
    want = [_reference(ref, s, num_beams=1, min_new_tokens=STEPS) for s in sources]
    assert len({t for w in want for t in w}) > 3  # real sequences, not one token repeated
    engine = Engine(ours, None, max_batch=4)
    together = engine.generate(sources, _greedy_params(ours))
    assert [s.output_ids for s in together] == want
    assert all(s.finish_reason == "length" for s in together)

    engine = Engine(ours, None, max_batch=4)
    first = [engine.add(s, _greedy_params(ours)) for s in sources[:2]]
    for _ in range(6):
        engine.step()
    assert 0 < len(first[0].output_ids) < STEPS
    late = engine.add(sources[2], _greedy_params(ours))  # joins the running batch mid-way
    while engine.has_work:
        engine.step()
    assert [s.output_ids for s in [*first, late]] == want


def test_cross_attention_keys_survive_a_cache_reshape_and_preemption(pair) -> None:
    """A KV budget of a few dozen decoder positions: the cache grows (slots keep their cross-attention keys)
    and sequences are preempted and resumed (their sources encoded again); the tokens are still generate's."""
    ref, ours, sources = pair
    want = [_reference(ref, s, num_beams=1, min_new_tokens=STEPS) for s in sources]
    budget = 48 * Engine(ours, None).kv_token_bytes
    engine = Engine(ours, None, max_batch=3, kv_memory=budget)
    got = engine.generate(sources, _greedy_params(ours))
    assert [s.output_ids for s in got] == want
    assert engine.preemptions > 0


def test_beam_search_equals_generate(pair) -> None:
    ref, ours, sources = pair
    eos = ours.cfg.extra["eos_token_id"]
    engine = Engine(ours, None, max_batch=4)
    want = [_reference(ref, s, num_beams=4) for s in sources]
    got = engine.generate(sources, SamplingParams(temperature=0, max_tokens=STEPS, num_beams=4))
    for seq, w in zip(got, want, strict=True):
        assert seq.output_ids + ([eos] if seq.finish_reason == "stop" else []) == w
    # A second end token, the most frequent in each answer, so that hypotheses finish and the search stops
    # early; with a length penalty of 0 (short hypotheses win) and 2 (long ones do).
    ends = [collections.Counter(w).most_common(1)[0][0] for w in want]
    for penalty, early in ((0.0, True), (2.0, "never")):
        kw = dict(num_beams=4, length_penalty=penalty, early_stopping=early)
        want = [_reference(ref, s, eos_token_id=[eos, end], **kw) for s, end in zip(sources, ends)]
        got = engine.generate(sources, [SamplingParams(temperature=0, max_tokens=STEPS, stop_token_ids=[end], **kw)
                                        for end in ends])
        if penalty == 0.0:
            assert all(len(w) < STEPS for w in want)
        for seq, w, end in zip(got, want, ends, strict=True):
            assert seq.output_ids + ([w[-1]] if seq.finish_reason == "stop" else []) == w
            assert (seq.finish_reason == "stop") == (w[-1] in (eos, end))


def test_source_longer_than_the_encoder_takes_is_refused(pair) -> None:
    _, ours, _ = pair
    engine = Engine(ours, None)
    limit = ours.cfg.context_length
    engine.add([5] * limit, SamplingParams(max_tokens=2))  # the longest source the encoder takes
    with pytest.raises(LMForgeError, match=f"the source is {limit + 1} tokens, but the {ours.cfg.family} "
                                           f"encoder takes at most {limit}"):
        engine.add([5] * (limit + 1), SamplingParams(max_tokens=2))
    with pytest.raises(LMForgeError, match="num_beams=2: beam search runs for encoder-decoder models only, "
                                           "through generate"):
        engine.add([5, 6], SamplingParams(num_beams=2))


# -- front-ends: a tiny T5 with a SentencePiece Unigram tokenizer ---------------------------------------------
SOURCE = "The quick brown fox jumps over the lazy dog."


def _t5_tokenizer() -> HFTokenizer:
    """T5's tokenizer.json shape (Unigram, `▁` words, `</s>` appended, sentinels last) from a fixed vocabulary:
    the words of a few sentences and their letters, so that the same text always gives the same ids."""
    words = sorted(set("the quick brown fox jumps over lazy dog hello world a cat sat on mat".split()))
    letters = sorted(set("".join(words) + SOURCE.lower() + SOURCE.upper()) - {" "})
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(f"▁{w}", -2.0) for w in words] + [
        ("▁", -3.0)] + [(c, -4.0) for c in letters]
    hf = HFTokenizer(models.Unigram(pieces, unk_id=2))
    hf.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    hf.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    specials = ["<pad>", "</s>", "<unk>"] + [f"<extra_id_{i}>" for i in reversed(range(8))]
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    hf.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return hf


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tok = _t5_tokenizer()
    path = make_t5_dir(tmp_path_factory.mktemp("t5tok") / "t5", "v1.0", vocab=tok.get_vocab_size(), n_positions=64)
    tok.save(str(path / "tokenizer.json"))
    return path


def test_lm_generate_stream_and_chat(t5_dir: Path) -> None:
    lm = lmforge.load(t5_dir, device="cpu")
    assert lm.is_seq2seq
    text = lm.generate(SOURCE, max_tokens=12, temperature=0)
    ids = lm.generate_sequences([lm.tokenizer.encode(SOURCE)], SamplingParams(max_tokens=12, temperature=0))[0]
    assert len(text) > 5 and text == lm.tokenizer.decode(ids.output_ids)
    assert "".join(lm.stream(SOURCE, max_tokens=12, temperature=0)) == text
    sampled = lm.generate(SOURCE, max_tokens=12, temperature=1.0, seed=3)
    assert "".join(lm.stream(SOURCE, max_tokens=12, temperature=1.0, seed=3)) == sampled
    beam = lm.generate([SOURCE, "Hello"], max_tokens=12, num_beams=4)
    assert beam[0] and beam[1] and "".join(lm.stream(SOURCE, max_tokens=12, num_beams=4)) == beam[0]
    # No chat template: the last user message is the source.
    assert lm.chat([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "x"},
                    {"role": "user", "content": SOURCE}], max_tokens=12, temperature=0) == text
    with pytest.raises(LMForgeError, match="no chat template to give a system prompt to"):
        lm.chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": SOURCE}])
    with pytest.raises(LMForgeError, match="top_p cannot be combined with num_beams > 1"):
        lm.generate(SOURCE, num_beams=4, top_p=0.5)


def test_cli_generate_and_chat_print_the_decoded_text(t5_dir: Path, capsys: pytest.CaptureFixture[str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from lmforge.cli import main

    want = lmforge.load(t5_dir, device="cpu")
    for flags, kw in (([], {}), (["--num-beams", "4"], {"num_beams": 4})):
        capsys.readouterr()
        assert main(["generate", str(t5_dir), SOURCE, "--device", "cpu", "--temperature", "0", "--max-tokens", "10",
                     *flags]) == 0
        assert capsys.readouterr().out == want.generate(SOURCE, max_tokens=10, temperature=0, **kw) + "\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(SOURCE))  # piped: one answer
    assert main(["chat", str(t5_dir), "--device", "cpu", "--temperature", "0", "--max-tokens", "10"]) == 0
    assert capsys.readouterr().out == want.generate(SOURCE, max_tokens=10, temperature=0) + "\n"
    assert main(["generate", str(t5_dir), "word " * 70, "--device", "cpu"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "encoder takes at most 64" in err[0], err


def test_serve_completions_and_chat(t5_dir: Path) -> None:
    lm = lmforge.load(t5_dir, device="cpu")
    want = lm.generate(SOURCE, max_tokens=10, temperature=0)
    with TestClient(create_app(lm, ServerConfig(model_name="t5"))) as client:
        r = client.post("/v1/completions", json={"prompt": SOURCE, "max_tokens": 10, "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == want
        r = client.post("/v1/completions", json={"prompt": SOURCE, "max_tokens": 10, "temperature": 0, "stream": True})
        chunks = [line for line in r.text.splitlines() if line.startswith("data: {")]
        assert "".join(json.loads(c[6:])["choices"][0]["text"] for c in chunks) == want
        r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": SOURCE}],
                                                      "max_tokens": 10, "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == want
        r = client.post("/v1/chat/completions", json={"messages": [{"role": "system", "content": "Be brief."},
                                                                   {"role": "user", "content": SOURCE}]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages", r.text
        r = client.post("/v1/completions", json={"prompt": "word " * 70, "max_tokens": 4})
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
        assert "encoder takes at most 64" in r.json()["error"]["message"]
        r = client.post("/v1/completions", json={"prompt": SOURCE, "echo": True, "logprobs": 1, "max_tokens": 1})
        assert r.status_code == 400 and r.json()["error"]["param"] == "echo", r.text
        r = client.post("/v1/completions", json={"prompt": SOURCE, "num_beams": 4})
        assert r.status_code == 400 and r.json()["error"]["param"] == "num_beams", r.text
