"""lm-evaluation-harness against `lmforge serve`: its per-choice log-likelihoods equal `lmforge eval`'s and
transformers' own.

lm-eval's `local-completions` backend scores a choice by sending context + continuation with
`echo: true, logprobs: 1, max_tokens: 1` and summing `token_logprobs[ctxlen:-1]`: it takes the last entry
to be the one sampled token. The tiny model here is built so that its greedy token after some
continuations is the end-of-turn token, the case in which that entry must still be there.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import torch
from tiny import make_tiny_llama_dir

ITEMS = [  # the choices ending in "." are followed, greedily, by the end-of-turn token
    {"question": "Where does the cat sit?", "choices": ["on the mat.", "on the dog", "in the fish."], "gold": 0},
    {"question": "What does the fox do?", "choices": ["jumps over the dog.", "sat on a mat", "stops"], "gold": 0},
    {"question": "Hello world!", "choices": ["This is a test.", "hi there", "brief answer."], "gold": 1},
    {"question": "What do language models predict?", "choices": ["the next token.", "the cat", "fish"], "gold": 0},
]
TASK_YAML = """\
task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{gold}}}}"
target_delimiter: " "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""
TASK_TOML = """\
[task]
name = "tiny_mc"
format = "jsonl"
context = "Question: {{ question }}\\nAnswer:"
choices = "choices"
gold = "gold"
target_delimiter = " "
"""
# Sums of a few float32 log-probs, of magnitude 10-70: 1e-4, plus a little in proportion to the sum.
RTOL, ATOL = 1e-6, 1e-4


def _model_dir(tmp: Path) -> Path:
    """The tiny Llama, edited so that after "." its greedy next token is the end-of-turn token: the "."
    embedding dominates the residual stream there, and the end-of-turn row of the head points along it."""
    import transformers

    d = make_tiny_llama_dir(tmp, context=64)
    model = transformers.AutoModelForCausalLM.from_pretrained(d).float().eval()
    tok = transformers.AutoTokenizer.from_pretrained(d)
    dot, eos = tok.encode(".", add_special_tokens=False)[0], tok.convert_tokens_to_ids("<|im_end|>")
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb[dot] *= 40
        direction = model.model.norm.weight * emb[dot]
        model.lm_head.weight[eos] = 2.5 * direction / direction.norm()
    model.save_pretrained(d)
    return d


def _hf_loglikelihoods(d: Path, pairs: list[tuple[list[int], list[int]]]) -> tuple[list[float], list[int]]:
    """transformers' sum of continuation log-probs for each (context ids, continuation ids), and its greedy
    next token after the whole text."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(d).float().eval()
    lls, after = [], []
    with torch.no_grad():
        for ctx, cont in pairs:
            ids = torch.tensor([ctx + cont])
            lp = torch.log_softmax(model(ids).logits[0].double(), -1)
            lls.append(sum(lp[len(ctx) - 1 + k, t].item() for k, t in enumerate(cont)))
            after.append(int(lp[-1].argmax()))
    return lls, after


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    """The model, the data and task files, and the log-likelihoods of `lmforge eval` and transformers."""
    import lmforge
    from lmforge.eval.runner import EvalOptions, encode_pair, run_task
    from lmforge.eval.tasks import load_spec

    tmp = tmp_path_factory.mktemp("lm_eval")
    d = _model_dir(tmp / "model")
    data = tmp / "tiny_mc.jsonl"
    data.write_text("".join(json.dumps(it) + "\n" for it in ITEMS), encoding="utf-8")
    tasks = tmp / "tasks"
    tasks.mkdir()
    (tasks / "tiny_mc.yaml").write_text(TASK_YAML.format(data=data), encoding="utf-8")
    (tmp / "tiny_mc.toml").write_text(TASK_TOML, encoding="utf-8")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LMFORGE_HOME", str(tmp / "home"))
        lm = lmforge.load(d)
        mine = run_task(lm, load_spec(tmp / "tiny_mc.toml"), data, EvalOptions(resume=False))["samples"]
    pairs = [encode_pair(lm.tokenizer, f"Question: {it['question']}\nAnswer:", " " + c)
             for it in ITEMS for c in it["choices"]]
    hf, after = _hf_loglikelihoods(d, pairs)
    # The case that matters is exercised, and the ordinary one too: the greedy token after every choice
    # that ends in "." (and only after those) is the end-of-turn token.
    eos = lm.tokenizer.token_to_id("<|im_end|>")
    assert [a == eos for a in after] == [c.endswith(".") for it in ITEMS for c in it["choices"]]
    return {"dir": d, "tasks": tasks, "tmp": tmp, "lmforge": [x for s in mine for x in s["logprobs"]], "hf": hf}


def test_lmforge_eval_matches_transformers(setup) -> None:
    torch.testing.assert_close(torch.tensor(setup["lmforge"], dtype=torch.float64),
                               torch.tensor(setup["hf"], dtype=torch.float64), rtol=RTOL, atol=ATOL)


# "remote": the tokenizer through the server's /tokenizer_info, /tokenize and /detokenize (no tokenizer
# files on the client); "huggingface": lm-eval's own copy, loaded from the model directory.
@pytest.mark.parametrize("backend", ["remote", "huggingface"])
def test_lm_eval_loglikelihoods_match_lmforge_eval_and_transformers(setup, backend, monkeypatch) -> None:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    from serve_util import serve_process

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    d = setup["dir"]
    with serve_process(d, log=setup["tmp"] / f"serve-{backend}.log", env={"OMP_NUM_THREADS": "1"}) as (_, url):
        args = {"base_url": f"{url}/v1/completions", "model": d.name, "tokenizer_backend": backend,
                "max_length": 64, "max_retries": 1}
        if backend == "huggingface":
            args["tokenizer"] = str(d)
        out = simple_evaluate(model="local-completions", model_args=args, tasks=["tiny_mc"],
                              task_manager=TaskManager(include_path=str(setup["tasks"]), include_defaults=False),
                              log_samples=True, batch_size=1)
    samples = sorted(out["samples"]["tiny_mc"], key=lambda s: s["doc_id"])
    assert len(samples) == len(ITEMS)
    for s, it in zip(samples, ITEMS):  # lm-eval scored the same (context, continuation) texts
        assert [tuple(a) for a in s["arguments"]] == [(f"Question: {it['question']}\nAnswer:", " " + c)
                                                      for c in it["choices"]]
    theirs = [r[0][0] for s in samples for r in s["resps"]]
    torch.testing.assert_close(torch.tensor(theirs, dtype=torch.float64), torch.tensor(setup["hf"], dtype=torch.float64),
                               rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(torch.tensor(theirs, dtype=torch.float64),
                               torch.tensor(setup["lmforge"], dtype=torch.float64), rtol=RTOL, atol=ATOL)


def test_tokenizer_info_is_what_lm_eval_reads(setup) -> None:
    """/tokenizer_info carries the tokenizer's special tokens, template and length, as vLLM's does; it
    needs the API key like /tokenize, while the API's description (/openapi.json) is public."""
    from serve_util import RunningServer

    key = {"Authorization": "Bearer sk-test"}
    with RunningServer(setup["dir"], api_keys=["sk-test"]) as srv:
        info = httpx.get(f"{srv.url}/tokenizer_info", headers=key).json()
        enc = httpx.post(f"{srv.url}/tokenize", headers=key,
                         json={"prompt": info["eos_token"], "add_special_tokens": False}).json()
        spec = httpx.get(f"{srv.url}/openapi.json").json()
        assert httpx.get(f"{srv.url}/tokenizer_info").status_code == 401
    assert info["eos_token"] == "<|im_end|>" and info["pad_token"] == "<|endoftext|>" and info["bos_token"] is None
    assert info["model_max_length"] == 64 and "<|im_start|>" in info["chat_template"]
    assert info["tokenizer_class"]
    assert enc["tokens"] == [srv.lm.tokenizer.token_to_id("<|im_end|>")]
    assert "/tokenizer_info" in spec["paths"] and "/v1/completions" in spec["paths"]


def test_logprobs_of_a_completion_ended_by_the_end_of_turn_token(setup) -> None:
    """/v1/completions lists the end-of-turn token that ended a completion (its text stays out); chat
    logprobs cover the content only."""
    import transformers
    from serve_util import RunningServer

    prompt = "Question: Where does the cat sit?\nAnswer: on the mat."  # greedy next: the end-of-turn token
    with RunningServer(setup["dir"]) as srv:
        ids = srv.lm.tokenizer.encode(prompt)
        body = {"prompt": prompt, "max_tokens": 4, "temperature": 0, "logprobs": 1}
        plain = httpx.post(f"{srv.url}/v1/completions", json=body).json()["choices"][0]
        echo = httpx.post(f"{srv.url}/v1/completions", json=body | {"echo": True, "max_tokens": 1}).json()["choices"][0]
        chat = httpx.post(f"{srv.url}/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "Where does the cat sit?"}], "temperature": 0,
            "logprobs": True}).json()
    model = transformers.AutoModelForCausalLM.from_pretrained(setup["dir"]).float().eval()
    with torch.no_grad():
        eos = srv.lm.tokenizer.token_to_id("<|im_end|>")
        want = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].double(), -1)[eos].item()
    assert plain["text"] == "" and plain["finish_reason"] == "stop"
    assert plain["logprobs"]["tokens"] == ["<|im_end|>"]
    assert echo["text"] == prompt and echo["logprobs"]["tokens"][-1] == "<|im_end|>"
    assert len(echo["logprobs"]["tokens"]) == len(ids) + 1
    for lp in (plain["logprobs"]["token_logprobs"][-1], echo["logprobs"]["token_logprobs"][-1]):
        torch.testing.assert_close(lp, want, rtol=RTOL, atol=ATOL)
    # chat: one entry per content token, none for the end-of-turn token
    assert chat["choices"][0]["finish_reason"] == "stop"
    content = chat["choices"][0]["logprobs"]["content"]
    assert len(content) == chat["usage"]["completion_tokens"]
    assert content and all(t["token"] != "<|im_end|>" for t in content)
