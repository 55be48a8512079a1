"""Declarative task specs: a TOML file maps a local data file's fields to context, choices and gold.

A spec names a file format (jsonl, json, csv, tsv, lines, text; .gz/.bz2 read transparently) and Jinja
snippets evaluated against each record: ``context`` and ``continuation`` are templates (rendered to
text); ``choices``, ``contexts`` and ``gold`` are expressions (evaluated to Python values). Adding a
multiple-choice dataset is a new TOML file, no Python. Text-to-text tasks (``kind = "seq2seq"``:
translation, summarization) name a source and a reference field, and may read line-aligned parallel files
(``format = "parallel"``). See docs/eval.md for every key.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import json
import os
import random
import re
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import LMForgeError

KINDS = ("multiple_choice", "generate", "perplexity", "code", "seq2seq")
FORMATS = ("jsonl", "json", "csv", "tsv", "lines", "text", "parallel")
SEQ2SEQ_METRICS = ("bleu", "chrf", "rouge1", "rouge2", "rougeL")


@dataclass
class TaskSpec:
    name: str
    kind: str = "multiple_choice"
    format: str = "jsonl"
    data: str | None = None  # default data file, relative to $LMFORGE_DATA / $LMFORGE_HOME/data
    lines_per_record: int = 1  # format "lines": a record is this many lines, seen as the list `lines`
    labels: str | None = None  # a file of one label per line, joined to the records as field `label`
    files: dict[str, str] | None = None  # format "parallel": field -> line-aligned file in the data directory
    columns: list[str] | None = None  # csv/tsv without a header: the columns' field names
    drop_unterminated: bool = False  # drop a last line with no newline (a file cut short mid-line)
    every: int = 1  # keep every k-th record (0, k, 2k, ...): a fixed subset of a large set
    fewshot_data: str | None = None  # a train split to draw exemplars from (default: the set itself)
    context: str = "{{ context }}"
    choices: str | None = None  # expression -> list of continuation texts
    contexts: str | None = None  # expression -> one context per choice (partial scoring, e.g. Winogrande)
    continuation: str | None = None  # template: the shared continuation when `contexts` is used
    gold: str = "gold"  # expression -> index into the choices, or the gold text
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    # generative tasks
    target: str | None = None  # template: the exemplar answer shown after the context in few-shot prompts
    answer: str = "{{ answer }}"  # template: the reference answer text the extracted answer is compared to
    question: str | None = None  # template: the bare question a reasoning strategy is asked (default: context)
    extract: str = "number"  # "number" (after `####`, else the last number) or "regex:<pattern>"
    stop: list[str] = field(default_factory=lambda: ["\n\n", "Question:"])
    max_tokens: int = 256
    default_shots: int = 0
    # code tasks: `answer` renders the test program, run after the prompt and the model's code (eval/code.py)
    n: int = 1  # samples per problem (pass@k needs n >= k)
    temperature: float | None = None  # default: greedy with n = 1, else code.SAMPLED_TEMPERATURE
    timeout: float = 10.0  # wall-clock seconds one program's tests may run
    # seq2seq tasks: the source (input) and reference (output) fields, seen by templates as `source_text` and
    # `target_text`; an encoder-decoder reads `prefix` + source (T5-style), a decoder the few-shot `context`
    source_field: str | None = None
    target_field: str | None = None
    prefix: str = ""
    source_lang: str | None = None
    target_lang: str | None = None
    tokenize: str = "13a"  # sacrebleu's BLEU tokenizer ("zh", "ja-mecab", "char", "none" ...)
    metrics: list[str] = field(default_factory=list)
    source: str = ""  # where the spec came from

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise LMForgeError(f"task {self.name}: kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.format not in FORMATS:
            raise LMForgeError(f"task {self.name}: format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if self.kind == "multiple_choice" and (self.choices is None) == (self.contexts is None):
            raise LMForgeError(f"task {self.name}: a multiple-choice spec needs exactly one of `choices` or `contexts`")
        if self.contexts is not None and self.continuation is None:
            raise LMForgeError(f"task {self.name}: `contexts` (partial scoring) needs a `continuation` template")
        if not isinstance(self.n, int) or self.n < 1:
            raise LMForgeError(f"task {self.name}: n (samples per problem) must be a positive integer, got {self.n!r}")
        if not self.timeout > 0:
            raise LMForgeError(f"task {self.name}: timeout must be positive, got {self.timeout!r}")
        if not isinstance(self.every, int) or self.every < 1:
            raise LMForgeError(f"task {self.name}: every must be a positive integer, got {self.every!r}")
        if (self.format == "parallel") != bool(self.files):
            raise LMForgeError(f"task {self.name}: `files` (field -> file) goes with format \"parallel\", and only with it")
        if self.kind == "seq2seq" and not (self.source_field and self.target_field):
            raise LMForgeError(f"task {self.name}: a seq2seq spec needs `source_field` and `target_field`")
        if not self.metrics:
            self.metrics = {"multiple_choice": ["acc", "acc_norm"], "generate": ["exact_match"], "code": ["pass@1"],
                            "perplexity": ["perplexity", "bits_per_byte", "word_perplexity"],
                            "seq2seq": ["bleu", "chrf"]}[self.kind]
        bad = [m for m in self.metrics if m not in SEQ2SEQ_METRICS]
        if self.kind == "seq2seq" and bad:
            raise LMForgeError(f"task {self.name}: unknown metric(s) {', '.join(bad)} "
                               f"(seq2seq tasks: {', '.join(SEQ2SEQ_METRICS)})")


@dataclass
class Item:
    """One evaluation example, rendered: contexts[i] + delimiter + continuations[i] is choice i."""

    index: int
    contexts: list[str]
    continuations: list[str]
    gold: int | str
    choice_texts: list[str]  # for acc_norm's length normalisation (the choice without the delimiter)
    doc: dict[str, Any]
    question: str = ""  # generative tasks: what a reasoning strategy is asked
    source: str = ""  # seq2seq tasks: the source text an encoder-decoder reads after the task prefix

    def exemplar(self, delimiter: str) -> str:
        g = int(self.gold) if isinstance(self.gold, int) else 0
        return self.contexts[g] + delimiter + self.continuations[g]


# -- specs ---------------------------------------------------------------------------------------------
def _spec_from_dict(d: dict[str, Any], source: str) -> TaskSpec:
    d = dict(d.get("task", d))
    known = set(TaskSpec.__dataclass_fields__) - {"source"}
    bad = sorted(set(d) - known)
    if bad:
        raise LMForgeError(f"{source}: unknown task key(s) {', '.join(bad)}")
    if "name" not in d:
        raise LMForgeError(f"{source}: a task spec needs a `name`")
    return TaskSpec(**d, source=source)


def load_spec(path: str | Path) -> TaskSpec:
    """Read a TOML task spec file."""
    path = Path(path).expanduser()
    try:
        d = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LMForgeError(f"no such task spec: {path}") from None
    except tomllib.TOMLDecodeError as e:
        raise LMForgeError(f"{path}: invalid TOML ({e})") from None
    return _spec_from_dict(d, str(path))


def builtin_tasks() -> dict[str, TaskSpec]:
    out = {}
    for f in sorted(resources.files("lmforge.eval").joinpath("specs").iterdir(), key=lambda f: f.name):
        if f.name.endswith(".toml"):
            spec = _spec_from_dict(tomllib.loads(f.read_text(encoding="utf-8")), f"builtin:{f.name}")
            out[spec.name] = spec
    return out


def get_task(name: str) -> TaskSpec:
    """A built-in task by name, or a spec file by path."""
    if name.endswith(".toml") or os.sep in name:
        return load_spec(name)
    tasks = builtin_tasks()
    if name not in tasks:
        raise LMForgeError(f"unknown task {name!r} (built-in: {', '.join(tasks)}; or pass a .toml spec file)")
    return tasks[name]


def data_dirs() -> list[Path]:
    from ..registry import home

    dirs = [Path(p).expanduser() for p in os.environ.get("LMFORGE_DATA", "").split(os.pathsep) if p]
    return dirs + [home() / "data"]


def resolve_data(spec: TaskSpec, data: str | Path | None) -> Path:
    """The task's data file (for format "parallel": the directory holding its files)."""
    found = Path.is_dir if spec.format == "parallel" else Path.is_file
    if data is not None:
        p = Path(data).expanduser()
        if not found(p):
            what = "data directory" if spec.format == "parallel" else "data file"
            raise LMForgeError(f"task {spec.name}: no such {what} {p}")
        return p
    if spec.data:
        for d in data_dirs():
            if found(d / spec.data):
                return d / spec.data
    where = f" (looked for {spec.data} under $LMFORGE_DATA and $LMFORGE_HOME/data)" if spec.data else ""
    raise LMForgeError(f"task {spec.name}: no data file; pass --data PATH{where}")


# -- reading ---------------------------------------------------------------------------------------------
def read_text(path: Path) -> str:
    opener = {".gz": gzip.open, ".bz2": bz2.open}.get(path.suffix.lower())
    try:
        if opener is not None:
            with opener(path, "rt", encoding="utf-8") as f:
                return f.read()
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError, EOFError) as e:
        raise LMForgeError(f"{path}: cannot read ({e})") from None


def read_records(spec: TaskSpec, path: Path) -> list[dict[str, Any]]:
    """The data file as a list of dict records (format "lines": {"lines": [...]} per record)."""
    fmt = spec.format
    text = "" if fmt == "parallel" else read_text(path)
    if spec.drop_unterminated and text and not text.endswith("\n"):
        text = text[:text.rfind("\n") + 1]
    try:
        if fmt == "parallel":
            recs = _read_parallel(spec, path)
        elif fmt in ("csv", "tsv") and spec.columns:
            recs = _read_columns(spec, path, text)
        elif fmt == "jsonl":
            recs = [json.loads(line) for line in text.splitlines() if line.strip()]
        elif fmt == "json":
            recs = json.loads(text)
            if isinstance(recs, dict):  # {"data": [...]}-style wrappers
                recs = next((v for v in recs.values() if isinstance(v, list)), [])
        elif fmt in ("csv", "tsv"):
            recs = list(csv.DictReader(io.StringIO(text), delimiter="\t" if fmt == "tsv" else ","))
        elif fmt == "lines":
            lines = text.split("\n")
            k = spec.lines_per_record
            while lines and not lines[-1].strip():
                lines.pop()
            if len(lines) % k:
                raise LMForgeError(f"{path}: {len(lines)} lines is not a multiple of lines_per_record={k}")
            recs = [{"lines": lines[i:i + k]} for i in range(0, len(lines), k)]
        else:
            recs = [{"text": text}]
    except json.JSONDecodeError as e:
        raise LMForgeError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None
    if not all(isinstance(r, dict) for r in recs):
        raise LMForgeError(f"{path}: every record must be an object")
    if spec.labels:
        lp = Path(spec.labels).expanduser()
        lp = lp if lp.is_absolute() else path.parent / lp
        if not lp.is_file():
            raise LMForgeError(f"task {spec.name}: labels file {lp} not found (it is looked for beside the data file)")
        labels = [ln.strip() for ln in read_text(lp).splitlines() if ln.strip()]
        if len(labels) != len(recs):
            raise LMForgeError(f"{lp}: {len(labels)} labels for {len(recs)} records")
        for r, lab in zip(recs, labels):
            r["label"] = lab
    recs = recs[::spec.every]
    if not recs:
        raise LMForgeError(f"{path}: no records")
    return recs


def _read_parallel(spec: TaskSpec, folder: Path) -> list[dict[str, Any]]:
    """Line-aligned files, one per field: record i holds line i of each."""
    cols = {}
    for name, f in (spec.files or {}).items():
        p = folder / f
        if not p.is_file():
            raise LMForgeError(f"task {spec.name}: no file {p} (field {name!r})")
        lines = read_text(p).split("\n")
        cols[name] = lines[:-1] if lines and lines[-1] == "" else lines
    sizes = {name: len(v) for name, v in cols.items()}
    if len(set(sizes.values())) > 1:
        raise LMForgeError(f"task {spec.name}: parallel files differ in line count ("
                           + ", ".join(f"{spec.files[n]}: {k}" for n, k in sizes.items()) + ")")  # type: ignore[index]
    names = list(cols)
    return [dict(zip(names, row)) for row in zip(*cols.values())]


def _read_columns(spec: TaskSpec, path: Path, text: str) -> list[dict[str, Any]]:
    """A csv/tsv file without a header row; extra columns (e.g. attribution) are ignored. A tsv line is split
    on tabs alone: quotes are text (sentences contain them)."""
    cols = spec.columns or []
    rows = ([ln.split("\t") for ln in text.splitlines()] if spec.format == "tsv"
            else list(csv.reader(io.StringIO(text))))
    recs = []
    for n, row in enumerate(rows, 1):
        if not row or row == [""]:
            continue
        if len(row) < len(cols):
            raise LMForgeError(f"{path}: line {n} has {len(row)} column(s), the spec names {len(cols)}")
        recs.append(dict(zip(cols, row)))
    return recs


# -- rendering -------------------------------------------------------------------------------------------
_ENV: Any = None


def _env() -> Any:
    global _ENV
    if _ENV is None:
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        _ENV = ImmutableSandboxedEnvironment(keep_trailing_newline=True)
        _ENV.filters["regex_replace"] = lambda s, pat, rep="": re.sub(pat, rep, s)
    return _ENV


class _Compiled:
    """A spec's templates and expressions, compiled once."""

    def __init__(self, spec: TaskSpec) -> None:
        import jinja2

        env = _env()
        try:
            self.context = env.from_string(spec.context)
            self.continuation = env.from_string(spec.continuation) if spec.continuation else None
            self.target = env.from_string(spec.target) if spec.target else None
            self.answer = env.from_string(spec.answer)
            self.question = env.from_string(spec.question) if spec.question else None
            self.choices = env.compile_expression(spec.choices) if spec.choices else None
            self.contexts = env.compile_expression(spec.contexts) if spec.contexts else None
            self.gold = env.compile_expression(spec.gold)
        except jinja2.TemplateSyntaxError as e:
            raise LMForgeError(f"task {spec.name}: template error: {e}") from None


def _render(spec: TaskSpec, fn: Any, rec: dict[str, Any], what: str, index: int) -> Any:
    import jinja2

    try:
        return fn.render(**rec) if hasattr(fn, "render") else fn(**rec)
    except (jinja2.TemplateError, TypeError, ValueError, KeyError, IndexError) as e:
        raise LMForgeError(f"task {spec.name}: record {index}: cannot evaluate {what} ({e})") from None


def build_items(spec: TaskSpec, records: list[dict[str, Any]]) -> list[Item]:
    """Render every record into an Item (contexts, continuations, gold)."""
    c = _Compiled(spec)
    items = []
    for i, rec in enumerate(records):
        if spec.kind == "seq2seq":
            items.append(_seq2seq_item(spec, c, rec, i))
            continue
        if spec.kind in ("generate", "code"):
            ctx = _render(spec, c.context, rec, "context", i)
            tgt = _render(spec, c.target, rec, "target", i) if c.target else ""
            question = _render(spec, c.question, rec, "question", i) if c.question else ctx
            items.append(Item(i, [ctx], [tgt], _render(spec, c.answer, rec, "answer", i), [tgt], rec, question))
            continue
        if spec.kind == "perplexity":
            items.append(Item(i, [], [], 0, [], rec))
            continue
        if c.choices is not None:
            choices = _render(spec, c.choices, rec, "choices", i)
            if not isinstance(choices, list | tuple) or not choices:
                raise LMForgeError(f"task {spec.name}: record {i}: `choices` must give a non-empty list, got {choices!r}")
            choices = [str(x) for x in choices]
            ctx = _render(spec, c.context, rec, "context", i)
            contexts, conts, texts = [ctx] * len(choices), choices, choices
        else:
            contexts = _render(spec, c.contexts, rec, "contexts", i)
            if not isinstance(contexts, list | tuple) or not contexts:
                raise LMForgeError(f"task {spec.name}: record {i}: `contexts` must give a non-empty list")
            contexts = [str(x) for x in contexts]
            cont = _render(spec, c.continuation, rec, "continuation", i)
            conts, texts = [cont] * len(contexts), [cont] * len(contexts)
        gold = _render(spec, c.gold, rec, "gold", i)
        if isinstance(gold, str) and gold.strip().lstrip("-").isdigit():
            gold = int(gold)
        if isinstance(gold, str):
            if gold not in texts:
                raise LMForgeError(f"task {spec.name}: record {i}: gold {gold!r} is not one of the choices")
            gold = texts.index(gold)
        if not isinstance(gold, int) or not 0 <= gold < len(texts):
            raise LMForgeError(f"task {spec.name}: record {i}: gold {gold!r} is not a choice index (0-{len(texts) - 1})")
        items.append(Item(i, list(contexts), list(conts), gold, list(texts), rec))
    return items


def _seq2seq_item(spec: TaskSpec, c: _Compiled, rec: dict[str, Any], i: int) -> Item:
    fields = {}
    for key, name in (("source_field", spec.source_field), ("target_field", spec.target_field)):
        if name not in rec:
            raise LMForgeError(f"task {spec.name}: record {i} has no field {name!r} (it has: {', '.join(map(str, rec))}); "
                               f"set `{key}` in a spec file")
        fields[key] = str(rec[name])
    rec = {**rec, "source_text": fields["source_field"], "target_text": fields["target_field"]}
    ctx = _render(spec, c.context, rec, "context", i)
    tgt = _render(spec, c.target, rec, "target", i) if c.target else rec["target_text"]
    return Item(i, [ctx], [tgt], rec["target_text"].strip(), [tgt], rec, ctx, rec["source_text"].strip())


def load_items(spec: TaskSpec, data: str | Path | None = None) -> tuple[list[Item], Path]:
    path = resolve_data(spec, data)
    return build_items(spec, read_records(spec, path)), path


# -- few-shot ----------------------------------------------------------------------------------------------
def sample_fewshot(pool: list[Item], k: int, item_index: int, seed: int, same_set: bool) -> list[Item]:
    """k exemplars for an item, the same on every run: a per-item RNG seeded by (seed, item index).

    With ``same_set`` the pool is the evaluated set itself, so the item is never its own exemplar."""
    if k <= 0:
        return []
    cand = [it for it in pool if not (same_set and it.index == item_index)]
    if len(cand) < k:
        raise LMForgeError(f"{k} few-shot exemplars requested but only {len(cand)} are available")
    return random.Random(f"{seed}:{item_index}").sample(cand, k)


def fewshot_prefix(spec: TaskSpec, shots: list[Item]) -> str:
    """The exemplars as text, each followed by the few-shot delimiter."""
    return "".join(s.exemplar(spec.target_delimiter) + spec.fewshot_delimiter for s in shots)
