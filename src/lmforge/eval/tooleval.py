"""Generative tasks with tools offered (`lmforge eval --tools calculator`): 0-shot chat prompts that offer
the tools, as `lmforge finetune gsm8k-tools` data does, with the calls run during generation, or, with
``--tool-execution off``, not run: generation then goes on through the model's end of turn, so the model
writes the tool turn and its result itself. Either way the answer is read from the text through the first
``####`` line (where generation stops)."""

from __future__ import annotations

import re
from typing import Any

from ..errors import LMForgeError
from .generate import drive, extract_answer, is_correct
from .tasks import Item, TaskSpec

TOOL_ROOM = 256  # tokens added to a task's max_tokens for the calls and the results forced into the text
_ANSWER_LINE = re.compile(r"####[^\n]*\d[^\n]*\n")


def answer_text(text: str) -> str:
    """The text through its first ``####`` line that holds a number (all of it when there is none)."""
    m = _ANSWER_LINE.search(text)
    return text[:m.end()] if m else text


def run_with_tools(lm: Any, spec: TaskSpec, items: list[Item], tools: list[str], execute: bool, batch_size: int,
                   progress: bool) -> tuple[dict[str, list[int]], list[dict[str, Any]]]:

    from ..engine import Engine, SamplingParams
    from ..tools.base import to_openai
    from ..tools.inline import MAX_TOOL_CALLS, ToolRunner, resolve_tools

    if spec.kind != "generate":
        raise LMForgeError(f"--tools applies to generative tasks; {spec.name} is a {spec.kind.replace('_', '-')} task")
    resolved = resolve_tools(tools)
    offered = [to_openai(t) for t in resolved]
    engine = Engine(lm.model, lm.tokenizer, max_batch=batch_size)
    max_tokens = max(1, min(spec.max_tokens + TOOL_ROOM, engine.context // 2))
    # Without execution the model's end of turn after a call does not end the answer: it goes on to write
    # the tool turn itself.
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, stop=list(spec.stop), ignore_eos=not execute)
    seqs = []
    for it in items:
        ids = lm.chat_prompt([{"role": "user", "content": it.question or it.contexts[0]}], offered)
        seqs.append(engine.add(ids[-(engine.context - max_tokens):], params))
        if execute:
            seqs[-1].tools = ToolRunner(resolved, lm.tokenizer, MAX_TOOL_CALLS)
    def stop_answered() -> None:
        for s in seqs:
            if not s.done and _ANSWER_LINE.search(s.text):
                engine.cancel(s)  # the answer is written: what follows is never read

    drive(engine, seqs, spec.name, progress, after_step=stop_answered)
    em, samples = [], []
    for it, s in zip(items, seqs):
        if s.error is not None:
            raise LMForgeError(f"{spec.name} item {it.index}: generation failed: {s.error}")
        text = answer_text(s.text)
        pred = extract_answer(text, spec.extract)
        ok = int(is_correct(pred, str(it.gold), spec.extract))
        em.append(ok)
        samples.append({"index": it.index, "completion": text, "prediction": pred, "reference": str(it.gold),
                        "exact_match": ok, "tool_calls": len(s.forced)})
    return {"exact_match": em}, samples
