"""SFT on conversations with tool calls: rendered through the same path as prompts and tools inside
generation, tool results (and everything else not written by the assistant) masked from the loss; and the
GSM8K calculator-annotation converter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny import CHATML_TEMPLATE, make_tiny_llama_dir, train_tokenizer

from lmforge.finetune.data import IGNORE, load_conversations, to_messages
from lmforge.finetune.sft import FinetuneConfig, FinetuneRun
from lmforge.finetune.toolcalls import convert_gsm8k, gsm8k_conversation
from lmforge.tokenizer import Tokenizer
from lmforge.tools import get_tool, to_openai
from lmforge.tools.inline import result_text

pytestmark = pytest.mark.usefixtures("one_thread")

GSM8K = Path("/work/shared/data/gsm8k/train.jsonl")
CALL = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "48/2"}}\n</tool_call>'


def _tok() -> Tokenizer:
    return Tokenizer(train_tokenizer(), eos_token="<|im_end|>", chat_template=CHATML_TEMPLATE)


def _record() -> dict:
    return {"messages": [
        {"role": "user", "content": "How many in May?"},
        {"role": "assistant", "content": "48/2 =", "tool_calls": [
            {"id": "c0", "type": "function", "function": {"name": "calculator", "arguments": '{"expression": "48/2"}'}}]},
        {"role": "tool", "tool_call_id": "c0", "content": "24"},
        {"role": "assistant", "content": "24 clips.\n#### 24"}],
        "tools": [to_openai(get_tool("calculator"))]}


def test_tool_results_are_masked_and_assistant_calls_are_trained():
    from lmforge.finetune.data import encode_conversation

    tok = _tok()
    ex = encode_conversation(tok, to_messages(_record(), "chatml"))
    text = tok.decode(ex.ids, skip_special_tokens=False)
    # The system turn offers the calculator (as a prompt offering it does); the conversation ends as written.
    assert "<tools>" in text and text.endswith("24 clips.\n#### 24<|im_end|>\n")
    trained = [(i, lab) for i, lab in zip(ex.ids, ex.labels) if lab != IGNORE]
    assert all(i == lab for i, lab in trained)
    # The trained tokens are exactly the two assistant replies, each through its end-of-turn token.
    spans, start = [], None
    for k, lab in enumerate([*ex.labels, IGNORE]):
        if lab != IGNORE and start is None:
            start = k
        elif lab == IGNORE and start is not None:
            spans.append(tok.decode(ex.ids[start:k], skip_special_tokens=False))
            start = None
    assert spans == [f"48/2 =\n{CALL}<|im_end|>", "24 clips.\n#### 24<|im_end|>"]
    # The tool turn, as tools inside generation force it after the call, carries no labels at all.
    forced = result_text(tok, [to_openai(get_tool("calculator"))], "calculator", {"expression": "48/2"}, "24")
    after_call = text.index(CALL) + len(CALL)
    assert text[after_call:].startswith(forced)
    forced_ids = tok.encode(forced.removeprefix("<|im_end|>"), add_special_tokens=False)
    k = next(k for k in range(len(ex.ids)) if ex.ids[k:k + len(forced_ids)] == forced_ids)
    assert ex.labels[k:k + len(forced_ids)] == [IGNORE] * len(forced_ids)
    assert "<tool_response>\n24\n</tool_response>" in tok.decode(ex.ids[k:k + len(forced_ids)],
                                                                 skip_special_tokens=False)


def test_malformed_tool_messages_are_named(tmp_path):
    bad = _record()
    del bad["messages"][2]["tool_call_id"]
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(bad) + "\n")
    from lmforge.errors import LMForgeError
    from lmforge.finetune.data import build_sft_examples

    with pytest.raises(LMForgeError, match="tool_call_id"):
        build_sft_examples(_tok(), load_conversations(path), 4096)


def test_gsm8k_annotations_become_calculator_calls_on_real_lines(tmp_path):
    lines = GSM8K.read_text().splitlines()[:5]
    src = tmp_path / "train.jsonl"
    src.write_text("\n".join(lines) + "\n")
    out = tmp_path / "tools.jsonl"
    stats = convert_gsm8k(src, out)
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert stats["examples"] == 5 == len(recs)
    assert stats["calls"] == sum(line.count("<<") for line in lines)
    first = recs[0]["messages"]
    assert first[1]["content"] == "Natalia sold 48/2 ="
    assert json.loads(first[1]["tool_calls"][0]["function"]["arguments"]) == {"expression": "48/2"}
    assert first[2] == {"role": "tool", "tool_call_id": first[1]["tool_calls"][0]["id"], "content": "24"}
    assert first[3]["content"] == "24 clips in May.\nNatalia sold 48+24 ="
    assert first[-1] == {"role": "assistant", "content": "72 clips altogether in April and May.\n#### 72"}
    # Dropping the calls and splicing each result back in gives GSM8K's solution without its markup.
    for line, rec in zip(lines, recs):
        answer = json.loads(line)["answer"]
        text = "".join((m["content"] + " " if m.get("tool_calls") else m["content"])
                       for m in rec["messages"][1:] if m["role"] == "assistant")
        import re

        plain = re.sub(r"<<[^>]*>>", "", answer)
        assert text.replace(" ", "") == plain.replace(" ", "")
    assert recs[0]["tools"] == [to_openai(get_tool("calculator"))]


def test_annotations_the_calculator_does_not_reproduce_stay_text():
    rec, called, kept = gsm8k_conversation("q", "So 10/3 = <<10/3=3.33>>3.33 and 2*3=<<2*3=6>>6.\n#### 6")
    assert (called, kept) == (1, 1)
    assert rec["messages"][1]["content"] == "So 10/3 = 3.33 and 2*3="
    assert rec["messages"][-1]["content"] == "6.\n#### 6"


def test_sft_cli_trains_on_converted_gsm8k(tmp_path_factory, tmp_path, capsys):
    from lmforge.cli import main

    tiny = make_tiny_llama_dir(tmp_path_factory.mktemp("m"), context=2048)
    data = tmp_path / "g.jsonl"
    assert main(["finetune", "gsm8k-tools", str(GSM8K), "--out", str(data), "--limit", "8"]) == 0
    assert "wrote 8 conversations" in capsys.readouterr().out
    run = FinetuneRun(tiny, data, tmp_path / "run", FinetuneConfig(max_steps=2, batch_size=2, val_fraction=0.25,
                                                                    samples=0, eval_every=2, save_every=2),
                      log=lambda s: None)
    assert run.stats.kept == 8 and run.fit()
    assert main(["finetune", "gsm8k-tools", str(tmp_path / "missing.jsonl"), "--out", str(data)]) == 1
    assert "no such file" in capsys.readouterr().err


def test_jsonl_strings_may_hold_unicode_line_separators(tmp_path):
    # GSM8K holds U+2028 inside strings; JSONL lines are split at "\n" only.
    rec = _record()
    rec["messages"][0]["content"] = "How many\u2028in May?"
    path = tmp_path / "sep.jsonl"
    path.write_text(json.dumps(rec, ensure_ascii=False) + "\n" + json.dumps(_record()) + "\n", encoding="utf-8")
    convs = load_conversations(path)
    assert len(convs) == 2 and convs[0][0]["content"] == "How many\u2028in May?"
