"""The sampler on hand-made logits: penalties, logit bias, temperature, truncation masks (top-k, top-p,
min-p), the processed distribution, and SamplingParams validation."""

from __future__ import annotations

import pytest
import torch

from lmforge.engine import SamplingParams
from lmforge.engine.sampling import SamplerState
from lmforge.errors import LMForgeError


# -- SamplerState.process on hand-made logits ---------------------------------------------------------
def _state(prompt: list[int] = (), **kw: object) -> SamplerState:
    return SamplerState(SamplingParams(**kw), list(prompt), 4, torch.device("cpu"))


def test_repetition_penalty() -> None:
    logits = torch.tensor([2.0, -1.0, 3.0, 0.5])
    st = _state([0, 1], temperature=0.0, repetition_penalty=2.0)
    out = st.process(logits)
    # Seen tokens: positive logits are divided, negative ones multiplied; unseen ones untouched.
    assert torch.allclose(out, torch.tensor([1.0, -2.0, 3.0, 0.5]))
    st.observe(2)
    assert torch.allclose(st.process(logits), torch.tensor([1.0, -2.0, 1.5, 0.5]))
    assert torch.equal(logits, torch.tensor([2.0, -1.0, 3.0, 0.5]))  # the input is not modified


def test_presence_and_frequency_penalties() -> None:
    logits = torch.tensor([1.0, 1.0, 1.0, 1.0])
    st = _state([3, 3, 3], temperature=0.0, presence_penalty=0.5, frequency_penalty=0.25)
    assert torch.allclose(st.process(logits), logits)  # OpenAI semantics: the prompt does not count
    st.observe(2)
    st.observe(2)
    st.observe(1)
    expected = torch.tensor([1.0, 1.0 - 0.25 - 0.5, 1.0 - 0.5 - 0.5, 1.0])
    assert torch.allclose(st.process(logits), expected)
    # Negative penalties encourage repetition.
    st = _state(temperature=0.0, presence_penalty=-1.0)
    st.observe(0)
    assert torch.allclose(st.process(logits), torch.tensor([2.0, 1.0, 1.0, 1.0]))


def test_logit_bias_and_temperature() -> None:
    logits = torch.tensor([1.0, 2.0, 3.0, 4.0])
    out = _state(temperature=0.5, logit_bias={0: 5.0, 3: -2.0}).process(logits)
    assert torch.allclose(out, torch.tensor([12.0, 4.0, 6.0, 4.0]))


def _probs_logits(probs: list[float]) -> torch.Tensor:
    return torch.tensor(probs).log()


def _kept(out: torch.Tensor) -> list[bool]:
    return torch.isfinite(out).tolist()


@pytest.mark.parametrize("top_p,kept", [
    (0.4, [False, True, False, False]),  # the top token alone reaches 0.4
    (0.7, [False, True, False, True]),
    (0.9, [True, True, False, True]),
    (1.0, [True, True, True, True]),
])
def test_top_p_mask(top_p: float, kept: list[bool]) -> None:
    logits = _probs_logits([0.15, 0.5, 0.05, 0.3])
    out = _state(temperature=1.0, top_p=top_p).process(logits)
    assert _kept(out) == kept
    assert torch.allclose(out[torch.isfinite(out)], logits[torch.tensor(kept)])


@pytest.mark.parametrize("min_p,kept", [
    (0.25, [True, True, False, True]),  # threshold 0.125
    (0.4, [False, True, False, True]),  # threshold 0.2
    (1.0, [False, True, False, False]),
])
def test_min_p_mask(min_p: float, kept: list[bool]) -> None:
    out = _state(temperature=1.0, min_p=min_p).process(_probs_logits([0.15, 0.5, 0.05, 0.3]))
    assert _kept(out) == kept


def test_top_k_mask() -> None:
    out = _state(temperature=1.0, top_k=2).process(_probs_logits([0.15, 0.5, 0.05, 0.3]))
    assert _kept(out) == [False, True, False, True]


def test_sampling_follows_the_processed_distribution() -> None:
    st = _state(temperature=1.0, top_p=0.7, seed=0)
    logits = _probs_logits([0.15, 0.5, 0.05, 0.3])
    draws = [st.sample(logits) for _ in range(400)]
    assert set(draws) == {1, 3}
    assert 0.5 < draws.count(1) / 400 < 0.75  # renormalised: 0.5 / 0.8 = 0.625


# -- SamplingParams validation --------------------------------------------------------------------------
@pytest.mark.parametrize("name,value", [
    ("max_tokens", 0), ("max_tokens", -3), ("max_tokens", 2.5),
    ("temperature", -1.0), ("temperature", 2.5), ("temperature", float("nan")),
    ("top_p", 0.0), ("top_p", 3.0), ("top_p", float("nan")),
    ("top_k", -5), ("top_k", 1.5),
    ("min_p", -0.1), ("min_p", 2.0),
    ("repetition_penalty", 0.0), ("repetition_penalty", -1.0), ("repetition_penalty", 11.0),
    ("presence_penalty", 3.0), ("frequency_penalty", -2.5),
    ("top_logprobs", -1), ("top_logprobs", 21),
])
def test_sampling_params_validation(name: str, value: object) -> None:
    with pytest.raises(LMForgeError, match=name):
        SamplingParams(**{name: value})


def test_logit_bias_validation() -> None:
    with pytest.raises(LMForgeError, match=r"logit_bias for token 5 must be between -100 and 100"):
        SamplingParams(logit_bias={5: 101})
    assert SamplingParams(logit_bias={"5": "2.5"}).logit_bias == {5: 2.5}


def test_sampling_params_normalises_stop() -> None:
    assert SamplingParams(stop="END").stop == ["END"]
    assert SamplingParams(stop=["", "a"]).stop == ["a"]
    assert SamplingParams().greedy is False and SamplingParams(temperature=0).greedy is True
