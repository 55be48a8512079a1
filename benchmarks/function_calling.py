"""Function calling on a small evaluation set, with and without constrained decoding.

    python benchmarks/function_calling.py smollm2-135m-instruct
    python benchmarks/function_calling.py MODEL --device cuda --limit 20 --modes required,free

The set (`benchmarks/data/function_calling.jsonl`, tools in `function_calling_tools.json`): one user
request per case, the tools it offers (the right one among distractors) and the expected call. Modes
(each case expects one call, so parallel calls are off):

- ``required``: tool_choice "required", decoding constrained by the call grammar (as the server does);
- ``forced``: the same without the grammar: the answer starts with the call opening (``<tool_call>``) and
  the model writes the rest freely;
- ``free``: tool_choice "auto" without the grammar: the model's own output, parsed as the server parses it;
- ``auto``: tool_choice "auto" with the grammar (free text, or a call constrained once opened). Not run
  unless asked: it differs from ``free`` only in the calls the model opens.

Per mode, over all cases (greedy decoding, every case batched through one engine):

- **call-valid**: the answer holds at least one call, and every ``<tool_call>`` block in it parses, names an
  offered function and has arguments that validate against that function's schema (jsonschema);
- **exact-function**: the first call names the expected function;
- **argument-match**: that, and its arguments match the expected ones (`args_match`).
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path
from typing import Any

import jsonschema
from common import machine

DATA = Path(__file__).parent / "data"
MODES = ("required", "forced", "free", "auto")
DEFAULT_MODES = "required,forced,free"
HOW = {"required": "tool_choice required, grammar", "forced": "call opening forced, no grammar",
       "free": "tool_choice auto, no grammar", "auto": "tool_choice auto, grammar"}
_PUNCT = " \t\n.,!?;:'\""


def norm_text(s: str) -> str:
    """Strings compare case-folded, with whitespace collapsed, surrounding punctuation and quotes and a
    leading article ("the ") dropped: "The Louvre." matches "the louvre"."""
    s = re.sub(r"\s+", " ", s.casefold()).strip(_PUNCT)
    return s[4:] if s.startswith("the ") else s


def value_match(got: Any, want: Any, schema: dict[str, Any]) -> bool:
    """``got`` matches ``want`` under ``schema``: enums, integers and booleans exactly (a boolean is never a
    number), numbers to 1e-9 relative, free strings after `norm_text`, arrays item by item in order, objects
    by `args_match`."""
    if isinstance(want, bool) or isinstance(got, bool):
        return got is want
    if isinstance(want, dict):
        return isinstance(got, dict) and args_match(got, want, schema)
    if isinstance(want, list):
        items = schema.get("items", {})
        return (isinstance(got, list) and len(got) == len(want)
                and all(value_match(g, w, items) for g, w in zip(got, want)))
    if isinstance(want, (int, float)):
        return isinstance(got, (int, float)) and abs(got - want) <= 1e-9 * max(1.0, abs(want))
    if isinstance(want, str):
        if not isinstance(got, str):
            return False
        return got == want if "enum" in schema else norm_text(got) == norm_text(want)
    return got == want


def args_match(got: dict[str, Any], want: dict[str, Any], schema: dict[str, Any]) -> bool:
    """Every expected argument is given and matches (`value_match`); arguments the case does not expect
    (optional ones the request did not mention) are not judged, so the expected set is a subset."""
    props = schema.get("properties", {})
    return all(k in got and value_match(got[k], w, props.get(k, {})) for k, w in want.items())


def judge(text: str, offered: dict[str, dict[str, Any]], expected: dict[str, Any]) -> dict[str, bool]:
    """The three measures for one answer (`text`, as the model wrote it)."""
    from lmforge.tools.calling import parse_calls
    from lmforge.tools.grammar import CALL_OPEN

    _, calls = parse_calls(text)  # any name: a call to a function not offered counts as invalid below
    parsed = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]

    def valid(name: str, args: dict[str, Any]) -> bool:
        if name not in offered:
            return False
        try:
            jsonschema.validate(args, offered[name])
        except jsonschema.ValidationError:
            return False
        return True

    ok = bool(parsed) and text.count(CALL_OPEN) == len(parsed) and all(valid(n, a) for n, a in parsed)
    fn = bool(parsed) and parsed[0][0] == expected["name"]
    args = fn and args_match(parsed[0][1], expected["arguments"], offered[expected["name"]])
    return {"called": bool(parsed) or CALL_OPEN in text, "valid": ok, "function": fn, "arguments": args}


def run_mode(lm: Any, cases: list[dict[str, Any]], tools: dict[str, dict[str, Any]], mode: str,
             max_tokens: int) -> tuple[list[dict[str, bool]], list[str], float]:
    """Every case in one mode, queued together so the engine batches them; the per-case judgements, the
    answers and the wall time."""
    from lmforge.engine import SamplingParams
    from lmforge.tools.calling import check_tools
    from lmforge.tools.grammar import CALL_OPEN

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    prefix = CALL_OPEN + "\n" if mode == "forced" else ""
    t = time.perf_counter()
    gens = []
    for case in cases:
        offered = [tools[n] for n in case["tools"]]
        choice = check_tools(offered, "auto" if mode in ("free", "auto") else "required", parallel_tool_calls=False)
        constraint = lm.tool_constraint(choice) if mode in ("required", "auto") else None
        prompt = lm.chat_prompt(case["messages"], choice) + (lm.tokenizer.encode(prefix, add_special_tokens=False) if prefix else [])
        gens.append(lm.start(prompt, params, constraint))
    texts = []
    for g in gens:
        for _ in g:
            pass
        if g.sequence.error is not None:
            raise g.sequence.error
        texts.append(prefix + g.sequence.text)
    seconds = time.perf_counter() - t
    results = [judge(text, {n: tools[n]["function"]["parameters"] for n in case["tools"]}, case["expected"])
               for text, case in zip(texts, cases)]
    return results, texts, seconds


def main() -> None:
    import lmforge

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="a registry name, a .gguf file or an HF directory")
    ap.add_argument("--device", default=None, help="cpu (default), cuda, cuda:N")
    ap.add_argument("--modes", default=DEFAULT_MODES, help=f"comma-separated, of {', '.join(MODES)}")
    ap.add_argument("--limit", type=int, default=None, help="the first N cases only")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--json", default=None, help="also write the figures and every answer to this JSON file")
    a = ap.parse_args()
    modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise SystemExit(f"--modes: unknown mode {bad[0]!r} (choose from {', '.join(MODES)})")

    tools = {t["function"]["name"]: t for t in json.loads((DATA / "function_calling_tools.json").read_text())}
    cases = [json.loads(line) for line in (DATA / "function_calling.jsonl").read_text().splitlines() if line]
    cases = cases[:a.limit] if a.limit else cases
    start = time.perf_counter()
    lm = lmforge.load(a.model, device=a.device)
    lm.configure_engine(a.max_batch)
    schemas = len({c["expected"]["name"] for c in cases})
    print(f"{a.model}: {len(cases)} cases over {schemas} functions ({len(tools)} schemas offered); "
          f"machine: {machine()}" + (f"; on {a.device}" if a.device else ""), flush=True)

    report: dict[str, Any] = {"model": a.model, "cases": len(cases), "functions": schemas, "machine": machine(),
                              "modes": {}}
    print("| mode | how | called | call-valid | exact-function | argument-match | time |\n"
          "|---|---|---|---|---|---|---|", flush=True)
    for mode in modes:
        results, texts, seconds = run_mode(lm, cases, tools, mode, a.max_tokens)
        rate = {k: sum(r[k] for r in results) / len(results) for k in ("called", "valid", "function", "arguments")}
        report["modes"][mode] = {**{k: round(v, 4) for k, v in rate.items()}, "seconds": round(seconds, 1),
                                 "answers": [{"id": c["id"], "text": t, **r}
                                             for c, t, r in zip(cases, texts, results)]}
        print(f"| {mode} | {HOW[mode]} | {rate['called']:.0%} | {rate['valid']:.0%} "
                    f"| {rate['function']:.0%} | {rate['arguments']:.0%} | {seconds:.0f} s |", flush=True)
    print(f"total wall time {time.perf_counter() - start:.0f} s (loading included)")
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
