"""Code generation tasks (HumanEval): completions from the batched engine, each run with the task's tests in
the `python` sandbox, scored by pass@k with the unbiased estimator.

A record's ``context`` template renders the prompt (a function signature and docstring) and its ``answer``
template the test program (``check(entry_point)`` included), which runs after the prompt and the model's
code. A completion passes when that program exits with status 0 within the task's ``timeout``; a failed
assertion, an exception, a timeout or a sandbox that cannot start is a failure, and its reason is kept.
"""

from __future__ import annotations

import math
import os
import re
import textwrap
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

from ..engine import SamplingParams
from ..errors import LMForgeError
from .strategies import Strategy, self_refine
from .tasks import Item, TaskSpec

SAMPLED_TEMPERATURE = 0.8  # with n > 1 samples and no --temperature: diverse samples, as pass@k needs
FEEDBACK_CHARS = 1500  # the tail of a failing run's output that a revision sees
# The chat prompt: the model answers with the whole function in a fenced block (`extract_code`).
CHAT_INSTRUCTION = ("Complete the following Python function. Reply with the whole function, including the "
                    "signature, in one ```python code block.\n\n```python\n{question}```")
REVISE_INSTRUCTION = ("Your code failed the tests:\n```\n{feedback}\n```\nFix the function. Reply with the "
                      "whole corrected function in one ```python code block.")


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimate of pass@k from ``n`` samples of which ``c`` passed: 1 - C(n-c, k) / C(n, k).

    Computed as 1 - prod_{i=n-c+1}^{n} (1 - k/i), which never forms the huge binomials."""
    if not (0 <= c <= n and 1 <= k <= n):
        raise LMForgeError(f"pass@k needs 0 <= c <= n and 1 <= k <= n (got n={n}, c={c}, k={k})")
    if n - c < k:  # every k-subset holds a passing sample
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def pass_ks(metrics: Iterable[str], n: int) -> list[int]:
    """The k of each ``pass@k`` metric that ``n`` samples can estimate (k <= n)."""
    ks = []
    for m in metrics:
        k = m.removeprefix("pass@")
        if m == k or not k.isdigit() or int(k) < 1:
            raise LMForgeError(f"a code task's metrics are pass@K (K >= 1), got {m!r}")
        if int(k) <= n:
            ks.append(int(k))
    if not ks:
        raise LMForgeError(f"none of the task's metrics ({', '.join(metrics)}) can be estimated from n={n} samples")
    return ks


# -- code in a completion --------------------------------------------------------------------------------------
_FENCE = re.compile(r"^[ \t]*```[ \t]*([\w+.-]*)[^\n]*\n(.*?)(?:^[ \t]*```|\Z)", re.S | re.M)
_PYTHON = {"", "python", "python3", "py"}


def entry_point(prompt: str) -> str | None:
    """The function a HumanEval-style prompt asks for: its last top-level ``def``."""
    names = re.findall(r"^def\s+(\w+)\s*\(", prompt, re.M)
    return names[-1] if names else None


def _defines(code: str, name: str | None) -> bool:
    return name is not None and re.search(rf"^def\s+{re.escape(name)}\s*\(", code, re.M) is not None


def extract_code(completion: str, name: str | None = None) -> str:
    """The code in a completion: the fenced block that defines ``name`` (else the first Python or unlabelled
    block, else the first block; an unclosed fence runs to the end), or the whole text when there is no fence."""
    blocks = [(lang.lower(), body.rstrip()) for lang, body in _FENCE.findall(completion)]
    if not blocks:
        return completion
    for _, body in blocks:
        if _defines(textwrap.dedent(body), name):
            return textwrap.dedent(body)
    return next((body for lang, body in blocks if lang in _PYTHON), blocks[0][1])


def build_program(prompt: str, code: str, tests: str) -> str:
    """The program the sandbox runs: the prompt (its imports and helpers) then the code, then the tests.

    Code that defines the prompt's function again replaces the prompt's stub; other code continues the
    prompt (a function body)."""
    head = prompt + "\n" if _defines(code, entry_point(prompt)) else prompt
    return head + code + "\n\n" + tests + "\n"


# -- running tests ------------------------------------------------------------------------------------------
@dataclass
class Outcome:
    passed: bool
    reason: str | None  # why it failed: the error's last line, a timeout, a sandbox failure
    feedback: str  # what a revision is shown: the tail of the output and how the run ended

    def record(self) -> dict[str, Any]:
        return {"passed": self.passed, "reason": self.reason}


def _last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1].strip() if lines else ""


def run_tests(program: str, timeout: float) -> Outcome:
    """Run one program in the sandbox; a sandbox that cannot run it counts as a failure, with its reason."""
    from ..tools import ToolError, run_python

    try:
        r = run_python(program, timeout=timeout, cpu_seconds=max(1, math.ceil(timeout)))
    except ToolError as e:
        return Outcome(False, f"sandbox error: {e}", f"sandbox error: {e}")
    if r.ok:
        return Outcome(True, None, "")
    text = r.text()
    reason = r.reason or _last_line(r.output) or f"exit status {r.exit_code}"
    tail = text[-FEEDBACK_CHARS:]
    return Outcome(False, reason, re.sub(r'File "/[^"]*/main\.py"', 'File "main.py"', tail))


def workers() -> int:
    """Sandbox runs at once: one per available core, at most 4 (each is a process with its own limits)."""
    return max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


class CheckPool:
    """Runs test programs on a bounded thread pool while the engine keeps generating."""

    def __init__(self, timeout: float, max_workers: int | None = None) -> None:
        self.timeout = timeout
        self._pool = ThreadPoolExecutor(max_workers=max_workers or workers(), thread_name_prefix="lmforge-tests")

    def submit(self, program: str) -> Future[Outcome]:
        return self._pool.submit(run_tests, program, self.timeout)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> CheckPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- the task ----------------------------------------------------------------------------------------------
CHAT_STOP = ["\n```\n"]  # the fence that closes the reply's code block (the opening one is ```python)


@dataclass
class _CodeStrategy(Strategy):
    """A strategy whose completions also end at the task's stop strings (self-refine's revisions too)."""

    stop: list[str] = field(default_factory=list)

    def params(self, index: int) -> SamplingParams:
        return replace(super().params(index), stop=list(self.stop))


def _settings(spec: TaskSpec, opt: Any, context: int) -> tuple[str, int, float, int]:
    """(strategy name, samples per problem, temperature, max_tokens) from the spec and any --strategy flags."""
    st = opt.strategy
    name = st.name if st is not None else "direct"
    if name not in ("direct", "self-refine"):
        raise LMForgeError(f"code tasks take --strategy direct or self-refine, not {name}")
    n = spec.n
    temperature = st.temperature if st is not None and st.temperature is not None else spec.temperature
    if temperature is None:
        temperature = 0.0 if n == 1 else SAMPLED_TEMPERATURE
    if n > 1 and temperature <= 0:
        raise LMForgeError(f"task {spec.name}: n={n} greedy samples would all be the same; set a temperature > 0")
    max_tokens = st.max_tokens if st is not None and st.max_tokens else spec.max_tokens
    return name, n, temperature, max(1, min(max_tokens, context // 2))


def run_code(lm: Any, spec: TaskSpec, items: list[Item], opt: Any) -> tuple[dict[str, list[float]],
                                                                            list[dict[str, Any]]]:
    """Generate ``spec.n`` completions per problem, run each with its tests in the sandbox (in parallel, while
    generation goes on), and score pass@k per problem. With ``--strategy self-refine`` the failing completions
    are revised (`strategies.self_refine`) with the test failure as feedback, up to the strategy's rounds.

    The prompt is the plain ``context`` (a base model continues the function) or, with ``--chat`` or a
    strategy, `CHAT_INSTRUCTION` in the chat template (an instruct model writes the whole function)."""
    from tqdm import tqdm

    tok = lm.tokenizer
    if lm.engine.max_batch != opt.batch_size:  # self-refine's revisions run on the same engine
        lm.configure_engine(max_batch=opt.batch_size)
    engine = lm.engine
    name, n, temperature, max_tokens = _settings(spec, opt, engine.context)
    ks = pass_ks(spec.metrics, n)
    chat = bool(opt.chat or opt.strategy is not None)
    base = _CodeStrategy("direct", temperature=temperature, max_tokens=max_tokens, seed=opt.seed,
                         stop=CHAT_STOP if chat else list(spec.stop),
                         system=opt.strategy.system if opt.strategy is not None else None)
    room = engine.context - max_tokens
    prompts = []
    for it in items:  # every prompt is checked before any is queued
        if chat:
            msgs = ([{"role": "system", "content": base.system}] if base.system else []) + \
                [{"role": "user", "content": CHAT_INSTRUCTION.format(question=it.question)}]
            prompts.append(tok.encode_chat(msgs))
        else:
            prompts.append(tok.encode(it.contexts[0]))
        if len(prompts[-1]) > room:
            raise LMForgeError(f"task {spec.name}: problem {it.index}'s prompt is {len(prompts[-1])} tokens; with "
                               f"max_tokens {max_tokens} the context holds {room}")
    seqs = [engine.add(ids, base.params(it.index * n + j)) for it, ids in zip(items, prompts) for j in range(n)]
    outcomes: dict[tuple[int, str], Future[Outcome]] = {}  # (item position, completion) -> its test run
    programs = [(it.question, str(it.gold)) for it in items]

    def test(pos: int, completion: str) -> Future[Outcome]:
        if (pos, completion) not in outcomes:
            prompt, tests = programs[pos]
            code = extract_code(completion, entry_point(prompt))
            outcomes[pos, completion] = pool.submit(build_program(prompt, code, tests))
        return outcomes[pos, completion]

    bar = tqdm(total=len(seqs), desc=spec.name, disable=not opt.progress, unit="completion")
    with CheckPool(spec.timeout) as pool:
        started = [False] * len(seqs)
        try:
            while not all(started):
                engine.step()
                for q, s in enumerate(seqs):
                    if s.done and not started[q]:
                        if s.error is not None:
                            raise LMForgeError(f"generation failed: {s.error}")
                        started[q] = True
                        test(q // n, s.text)  # tested while the others still generate
                        bar.update(1)
        finally:
            bar.close()
            for s in seqs:
                if not s.done:  # interrupted: leave the engine empty for its next user
                    engine.cancel(s)
        drafts = [s.text for s in seqs]
        final = drafts
        refined = None
        if name == "self-refine":
            assert opt.strategy is not None

            def critic(question: str, draft: str) -> str | None:  # the sandbox as self-refine's critic
                out = test(by_question[question], draft).result()
                return None if out.passed else out.feedback

            by_question = {it.question: pos for pos, it in enumerate(items)}
            if len(by_question) != len(items):
                raise LMForgeError(f"task {spec.name}: self-refine needs distinct problem prompts")
            st = replace(base, name="self-refine", max_rounds=opt.strategy.max_rounds)
            refined = self_refine(lm, [it.question for it in items for _ in range(n)], critic=critic, strategy=st,
                                  drafts=drafts, prompt=CHAT_INSTRUCTION, revise_prompt=REVISE_INSTRUCTION,
                                  progress=opt.progress)
            final = [sol.text for sol in refined]
        runs = [[test(q // n, t) for q, t in enumerate(texts)] for texts in (drafts, final)]  # all queued first
        results = [[f.result() for f in fs] for fs in runs]
    per: dict[str, list[float]] = {}
    samples = []
    for pos, it in enumerate(items):
        got = results[1][pos * n:(pos + 1) * n]
        rec: dict[str, Any] = {"index": it.index, "task_id": it.doc.get("task_id"),
                               "completions": final[pos * n:(pos + 1) * n], "tests": [o.record() for o in got]}
        for k in ks:
            rec[f"pass@{k}"] = pass_at_k(n, sum(o.passed for o in got), k)
            per.setdefault(f"pass@{k}", []).append(rec[f"pass@{k}"])
        if refined is not None:
            first = results[0][pos * n:(pos + 1) * n]
            rec["drafts"] = [{"completion": t, **o.record()} for t, o in zip(drafts[pos * n:(pos + 1) * n], first)]
            rec["rounds"] = [len(sol.chains) - 1 for sol in refined[pos * n:(pos + 1) * n]]
            for k in ks:
                per.setdefault(f"draft_pass@{k}", []).append(pass_at_k(n, sum(o.passed for o in first), k))
        samples.append(rec)
    return per, samples
