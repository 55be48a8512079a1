"""Knowledge-base QA: retrieve the best chunks, then let a chat model answer from them, citing sources."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from ..engine import SamplingParams
from ..errors import LMForgeError
from .index import Hit, Index

SYSTEM_PROMPT = (
    "Answer the question using only the numbered context passages. Cite the passages you use as [1], [2]. "
    "If the passages do not contain the answer, say that you do not know."
)


@dataclass
class Answer:
    text: str
    sources: list[str]  # the files the answer cites (all retrieved ones if it cites none), best first
    hits: list[Hit] = field(default_factory=list)


def build_messages(question: str, hits: list[Hit], budget_words: int | None = None) -> list[dict[str, str]]:
    """The chat prompt: numbered passages with their source files, then the question."""
    parts = []
    for i, h in enumerate(hits, 1):
        words = h.text.split()
        if budget_words is not None:
            words = words[:max(budget_words // len(hits), 16)]
        parts.append(f"[{i}] (source: {h.source})\n{' '.join(words)}")
    context = "\n\n".join(parts)
    return [{"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": f"Context:\n{context}\n\nQuestion: {question}"}]


def answer(lm: Any, index: Index, question: str, k: int = 3, params: SamplingParams | None = None) -> Answer:
    """Retrieve k chunks for the question and answer it with the chat model ``lm`` (an `lmforge.LM`)."""
    if lm.is_encoder:
        raise LMForgeError("ask needs a chat (decoder) model for --model, not an encoder")
    params = params or SamplingParams(temperature=0.0)
    hits = index.search(question, k=k)
    budget = None
    ids = lm.chat_prompt(build_messages(question, hits))
    room = lm.context_length - params.max_tokens
    while len(ids) >= room:  # shrink the passages until the prompt leaves room for the answer
        budget = int(0.7 * (budget or sum(len(h.text.split()) for h in hits)))
        if budget < 16 * len(hits):
            raise LMForgeError(f"the passages do not fit in the {lm.context_length}-token context with "
                               f"{params.max_tokens} tokens kept for the answer; lower max tokens or k")
        ids = lm.chat_prompt(build_messages(question, hits, budget))
    text = lm.generate_sequences([ids], params)[0].text
    cited = [int(n) for n in re.findall(r"\[(\d+)\]", text) if 1 <= int(n) <= len(hits)]
    order = [hits[n - 1].source for n in cited] or [h.source for h in hits]
    return Answer(text, list(dict.fromkeys(order)), hits)
