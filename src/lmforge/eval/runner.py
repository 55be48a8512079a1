"""Run tasks against a loaded model: prompt building (few-shot, chat), scoring, metrics with stderr."""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import LMForgeError
from ..tokenizer import Tokenizer
from .code import run_code
from .generate import drive, extract_answer, is_correct
from .scoring import Score, perplexity, score_groups
from .seq2seq import run_seq2seq
from .strategies import Strategy, evaluate_strategy
from .tasks import Item, TaskSpec, build_items, fewshot_prefix, load_items, read_records, sample_fewshot
from .tooleval import run_with_tools


@dataclass
class EvalOptions:
    limit: int | None = None
    shots: int | None = None  # None: the task's default
    batch_size: int = 16
    chat: bool = False
    seed: int = 1234
    progress: bool = False
    window: int | None = None  # perplexity: tokens per window (default: the model's context)
    stride: int | None = None  # perplexity: new tokens per window (default: window / 2)
    resume: bool = True  # continue an interrupted multiple-choice run from its saved scores
    strategy: Strategy | None = None  # generative tasks: answer each item's question with this strategy
    tools: tuple[str, ...] = ()  # generative tasks: tools offered in 0-shot chat prompts (eval/tooleval.py)
    tool_execution: bool = True  # run the calls during generation (else the model writes their results)
    num_beams: int = 1  # seq2seq tasks on an encoder-decoder: beam search (1: greedy)


def _fingerprint(f: Path, chunk: int = 1 << 20) -> str:
    """A file's identity by content, not by path or time: a copy or a fresh checkout of the same data still
    matches. Large files (model weights) are sampled: their size plus a few chunks spread through them."""
    size = f.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(f, "rb") as fh:
        if size <= 16 * chunk:
            h.update(fh.read())
        else:
            for k in range(16):
                fh.seek((size - chunk) * k // 15)
                h.update(fh.read(chunk))
    return h.hexdigest()[:16]


def _stamp(path: str | Path) -> list[Any]:
    p = Path(path)
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    return [[f.name if f == p else str(f.relative_to(p)), _fingerprint(f)] for f in files if f.exists()]


class Progress:
    """Scores of the items a multiple-choice run has finished, appended as it goes, so running the same
    evaluation again (same model file, data, task and options) continues where it stopped. The file
    lives under $LMFORGE_HOME/eval-progress and is removed when the task completes."""

    def __init__(self, lm: Any, spec: TaskSpec, path: Path, opt: EvalOptions, shots: int) -> None:
        from .. import __version__
        from ..registry import home

        key = {"version": __version__, "model": _stamp(lm.path), "data": _stamp(path), "task": spec.name,
               "source": spec.source, "shots": shots, "seed": opt.seed, "chat": opt.chat, "limit": opt.limit}
        if getattr(lm, "adapter", None) is not None:  # the same base with an adapter is another model
            key["adapter"] = _stamp(lm.adapter)
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        self.path = home() / "eval-progress" / f"{spec.name}-{digest}.jsonl"

    def load(self) -> dict[int, list[Score]]:
        done: dict[int, list[Score]] = {}
        if not self.path.is_file():
            return done
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:  # a line cut short by an interruption is simply scored again
                rec = json.loads(line)
                done[int(rec["i"])] = [Score(float(lp), bool(g), int(n)) for lp, g, n in rec["s"]]
            except (ValueError, KeyError, TypeError):
                continue
        return done

    def append(self, scores: dict[int, list[Score]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            for i, sc in scores.items():
                f.write(json.dumps({"i": i, "s": [[x.logprob, x.greedy, x.tokens] for x in sc]}) + "\n")

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


def mean_stderr(xs: list[float]) -> float:
    """Standard error of a sample mean (sample std with ddof=1, as lm-eval-harness reports it)."""
    if len(xs) < 2:
        return float("nan")
    return float(np.std(xs, ddof=1) / math.sqrt(len(xs)))


def mc_metrics(logprobs: list[list[float]], golds: list[int], choice_texts: list[list[str]]
               ) -> dict[str, list[int]]:
    """Per-item correctness: ``acc`` by the highest log-likelihood, ``acc_norm`` by log-likelihood divided
    by the choice's length in characters (lm-eval-harness's definition)."""
    acc, acc_norm = [], []
    for ll, gold, texts in zip(logprobs, golds, choice_texts):
        a = np.asarray(ll, dtype=np.float64)
        lens = np.array([max(len(t), 1) for t in texts], dtype=np.float64)
        acc.append(int(int(np.argmax(a)) == gold))
        acc_norm.append(int(int(np.argmax(a / lens)) == gold))
    return {"acc": acc, "acc_norm": acc_norm}


def _prefix_id(tok: Tokenizer) -> int | None:
    for t in (tok.bos_token, tok.eos_token):
        if t and tok.token_to_id(t) is not None:
            return tok.token_to_id(t)
    return None


def _chat_text(tok: Tokenizer, spec: TaskSpec, shots: list[Item], context: str) -> str:
    msgs: list[dict[str, Any]] = []
    for s in shots:
        g = int(s.gold) if isinstance(s.gold, int) else 0
        msgs += [{"role": "user", "content": s.contexts[g]}, {"role": "assistant", "content": s.continuations[g]}]
    msgs.append({"role": "user", "content": context})
    return tok.apply_chat_template(msgs, add_generation_prompt=True)


def encode_pair(tok: Tokenizer, context: str, continuation: str, special: bool = True,
                prefix_id: int | None = None) -> tuple[list[int], list[int]]:
    """Token ids of a (context, continuation) pair the way lm-eval-harness makes them: trailing context
    whitespace moves into the continuation, and the continuation is what encoding the joined text adds
    after the context's own tokens."""
    n = len(context) - len(context.rstrip(" "))
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    ctx = tok.encode(context, add_special_tokens=special) if context else []
    whole = tok.encode(context + continuation, add_special_tokens=special)
    cont = whole[len(ctx):]
    if not ctx:  # nothing to condition on: start from the BOS/EOS token
        if prefix_id is None:
            raise LMForgeError("an empty context needs a tokenizer with a BOS or EOS token")
        ctx = [prefix_id]
    return ctx, cont


def _pool(spec: TaskSpec, path: Path, items: list[Item]) -> tuple[list[Item], bool]:
    """Few-shot exemplars: the spec's train split (resolved beside the data file) or the set itself."""
    if spec.fewshot_data:
        p = Path(spec.fewshot_data).expanduser()
        p = p if p.is_absolute() else path.parent / p
        if p.is_file():
            return build_items(spec, read_records(spec, p)), False
    return items, True


def run_task(lm: Any, spec: TaskSpec, data: str | Path | None, opt: EvalOptions) -> dict[str, Any]:
    """Evaluate one task; returns {"rows": metric rows, "samples": per-item records, "seconds", "n"}."""
    tok: Tokenizer = lm.tokenizer
    shots = spec.default_shots if opt.shots is None else opt.shots
    if opt.strategy is not None:
        check_strategy(spec, opt.shots)
        shots = 0
    if opt.tools:
        if opt.shots:
            raise LMForgeError("--tools prompts are 0-shot chat; drop --shots")
        shots = 0
    check_beams(spec, opt.num_beams)
    all_items, path = load_items(spec, data)
    items = all_items[:opt.limit] if opt.limit else all_items
    t0 = time.perf_counter()
    if spec.kind == "perplexity":
        if opt.chat or shots:
            raise LMForgeError("perplexity takes neither --chat nor --shots")
        text = "".join(str(r.doc.get("text", "")) for r in items)
        ids = tok.encode(text, add_special_tokens=False)
        nll, n = perplexity(lm.model, ids, window=opt.window, stride=opt.stride, prefix_id=_prefix_id(tok),
                            progress=opt.progress)
        nbytes, words = len(text.encode("utf-8")), len(text.split())
        vals = {"perplexity": math.exp(nll / n), "bits_per_byte": nll / math.log(2) / max(nbytes, 1),
                "word_perplexity": math.exp(nll / max(words, 1))}
        rows = [{"task": spec.name, "metric": m, "value": v, "stderr": None, "n": n, "shots": 0}
                for m, v in vals.items()]
        return {"rows": rows, "samples": [{"nll": nll, "tokens": n, "bytes": nbytes, "words": words}],
                "seconds": time.perf_counter() - t0, "n": 1, "data": str(path)}
    pool, same = _pool(spec, path, all_items)
    if spec.kind == "seq2seq":
        if opt.tools:
            raise LMForgeError(f"--tools applies to generate tasks; {spec.name} is a seq2seq task")
        rows, samples, shots = run_seq2seq(lm, spec, items, pool, same, shots, opt)
        return {"rows": rows, "samples": samples, "seconds": time.perf_counter() - t0, "n": len(items),
                "data": str(path), "resumed": 0}
    prefix_id = _prefix_id(tok)
    if spec.kind == "multiple_choice":
        groups = []
        for it in items:
            ex = sample_fewshot(pool, shots, it.index, opt.seed, same)
            reqs = []
            for ctx, cont in zip(it.contexts, it.continuations):
                if opt.chat:
                    reqs.append(encode_pair(tok, _chat_text(tok, spec, ex, ctx), cont, False, prefix_id))
                else:
                    reqs.append(encode_pair(tok, fewshot_prefix(spec, ex) + ctx, spec.target_delimiter + cont,
                                            True, prefix_id))
            groups.append(reqs)
        pad = prefix_id or 0
        saved = Progress(lm, spec, path, opt, shots)
        if not opt.resume:
            saved.clear()
        done = {i: sc for i, sc in saved.load().items() if i < len(groups)}
        if done and opt.progress:
            print(f"{spec.name}: resuming, {len(done)} of {len(groups)} items already scored", file=sys.stderr)
        scores = score_groups(lm.model, groups, batch_size=opt.batch_size, pad_id=pad, progress=opt.progress,
                              desc=spec.name, done=done, on_batch=saved.append)
        saved.clear()
        lls = [[s.logprob for s in g] for g in scores]
        golds = [int(it.gold) for it in items]
        per = mc_metrics(lls, golds, [it.choice_texts for it in items])
        samples = [{"index": it.index, "gold": g, "logprobs": ll, "acc": a, "acc_norm": an,
                    "greedy": [s.greedy for s in sc]}
                   for it, g, ll, a, an, sc in zip(items, golds, lls, per["acc"], per["acc_norm"], scores)]
    elif spec.kind == "code":
        done = {}
        per, samples = run_code(lm, spec, items, opt)
    elif opt.strategy is not None:
        done = {}
        if lm.engine.max_batch != opt.batch_size:
            lm.configure_engine(max_batch=opt.batch_size)
        per, samples = evaluate_strategy(lm, items, opt.strategy, tools=list(opt.tools) or None,
                                         progress=opt.progress)
    elif opt.tools:
        done = {}
        per, samples = run_with_tools(lm, spec, items, list(opt.tools), opt.tool_execution, opt.batch_size,
                                      opt.progress)
    else:
        done = {}
        per, samples = _run_generate(lm, spec, items, pool, same, shots, opt)
    rows = [{"task": spec.name, "metric": m, "value": float(np.mean(v)), "stderr": mean_stderr(v), "n": len(v),
             "shots": shots} for m, v in per.items()]
    if opt.strategy is not None:
        for r in rows:
            r["strategy"] = opt.strategy.name
    return {"rows": rows, "samples": samples, "seconds": time.perf_counter() - t0, "n": len(items),
            "data": str(path), "resumed": len(done)}


def check_beams(spec: TaskSpec, num_beams: int | None) -> None:
    """Beam search decodes seq2seq tasks (for encoder-decoders); other tasks are refused by name."""
    if num_beams is not None and num_beams > 1 and spec.kind != "seq2seq":
        raise LMForgeError(f"--num-beams applies to seq2seq tasks; {spec.name} is a "
                           f"{spec.kind.replace('_', '-')} task")


def check_strategy(spec: TaskSpec, shots: int | None) -> None:
    """A reasoning strategy answers generative tasks' questions, 0-shot, in the chat template."""
    if spec.kind == "seq2seq":
        raise LMForgeError(f"--strategy applies to question-answering tasks; {spec.name} is a seq2seq task")
    if spec.kind not in ("generate", "code"):
        raise LMForgeError(f"--strategy applies to generative tasks; {spec.name} is a {spec.kind.replace('_', '-')} "
                           "task, scored by log-likelihood")
    if shots:
        raise LMForgeError("--strategy prompts are 0-shot; drop --shots")


def _run_generate(lm: Any, spec: TaskSpec, items: list[Item], pool: list[Item], same: bool, shots: int,
                  opt: EvalOptions) -> tuple[dict[str, list[int]], list[dict[str, Any]]]:

    from ..engine import Engine, SamplingParams

    tok: Tokenizer = lm.tokenizer
    engine = Engine(lm.model, tok, max_batch=opt.batch_size)
    # A small context window keeps at least half of itself for the prompt.
    max_tokens = max(1, min(spec.max_tokens, engine.context // 2))
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, stop=list(spec.stop))
    room = engine.context - max_tokens
    seqs = []
    for it in items:
        ex = sample_fewshot(pool, shots, it.index, opt.seed, same)
        if opt.chat:
            ids = tok.encode(_chat_text(tok, spec, ex, it.contexts[0]), add_special_tokens=False)
        else:
            ids = tok.encode(fewshot_prefix(spec, ex) + it.contexts[0])
        seqs.append(engine.add(ids[-room:], params))  # keep the question, drop the oldest exemplar text
    drive(engine, seqs, spec.name, opt.progress)
    em, samples = [], []
    for it, s in zip(items, seqs):
        pred = extract_answer(s.text, spec.extract)
        ok = int(is_correct(pred, str(it.gold), spec.extract))
        em.append(ok)
        samples.append({"index": it.index, "completion": s.text, "prediction": pred, "reference": str(it.gold),
                        "exact_match": ok})
    return {"exact_match": em}, samples


def evaluate(lm: Any, tasks: list[TaskSpec], data: dict[str, str], opt: EvalOptions, model_name: str = ""
             ) -> dict[str, Any]:
    """Run several tasks; returns the results document written to results.json."""
    out: dict[str, Any] = {"model": model_name or str(lm.path), "model_path": str(lm.path),
                           "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                           "options": {k: getattr(opt, k) for k in ("limit", "shots", "batch_size", "chat", "seed",
                                                                  "tools", "tool_execution", "num_beams")},
                           "strategy": asdict(opt.strategy) if opt.strategy is not None else None,
                           "results": [], "tasks": {}, "samples": {}}
    for spec in tasks:
        r = run_task(lm, spec, data.get(spec.name), opt)
        out["results"] += r["rows"]
        scored = r["n"] - r.get("resumed", 0)  # items/s counts only what this run scored
        out["tasks"][spec.name] = {"n": r["n"], "seconds": round(r["seconds"], 3), "data": r["data"],
                                   "items_per_s": round(scored / r["seconds"], 3) if r["seconds"] > 0 else None,
                                   "resumed": r.get("resumed", 0), "source": spec.source}
        out["samples"][spec.name] = r["samples"]
    return out
