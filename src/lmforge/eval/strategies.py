"""Reasoning strategies: answer directly, think step by step (chain of thought), vote over sampled chains
(self-consistency), or draft, critique and revise (self-refine).

Every strategy works on a batch of questions and puts all of its generations of one stage through the
engine together: the k chains of every question in self-consistency are one engine run, and each
self-refine round is one run of drafts or revisions (and one of critiques when the model is its own
critic). ``lm`` is duck-typed: anything with ``chat_prompt(messages, tools)`` and an ``engine`` (an `LM`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..engine import SamplingParams
from ..engine.sampling import DEFAULT_TEMPERATURE, choice_seed
from ..errors import LMForgeError
from .generate import drive, extract_answer, is_correct
from .tasks import Item

STRATEGIES = ("direct", "cot", "self-consistency", "self-refine")

# Prompt templates; "{question}" is the question as asked. The chain-of-thought one ends with GSM8K's
# answer marker, which `extract_answer` looks for first (and falls back to the last number without it).
DIRECT_PROMPT = "{question}\n\nReply with only the final answer, no explanation."
COT_PROMPT = ("{question}\n\nLet's think step by step. Then write the final answer on the last line, "
              "after '####'.")
CRITIQUE_PROMPT = ("Check this answer to the question for mistakes, step by step. If it is correct, reply "
                   "with exactly: {no_issues}\n\nQuestion: {question}\n\nAnswer: {draft}")
REVISE_PROMPT = ("Feedback on your answer:\n{feedback}\n\nWrite a corrected answer to the question. End with "
                 "the final answer on the last line, after '####'.")
# A model critique holding this (any case) means the critic found nothing to fix.
NO_ISSUES = "NO ISSUES"
# The most tokens of one completion: an answer alone needs few, a chain of reasoning more.
DIRECT_MAX_TOKENS = 64
CHAIN_MAX_TOKENS = 256

# (question, draft) -> what is wrong with the draft, or None when nothing is.
Critic = Callable[[str, str], "str | None"]


@dataclass
class Strategy:
    """How to answer: the strategy's name and its settings. ``temperature`` and ``max_tokens`` default by
    strategy: greedy for all but self-consistency (which samples at the engine's default temperature),
    `DIRECT_MAX_TOKENS` for direct answers and `CHAIN_MAX_TOKENS` for chains. ``extract``: how the answer
    is read from a completion (`extract_answer`'s ``number`` or ``regex:PATTERN``), or None for the whole
    completion."""

    name: str = "direct"
    n: int = 5  # self-consistency: chains per question
    max_rounds: int = 2  # self-refine: critique-and-revise rounds at most
    temperature: float | None = None
    max_tokens: int | None = None
    top_p: float = 1.0
    seed: int | None = None
    extract: str | None = "number"
    system: str | None = None

    def __post_init__(self) -> None:
        if self.name not in STRATEGIES:
            raise LMForgeError(f"unknown strategy {self.name!r} (use {', '.join(STRATEGIES)})")
        if not isinstance(self.n, int) or self.n < 1:
            raise LMForgeError(f"self-consistency needs n >= 1 chains, got {self.n!r}")
        if not isinstance(self.max_rounds, int) or self.max_rounds < 0:
            raise LMForgeError(f"self-refine needs max_rounds >= 0, got {self.max_rounds!r}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise LMForgeError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.extract is not None:
            extract_answer("", self.extract)  # a bad extraction is refused now, not after the generations
        self.params(0)  # the sampling parameters' own checks (temperature, top_p, seed ranges)

    def params(self, index: int) -> SamplingParams:
        """The sampling parameters of chain ``index`` of a question (distinct seeds for distinct chains)."""
        sampled = self.name == "self-consistency"
        temperature = self.temperature if self.temperature is not None else (
            DEFAULT_TEMPERATURE if sampled else 0.0)
        max_tokens = self.max_tokens or (DIRECT_MAX_TOKENS if self.name == "direct" else CHAIN_MAX_TOKENS)
        return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=self.top_p,
                              seed=choice_seed(self.seed, index))

    def answer(self, text: str) -> str | None:
        if self.extract is None:
            return text.strip() or None
        return extract_answer(text, self.extract)


@dataclass
class Solution:
    """One question's result. ``text`` is the completion the answer came from; ``chains`` every completion
    made for the question in order (the k samples, or self-refine's drafts), with ``answers`` extracted from
    each; ``votes`` counts the answers (self-consistency); ``critiques`` holds self-refine's feedback after
    each draft it critiqued (None where the critic found nothing to fix)."""

    question: str
    strategy: str
    answer: str | None
    text: str
    chains: list[str]
    answers: list[str | None]
    votes: dict[str, int] = field(default_factory=dict)
    critiques: list[str | None] = field(default_factory=list)


def majority_vote(answers: Sequence[str | None]) -> tuple[str | None, dict[str, int]]:
    """The most frequent answer (None, an unreadable chain, never wins) and the counts. A tie goes to the
    answer that appeared first, so the vote is deterministic."""
    votes: dict[str, int] = {}
    for a in answers:
        if a is not None:
            votes[a] = votes.get(a, 0) + 1
    if not votes:
        return None, votes
    best = max(votes.values())
    return next(a for a in votes if votes[a] == best), votes  # dicts keep first-seen order


def parse_critique(text: str) -> str | None:
    """A model critique as feedback: None when it says the answer has no issues."""
    return None if NO_ISSUES.lower() in text.lower() or not text.strip() else text.strip()


# -- generation --------------------------------------------------------------------------------------------
def _messages(st: Strategy, *turns: str) -> list[dict[str, str]]:
    msgs = [{"role": "system", "content": st.system}] if st.system else []
    roles = ("user", "assistant")
    return msgs + [{"role": roles[i % 2], "content": t} for i, t in enumerate(turns)]


def complete(lm: Any, conversations: list[list[dict[str, str]]], params: list[SamplingParams],
             tools: Sequence[Any] | None = None, progress: bool = False, desc: str = "") -> list[str]:
    """The assistant's reply to each conversation, all queued on ``lm``'s engine before it runs, so they
    decode together (``engine.max_batch`` at a time). A sequence that fails raises its error."""
    engine = lm.engine
    offered, runner = None, None
    if tools:
        from ..tools.base import to_openai
        from ..tools.inline import MAX_TOOL_CALLS, ToolRunner, resolve_tools

        resolved = resolve_tools(list(tools))
        offered = [to_openai(t) for t in resolved]

        def runner() -> Any:  # calls the model writes run during decoding, their results forced into its text
            return ToolRunner(resolved, lm.tokenizer, MAX_TOOL_CALLS)

    seqs: list[Any] = []
    try:
        for msgs, sp in zip(conversations, params):
            seqs.append(engine.add(lm.chat_prompt(msgs, offered), sp))
            if runner is not None:
                seqs[-1].tools = runner()
        drive(engine, seqs, desc or "generate", progress, unit="seq")
    finally:
        for s in seqs:
            if not s.done:  # a prompt that did not fit, or an interruption: leave the engine empty
                engine.cancel(s)
    failed = next((s for s in seqs if s.error is not None), None)
    if failed is not None:
        raise LMForgeError(f"generation failed: {failed.error}")
    return [s.text for s in seqs]


# -- the strategies ----------------------------------------------------------------------------------------
def solve(lm: Any, questions: str | list[str], strategy: str | Strategy = "direct", *,
          tools: Sequence[Any] | None = None, critic: Critic | None = None, progress: bool = False,
          **options: Any) -> Solution | list[Solution]:
    """Answer a question (returns a Solution) or a batch of them (a list), with one strategy.

    ``strategy``: a name from `STRATEGIES` (with `Strategy`'s fields as keyword ``options``: ``n``,
    ``max_rounds``, ``temperature``, ...) or a `Strategy`. ``tools``: tools the model may call while it
    answers (`Tool` objects or registered names). ``critic``: self-refine's critic (see `self_refine`).
    """
    st = strategy if isinstance(strategy, Strategy) else Strategy(strategy, **options)
    if isinstance(strategy, Strategy) and options:
        raise LMForgeError(f"pass options in the Strategy, not beside it: {', '.join(options)}")
    if critic is not None and st.name != "self-refine":
        raise LMForgeError(f"a critic is used by self-refine only, not by {st.name}")
    qs = [questions] if isinstance(questions, str) else list(questions)
    if st.name == "self-refine":
        out = self_refine(lm, qs, critic=critic, strategy=st, tools=tools, progress=progress)
    else:
        k = st.n if st.name == "self-consistency" else 1
        template = DIRECT_PROMPT if st.name == "direct" else COT_PROMPT
        convs = [_messages(st, template.format(question=q)) for q in qs for _ in range(k)]
        texts = complete(lm, convs, [st.params(j) for _ in qs for j in range(k)], tools, progress, st.name)
        out = []
        for i, q in enumerate(qs):
            chains = texts[i * k:(i + 1) * k]
            answers = [st.answer(t) for t in chains]
            best, votes = majority_vote(answers)
            text = chains[answers.index(best)] if best is not None else chains[0]
            out.append(Solution(q, st.name, best, text, chains, answers,
                                votes if st.name == "self-consistency" else {}))
    return out[0] if isinstance(questions, str) else out


def self_refine(lm: Any, questions: list[str], *, critic: Critic | None = None, max_rounds: int | None = None,
                strategy: Strategy | None = None, tools: Sequence[Any] | None = None,
                drafts: list[str] | None = None, prompt: str = COT_PROMPT, revise_prompt: str = REVISE_PROMPT,
                progress: bool = False) -> list[Solution]:
    """Draft, critique, revise: up to ``max_rounds`` rounds per question, each question stopping as soon as
    its critique finds nothing to fix.

    ``critic(question, draft)`` returns what is wrong with the draft, or None when nothing is (a test runner
    that returns the failure message, say); without one the model critiques its own drafts (`CRITIQUE_PROMPT`;
    a reply holding `NO_ISSUES` means none). ``drafts``: first drafts to start from instead of generating
    them. ``prompt`` (with ``{question}``) asks for a draft and ``revise_prompt`` (with ``{feedback}``) for a
    revision, which the model writes after the question, its last draft and the feedback. All drafts of a
    round, and all model critiques of a round, are generated together. ``max_rounds`` overrides the
    strategy's; ``strategy`` gives the sampling settings (default: greedy, `CHAIN_MAX_TOKENS`).
    """
    st = strategy or Strategy("self-refine")
    rounds = st.max_rounds if max_rounds is None else max_rounds
    if not isinstance(rounds, int) or rounds < 0:
        raise LMForgeError(f"self-refine needs max_rounds >= 0, got {rounds!r}")
    if drafts is not None and len(drafts) != len(questions):
        raise LMForgeError(f"{len(drafts)} drafts for {len(questions)} questions")
    if "{question}" not in prompt or "{feedback}" not in revise_prompt:
        raise LMForgeError("self-refine: prompt needs {question} and revise_prompt needs {feedback}")
    asks = [prompt.format(question=q) for q in questions]
    if drafts is None:
        drafts = complete(lm, [_messages(st, a) for a in asks], [st.params(0)] * len(questions), tools, progress,
                          "draft")
    history = [[d] for d in drafts]
    critiques: list[list[str | None]] = [[] for _ in questions]
    active = list(range(len(questions)))
    for _ in range(rounds):
        if not active:
            break
        if critic is None:
            convs = [_messages(st, CRITIQUE_PROMPT.format(no_issues=NO_ISSUES, question=questions[i],
                                                          draft=history[i][-1])) for i in active]
            feedback = [parse_critique(t) for t in
                        complete(lm, convs, [st.params(0)] * len(active), tools, progress, "critique")]
        else:
            feedback = [critic(questions[i], history[i][-1]) for i in active]
        for i, f in zip(active, feedback):
            critiques[i].append(f)
        active = [i for i, f in zip(active, feedback) if f is not None]
        if not active:
            break
        convs = [_messages(st, asks[i], history[i][-1], revise_prompt.format(feedback=critiques[i][-1]))
                 for i in active]
        for i, t in zip(active, complete(lm, convs, [st.params(0)] * len(active), tools, progress, "revise")):
            history[i].append(t)
    out = []
    for q, chain, crit in zip(questions, history, critiques):
        answers = [st.answer(t) for t in chain]
        out.append(Solution(q, "self-refine", answers[-1], chain[-1], chain, answers, {}, crit))
    return out


def evaluate_strategy(lm: Any, items: list[Item], st: Strategy, tools: Sequence[Any] | None = None,
                      progress: bool = False) -> tuple[dict[str, list[int]], list[dict[str, Any]]]:
    """A generative task's items answered with a strategy (each item's ``question``), scored by exact match
    with the reference (`is_correct`): ({"exact_match": [0 or 1 per item]}, per-item records)."""
    sols = solve(lm, [it.question for it in items], st, tools=tools, progress=progress)
    em, samples = [], []
    for it, sol in zip(items, sols):
        ref = str(it.gold)
        ok = int(is_correct(sol.answer, ref, st.extract) if st.extract else sol.answer == ref.strip())
        em.append(ok)
        rec: dict[str, Any] = {"index": it.index, "completion": sol.text, "prediction": sol.answer,
                               "reference": ref, "exact_match": ok}
        if len(sol.chains) > 1:
            rec.update(chains=sol.chains, answers=sol.answers)
        if sol.votes:
            rec["votes"] = sol.votes
        if sol.critiques:
            rec["critiques"] = sol.critiques
        samples.append(rec)
    return {"exact_match": em}, samples
