"""Tools run inside generation: a closed call is answered by forcing the tool's result into that sequence
(exactly the text the chat template renders for the tool turn), other rows of the batch are undisturbed,
forced tokens are marked, tool errors are result text, calls are bounded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny import ScriptedModel, make_tiny_llama_dir

import lmforge
from lmforge.engine import Engine, SamplingParams
from lmforge.tools import get_tool, to_openai
from lmforge.tools.calling import render
from lmforge.tools.inline import result_text

pytestmark = pytest.mark.usefixtures("one_thread")

ASK = [{"role": "user", "content": "Natalia sold 48 clips and half as many in May. How many in May?"}]


def call(expr: str) -> str:
    return f'<tool_call>\n{{"name": "calculator", "arguments": {{"expression": "{expr}"}}}}\n</tool_call>'


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama_dir(tmp_path_factory.mktemp("toolgen") / "m", context=4096)


def scripted(model_dir: Path, pieces: list[tuple[str, bool]]) -> tuple[lmforge.LM, list[int]]:
    """An LM whose model writes the pieces (text, special tokens allowed: True for template text) in
    answer to ASK with the calculator offered, then ends its turn; and the prompt ids."""
    lm = lmforge.load(model_dir)
    tok = lm.tokenizer
    prompt = lm.chat_prompt(ASK, [to_openai(get_tool("calculator"))])
    script = [i for text, _ in pieces for i in tok.encode(text, add_special_tokens=False)]
    lm.model = ScriptedModel(script + [tok.token_to_id("<|im_end|>")], len(prompt), lm.config.vocab_size,
                             context=4096)
    lm.configure_engine(4)
    return lm, prompt


def forced(lm: lmforge.LM, expr: str, result: str) -> str:
    return result_text(lm.tokenizer, [to_openai(get_tool("calculator"))], "calculator", {"expression": expr}, result)


def test_result_is_forced_as_the_template_renders_the_tool_turn(model_dir):
    lm, prompt = scripted(model_dir, [])
    # The model writes the call and then (where the result goes) something else: the engine must replace it.
    wrong = forced(lm, "48/2", "99")
    lm, prompt = scripted(model_dir, [("48/2 = " + call("48/2"), False), (wrong, True), ("24 clips.\n#### 24", False)])
    msgs = lm.chat(ASK, tools=["calculator"], execute_tools=True, max_tokens=400)
    assert [m["role"] for m in msgs] == ["assistant", "tool", "assistant"]
    assert msgs[0]["content"] == "48/2 =" and msgs[0]["tool_calls"][0]["function"]["name"] == "calculator"
    assert msgs[1] == {"role": "tool", "tool_call_id": msgs[0]["tool_calls"][0]["id"], "content": "24"}
    assert msgs[2] == {"role": "assistant", "content": "24 clips.\n#### 24"}

    # Generation-time format == SFT-time format: prompt + output is the conversation as rendered for training.
    seq = lm.generate_sequences([prompt], SamplingParams(max_tokens=400), tools=["calculator"])[0]
    tools = [to_openai(get_tool("calculator"))]
    convo = ASK + [{**msgs[0], "tool_calls": [{**msgs[0]["tool_calls"][0], "function": {
        "name": "calculator", "arguments": {"expression": "48/2"}}}]}, msgs[1], msgs[2]]
    rendered_msgs, offered = render(convo, tools, native=False)
    rendered = lm.tokenizer.apply_chat_template(rendered_msgs, add_generation_prompt=False, tools=offered)
    # (the fallback writes "content\ncall"; the model wrote "content call": compare around that)
    got = lm.tokenizer.decode(seq.token_ids, skip_special_tokens=False)
    assert got + "<|im_end|>\n" == rendered.replace("48/2 =\n<tool_call>", "48/2 = <tool_call>")

    # Forced tokens are marked: one span, exactly the tokens of the forced text, and its characters in text.
    (lo, hi), = seq.forced
    assert seq.output_ids[lo:hi] == lm.tokenizer.encode(forced(lm, "48/2", "24"), add_special_tokens=False)
    (clo, chi), = seq.forced_chars
    assert seq.text[clo:chi] == forced(lm, "48/2", "24") and "<tool_response>\n24\n" in seq.text[clo:chi]
    assert seq.finish_reason == "stop" and seq.tools.calls[0]["result"] == "24"


def test_tool_errors_are_results_and_calls_are_bounded(model_dir):
    lm, _ = scripted(model_dir, [])
    with pytest.raises(lmforge.LMForgeError) as refused:
        get_tool("calculator").call({"expression": "1/0"})
    bounded = "error: no more tool calls (at most 1 per answer)"
    pieces = [(call("1/0"), False), (forced(lm, "1/0", f"error: {refused.value}"), True), (call("2+2"), False),
              (forced(lm, "2+2", bounded), True), ("done", False)]
    lm, prompt = scripted(model_dir, pieces)
    msgs = lm.chat(ASK, tools=["calculator"], execute_tools=True, max_tokens=600, max_tool_calls=1)
    assert [m["role"] for m in msgs] == ["assistant", "tool", "assistant", "tool", "assistant"]
    assert msgs[1]["content"].startswith("error: ") and "zero" in msgs[1]["content"]
    assert msgs[3]["content"] == bounded
    assert msgs[4]["content"] == "done"


class FailingHook:
    close = "</tool_call>"

    def closed(self, output: str) -> bool:
        return True

    def respond(self, output: str) -> tuple[str, list[int]]:
        raise RuntimeError("runner broke")


def test_a_failing_runner_fails_its_request_alone(model_dir):
    lm, prompt = scripted(model_dir, [(call("2+2"), False), ("more text", False)])
    a, b = lm.engine.add(prompt, SamplingParams(max_tokens=200)), lm.engine.add(prompt, SamplingParams(max_tokens=200))
    a.tools = FailingHook()
    while lm.engine.has_work:
        lm.engine.step()
    assert a.finish_reason == "error" and "runner broke" in str(a.error)
    assert b.finish_reason == "stop" and b.text == call("2+2") + "more text"


class FixedHook:
    """Forces fixed tokens whenever the output ends with `close`, at most `times` times."""

    def __init__(self, close: str, ids: list[int], times: int = 1) -> None:
        self.close, self.ids, self.times = close, ids, times

    def closed(self, output: str) -> bool:
        return True

    def respond(self, output: str) -> tuple[str, list[int]]:
        if self.times == 0:
            return "", []
        self.times -= 1
        return "<forced>", list(self.ids)


def test_other_rows_are_undisturbed_and_forced_tokens_are_prefilled_correctly(model_dir):
    # A real (random) model, greedy: rows beside a sequence that has tokens forced into it produce exactly
    # what they produce without it, and the forced sequence continues as a fresh prompt of the same tokens would.
    lm = lmforge.load(model_dir)
    tok, eng = lm.tokenizer, Engine(lm.model, lm.tokenizer, max_batch=4)
    prompts = [tok.encode(t) for t in ("The quick brown fox", "Hello world! This is", "The cat sat on the mat")]
    params = SamplingParams(max_tokens=24, ignore_eos=True, temperature=0.0)
    alone = [s.output_ids for s in eng.generate([prompts[0], prompts[2]], params)]

    # The hook fires when the tool row's output reaches the text of its first k tokens (whole characters).
    k = next(k for k in range(2, 12) if "\ufffd" not in eng.generate(
        [prompts[1]], SamplingParams(max_tokens=k, ignore_eos=True, temperature=0.0))[0].text)
    close = eng.generate([prompts[1]], SamplingParams(max_tokens=k, ignore_eos=True, temperature=0.0))[0].text
    inject = tok.encode(" cat sat on the mat", add_special_tokens=False)
    seqs = [eng.add(p, params) for p in prompts]
    seqs[1].tools = FixedHook(close, inject)
    while eng.has_work:
        eng.step()
    assert [seqs[0].output_ids, seqs[2].output_ids] == alone
    tool_row = seqs[1]
    assert tool_row.forced == [(k, k + len(inject))] and tool_row.output_ids[k:k + len(inject)] == inject
    assert tool_row.forced_chars and tool_row.text[slice(*tool_row.forced_chars[0])] == "<forced>"
    cut = k + len(inject)
    fresh = eng.generate([prompts[1] + tool_row.output_ids[:cut]],
                         SamplingParams(max_tokens=len(tool_row.output_ids) - cut, ignore_eos=True,
                                        temperature=0.0))[0]
    assert tool_row.output_ids[cut:] == fresh.output_ids


def test_generate_with_tools_and_a_text_prompt(model_dir):
    lm, _ = scripted(model_dir, [])
    lm, prompt = scripted(model_dir, [(call("6*7"), False), (forced(lm, "6*7", "42"), True), ("#### 42", False)])
    text = lm.generate(lm.tool_prompt(ASK, ["calculator"]), tools=["calculator"], max_tokens=400)
    assert text.endswith("<tool_response>\n42\n</tool_response><|im_end|>\n<|im_start|>assistant\n#### 42")
    with pytest.raises(lmforge.LMForgeError, match="unknown tool"):
        lm.generate("x", tools=["no_such_tool"])


def test_tool_prompt_is_the_chat_prompt_that_offers_the_tools(model_dir):
    lm = lmforge.load(model_dir)
    assert lm._prompt_ids(lm.tool_prompt(ASK, ["calculator"])) == lm.chat_prompt(ASK, [to_openai(get_tool("calculator"))])


def test_eval_with_tools_executed_or_written_by_the_model(model_dir, tmp_path):
    from lmforge.eval import EvalOptions, evaluate, get_task

    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps({"question": ASK[0]["content"], "answer": "So 24.\n#### 24"}) + "\n"
                            for _ in range(2)))
    lm, _ = scripted(model_dir, [])
    # The model calls 48/2, then (had the result not been forced) writes 25 as the result itself; it answers 24.
    own = forced(lm, "48/2", "25")
    lm, _ = scripted(model_dir, [(call("48/2"), False), (own, True), ("#### 24\n", False)])
    spec = get_task("gsm8k")
    docs = {on: evaluate(lm, [spec], {"gsm8k": str(data)}, EvalOptions(batch_size=2, tools=("calculator",),
                                                                           tool_execution=on))
            for on in (True, False)}
    for on, doc in docs.items():
        assert doc["results"][0]["value"] == 1.0 and doc["options"]["tool_execution"] is on
        for s in doc["samples"]["gsm8k"]:
            assert s["completion"].endswith("#### 24\n") and s["tool_calls"] == (1 if on else 0)
            assert ("<tool_response>\n24\n" if on else "<tool_response>\n25\n") in s["completion"]
    with pytest.raises(lmforge.LMForgeError, match="0-shot"):
        evaluate(lm, [spec], {"gsm8k": str(data)}, EvalOptions(shots=2, tools=("calculator",)))


def test_tools_with_a_decoding_constraint_fail_that_request_clearly(model_dir):
    from lmforge.tools.calling import check_tools
    from lmforge.tools.inline import ToolRunner

    lm, prompt = scripted(model_dir, [(call("2+2"), False), ("more", False)])
    tools = [to_openai(get_tool("calculator"))]
    gen = lm.start(prompt, SamplingParams(max_tokens=200), lm.tool_constraint(check_tools(tools, "auto")))
    gen.sequence.tools = ToolRunner([get_tool("calculator")], lm.tokenizer)
    for _ in gen:
        pass
    assert gen.sequence.finish_reason == "error" and "decoding constraint" in str(gen.sequence.error)
