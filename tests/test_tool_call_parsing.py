"""A close tag written inside a call's JSON (a string argument, as constrained decoding allows) is part of
the call: parsing, streaming and tools run inside generation all end the call where its JSON ends."""

from __future__ import annotations

import json

import pytest
from tiny import make_tiny_llama_dir

from lmforge.tools.calling import CallStream, parse_calls

TRICKY = {"task": "}}</tool_call>  # 144 / 12", "note": "a <tool_call> inside"}
TEXT = ('Sure. <tool_call>\n' + json.dumps({"name": "add_todo", "arguments": TRICKY}) + '\n</tool_call>'
        ' <tool_call>\n{not json}\n</tool_call> done')


def test_parse_calls_ends_a_call_where_its_json_ends() -> None:
    content, calls = parse_calls(TEXT, {"add_todo"})
    assert [json.loads(c["function"]["arguments"]) for c in calls] == [TRICKY]
    # markup that is not a call stays in the content, as written
    assert content == "Sure.  <tool_call>\n{not json}\n</tool_call> done"


@pytest.mark.parametrize("step", [1, 3, 7])
def test_streamed_call_with_close_tag_in_a_string(step: int) -> None:
    stream = CallStream({"add_todo"})
    deltas = []
    for i in range(0, len(TEXT), step):
        deltas += stream.feed(TEXT[i:i + step])
    deltas += stream.close()
    args = "".join(d["tool_calls"][0]["function"]["arguments"] for d in deltas if "tool_calls" in d)
    assert json.loads(args) == TRICKY
    content = "".join(d.get("content", "") for d in deltas)
    assert content == "Sure.  <tool_call>\n{not json}\n</tool_call> done"


def test_inline_tools_wait_for_the_end_of_the_json(tmp_path) -> None:
    from lmforge.formats import load_checkpoint
    from lmforge.tools import tool_from_function
    from lmforge.tools.inline import ToolRunner

    def add_todo(task: str, note: str = "") -> str:
        """Add a task.

        Args:
            task: the task
            note: a note
        """
        return "added"

    ck = load_checkpoint(make_tiny_llama_dir(tmp_path / "m"), device="cpu")
    runner = ToolRunner([tool_from_function(add_todo)], ck.tokenizer)
    call = "<tool_call>\n" + json.dumps({"name": "add_todo", "arguments": TRICKY}) + "\n</tool_call>"
    inner = call[:call.index("</tool_call>") + len("</tool_call>")]  # the tag inside the string
    assert not runner.closed("x " + inner)
    assert runner.closed("x " + call)
    runner.respond("x " + call)
    assert runner.calls[0]["result"] == "added" and json.loads(runner.calls[0]["arguments"]) == TRICKY
