"""Front-ends go through `LM`: one prompt streamed with its finished sequence (`LM.start`), prompt scoring
(`LM.score`), token-row embeddings; the server drives the LM's own engine; sampling defaults are defined once."""

from __future__ import annotations

import pytest
import torch
from serve_util import RunningServer
from tiny import make_tiny_llama_dir

import lmforge
from lmforge.cli import build_parser
from lmforge.engine import SamplingParams
from lmforge.serve import ServerConfig, create_app

CONTEXT = 64
GREEDY = dict(temperature=0.0, max_tokens=12, ignore_eos=True)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory):
    return make_tiny_llama_dir(tmp_path_factory.mktemp("front") / "tiny", context=CONTEXT)


@pytest.fixture(scope="module")
def lm(tiny_dir) -> lmforge.LM:
    return lmforge.load(tiny_dir, device="cpu")


def test_start_streams_the_text_and_keeps_the_finished_sequence(lm: lmforge.LM) -> None:
    params = SamplingParams(**GREEDY, logprobs=True)
    (want,) = lm.generate_sequences([lm.tokenizer.encode("The cat")], params)
    generation = lm.start("The cat", params)
    deltas = list(generation)
    seq = generation.sequence
    assert "".join(deltas) == seq.text == want.text
    assert seq.output_ids == want.output_ids and seq.finish_reason == "length" and seq.error is None
    assert [lp.token_id for lp in seq.logprobs] == want.output_ids
    assert not lm.engine.has_work


def test_closing_a_generation_cancels_it(lm: lmforge.LM) -> None:
    generation = lm.start("The cat", SamplingParams(**GREEDY))
    next(iter(generation))
    generation.close()
    assert generation.sequence.finish_reason == "cancelled" and not lm.engine.has_work
    unstarted = lm.start("The cat", SamplingParams(**GREEDY))
    unstarted.close()  # never iterated: still cancelled, nothing left queued
    assert unstarted.sequence.finish_reason == "cancelled" and not lm.engine.has_work


def test_a_prompt_too_long_is_refused_when_started(lm: lmforge.LM) -> None:
    with pytest.raises(lmforge.LMForgeError, match=f"context window is {CONTEXT} tokens"):
        lm.start([5] * CONTEXT)
    assert not lm.engine.has_work


def test_score_is_the_models_log_softmax(lm: lmforge.LM) -> None:
    ids = lm.tokenizer.encode("The cat sat on the mat, and the dog sat on the log.")
    scored = lm.score(ids, top=2)
    assert scored[0] is None and len(scored) == len(ids)
    with torch.inference_mode():
        ref = torch.log_softmax(lm.model(torch.tensor([ids])).float(), -1)[0]
    want = torch.tensor([float(ref[i - 1, ids[i]]) for i in range(1, len(ids))])
    got = torch.tensor([lp.logprob for lp in scored[1:]])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert [lp.token_id for lp in scored[1:]] == ids[1:]
    top = torch.topk(ref[0], 2).indices.tolist()
    assert [i for i, _ in scored[1].top] == top
    assert lm.score("The cat sat on the mat, and the dog sat on the log.") == lm.score(ids)


def test_embed_ids_equals_embed(lm: lmforge.LM) -> None:
    texts = ["hello world", "the cat sat"]
    rows = [lm.tokenizer.encode(t) for t in texts]
    torch.testing.assert_close(torch.from_numpy(lm.embed_ids(rows)), torch.from_numpy(lm.embed(texts)),
                               rtol=1e-5, atol=1e-6)


def test_the_server_drives_the_lms_engine(tiny_dir) -> None:
    own = lmforge.load(tiny_dir, device="cpu")
    app = create_app(own, ServerConfig(model_name="tiny", max_batch=3, ctx=32))
    try:
        server = app.state.server
        assert server.engine is own.engine and server.scheduler.engine is own.engine
        assert (own.engine.max_batch, own.context_length) == (3, 32)
    finally:
        app.state.server.scheduler.close()


def test_sampling_defaults_are_defined_once(tiny_dir) -> None:
    d = SamplingParams()
    args = build_parser().parse_args(["generate", "m", "p"])
    for name in ("max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                 "frequency_penalty", "min_tokens", "seed", "ignore_eos"):
        assert getattr(args, name) == getattr(d, name), name
    with RunningServer(tiny_dir) as srv:
        from lmforge.serve.schemas import ChatCompletionRequest

        got = srv.app.state.server.sampling(ChatCompletionRequest(messages=[{"role": "user", "content": "x"}]),
                                            d.max_tokens, False, 0, 0)
        assert got == d
